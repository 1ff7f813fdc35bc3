"""JavaScript's behaviour where CHP's clients can see it, in Python.

CHP is a Node program: its REST API decodes route paths with `decodeURIComponent`, reads
`?inactive_since=` with `Date.parse`, writes times with `Date.prototype.toJSON` and bodies with
`JSON.stringify`, and parses request bodies with `JSON.parse`. JupyterHub and other clients were
written against what those functions accept and produce, so hubproxy reproduces them here,
quirks included, rather than use Python's nearest equivalents (which differ at the edges:
`urllib.parse.unquote` replaces bad UTF-8 instead of refusing it, `datetime.fromisoformat`
accepts other forms than `Date.parse`, `json` accepts `NaN`). Each function is pure and tested
as a table of cases (tests/test_jscompat.py); the API (api.py) and the data plane's path
decoding (proxy/paths.py) use them. Where we deliberately differ from JS, the function says so.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import urllib.parse
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_tz
from typing import Any

_ESCAPE_RUN = re.compile(r"(?:%[0-9A-Fa-f]{2})+")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def decode_uri_component(text: str) -> str:
    """JavaScript's `decodeURIComponent`: every `%XX` decoded, the bytes as strict UTF-8.

    Raises ValueError for a `%` not followed by two hex digits or for bytes that are not UTF-8
    (overlong forms, encoded surrogates and truncated sequences included), where JS throws
    `URIError: URI malformed`.
    """
    if "%" not in text:
        return text
    if text.isascii() and not _BAD_ESCAPE.search(text):
        # the common case in C: the data plane decodes every request path that has escapes.
        # (Equivalent to the runs below: an ASCII character never belongs to a UTF-8 sequence.)
        with contextlib.suppress(UnicodeDecodeError):
            return urllib.parse.unquote_to_bytes(text).decode("utf-8")
    return _decode_escape_runs(text)


def _decode_escape_runs(text: str) -> str:
    """decode_uri_component one run of escapes at a time, so that an error names the run."""
    parts: list[str] = []
    pos = 0
    for match in _ESCAPE_RUN.finditer(text):
        parts.append(text[pos : match.start()])
        run = match.group()
        try:
            parts.append(bytes.fromhex(run.replace("%", "")).decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"{run} is not UTF-8") from None
        pos = match.end()
    parts.append(text[pos:])
    for literal in parts[::2]:
        if "%" in literal:
            raise ValueError("'%' not followed by two hex digits")
    return "".join(parts)


_MS_PER_DAY = 86_400_000
_MAX_TIME_MS = 8_640_000_000_000_000  # the range of a JS Date: +-100,000,000 days
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ISO_DATE = re.compile(
    r"(?P<year>[+-]\d{6}|\d{4})"
    r"(?:-(?P<month>\d\d)(?:-(?P<day>\d\d))?)?"
    r"(?:[Tt ](?P<hour>\d\d):(?P<minute>\d\d)(?::(?P<second>\d\d)(?:[.,](?P<fraction>\d+))?)?)?"
    r" ?(?P<zone>[Zz]|UTC|GMT|[+-]\d\d(?::?\d\d)?)?"
)
_BARE_YEAR = re.compile(r"[+-]?\d{1,6}")


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 in the proleptic Gregorian calendar, for any year (H. Hinnant)."""
    year -= month <= 2
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    return era * 146_097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719_468


def _time_ms(year: int, month: int, day: int, h: int, m: int, s: int, ms: int, off: int) -> int:
    # like V8, a day past the month's end rolls over (2019-02-31 is 2019-03-03)
    return (
        _days_from_civil(year, month, 1) * _MS_PER_DAY
        + (day - 1) * _MS_PER_DAY
        + ((h * 60 + m) * 60 + s) * 1000
        + ms
        - off * 1000
    )


def _parse_iso(match: re.Match[str]) -> int | None:
    g = match.groupdict()
    if g["year"] == "-000000":
        return None
    year = int(g["year"])
    month = int(g["month"] or 1)
    day = int(g["day"] or 1)
    hour = int(g["hour"] or 0)
    minute = int(g["minute"] or 0)
    second = int(g["second"] or 0)
    millis = int((g["fraction"] or "0")[:3].ljust(3, "0"))
    if not (1 <= month <= 12 and 1 <= day <= 31 and minute <= 59 and second <= 59):
        return None
    if hour > 24 or (hour == 24 and (minute or second or millis)):
        return None
    offset = 0
    zone = g["zone"]
    if zone and zone[0] in "+-":
        digits = zone[1:].replace(":", "")
        zh, zm = int(digits[:2]), int(digits[2:] or 0)
        if zh > 23 or zm > 59:
            return None
        offset = (zh * 60 + zm) * 60 * (-1 if zone[0] == "-" else 1)
    return _time_ms(year, month, day, hour, minute, second, millis, offset)


def parse_js_date(value: str) -> int | None:
    """Milliseconds since the epoch for what JS `Date.parse` accepts (the common forms), or None.

    Accepted: ISO 8601 as in ECMAScript (`2000`, `2000-01`, `2000-01-01`, with `THH:MM`,
    `:SS`, `.fraction`, and `Z` or `+HH:MM`), plus V8's lenient variants (a space for `T`,
    lower-case `t`/`z`, `+HHMM`, `UTC`/`GMT`); a bare integer as a year (`12345` is the year
    12345, as in V8); and RFC 2822 / HTTP dates (`Sat, 01 Jan 2000 00:00:00 GMT`).
    A date or date-time without an offset is UTC. (JS reads a date-time without offset as local
    time; a server's local zone is an accident of deployment, and Python clients typically send
    naive UTC from `datetime.utcnow().isoformat()`.)
    """
    value = value.strip()
    ms: int | None = None
    if match := _ISO_DATE.fullmatch(value):
        ms = _parse_iso(match)
    elif _BARE_YEAR.fullmatch(value):
        ms = _time_ms(int(value), 1, 1, 0, 0, 0, 0, 0)
    elif parts := parsedate_tz(value):
        year, month, day, hour, minute, second = parts[:6]
        if 1 <= month <= 12 and 1 <= day <= 31 and hour <= 23 and minute <= 59 and second <= 60:
            ms = _time_ms(year, month, day, hour, minute, second, 0, parts[9] or 0)
    if ms is None or abs(ms) > _MAX_TIME_MS:
        return None
    return ms


def epoch_ms(when: datetime) -> int:
    """JS `Date.prototype.getTime`: milliseconds since the epoch (a naive datetime is UTC)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (when - _EPOCH) // timedelta(milliseconds=1)


def format_js_date(when: datetime) -> str:
    """JS `Date.prototype.toJSON`: `YYYY-MM-DDTHH:MM:SS.mmmZ` in UTC, milliseconds truncated."""
    if when.tzinfo is UTC:  # the store's own times: the fast path (GET all formats thousands)
        return when.isoformat(timespec="milliseconds")[:-6] + "Z"
    if when.tzinfo is not None and when.utcoffset():
        when = when.astimezone(UTC)
    return when.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return format_js_date(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def json_bytes(value: Any) -> bytes:
    """JS `JSON.stringify` as UTF-8: compact, non-ASCII kept as is, dates as `toJSON` gives them.

    A lone surrogate (which a JSON body may carry as `\\ud800`) cannot be UTF-8; then the whole
    document is written with `\\u` escapes instead (JS escapes just the surrogate).
    """
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=_json_default)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":"), default=_json_default).encode("ascii")


def to_json(value: Any) -> str:
    """`json_bytes` as text, for log lines."""
    return json_bytes(value).decode("utf-8")


class JSONSyntaxError(ValueError):
    """What JS `JSON.parse` throws; the message starts with `SyntaxError: `, as V8's."""


def _parse_float(text: str) -> float | None:
    # `1e400` parses to Infinity in JS too, which JSON.stringify writes back as null
    value = float(text)
    return value if math.isfinite(value) else None


def _reject_constant(name: str) -> Any:
    raise JSONSyntaxError(f"SyntaxError: Unexpected token '{name[0]}'")


# built once: json.loads with these arguments builds a decoder per call
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_parse_float)


def json_parse(text: str) -> Any:
    """JS `JSON.parse`: `NaN` and `Infinity` refused, numbers beyond a double's range null.

    Raises JSONSyntaxError (a ValueError) with a `SyntaxError: ...` message.
    """
    if not text.strip(" \t\n\r"):
        raise JSONSyntaxError("SyntaxError: Unexpected end of JSON input")
    try:
        return _DECODER.decode(text)
    except JSONSyntaxError:
        raise
    except json.JSONDecodeError as e:
        raise JSONSyntaxError(f"SyntaxError: {e}") from None
    except RecursionError:
        raise JSONSyntaxError("SyntaxError: nested too deeply") from None
    except ValueError as e:  # e.g. an integer beyond Python's 4300-digit conversion limit
        raise JSONSyntaxError(f"SyntaxError: {e}") from None

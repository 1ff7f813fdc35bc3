"""JavaScript's behaviour, as CHP's clients see it (jscompat): tables of cases.

`decode_uri_component` is `decodeURIComponent` (route paths in the API, request paths in the data
plane), `parse_js_date` is `Date.parse` (`?inactive_since=`), `format_js_date` is `Date.toJSON`
and `json_bytes` is `JSON.stringify` (GET /api/routes), `json_parse` is `JSON.parse` (POST bodies;
the API's own `|| {}` is tested with `parse_body` in test_api.py).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from hubproxy.jscompat import (
    JSONSyntaxError,
    decode_uri_component,
    epoch_ms,
    format_js_date,
    json_bytes,
    json_parse,
    parse_js_date,
)


def ms(year: int, *rest: int) -> int:
    return int(datetime(year, *rest, tzinfo=UTC).timestamp() * 1000)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "decoded"),
    [
        ("", ""),
        ("/plain", "/plain"),
        ("/user/foo%40bar/", "/user/foo@bar/"),
        ("/has%20space/%C3%BC", "/has space/ü"),
        ("/%E7%A7%80%E6%A8%B9", "/秀樹"),
        ("/a%2Fb", "/a/b"),  # decodeURIComponent decodes reserved characters too
        ("/%25", "/%"),
        ("/%2525", "/%25"),  # once only
        ("/%f0%9f%98%80", "/😀"),  # lower-case hex, four-byte UTF-8
        ("/%00", "/\x00"),
        ("/ü", "/ü"),  # characters that are not escapes pass through
        ("/ü/%C3%BC%20x", "/ü/ü x"),  # with escapes too
    ],
)
def test_decode_uri_component(text: str, decoded: str) -> None:
    assert decode_uri_component(text) == decoded


@pytest.mark.parametrize(
    "text",
    [
        "/%",
        "/%A",
        "/%zz",
        "/%E0%A4%A",  # the spec's example: truncated escape
        "/%FF",  # never UTF-8
        "/%C3",  # truncated sequence
        "/%C3x%BC",  # interrupted sequence
        "/%C0%AF",  # overlong `/`
        "/%ED%A0%80",  # an encoded surrogate
        "/%F4%90%80%80",  # beyond U+10FFFF
        "/ok/%",
    ],
)
def test_decode_uri_component_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        decode_uri_component(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("/a/%C3%28/b", "%C3%28 is not UTF-8"),  # the whole run of escapes is named
        ("/ü/%FF", "%FF is not UTF-8"),
        ("/a%zz", "'%' not followed by two hex digits"),
        ("/%FF/%", "%FF is not UTF-8"),  # the first fault, from the left
    ],
)
def test_decode_uri_component_names_the_fault(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        decode_uri_component(text)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1970", 0),
        ("2000", ms(2000, 1, 1)),
        ("2000-02", ms(2000, 2, 1)),
        ("2000-01-01", ms(2000, 1, 1)),
        ("2000-01-01T10:20", ms(2000, 1, 1, 10, 20)),
        ("2000-01-01T10:20:30", ms(2000, 1, 1, 10, 20, 30)),
        ("2000-01-01T10:20:30Z", ms(2000, 1, 1, 10, 20, 30)),
        ("2000-01-01T10:20:30.5Z", ms(2000, 1, 1, 10, 20, 30) + 500),
        ("2000-01-01T10:20:30.123Z", ms(2000, 1, 1, 10, 20, 30) + 123),
        ("2000-01-01T10:20:30.123999Z", ms(2000, 1, 1, 10, 20, 30) + 123),  # truncated
        ("2000-01-01T10:20:30+01:00", ms(2000, 1, 1, 9, 20, 30)),
        ("2000-01-01T10:20:30-02:30", ms(2000, 1, 1, 12, 50, 30)),
        ("2000-01-01T10:20:30+0100", ms(2000, 1, 1, 9, 20, 30)),
        ("2000-01-01 10:20:30", ms(2000, 1, 1, 10, 20, 30)),
        ("2000-01-01t10:20:30z", ms(2000, 1, 1, 10, 20, 30)),
        ("2000-01-01T24:00:00Z", ms(2000, 1, 2)),
        ("2019-02-31", ms(2019, 3, 3)),  # V8 rolls over
        ("  2000-01-01  ", ms(2000, 1, 1)),
        ("+002000-01-01T00:00:00Z", ms(2000, 1, 1)),
        ("-000001-01-01T00:00:00Z", -62198755200000),
        ("12345", 327403382400000),  # the year 12345, as V8 reads it
        ("0", -62167219200000),
        ("Sat, 01 Jan 2000 00:00:00 GMT", ms(2000, 1, 1)),
        ("01 Jan 2000 00:00:00 +0100", ms(1999, 12, 31, 23)),
        ("+275760-09-13T00:00:00Z", 8_640_000_000_000_000),  # JS's last valid time
    ],
)
def test_parse_js_date(value: str, expected: int) -> None:
    assert parse_js_date(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "endoftheuniverse",
        "",
        "2000-13-01",
        "2000-00-10",
        "2000-01-32",
        "2000-01-01T25:00",
        "2000-01-01T24:00:01",
        "2000-01-01T10:60",
        "2000-01-01T10:20:61",
        "2000-01-01T10:20+24:00",
        "-000000-01-01T00:00:00Z",
        "+275760-09-13T00:00:00.001Z",
        "yesterday",
        "2000-01-01T",
        "1e3",
    ],
)
def test_parse_js_date_rejects(value: str) -> None:
    assert parse_js_date(value) is None


@pytest.mark.parametrize(
    ("when", "text"),
    [
        (datetime(2026, 11, 26, 3, 19, 15, 214999, tzinfo=UTC), "2026-11-26T03:19:15.214Z"),
        (datetime(2026, 11, 26, 3, 19, 15, tzinfo=UTC), "2026-11-26T03:19:15.000Z"),
        (
            datetime(2026, 11, 26, 4, 19, 15, 1000, tzinfo=timezone(timedelta(hours=1))),
            "2026-11-26T03:19:15.001Z",
        ),
        (datetime(2026, 11, 26, 3, 19, 15), "2026-11-26T03:19:15.000Z"),  # naive is UTC
        (datetime(999, 1, 1, tzinfo=UTC), "0999-01-01T00:00:00.000Z"),
    ],
)
def test_format_js_date(when: datetime, text: str) -> None:
    assert format_js_date(when) == text


def test_json_bytes() -> None:
    when = datetime(2026, 11, 26, 3, 19, 15, 214000, tzinfo=UTC)
    assert json_bytes({"/秀樹": {"t": "x", "last_activity": when}}) == (
        '{"/秀樹":{"t":"x","last_activity":"2026-11-26T03:19:15.214Z"}}'.encode()
    )
    # a lone surrogate (legal in a JSON body) still gives valid UTF-8 JSON
    lone = json.loads('"\\ud800"')
    assert json.loads(json_bytes({"k": lone, "ü": 1})) == {"k": lone, "ü": 1}


@pytest.mark.parametrize(
    ("when", "millis"),
    [
        (datetime(2000, 1, 1, tzinfo=UTC), ms(2000, 1, 1)),
        (datetime(2000, 1, 1), ms(2000, 1, 1)),  # naive is UTC
        (datetime(2000, 1, 1, 1, tzinfo=timezone(timedelta(hours=1))), ms(2000, 1, 1)),
        (datetime(2000, 1, 1, 0, 0, 0, 999, tzinfo=UTC), ms(2000, 1, 1)),  # truncated
    ],
)
def test_epoch_ms(when: datetime, millis: int) -> None:
    assert epoch_ms(when) == millis


@pytest.mark.parametrize(
    ("text", "data"),
    [
        ('{"a": [1, {"b": null}]}', {"a": [1, {"b": None}]}),
        ("null", None),
        ("1e400", None),  # Infinity in JS, which JSON.stringify writes as null
        ("123456789012345678901234567890", 123456789012345678901234567890),
    ],
)
def test_json_parse(text: str, data: Any) -> None:
    assert json_parse(text) == data


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "SyntaxError: Unexpected end of JSON input"),
        ("NaN", "SyntaxError: Unexpected token 'N'"),
        ("-Infinity", "SyntaxError: Unexpected token '-'"),
        ("{", "SyntaxError: "),
        ("[" * 100_000, "SyntaxError: "),
    ],
)
def test_json_parse_rejects(text: str, message: str) -> None:
    with pytest.raises(JSONSyntaxError, match=re.escape(message)):
        json_parse(text)

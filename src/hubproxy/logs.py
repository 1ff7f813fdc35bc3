"""CHP-style log lines on stdout: `<ISO UTC time>Z [ConfigProxy] <level>: <message>`.

CHP always colours the level word; we colour it only when stdout is a terminal, so log files and
JupyterHub's captured output stay clean. `--log-format json` writes one JSON object per line:
`{"time": ..., "level": ..., "message": ...}` plus the record's `fields` (see `access_logger`),
and `exception` with a traceback.

`--access-log` (off by default, as CHP has none) adds one info line per request answered on the
public listener (the health check excepted), from the `hubproxy.access` logger:

    200 GET /user/alice/lab 2.41ms 1024B -> http://127.0.0.1:8888 from 127.0.0.1

status, method, path (the query is left out, as in CHP's lines: it may carry tokens), time from
the request's first byte read to its response's last byte written, bytes written to the client
for it (head and body), the route's target (`-` when none matched), and the client's address
(`-` on a Unix socket). A WebSocket is logged when its `101` has been passed on. When the option
is off nothing is done per request but one attribute check.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import TextIO

LOGGER_NAME = "hubproxy"
ACCESS_LOGGER_NAME = "hubproxy.access"

# CHP (winston) level names as thresholds. winston orders them error < warn < info < http <
# verbose < debug < silly; CHP logs nothing at http, verbose or silly, so `http` and `verbose` show
# what `info` shows, and `silly` what `debug` shows.
LEVELS = {
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "http": 18,
    "verbose": 15,
    "debug": logging.DEBUG,
    "silly": 5,
}
# libraries whose warnings and errors (unhandled task exceptions, aiohttp's "Error handling
# request") belong in our log, in our format, rather than on stderr without one
LIBRARY_LOGGERS = ("asyncio", "aiohttp")
_NAMES = {
    logging.ERROR: "error",
    logging.WARNING: "warn",
    logging.INFO: "info",
    logging.DEBUG: "debug",
}
_COLOURS = {"error": "31", "warn": "33", "info": "32", "debug": "34"}


def _timestamp(record: logging.LogRecord) -> str:
    # whole milliseconds first: `created - int(created)` would turn .001 into .000999...
    seconds, millis = divmod(round(record.created * 1000), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def _level_name(record: logging.LogRecord) -> str:
    if record.levelno >= logging.ERROR:
        return "error"
    return _NAMES.get(record.levelno, record.levelname.lower())


class ChpFormatter(logging.Formatter):
    def __init__(self, colour: bool) -> None:
        super().__init__()
        self._colour = colour

    def format(self, record: logging.LogRecord) -> str:
        level = _level_name(record)
        if self._colour:
            level = f"\x1b[{_COLOURS.get(level, '0')}m{level}\x1b[39m"
        line = f"{_timestamp(record)} [ConfigProxy] {level}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": _timestamp(record),
            "level": _level_name(record),
            "message": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            entry.update(extra)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout
    handler = logging.StreamHandler(stream)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(ChpFormatter(colour=stream.isatty()))
    threshold = LEVELS[level.lower()]
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers[:] = [handler]
    logger.setLevel(threshold)
    logger.propagate = False
    for name in LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        library.handlers[:] = [handler]
        library.setLevel(max(threshold, logging.WARNING))
        library.propagate = False
    # aiohttp's own access log would duplicate our API log lines
    logging.getLogger("aiohttp.access").disabled = True


def access_logger(
    fmt: str = "text",
) -> Callable[[int, bytes, bytes, float, int, str | None, bytes], None]:
    """The writer `--access-log` installs as `ProxyService.access_log` (see the module's doc)."""
    logger = logging.getLogger(ACCESS_LOGGER_NAME)
    logger.setLevel(logging.INFO)  # asked for by name: shown whatever --log-level says
    info = logger.info
    line = "%d %s %s %.2fms %dB -> %s from %s"

    def write_text(
        status: int,
        method: bytes,
        url: bytes,
        seconds: float,
        sent: int,
        target: str | None,
        client: bytes,
    ) -> None:
        info(
            line,
            status,
            method.decode("latin-1"),
            url.partition(b"?")[0].decode("latin-1"),
            seconds * 1000,
            sent,
            target or "-",
            "-" if client == b"undefined" else client.decode("latin-1"),
        )

    def write_json(
        status: int,
        method: bytes,
        url: bytes,
        seconds: float,
        sent: int,
        target: str | None,
        client: bytes,
    ) -> None:
        fields = {
            "event": "access",
            "status": status,
            "method": method.decode("latin-1"),
            "path": url.partition(b"?")[0].decode("latin-1"),
            "duration_ms": round(seconds * 1000, 3),
            "bytes": sent,
            "target": target,
            "client": None if client == b"undefined" else client.decode("latin-1"),
        }
        info(
            line,
            status,
            fields["method"],
            fields["path"],
            seconds * 1000,
            sent,
            target or "-",
            fields["client"] or "-",
            extra={"fields": fields},
        )

    return write_json if fmt == "json" else write_text

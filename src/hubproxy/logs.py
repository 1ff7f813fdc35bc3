"""CHP-style log lines on stdout: `<ISO UTC time>Z [ConfigProxy] <level>: <message>`.

CHP always colours the level word; we colour it only when stdout is a terminal, so log files and
JupyterHub's captured output stay clean. `--log-format json` writes one JSON object per line:
`{"time": ..., "level": ..., "message": ...}` plus the record's `fields` (a dict, if any),
and `exception` with a traceback.

`--access-log` (off by default, as CHP has none) adds one info line per request answered on the
public listener (the health check excepted), written by `AccessLogWriter`:

    200 GET /user/alice/lab 2.41ms 1024B -> http://127.0.0.1:8888 from 127.0.0.1

status, method, path (the query is left out, as in CHP's lines: it may carry tokens), time from
the request's first byte read to its response's last byte written, bytes written to the client
for it (head and body), the route's target (`-` when none matched), and the client's address
(`-` on a Unix socket). A WebSocket is logged when its `101` has been passed on. When the option
is off nothing is done per request but one attribute check.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import threading
import time
from collections.abc import Iterator
from select import PIPE_BUF
from typing import TextIO

LOGGER_NAME = "hubproxy"

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


class _Clock:
    """CHP's timestamps, `2026-11-26T03:19:08.001Z`, with strftime run once a second."""

    def __init__(self) -> None:
        # one tuple, replaced whole: a thread that logs (the SQLite store's) never pairs a
        # new second with the old text
        self._cached = (-1, "")

    def stamp(self, when: float) -> str:
        # whole milliseconds first: `when - int(when)` would turn .001 into .000999...
        second, millis = divmod(round(when * 1000), 1000)
        cached = self._cached
        if cached[0] != second:
            cached = self._cached = (
                second,
                time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)),
            )
        return f"{cached[1]}.{millis:03d}Z"


_clock = _Clock()


def _timestamp(record: logging.LogRecord) -> str:
    return _clock.stamp(record.created)


def _level_name(record: logging.LogRecord) -> str:
    if record.levelno >= logging.ERROR:
        return "error"
    return _NAMES.get(record.levelno, record.levelname.lower())


class ChpFormatter(logging.Formatter):
    def __init__(self, colour: bool) -> None:
        super().__init__()
        self._colour = colour

    def line(self, created: float, level: str, message: str) -> str:
        if self._colour:
            level = f"\x1b[{_COLOURS.get(level, '0')}m{level}\x1b[39m"
        return f"{_clock.stamp(created)} [ConfigProxy] {level}: {message}"

    def format(self, record: logging.LogRecord) -> str:
        line = self.line(record.created, _level_name(record), record.getMessage())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def line(self, created: float, level: str, message: str) -> str:
        return json.dumps(
            {"time": _clock.stamp(created), "level": level, "message": message},
            ensure_ascii=False,
        )

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


class LineBuffer:
    """Lines for a stream, written with one write and one flush per event-loop iteration (an
    API write logs three lines; under load the access log writes hundreds per iteration).
    Without a running loop in this thread, and when asked (`now`), a line is written at once.
    """

    def __init__(self, stream: TextIO, lock: threading.RLock | None = None) -> None:
        self.stream = stream
        self.pending: list[str] = []
        # logging's handler lock when other threads (the SQLite store's) log through it too
        self._lock = lock if lock is not None else contextlib.nullcontext()

    def add(self, line: str, now: bool = False) -> None:
        pending = self.pending
        pending.append(line)
        if now:
            self.flush()
        elif len(pending) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        with self._lock:
            pending = self.pending
            taken = len(pending)  # lines another thread adds meanwhile wait for the next flush
            if not taken:
                return
            try:
                for chunk in _chunks(pending[:taken]):
                    self.stream.write(chunk)
                    self.stream.flush()
            except (OSError, ValueError):  # stdout closed or gone: carry on, as logging does
                pass
            del pending[:taken]


def _chunks(lines: list[str]) -> Iterator[str]:
    """Whole lines, joined into writes of at most PIPE_BUF bytes: such a write to a pipe is
    atomic, so lines of the processes sharing stdout (--workers) never cut into each other."""
    chunk: list[str] = []
    size = 0
    for line in lines:
        n = (len(line) if line.isascii() else len(line.encode("utf-8", "replace"))) + 1
        if chunk and size + n > PIPE_BUF:
            yield "\n".join(chunk) + "\n"
            chunk, size = [], 0
        chunk.append(line)
        size += n
    if chunk:
        yield "\n".join(chunk) + "\n"


class LineBatchingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler writing through a `LineBuffer`; errors are written at once. Pending
    lines are written by `flush()` (logging.shutdown calls it at exit)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.lines = LineBuffer(stream, self.lock)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.lines.add(line, now=record.levelno >= logging.ERROR)

    def flush(self) -> None:
        self.lines.flush()


def setup_logging(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout
    handler = LineBatchingHandler(stream)
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
    # The logging HOWTO's "Optimization": our lines never show the caller, thread or process,
    # so records need not collect them (a third of a record's cost)
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def log_info(msg: str, *args: object) -> None:
    """`logging.getLogger("hubproxy").info(msg, *args)` for the lines every API call logs: with
    the handler `setup_logging` installed, the line is formatted and queued directly, without a
    LogRecord and the logging machinery (a third of an API write's CPU went there). Any other
    set-up (a test's handler) gets the ordinary call. Nothing is formatted below info level."""
    logger = _LOGGER
    if not logger.isEnabledFor(logging.INFO):
        return
    handlers = logger.handlers
    if len(handlers) == 1 and type(handlers[0]) is LineBatchingHandler:
        formatter = handlers[0].formatter
        if type(formatter) in (ChpFormatter, JsonFormatter):
            message = msg % args if args else msg
            line = formatter.line(time.time(), "info", message)  # type: ignore[union-attr]
            handlers[0].lines.add(line)
            return
    logger.info(msg, *args)


_LOGGER = logging.getLogger(LOGGER_NAME)


# a JSON string literal, non-ASCII kept (as json.dumps(..., ensure_ascii=False) writes it)
_quote = json.encoder.encode_basestring


class AccessLogWriter:
    """`--access-log`'s writer, installed as `ProxyService.access_log` (see the module's doc).

    It formats its lines itself, in the same shapes as `ChpFormatter` and `JsonFormatter`, and
    writes what one event-loop iteration produced with one write and one flush, without going
    through `logging`: a log record, the handler's lock and a flush per line cost more than
    proxying the request they describe. Lines show whatever `--log-level` says (asked for by
    name). Without a running loop (tests), each line is written at once.
    """

    def __init__(self, fmt: str = "text", stream: TextIO | None = None) -> None:
        self.json = fmt == "json"
        self.stream = stream or sys.stdout
        colour = not self.json and self.stream.isatty()
        self.level = f"\x1b[{_COLOURS['info']}minfo\x1b[39m" if colour else "info"
        self.lines = LineBuffer(self.stream)
        self._clock = _Clock()

    def _now(self) -> str:
        return self._clock.stamp(time.time())

    def __call__(
        self,
        status: int,
        method: bytes,
        url: bytes,
        seconds: float,
        sent: int,
        target: str | None,
        client: bytes,
    ) -> None:
        verb = method.decode("latin-1")
        path = url.partition(b"?")[0].decode("latin-1")
        address = None if client == b"undefined" else client.decode("latin-1")
        message = (
            f"{status} {verb} {path} {seconds * 1000:.2f}ms {sent}B "
            f"-> {target or '-'} from {address or '-'}"
        )
        if self.json:  # json.dumps of these fields, in this order, written out by hand (faster)
            line = (
                f'{{"time": "{self._now()}", "level": "info", "message": {_quote(message)}, '
                f'"event": "access", "status": {status}, "method": {_quote(verb)}, '
                f'"path": {_quote(path)}, "duration_ms": {round(seconds * 1000, 3)!r}, '
                f'"bytes": {sent}, "target": {_quote(target) if target else "null"}, '
                f'"client": {_quote(address) if address else "null"}}}'
            )
        else:
            line = f"{self._now()} [ConfigProxy] {self.level}: {message}"
        self.lines.add(line)

    def flush(self) -> None:
        self.lines.flush()

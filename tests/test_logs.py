"""Log lines: CHP's format (spec §5), colour only on terminals, levels, JSON lines."""

from __future__ import annotations

import calendar
import io
import json
import logging
import re
import sys

import pytest

from hubproxy.logs import (
    LEVELS,
    LOGGER_NAME,
    ChpFormatter,
    JsonFormatter,
    setup_logging,
)

LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z \[ConfigProxy\] (error|warn|info|debug): (.*)$"
)
# 2026-11-26T03:19:08.001Z, CHP's example timestamp
WHEN = calendar.timegm((2026, 11, 26, 3, 19, 8)) + 0.001


def record(level: int, msg: str, *args: object, exc_info: object = None) -> logging.LogRecord:
    rec = logging.LogRecord(LOGGER_NAME, level, __file__, 1, msg, args, exc_info)  # type: ignore[arg-type]
    rec.created = WHEN
    return rec


class TtyStream(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_line_format_matches_chp_example() -> None:
    line = ChpFormatter(colour=False).format(
        record(logging.INFO, "Proxying %s to %s", "http://127.0.0.1:9000", "http://h:1")
    )
    assert line == (
        "2026-11-26T03:19:08.001Z [ConfigProxy] info: Proxying http://127.0.0.1:9000 to http://h:1"
    )


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.009, 0.5, 0.999])
def test_timestamp_milliseconds_exact(fraction: float) -> None:
    rec = record(logging.INFO, "x")
    rec.created = calendar.timegm((2026, 1, 2, 3, 4, 5)) + fraction
    line = ChpFormatter(colour=False).format(rec)
    assert line.startswith(f"2026-01-02T03:04:05.{round(fraction * 1000):03d}Z ")


@pytest.mark.parametrize(
    ("level", "name"),
    [
        (logging.CRITICAL, "error"),
        (logging.ERROR, "error"),
        (logging.WARNING, "warn"),
        (logging.INFO, "info"),
        (logging.DEBUG, "debug"),
    ],
)
def test_level_words_are_winstons(level: int, name: str) -> None:
    line = ChpFormatter(colour=False).format(record(level, "m"))
    match = LINE.match(line)
    assert match and match.group(1) == name


@pytest.mark.parametrize(
    ("level", "colour"),
    [(logging.ERROR, "31"), (logging.WARNING, "33"), (logging.INFO, "32"), (logging.DEBUG, "34")],
)
def test_colour_only_when_asked(level: int, colour: str) -> None:
    plain = ChpFormatter(colour=False).format(record(level, "m"))
    coloured = ChpFormatter(colour=True).format(record(level, "m"))
    assert "\x1b" not in plain
    word = LINE.match(plain).group(1)  # type: ignore[union-attr]
    assert f"] \x1b[{colour}m{word}\x1b[39m: m" in coloured


def test_stack_trace_follows_on_next_lines() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        exc_info = sys.exc_info()
    lines = ChpFormatter(colour=False).format(record(logging.ERROR, "failed", exc_info=exc_info))
    first, *rest = lines.split("\n")
    assert LINE.match(first) and first.endswith("error: failed")
    assert rest[0].startswith("Traceback") and rest[-1] == "RuntimeError: boom"


def test_json_lines() -> None:
    rec = record(logging.WARNING, "Bad POST data: %s", "{}")
    rec.fields = {"status": 400}
    entry = json.loads(JsonFormatter().format(rec))
    assert entry == {
        "time": "2026-11-26T03:19:08.001Z",
        "level": "warn",
        "message": "Bad POST data: {}",
        "status": 400,
    }


def _emit_all(stream: io.StringIO) -> list[str]:
    log = logging.getLogger(LOGGER_NAME)
    log.error("e")
    log.warning("w")
    log.info("i")
    log.debug("d")
    return [LINE.match(line).group(1) for line in stream.getvalue().splitlines()]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("level", "shown"),
    [
        ("error", ["error"]),
        ("warn", ["error", "warn"]),
        ("WARN", ["error", "warn"]),
        ("info", ["error", "warn", "info"]),
        ("http", ["error", "warn", "info"]),
        ("verbose", ["error", "warn", "info"]),
        ("debug", ["error", "warn", "info", "debug"]),
        ("silly", ["error", "warn", "info", "debug"]),
    ],
)
def test_level_threshold(restore_loggers: None, level: str, shown: list[str]) -> None:
    stream = io.StringIO()
    setup_logging(level, "text", stream)
    assert _emit_all(stream) == shown


def test_every_cli_level_is_known() -> None:
    from hubproxy.cli import LOG_LEVELS

    assert set(LOG_LEVELS) <= set(LEVELS)


def test_no_colour_on_a_pipe_colour_on_a_terminal(restore_loggers: None) -> None:
    pipe = io.StringIO()
    setup_logging("info", "text", pipe)
    logging.getLogger(LOGGER_NAME).info("hello")
    assert "\x1b" not in pipe.getvalue()
    tty = TtyStream()
    setup_logging("info", "text", tty)
    logging.getLogger(LOGGER_NAME).info("hello")
    assert "\x1b[32minfo\x1b[39m: hello" in tty.getvalue()


def test_setup_twice_does_not_duplicate(restore_loggers: None) -> None:
    stream = io.StringIO()
    setup_logging("info", "text", stream)
    setup_logging("info", "text", stream)
    logging.getLogger(LOGGER_NAME).info("once")
    assert stream.getvalue().count("once") == 1


def test_json_format_selected(restore_loggers: None) -> None:
    stream = io.StringIO()
    setup_logging("info", "json", stream)
    logging.getLogger(LOGGER_NAME).info("hi %s", "there")
    assert json.loads(stream.getvalue())["message"] == "hi there"


def test_library_warnings_use_our_format(restore_loggers: None) -> None:
    stream = io.StringIO()
    setup_logging("debug", "text", stream)
    logging.getLogger("asyncio").warning("Task exception was never retrieved")
    logging.getLogger("aiohttp.server").error("Error handling request")
    logging.getLogger("asyncio").debug("Using selector: EpollSelector")  # library chatter
    lines = stream.getvalue().splitlines()
    assert [LINE.match(line).group(1, 2) for line in lines] == [  # type: ignore[union-attr]
        ("warn", "Task exception was never retrieved"),
        ("error", "Error handling request"),
    ]


def test_aiohttp_access_log_is_off(restore_loggers: None) -> None:
    stream = io.StringIO()
    setup_logging("debug", "text", stream)
    logging.getLogger("aiohttp.access").info("GET / 200")
    assert stream.getvalue() == ""

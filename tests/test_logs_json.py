"""`--log-format json` (every stdout line one JSON object) and `--access-log` (one line per
request on the public listener, text or JSON)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import websockets

from hubproxy.logs import LOGGER_NAME, AccessLogWriter, setup_logging
from support import (
    TOKEN,
    Backend,
    Proxy,
    ProxyProcess,
    http_request,
    http_request_unix,
    ws_echo_app,
)

ACCESS = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z \[ConfigProxy\] info: "
    r"(?P<status>\d{3}) (?P<method>[A-Z]+) (?P<path>\S+) (?P<ms>\d+\.\d\d)ms (?P<bytes>\d+)B "
    r"-> (?P<target>\S+) from (?P<client>\S+)$"
)


def access_lines(proxy: ProxyProcess) -> list[re.Match[str]]:
    return [m for line in proxy.output().splitlines() if (m := ACCESS.match(line))]


def raw_exchange(host: str, port: int, request: bytes) -> bytes:
    """Send one request with `Connection: close`; everything the proxy wrote back."""
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


# -- the access log, text --------------------------------------------------------------------------


def test_access_line_of_a_proxied_request(
    start_proxy: Callable[..., Proxy], backend: Backend
) -> None:
    proxy = start_proxy("--default-target", backend.url, "--access-log")
    reply = raw_exchange(
        proxy.host,
        proxy.port,
        b"GET /user/alice/x?token=s3cret HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    )
    assert reply.startswith(b"HTTP/1.1 200 ")
    proxy.wait_for_line(ACCESS.pattern)
    (line,) = access_lines(proxy)
    assert line["status"] == "200"
    assert line["method"] == "GET"
    assert line["path"] == "/user/alice/x"  # the query may hold a token: left out
    assert "s3cret" not in proxy.output()
    assert int(line["bytes"]) == len(reply)  # head and body, as written to the client
    assert 0 < float(line["ms"]) < 10_000
    assert line["target"] == backend.url
    assert line["client"] == "127.0.0.1"


def test_access_lines_of_errors_health_and_websockets(
    start_proxy: Callable[..., Proxy], start_backend: Callable[..., Backend]
) -> None:
    backend = start_backend(ws_echo_app())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    proxy = start_proxy("--access-log")
    proxy.add_route("/ws", backend.url)
    proxy.add_route("/dead", dead)
    assert proxy.request("GET", "/nowhere")[0] == 404
    assert proxy.request("POST", "/dead/x", body=b"abc")[0] == 503
    assert proxy.request("GET", "/_chp_healthz")[0] == 200  # not in the access log

    async def websocket() -> None:
        async with websockets.connect(f"ws://{proxy.host}:{proxy.port}/ws/x") as ws:
            await ws.send("hi")
            assert await ws.recv() == "hi"

    asyncio.run(websocket())
    proxy.wait_for_line(r"info: 101 GET /ws/x ")
    lines = [(m["status"], m["method"], m["path"], m["target"]) for m in access_lines(proxy)]
    assert lines == [
        ("404", "GET", "/nowhere", "-"),
        ("503", "POST", "/dead/x", dead),
        ("101", "GET", "/ws/x", backend.url),
    ]
    # CHP's own error lines are still there
    assert re.search(r"error: 404 GET /nowhere", proxy.output())


def test_no_access_log_by_default(start_proxy: Callable[..., Proxy], backend: Backend) -> None:
    proxy = start_proxy("--default-target", backend.url)
    assert proxy.request("GET", "/x")[0] == 200
    proxy.stop()
    assert access_lines(proxy) == []
    assert "GET /x" not in proxy.output()


def test_access_log_whatever_the_log_level(backend: Backend, tmp_path: Path) -> None:
    """--log-level warn hides the startup lines (so: Unix sockets), not the access log."""
    public, api = str(tmp_path / "public.sock"), str(tmp_path / "api.sock")
    env = {**os.environ, "CONFIGPROXY_AUTH_TOKEN": TOKEN}
    proxy = ProxyProcess(
        ["--socket", public, "--api-socket", api, "--log-level", "warn", "--access-log"], env
    )
    try:
        deadline = time.monotonic() + 30
        while not (os.path.exists(api) and os.path.exists(public)):
            assert proxy.proc.poll() is None and time.monotonic() < deadline, proxy.output()
            time.sleep(0.05)
        auth = {"Authorization": f"token {TOKEN}"}
        body = json.dumps({"target": backend.url}).encode()
        assert http_request_unix(api, "POST", "/api/routes/", body, auth)[0] == 201
        assert http_request_unix(public, "GET", "/hello")[0] == 200
        proxy.wait_for_line(ACCESS.pattern)
    finally:
        proxy.stop()
    (line,) = access_lines(proxy)
    assert (line["path"], line["client"]) == ("/hello", "-")  # no address on a Unix socket
    assert "info: Proxying" not in proxy.output()
    assert "info: 201 POST" not in proxy.output()


# -- --log-format json -----------------------------------------------------------------------------


def wait_json(proxy: ProxyProcess, message: str) -> re.Match[str]:
    return proxy.wait_for_line(r'"message": "' + message)


def test_every_line_is_a_json_object(backend: Backend) -> None:
    env = {**os.environ, "CONFIGPROXY_AUTH_TOKEN": TOKEN}
    proxy = ProxyProcess(
        [
            *("--ip", "127.0.0.1", "--port", "0", "--api-ip", "127.0.0.1", "--api-port", "0"),
            *("--log-format", "json", "--access-log", "--default-target", backend.url),
        ],
        env,
    )
    try:
        public = wait_json(proxy, r"Proxying http://127\.0\.0\.1:(\d+) to ").group(1)
        api = wait_json(proxy, r"Proxy API at http://127\.0\.0\.1:(\d+)/api/routes").group(1)
        auth = {"Authorization": f"token {TOKEN}"}
        body = json.dumps({"target": backend.url, "user": "alice"}).encode()
        assert http_request("127.0.0.1", int(api), "POST", "/api/routes/u/a", body, auth)[0] == 201
        assert http_request("127.0.0.1", int(api), "POST", "/api/routes/u/b", b"{", auth)[0] == 400
        assert http_request("127.0.0.1", int(api), "GET", "/api/routes")[0] == 403
        assert http_request("127.0.0.1", int(public), "GET", "/u/a/x?q=1")[0] == 200
        wait_json(proxy, "200 GET /u/a/x ")
    finally:
        assert proxy.stop() == 0
    entries = []
    for line in proxy.output().splitlines():
        entry = json.loads(line)  # every line, startup to shutdown
        assert isinstance(entry, dict), line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
        assert entry["level"] in ("error", "warn", "info", "debug")
        entries.append(entry)
    messages = [(e["level"], e["message"]) for e in entries]
    assert ("info", f"Route added / -> {backend.url}") in messages
    assert ("info", "201 POST /api/routes/u/a ") in messages
    assert (
        "warn",
        "400 POST /api/routes/u/b Body not valid JSON: SyntaxError: "
        "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
    ) in messages
    assert ("warn", "403 GET /api/routes ") in messages
    assert messages[-1] == ("warn", "Terminated")
    (access,) = [e for e in entries if e.get("event") == "access"]
    assert access["message"].startswith("200 GET /u/a/x ")
    assert {k: access[k] for k in ("status", "method", "path", "target", "client")} == {
        "status": 200,
        "method": "GET",
        "path": "/u/a/x",
        "target": backend.url,
        "client": "127.0.0.1",
    }
    assert access["bytes"] > 0 and access["duration_ms"] > 0


# -- units -----------------------------------------------------------------------------------------


def _write(fmt: str, *args: Any) -> str:
    stream = io.StringIO()
    AccessLogWriter(fmt, stream)(*args)  # no running loop: written at once
    return stream.getvalue()


async def test_access_lines_are_written_once_per_loop_iteration() -> None:
    stream = io.StringIO()
    writer = AccessLogWriter("text", stream)
    for i in range(3):
        writer(200, b"GET", b"/%d" % i, 0.001, 1, "http://t:1", b"127.0.0.1")
    assert stream.getvalue() == ""
    await asyncio.sleep(0)
    assert [line.split(" info: ")[1][:6] for line in stream.getvalue().splitlines()] == [
        "200 GE",
    ] * 3
    assert [line.split()[5] for line in stream.getvalue().splitlines()] == ["/0", "/1", "/2"]


def test_access_line_looks_like_chps_lines() -> None:
    line = _write("text", 200, b"GET", b"/x", 0.0, 1, None, b"::1").rstrip("\n")
    assert re.match(
        r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z \[ConfigProxy\] info: 200 GET /x ", line
    )
    tty_stream = io.StringIO()
    tty_stream.isatty = lambda: True  # type: ignore[method-assign]
    AccessLogWriter("text", tty_stream)(200, b"GET", b"/x", 0.0, 1, None, b"::1")
    assert "] \x1b[32minfo\x1b[39m: 200 GET /x" in tty_stream.getvalue()


def test_access_writer_text() -> None:
    out = _write("text", 502, b"PUT", b"/a%20b?x=1", 0.0123456, 77, "http://t:1", b"::1")
    assert out.endswith(" [ConfigProxy] info: 502 PUT /a%20b 12.35ms 77B -> http://t:1 from ::1\n")
    out = _write("text", 404, b"GET", b"/", 0.0, 9, None, b"undefined")
    assert out.endswith(" info: 404 GET / 0.00ms 9B -> - from -\n")


def test_access_writer_json() -> None:
    out = _write("json", 200, b"GET", b"/x?t=1", 0.0015, 10, "http://t:1", b"127.0.0.1")
    entry = json.loads(out)
    assert entry == {
        "time": entry["time"],
        "level": "info",
        "message": "200 GET /x 1.50ms 10B -> http://t:1 from 127.0.0.1",
        "event": "access",
        "status": 200,
        "method": "GET",
        "path": "/x",
        "duration_ms": 1.5,
        "bytes": 10,
        "target": "http://t:1",
        "client": "127.0.0.1",
    }
    entry = json.loads(_write("json", 404, b"GET", b"/", 0.0, 9, None, b"undefined"))
    assert (entry["target"], entry["client"]) == (None, None)


def test_json_lines_carry_tracebacks_on_one_line(restore_loggers: None) -> None:
    stream = io.StringIO()
    setup_logging("info", "json", stream)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger(LOGGER_NAME).exception("Uncaught Exception: %s", "boom")
    (line,) = stream.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["message"] == "Uncaught Exception: boom"
    assert entry["exception"].endswith("RuntimeError: boom")


def test_access_json_is_what_json_dumps_writes() -> None:
    raw_path = b'/a"b\\c\xc3\xa9\x7f'
    out = _write("json", 201, b"PATCH", raw_path + b"?q", 0.5, 3, 'http://t:1/"x"', b"::1")
    entry = json.loads(out)
    assert out == json.dumps(entry, ensure_ascii=False) + "\n"
    assert entry["path"] == raw_path.decode("latin-1")
    assert entry["target"] == 'http://t:1/"x"'
    assert entry["duration_ms"] == 500.0

"""Bad input and bad peers (design §5): malformed requests get 400 (431 for an oversized head)
and a closed connection, no request smuggling, clients that vanish free their upstream
connection, and a few thousand mixed requests leave no file descriptor behind. No test here
may make the proxy log a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import queue
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web

from procs import ProxyCache
from rawhttp import RawClient, RawServer, dead_port, read_request_head
from support import Backend, Proxy

# -- a backend that tells what reached it ---------------------------------------------------------


class Recorder:
    """An echo backend that records every request path it sees and how each upload ended."""

    def __init__(self) -> None:
        self.paths: queue.Queue[str] = queue.Queue()
        self.uploads: queue.Queue[str] = queue.Queue()

        async def echo(request: web.Request) -> web.StreamResponse:
            self.paths.put(request.raw_path)
            body = await request.read()
            return web.json_response({"url": request.raw_path, "body_length": len(body)})

        async def upload(request: web.Request) -> web.StreamResponse:
            self.paths.put(request.raw_path)
            try:
                length = 0
                async for data in request.content.iter_any():
                    length += len(data)
            except (ConnectionError, asyncio.CancelledError, web.HTTPException, Exception) as e:
                self.uploads.put(f"aborted: {type(e).__name__}")
                raise
            self.uploads.put(f"complete: {length}")
            return web.json_response({"length": length})

        async def closing(request: web.Request) -> web.StreamResponse:
            """Answers and closes its side, so that no upstream connection stays pooled."""
            await request.read()
            resp = web.json_response({"url": request.raw_path})
            resp.force_close()
            return resp

        async def big(request: web.Request) -> web.StreamResponse:
            """1 MiB streamed, then the connection closed."""
            resp = web.StreamResponse()
            resp.force_close()
            await resp.prepare(request)
            with contextlib.suppress(ConnectionError):
                for _ in range(16):
                    await resp.write(b"z" * 65536)
                await resp.write_eof()
            return resp

        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/closing/big", big)
        app.router.add_route("*", "/upload/{tail:.*}", upload)
        app.router.add_route("*", "/closing/{tail:.*}", closing)
        app.router.add_route("*", "/{tail:.*}", echo)
        self.backend = Backend(app)
        self.url = self.backend.url

    def seen(self) -> list[str]:
        paths = []
        with contextlib.suppress(queue.Empty):
            while True:
                paths.append(self.paths.get_nowait())
        return paths


@pytest.fixture(scope="module")
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    yield rec
    rec.backend.stop()


@pytest.fixture
def proxy(proxies: ProxyCache, recorder: Recorder) -> Proxy:
    return proxies.get("--default-target", recorder.url)


def answer_and_close(proxy: Proxy, data: bytes) -> int:
    """Send raw bytes; return the status of the one response, having checked the proxy then
    closes the connection."""
    with RawClient(proxy.host, proxy.port) as client:
        client.send(data)
        resp = client.response()
        assert (resp.header("Connection") or "").lower() == "close"
        assert client.closed_by_peer()
        return resp.status


def still_serving(proxy: Proxy) -> None:
    status, _, body = proxy.request("GET", "/still/serving")
    assert status == 200
    assert json.loads(body)["url"] == "/still/serving"


# -- malformed requests ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"GARBAGE\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET / HTTP/1.1 extra\r\nHost: x\r\n\r\n",
        b"GET / FOO/1.1\r\nHost: x\r\n\r\n",
        b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"G@T / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost x\r\n\r\n",  # no colon
        b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",  # space in a name
        b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",  # space before the colon
        b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n",  # NUL in a value
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,  # a TLS ClientHello
    ],
)
def test_malformed_request_is_400_and_closed(proxy: Proxy, recorder: Recorder, data: bytes) -> None:
    recorder.seen()
    assert answer_and_close(proxy, data) == 400
    assert recorder.seen() == []
    still_serving(proxy)


def test_malformed_request_after_a_good_one(proxy: Proxy, recorder: Recorder) -> None:
    """Garbage pipelined after a good request: the connection ends (after the good request's
    answer, or at once: both are fair, the client is broken), nothing of the garbage reaches
    the target, and nothing hangs."""
    recorder.seen()
    with RawClient(proxy.host, proxy.port) as client:
        client.send(b"GET /good HTTP/1.1\r\nHost: x\r\n\r\nNONSENSE\r\n\r\n")
        try:
            data = client.read_to_eof()
        except ConnectionResetError:
            data = b""
    if data:
        assert data.startswith(b"HTTP/1.1 200 "), data[:100]
        assert data.count(b"HTTP/1.1 ") <= 2
    assert set(recorder.seen()) <= {"/good"}
    still_serving(proxy)


def test_oversized_head_is_431(proxy: Proxy, recorder: Recorder) -> None:
    recorder.seen()
    big = b"GET / HTTP/1.1\r\nHost: x\r\nCookie: " + b"c" * (70 * 1024) + b"\r\n\r\n"
    assert answer_and_close(proxy, big) == 431
    many = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(800)
    )
    assert answer_and_close(proxy, many + b"\r\n") == 431
    assert recorder.seen() == []
    still_serving(proxy)


def test_oversized_request_target_is_refused(proxy: Proxy) -> None:
    data = b"GET /" + b"p" * (70 * 1024) + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    assert answer_and_close(proxy, data) in (414, 431)
    still_serving(proxy)


def test_large_head_under_the_limit_is_fine(proxies: ProxyCache) -> None:
    """JupyterHub deployments carry big cookies: 60 KiB of headers pass, whole. (The target is
    a raw server: aiohttp's own 8 KiB field limit would answer 400 itself.)"""

    def head_size(conn: socket.socket) -> None:
        while True:
            head = read_request_head(conn)
            if not head:
                return
            body = json.dumps({"head_length": len(head)}).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    proxy = proxies.get()
    with RawServer(head_size) as upstream:
        proxy.add_route("/heads", upstream.url)
        cookie = "c" * (60 * 1024)
        status, _, body = proxy.request("GET", "/heads/cookie", headers={"Cookie": cookie})
        assert status == 200
        assert json.loads(body)["head_length"] > 60 * 1024
        many = {f"X-H{i}": "v" for i in range(500)}
        status, _, body = proxy.request("GET", "/heads/many", headers=many)
        assert status == 200
        assert json.loads(body)["head_length"] > 500 * 8


# -- framing conflicts (request smuggling) --------------------------------------------------------

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize(
    "head",
    [
        # Content-Length and Transfer-Encoding together
        b"POST /front HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        b"POST /front HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 4\r\n\r\n",
        # two different lengths
        b"POST /front HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 41\r\n\r\n",
        b"POST /front HTTP/1.1\r\nHost: x\r\nContent-Length: 4, 41\r\n\r\n",
        # lengths that are not numbers
        b"POST /front HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"POST /front HTTP/1.1\r\nHost: x\r\nContent-Length: 0x10\r\n\r\n",
        b"POST /front HTTP/1.1\r\nHost: x\r\nContent-Length: 4 4\r\n\r\n",
        # transfer codings a request may not end with
        b"POST /front HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
        b"POST /front HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST /front HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n",
        b"POST /front HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n",
    ],
)
def test_conflicting_framing_is_400(proxy: Proxy, recorder: Recorder, head: bytes) -> None:
    """Ambiguous framing is refused outright: nothing reaches the target, in particular not
    the request hidden in the body."""
    recorder.seen()
    body = b"0\r\n\r\n" + SMUGGLED
    assert answer_and_close(proxy, head + body) == 400
    seen = recorder.seen()
    assert "/smuggled" not in seen
    assert seen == []
    still_serving(proxy)


def test_chunked_with_bad_chunk_size_is_cut(proxy: Proxy, recorder: Recorder) -> None:
    """The head was fine and the request is on its way: a malformed chunk can only end the
    connection (no answer can follow a response that may have begun)."""
    recorder.seen()
    with RawClient(proxy.host, proxy.port) as client:
        client.send(
            b"POST /chunks HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"zz\r\nhello\r\n0\r\n\r\n" + SMUGGLED
        )
        with contextlib.suppress(ConnectionError):
            data = client.read_to_eof()
            assert b"/smuggled" not in data
    assert "/smuggled" not in recorder.seen()
    still_serving(proxy)


def test_non_websocket_upgrade_is_destroyed(proxy: Proxy, recorder: Recorder) -> None:
    """Spec §3.7 / quirk 9: `Upgrade: h2c` is no WebSocket; the socket is closed unanswered."""
    recorder.seen()
    with RawClient(proxy.host, proxy.port) as client:
        client.send(
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
        )
        assert client.closed_by_peer()
    assert recorder.seen() == []
    still_serving(proxy)


def test_connect_is_not_proxied(proxy: Proxy, recorder: Recorder) -> None:
    """CONNECT is no request for a route: never a tunnel, never a 2xx."""
    recorder.seen()
    with RawClient(proxy.host, proxy.port) as client:
        client.send(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        try:
            resp = client.response()
        except ConnectionError:
            pass
        else:
            assert resp.status >= 400
    assert recorder.seen() == []
    still_serving(proxy)


def test_absolute_form_routes_by_path(proxy: Proxy) -> None:
    with RawClient(proxy.host, proxy.port) as client:
        client.send(b"GET http://elsewhere.example/x/../y?q=1 HTTP/1.1\r\nHost: proxy.test\r\n\r\n")
        resp = client.response()
    assert resp.status == 200
    assert json.loads(resp.body)["url"] == "/y?q=1"


# -- clients that go away -------------------------------------------------------------------------


def test_client_gone_mid_upload_frees_the_upstream(proxy: Proxy, recorder: Recorder) -> None:
    """The client vanishes after part of its body: the target's request ends (it sees the
    connection go), and the proxy serves on."""
    with contextlib.suppress(queue.Empty):
        while True:
            recorder.uploads.get_nowait()
    with RawClient(proxy.host, proxy.port) as client:
        client.send(b"POST /upload/x HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n")
        client.send(b"u" * 65536)
    outcome = recorder.uploads.get(timeout=10)
    assert outcome.startswith("aborted"), outcome
    still_serving(proxy)
    # a whole upload still works
    status, _, body = proxy.request("POST", "/upload/y", body=b"v" * 100_000)
    assert status == 200
    assert json.loads(body)["length"] == 100_000
    assert recorder.uploads.get(timeout=10) == "complete: 100000"


def test_client_gone_before_response(proxy: Proxy) -> None:
    for _ in range(20):
        with RawClient(proxy.host, proxy.port) as client:
            client.send(b"GET /gone HTTP/1.1\r\nHost: x\r\n\r\n")
    still_serving(proxy)


# -- leaks ----------------------------------------------------------------------------------------


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settle_fds(pid: int, target: int, seconds: float = 10.0) -> int:
    """Poll until the process holds at most `target` fds (or `seconds` pass); the last count."""
    deadline = time.monotonic() + seconds
    count = open_fds(pid)
    while count > target and time.monotonic() < deadline:
        time.sleep(0.05)
        count = open_fds(pid)
    return count


def _abort_kinds(proxy: Proxy, i: int) -> None:
    """One of several ways for a client to give up."""
    kind = i % 6
    sock = socket.create_connection((proxy.host, proxy.port), timeout=10)
    try:
        if kind == 1:
            sock.sendall(b"GET /closing/half")  # half a request line
        elif kind == 2:
            sock.sendall(
                b"POST /closing/body HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nab"
            )
        elif kind == 3:
            sock.sendall(b"GET /closing/no-wait HTTP/1.1\r\nHost: x\r\n\r\n")
        elif kind == 4:
            sock.sendall(b"GET /closing/reset HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
        elif kind == 5:  # gone mid-response
            sock.sendall(b"GET /closing/big HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
        # kind 0: connect and leave
    finally:
        sock.close()


def test_no_fd_leak(proxies: ProxyCache, recorder: Recorder) -> None:
    """2,000 requests mixing successes, 404s, 503s and client aborts leave the proxy with the
    file descriptors it had before. The target closes its side after each answer, so no pooled
    upstream connection may legitimately stay open."""
    proxy = proxies.get(tag="leaks")
    pid = proxy.proc.pid
    proxy.add_route("/closing", recorder.url)
    dead_sock, dead = dead_port()
    with dead_sock:
        proxy.add_route("/dead", f"http://127.0.0.1:{dead}")
        before = open_fds(pid)
        # warm-up: one of each, so that anything created once and kept is in the baseline
        conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=10)
        for path in ("/closing/warm", "/nope", "/dead/warm"):
            conn.request("GET", path)
            conn.getresponse().read()
        conn.close()
        _abort_kinds(proxy, 2)
        baseline = settle_fds(pid, before, seconds=5)

        statuses: dict[Any, int] = {}
        conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=10)
        for i in range(2000):
            kind = i % 4
            if kind == 3:
                _abort_kinds(proxy, i // 4)
                continue
            path = ("/closing/ok", "/nope/x", "/dead/x")[kind] + f"?i={i}"
            try:
                conn.request("POST" if i % 8 == 1 else "GET", path, body=b"b" * (i % 3))
                resp = conn.getresponse()
                resp.read()
                statuses[resp.status] = statuses.get(resp.status, 0) + 1
                if resp.will_close:
                    conn.close()
            except (ConnectionError, http.client.HTTPException) as e:
                statuses[type(e).__name__] = statuses.get(type(e).__name__, 0) + 1
                conn.close()
        conn.close()
        assert statuses == {200: 500, 404: 500, 503: 500}, statuses

    after = settle_fds(pid, baseline)
    assert after <= baseline, f"{after - baseline} fds more than the {baseline} after warm-up"
    output = proxy.output()
    assert "Traceback" not in output
    assert "Uncaught" not in output
    still_serving(proxies.get("--default-target", recorder.url))


def test_no_tracebacks(proxies: ProxyCache) -> None:
    """After everything above, no proxy of this module logged a traceback."""
    assert proxies.all()
    for proxy in proxies.all():
        output = proxy.output()
        assert "Traceback" not in output, output
        assert "Uncaught Exception" not in output, output

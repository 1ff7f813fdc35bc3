"""Error answers of the data plane (spec §3.8, §6.3 cases 16–20): no route (404), a dead or
misbehaving target (503, or a cut connection once the response began), an internal failure
(500); error bodies from `--error-target`, `--error-path` or the built-in pages; and the two
timeouts (`--proxy-timeout` -> 503, `--timeout` -> dropped without an answer)."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from procs import ProxyCache
from rawhttp import RawClient, RawServer, chunked, dead_port, read_request_head
from support import Backend, Proxy

# -- shared pieces --------------------------------------------------------------------------------


class ErrorServer:
    """CHP's test error server: answers `text/plain` with the `url` query parameter, and records
    what it was asked (path with query, headers)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()

        async def handler(request: web.Request) -> web.StreamResponse:
            with self._lock:
                self.requests.append(
                    {"path_qs": request.raw_path, "headers": dict(request.headers)}
                )
            return web.Response(
                text=request.query.get("url", ""),
                content_type="text/plain",
                headers={"X-Error-Server": "yes", "Set-Cookie": "from=error-server"},
            )

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        self.backend = Backend(app)
        self.url = self.backend.url

    def last(self) -> dict[str, Any]:
        with self._lock:
            assert self.requests, "the error server was not asked"
            return self.requests[-1]


@pytest.fixture(scope="module")
def echo() -> Iterator[Backend]:
    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        return web.json_response({"url": request.raw_path, "body_length": len(body)})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    backend = Backend(app)
    yield backend
    backend.stop()


@pytest.fixture(scope="module")
def error_server() -> Iterator[ErrorServer]:
    server = ErrorServer()
    yield server
    server.backend.stop()


@pytest.fixture(scope="module")
def dead() -> Iterator[str]:
    """The URL of a loopback port that refuses connections, for the whole module."""
    sock, port = dead_port()
    with sock:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def error_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """§6.3 case 18's `test/error/`."""
    path = tmp_path_factory.mktemp("error")
    (path / "404.html").write_text("<p>404'D</p>\n")
    (path / "error.html").write_text("<p>UNKNOWN</p>\n")
    return path


def activity(proxy: Proxy, key: str) -> datetime:
    return datetime.fromisoformat(proxy.routes()[key]["last_activity"].replace("Z", "+00:00"))


def get(proxy: Proxy, path: str, **kw: Any) -> tuple[int, http.client.HTTPMessage, bytes]:
    return proxy.request("GET", path, **kw)


# -- §6.3 cases 16-20 -----------------------------------------------------------------------------


def test_no_activity_on_503(proxies: ProxyCache, dead: str) -> None:
    """§6.3 case 16 (web part): a dead target gives 503 and leaves last_activity alone."""
    proxy = proxies.get()
    proxy.add_route("/missing", dead)
    before = activity(proxy, "/missing")
    status, _, _ = get(proxy, "/missing/x")
    assert status == 503
    assert activity(proxy, "/missing") == before


def test_dead_https_target_is_503(proxies: ProxyCache) -> None:
    """§6.3 case 16 uses `https://127.0.0.1:54321`: a dead https target is a 503 too."""
    sock, port = dead_port()
    with sock:
        proxy = proxies.get()
        proxy.add_route("/missing-tls", f"https://127.0.0.1:{port}")
        assert get(proxy, "/missing-tls/x")[0] == 503


def test_custom_error_target(proxies: ProxyCache, error_server: ErrorServer) -> None:
    """§6.3 case 17: no routes; `/foo/bar` gives 404 with the error server's text/plain body."""
    proxy = proxies.get("--error-target", error_server.url)
    status, headers, body = get(proxy, "/foo/bar")
    assert status == 404
    assert headers["Content-Type"].startswith("text/plain")
    assert body == b"/foo/bar"


def test_custom_error_path(proxies: ProxyCache, error_dir: Path, dead: str) -> None:
    """§6.3 case 18: `<dir>/404.html` for 404, `<dir>/error.html` for anything else."""
    proxy = proxies.get("--error-path", str(error_dir))
    status, headers, body = get(proxy, "/nope")
    assert status == 404
    assert headers["Content-Type"].startswith("text/html")
    assert b"404'D" in body
    proxy.add_route("/missing", dead)
    status, headers, body = get(proxy, "/missing/x")
    assert status == 503
    assert headers["Content-Type"].startswith("text/html")
    assert b"UNKNOWN" in body
    status, headers, body = get(proxy, "/%")
    assert status == 500
    assert b"UNKNOWN" in body


def test_error_path_without_pages(proxies: ProxyCache, tmp_path: Path) -> None:
    """An error path with neither `<code>.html` nor `error.html`: the plain default."""
    proxy = proxies.get("--error-path", str(tmp_path), tag="empty")
    status, headers, body = get(proxy, "/nope")
    assert (status, body) == (404, b"Not Found")
    assert "Content-Type" not in headers


def test_default_error_html(proxies: ProxyCache, dead: str) -> None:
    """§6.3 case 19: the built-in pages (`404:` and `503:` in their text)."""
    proxy = proxies.get()
    status, headers, body = get(proxy, "/nope/nothing")
    assert status == 404
    assert headers["Content-Type"].startswith("text/html")
    assert b"404:" in body
    proxy.add_route("/missing", dead)
    status, headers, body = get(proxy, "/missing/x")
    assert status == 503
    assert headers["Content-Type"].startswith("text/html")
    assert b"503:" in body


@pytest.mark.parametrize("path", ["/%", "/a%zz/b", "/%E0%A4%A", "/%FF/x", "/user/%C3"])
def test_malformed_escape_is_500(
    proxies: ProxyCache, error_server: ErrorServer, echo: Backend, path: str
) -> None:
    """§6.3 case 20: a path that cannot be decoded is a 500, with the error target's body
    (even with a `/` route that would otherwise take everything)."""
    proxy = proxies.get("--error-target", error_server.url, "--default-target", echo.url)
    status, headers, body = get(proxy, path)
    assert status == 500
    assert headers["Content-Type"].startswith("text/plain")
    assert body == path.encode()


# -- the error target -----------------------------------------------------------------------------


def test_error_target_request_shape(
    proxies: ProxyCache, error_server: ErrorServer, dead: str
) -> None:
    """`GET <target>/<code>?url=<form-encoded request-target>`, without the client's headers."""
    proxy = proxies.get("--error-target", error_server.url)
    proxy.add_route("/dead", dead)
    status, headers, body = get(
        proxy,
        "/dead/x?y=1",
        headers={
            "Cookie": "session=secret",
            "Authorization": "token abc",
            "X-Forwarded-For": "1.2.3.4",
            "X-Custom": "client",
        },
    )
    assert status == 503
    assert body == b"/dead/x?y=1"
    asked = error_server.last()
    assert asked["path_qs"] == "/503?url=%2Fdead%2Fx%3Fy%3D1"
    sent = {name.lower() for name in asked["headers"]}
    for name in ("cookie", "authorization", "x-custom"):
        assert name not in sent
    assert not [name for name in sent if name.startswith("x-forwarded")]
    # only the error server's content type (and encoding) reach the client
    assert "X-Error-Server" not in headers
    assert "Set-Cookie" not in headers


def test_error_target_with_path(proxies: ProxyCache, error_server: ErrorServer) -> None:
    """JupyterHub's `--error-target http://hub/hub/error`: a `/` is added before the code."""
    proxy = proxies.get("--error-target", error_server.url + "/hub/error")
    status, _, body = get(proxy, "/user/alice/api?token=x%20y")
    assert status == 404
    assert body == b"/user/alice/api?token=x%20y"
    assert error_server.last()["path_qs"] == (
        "/hub/error/404?url=%2Fuser%2Falice%2Fapi%3Ftoken%3Dx%2520y"
    )


def test_error_target_status_is_the_proxys(proxies: ProxyCache, error_server: ErrorServer) -> None:
    """The error server answers 200; the client still gets the proxy's 404."""
    proxy = proxies.get("--error-target", error_server.url)
    status, _, _ = get(proxy, "/nothing")
    assert status == 404


def test_error_target_down_falls_back_to_plain(proxies: ProxyCache, dead: str) -> None:
    """The error target refuses connections: the status's reason phrase, no content type."""
    proxy = proxies.get("--error-target", dead)
    status, headers, body = get(proxy, "/nothing")
    assert (status, body) == (404, b"Not Found")
    assert "Content-Type" not in headers
    sock, port = dead_port()
    with sock:
        proxy.add_route("/dead", f"http://127.0.0.1:{port}")
        status, headers, body = get(proxy, "/dead/x")
    assert (status, body) == (503, b"Service Unavailable")
    assert "Content-Type" not in headers
    # Node's words, as in CHP's line
    error_port = dead.rsplit(":", 1)[1]
    assert f"Failed to get custom error page: connect ECONNREFUSED 127.0.0.1:{error_port}" in (
        proxy.output()
    )


@pytest.mark.parametrize("pages", ["built-in", "error-target"])
def test_error_answers_keep_the_connection(
    proxies: ProxyCache, error_server: ErrorServer, dead: str, pages: str
) -> None:
    """An error page is a complete response: the client connection serves on after it."""
    proxy = (
        proxies.get() if pages == "built-in" else proxies.get("--error-target", error_server.url)
    )
    proxy.add_route("/dead", dead)
    with RawClient(proxy.host, proxy.port) as client:
        for path, status in [("/nope", 404), ("/dead/x", 503), ("/%", 500), ("/nope", 404)]:
            client.request("GET", path)
            resp = client.response()
            assert resp.status == status
            assert resp.header("Connection") == "keep-alive"
        client.request("HEAD", "/nope")
        resp = client.response("HEAD")
        assert resp.status == 404
        assert resp.body == b""
        client.request("GET", "/_chp_healthz")
        assert client.response().status == 200


def test_503_is_logged_like_chp(proxies: ProxyCache) -> None:
    """`<code> <METHOD> <url without query> <detail>` at error level, the bare errno text."""
    sock, port = dead_port()
    with sock:
        proxy = proxies.get()
        proxy.add_route("/logged", f"http://127.0.0.1:{port}")
        assert get(proxy, "/logged/x?secret=1")[0] == 503
    proxy.wait_for_line(
        rf"error: 503 GET /logged/x connect ECONNREFUSED 127\.0\.0\.1:{port}$", timeout=10
    )
    assert "secret=1" not in proxy.output()


# -- targets that are not URLs --------------------------------------------------------------------


@pytest.mark.parametrize("target", ["not a url", "ws://127.0.0.1:1", "http://", "ftp://h/x"])
def test_target_that_is_not_a_url_is_500(
    proxies: ProxyCache, error_server: ErrorServer, target: str
) -> None:
    """The API stores any string; a request to it is an internal error (CHP: 500)."""
    proxy = proxies.get("--error-target", error_server.url)
    proxy.add_route("/bad-target", target)
    status, _, body = get(proxy, "/bad-target/x")
    assert status == 500
    assert body == b"/bad-target/x"
    assert error_server.last()["path_qs"] == "/500?url=%2Fbad-target%2Fx"
    assert get(proxy, "/_chp_healthz")[0] == 200


# -- upstreams that fail mid-way ------------------------------------------------------------------


def _cut_after_head_and_part(conn: socket.socket) -> None:
    read_request_head(conn)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100)
    conn.close()


def _cut_chunked(conn: socket.socket) -> None:
    read_request_head(conn)
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"a\r\n0123456789\r\n"
        + b"64\r\n"
    )
    conn.close()


def _body_until_close(conn: socket.socket) -> None:
    read_request_head(conn)
    conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"y" * 5000)
    conn.close()


def _never_answer(conn: socket.socket) -> None:
    read_request_head(conn)
    conn.recv(1)  # until the proxy gives up (or the server stops)


def _reset(conn: socket.socket) -> None:
    read_request_head(conn)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    conn.close()  # RST


@pytest.mark.parametrize("handler", [_cut_after_head_and_part, _cut_chunked])
def test_upstream_cut_mid_response_aborts_client(
    proxies: ProxyCache, echo: Backend, handler: Any
) -> None:
    """Once the response has begun the client can only be cut off: it must see an incomplete
    response (never a clean end), and the proxy serves on."""
    proxy = proxies.get("--default-target", echo.url)
    with RawServer(handler) as upstream:
        proxy.add_route("/cut", upstream.url)
        with RawClient(proxy.host, proxy.port) as client:
            client.request("GET", "/cut/x")
            with pytest.raises((ConnectionError, http.client.IncompleteRead)):
                client.response()
        # http.client agrees
        conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=10)
        try:
            conn.request("GET", "/cut/y")
            resp = conn.getresponse()
            assert resp.status == 200
            with pytest.raises((http.client.IncompleteRead, ConnectionError)):
                resp.read()
        finally:
            conn.close()
    assert get(proxy, "/_chp_healthz")[0] == 200
    status, _, body = get(proxy, "/still/working")
    assert status == 200
    assert json.loads(body)["url"] == "/still/working"


def test_upstream_body_until_close_is_complete(proxies: ProxyCache) -> None:
    """A body delimited by the upstream's close is whole when the close comes: the client gets
    a properly ended (chunked) response."""
    proxy = proxies.get()
    with RawServer(_body_until_close) as upstream:
        proxy.add_route("/until-close", upstream.url)
        with RawClient(proxy.host, proxy.port) as client:
            client.request("GET", "/until-close/x")
            resp = client.response()
            assert resp.status == 200
            assert resp.body == b"y" * 5000
            client.request("GET", "/_chp_healthz")
            assert client.response().status == 200


def test_upstream_reset_before_response_is_503(proxies: ProxyCache) -> None:
    proxy = proxies.get()
    with RawServer(_reset) as upstream:
        proxy.add_route("/reset", upstream.url)
        status, _, _ = get(proxy, "/reset/x")
    assert status == 503


def test_upstream_garbage_is_503(proxies: ProxyCache) -> None:
    def garbage(conn: socket.socket) -> None:
        read_request_head(conn)
        conn.sendall(b"this is not HTTP\r\n\r\n")
        conn.recv(1)

    proxy = proxies.get()
    with RawServer(garbage) as upstream:
        proxy.add_route("/garbage", upstream.url)
        status, _, _ = get(proxy, "/garbage/x")
    assert status == 503


def test_upstream_length_and_chunked_is_503(proxies: ProxyCache) -> None:
    """An upstream response framed both ways cannot be relayed safely (the client would be
    told one length and given another): refused like any malformed response."""

    def both(conn: socket.socket) -> None:
        read_request_head(conn)
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"10\r\n0123456789abcdef\r\n0\r\n\r\n"
        )
        conn.recv(1)

    proxy = proxies.get()
    with RawServer(both) as upstream:
        proxy.add_route("/both", upstream.url)
        with RawClient(proxy.host, proxy.port) as client:
            client.request("GET", "/both/x")
            assert client.response().status == 503
            client.request("GET", "/_chp_healthz")
            assert client.response().status == 200


# -- timeouts -------------------------------------------------------------------------------------


def test_proxy_timeout_gives_503(proxies: ProxyCache) -> None:
    """`--proxy-timeout 500` and an upstream that never answers: 503 (CHP: `socket hang up`)."""
    proxy = proxies.get("--proxy-timeout", "500")
    with RawServer(_never_answer) as upstream:
        proxy.add_route("/silent", upstream.url)
        status, _, _ = get(proxy, "/silent/x", timeout=30)
        assert status == 503
    assert "503 GET /silent/x" in proxy.output()
    assert get(proxy, "/_chp_healthz")[0] == 200


def test_timeout_drops_a_stalled_client(proxies: ProxyCache, echo: Backend) -> None:
    """`--timeout 500` and a client that sends part of its body and stalls: the connection is
    dropped without any response."""
    proxy = proxies.get("--timeout", "500", "--default-target", echo.url)
    with RawClient(proxy.host, proxy.port, timeout=30) as client:
        client.request("POST", "/upload", headers=[("Content-Length", "100")], body=b"0123456789")
        assert client.closed_by_peer()
    assert get(proxy, "/after")[0] == 200


def test_timeout_drops_a_client_waiting_on_a_slow_target(proxies: ProxyCache) -> None:
    """CHP's `--timeout` is an inactivity timeout on the client's socket: a target that is
    silent for longer gets the client dropped without an answer (observed in CHP)."""

    def slow(conn: socket.socket) -> None:
        read_request_head(conn)
        threading.Event().wait(3)
        with contextlib.suppress(OSError):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    proxy = proxies.get("--timeout", "500", tag="slow-target")
    with RawServer(slow) as upstream:
        proxy.add_route("/slow", upstream.url)
        with RawClient(proxy.host, proxy.port, timeout=30) as client:
            client.request("GET", "/slow/x")
            assert client.closed_by_peer()


def test_timeout_spares_a_steady_stream(proxies: ProxyCache) -> None:
    """Data flowing to the client counts as activity: a response streamed with pauses far
    shorter than `--timeout` is delivered whole, however long it takes in all."""

    def steady(conn: socket.socket) -> None:
        read_request_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n")
        for _ in range(12):
            threading.Event().wait(0.1)
            conn.sendall(b"s")
        conn.recv(1)

    proxy = proxies.get("--timeout", "1000", tag="steady")
    with RawServer(steady) as upstream:
        proxy.add_route("/steady", upstream.url)
        status, _, body = get(proxy, "/steady/x", timeout=30)
    assert (status, body) == (200, b"s" * 12)


def test_timeout_leaves_an_idle_keep_alive_connection_alone(
    proxies: ProxyCache, echo: Backend
) -> None:
    """`--timeout` is about requests in progress; between requests the keep-alive timeout
    rules (5 s by default), so a connection idle for a while is still usable."""
    proxy = proxies.get("--timeout", "500", "--default-target", echo.url)
    with RawClient(proxy.host, proxy.port) as client:
        client.request("GET", "/one")
        assert client.response().status == 200
        threading.Event().wait(1.0)  # idle for twice --timeout, well within keep-alive
        client.request("GET", "/two")
        assert client.response().status == 200


# -- an error while the client is still sending ---------------------------------------------------


def test_error_answered_while_client_uploads(proxies: ProxyCache, dead: str) -> None:
    """A large upload to a dead target gets its 503 (Node reads and discards the rest of the
    body; at the least a proxy must not reset a client it has answered)."""
    proxy = proxies.get()
    proxy.add_route("/dead-upload", dead)
    status, _, _ = proxy.request("POST", "/dead-upload/x", body=b"u" * (32 << 20), timeout=30)
    assert status == 503


def test_error_answered_before_small_body(proxies: ProxyCache, dead: str) -> None:
    """A small body sent after the head: the 503 arrives whole."""
    proxy = proxies.get()
    proxy.add_route("/dead-small", dead)
    with RawClient(proxy.host, proxy.port) as client:
        client.request("POST", "/dead-small/x", headers=[("Content-Length", "5")])
        client.send(b"hello")
        assert client.response().status == 503


def test_chunked_error_upload(proxies: ProxyCache, dead: str) -> None:
    proxy = proxies.get()
    proxy.add_route("/dead-chunked", dead)
    with RawClient(proxy.host, proxy.port) as client:
        client.request("POST", "/dead-chunked/x", headers=[("Transfer-Encoding", "chunked")])
        client.send(chunked(b"a" * 100, b"b" * 100))
        assert client.response().status == 503


def test_upstream_reset_mid_close_delimited_body_resets_an_http10_client(
    proxies: ProxyCache,
) -> None:
    """An HTTP/1.0 client takes a body without a length to be whole at a clean close; a target
    that resets mid-body must reach it as a reset, never as that clean close."""

    def body_then_reset(conn: socket.socket) -> None:
        read_request_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\n\r\n" + b"partial" * 100)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()  # RST

    proxy = proxies.get()
    with RawServer(body_then_reset) as upstream:
        proxy.add_route("/cut10", upstream.url)
        with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
            sock.sendall(b"GET /cut10/x HTTP/1.0\r\n\r\n")
            with pytest.raises(ConnectionResetError):
                while sock.recv(65536):
                    pass

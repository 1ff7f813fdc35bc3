"""Proxying plain HTTP through the real process: CHP's proxy and CLI test cases (spec §6.3, §6.4),
framing (HEAD, chunked both ways, 100-continue, pipelining, HTTP/1.0), large bodies streamed
with bounded memory, keep-alive on both legs, and last_activity (spec §2.5)."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest
from aiohttp import web

from procs import ProxyCache
from rawhttp import RawClient, RawServer, chunked, dead_port, read_request_head
from support import Backend, Proxy, echo_handler

MiB = 1 << 20

StartProxy = Callable[..., Proxy]
StartBackend = Callable[..., Backend]


# -- a backend with a route for each behaviour under test ------------------------------------------


def make_app(name: str = "backend") -> web.Application:
    """CHP's echo server plus handlers that stream, redirect, set cookies and so on."""

    echo = echo_handler(name)

    async def peer(request: web.Request) -> web.StreamResponse:
        port = request.transport.get_extra_info("peername")[1]  # type: ignore[union-attr]
        return web.json_response({"port": port})

    async def redirect(request: web.Request) -> web.StreamResponse:
        status = int(request.match_info["status"])
        return web.Response(status=status, headers={"Location": request.query["to"]})

    async def status(request: web.Request) -> web.StreamResponse:
        return web.Response(status=int(request.match_info["status"]), text="status")

    async def cookies(request: web.Request) -> web.StreamResponse:
        resp = web.Response(text="cookies")
        resp.headers.add("Set-Cookie", "a=1; Path=/")
        resp.headers.add("Set-Cookie", "b=2; Path=/; HttpOnly")
        resp.headers.add("Set-Cookie", "c=3, with a comma; Path=/")
        return resp

    async def reason(request: web.Request) -> web.StreamResponse:
        return web.Response(status=int(request.query.get("status", "200")), reason="Fine Thanks")

    async def stream(request: web.Request) -> web.StreamResponse:
        """A chunked response (no Content-Length): `n` chunks of `size` bytes."""
        resp = web.StreamResponse()
        await resp.prepare(request)
        if request.method == "HEAD":  # aiohttp would send the body anyway
            return resp
        n, size = int(request.query.get("n", "10")), int(request.query.get("size", "1000"))
        for i in range(n):
            await resp.write(bytes([65 + i % 26]) * size)
        await resp.write_eof()
        return resp

    async def echo_stream(request: web.Request) -> web.StreamResponse:
        """Streams the request body back as it arrives, chunked, with what framing came in."""
        resp = web.StreamResponse(
            headers={"X-Request-TE": request.headers.get("Transfer-Encoding", "")}
        )
        await resp.prepare(request)
        async for data in request.content.iter_any():
            await resp.write(data)
        await resp.write_eof()
        return resp

    async def upload(request: web.Request) -> web.StreamResponse:
        digest = hashlib.sha256()
        length = 0
        async for data in request.content.iter_any():
            digest.update(data)
            length += len(data)
        return web.json_response(
            {
                "sha256": digest.hexdigest(),
                "length": length,
                "transfer_encoding": request.headers.get("Transfer-Encoding"),
                "content_length": request.headers.get("Content-Length"),
            }
        )

    async def random_bytes(request: web.Request) -> web.StreamResponse:
        data = os.urandom(int(request.match_info["n"]))
        return web.Response(
            body=data,
            content_type="application/octet-stream",
            headers={"X-Sha256": hashlib.sha256(data).hexdigest()},
        )

    async def huge(request: web.Request) -> web.StreamResponse:
        """`mib` MiB streamed with a Content-Length, written in 256 KiB pieces."""
        total = int(request.match_info["mib"]) * MiB
        piece = b"x" * (256 * 1024)
        resp = web.StreamResponse()
        resp.content_length = total
        resp.content_type = "application/octet-stream"
        await resp.prepare(request)
        for _ in range(total // len(piece)):
            await resp.write(piece)
        await resp.write_eof()
        return resp

    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(int(request.query.get("ms", "100")) / 1000)
        return await echo(request)

    app = web.Application(client_max_size=1024**3)
    app.router.add_route("*", "/peer", peer)
    app.router.add_route("*", "/redirect/{status}", redirect)
    app.router.add_route("*", "/status/{status}", status)
    app.router.add_route("*", "/cookies", cookies)
    app.router.add_route("*", "/reason", reason)
    app.router.add_route("*", "/stream", stream)
    app.router.add_route("*", "/echo-stream", echo_stream)
    app.router.add_route("*", "/upload", upload)
    app.router.add_route("*", "/bytes/{n}", random_bytes)
    app.router.add_route("*", "/huge/{mib}", huge)
    app.router.add_route("*", "/slow", slow)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


@pytest.fixture(scope="module")
def app_backend() -> Iterator[Backend]:
    backend = Backend(make_app())
    yield backend
    backend.stop()


@pytest.fixture
def proxy(proxies: ProxyCache, app_backend: Backend) -> Proxy:
    """The shared proxy whose default target is `app_backend`."""
    return proxies.get("--default-target", app_backend.url)


def get_json(proxy: Proxy, path: str, **kw: Any) -> dict[str, Any]:
    status, _, body = proxy.request("GET", path, **kw)
    assert status == 200, body
    return json.loads(body)


def activity(proxy: Proxy, key: str) -> datetime:
    return datetime.fromisoformat(proxy.routes()[key]["last_activity"].replace("Z", "+00:00"))


def wait_past(moment: datetime) -> None:
    """Return once the wall clock is past `moment` by a millisecond at least (so a later
    last_activity can differ from it at the API's millisecond precision)."""
    deadline = time.monotonic() + 5
    while time.time() <= moment.timestamp() + 0.002:
        assert time.monotonic() < deadline, "clock does not advance"
        time.sleep(0.002)


# -- spec §6.3 and §6.4 ---------------------------------------------------------------------------


def test_basic_http_request(start_proxy: StartProxy, backend: Backend) -> None:
    """§6.3 case 1 / §6.4 case 1: the default target answers, and the route's activity moves."""
    proxy = start_proxy("--default-target", backend.url)
    before = activity(proxy, "/")
    wait_past(before)
    reply = get_json(proxy, "/")
    assert reply["url"] == "/"
    assert reply["method"] == "GET"
    assert activity(proxy, "/") > before


def test_default_target_any_path(proxy: Proxy) -> None:
    assert get_json(proxy, "/any/random/url?x=1")["url"] == "/any/random/url?x=1"


def test_default_target_route(start_proxy: StartProxy, backend: Backend) -> None:
    """§6.3 case 11: `--default-target` adds `/` with that target, with a last_activity."""
    proxy = start_proxy("--default-target", backend.url)
    routes = proxy.routes()
    assert list(routes) == ["/"]
    assert routes["/"]["target"] == backend.url
    assert routes["/"]["last_activity"].endswith("Z")


def test_keep_alive_response(proxy: Proxy) -> None:
    """§6.3 case 3: an HTTP/1.1 client gets `Connection: keep-alive`, with CHP's timeout."""
    status, headers, _ = proxy.request("GET", "/")
    assert status == 200
    assert headers["Connection"].lower() == "keep-alive"
    assert headers["Keep-Alive"] == "timeout=5"


# The whole of spec §3.4's table: (flags, route, target path, request, upstream path).
PATH_TABLE = [
    ((), "/", "", "/any/thing?x=1", "/any/thing?x=1"),
    ((), "/bar", "/foo", "/bar/rest/of/it", "/foo/bar/rest/of/it"),  # case 5
    ((), "/bar", "/foo", "/bar?query=foo", "/foo/bar?query=foo"),  # case 6
    ((), "/bar", "/foo?tq=1", "/bar?q=3", "/foo/bar?tq=1&q=3"),
    (("--no-prepend-path",), "/bar", "/foo", "/bar/rest/of/it", "/bar/rest/of/it"),  # case 9
    (("--no-include-prefix",), "/bar", "/foo", "/bar/rest/of/it", "/foo/rest/of/it"),  # case 10
    (  # case 14
        ("--no-include-prefix", "--no-prepend-path"),
        "/bar",
        "/foo",
        "/bar/rest/of/it",
        "/rest/of/it",
    ),
    ((), "/b%40r/b%20r", "/foo", "/b%40r/b%20r/rest/of/it", "/foo/b%40r/b%20r/rest/of/it"),  # 7
    ((), "/b%40r/b%20r", "/foo", "/b@r/b%20r/rest/of/it", "/foo/b@r/b%20r/rest/of/it"),  # 8
    ((), "/bar", "/foo?tq=1", "/bar//x", "/foo/bar//x?tq=1"),
    # one more of each flag on an exact match and on a query
    (("--no-include-prefix",), "/bar", "/foo", "/bar", "/foo"),
    (("--no-include-prefix",), "/bar", "/foo", "/bar?q=1", "/foo?q=1"),
    (("--no-prepend-path",), "/bar", "/foo?tq=1", "/bar?q=1", "/bar?q=1"),
]


@pytest.mark.parametrize(("flags", "route", "tpath", "request_path", "upstream"), PATH_TABLE)
def test_upstream_path(
    proxies: ProxyCache,
    app_backend: Backend,
    flags: tuple[str, ...],
    route: str,
    tpath: str,
    request_path: str,
    upstream: str,
) -> None:
    proxy = proxies.get(*flags, tag="paths")
    proxy.add_route(route, app_backend.url + tpath)
    assert get_json(proxy, request_path)["url"] == upstream


def test_uri_escapes_route_to_the_decoded_key(proxies: ProxyCache, app_backend: Backend) -> None:
    """§6.3 cases 7 and 8: route `/b@r/b r` is stored decoded and matched by either spelling."""
    proxy = proxies.get()
    proxy.add_route("/b%40r/b%20r", app_backend.url + "/foo")
    assert "/b@r/b r" in proxy.routes()
    assert proxy.request("GET", "/b%40r/b%20rx")[0] == 404  # whole segments only


def test_host_routing(proxies: ProxyCache, app_backend: Backend) -> None:
    """§6.3 case 15: the Host header (port cut off) is the first segment of the key."""
    proxy = proxies.get("--host-routing")
    proxy.add_route("/test.localhost.jovyan.org", app_backend.url)
    host = f"test.localhost.jovyan.org:{proxy.port}"
    reply = get_json(proxy, "/some/path", headers={"Host": host})
    assert reply["url"] == "/some/path"
    assert reply["target"] == "backend"
    assert reply["headers"]["Host"] == host
    routes = proxy.routes()
    assert routes["/test.localhost.jovyan.org"]["host"] == "test.localhost.jovyan.org"
    # other hosts have no route (and no `/` fallback here)
    assert proxy.request("GET", "/some/path", headers={"Host": f"other.org:{proxy.port}"})[0] == 404


def test_host_routing_is_case_sensitive(proxies: ProxyCache, app_backend: Backend) -> None:
    proxy = proxies.get("--host-routing")
    proxy.add_route("/test.example.com", app_backend.url)
    assert proxy.request("GET", "/", headers={"Host": "test.example.com"})[0] == 200
    assert proxy.request("GET", "/", headers={"Host": "TEST.example.com"})[0] == 404


def test_host_routing_falls_back_to_root(
    start_proxy: StartProxy, start_backend: StartBackend
) -> None:
    hub, user = start_backend(make_app("hub")), start_backend(make_app("user"))
    proxy = start_proxy("--host-routing", "--default-target", hub.url)
    proxy.add_route("/user.example.com/path", user.url)
    for host, path, target in [
        ("user.example.com", "/path/x", "user"),
        ("user.example.com", "/other", "hub"),
        ("somewhere.else:80", "/path/x", "hub"),
    ]:
        assert get_json(proxy, path, headers={"Host": host})["target"] == target


def test_host_routing_without_host_uses_undefined(
    proxies: ProxyCache, app_backend: Backend
) -> None:
    """An HTTP/1.0 request with no Host routes as host `undefined` (CHP, observed)."""
    proxy = proxies.get("--host-routing")
    proxy.add_route("/undefined", app_backend.url)
    with RawClient(proxy.host, proxy.port) as client:
        client.request("GET", "/x", host="", version="HTTP/1.0")
        resp = client.response()
    assert resp.status == 200
    assert json.loads(resp.body)["url"] == "/x"


def test_host_routing_with_no_include_prefix(proxies: ProxyCache, app_backend: Backend) -> None:
    """The host is not part of the request path, so only the path segments of the prefix are
    cut (CHP cuts `len("/<host>/path")` characters of the path instead; spec §3.4 quirk)."""
    proxy = proxies.get("--host-routing", "--no-include-prefix")
    proxy.add_route("/test.example.com/prefix", app_backend.url + "/t")
    reply = get_json(proxy, "/prefix/some/path", headers={"Host": "test.example.com"})
    assert reply["url"] == "/t/some/path"


def test_redirect_location_untouched(proxy: Proxy) -> None:
    """§6.3 case 21: without rewrite options a Location passes unchanged."""
    location = "http://foo.com:12345/whatever"
    status, headers, _ = proxy.request("GET", f"/redirect/301?to={location}")
    assert status == 301
    assert headers["Location"] == location


def test_redirect_location_rewritten(proxies: ProxyCache, app_backend: Backend) -> None:
    """§6.3 case 22: protocol-rewrite and auto-rewrite on a Location naming the target."""
    proxy = proxies.get(
        "--default-target", app_backend.url, "--protocol-rewrite", "https", "--auto-rewrite"
    )
    location = f"https://127.0.0.1:{app_backend.port}/whatever"
    status, headers, _ = proxy.request("GET", f"/redirect/301?to={location}")
    assert status == 301
    assert headers["Location"] == f"https://127.0.0.1:{proxy.port}/whatever"


@pytest.mark.parametrize(
    ("status", "rewritten"),
    [(201, True), (301, True), (302, True), (307, True), (308, True), (200, False), (303, False)],
)
def test_redirect_rewrite_statuses(
    proxies: ProxyCache, app_backend: Backend, status: int, rewritten: bool
) -> None:
    """Only `201|30[1278]` responses have their Location rewritten (§3.6)."""
    proxy = proxies.get("--default-target", app_backend.url, "--auto-rewrite")
    location = f"http://127.0.0.1:{app_backend.port}/x"
    got, headers, _ = proxy.request("GET", f"/redirect/{status}?to={location}")
    assert got == status
    expected = f"http://127.0.0.1:{proxy.port}/x" if rewritten else location
    assert headers["Location"] == expected


def test_health_check(proxies: ProxyCache) -> None:
    """§6.3 case 23: `/_chp_healthz` answers without any route, on any method."""
    proxy = proxies.get()
    for method in ("GET", "POST", "DELETE"):
        status, headers, body = proxy.request(method, "/_chp_healthz")
        assert status == 200
        assert headers["Content-Type"] == "application/json"
        assert json.loads(body) == {"status": "OK"}
    status, headers, body = proxy.request("HEAD", "/_chp_healthz")
    assert (status, body) == (200, b"")


def test_health_check_keeps_the_connection(proxy: Proxy) -> None:
    with RawClient(proxy.host, proxy.port) as client:
        for _ in range(3):
            client.request("GET", "/_chp_healthz")
            resp = client.response()
            assert resp.status == 200
            assert resp.header("Connection") == "keep-alive"
        client.request("GET", "/after/health")
        assert client.response().status == 200


@pytest.mark.parametrize("path", ["/_chp_healthz?x", "/_chp_healthz/", "/_chp_healthz/x"])
def test_health_check_is_an_exact_match(proxy: Proxy, path: str) -> None:
    reply = get_json(proxy, path)
    assert reply["url"] == path


def test_custom_headers(proxies: ProxyCache, app_backend: Backend) -> None:
    """§6.4 case 5."""
    proxy = proxies.get(
        "--default-target",
        app_backend.url,
        "--custom-header",
        "k1: v1",
        "--custom-header",
        " k2 : host:123 ",
    )
    reply = get_json(proxy, "/", headers={"k1": "from-client"})
    header_list = [(k.lower(), v) for k, v in reply["header_list"]]
    assert [v for k, v in header_list if k == "k1"] == ["v1"]
    assert [v for k, v in header_list if k == "k2"] == ["host:123"]


def test_x_forwarded_headers(proxy: Proxy) -> None:
    reply = get_json(
        proxy, "/", headers={"X-Forwarded-For": "1.2.3.4", "X-Forwarded-Proto": "https"}
    )
    headers = reply["headers"]
    assert headers["X-Forwarded-For"] == "1.2.3.4,127.0.0.1"
    assert headers["X-Forwarded-Proto"] == "https,http"
    assert headers["X-Forwarded-Port"] == str(proxy.port)
    assert headers["X-Forwarded-Host"] == f"127.0.0.1:{proxy.port}"
    assert headers["Host"] == f"127.0.0.1:{proxy.port}"


def test_no_x_forward(proxies: ProxyCache, app_backend: Backend) -> None:
    proxy = proxies.get("--default-target", app_backend.url, "--no-x-forward")
    headers = get_json(proxy, "/")["headers"]
    assert not [name for name in headers if name.lower().startswith("x-forwarded")]


def test_change_origin(proxies: ProxyCache, app_backend: Backend) -> None:
    proxy = proxies.get("--default-target", app_backend.url, "--change-origin")
    headers = get_json(proxy, "/")["headers"]
    assert headers["Host"] == f"127.0.0.1:{app_backend.port}"
    assert headers["X-Forwarded-Host"] == f"127.0.0.1:{proxy.port}"


# -- responses ------------------------------------------------------------------------------------


def test_multiple_set_cookie_headers(proxy: Proxy) -> None:
    status, headers, _ = proxy.request("GET", "/cookies")
    assert status == 200
    assert headers.get_all("Set-Cookie") == [
        "a=1; Path=/",
        "b=2; Path=/; HttpOnly",
        "c=3, with a comma; Path=/",
    ]


@pytest.mark.parametrize("status", [200, 404, 299])
def test_reason_phrase_passes_through(proxy: Proxy, status: int) -> None:
    conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=10)
    try:
        conn.request("GET", f"/reason?status={status}")
        resp = conn.getresponse()
        resp.read()
        assert (resp.status, resp.reason) == (status, "Fine Thanks")
    finally:
        conn.close()


def test_upstream_status_passes_through(proxy: Proxy) -> None:
    for code in (201, 204, 400, 404, 418, 500, 502, 503):
        status, _, body = proxy.request("GET", f"/status/{code}")
        assert status == code
        assert body == (b"" if code == 204 else b"status")


def _answer_early(delay: float) -> Any:
    def early(conn: socket.socket) -> None:
        read_request_head(conn)
        threading.Event().wait(delay)
        conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 9\r\n\r\nforbidden")
        threading.Event().wait(10)  # never reads the body; holds the connection a while

    return early


@pytest.mark.parametrize("size", [10, 1 << 20])
def test_early_answer_during_upload(proxies: ProxyCache, size: int) -> None:
    """A target that answers (403) without reading the upload: the client, which sends its
    whole body before reading (as http.client does), still gets the answer."""
    proxy = proxies.get()
    with RawServer(_answer_early(0)) as upstream:
        proxy.add_route("/early", upstream.url)
        status, _, body = proxy.request("POST", "/early/x", body=b"x" * size, timeout=30)
    assert (status, body) == (403, b"forbidden")


def test_early_answer_during_large_upload(proxies: ProxyCache) -> None:
    """As above, with an upload larger than the buffers between client and target, and the
    answer sent once they are full (the wait only lets them fill; nothing is timed)."""
    proxy = proxies.get()
    with RawServer(_answer_early(0.5)) as upstream:
        proxy.add_route("/early-large", upstream.url)
        status, _, body = proxy.request(
            "POST", "/early-large/x", body=b"x" * (32 << 20), timeout=30
        )
    assert (status, body) == (403, b"forbidden")


def test_head_request(proxy: Proxy) -> None:
    """A HEAD response has headers and no body, and the client connection serves on."""
    with RawClient(proxy.host, proxy.port) as client:
        client.request("HEAD", "/bytes/1000")
        head = client.response("HEAD")
        assert head.status == 200
        assert head.header("Content-Length") == "1000"
        client.request("HEAD", "/stream")  # a body the upstream would have sent chunked
        assert client.response("HEAD").status == 200
        client.request("HEAD", "/")
        assert client.response("HEAD").status == 200
        client.request("GET", "/bytes/10")
        resp = client.response()
        assert resp.status == 200
        assert len(resp.body) == 10
        assert hashlib.sha256(resp.body).hexdigest() == resp.header("X-Sha256")


def test_head_keeps_upstream_connection(proxy: Proxy) -> None:
    """A HEAD answered with a Content-Length leaves the upstream connection reusable."""
    with RawClient(proxy.host, proxy.port) as client:
        client.request("GET", "/peer")
        first = json.loads(client.response().body)["port"]
        client.request("HEAD", "/bytes/1000")
        assert client.response("HEAD").status == 200
        client.request("GET", "/peer")
        assert json.loads(client.response().body)["port"] == first


def test_head_without_length_keeps_upstream_connection(proxy: Proxy) -> None:
    """aiohttp answers HEAD on a streamed resource with no framing header at all, which is
    right for HEAD: no body follows, so the connection stays reusable."""
    with RawClient(proxy.host, proxy.port) as client:
        client.request("GET", "/peer")
        first = json.loads(client.response().body)["port"]
        client.request("HEAD", "/stream")
        head = client.response("HEAD")
        assert head.status == 200
        client.request("GET", "/peer")
        assert json.loads(client.response().body)["port"] == first


def test_chunked_response(proxy: Proxy) -> None:
    with RawClient(proxy.host, proxy.port) as client:
        client.request("GET", "/stream?n=20&size=3000")
        resp = client.response()
        assert resp.status == 200
        assert resp.chunked
        assert resp.header("Content-Length") is None
        assert resp.body == b"".join(bytes([65 + i % 26]) * 3000 for i in range(20))
        client.request("GET", "/")  # the connection is still usable
        assert client.response().status == 200


def test_chunked_response_to_http10_client(proxy: Proxy) -> None:
    """An HTTP/1.0 client cannot take chunks: the body ends with the connection."""
    with RawClient(proxy.host, proxy.port) as client:
        client.request("GET", "/stream?n=5&size=100", version="HTTP/1.0")
        resp = client.response()
        assert resp.status == 200
        assert not resp.chunked
        assert resp.until_close
        assert resp.body == b"".join(bytes([65 + i]) * 100 for i in range(5))


def test_http10_client_connection_closes(proxy: Proxy) -> None:
    with RawClient(proxy.host, proxy.port) as client:
        client.request("GET", "/", version="HTTP/1.0")
        resp = client.response()
        assert resp.status == 200
        assert (resp.header("Connection") or "").lower() == "close"
        assert client.closed_by_peer()


def test_chunked_request_body(proxy: Proxy) -> None:
    pieces = [os.urandom(n) for n in (1, 100, 5000, 70000, 3)]
    whole = b"".join(pieces)
    with RawClient(proxy.host, proxy.port) as client:
        client.request("POST", "/upload", headers=[("Transfer-Encoding", "chunked")])
        for piece in pieces:
            client.send(chunked(piece)[: -len(b"0\r\n\r\n")])
        client.send(b"0\r\n\r\n")
        resp = client.response()
    assert resp.status == 200
    reply = json.loads(resp.body)
    assert reply["length"] == len(whole)
    assert reply["sha256"] == hashlib.sha256(whole).hexdigest()
    assert reply["transfer_encoding"] == "chunked"
    assert reply["content_length"] is None


def test_chunked_both_ways(proxy: Proxy) -> None:
    """A chunked request streamed back as a chunked response by the upstream."""
    pieces = [os.urandom(n) for n in (10, 4096, 65536, 1)]
    with RawClient(proxy.host, proxy.port) as client:
        client.request("POST", "/echo-stream", headers=[("Transfer-Encoding", "chunked")], body=b"")
        client.send(chunked(*pieces))
        resp = client.response()
        assert resp.status == 200
        assert resp.chunked
        assert resp.header("X-Request-TE") == "chunked"
        assert resp.body == b"".join(pieces)
        client.request("GET", "/")
        assert client.response().status == 200


def test_chunked_request_with_trailers(proxy: Proxy) -> None:
    """Request trailers are dropped (CHP strips `trailer`); the body arrives intact."""
    with RawClient(proxy.host, proxy.port) as client:
        client.request(
            "POST", "/upload", headers=[("Transfer-Encoding", "chunked"), ("Trailer", "X-Sum")]
        )
        client.send(b"5\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n")
        resp = client.response()
        assert resp.status == 200
        assert json.loads(resp.body)["length"] == 5
        client.request("GET", "/")
        assert client.response().status == 200


def test_upload_10_mib(proxies: ProxyCache, app_backend: Backend) -> None:
    proxy = proxies.get("--default-target", app_backend.url, tag="big")
    data = os.urandom(10 * MiB)
    status, _, body = proxy.request("POST", "/upload", body=data, timeout=60)
    assert status == 200
    reply = json.loads(body)
    assert reply["length"] == len(data)
    assert reply["sha256"] == hashlib.sha256(data).hexdigest()


def test_download_10_mib(proxies: ProxyCache, app_backend: Backend) -> None:
    proxy = proxies.get("--default-target", app_backend.url, tag="big")
    status, headers, body = proxy.request("GET", f"/bytes/{10 * MiB}", timeout=60)
    assert status == 200
    assert len(body) == 10 * MiB
    assert hashlib.sha256(body).hexdigest() == headers["X-Sha256"]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_streaming_download_memory_is_bounded(proxies: ProxyCache, app_backend: Backend) -> None:
    """200 MiB stream through a slow-ish reader: the proxy's RSS must stay flat (flow control
    pauses the upstream instead of buffering). The stalls give an unbounded proxy every chance
    to grow; nothing here depends on how long anything takes."""
    proxy = proxies.get("--default-target", app_backend.url, tag="memory")
    pid = proxy.proc.pid
    for _ in range(3):  # warm-up (small bodies: see test_slow_reader_leaves_pool_usable)
        assert proxy.request("GET", "/warm-up")[0] == 200
    baseline = rss_kib(pid)
    peak = baseline
    total = 200 * MiB
    with RawClient(proxy.host, proxy.port, timeout=20) as client:
        client.request("GET", "/huge/200")
        head = client.read_head()
        assert head.status == 200
        assert head.header("Content-Length") == str(total)
        received = 0
        next_check = 0
        while received < total:
            try:
                data = client.reader.read1(min(256 * 1024, total - received))
            except TimeoutError:
                raise AssertionError(f"stalled after {received} bytes") from None
            assert data, f"connection closed after {received} bytes"
            received += len(data)
            if received >= next_check:
                peak = max(peak, rss_kib(pid))
                next_check += 8 * MiB
                if next_check in (16 * MiB, 96 * MiB, 160 * MiB):
                    time.sleep(0.2)  # a stalled reader
                    peak = max(peak, rss_kib(pid))
        assert received == total
    peak = max(peak, rss_kib(pid))
    assert peak - baseline < 60 * 1024, f"RSS grew by {(peak - baseline) // 1024} MiB"


def test_slow_reader_leaves_pool_usable(proxies: ProxyCache, app_backend: Backend) -> None:
    """A client that reads slowly keeps the proxy's write buffer full, so reading from the
    upstream is paused and resumed over and over, also when the response's last bytes arrive.
    The connection must go back to the pool reading again. (`--proxy-timeout` turns the hang
    this would otherwise be into a quick 503.)"""
    proxy = proxies.get(
        "--default-target", app_backend.url, "--proxy-timeout", "1000", tag="slow-reader"
    )
    # more than the kernel can hold between the two sockets, so the pipeline fills up
    with open("/proc/sys/net/ipv4/tcp_wmem") as f:
        mib = max(8, int(f.read().split()[2]) // MiB + 4)
    for _ in range(2):
        with RawClient(proxy.host, proxy.port) as client:
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            client.request("GET", f"/huge/{mib}")
            head = client.read_head()
            assert head.status == 200
            received = 0
            while received < mib * MiB:
                data = client.reader.read1(16384)
                assert data
                received += len(data)
                time.sleep(0.001)  # a slow reader (only the pace, nothing is timed)
        assert proxy.request("GET", "/after/slow/reader")[0] == 200


def test_expect_100_continue(proxy: Proxy) -> None:
    body = b"hello world"
    with RawClient(proxy.host, proxy.port) as client:
        client.request(
            "POST",
            "/upload",
            headers=[("Content-Length", str(len(body))), ("Expect", "100-continue")],
        )
        interim = client.read_head()
        assert interim.status == 100
        assert interim.raw_head.startswith(b"HTTP/1.1 100 Continue\r\n")
        client.send(body)
        resp = client.response()
        assert resp.status == 200
        assert json.loads(resp.body)["length"] == len(body)
        client.request("GET", "/")
        assert client.response().status == 200


def test_pipelined_requests_answered_in_order(proxy: Proxy) -> None:
    paths = ["/slow?ms=200&n=1", "/p/2", "/slow?ms=50&n=3", "/p/4?x", "/p/5"]
    with RawClient(proxy.host, proxy.port) as client:
        client.send(b"".join(f"GET {p} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for p in paths))
        urls = [json.loads(client.response().body)["url"] for _ in paths]
    assert urls == paths


def test_pipelined_requests_with_bodies(proxy: Proxy) -> None:
    bodies = [b"a" * 10, b"", b"b" * 70000, b"c"]
    with RawClient(proxy.host, proxy.port) as client:
        data = b""
        for body in bodies:
            data += b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (
                len(body),
                body,
            )
        client.send(data)
        lengths = [json.loads(client.response().body)["length"] for _ in bodies]
    assert lengths == [len(b) for b in bodies]


def test_upstream_keep_alive_one_client_connection(proxy: Proxy, app_backend: Backend) -> None:
    """20 sequential requests over one client connection use one upstream connection."""
    with RawClient(proxy.host, proxy.port) as client:
        ports = set()
        for _ in range(20):
            client.request("GET", "/peer")
            resp = client.response()
            assert resp.status == 200
            ports.add(json.loads(resp.body)["port"])
    assert len(ports) == 1


def test_upstream_keep_alive_across_client_connections(proxy: Proxy) -> None:
    """Sequential requests on fresh client connections still share pooled upstreams."""
    ports = {get_json(proxy, "/peer")["port"] for _ in range(20)}
    assert len(ports) == 1


def test_keep_alive_timeout_closes_idle_connection(
    proxies: ProxyCache, app_backend: Backend
) -> None:
    proxy = proxies.get("--default-target", app_backend.url, "--keep-alive-timeout", "300")
    with RawClient(proxy.host, proxy.port) as client:
        client.request("GET", "/")
        assert client.response().status == 200
        assert client.closed_by_peer()  # EOF arrives by itself, nothing sent first
    with RawClient(proxy.host, proxy.port) as client:
        client.request("GET", "/")
        assert client.response().status == 200


# -- last_activity (spec §2.5) --------------------------------------------------------------------


def test_activity_after_proxied_200(proxies: ProxyCache, app_backend: Backend) -> None:
    proxy = proxies.get()
    proxy.add_route("/act", app_backend.url)
    before = activity(proxy, "/act")
    wait_past(before)
    assert proxy.request("GET", "/act/x")[0] == 200
    after = activity(proxy, "/act")
    assert after > before
    wait_past(after)
    assert proxy.request("GET", "/act/stream?n=3")[0] == 200  # a streamed body counts on its end
    assert activity(proxy, "/act") > after


def test_no_activity_after_upstream_status_300_or_more(
    proxies: ProxyCache, app_backend: Backend
) -> None:
    proxy = proxies.get()
    for key in ("/status", "/redirect"):
        proxy.add_route(key, app_backend.url)
    for key, path, status in [
        ("/status", "/status/404", 404),
        ("/status", "/status/500", 500),
        ("/status", "/status/300", 300),
        ("/redirect", "/redirect/302?to=/", 302),
    ]:
        before = activity(proxy, key)
        wait_past(before)
        assert proxy.request("GET", path)[0] == status
        assert activity(proxy, key) == before, path
    assert proxy.request("GET", "/status/299")[0] == 299
    assert activity(proxy, "/status") > before


def test_no_activity_after_404(proxies: ProxyCache, app_backend: Backend) -> None:
    proxy = proxies.get()
    proxy.add_route("/act", app_backend.url)
    before = activity(proxy, "/act")
    wait_past(before)
    assert proxy.request("GET", "/nothing/here")[0] == 404
    assert proxy.request("GET", "/actx")[0] == 404
    assert activity(proxy, "/act") == before


def test_no_activity_after_503_but_body_chunks_count(proxies: ProxyCache) -> None:
    """A GET to a dead target leaves activity alone; a POST's body counts even so (§2.5)."""
    proxy = proxies.get()
    sock, port = dead_port()
    with sock:
        proxy.add_route("/dead", f"http://127.0.0.1:{port}")
        before = activity(proxy, "/dead")
        wait_past(before)
        assert proxy.request("GET", "/dead/x")[0] == 503
        assert activity(proxy, "/dead") == before
        with RawClient(proxy.host, proxy.port) as client:
            # head and body in one write, so the proxy reads the body before it knows the
            # target is down (see test_proxy_errors for a body still in flight then)
            client.request("POST", "/dead/x", body=b"some body")
            assert client.response().status == 503
        assert activity(proxy, "/dead") > before
        proxy.api("DELETE", "/dead")


# -- more keep-alive and framing ------------------------------------------------------------------


def test_pipelined_mix_of_answers(proxies: ProxyCache, app_backend: Backend) -> None:
    """Proxied answers, error pages and the health check come back in request order."""
    proxy = proxies.get()
    proxy.add_route("/p", app_backend.url)
    paths = ["/p/1", "/nope", "/p/slow?ms=100", "/_chp_healthz", "/%", "/p/3", "/nope/2", "/p/4"]
    statuses = [200, 404, 200, 200, 500, 200, 404, 200]
    with RawClient(proxy.host, proxy.port) as client:
        client.send(b"".join(f"GET {p} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for p in paths))
        answers = [client.response() for _ in paths]
    assert [a.status for a in answers] == statuses
    for path, answer in zip(paths, answers, strict=True):
        if answer.status == 200 and path.startswith("/p/"):
            assert json.loads(answer.body)["url"] == path


def test_client_connection_close(proxy: Proxy) -> None:
    with RawClient(proxy.host, proxy.port) as client:
        client.request("GET", "/", headers=[("Connection", "close")])
        resp = client.response()
        assert resp.status == 200
        assert (resp.header("Connection") or "").lower() == "close"
        assert client.closed_by_peer()


def test_http10_keep_alive(proxy: Proxy) -> None:
    """An HTTP/1.0 client asking for keep-alive gets it (for a response with a length)."""
    with RawClient(proxy.host, proxy.port) as client:
        for _ in range(2):
            client.request("GET", "/", headers=[("Connection", "keep-alive")], version="HTTP/1.0")
            resp = client.response()
            assert resp.status == 200
            assert (resp.header("Connection") or "").lower() == "keep-alive"
            assert json.loads(resp.body)["url"] == "/"


def test_not_modified_with_content_length(proxies: ProxyCache) -> None:
    """A 304 (and a 204) may carry a Content-Length but never a body: nobody waits for one,
    and both connections serve on."""

    def answers(conn: socket.socket) -> None:
        for response in (
            b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\nContent-Length: 100\r\n\r\n',
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        ):
            if not read_request_head(conn):
                return
            conn.sendall(response)
        threading.Event().wait(10)

    proxy = proxies.get()
    with RawServer(answers) as upstream:
        proxy.add_route("/cond", upstream.url)
        with RawClient(proxy.host, proxy.port) as client:
            client.request("GET", "/cond/a", headers=[("If-None-Match", '"x"')])
            resp = client.response()
            assert (resp.status, resp.body) == (304, b"")
            assert resp.header("ETag") == '"x"'
            client.request("GET", "/cond/b")
            assert client.response().status == 204
            client.request("GET", "/cond/c")
            resp = client.response()
            assert (resp.status, resp.body) == (200, b"ok")
        assert upstream.accepted.acquire(timeout=0)  # all three on one upstream connection
        assert not upstream.accepted.acquire(timeout=0)


def test_target_closing_pooled_connections(proxies: ProxyCache) -> None:
    """A target that closes each connection right after its answer (without saying so): a
    pooled connection may be dead when it is taken, and a bodiless request is then retried on
    a fresh one instead of failing."""

    def one_answer(conn: socket.socket) -> None:
        if read_request_head(conn):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        conn.close()

    proxy = proxies.get()
    with RawServer(one_answer) as upstream:
        proxy.add_route("/closer", upstream.url)
        with RawClient(proxy.host, proxy.port) as client:
            for i in range(50):
                client.request("GET", f"/closer/{i}")
                resp = client.response()
                assert (resp.status, resp.body) == (200, b"ok"), i


def test_keep_alive_timeout_zero_means_default(proxies: ProxyCache, app_backend: Backend) -> None:
    """`--keep-alive-timeout 0` becomes 5000 ms, as in CHP (§1.2)."""
    proxy = proxies.get("--default-target", app_backend.url, "--keep-alive-timeout", "0")
    status, headers, _ = proxy.request("GET", "/")
    assert status == 200
    assert headers["Keep-Alive"] == "timeout=5"

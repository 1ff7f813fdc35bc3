"""The internet-facing edge (docs/limits.md): each hole a hostile client or target found in the
data plane, as a regression test against a real proxy. Node CHP's behaviour is in the docstrings
where it is the precedent. No test here may make the proxy log a traceback (`proxies` checks)."""

from __future__ import annotations

import contextlib
import json
import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from procs import ProxyCache
from rawhttp import RawClient, RawServer, read_request_head
from support import Backend, Proxy
from test_metrics import scrape

LIMIT = 16 * 1024  # --max-header-size for these tests (the default is 64 KiB)
# what an attacker tries to send: more than the kernel's socket buffers on both ends can hold
# (a few MiB), so that all of it gets through only if the proxy keeps reading
FLOOD = 32 << 20


@pytest.fixture
def proxy(proxies: ProxyCache, backend: Backend) -> Proxy:
    proxy = proxies.get(
        "--max-header-size", str(LIMIT), "--metrics-ip", "127.0.0.1", "--metrics-port", "0"
    )
    proxy.add_route("/", backend.url)
    return proxy


def served(proxy: Proxy, path: str = "/still/served") -> None:
    """A well-behaved client on a connection of its own gets its answer."""
    status, _, body = proxy.request("GET", path)
    assert status == 200
    assert json.loads(body)["url"] == path


def send_until_closed(client: RawClient, first: bytes, piece: bytes, limit: int) -> int:
    """Send `first`, then `piece` over and over (at most `limit` bytes in all) until the proxy
    stops taking them; return how many bytes were sent."""
    client.send(first)
    sent = len(first)
    with contextlib.suppress(OSError):  # reset or broken pipe: the proxy has closed
        while sent < limit:
            client.send(piece)
            sent += len(piece)
    return sent


def answer_or_reset(client: RawClient) -> int | None:
    """The status the proxy answered before closing (None if the close came first as a reset),
    having checked that it did close (no answer and no close within the timeout fails)."""
    try:
        resp = client.response()
    except ConnectionError:  # not TimeoutError: a proxy that says nothing fails the test
        return None
    with contextlib.suppress(ConnectionResetError):
        assert client.closed_by_peer()
    return resp.status


# -- 1. request heads and trailers are counted as they arrive --------------------------------------


def test_a_header_that_never_ends_is_431(proxy: Proxy) -> None:
    """[CHP: 431 after about 16 KiB.] Before, the limit was checked only once a line ended, so
    a value that never ended was buffered for good."""
    with RawClient(proxy.host, proxy.port) as client:
        sent = send_until_closed(
            client, b"GET / HTTP/1.1\r\nHost: x\r\nX-Endless: ", b"a" * 65536, FLOOD
        )
        assert sent < FLOOD
        assert answer_or_reset(client) in (431, None)
    served(proxy)


def test_a_request_line_that_never_ends_is_431(proxy: Proxy) -> None:
    with RawClient(proxy.host, proxy.port) as client:
        sent = send_until_closed(client, b"GET /", b"a" * 65536, FLOOD)
        assert sent < FLOOD
        assert answer_or_reset(client) in (431, None)
    served(proxy)


def test_too_many_header_lines_is_431(proxy: Proxy) -> None:
    head = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"a:\r\n" * 1001 + b"\r\n"
    with RawClient(proxy.host, proxy.port) as client:
        client.send(head)
        assert answer_or_reset(client) in (431, None)
    served(proxy)


def test_a_trailer_block_that_never_ends_closes_the_connection(proxy: Proxy) -> None:
    """Trailers were never counted: an endless trailer block grew without limit."""
    with RawClient(proxy.host, proxy.port) as client:
        head = (
            b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\nX-Trailer: "
        )
        sent = send_until_closed(client, head, b"t" * 65536, FLOOD)
        assert sent < FLOOD
        # the request is being answered: the proxy can only cut the connection (whatever the
        # target answered meanwhile may come first); a timeout fails the test
        with contextlib.suppress(ConnectionError):
            client.read_to_eof(limit=1 << 20)
    served(proxy)


def test_many_complete_trailers_are_431(proxy: Proxy) -> None:
    body = b"3\r\nabc\r\n0\r\n" + b"X-T: v\r\n" * 1001 + b"\r\n"
    with RawClient(proxy.host, proxy.port) as client:
        client.send(b"POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
        # the request is taken back from its target (which never gets its end) and answered
        resp = client.response("POST")
        assert resp.status == 431
        assert client.closed_by_peer()
    served(proxy)


def test_a_head_just_under_the_limit_passes(proxy: Proxy) -> None:
    def head_size(conn: socket.socket) -> None:
        head = read_request_head(conn)
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%d" % (len(str(len(head))), len(head))
        )

    with RawServer(head_size) as target:
        proxy.add_route("/big", target.url)
        cookie = "c" * (LIMIT - 200)
        status, _, body = proxy.request("GET", "/big/cookie", headers={"Cookie": cookie})
        assert status == 200
        assert int(body) > LIMIT - 200


def test_head_bytes_split_over_many_reads_are_not_counted_twice(proxy: Proxy) -> None:
    """Pipelined requests with bodies, sent a few bytes at a time: body bytes are progress, so
    the head count never adds up across requests."""
    request = b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n" + b"b" * 2000
    with RawClient(proxy.host, proxy.port) as client:
        data = request * 12  # more than LIMIT in all
        for i in range(0, len(data), 700):
            client.send(data[i : i + 700])
        for _ in range(12):
            assert client.response("POST").status == 200


# -- 2. a 101 to a request that asked for no upgrade -----------------------------------------------


def hijacker(conn: socket.socket) -> None:
    """Answers anything with 101, then echoes what follows (as a tunnel would carry it)."""
    read_request_head(conn)
    conn.sendall(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: evil\r\nConnection: Upgrade\r\n\r\n"
    )
    while data := conn.recv(65536):
        conn.sendall(b"HIJACKED " + data)


def test_a_101_to_a_plain_request_does_not_take_the_connection(proxy: Proxy) -> None:
    """[CHP does not tunnel.] Before, the client's next request (cookies and all) went down
    the tunnel to the hijacking target instead of the route it asked for."""
    with RawServer(hijacker) as evil:
        proxy.add_route("/evil", evil.url)
        with RawClient(proxy.host, proxy.port) as client:
            client.request("GET", "/evil/page")
            first = client.response()
            assert first.status == 503
            client.request("GET", "/hub/login", headers=[("Cookie", "session=secret")])
            second = client.response()
            assert second.status == 200
            assert json.loads(second.body)["url"] == "/hub/login"
    proxy.wait_for_line(re.escape("101 Switching Protocols to a request that asked for none"))


# -- 3. response heads are bounded -----------------------------------------------------------------


def endless_head(conn: socket.socket) -> None:
    read_request_head(conn)
    conn.sendall(b"HTTP/1.1 200 OK\r\nX-Endless: ")
    for _ in range(1024):  # 64 MiB at most; the proxy gives up long before
        conn.sendall(b"h" * 65536)


def many_headers(conn: socket.socket) -> None:
    read_request_head(conn)
    conn.sendall(b"HTTP/1.1 200 OK\r\n" + b"X-H: v\r\n" * 5000 + b"Content-Length: 0\r\n\r\n")


@pytest.mark.parametrize("handler", [endless_head, many_headers])
def test_an_oversized_response_head_is_a_broken_target(
    proxy: Proxy, handler: Callable[[socket.socket], None]
) -> None:
    """[CHP: 16 KiB, then an error answer.] Before, 100 MiB was buffered, then relayed."""
    with RawServer(handler) as target:
        proxy.add_route("/bighead", target.url)
        with RawClient(proxy.host, proxy.port) as client:
            client.request("GET", "/bighead/x")
            resp = client.response()
            assert resp.status == 503
            assert len(resp.raw_head) < 4096
    proxy.wait_for_line(re.escape("bad response: "))
    served(proxy)


# -- 4. a head must arrive in time (slowloris) -----------------------------------------------------


def test_a_trickled_head_is_408_after_headers_timeout(
    proxies: ProxyCache, backend: Backend
) -> None:
    """[Node: 408 after its 60 s headersTimeout.] Before, every byte reset the idle clock, so a
    head sent one byte at a time held its connection for good. The trickle goes on for at most
    30 s; the proxy must answer long before."""
    proxy = proxies.get("--headers-timeout", "500", "--default-target", backend.url)
    head = b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 1000
    with RawClient(proxy.host, proxy.port, timeout=0.1) as client:
        deadline = time.monotonic() + 30
        sent = 0
        answer = b""
        while time.monotonic() < deadline and sent < len(head):
            try:
                client.send(head[sent : sent + 1])
            except OSError:
                break
            sent += 1
            with contextlib.suppress(TimeoutError):
                answer = client.sock.recv(4096)
                if answer:
                    break
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), (sent, answer)
    served(proxy)


def test_a_head_in_time_is_served_with_a_short_headers_timeout(
    proxies: ProxyCache, backend: Backend
) -> None:
    """The clock runs from a head's first byte to its end only: a kept-alive connection idle
    between requests, and a slow body, are not a slow head."""
    proxy = proxies.get("--headers-timeout", "500", "--default-target", backend.url)
    with RawClient(proxy.host, proxy.port) as client:
        client.request("GET", "/one")
        assert client.response().status == 200
        client.request("GET", "/two")
        assert client.response().status == 200


# -- 6. --proxy-timeout covers connecting ----------------------------------------------------------


@pytest.fixture
def syn_dropping_port() -> Iterator[int]:
    """A port whose listener's accept queue is full: the kernel drops further SYNs, as a
    firewalled or vanished host does (connecting hangs, it is not refused)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port), timeout=5)  # fills the queue of one
    yield port
    filler.close()
    listener.close()


def test_proxy_timeout_covers_a_connect_that_hangs(
    proxies: ProxyCache, syn_dropping_port: int
) -> None:
    """Before, a target that dropped connection attempts held the request for about two
    minutes (the kernel's SYN retries) whatever --proxy-timeout said."""
    proxy = proxies.get("--proxy-timeout", "300")
    proxy.add_route("/hang", f"http://127.0.0.1:{syn_dropping_port}")
    status, _, _ = proxy.request("GET", "/hang/x", timeout=10)
    assert status == 503
    proxy.wait_for_line(re.escape("503 GET /hang/x socket hang up"))


# -- 7 and 13. a stale pooled connection: retried only if idempotent, counted once -----------------


class StaleAfterFirst:
    """A target that answers the first request on each connection, keeps the connection, then
    reads the second request and closes without a word (a keep-alive race lost)."""

    def __init__(self) -> None:
        self.requests: queue.Queue[bytes] = queue.Queue()
        self.server = RawServer(self.handle)

    def handle(self, conn: socket.socket) -> None:
        head = read_request_head(conn)
        self.requests.put(head.split(b" ", 1)[0])
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        head = read_request_head(conn)
        if head:
            self.requests.put(head.split(b" ", 1)[0])
        conn.close()

    def seen(self) -> list[bytes]:
        found = []
        with contextlib.suppress(queue.Empty):
            while True:
                found.append(self.requests.get_nowait())
        return found


@pytest.fixture
def stale() -> Iterator[StaleAfterFirst]:
    target = StaleAfterFirst()
    yield target
    target.server.stop()


def test_a_post_is_not_sent_twice(proxy: Proxy, stale: StaleAfterFirst) -> None:
    """RFC 9110 §9.2.2: only idempotent methods are retried. Before, a POST without a body
    reached the target twice."""
    proxy.add_route("/stale-post", stale.server.url)
    with RawClient(proxy.host, proxy.port) as client:
        client.request("GET", "/stale-post/a")
        assert client.response().status == 200
        client.request("POST", "/stale-post/b")
        assert client.response("POST").status == 503
    assert stale.seen() == [b"GET", b"POST"]


def test_a_retried_get_is_counted_once(proxy: Proxy, stale: StaleAfterFirst) -> None:
    proxy.add_route("/stale-get", stale.server.url)
    before = scrape(proxy).get("requests_web")
    with RawClient(proxy.host, proxy.port) as client:
        client.request("GET", "/stale-get/a")
        assert client.response().status == 200
        client.request("GET", "/stale-get/b")
        assert client.response().status == 200  # the retry, on a fresh connection
    assert stale.seen() == [b"GET", b"GET", b"GET"]
    assert scrape(proxy).get("requests_web") - before == 2


# -- 8. Host ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("routing", [(), ("--host-routing",)])
@pytest.mark.parametrize(
    "head",
    [
        b"GET /h HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
        b"GET /h HTTP/1.1\r\n\r\n",
    ],
    ids=["two-hosts", "no-host"],
)
def test_host_must_be_one(
    proxies: ProxyCache, backend: Backend, routing: tuple[str, ...], head: bytes
) -> None:
    """RFC 9112 §3.2. Before, with --host-routing the route came from the first Host and the
    target got the last; a request without Host went to the `undefined` route."""
    proxy = proxies.get(*routing)
    proxy.add_route("/undefined" if routing else "/", backend.url)
    proxy.add_route("/a.test" if routing else "/a", backend.url)
    with RawClient(proxy.host, proxy.port) as client:
        client.send(head)
        resp = client.response()
        assert resp.status == 400
        assert client.closed_by_peer()


def test_http10_without_host_is_proxied(proxy: Proxy) -> None:
    with RawClient(proxy.host, proxy.port) as client:
        client.send(b"GET /old HTTP/1.0\r\n\r\n")
        assert client.response().status == 200


# -- 9. a target host that cannot be encoded -------------------------------------------------------


def test_a_target_host_that_cannot_be_encoded_is_503_in_one_line(proxy: Proxy) -> None:
    """Before: no answer at all, and a traceback in the log on every request."""
    proxy.add_route("/idna", "http://ex\u00e4mple..test")
    status, _, _ = proxy.request("GET", "/idna/x")
    assert status == 503
    proxy.wait_for_line(re.escape("503 GET /idna/x getaddrinfo ENOTFOUND ex\u00e4mple..test"))


# -- 10. framing details ---------------------------------------------------------------------------


def answers(*responses: bytes) -> Callable[[socket.socket], None]:
    """A target answering the requests on a connection with `responses`, one each, in turn."""

    def handle(conn: socket.socket) -> None:
        for response in responses:
            if not read_request_head(conn):
                return
            conn.sendall(response)
        with contextlib.suppress(OSError):
            conn.recv(1)

    return handle


def test_a_body_after_204_keeps_the_client_connection(proxy: Proxy) -> None:
    """[CHP keeps it.] Before, the stray bytes reset the client's keep-alive connection."""
    with RawServer(answers(b"HTTP/1.1 204 No Content\r\n\r\nstray body")) as target:
        proxy.add_route("/nocontent", target.url)
        with RawClient(proxy.host, proxy.port) as client:
            client.request("GET", "/nocontent/x")
            assert client.response().status == 204
            client.request("GET", "/after/204")
            resp = client.response()
            assert resp.status == 200
            assert json.loads(resp.body)["url"] == "/after/204"


def test_a_second_response_is_not_relayed(proxy: Proxy) -> None:
    """A target that answers twice: the client gets the first; the second would answer the
    client's next request."""
    twice = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst"
        b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond"
    )
    with RawServer(answers(twice)) as target:
        proxy.add_route("/twice", target.url)
        with RawClient(proxy.host, proxy.port) as client:
            client.request("GET", "/twice/x")
            assert client.response().body == b"first"
            client.request("GET", "/twice-next")
            resp = client.response()
            assert json.loads(resp.body)["url"] == "/twice-next"


def test_no_1xx_to_an_http10_client(proxy: Proxy) -> None:
    """RFC 9110 §15.2: HTTP/1.0 has no 1xx. Before, a target's 100 Continue was relayed."""
    response = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    with RawServer(answers(response)) as target:
        proxy.add_route("/continue", target.url)
        with RawClient(proxy.host, proxy.port) as client:
            client.send(b"GET /continue/x HTTP/1.0\r\nHost: x\r\n\r\n")
            resp = client.response(skip_informational=False)
            assert resp.status == 200
            assert resp.body == b"ok"


def test_an_http11_client_still_gets_the_1xx(proxy: Proxy) -> None:
    response = (
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    with RawServer(answers(response)) as target:
        proxy.add_route("/hints", target.url)
        with RawClient(proxy.host, proxy.port) as client:
            client.request("GET", "/hints/x")
            early = client.response(skip_informational=False)
            assert early.status == 103
            assert early.header("Link") == "</s.css>"
            assert client.response().body == b"ok"


@pytest.mark.parametrize(
    "codings",
    [
        [b"gzip", b"chunked"],
        [b"gzip, chunked"],
        [b"chunked", b"chunked"],
    ],
)
def test_transfer_codings_other_than_chunked_are_400_on_any_number_of_lines(
    proxy: Proxy, codings: list[bytes]
) -> None:
    """Before, `gzip` on one line and `chunked` on the next lost the `gzip` silently."""
    lines = b"".join(b"Transfer-Encoding: " + c + b"\r\n" for c in codings)
    with RawClient(proxy.host, proxy.port) as client:
        client.send(b"POST /te HTTP/1.1\r\nHost: x\r\n" + lines + b"\r\n3\r\nabc\r\n0\r\n\r\n")
        assert client.response("POST").status == 400


# -- 14. pools per origin, forgotten when empty ----------------------------------------------------


def test_one_pool_per_origin(proxies: ProxyCache, backend: Backend) -> None:
    """Before, `http://h:1`, `http://h:1/` and `http://H:1/x` got a pool each (and each kept a
    connection of its own)."""
    proxy = proxies.get("--metrics-ip", "127.0.0.1", "--metrics-port", "0", tag="pools")
    port = backend.url.rpartition(":")[2]
    proxy.add_route("/o1", f"http://localhost:{port}")
    proxy.add_route("/o2", f"http://localhost:{port}/")
    proxy.add_route("/o3", f"http://LocalHost:{port}/x")
    with RawClient(proxy.host, proxy.port) as client:
        for path in ("/o1/a", "/o2/a", "/o3/a", "/o1/b"):
            client.request("GET", path)
            assert client.response().status == 200
    assert scrape(proxy).get("hubproxy_upstream_connections", state="idle") == 1


# -- the attacks cost the other clients nothing ----------------------------------------------------


def test_other_clients_are_served_during_a_head_bomb(proxy: Proxy) -> None:
    """A well-behaved client keeps being answered while another connection sends an endless
    header; the attacker's connection is closed and its bytes are not all read."""
    stop = threading.Event()
    sent: list[int] = []

    def attack() -> None:
        with RawClient(proxy.host, proxy.port) as client:
            sent.append(
                send_until_closed(client, b"GET / HTTP/1.1\r\nHost: x\r\nX: ", b"a" * 4096, 1 << 28)
            )
        stop.set()

    thread = threading.Thread(target=attack, daemon=True)
    thread.start()
    for i in range(50):
        served(proxy, f"/during/{i}")
    assert stop.wait(30)
    thread.join(5)
    assert sent[0] < 1 << 28


# -- found by a hostile review of the above ------------------------------------------------------


def test_connection_cannot_strip_content_length_to_smuggle_a_request(proxy: Proxy) -> None:
    """`Connection: content-length` used to drop the client's Content-Length: its body reached
    the target as a second request (with X-Forwarded-For of the attacker's choosing), and the
    pooled connection then answered the next user with that request's response."""
    smuggled = b"GET /admin-only HTTP/1.1\r\nHost: internal\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n"
    with RawClient(proxy.host, proxy.port) as client:
        client.send(
            b"POST /hub/login HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, content-length\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(smuggled), smuggled)
        )
        seen = json.loads(client.response("POST").body)
        assert (seen["method"], seen["url"], seen["body_length"]) == (
            "POST",
            "/hub/login",
            len(smuggled),
        )
    for _ in range(3):  # whichever pooled connection they get, users get their own answers
        served(proxy, "/user/victim/")


class UpgradeRefuser:
    """A target that refuses upgrades with a kept-alive 400, answers anything else with its
    path, and records every request line it reads."""

    def __init__(self) -> None:
        self.lines: queue.Queue[bytes] = queue.Queue()
        self.server = RawServer(self.handle)

    def handle(self, conn: socket.socket) -> None:
        while head := read_request_head(conn):
            line = head.split(b"\r\n", 1)[0]
            self.lines.put(line)
            if line.startswith(b"GET /ws"):
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 2\r\n\r\nno")
            else:
                path = line.split(b" ")[1]
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(path), path))
        self.lines.put(b"EOF")

    def lines_until_eof(self) -> list[bytes]:
        lines = []
        while (line := self.lines.get(timeout=10)) != b"EOF":
            lines.append(line)
        return lines


UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"


@pytest.mark.parametrize("before", [b"", b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n"])
def test_bytes_after_an_upgrade_request_wait_for_the_101(proxy: Proxy, before: bytes) -> None:
    """Design §5: tunnel bytes only after a 101. They used to reach the target at once (and,
    pipelined, on the previous request's connection): a refused upgrade left them to be read
    as a request, and its connection was pooled for the next user."""
    target = UpgradeRefuser()
    try:
        proxy.add_route("/", target.server.url)
        with RawClient(proxy.host, proxy.port) as client:
            client.send(before + UPGRADE + SMUGGLED)
            if before:
                assert client.response().body == b"/first"
            assert client.response().status == 400
            assert client.closed_by_peer()
        lines = target.lines_until_eof()
        if before and lines == [b"GET /first HTTP/1.1"]:  # /ws came on a second connection
            lines = target.lines_until_eof()
        assert b"GET /smuggled HTTP/1.1" not in lines
        assert lines[-1] == b"GET /ws HTTP/1.1"
    finally:
        target.server.stop()


def test_a_101_without_upgrade_websocket_is_a_broken_target(proxy: Proxy) -> None:
    with RawServer(
        answers(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\r\n")
    ) as t:
        proxy.add_route("/ws101", t.url)
        with RawClient(proxy.host, proxy.port) as client:
            client.send(UPGRADE.replace(b"GET /ws", b"GET /ws101"))
            assert client.read_head().status == 503
            assert client.closed_by_peer()


def test_a_response_with_a_coding_other_than_chunked_ends_with_the_connection(
    proxy: Proxy,
) -> None:
    """RFC 9112 §6.3: with `Transfer-Encoding: gzip` the body ends when the connection does.
    It used to be read as chunked and cut."""
    body = b"\x1f\x8b" + b"z" * 5000
    response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n" + body
    with RawServer(_close_after(answers(response))) as t:
        proxy.add_route("/gzip", t.url)
        with RawClient(proxy.host, proxy.port) as client:
            client.request("GET", "/gzip/x")
            assert client.response().body == body


def _close_after(handler: Callable[[socket.socket], None]) -> Callable[[socket.socket], None]:
    def handle(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            conn.settimeout(0.5)  # answers() waits for a next request; this target does not
            handler(conn)
        conn.close()

    return handle


def test_blank_lines_trickled_between_requests_meet_the_head_timeout(
    proxies: ProxyCache, backend: Backend
) -> None:
    """llhttp skips blank lines between requests, so they began no head and reset the idle
    clock: trickled, they held the connection for good."""
    proxy = proxies.get("--headers-timeout", "500", "--default-target", backend.url)
    with RawClient(proxy.host, proxy.port, timeout=0.2) as client:
        deadline = time.monotonic() + 30
        answer = None  # what the proxy said, b"" once it closed
        while time.monotonic() < deadline and answer is None:
            try:
                client.send(b"\r\n")
                answer = client.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                answer = b""
        assert answer is not None, "still open after 30 s"
        assert answer.startswith(b"HTTP/1.1 408 ") or answer == b""


def test_a_long_request_target_is_cut_in_the_error_line(proxies: ProxyCache) -> None:
    """An unauthenticated client must not be able to write 64 KiB lines into the log."""
    proxy = proxies.get(tag="no-routes")
    path = "/nothing/" + "a" * 20_000
    assert proxy.request("GET", path)[0] == 404
    line = proxy.wait_for_line(r"404 GET /nothing/a+\.\.\.").string
    assert len(line) < 1200


def test_a_status_line_in_pieces_keeps_its_reason(proxy: Proxy) -> None:
    """httptools reports a reason phrase in pieces when it comes in several reads."""

    def in_pieces(conn: socket.socket) -> None:
        read_request_head(conn)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sendall(b"HTTP/1.1 200 Every")
        time.sleep(0.2)  # most often a read of its own (if not, the test proves nothing)
        conn.sendall(b"thing Fine\r\nContent-Length: 2\r\n\r\nok")

    with RawServer(in_pieces) as target:
        proxy.add_route("/pieces", target.url)
        with RawClient(proxy.host, proxy.port) as client:
            client.request("GET", "/pieces/x")
            resp = client.response()
            assert (resp.reason, resp.body) == (b"Everything Fine", b"ok")


@pytest.mark.parametrize(
    "body",
    [b"3\r\nabc\r\nzz\r\n", b"FFFFFFFFFFFFFFFFF1\r\n", b"3\r\nabcX\r\n"],
    ids=["bad-size", "size-overflow", "no-crlf"],
)
def test_a_bad_body_is_400_if_no_answer_has_begun(proxy: Proxy, body: bytes) -> None:
    """[CHP: 400.] The request's head had gone to its target already; the connection used to
    be cut without an answer."""
    with RawClient(proxy.host, proxy.port) as client:
        client.send(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body
        )
        assert client.response("POST").status == 400
        assert client.closed_by_peer()
    served(proxy)

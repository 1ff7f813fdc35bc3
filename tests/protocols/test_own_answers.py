"""What the proxy answers itself (404 no route, 503 target down, 408, 431, 400, the health
check), and that the rest of such a request's body is read and dropped (Sink DROP)."""

from __future__ import annotations

import pytest

from hubproxy.proxy.exchange import DROP
from hubproxy.proxy.upstream import Phase

from .conftest import MakeProxy
from .fakes import CLOSE, KEEP_ALIVE, Proxy, forwarded, request, response

NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n" + KEEP_ALIVE + b"\r\nNot Found"
UNAVAILABLE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 19\r\n"
    + KEEP_ALIVE
    + b"\r\nService Unavailable"
)


def closing_answer(status: int, phrase: bytes) -> bytes:
    """An answer to a request the proxy cannot read on from (the connection closes)."""
    return b"HTTP/1.1 %d %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (
        status,
        phrase,
        len(phrase),
        phrase,
    )


@pytest.fixture
def unrouted(proxy: Proxy) -> Proxy:
    """A proxy whose only route is /routed."""
    proxy.table.route_removed("/")
    proxy.route("/routed")
    return proxy


async def test_no_route_404(unrouted: Proxy) -> None:
    """No route: a 404 from the proxy, the connection kept, no target connection made."""
    client = unrouted.client()
    client.receive(request("GET", "/elsewhere"))
    assert client.take() == NOT_FOUND
    assert client.protocol.active is None and client.reading
    assert unrouted.connector.attempts == []
    assert unrouted.service.stats.requests_proxy == {404: 1}


async def test_no_route_body_dropped(unrouted: Proxy) -> None:
    """A 404 to a request whose body is still coming: answered at once; the body (what came
    with the head, and what follows) is read and dropped; then the next request is served."""
    client = unrouted.client()
    client.receive(request("POST", "/elsewhere", [("Content-Length", "8")]) + b"1234")
    assert client.take() == NOT_FOUND
    unfinished = client.protocol.unfinished
    assert unfinished is not None and unfinished.sink is DROP and unfinished.pending is None
    client.receive(b"5678")
    assert client.protocol.unfinished is None
    client.receive(request("GET", "/routed/x"))
    await unrouted.run_callbacks()
    [target] = unrouted.targets
    assert target.take() == forwarded("GET", "/routed/x")


async def test_no_route_chunked_body_dropped(unrouted: Proxy) -> None:
    """The same with a chunked body: dropped chunk by chunk, to its last chunk."""
    client = unrouted.client()
    client.receive(request("PUT", "/elsewhere", [("Transfer-Encoding", "chunked")]))
    assert client.take() == NOT_FOUND
    client.receive(b"4\r\nabcd\r\n")
    assert client.protocol.unfinished is not None
    client.receive(b"0\r\n\r\n" + request("GET", "/elsewhere/2"))
    assert client.take() == NOT_FOUND
    assert unrouted.connector.attempts == []


@pytest.mark.parametrize("version", ["1.1", "1.0"])
async def test_closing_answer_reads_the_rest_first(unrouted: Proxy, version: str) -> None:
    """docs/limits.md: the body of a request already answered is read and dropped (30 s at
    most) so that the client can read the answer; then the connection is closed. That holds
    for a request that closes the connection too."""
    client = unrouted.client()
    headers = [("Content-Length", "8"), ("Connection", "close")]
    client.receive(request("POST", "/elsewhere", headers, version=version) + b"1234")
    assert client.take().startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert not client.closing
    client.receive(b"5678")
    assert client.closing


async def test_target_down_503(proxy: Proxy) -> None:
    """The target refuses the connection: a 503, the connection kept, nothing counted in
    use."""
    proxy.connector.failures.append(ConnectionRefusedError(111, "Connection refused"))
    client = proxy.client()
    client.receive(request())
    await proxy.run_callbacks()
    assert client.take() == UNAVAILABLE
    assert client.reading and not client.closing
    assert proxy.counts() == (0, 0)
    assert proxy.connector.attempts == [("target.test", 8080)]


async def test_target_down_body_dropped(proxy: Proxy) -> None:
    """A 503 to a POST: the body that waited for the connection (BUFFER) is dropped with what
    follows."""
    proxy.connector.hold = True
    proxy.connector.failures.append(ConnectionRefusedError(111, "Connection refused"))
    client = proxy.client()
    client.receive(request("POST", "/", [("Content-Length", "6")]) + b"abc")
    active = client.protocol.active
    assert active is not None and active.pending == [b"abc"]
    proxy.connector.finish_connecting()
    await proxy.run_callbacks()
    assert client.take() == UNAVAILABLE
    assert active.sink is DROP and active.pending is None
    client.receive(b"def")
    assert client.protocol.unfinished is None


async def test_health_check(proxy: Proxy) -> None:
    """/_chp_healthz is answered by the proxy, with no route and no target."""
    proxy.table.route_removed("/")
    client = proxy.client()
    client.receive(request("GET", "/_chp_healthz"))
    assert client.take() == (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n"
        + KEEP_ALIVE
        + b'\r\n{"status":"OK"}'
    )
    assert proxy.connector.attempts == []


async def test_malformed_request_400(proxy: Proxy) -> None:
    """A request llhttp cannot parse: a 400, and the connection closes."""
    client = proxy.client()
    client.receive(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
    assert client.take() == closing_answer(400, b"Bad Request")
    assert client.closing


async def test_no_host_400(proxy: Proxy) -> None:
    """An HTTP/1.1 request without Host: a 400 before any target is asked."""
    client = proxy.client()
    client.receive(request(host=None))
    assert client.take() == closing_answer(400, b"Bad Request")
    assert proxy.connector.attempts == []


async def test_bad_body_before_the_answer_400(proxy: Proxy) -> None:
    """A malformed chunked body while the target has not answered: the request is taken back
    from its target (whose connection is abandoned) and answered 400."""
    client = proxy.client()
    client.receive(request("POST", "/", [("Transfer-Encoding", "chunked")]))
    await proxy.run_callbacks()
    [target] = proxy.targets
    client.receive(b"zz\r\n")
    assert client.take() == closing_answer(400, b"Bad Request")
    assert target.aborted and target.protocol.phase is Phase.CLOSED
    assert proxy.counts() == (0, 0)


async def test_bad_body_after_the_answer_began_cuts(proxy: Proxy) -> None:
    """The same once the target's answer has begun: ours cannot replace it; the client is
    cut off."""
    client = proxy.client()
    client.receive(request("POST", "/", [("Transfer-Encoding", "chunked")]))
    await proxy.run_callbacks()
    [target] = proxy.targets
    target.receive(response(200, [("Content-Length", "10")]) + b"12345")
    client.take()
    client.receive(b"zz\r\n")
    assert client.writes == []
    assert client.aborted
    await proxy.run_callbacks()
    assert target.protocol.phase is Phase.CLOSED


async def test_head_too_large_431(proxy: Proxy) -> None:
    """A head over --max-header-size: a 431, and the connection closes."""
    client = proxy.client()
    client.receive(request(headers=[("X-Big", "b" * 70_000)]))
    assert client.take() == closing_answer(431, b"Request Header Fields Too Large")
    assert client.closing
    assert proxy.connector.attempts == []


async def test_unfinished_head_too_large_431(make_proxy: MakeProxy) -> None:
    """A head line that never ends is cut at --max-header-size bytes too (counted as read)."""
    proxy = make_proxy(max_header_size=1024)
    client = proxy.client()
    client.receive(b"GET / HTTP/1.1\r\nX-Long: " + b"a" * 600)
    assert client.writes == []
    client.receive(b"a" * 600)
    assert client.take() == closing_answer(431, b"Request Header Fields Too Large")


async def test_head_timeout_408(proxy: Proxy) -> None:
    """A head still unfinished --headers-timeout (60 s) after its first byte: a 408."""
    client = proxy.client()
    client.receive(b"GET / HTTP/1.1\r\nHost: a\r\n")
    proxy.sweep(61)
    assert client.take() == closing_answer(408, b"Request Timeout")
    assert client.closing


async def test_half_a_head_waits_for_the_headers_timeout(proxy: Proxy) -> None:
    """A client that pauses in the middle of its head for longer than the keep-alive timeout
    is not idle: it has until --headers-timeout to finish it."""
    client = proxy.client()
    client.receive(b"GET / HTTP/1.1\r\nHost: a\r\n")
    proxy.sweep(10)
    assert not client.closing


async def test_not_found_to_http10_closes(unrouted: Proxy) -> None:
    """An HTTP/1.0 request's 404 says Connection: close, and the connection closes."""
    client = unrouted.client()
    client.receive(request("GET", "/x", version="1.0"))
    assert client.take() == b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n" + CLOSE + (
        b"\r\nNot Found"
    )
    assert client.closing

"""WebSocket upgrades: 101 turns both legs into a byte tunnel (TUNNEL, never pooled); a refused
upgrade closes both; half-closes and closes pass from either side to the other."""

from __future__ import annotations

from hubproxy.proxy.flow import CLIENT_FULL, UPGRADE, UPSTREAM_FULL
from hubproxy.proxy.upstream import Phase

from .conftest import MakeProxy
from .fakes import CLOSE, Client, Proxy, Target, forwarded, request, response

WS_HEADERS = [
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ("Sec-WebSocket-Version", "13"),
]
PASSED_ON = [h for h in WS_HEADERS if h[0].startswith("Sec-")]
SWITCHING = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)


async def upgrading(proxy: Proxy, early: bytes = b"") -> tuple[Client, Target]:
    """A client whose upgrade request (and `early` bytes after it) reached the target."""
    client = proxy.client()
    client.receive(request("GET", "/ws", WS_HEADERS) + early)
    await proxy.run_callbacks()
    target = proxy.targets[-1]
    assert target.take() == forwarded("GET", "/ws", PASSED_ON, websocket=True)
    return client, target


async def tunnel(proxy: Proxy) -> tuple[Client, Target]:
    client, target = await upgrading(proxy)
    target.receive(SWITCHING)
    assert client.take() == SWITCHING
    return client, target


async def test_upgrade_opens_a_tunnel(proxy: Proxy) -> None:
    """Bytes after the upgrade request wait (reading paused) for the 101; then the 101 and the
    target's bytes after it reach the client, the client's early bytes reach the target, and
    both legs carry bytes unparsed."""
    client, target = await upgrading(proxy, early=b"\x81\x05early")
    assert target.writes == []
    assert client.protocol.gate.reasons == UPGRADE and not client.reading
    target.receive(SWITCHING + b"\x81\x02hi")
    assert client.take() == SWITCHING + b"\x81\x02hi"
    assert target.take() == b"\x81\x05early"
    assert target.protocol.phase is Phase.TUNNEL
    assert client.protocol.tunnel and client.reading
    client.receive(b"GET / HTTP/1.1\r\n\r\n")  # not HTTP any more: relayed as it is
    assert target.take() == b"GET / HTTP/1.1\r\n\r\n"
    target.receive(b"\x88\x00")
    assert client.take() == b"\x88\x00"
    assert proxy.counts() == (0, 0)  # a tunnel is no pool's
    assert proxy.service.connection_counts() == (1, 1)


async def test_refused_upgrade_closes_both(proxy: Proxy) -> None:
    """A non-101 answer to an upgrade is relayed with Connection: close; then both legs close
    (the client may have sent tunnel bytes already), and the target connection is not
    pooled, whatever it said."""
    client, target = await upgrading(proxy, early=b"\x81\x05early")
    target.receive(response(403, body=b"no"))
    assert client.take() == b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n" + CLOSE + b"\r\nno"
    assert client.closing
    assert target.closing and target.protocol.phase is Phase.CLOSED
    assert target.writes == []  # the early bytes never went out
    await proxy.run_callbacks()
    assert proxy.counts() == (0, 0)


async def test_101_to_a_plain_request_is_refused(proxy: Proxy) -> None:
    """A 101 to a request that asked for no upgrade would hand the target the client's next
    requests: a 503 instead, the target connection aborted."""
    client = proxy.client()
    client.receive(request("GET", "/"))
    await proxy.run_callbacks()
    [target] = proxy.targets
    target.receive(SWITCHING)
    assert client.take().startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert target.aborted
    assert not client.protocol.tunnel and not client.closing  # the client's stays as it was


async def test_101_without_websocket_is_refused(proxy: Proxy) -> None:
    """A 101 that does not say `Upgrade: websocket`: the upgrade fails with a bare 503."""
    client, target = await upgrading(proxy)
    target.receive(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n")
    assert client.take() == (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    assert client.closing and target.aborted


async def test_101_without_connection_upgrade_is_refused(proxy: Proxy) -> None:
    """A 101 with `Upgrade: websocket` but no `Connection: upgrade` is no switch to llhttp (nor
    to RFC 9110 §7.8): a bare 503 before any of it reaches the client (its head went out, then
    the client was cut off)."""
    client, target = await upgrading(proxy)
    target.receive(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
    assert client.take() == (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    assert client.closing and target.aborted and not client.protocol.tunnel


async def test_upgrade_target_down(proxy: Proxy) -> None:
    """An upgrade whose target refuses the connection: a bare 503, and the client's connection
    closes."""
    proxy.connector.failures.append(ConnectionRefusedError(111, "Connection refused"))
    client = proxy.client()
    client.receive(request("GET", "/ws", WS_HEADERS))
    await proxy.run_callbacks()
    assert client.take().startswith(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n")
    assert client.closing


async def test_upgrade_to_something_else_is_cut(proxy: Proxy) -> None:
    """An upgrade to anything but websocket (or not on a GET) is cut off, as CHP does."""
    client = proxy.client()
    client.receive(request("GET", "/", [("Upgrade", "h2c"), ("Connection", "Upgrade")]))
    assert client.aborted
    assert proxy.connector.attempts == []


async def test_target_half_closes_first(proxy: Proxy) -> None:
    """The target's EOF is passed on as a half-close; the client's own EOF then ends both."""
    client, target = await tunnel(proxy)
    target.eof()
    assert client.eof_written and not client.closing
    assert not target.closing  # half-open: the client may still send
    client.receive(b"last words")
    assert target.take() == b"last words"
    client.eof()
    assert target.eof_written
    await proxy.run_callbacks()
    assert client.lost and target.closing
    assert target.protocol.phase is Phase.CLOSED


async def test_client_half_closes_first(proxy: Proxy) -> None:
    """The client's EOF is passed on as a half-close; the target's EOF then ends both."""
    client, target = await tunnel(proxy)
    client.eof()
    assert target.eof_written and not client.closing
    target.receive(b"reply")
    assert client.take() == b"reply"
    target.eof()
    await proxy.run_callbacks()
    assert client.closing and client.lost
    assert target.protocol.phase is Phase.CLOSED


async def test_target_reset_closes_the_client(proxy: Proxy) -> None:
    """The target's connection is lost: the client's closes too."""
    client, target = await tunnel(proxy)
    target.reset()
    assert client.closing
    await proxy.run_callbacks()
    assert client.lost


async def test_client_reset_closes_the_target(proxy: Proxy) -> None:
    """The client's connection is lost: the target's is aborted."""
    client, target = await tunnel(proxy)
    client.reset()
    assert target.aborted
    await proxy.run_callbacks()
    assert target.protocol.phase is Phase.CLOSED


async def test_tls_client_eof_closes_both(proxy: Proxy) -> None:
    """A TLS client (no half-close) that ends the tunnel: its connection closes, and so does
    the target's."""
    client = proxy.client(can_write_eof=False)
    client.receive(request("GET", "/ws", WS_HEADERS))
    await proxy.run_callbacks()
    [target] = proxy.targets
    target.receive(SWITCHING)
    client.eof()
    assert target.eof_written
    await proxy.run_callbacks()
    assert client.lost and target.closing


async def test_target_eof_to_tls_client_closes_it(proxy: Proxy) -> None:
    """The target's EOF towards a TLS client (no half-close): the client's connection closes,
    and the target's after it."""
    client = proxy.client(can_write_eof=False)
    client.receive(request("GET", "/ws", WS_HEADERS))
    await proxy.run_callbacks()
    [target] = proxy.targets
    target.receive(SWITCHING)
    target.eof()
    assert client.closing and not client.eof_written
    await proxy.run_callbacks()
    assert client.lost and target.closing


async def test_client_eof_to_tls_target_closes_the_client(make_proxy: MakeProxy) -> None:
    """The client's EOF in a tunnel to a TLS target (no half-close): the proxy closes the
    target's connection, and the client's with it."""
    proxy = make_proxy()
    proxy.route("/", "https://target.test:8443")
    client, target = await upgrading(proxy)
    assert not target.half_close
    target.receive(SWITCHING)
    client.eof()
    await proxy.run_callbacks()
    assert target.lost and target.protocol.phase is Phase.CLOSED
    assert client.closing


async def test_tunnel_flow_control(proxy: Proxy) -> None:
    """In a tunnel a full client pauses the target only (the client's own reading goes on:
    its bytes are not answers), and a full target pauses the client."""
    client, target = await tunnel(proxy)
    client.fill()
    assert not target.reading and target.protocol.gate.reasons == CLIENT_FULL
    assert client.reading
    client.drain()
    assert target.reading
    target.fill()
    assert not client.reading and client.protocol.gate.reasons == UPSTREAM_FULL
    target.drain()
    assert client.reading


async def test_upgrade_pipelined_behind_a_get(proxy: Proxy) -> None:
    """An upgrade request read behind a GET waits its turn; what follows it waits for its
    101; the GET's connection is pooled and lent to the upgrade, which then leaves the pool
    for good."""
    client = proxy.client()
    client.receive(request("GET", "/page") + request("GET", "/ws", WS_HEADERS) + b"\x81\x00")
    await proxy.run_callbacks()
    [target] = proxy.targets
    assert target.take() == forwarded("GET", "/page")
    assert not client.reading
    target.receive(response(body=b"page"))
    assert client.take().endswith(b"\r\n\r\npage")
    assert target.take() == forwarded("GET", "/ws", PASSED_ON, websocket=True)
    assert not client.reading  # UPGRADE
    target.receive(SWITCHING)
    assert client.take() == SWITCHING
    assert target.take() == b"\x81\x00"
    assert target.protocol.phase is Phase.TUNNEL and client.reading
    assert proxy.counts() == (0, 0)

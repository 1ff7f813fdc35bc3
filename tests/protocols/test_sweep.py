"""The timeouts, one pass at a time: `ProxyService.sweep_once(now)` with `now` in the future
(docs/limits.md): keep-alive idle, lingering, --headers-timeout, --timeout, --proxy-timeout in
each phase, idle pooled connections; tunnels are left alone."""

from __future__ import annotations

import socket

from hubproxy.proxy.pool import UPSTREAM_IDLE_SECONDS
from hubproxy.proxy.service import LINGER_SECONDS
from hubproxy.proxy.upstream import Phase

from .conftest import MakeProxy
from .fakes import KEEP_ALIVE, Client, Proxy, Target, request, response
from .test_websocket import SWITCHING, WS_HEADERS

HANG_UP = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 19\r\n"
    + KEEP_ALIVE
    + b"\r\nService Unavailable"
)


async def waiting(proxy: Proxy) -> tuple[Client, Target]:
    client = proxy.client()
    client.receive(request())
    await proxy.run_callbacks()
    target = proxy.targets[-1]
    target.take()
    return client, target


async def test_idle_keep_alive_connection_closed(proxy: Proxy) -> None:
    """A client connection idle between requests is closed after the keep-alive timeout
    (5 s), silently; its pooled target connection stays."""
    client, target = await waiting(proxy)
    target.receive(response(body=b""))
    client.take()
    proxy.sweep(4)
    assert not client.closing
    proxy.sweep(6)
    assert client.closing and client.writes == []
    assert target.protocol.phase is Phase.IDLE


async def test_silent_new_connection_closed(proxy: Proxy) -> None:
    """A new connection that sends nothing is closed after the keep-alive timeout."""
    client = proxy.client()
    proxy.sweep(6)
    assert client.closing and client.writes == []


async def test_lingering_closed(make_proxy: MakeProxy) -> None:
    """After an answer sent before its request's body was read, the body is read and dropped
    for LINGER_SECONDS at most (even if it keeps coming), then the connection closes."""
    proxy = make_proxy(keep_alive_timeout=3_600_000)
    proxy.table.route_removed("/")
    client = proxy.client()
    client.receive(request("POST", "/nowhere", [("Content-Length", "100000")]))
    assert client.take().startswith(b"HTTP/1.1 404 ")
    proxy.sweep(LINGER_SECONDS - 1)
    assert not client.closing
    proxy.sweep(LINGER_SECONDS + 1)
    assert client.closing


async def test_no_timeout_by_default_during_an_exchange(proxy: Proxy) -> None:
    """With no --timeout and no --proxy-timeout (CHP's defaults), an exchange under way is
    never timed out, in any phase."""
    client, target = await waiting(proxy)
    proxy.sweep(3600)
    target.receive(b"HTTP/1.1 200 OK\r\n")
    proxy.sweep(3600)
    target.receive(b"Content-Length: 4\r\n\r\nab")
    proxy.sweep(3600)
    target.receive(b"cd")
    assert client.take().endswith(b"\r\n\r\nabcd")
    assert not client.closing


async def test_client_timeout_cuts_without_an_answer(make_proxy: MakeProxy) -> None:
    """--timeout: a client silent that long during an exchange is dropped without an answer,
    as CHP does; its target connection is abandoned."""
    proxy = make_proxy(timeout=10_000)
    client, target = await waiting(proxy)
    proxy.sweep(9)
    assert not client.closing
    proxy.sweep(11)
    assert client.aborted and client.writes == []
    await proxy.run_callbacks()
    assert target.aborted and target.protocol.phase is Phase.CLOSED
    assert proxy.counts() == (0, 0)


async def test_proxy_timeout_waiting_503(make_proxy: MakeProxy) -> None:
    """--proxy-timeout before a byte of the answer: a 503, the target connection abandoned,
    the client's kept."""
    proxy = make_proxy(proxy_timeout=10_000)
    client, target = await waiting(proxy)
    proxy.sweep(9)
    assert client.writes == []
    proxy.sweep(11)
    assert client.take() == HANG_UP
    assert target.aborted and not client.closing
    assert proxy.counts() == (0, 0)


async def test_proxy_timeout_in_head_503(make_proxy: MakeProxy) -> None:
    """--proxy-timeout with half an answer's head: still a 503."""
    proxy = make_proxy(proxy_timeout=10_000)
    client, target = await waiting(proxy)
    target.receive(b"HTTP/1.1 200 OK\r\n")
    proxy.sweep(11)
    assert client.take() == HANG_UP
    assert target.aborted


async def test_proxy_timeout_in_body_cuts(make_proxy: MakeProxy) -> None:
    """--proxy-timeout once the answer began: the client is cut off."""
    proxy = make_proxy(proxy_timeout=10_000)
    client, target = await waiting(proxy)
    target.receive(response(200, [("Content-Length", "10")]) + b"12345")
    client.take()
    proxy.sweep(11)
    assert client.aborted and client.writes == []
    await proxy.run_callbacks()
    assert target.aborted
    assert proxy.counts() == (0, 0)


async def test_proxy_timeout_before_the_101(make_proxy: MakeProxy) -> None:
    """--proxy-timeout on an upgrade still waiting for its 101: a bare 503, and the client's
    connection closes."""
    proxy = make_proxy(proxy_timeout=10_000)
    client = proxy.client()
    client.receive(request("GET", "/ws", WS_HEADERS))
    await proxy.run_callbacks()
    [target] = proxy.targets
    proxy.sweep(11)
    assert client.take() == (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    assert client.closing and target.aborted


async def test_tunnels_are_left_alone(make_proxy: MakeProxy) -> None:
    """A tunnel has no timeouts (TCP keepalive instead, as CHP): a sweep far in the future,
    whatever the options, leaves it open."""
    proxy = make_proxy(timeout=1_000, proxy_timeout=1_000)
    client = proxy.client()
    client.receive(request("GET", "/ws", WS_HEADERS))
    await proxy.run_callbacks()
    [target] = proxy.targets
    target.receive(SWITCHING)
    proxy.sweep(UPSTREAM_IDLE_SECONDS * 100)
    assert not client.closing and not target.closing
    assert target.protocol.phase is Phase.TUNNEL
    keepalive = (socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    assert client.socket.options[keepalive] == target.socket.options[keepalive] == 1


async def test_idle_pooled_connection_closed_after_30s(proxy: Proxy) -> None:
    """A pooled connection unused for UPSTREAM_IDLE_SECONDS is closed, and its empty pool
    forgotten."""
    client, target = await waiting(proxy)
    target.receive(response(body=b""))
    pool = target.protocol.pool
    client.reset()
    proxy.sweep(UPSTREAM_IDLE_SECONDS - 1)
    assert target.protocol.phase is Phase.IDLE
    proxy.sweep(UPSTREAM_IDLE_SECONDS + 1)
    assert target.closing and target.protocol.phase is Phase.CLOSED
    assert proxy.counts() == (0, 0)
    assert proxy.service.pool_for("http://target.test:8080")[1] is not pool


async def test_sweep_far_ahead_in_each_phase(make_proxy: MakeProxy) -> None:
    """One sweep far ahead, with every timeout set, over connections in each phase (IDLE,
    WAITING, WAITING with part of a head, BODY, TUNNEL): each ends as documented, and nothing
    stays lent."""
    proxy = make_proxy(timeout=60_000, proxy_timeout=60_000)
    waiting_client, _ = await waiting(proxy)
    head_client, head = await waiting(proxy)
    head.receive(b"HTTP/1.1 200 OK\r\n")
    body_client, body = await waiting(proxy)
    body.receive(response(200, [("Content-Length", "9")]) + b"1")
    body_client.take()
    tunnel_client = proxy.client()
    tunnel_client.receive(request("GET", "/ws", WS_HEADERS))
    await proxy.run_callbacks()
    tunnel = proxy.targets[-1]
    tunnel.receive(SWITCHING)
    idle_client, idle = await waiting(proxy)  # the others are lent: a connection of its own
    idle.receive(response(body=b""))
    idle_client.take()
    assert idle.protocol.phase is Phase.IDLE
    assert proxy.counts() == (3, 1)
    proxy.sweep(UPSTREAM_IDLE_SECONDS * 100)
    await proxy.run_callbacks()
    # --timeout comes first: every client silent during its exchange is dropped unanswered
    for client in (waiting_client, head_client, body_client):
        assert client.aborted and client.writes == []
    assert idle_client.closing and idle.closing and idle.protocol.phase is Phase.CLOSED
    assert tunnel.protocol.phase is Phase.TUNNEL and not tunnel_client.closing
    assert proxy.counts() == (0, 0)


async def test_closed_connection_whose_client_never_reads_is_aborted(make_proxy: MakeProxy) -> None:
    """A connection closed after its last answer waits for that answer to be written; a client
    that never reads would hold it (and its buffer) for good: LINGER_SECONDS, then cut."""
    proxy = make_proxy(keep_alive_timeout=3_600_000)
    proxy.table.route_removed("/")
    client = proxy.client()
    client.fill_on_write = True  # it reads nothing: our first write fills its buffer
    client.receive(request("GET", "/nowhere", version="1.0"))
    await proxy.run_callbacks()
    assert client.closing and not client.lost  # closing, the 404 still queued
    proxy.sweep(LINGER_SECONDS - 1)
    assert not client.aborted
    proxy.sweep(LINGER_SECONDS + 1)
    await proxy.run_callbacks()
    assert client.aborted and client.lost

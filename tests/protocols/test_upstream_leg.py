"""The upstream leg alone: an `UpstreamConnection` on a fake transport, its client played by a
recorder of the `exchange.ClientSide` calls. The connection's end in each phase asks the client
leg for exactly one thing."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from hubproxy.proxy.exchange import Request
from hubproxy.proxy.pool import Pool
from hubproxy.proxy.target import parse_target
from hubproxy.proxy.upstream import Phase, UpstreamConnection

from .fakes import CLOSE, KEEP_ALIVE, TARGET, FakeTransport, Target, response


@dataclass
class RecordingClient:
    """A `ClientSide` that records what the upstream leg asks of it."""

    sent: list[bytes] = field(default_factory=list)
    calls: list[tuple[str, object]] = field(default_factory=list)

    def send(self, data: bytes, now: float) -> None:
        self.sent.append(data)

    def send_parts(self, parts: list[bytes], now: float) -> None:
        self.sent.append(b"".join(parts))

    def answer_begins(self, request: Request, status: int, keep: bool) -> bytes:
        return KEEP_ALIVE if keep else CLOSE

    def response_done(self, request: Request, status: int) -> None:
        self.calls.append(("response_done", status))

    def response_broken(self, request: Request) -> None:
        self.calls.append(("response_broken", None))

    def upstream_failed(
        self,
        request: Request,
        exc: BaseException | None,
        retryable: bool,
        detail: str | None = None,
    ) -> None:
        self.calls.append(("upstream_failed", retryable))

    def upstream_full(self) -> None:
        self.calls.append(("upstream_full", None))

    def upstream_drained(self) -> None:
        self.calls.append(("upstream_drained", None))

    def tunnel_opened(self, request: Request) -> None:
        self.calls.append(("tunnel_opened", None))

    def peer_eof(self) -> None:
        self.calls.append(("peer_eof", None))

    def tunnel_closed(self) -> None:
        self.calls.append(("tunnel_closed", None))


@dataclass
class Leg:
    pool: Pool
    target: Target
    client: RecordingClient
    request: Request


async def linked(reused: bool = False, websocket: bool = False) -> Leg:
    """A connection lent (WAITING) to a GET from a recording client."""
    pool = Pool(parse_target(TARGET), None)
    conn = UpstreamConnection(pool)
    target = FakeTransport(conn, peername=("target.test", 8080)).connect()
    conn.lend(reused=reused)
    client = RecordingClient()
    request = Request(client, 0.0)
    request.method = b"GET"
    request.complete = True
    request.upgrade = request.websocket = websocket
    request.link(conn)
    return Leg(pool, target, client, request)


SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
RESET = ConnectionResetError(104, "Connection reset by peer")

LENGTH = response(200, [("Content-Length", "5")]) + b"ab"
TO_CLOSE = response(200, length=False) + b"ab"

# how far the answer got, how the connection ends -> the one call the client leg gets
ENDINGS = [
    pytest.param("waiting", b"", None, False, ("upstream_failed", False), id="waiting"),
    pytest.param("waiting", b"", None, True, ("upstream_failed", True), id="waiting-reused"),
    pytest.param("waiting", b"", RESET, True, ("upstream_failed", True), id="reused-reset"),
    pytest.param(
        "waiting", b"HTTP/1.1 200 OK\r\n", None, True, ("upstream_failed", False), id="head"
    ),
    pytest.param("body", LENGTH, None, False, ("response_broken", None), id="body"),
    pytest.param("body", TO_CLOSE, None, False, ("response_done", 200), id="body-to-close"),
    pytest.param(
        "body", TO_CLOSE, RESET, False, ("response_broken", None), id="body-to-close-reset"
    ),
    pytest.param("tunnel", SWITCHING, None, False, ("tunnel_closed", None), id="tunnel"),
    pytest.param("tunnel", SWITCHING, RESET, False, ("tunnel_closed", None), id="tunnel-reset"),
]


@pytest.mark.parametrize(("phase", "received", "exc", "reused", "call"), ENDINGS)
async def test_connection_lost_in_each_phase(
    phase: str, received: bytes, exc: Exception | None, reused: bool, call: tuple[str, object]
) -> None:
    """The target connection lost in each phase: the client leg is told once, the right thing
    (retry only a reused connection that had not begun its answer), and nothing stays lent."""
    leg = await linked(reused=reused, websocket=phase == "tunnel")
    assert leg.target.protocol.phase is Phase.WAITING
    if received:
        leg.target.receive(received)
    assert leg.target.protocol.phase.value == phase
    before = len(leg.client.calls)  # (a tunnel_opened)
    if exc is None:
        leg.target.hang_up()
    else:
        leg.target.reset(exc)
    assert leg.client.calls[before:] == [call]
    assert leg.target.protocol.phase is Phase.CLOSED
    assert leg.pool.lent == 0 and leg.pool.idle == []


async def test_close_delimited_end_sends_the_last_chunk() -> None:
    """A close-delimited body relayed chunked gets its last chunk at the target's close."""
    leg = await linked()
    leg.target.receive(response(200, length=False) + b"ab")
    leg.target.hang_up()
    assert leg.client.sent[-1] == b"0\r\n\r\n"


async def test_write_buffer_calls() -> None:
    """The target connection's write buffer passing its marks is passed on to the client leg
    while a request is linked, and ignored once none is."""
    leg = await linked()
    leg.target.fill()
    leg.target.drain()
    assert leg.client.calls == [("upstream_full", None), ("upstream_drained", None)]
    leg.target.receive(response(204, length=False))
    assert leg.target.protocol.phase is Phase.IDLE
    leg.client.calls.clear()
    leg.target.fill()
    assert leg.client.calls == []


async def test_tunnel_eof_passed_on() -> None:
    """In a tunnel, the target's EOF is the client leg's `peer_eof`, and the transport stays
    half-open (plain TCP)."""
    leg = await linked(websocket=True)
    leg.target.receive(SWITCHING + b"after")
    assert leg.client.calls == [("tunnel_opened", None)]
    assert leg.client.sent == [SWITCHING, b"after"]
    leg.target.eof()
    assert leg.client.calls[-1] == ("peer_eof", None)
    assert not leg.target.closing


async def test_lost_while_idle() -> None:
    """An idle connection lost: no client to tell; it leaves its pool's idle list."""
    leg = await linked()
    leg.target.receive(response(204, length=False))  # given back by the connection itself
    assert leg.pool.idle == [leg.target.protocol]
    leg.target.reset()
    assert leg.client.calls == [("response_done", 204)]
    assert leg.pool.idle == [] and leg.pool.lent == 0

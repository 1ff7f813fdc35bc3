"""Response framing, keep-alive and status lines as tables (hubproxy.proxy.headers, .status),
and the flow-control gate and the upstream phase table in-process (hubproxy.proxy.flow,
.upstream)."""

from __future__ import annotations

import pytest

from hubproxy.proxy.flow import CLIENT_FULL, PIPELINE, UPSTREAM_FULL, ReadGate
from hubproxy.proxy.headers import (
    RELAY_AS_IS,
    RELAY_CHUNKED,
    RELAY_NONE,
    RELAY_TO_CLOSE,
    ResponseFraming,
    is_chunked,
    keep_alive,
    response_framing,
    upgrades_to_websocket,
)
from hubproxy.proxy.status import reason, status_line
from hubproxy.proxy.upstream import LENT, InvalidTransition, Phase

CHUNKED = [(b"Transfer-Encoding", b"chunked")]
GZIP = [(b"Transfer-Encoding", b"gzip")]

# status, headers, Content-Length, HEAD request, HTTP/1.1 client, WebSocket request -> framing
FRAMING = [
    (200, [], b"5", False, True, False, ResponseFraming(RELAY_AS_IS, False, False, True)),
    (200, CHUNKED, None, False, True, False, ResponseFraming(RELAY_CHUNKED, False, False, True)),
    (200, [], None, False, True, False, ResponseFraming(RELAY_CHUNKED, True, False, True)),
    (200, GZIP, None, False, True, False, ResponseFraming(RELAY_CHUNKED, True, False, True)),
    (200, CHUNKED, None, False, False, False, ResponseFraming(RELAY_TO_CLOSE, False, False, False)),
    (200, [], None, False, False, False, ResponseFraming(RELAY_TO_CLOSE, True, False, False)),
    (200, [], b"5", False, False, False, ResponseFraming(RELAY_AS_IS, False, False, True)),
    (200, [], b"5", True, True, False, ResponseFraming(RELAY_NONE, False, True, True)),
    (200, [], b"0", True, True, False, ResponseFraming(RELAY_NONE, False, False, True)),
    (200, CHUNKED, None, True, True, False, ResponseFraming(RELAY_NONE, False, True, True)),
    (204, [], None, False, True, False, ResponseFraming(RELAY_NONE, False, False, True)),
    (304, [], b"10", False, True, False, ResponseFraming(RELAY_NONE, False, False, True)),
    (403, [], b"3", False, True, True, ResponseFraming(RELAY_AS_IS, False, False, False)),
]


@pytest.mark.parametrize(("status", "headers", "length", "head", "http11", "ws", "want"), FRAMING)
def test_response_framing(
    status: int,
    headers: list[tuple[bytes, bytes]],
    length: bytes | None,
    head: bool,
    http11: bool,
    ws: bool,
    want: ResponseFraming,
) -> None:
    assert response_framing(status, headers, length, head, http11, ws) == want


@pytest.mark.parametrize(
    ("headers", "want"),
    [
        (CHUNKED, True),
        ([(b"transfer-encoding", b"gzip, Chunked ")], True),
        ([(b"Transfer-Encoding", b"chunked, gzip")], False),
        ([(b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"gzip")], False),
        ([], False),
    ],
)
def test_is_chunked(headers: list[tuple[bytes, bytes]], want: bool) -> None:
    assert is_chunked(headers) is want


@pytest.mark.parametrize(
    ("http11", "headers", "want"),
    [
        (True, [], True),
        (True, [(b"Connection", b"close")], False),
        (True, [(b"connection", b"Keep-Alive, CLOSE")], False),
        (True, [(b"Connection", b"keep-alive")], True),
        (False, [(b"Connection", b"keep-alive")], False),
        (False, [], False),
    ],
)
def test_keep_alive(http11: bool, headers: list[tuple[bytes, bytes]], want: bool) -> None:
    assert keep_alive(http11, headers) is want


@pytest.mark.parametrize(
    ("headers", "want"),
    [
        ([(b"Upgrade", b"websocket")], True),
        ([(b"upgrade", b" WebSocket ")], True),
        ([(b"Upgrade", b"h2c")], False),
        ([(b"Connection", b"Upgrade")], False),
    ],
)
def test_upgrades_to_websocket(headers: list[tuple[bytes, bytes]], want: bool) -> None:
    assert upgrades_to_websocket(headers) is want


@pytest.mark.parametrize(
    ("status", "phrase", "want"),
    [
        (200, None, b"HTTP/1.1 200 OK\r\n"),
        (503, None, b"HTTP/1.1 503 Service Unavailable\r\n"),
        (431, None, b"HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        (599, None, b"HTTP/1.1 599 Unknown\r\n"),
        (200, b"Fine", b"HTTP/1.1 200 Fine\r\n"),
        (200, b"", b"HTTP/1.1 200 \r\n"),
    ],
)
def test_status_line(status: int, phrase: bytes | None, want: bytes) -> None:
    assert status_line(status, phrase) == want


def test_reason() -> None:
    assert reason(404) == b"Not Found"
    assert reason(799) == b"Unknown"


class GateTransport:
    def __init__(self, closing: bool = False) -> None:
        self.paused = False
        self.calls: list[str] = []
        self.closing = closing

    def pause_reading(self) -> None:
        assert not self.paused, "paused twice"
        self.paused = True
        self.calls.append("pause")

    def resume_reading(self) -> None:
        assert self.paused, "resumed while reading"
        self.paused = False
        self.calls.append("resume")

    def is_closing(self) -> bool:
        return self.closing


def test_the_gate_pauses_on_the_first_reason_and_resumes_on_the_last() -> None:
    gate, transport = ReadGate(), GateTransport()
    gate.attach(transport)  # type: ignore[arg-type]
    gate.pause(PIPELINE)
    gate.pause(CLIENT_FULL)
    gate.pause(PIPELINE)  # again: nothing more
    gate.resume(PIPELINE)
    assert transport.paused
    gate.resume(UPSTREAM_FULL)  # never raised: nothing
    gate.resume(CLIENT_FULL)
    gate.resume(CLIENT_FULL)
    assert transport.calls == ["pause", "resume"]


def test_reasons_raised_before_the_transport_apply_from_the_start() -> None:
    gate, transport = ReadGate(), GateTransport()
    gate.pause(CLIENT_FULL)
    gate.attach(transport)  # type: ignore[arg-type]
    assert transport.paused
    gate.resume(CLIENT_FULL)
    assert not transport.paused


def test_a_closing_transport_is_not_resumed() -> None:
    gate, transport = ReadGate(), GateTransport()
    gate.attach(transport)  # type: ignore[arg-type]
    gate.pause(PIPELINE)
    transport.closing = True
    gate.resume(PIPELINE)
    assert transport.calls == ["pause"] and gate.reasons == 0


# every phase may close; otherwise only these moves (upstream.py's docstring draws them)
MOVES = {
    (Phase.NEW, Phase.WAITING),
    (Phase.IDLE, Phase.WAITING),
    (Phase.WAITING, Phase.BODY),
    (Phase.WAITING, Phase.TUNNEL),
    (Phase.WAITING, Phase.IDLE),
    (Phase.BODY, Phase.DONE),
    (Phase.DONE, Phase.IDLE),
}


@pytest.mark.parametrize("old", list(Phase))
@pytest.mark.parametrize("new", list(Phase))
async def test_the_phase_table(old: Phase, new: Phase) -> None:
    """Each allowed move keeps the pool's counts true (lent: the connection is in a LENT phase;
    idle: it is IDLE, and in the idle list), and a move the table does not allow raises (a
    bug is loud)."""
    from hubproxy.proxy.pool import Pool
    from hubproxy.proxy.target import parse_target
    from hubproxy.proxy.upstream import MEMBER, UpstreamConnection

    pool = Pool(parse_target("http://127.0.0.1:1"), None)
    conn = UpstreamConnection(pool)
    conn.phase = old
    pool.members = 1 if old in MEMBER else 0
    if old is Phase.IDLE:
        pool.idle.append(conn)
    assert pool.lent == (1 if old in LENT else 0)
    allowed = (old, new) in MOVES or (new is Phase.CLOSED and old is not Phase.CLOSED)
    if not allowed:
        with pytest.raises(InvalidTransition):
            conn._enter(new)
        assert conn.phase is old
        return
    if new is Phase.IDLE:  # as Pool.release gives it back
        conn._enter(new)
        pool.idle.append(conn)
    elif old is Phase.IDLE and new is Phase.WAITING:  # as Pool.take lends it
        pool.idle.remove(conn)
        conn._enter(new)
    else:
        conn._enter(new)
    assert conn.phase is new
    assert pool.lent == (1 if new in LENT else 0)
    assert pool.idle == ([conn] if new is Phase.IDLE else [])
    assert pool.unused is (new not in MEMBER)

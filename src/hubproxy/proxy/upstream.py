"""The upstream leg: one Protocol per connection to a target, lent by its `Pool`.

An `UpstreamConnection` answers one request at a time. It parses the response with httptools
and writes it to the client re-framed for the client (the proxy removes `Transfer-Encoding` and
chunks again itself), gathering everything one read produces into a single write. Its life is
a few named phases (`Phase`), changed only by `_enter`, which refuses a transition the table
does not allow and tells the pool when a connection joins it or leaves it:

    NEW ──> WAITING ──> BODY ──> DONE ──> IDLE ──> WAITING ...
              │  ^ └───> TUNNEL                (and from any phase: CLOSED)
              └──┴── IDLE (given back unused)

(As h11's SEND_RESPONSE, WAITING lasts until the answer's head is complete: whether a byte of
it came, which decides a retry, is told by the parser's own counts.)

After a complete response that left the connection reusable it goes back to its pool; anything
else closes it, so a connection whose response was not read to its end is never reused. After
a `101 Switching Protocols` the connection becomes one half of a byte tunnel (WebSocket), but
only when the request asked for that upgrade: a target that answers 101 to anything else would
otherwise take over the client's connection, and the requests that follow on it.

Limits (docs/limits.md): a response head is held to `--max-header-size` bytes and MAX_HEADERS
lines, counted as bytes arrive (as on the client leg); past them, the client gets the answer for
a broken target. A target that sends more than its response (bytes after a response that ends
by its framing) has its connection closed instead of pooled; the client keeps its answer.
"""

from __future__ import annotations

import asyncio
import enum
import re
import socket
import time
from typing import TYPE_CHECKING

import httptools

from hubproxy.proxy.flow import CLIENT_FULL, ReadGate
from hubproxy.proxy.headers import (
    RELAY_CHUNKED,
    RELAY_NONE,
    REWRITE_STATUSES,
    filter_response_headers,
    keep_alive,
    response_framing,
    response_head,
    rewrite_locations,
    upgrades_to_websocket,
)

if TYPE_CHECKING:
    from hubproxy.proxy.exchange import Request
    from hubproxy.proxy.pool import Pool

MAX_HEADERS = 1000  # header lines in a response head (as for requests: see server.py)
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # not allowed in a reason phrase


class Phase(enum.Enum):
    NEW = "new"  # connected, not lent yet
    IDLE = "idle"  # in its pool
    WAITING = "waiting"  # lent: its request goes out, the answer's head comes (any 1xx too)
    BODY = "body"  # the head went to the client; the body follows
    DONE = "done"  # the whole answer is parsed
    TUNNEL = "tunnel"  # after 101: bytes both ways; never back in a pool
    CLOSED = "closed"

    # set below, for `_enter`: a bit per phase, the bits of the phases it may go to, and of
    # those among them that make the connection join its pool or leave it
    bit: int
    allowed: int
    moves_membership: int


_NEXT = {
    Phase.NEW: (Phase.WAITING, Phase.CLOSED),
    Phase.IDLE: (Phase.WAITING, Phase.CLOSED),
    Phase.WAITING: (Phase.BODY, Phase.TUNNEL, Phase.IDLE, Phase.CLOSED),
    Phase.BODY: (Phase.DONE, Phase.CLOSED),
    Phase.DONE: (Phase.IDLE, Phase.CLOSED),
    Phase.TUNNEL: (Phase.CLOSED,),
    Phase.CLOSED: (),
}
LENT = frozenset({Phase.WAITING, Phase.BODY, Phase.DONE})
# a pool's members: lent or idle (its `lent` count is its members less its idle ones)
MEMBER = LENT | {Phase.IDLE}
for _i, _phase in enumerate(Phase):
    _phase.bit = 1 << _i
for _phase, _to in _NEXT.items():
    _phase.allowed = sum(p.bit for p in _to)
    _phase.moves_membership = sum(p.bit for p in _to if (p in MEMBER) != (_phase in MEMBER))

# the hot path reads these as module globals (an Enum's class attribute costs ~90 ns)
NEW, IDLE, WAITING, BODY, DONE, TUNNEL, CLOSED = Phase


class InvalidTransition(RuntimeError):
    """A phase change the table does not allow: a bug of ours, never a peer's doing."""


class BadResponse(Exception):
    """The target's answer cannot be relayed (raised in a parser callback; its message is
    logged)."""


class UpstreamConnection(asyncio.Protocol):
    # slots: read in every callback, and one per idle pooled connection or open tunnel
    __slots__ = (
        "ends_at_close",
        "full",
        "gate",
        "head_bytes",
        "headers",
        "idle_since",
        "keep_alive",
        "last_io",
        "out",
        "parser",
        "phase",
        "pool",
        "reason",
        "relay",
        "request",
        "reused",
        "skip_body",
        "status",
        "transport",
        "unparsed",
    )

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.phase = NEW
        self.transport: asyncio.Transport | None = None
        self.gate = ReadGate()
        self.parser = httptools.HttpResponseParser(self)
        self.reused = False  # it served a request before this one
        self.idle_since = 0.0
        self.last_io = 0.0
        self.request: Request | None = None  # see Request.link
        self.out: list[bytes] = []  # what this read gives the client, written at its end
        # the response under way (reset by `_begin_response`)
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0  # of the response head, whole lines
        self.unparsed = 0  # bytes read since the parser last completed something
        self.relay = RELAY_NONE  # how the body goes to the client (headers.RELAY_*)
        self.ends_at_close = False  # the body ends when the connection does
        self.skip_body = False  # the parser expects a body a HEAD response never has
        self.keep_alive = False  # read while parsing: httptools forgets it once a message ends
        # our writes wait over the transport's high-water mark (pause_writing): whoever is lent
        # this connection next must not read more body for it yet
        self.full = False

    # -- phases ----------------------------------------------------------------------------------

    def _enter(self, phase: Phase) -> None:
        # five moves per request, none of which changes the pool's membership: one bit test
        # to allow a move, one to tell the pool when a connection joins it (a new one lent
        # for the first time) or leaves it (closed, or a tunnel)
        old = self.phase
        bit = phase.bit
        if not old.allowed & bit:
            raise InvalidTransition(f"upstream connection: {old.name} -> {phase.name}")
        self.phase = phase
        if old.moves_membership & bit:
            if old is NEW:
                self.pool.joined()
            else:
                self.pool.left(self, old is IDLE)

    def lend(self, reused: bool) -> None:
        """The pool lends this connection (new, or idle until now): it expects a new answer.
        (The request's `send` stamps `last_io`; the pool has no clock to pass here.)"""
        self._enter(WAITING)
        self.reused = reused
        self.status = 0
        self.reason = b""
        self.headers = []
        self.head_bytes = self.unparsed = 0
        self.relay = RELAY_NONE
        self.ends_at_close = self.skip_body = self.keep_alive = False

    def rest(self) -> None:
        """Back in the pool, idle: reading resumes whatever the last client made us pause for,
        so that a target closing it is noticed."""
        self._enter(IDLE)
        self.idle_since = time.monotonic()
        gate = self.gate
        if gate.reasons & CLIENT_FULL:  # per request, and rarely raised: a call saved
            gate.resume(CLIENT_FULL)

    @property
    def heard_nothing(self) -> bool:
        """No byte of the answer has come (since `lend`): not a status line's first byte (it
        counts in `unparsed` until the head completes), nor a whole 1xx (its `status`)."""
        return not self.unparsed and not self.status

    @property
    def answering(self) -> bool:
        return self.phase is BODY or self.phase is DONE or self.phase is TUNNEL

    # -- lifecycle -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport
        self.gate.attach(self.transport)  # type: ignore[arg-type]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        if self.phase is not CLOSED:
            phase = self.phase
            self._enter(CLOSED)
            if self.transport is not None:
                self.transport.close()
            self._tunnel_ended(phase)

    def abort(self) -> None:
        phase = self.phase
        if phase is not CLOSED:
            self._enter(CLOSED)
        if self.transport is not None:
            self.transport.abort()
        self._tunnel_ended(phase)

    def _tunnel_ended(self, phase: Phase) -> None:
        """A tunnel this side closed (the client's EOF over TLS, a timeout) ends the client's
        side too: connection_lost, which tells it otherwise, returns early once CLOSED."""
        if phase is TUNNEL and self.request is not None:
            self.request.client.tunnel_closed()

    def abandon(self) -> None:
        """The client gives the exchange up (its request went out in part, or the answer
        would be nobody's): close the connection. The request is unlinked by the caller."""
        self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        phase = self.phase
        if phase is CLOSED:
            return
        self._enter(CLOSED)
        request = self.request
        if request is None:
            return  # idle (or lent, and not yet asked anything)
        client = request.client
        if phase is TUNNEL:
            self._tunnel_ended(phase)
            return
        request.unlink()
        if phase is BODY and self.ends_at_close and exc is None:
            # a body delimited by the connection's end has just ended (a reset is no end: the
            # client must not take a cut body for a whole one)
            if self.relay == RELAY_CHUNKED:
                client.send(b"0\r\n\r\n", time.monotonic())
            client.response_done(request, self.status)
        elif phase is BODY or phase is DONE:
            client.response_broken(request)
        else:
            # nothing of the answer came on a reused connection: the target had closed it
            # while it was idle, and the request may go again (the caller decides)
            retryable = self.reused and phase is WAITING and self.heard_nothing
            client.upstream_failed(request, exc, retryable=retryable)

    def eof_received(self) -> bool | None:
        if self.phase is TUNNEL and self.request is not None:
            self.request.client.peer_eof()
            return True if self.pool.ssl_context is None else None  # TLS has no half-close
        return None

    # -- what the client leg asks (exchange.UpstreamSide) -------------------------------------

    def send(self, data: bytes, now: float) -> None:
        transport = self.transport
        if transport is not None and self.phase is not CLOSED:
            transport.write(data)
            self.last_io = now  # writing counts for --proxy-timeout too

    def send_eof(self) -> None:
        transport = self.transport
        if transport is not None and self.phase is not CLOSED:
            if transport.can_write_eof():
                transport.write_eof()
            else:
                self.close()  # TLS has no half-close

    def client_full(self) -> None:
        self.gate.pause(CLIENT_FULL)

    def client_drained(self) -> None:
        self.gate.resume(CLIENT_FULL)

    # -- flow control ----------------------------------------------------------------------------

    def pause_writing(self) -> None:
        self.full = True
        if self.request is not None:
            self.request.client.upstream_full()

    def resume_writing(self) -> None:
        self.full = False
        if self.request is not None:
            self.request.client.upstream_drained()

    # -- reading the response --------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        request = self.request
        if request is None:  # an idle connection has nothing to say; don't trust it again
            self.close()
            return
        # reading here and writing to the client both count against the inactivity timeouts
        self.last_io = now = time.monotonic()
        client = request.client
        phase = self.phase
        if phase is TUNNEL:
            client.send(data, now)
            return
        self.unparsed += len(data)  # reset by the callbacks that show progress
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._flush(now)
            if self.phase is TUNNEL:
                self._open_tunnel(request, data[upgrade.args[0] :], now)
            return
        except httptools.HttpParserError as e:
            self._flush(now)
            if self.phase is DONE:
                # the response is whole; what followed it is not ours to relay, and the
                # connection cannot be trusted with another request
                self.keep_alive = False
                self._complete(request)
                return
            bad = e.__context__
            self._protocol_error(request, bad if isinstance(bad, BadResponse) else e)
            return
        self._flush(now)
        if self.phase is DONE:
            self._complete(request)
        elif self.unparsed > self.pool.max_head:
            self._protocol_error(
                request, BadResponse(f"{self.unparsed} bytes of an unfinished response head")
            )

    def _flush(self, now: float) -> None:
        out = self.out
        if out and self.request is not None:
            self.request.client.send_parts(out, now)
            out.clear()

    def _protocol_error(self, request: Request, exc: Exception) -> None:
        answering = self.answering
        request.unlink()
        self.abort()
        if answering:
            request.client.response_broken(request)
        else:
            request.client.upstream_failed(
                request, exc, retryable=False, detail=f"bad response: {exc}"
            )

    def _complete(self, request: Request) -> None:
        # a refused upgrade closes both sides: the client may have sent tunnel bytes already
        reusable = (
            not self.ends_at_close and request.complete and self.keep_alive and not request.upgrade
        )
        if self.skip_body:
            # the parser still waits for the body a HEAD response never has: start afresh
            self.parser = httptools.HttpResponseParser(self)
        request.unlink()
        if reusable:
            self.pool.release(self)
        else:
            self.close()
        request.client.response_done(request, self.status)

    # httptools callbacks

    def on_status(self, reason: bytes) -> None:
        # llhttp lets control characters through; clients choke (`isalpha`: "OK", at once)
        if not reason.isalpha() and _CONTROL.search(reason) is not None:
            raise BadResponse("control characters in the status line")
        self.reason += reason  # in pieces, when the status line comes in several reads
        self.head_bytes += len(reason)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.phase is not WAITING:
            return  # a trailer: dropped (its bytes are bounded by `unparsed`)
        headers = self.headers
        headers.append((name, value))
        self.head_bytes += len(name) + len(value) + 4
        if len(headers) > MAX_HEADERS or self.head_bytes > self.pool.max_head:
            raise BadResponse(
                f"response head too large ({len(headers)} lines, {self.head_bytes} bytes)"
            )

    def on_headers_complete(self) -> None:
        if self.phase is not WAITING:  # a second response to one request
            raise BadResponse("more than one response to one request")
        self.unparsed = 0
        self.status = status = self.parser.get_status_code()
        request = self.request
        assert request is not None
        if status < 100:  # llhttp reads any three digits
            raise BadResponse(f"status {status}")
        if status < 200 and status != 101:
            self._informational(request, status)
        elif status == 101:
            self._switching_protocols(request)
        else:
            self._final_head(request, status)

    def _informational(self, request: Request, status: int) -> None:
        """100 Continue and friends: relayed (not to HTTP/1.0, which has none: RFC 9110
        §15.2); the final response follows."""
        if request.http11:
            headers, _ = filter_response_headers(self.headers)
            self.out.append(response_head(status, self.reason, headers, b""))
        self.headers = []
        self.reason = b""
        self.head_bytes = 0

    def _switching_protocols(self, request: Request) -> None:
        if not request.websocket:
            # a tunnel the client never asked for would carry its next requests (and their
            # cookies) to this target
            raise BadResponse("101 Switching Protocols to a request that asked for none")
        if not upgrades_to_websocket(self.headers):
            raise BadResponse("101 Switching Protocols without Upgrade: websocket")
        if not self.parser.should_upgrade():  # llhttp switches only with Connection: upgrade
            raise BadResponse("101 Switching Protocols without Connection: upgrade")
        self.out.append(response_head(101, self.reason, self.headers, b""))
        self._enter(TUNNEL)

    def _final_head(self, request: Request, status: int) -> None:
        self._enter(BODY)
        headers, length = filter_response_headers(self.headers)
        rewrite = self.pool.rewrite
        if rewrite is not None and status in REWRITE_STATUSES:
            headers = rewrite_locations(headers, rewrite, self.pool.target, request.host)
        self.relay, self.ends_at_close, skip_body, keep_client = response_framing(
            status, self.headers, length, request.head, request.http11, request.websocket
        )
        extra = request.client.answer_begins(request, status, keep_client)
        if self.relay == RELAY_CHUNKED:
            extra = b"Transfer-Encoding: chunked\r\n" + extra
        self.out.append(response_head(status, self.reason, headers, extra))
        if skip_body:
            # llhttp expects a body (until EOF without a length) and says "not keep-alive"; a
            # HEAD response has none, so it ends here, judged by version and Connection alone
            self.skip_body = True
            self.keep_alive = keep_alive(self.parser.get_http_version() == "1.1", self.headers)
            self._enter(DONE)

    def on_body(self, body: bytes) -> None:
        self.unparsed = 0
        phase = self.phase
        if phase is not BODY:
            if phase is DONE:
                # bytes after a HEAD response's head: more than its response; never reuse it
                self.keep_alive = False
            return  # (a 1xx has no body to relay)
        if self.relay == RELAY_CHUNKED:
            self.out += (b"%x\r\n" % len(body), body, b"\r\n")
        else:
            self.out.append(body)

    def on_message_complete(self) -> None:
        self.unparsed = 0
        if self.phase is not BODY:
            return  # a 1xx ended (its final response follows), or a HEAD's skipped body
        if self.relay == RELAY_CHUNKED:
            self.out.append(b"0\r\n\r\n")
        self.ends_at_close = False
        self.keep_alive = self.parser.should_keep_alive()
        self._enter(DONE)

    # -- tunnel (after 101) ----------------------------------------------------------------------

    def _open_tunnel(self, request: Request, rest: bytes, now: float) -> None:
        sock = self.transport.get_extra_info("socket") if self.transport else None
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        request.client.tunnel_opened(request)
        if rest:
            request.client.send(rest, now)

"""The client leg: one Protocol per client connection, parsing requests with httptools.

Theory of operation. httptools calls us back as it parses; at the end of a request's headers
(`on_headers_complete`) the request is started if nothing else is in flight, otherwise queued
(pipelining: at most MAX_PIPELINED are parsed ahead; the rest of a read waits as bytes in
`held`, and reading pauses until the queue drains). Starting means: route lookup in the
in-memory table, the upstream head built, and an upstream connection taken from the target's
pool (or, rarely, connected in a task). Body chunks are written to the upstream as they are
parsed; chunks that arrive before an upstream is linked wait in `Request.pending`, and reading
pauses meanwhile. The upstream leg writes the
response and calls `response_done`, which starts the next request or leaves the connection idle.

Limits (docs/limits.md). A request head (request line and headers) and a trailer block may hold
at most `--max-header-size` bytes and MAX_HEADERS lines, counted as bytes arrive: `unparsed`
counts the bytes read since the parser last got anywhere (a head or a trailer block completed,
body bytes delivered), so even a header line that never ends costs at most that much, plus one
FEED_SLICE (a larger read is parsed in slices). A head must also arrive within
`--headers-timeout` of its first byte (the sweeper in `hubproxy.proxy` enforces it, and
answers 408).

Flow control (`hubproxy.proxy.flow`): reading from the client pauses while the target
connection's write buffer is full, and while its own write buffer is full (it does not read our
answers); the target connection stops reading while the client's write buffer is full (an
upstream linked meanwhile starts paused). Each leg pauses only its own reading, for reasons
kept by its `ReadGate`.

After an upgrade request nothing more is parsed: what follows it waits in `after_upgrade`, with
reading paused, until the target's `101`; then both connections become a byte tunnel (see
`tunnel_opened`). A refused upgrade closes both.

The target connection is reached through the active request (`Request.link`), and spoken to
only through `exchange.UpstreamSide`; it speaks to this leg through `exchange.ClientSide`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import struct
import time
from bisect import bisect_left
from typing import TYPE_CHECKING

import httptools

from hubproxy.proxy.errors import ErrorBody
from hubproxy.proxy.exchange import BUFFER, STREAM, Request
from hubproxy.proxy.flow import CLIENT_FULL, CONNECTING, PIPELINE, UPGRADE, UPSTREAM_FULL, ReadGate
from hubproxy.proxy.headers import BAD_FRAMING, CHUNKED_BODY, NO_BODY, build_request_head
from hubproxy.proxy.paths import BadPath, decode_path, host_key, split_target
from hubproxy.proxy.pool import Pool, describe_error
from hubproxy.proxy.stats import DURATION_BUCKETS, LOOKUP_SAMPLE_EVERY
from hubproxy.proxy.status import reason, status_line
from hubproxy.proxy.target import TargetError, UnresolvableTarget
from hubproxy.proxy.upstream import UpstreamConnection
from hubproxy.routing import Route

if TYPE_CHECKING:
    from hubproxy.proxy.service import ProxyService

log = logging.getLogger("hubproxy")

# header lines in a head (or a trailer block): each costs ~130 bytes of Python objects, so 1,000
# bound a head's memory to ~200 KiB (Node keeps 2,000 and drops the rest; Apache refuses 101)
MAX_HEADERS = 1000
# a request sent on a reused upstream connection that the target had closed meanwhile is sent
# again only if repeating it is harmless (RFC 9110 §9.2.2)
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
HEALTH_BODY = b'{"status":"OK"}'

# requests parsed ahead of the one being answered; the rest of a read waits unparsed, so a
# client pipelining thousands of tiny requests in one read costs a few KiB, not megabytes
MAX_PIPELINED = 32
# a read larger than this is parsed in slices of it, so that the head limit can stop parsing
# part-way through a read
FEED_SLICE = 16 * 1024
# the shortest request head (`GET / HTTP/1.0` and an empty line): a read shorter than this many
# times the room left in the pipeline cannot complete more heads than there is room for
MIN_HEAD = 18
HEAD_END = b"\r\n\r\n"  # every head ends so (llhttp insists on CRLF)
LOGGED_URL = 1024  # characters of a request-target that go into an error line


class HeadTooLarge(Exception):
    """A request head or trailer block passed --max-header-size or MAX_HEADERS (a 431)."""


_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


class ClientConnection(asyncio.Protocol):
    # Slots, not a dict: its fields are read in every callback, and with 30 of them an
    # instance overflowed CPython's shared-key dict (each carried its own ~800-byte dict,
    # and every attribute access took the slow path)
    __slots__ = (
        "active",
        "after_upgrade",
        "bytes_logged",
        "bytes_received",
        "bytes_sent",
        "client_ip",
        "closed",
        "closed_at",
        "eofs",
        "fresh",
        "gate",
        "head_began",
        "head_bytes",
        "head_lines",
        "held",
        "idle_since",
        "last_io",
        "max_head",
        "parse_held_soon",
        "parser",
        "parsing",
        "queue",
        "service",
        "transport",
        "tunnel",
        "unfinished",
        "unparsed",
        "upgrading",
        "upstream_out",
        "writing_paused",
    )

    def __init__(self, service: ProxyService) -> None:
        self.service = service
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.gate = ReadGate()  # why we are not reading from the client (hubproxy.proxy.flow)
        self.client_ip = b"undefined"
        self.parsing: Request | None = None  # the request httptools is filling in
        self.active: Request | None = None  # the request being answered; its upstream is ours
        self.queue: collections.deque[Request] = collections.deque()
        self.unfinished: Request | None = None  # answered, but its body is still arriving
        self.upstream_out: list[bytes] = []  # body bytes of this read, for the active request
        # the upgrade request that ended HTTP on this connection; until its 101 (and the tunnel)
        # what the client sends after it waits in `after_upgrade`, never reaching the target
        self.upgrading: Request | None = None
        # (made by the first such bytes: most connections never upgrade, and a tunnel needs
        # it no more, for as long as it lasts)
        self.after_upgrade: list[bytes] | None = None
        self.held = b""  # bytes read but not parsed yet (MAX_PIPELINED requests wait)
        self.parse_held_soon = False
        self.writing_paused = False  # the client's write buffer is over its high-water mark
        self.max_head = service.max_head_bytes
        self.head_bytes = 0  # of the current head (or trailer block), whole lines
        self.head_lines = 0
        self.unparsed = 0  # bytes read since the parser last completed something
        self.head_began = 0.0  # when the current head's first byte arrived; 0.0: no head under way
        self.closed = False
        self.closed_at = 0.0  # when close() or abort() was called
        self.fresh = True  # no request has begun yet (a drain lets its first one in)
        self.tunnel = False
        self.eofs = 0
        self.idle_since = time.monotonic()
        self.last_io = self.idle_since
        self.bytes_received = 0  # from the client, everything read (metrics)
        self.bytes_sent = 0  # to the client, everything written (metrics)
        self.bytes_logged = 0  # bytes_sent when the access log last wrote a line

    # -- connection lifecycle --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport
        self.gate.attach(self.transport)  # type: ignore[arg-type]
        self.service.connections.add(self)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.client_ip = str(peer[0]).encode()
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        service = self.service
        service.connections.discard(self)
        service.stats.bytes_received += self.bytes_received
        service.stats.bytes_sent += self.bytes_sent
        self.bytes_received = self.bytes_sent = 0  # counted once, should this be called again
        active = self.active
        if active is not None:
            upstream = active.unlink()
            if upstream is not None:
                upstream.abandon()  # its response was not read to its end: never reuse it

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.closed_at = time.monotonic()
            if self.transport is not None:
                self.transport.close()  # once what is queued is written (the sweeper bounds it)

    def abort(self) -> None:
        """Cut the client off: with a reset, so that it cannot take what it got for a whole
        answer (an HTTP/1.0 client reads a body without a length up to a clean close)."""
        transport = self.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            transport.abort()
        if not self.closed:
            self.closed = True
            self.closed_at = time.monotonic()

    def eof_received(self) -> bool | None:
        upstream = self.active.upstream if self.active is not None else None
        if self.tunnel and upstream is not None:
            upstream.send_eof()
            self.eofs += 1
            assert self.transport is not None
            if self.eofs >= 2 or not self.transport.can_write_eof():  # TLS: no half-close
                return None
            return True
        return None

    # -- flow control ----------------------------------------------------------------------------

    def upstream_full(self) -> None:
        self.gate.pause(UPSTREAM_FULL)

    def upstream_drained(self) -> None:
        self.gate.resume(UPSTREAM_FULL)

    def pause_writing(self) -> None:
        """The client is not reading fast enough: stop reading what would be written to it (the
        upstream's response, and, in HTTP, further requests whose answers would pile up)."""
        self.writing_paused = True
        active = self.active
        if active is not None and active.upstream is not None:
            active.upstream.client_full()
        if not self.tunnel:
            self.gate.pause(CLIENT_FULL)

    def resume_writing(self) -> None:
        self.writing_paused = False
        active = self.active
        if active is not None and active.upstream is not None:
            active.upstream.client_drained()
        self.gate.resume(CLIENT_FULL)
        if self.held:  # what waited for the client to read our own answers
            self._parse_held_later()

    # -- writing ---------------------------------------------------------------------------------

    def send(self, data: bytes, now: float) -> None:
        """The target's bytes, read at `now` (which counts as activity on this leg too)."""
        self.last_io = now
        self._write(data)

    def send_parts(self, parts: list[bytes], now: float) -> None:
        self.last_io = now
        # (written here, not through _write: once per relayed read, one call less counts)
        if parts and not self.closed and self.transport is not None:
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            self.transport.write(data)
            self.bytes_sent += len(data)

    def _write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)
            self.bytes_sent += len(data)

    def connection_header(self, request: Request, keep: bool = True) -> bytes:
        """Keep the connection after `request`'s answer if the request, the answer (`keep`) and
        the proxy (not draining) all allow it; the decision is the request's from now on."""
        if keep and request.keep_alive and not self.service.draining:
            return self.service.keep_alive_header
        request.keep_alive = False
        return b"Connection: close\r\n"

    # -- reading requests ------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.last_io = now = time.monotonic()
        self.bytes_received += len(data)
        if self.tunnel:
            active = self.active
            if active is not None and active.upstream is not None:
                active.upstream.send(data, now)
                if active.route is not None:
                    self.service.table.mark_active(active.route)
            return
        if self.upgrading is not None:  # reading is paused; a TLS record may still come
            self._hold_after_upgrade(data)
            return
        if not self.head_began and self.active is None and self.unfinished is None:
            # bytes between requests start the head clock even if they begin no head (blank
            # lines, which llhttp skips), so that trickling them cannot hold the connection
            self.head_began = now
        # nearly always one call, not two: the read cannot complete more heads than the
        # pipeline has room for (by its length, or by counting its head ends)
        size = len(data)
        room = MAX_PIPELINED - len(self.queue)
        if size <= MIN_HEAD * room or (size <= FEED_SLICE and data.count(HEAD_END) < room):
            self._parse(data)
        else:
            self._parse_all(data)

    def _parse_all(self, data: bytes) -> None:
        """Parse `data` in pieces that cannot complete more heads than the pipeline has room
        for (nor be longer than FEED_SLICE), holding back what MAX_PIPELINED leaves. What the
        pieces give of a body goes to the target in one write, as from one piece."""
        view = memoryview(data)
        start, size = 0, len(data)
        while start < size:
            room = MAX_PIPELINED - len(self.queue)
            if room <= 0 or self.writing_paused:
                # the pipeline is full; or the client does not read what the proxy answered
                # itself (a 404, the health check: those never wait in the queue)
                self.held = data[start:]
                self.gate.pause(PIPELINE)
                break
            end = piece_end(data, start, room)
            if not self._parse(view[start:end] if start or end < size else data, flush=False):
                self._flush_upstream()  # (a no-op unless it stopped with the connection closed)
                if self.upgrading is not None and end < size:
                    self._hold_after_upgrade(data[end:])
                return
            start = end
        self._flush_upstream()

    def _parse(self, data: bytes | memoryview, flush: bool = True) -> bool:
        """Feed the parser; False once parsing has stopped (an upgrade, an error, a close),
        what it gave of a body sent then. Else it is sent unless `flush` is False (the caller
        feeds more of the same read, and sends it all at the end)."""
        # reset by the callbacks that show progress; what is left counts towards the head limit
        self.unparsed += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._flush_upstream()
            # nothing after an upgrade request is HTTP; it waits for the target's 101
            self.upgrading = self.parsing
            self.gate.pause(UPGRADE)
            rest = bytes(data[upgrade.args[0] :])
            if rest:
                self._hold_after_upgrade(rest)
            return False
        except httptools.HttpParserCallbackError as e:
            # raised inside one of our callbacks: an oversized head, or a bug of ours
            self._flush_upstream()
            if isinstance(e.__context__, HeadTooLarge):
                self._bad_request(431, e.__context__)
            else:
                log.error("Uncaught Exception: %s", e.__context__, exc_info=e.__context__)
                self._bad_request(500, e)
            return False
        except httptools.HttpParserError as e:
            self._flush_upstream()
            last = self.parsing
            if last is not None and last.complete and not last.keep_alive:
                # llhttp refuses anything after a request that ends the connection; it is
                # ignored (never forwarded), and that request is answered, then we close
                return False
            self._bad_request(400, e)
            return False
        if self.unparsed > self.max_head:
            self._flush_upstream()
            self._bad_request(431, HeadTooLarge(f"{self.unparsed} bytes of an unfinished head"))
            return False
        if flush:
            self._flush_upstream()
        return not self.closed

    def _hold_after_upgrade(self, data: bytes) -> None:
        if self.after_upgrade is None:
            self.after_upgrade = [data]
        else:
            self.after_upgrade.append(data)

    def _parse_held(self) -> None:
        """Answers have made room in the pipeline: parse what was held back."""
        self.parse_held_soon = False
        if self.closed or not self.held:
            return
        data, self.held = self.held, b""
        self._parse_all(data)
        if not self.held and not self.queue:
            self.gate.resume(PIPELINE)

    def _flush_upstream(self) -> None:
        """Send the target what this read gave of the active request's body."""
        out = self.upstream_out
        if out:
            active = self.active
            upstream = active.upstream if active is not None else None
            if upstream is not None:
                upstream.send(b"".join(out) if len(out) > 1 else out[0], self.last_io)
            out.clear()
        if self.queue:
            self.gate.pause(PIPELINE)

    def _bad_request(self, status: int, exc: BaseException | None) -> None:
        self.head_began = 0.0
        if self.closed:
            return
        active = self.active
        if active is not None:
            upstream = active.upstream
            if (
                self.parsing is not active  # the error is a later request's
                or self.queue
                or (upstream is not None and upstream.answering)
            ):
                # an answer has begun, or others wait before ours: ours cannot come first
                self.abort()
                return
            # the request's own body (or trailers) is bad and no answer has begun: take the
            # request back from its target and answer it ourselves, as CHP does
            if upstream is not None:
                active.unlink()
                upstream.abandon()
            self.active = None
        log.debug("Bad request from %s: %d %s", self.client_ip.decode(), status, exc)
        body = reason(status)
        self._write(
            b"%sContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (status_line(status), len(body), body)
        )
        self.close()

    def head_timed_out(self) -> None:
        """--headers-timeout passed since the current head's first byte (the sweeper's call)."""
        self._bad_request(408, TimeoutError("request head not received in time"))

    def upstream_timed_out(self) -> None:
        """--proxy-timeout passed without a byte to or from the target (the sweeper's call):
        a 503 if its answer has not begun, else the client is cut off."""
        request = self.active
        upstream = request.upstream if request is not None else None
        if request is None or upstream is None:
            raise RuntimeError("no target connection to time out")
        if upstream.answering:
            self.abort()
            return
        request.unlink()
        upstream.abandon()
        self.upstream_failed(request, None, retryable=False, detail="socket hang up")

    def on_message_begin(self) -> None:
        self.fresh = False
        self.parsing = Request(self, self.last_io)
        self.head_bytes = 0
        self.head_lines = 0
        self.head_began = self.last_io

    def on_url(self, url: bytes) -> None:
        request = self.parsing
        assert request is not None
        request.url += url
        self.head_bytes += len(url)
        if self.head_bytes > self.max_head:
            raise HeadTooLarge(f"request line longer than {self.max_head} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self.parsing
        assert request is not None
        self.head_bytes += len(name) + len(value) + 4
        self.head_lines += 1
        if self.head_bytes > self.max_head or self.head_lines > MAX_HEADERS:
            raise HeadTooLarge(f"{self.head_lines} header lines, {self.head_bytes} bytes")
        if not request.headers_done:
            request.headers.append((name, value))
        # else: a trailer, counted above and dropped, as CHP does

    def on_headers_complete(self) -> None:
        request = self.parsing
        assert request is not None
        parser = self.parser
        request.headers_done = True
        self.unparsed = self.head_bytes = self.head_lines = 0  # trailers are counted afresh
        self.head_began = 0.0
        request.method = method = parser.get_method()
        request.head = method == b"HEAD"
        request.http11 = parser.get_http_version() == "1.1"
        request.keep_alive = parser.should_keep_alive()
        request.upgrade = parser.should_upgrade()
        if self.active is None:
            self.start(request)
        else:
            self.queue.append(request)

    def on_body(self, body: bytes) -> None:
        self.unparsed = 0
        request = self.parsing
        assert request is not None
        if request.route is not None:  # CHP counts every body chunk as activity
            self.service.table.mark_active(request.route)
        sink = request.sink
        if sink is STREAM:
            if request.body_kind == CHUNKED_BODY:
                self.upstream_out += (b"%x\r\n" % len(body), body, b"\r\n")
            else:
                self.upstream_out.append(body)
        elif sink is BUFFER:
            if request.pending is None:
                request.pending = [body]
            else:
                request.pending.append(body)
        # else (DROP): answered already; the rest of the body is read and dropped

    def on_message_complete(self) -> None:
        self.unparsed = 0
        request = self.parsing
        assert request is not None
        request.complete = True
        if request is self.unfinished:
            self.unfinished = None
            self._after(request)
            return
        if request.sink is STREAM and request.body_kind == CHUNKED_BODY:
            self.upstream_out.append(b"0\r\n\r\n")

    # -- answering -------------------------------------------------------------------------------

    def start(self, request: Request) -> None:
        """A request's head is complete and it is its turn: answer it."""
        if self.closed:  # answered and closed while httptools was still parsing this read
            return
        self.active = request
        if request.url == b"/_chp_healthz":
            self._send_health(request)
            return
        stats = self.service.stats
        if request.upgrade:
            stats.requests_ws += 1
        else:
            stats.requests_web += 1
        self._forward(request)

    def _forward(self, request: Request, fresh: bool = False) -> None:
        """Route `request`, build its head for the target, and send it there (again, on a
        `fresh` connection, after a stale pooled one)."""
        service = self.service
        found = self._route(request)
        if found is None:
            return  # answered
        route, path, query = found
        request.route = route
        if request.upgrade:
            if not _websocket_acceptable(request):
                self.abort()
                return
            request.websocket = True
        try:
            target, pool = service.pools.pool_for(route.target)
        except TargetError as e:
            self.fail(request, 503 if isinstance(e, UnresolvableTarget) else 500, str(e))
            return
        if target.plain and service.paths_kept:  # nearly every request: one call saved
            path = path + b"?" + query if query else path
        else:
            path = service.upstream_path(path, query, route, target)
        # the head for the target (built here, not in a method of its own: per request)
        head = build_request_head(
            service.forward,
            request.method,
            path,
            request.headers,
            target,
            self.client_ip,
            service.ws_proto if request.websocket else service.proto,
            websocket=request.websocket,
        )
        if (
            head.body >= BAD_FRAMING
            or (head.host is None and request.http11)
            or (request.upgrade and head.body != NO_BODY)
        ):
            # conflicting framing or Host headers, an HTTP/1.1 request without a Host, or an
            # upgrade request with a body (its bytes would be taken for the tunnel's)
            self.active = None
            self._bad_request(400, ValueError("bad Transfer-Encoding or Host headers"))
            return
        request.host = head.host
        request.body_kind = head.body
        if service.debug:
            kind = "WS" if request.websocket else "WEB"
            shown = request.url.partition(b"?")[0].decode("latin-1")
            log.debug("PROXY %s %s to %s", kind, shown, route.target)
        conn = None if fresh else pool.take()
        if conn is not None:
            self._attach(request, conn, head.head)
        else:
            self.gate.pause(CONNECTING)
            service.spawn(self._connect(request, pool, head.head))

    def _route(self, request: Request) -> tuple[Route, bytes, bytes] | None:
        """The route for `request`, and its path and query; None once it has been answered (no
        route, a bad path or a bad Host)."""
        service = self.service
        try:
            path, query = split_target(request.url)
            # (decode_path's own fast path, here: per request, one call saved)
            key = path.decode("latin-1") if b"%" not in path else decode_path(path)
        except BadPath as e:
            self.fail(request, 500, f"URIError: {e}")
            return None
        if service.host_routing:
            hosts = [value for name, value in request.headers if name.lower() == b"host"]
            if len(hosts) > 1 or (not hosts and request.http11):
                # RFC 9112 §3.2; HTTP/1.0 may omit it (CHP then routes to `undefined`)
                self.active = None
                self._bad_request(400, ValueError("no Host header, or more than one"))
                return None
            request.host = hosts[0] if hosts else None
            key = host_key(request.host, key)
        stats = service.stats
        if stats.timing:  # find_target_for_req: one lookup in LOOKUP_SAMPLE_EVERY is timed
            stats.lookups = lookups = stats.lookups + 1
            if lookups % LOOKUP_SAMPLE_EVERY == 1:
                began = time.perf_counter()
                route = service.table.lookup(key)
                stats.observe_lookup(time.perf_counter() - began)
            else:
                route = service.table.lookup(key)
        else:
            route = service.table.lookup(key)
        if route is None:
            self.fail(request, 404, "Not Found")
            return None
        return route, path, query

    async def _connect(self, request: Request, pool: Pool, head: bytes) -> None:
        try:
            # --proxy-timeout covers connecting too: a target that drops SYNs would otherwise
            # hold the request for the kernel's two minutes of retries
            async with asyncio.timeout(self.service.connect_timeout):
                conn = await pool.connect()
        except TimeoutError:
            self.gate.resume(CONNECTING)
            self.upstream_failed(request, None, retryable=False, detail="socket hang up")
            return
        except (OSError, ValueError) as e:
            self.gate.resume(CONNECTING)
            self.upstream_failed(request, e, retryable=False)
            return
        self.gate.resume(CONNECTING)
        if self.closed:  # the client went away (or was cut off) meanwhile
            pool.release(conn)
            return
        self._attach(request, conn, head)

    def _attach(self, request: Request, conn: UpstreamConnection, head: bytes) -> None:
        """Link `conn` to `request` and send it the head, and whatever of the body came."""
        if request is not self.active:
            raise RuntimeError("a target connection for a request that is not being answered")
        now = self.last_io
        request.link(conn)
        if self.writing_paused:  # the client is not reading: nor do we, from its new upstream
            conn.client_full()
        if conn.full:  # a pooled connection whose last request's bytes are still queued
            self.upstream_full()
        if request.upgrade:
            conn.send(head, now)  # what followed the head waits for the 101
            return
        out = [head]
        pending = request.pending
        if pending:
            if request.body_kind == CHUNKED_BODY:
                for chunk in pending:
                    out += (b"%x\r\n" % len(chunk), chunk, b"\r\n")
            else:
                out += pending
            request.pending = None
        if request.complete and request.body_kind == CHUNKED_BODY:
            out.append(b"0\r\n\r\n")
        conn.send(b"".join(out) if len(out) > 1 else head, now)

    def count_response(self, status: int) -> None:
        counts = self.service.stats.requests_proxy
        counts[status] = counts.get(status, 0) + 1

    def answer_begins(self, request: Request, status: int, keep: bool) -> bytes:
        """The target's answer head goes out: counted, and its Connection header (see
        `connection_header`; one call, not two, per relayed answer)."""
        counts = self.service.stats.requests_proxy
        counts[status] = counts.get(status, 0) + 1
        if keep and request.keep_alive and not self.service.draining:
            return self.service.keep_alive_header
        request.keep_alive = False
        return b"Connection: close\r\n"

    def response_done(self, request: Request, status: int) -> None:
        """The upstream's answer to `request` has been written in full."""
        gate = self.gate
        if gate.reasons & UPSTREAM_FULL:  # the target connection is gone: its reason too
            gate.resume(UPSTREAM_FULL)  # (guarded here: this runs per request, and rarely is)
        service = self.service
        route = request.route
        if route is not None and status < 300:
            service.table.mark_active(route)
        stats = service.stats
        if stats.timing:
            # the duration histogram (ProxyStats.observe_duration, inlined: this runs per
            # request); last_io: when the response's last bytes were read (and written on)
            seconds = self.last_io - request.started
            cls = status // 100  # llhttp refuses a status above 999
            stats.duration_buckets[cls][bisect_left(DURATION_BUCKETS, seconds)] += 1
            stats.duration_sums[cls] += seconds
        if service.access_log is not None:
            self._log_access(request, status, self.last_io)
        self._finish(request)

    def _log_access(self, request: Request, status: int, now: float) -> None:
        """One --access-log line; the bytes are those written since the previous line."""
        assert self.service.access_log is not None
        sent = self.bytes_sent - self.bytes_logged
        self.bytes_logged = self.bytes_sent
        route = request.route
        self.service.access_log(
            status,
            request.method,
            request.url,
            now - request.started,
            sent,
            route.target if route is not None else None,
            self.client_ip,
        )

    def _finish(self, request: Request) -> None:
        """`request` has its whole answer: keep the connection for the next one, or close."""
        if request is not self.active:
            raise RuntimeError("an answer finished for a request that is not being answered")
        self.active = None
        if not request.complete:
            # answered before its body was read (an error, the health check, an early answer):
            # read the rest and drop it, so the client can finish sending and read our answer
            # (for LINGER_SECONDS at most, counted from now); closing with bytes unread would
            # have the kernel reset the connection, which can destroy the answer
            self.unfinished = request
            self.idle_since = time.monotonic()
            return
        # _after, inlined: this is every request's way out
        if not request.keep_alive or self.service.draining:
            self.close()
        else:
            self._next()

    def _after(self, request: Request) -> None:
        """`request` is answered and read to its end: close, or go on to the next one."""
        if not request.keep_alive or self.service.draining:
            self.close()
            return
        self._next()

    def _next(self) -> None:
        """The previous exchange is over: start the next pipelined request, or wait idle."""
        if self.queue:
            self.start(self.queue.popleft())
            if not self.queue and not self.held:
                self.gate.resume(PIPELINE)
            self._flush_upstream()
        else:
            self.idle_since = time.monotonic()
            if self.head_began:  # the next head's clock runs from now: we were not reading
                self.head_began = self.idle_since
            if not self.held and self.gate.reasons & PIPELINE:  # per request: a call saved
                self.gate.resume(PIPELINE)
        if self.held:  # (guarded here: per request, and rarely true)
            self._parse_held_later()

    def _parse_held_later(self) -> None:
        """Parse the held bytes soon, if there is room for them now."""
        if self.held and not self.parse_held_soon and len(self.queue) < MAX_PIPELINED:
            # not now: this may run inside a parser callback, and the parser is not re-entrant
            self.parse_held_soon = True
            asyncio.get_running_loop().call_soon(self._parse_held)

    def response_broken(self, request: Request) -> None:
        """The upstream failed after its response began: the client can only be cut off."""
        log.error(
            "%s %s upstream connection lost mid-response",
            request.method.decode(),
            _shown(request.url),
        )
        self.abort()

    def upstream_failed(
        self,
        request: Request,
        exc: BaseException | None,
        retryable: bool,
        detail: str | None = None,
    ) -> None:
        """The upstream failed before its response began (it is unlinked already)."""
        self.gate.resume(UPSTREAM_FULL)
        if self.closed:  # the client went away meanwhile: nobody to answer
            return
        if request is not self.active:
            raise RuntimeError("a target failed a request that is not being answered")
        route = request.route
        if (
            retryable
            and request.body_kind == NO_BODY
            and request.method in IDEMPOTENT
            and route is not None
        ):
            # a kept-alive connection the target had closed meanwhile: one fresh try
            self._forward(request, fresh=True)
            return
        if detail is None:
            try:
                target = self.service.pools.pool_for(route.target)[0] if route else None
            except TargetError:
                target = None
            detail = describe_error(exc, target) if target is not None else str(exc)
        self.fail(request, 503, detail)  # a WebSocket too: logged and counted, as in CHP

    # -- errors and the health check -------------------------------------------------------------

    def fail(self, request: Request, status: int, detail: str) -> None:
        service = self.service
        url = _shown(request.url)
        log.error("%d %s %s %s", status, request.method.decode(), url, detail)
        self.count_response(status)
        if service.stats.timing:
            service.stats.observe_duration(status, time.monotonic() - request.started)
        if request.upgrade:
            self._websocket_error(request, status)
            return
        request.answered_here()
        if service.errors.fetches:
            service.spawn(self._send_fetched_error(request, status))
        else:
            self._send_error(request, status, service.errors.page(status))

    def _websocket_error(self, request: Request, status: int) -> None:
        # CHP sends a bare `HTTP/1.1 503` line; the reason phrase's space is required (RFC 9112
        # §4), and strict clients (Python's websockets) refuse the line without it
        self._write(status_line(status) + b"Content-Length: 0\r\nConnection: close\r\n\r\n")
        if self.service.access_log is not None:
            self._log_access(request, status, time.monotonic())
        self.active = None
        self.close()

    async def _send_fetched_error(self, request: Request, status: int) -> None:
        body = await self.service.errors.fetch(status, request.url)
        if not self.closed:  # the client may have gone while the page was fetched
            self._send_error(request, status, body)

    def _send_error(self, request: Request, status: int, error: ErrorBody) -> None:
        parts = [status_line(status)]
        for name, value in error.headers:
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"Content-Length: %d\r\n" % len(error.body))
        parts.append(self.connection_header(request))
        parts.append(b"\r\n")
        if not request.head:
            parts.append(error.body)
        self._write(b"".join(parts))
        if self.service.access_log is not None:
            self._log_access(request, status, time.monotonic())
        self._finish(request)

    def _send_health(self, request: Request) -> None:
        head = b"%sContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n" % (
            status_line(200),
            len(HEALTH_BODY),
            self.connection_header(request),
        )
        request.answered_here()
        self._write(head if request.head else head + HEALTH_BODY)
        self.bytes_logged = self.bytes_sent  # not in the access log, nor in the next line's bytes
        self._finish(request)

    # -- tunnel ----------------------------------------------------------------------------------

    def tunnel_opened(self, request: Request) -> None:
        """The target accepted the upgrade: from now on, bytes flow unparsed both ways."""
        if request is not self.active or request is not self.upgrading:
            raise RuntimeError("a tunnel for a request that did not ask for one")
        self.tunnel = True
        if self.service.access_log is not None:
            self._log_access(request, 101, self.last_io)
        sock = self.transport.get_extra_info("socket") if self.transport else None
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self.upgrading = None
        after, self.after_upgrade = self.after_upgrade, None
        if after and request.upstream is not None:  # what the client sent after its request
            request.upstream.send(b"".join(after), self.last_io)
        self.gate.resume(PIPELINE | CONNECTING | UPGRADE)

    def peer_eof(self) -> None:
        """The target finished sending: pass the half-close on."""
        if self.transport is not None and not self.closed and not self.transport.can_write_eof():
            self.close()  # TLS has no half-close: close_notify ends both directions
            return
        if self.transport is not None and not self.closed:
            self.transport.write_eof()
        self.eofs += 1
        if self.eofs >= 2:
            self.close()

    def tunnel_closed(self) -> None:
        if self.active is not None:
            self.active.unlink()
        self.close()


def piece_end(data: bytes, start: int, room: int) -> int:
    """Where a piece of `data` from `start` ends so that at most `room` heads complete in it
    (and it is no longer than FEED_SLICE). A head completes only with the last byte of its
    HEAD_END, and one may have begun in bytes parsed before: so the piece may end inside the
    `room`-th HEAD_END from `start`, whose head then completes in the next piece; or, as
    bodies may hold HEAD_ENDs too, after MIN_HEAD * `room` bytes, too few for more heads."""
    limit = min(len(data), start + FEED_SLICE)
    end = start
    for _ in range(room):
        found = data.find(HEAD_END, end, limit)
        if found < 0:
            return limit
        end = found + len(HEAD_END)
    return min(limit, max(end - 1, start + MIN_HEAD * room))  # (end - 1: the next piece's)


def _websocket_acceptable(request: Request) -> bool:
    """A WebSocket upgrade is a GET with `Upgrade: websocket` (else the connection is cut, as
    CHP's upgrade handler does)."""
    if request.method != b"GET":
        return False
    for name, value in request.headers:
        if name.lower() == b"upgrade":
            return value.strip().lower() == b"websocket"
    return False


def _shown(url: bytes) -> str:
    """A request-target as error lines show it: without its query, and cut to LOGGED_URL
    characters (a client must not be able to write 64 KiB lines into the log)."""
    path = url.partition(b"?")[0].decode("latin-1")
    return path if len(path) <= LOGGED_URL else path[:LOGGED_URL] + "..."

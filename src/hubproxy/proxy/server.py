"""The client leg: one Protocol per client connection, parsing requests with httptools.

Theory of operation. httptools calls us back as it parses; at the end of a request's headers
(`on_headers_complete`) the request is started if nothing else is in flight, otherwise queued
(pipelining: at most MAX_PIPELINED are parsed ahead; the rest of a read waits as bytes in
`held`, and reading pauses until the queue drains). Starting means: route lookup in the
in-memory table, the upstream head built, and an upstream connection taken from the target's
pool (or, rarely, connected in a task). Body chunks
are written to the upstream as they are parsed; chunks that arrive before an upstream is
attached wait in `Request.pending`, and reading pauses meanwhile. The upstream leg writes the
response and calls `response_done`, which starts the next request or leaves the connection idle.

Limits (docs/limits.md). A request head (request line and headers) and a trailer block may hold
at most `--max-header-size` bytes and MAX_HEADERS lines, counted as bytes arrive: `unparsed`
counts the bytes read since the parser last got anywhere (a head or a trailer block completed,
body bytes delivered), so even a header line that never ends costs at most that much, plus one
FEED_SLICE (a larger read is parsed in slices). A head must also arrive within
`--headers-timeout` of its first byte (the sweeper in `hubproxy.proxy` enforces it, and
answers 408).

Flow control: reading from the client pauses while the upstream's write buffer is full, and
while its own write buffer is full (it does not read our answers); reading from the upstream
pauses while the client's write buffer is full (`pause_writing`; an upstream attached meanwhile
starts paused). Several reasons can pause reading at once; `_pause`/`_resume` keep them as bits.

After an upgrade request nothing more is parsed: what follows it waits in its `pending`, with
reading paused, until the target's `101`; then both connections become a byte tunnel (see
`become_tunnel`). A refused upgrade closes both.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import time
from bisect import bisect_left
from typing import TYPE_CHECKING

import httptools

from hubproxy.proxy.errors import ErrorBody, reason
from hubproxy.proxy.headers import BAD_FRAMING, CHUNKED_BODY, NO_BODY, build_request_head
from hubproxy.proxy.paths import (
    BadPath,
    decode_path,
    host_key,
    join_paths,
    split_target,
    strip_prefix,
)
from hubproxy.proxy.target import TargetError, UnresolvableTarget
from hubproxy.proxy.upstream import Pool, UpstreamConnection, describe_error
from hubproxy.routing import Route

if TYPE_CHECKING:
    from hubproxy.proxy import ProxyService

log = logging.getLogger("hubproxy")

# header lines in a head (or a trailer block): each costs ~130 bytes of Python objects, so 1,000
# bound a head's memory to ~200 KiB (Node keeps 2,000 and drops the rest; Apache refuses 101)
MAX_HEADERS = 1000
# a request sent on a reused upstream connection that the target had closed meanwhile is sent
# again only if repeating it is harmless (RFC 9110 §9.2.2)
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
LOOKUP_SAMPLE_EVERY = 16  # one route lookup in this many is timed (find_target_for_req)
# request durations: upper bounds (seconds) of the histogram's buckets; a last bucket is +Inf
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
HEALTH_BODY = b'{"status":"OK"}'

# requests parsed ahead of the one being answered; the rest of a read waits unparsed, so a
# client pipelining thousands of tiny requests in one read costs a few KiB, not megabytes
MAX_PIPELINED = 32
# a read larger than this is parsed in slices of it, so that the pipelining limit (and the head
# limit) can stop parsing part-way through a read
FEED_SLICE = 16 * 1024
LOGGED_URL = 1024  # characters of a request-target that go into an error line

# reasons for not reading from the client: requests wait to be answered; an upstream
# connection is being made; the upstream's write buffer is full; the client's own write buffer
# is full (it does not read our answers); an upgrade request waits for its 101
_PIPELINE, _CONNECTING, _UPSTREAM_FULL, _CLIENT_FULL, _UPGRADE = 1, 2, 4, 8, 16


class HeadTooLarge(Exception):
    """A request head or trailer block passed --max-header-size or MAX_HEADERS (a 431)."""


class Request:
    __slots__ = (
        "body_kind",
        "complete",
        "head",
        "headers",
        "headers_done",
        "host",
        "http11",
        "keep_alive",
        "method",
        "pending",
        "route",
        "started",
        "upgrade",
        "url",
        "websocket",
    )

    def __init__(self, started: float) -> None:
        self.started = started  # monotonic time of the read that began it (durations)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.method = b""
        self.http11 = True
        self.keep_alive = True
        self.upgrade = False
        self.websocket = False
        self.head = False
        self.complete = False
        # body chunks parsed before an upstream was attached; None once streaming
        self.pending: list[bytes] | None = []
        self.route: Route | None = None
        self.host: bytes | None = None
        self.body_kind = 0


class ClientConnection(asyncio.Protocol):
    def __init__(self, service: ProxyService) -> None:
        self.service = service
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.client_ip = b"undefined"
        self.parsing: Request | None = None  # the request httptools is filling in
        self.active: Request | None = None  # the request being answered
        self.queue: collections.deque[Request] = collections.deque()
        self.unfinished: Request | None = None  # answered, but its body is still arriving
        self.upstream: UpstreamConnection | None = None
        self.upstream_out: list[bytes] = []
        # the upgrade request that ended HTTP on this connection; until its 101 (and the tunnel)
        # what the client sends after it waits in its `pending`, never reaching the target
        self.upgrading: Request | None = None
        self.held = b""  # bytes read but not parsed yet (MAX_PIPELINED requests wait)
        self.parse_held_soon = False
        self.writing_paused = False  # the client's write buffer is over its high-water mark
        self.max_head = service.max_head_bytes
        self.head_bytes = 0  # of the current head (or trailer block), whole lines
        self.head_lines = 0
        self.unparsed = 0  # bytes read since the parser last completed something
        self.head_began = 0.0  # when the current head's first byte arrived; 0.0: no head under way
        self.paused = 0
        self.closed = False
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
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            # its response was not read to its end: never reuse it
            if not upstream.tunnel:
                upstream.pool.forget()
            upstream.abort()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.closed = True

    def eof_received(self) -> bool | None:
        if self.tunnel and self.upstream is not None:
            self.upstream.write_eof()
            self.eofs += 1
            if self.eofs >= 2 or not self.transport.can_write_eof():  # TLS: no half-close
                return None
            return True
        return None

    # -- flow control ----------------------------------------------------------------------------

    def _pause(self, why: int) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused |= why

    def _resume(self, why: int) -> None:
        if not self.paused & why:
            return
        self.paused &= ~why
        if not self.paused and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def pause_reading_for_upstream(self) -> None:
        self._pause(_UPSTREAM_FULL)

    def resume_reading_for_upstream(self) -> None:
        self._resume(_UPSTREAM_FULL)

    def pause_writing(self) -> None:
        """The client is not reading fast enough: stop reading what would be written to it (the
        upstream's response, and, in HTTP, further requests whose answers would pile up)."""
        self.writing_paused = True
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.pause_reading()
        if not self.tunnel:
            self._pause(_CLIENT_FULL)

    def resume_writing(self) -> None:
        self.writing_paused = False
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None and not upstream.closed:
            upstream.transport.resume_reading()
        self._resume(_CLIENT_FULL)

    # -- writing ---------------------------------------------------------------------------------

    def transport_write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)
            self.bytes_sent += len(data)

    def transport_writelines(self, data: list[bytes]) -> None:
        if not self.closed and self.transport is not None:
            out = data[0] if len(data) == 1 else b"".join(data)
            self.transport.write(out)
            self.bytes_sent += len(out)

    def connection_header(self, request: Request) -> bytes:
        if request.keep_alive and not self.service.draining:
            return self.service.keep_alive_header
        request.keep_alive = False
        return b"Connection: close\r\n"

    # -- reading requests ------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.last_io = time.monotonic()
        self.bytes_received += len(data)
        if self.tunnel:
            upstream = self.upstream
            if upstream is not None:
                upstream.write(data)
                active = self.active
                if active is not None and active.route is not None:
                    self.service.table.mark_active(active.route)
            return
        if self.upgrading is not None:  # reading is paused; a TLS record may still come
            pending = self.upgrading.pending
            if pending is not None:
                pending.append(data)
            return
        if not self.head_began and self.active is None and self.unfinished is None:
            # bytes between requests start the head clock even if they begin no head (blank
            # lines, which llhttp skips), so that trickling them cannot hold the connection
            self.head_began = self.last_io
        if len(data) <= FEED_SLICE and len(self.queue) < MAX_PIPELINED:
            self._parse(data)  # nearly always: one call, not two
        else:
            self._parse_all(data)

    def _parse_all(self, data: bytes) -> None:
        """Parse `data`, in slices if it is large, holding back what MAX_PIPELINED leaves."""
        if len(data) <= FEED_SLICE and len(self.queue) < MAX_PIPELINED:
            self._parse(data)
            return
        view = memoryview(data)
        for start in range(0, len(data), FEED_SLICE):
            if len(self.queue) >= MAX_PIPELINED:
                self.held = data[start:]
                self._pause(_PIPELINE)
                return
            end = start + FEED_SLICE
            if not self._parse(view[start:end]):
                if self.upgrading is not None and end < len(data):
                    self._hold_for_upgrade(data[end:])
                return

    def _parse(self, data: bytes | memoryview) -> bool:
        """Feed the parser; False once parsing has stopped (an upgrade, an error, a close)."""
        # reset by the callbacks that show progress; what is left counts towards the head limit
        self.unparsed += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._flush_upstream()
            # nothing after an upgrade request is HTTP; it waits for the target's 101
            self.upgrading = self.parsing
            self._pause(_UPGRADE)
            self._hold_for_upgrade(bytes(data[upgrade.args[0] :]))
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
            self._bad_request(400, e)
            return False
        self._flush_upstream()
        if self.unparsed > self.max_head:
            self._bad_request(431, HeadTooLarge(f"{self.unparsed} bytes of an unfinished head"))
        return not self.closed

    def _hold_for_upgrade(self, data: bytes) -> None:
        request = self.upgrading
        if data and request is not None and request.pending is not None:
            request.pending.append(data)

    def _parse_held(self) -> None:
        """Answers have made room in the pipeline: parse what was held back."""
        self.parse_held_soon = False
        if self.closed or not self.held:
            return
        data, self.held = self.held, b""
        self._parse_all(data)
        if not self.held and not self.queue:
            self._resume(_PIPELINE)

    def _flush_upstream(self) -> None:
        out = self.upstream_out
        if out:
            upstream = self.upstream
            if upstream is not None and upstream.transport is not None:
                upstream.transport.write(b"".join(out) if len(out) > 1 else out[0])
                upstream.last_io = self.last_io  # writing counts for --proxy-timeout
            out.clear()
        if self.queue:
            self._pause(_PIPELINE)

    def _bad_request(self, status: int, exc: BaseException | None) -> None:
        self.head_began = 0.0
        if self.closed:
            return
        active = self.active
        if active is not None:
            upstream = self.upstream
            if (
                self.parsing is not active  # the error is a later request's
                or self.queue
                or (upstream is not None and upstream.head_sent)
            ):
                # an answer has begun, or others wait before ours: ours cannot come first
                self.abort()
                return
            # the request's own body (or trailers) is bad and no answer has begun: take the
            # request back from its target and answer it ourselves, as CHP does
            if upstream is not None:
                self.upstream = None
                upstream.abandon()
            self.active = None
        log.debug("Bad request from %s: %d %s", self.client_ip.decode(), status, exc)
        body = reason(status)
        self.transport_write(
            b"HTTP/1.1 %d %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (status, body, len(body), body)
        )
        self.close()

    def head_timed_out(self) -> None:
        """--headers-timeout passed since the current head's first byte (the sweeper's call)."""
        self._bad_request(408, TimeoutError("request head not received in time"))

    def on_message_begin(self) -> None:
        self.parsing = Request(self.last_io)
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
        pending = request.pending
        if pending is not None:
            pending.append(body)
        elif request is self.active and self.upstream is not None:
            if request.body_kind == CHUNKED_BODY:
                self.upstream_out += (b"%x\r\n" % len(body), body, b"\r\n")
            else:
                self.upstream_out.append(body)
        # else: the answer was an error; the rest of the body is read and dropped

    def on_message_complete(self) -> None:
        self.unparsed = 0
        request = self.parsing
        assert request is not None
        request.complete = True
        if request is self.unfinished:
            self.unfinished = None
            self._next()
            return
        if request.pending is None and request.body_kind == CHUNKED_BODY and request is self.active:
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
        """Route `request` and send it to its target (again, on a `fresh` connection, after a
        stale pooled one)."""
        service = self.service
        stats = service.stats
        url = request.url
        try:
            path, query = split_target(url)
            key = decode_path(path)
        except BadPath as e:
            self.fail(request, 500, f"URIError: {e}")
            return
        if service.host_routing:
            hosts = [value for name, value in request.headers if name.lower() == b"host"]
            if len(hosts) > 1 or (not hosts and request.http11):
                # RFC 9112 §3.2; HTTP/1.0 may omit it (CHP then routes to `undefined`)
                self.active = None
                self._bad_request(400, ValueError("no Host header, or more than one"))
                return
            request.host = hosts[0] if hosts else None
            key = host_key(request.host, key)
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
            return
        request.route = route
        if request.upgrade:
            if not self._websocket_acceptable(request):
                self.abort()
                return
            request.websocket = True
        try:
            target, pool = service.pool_for(route.target)
        except TargetError as e:
            self.fail(request, 503 if isinstance(e, UnresolvableTarget) else 500, str(e))
            return
        if not service.include_prefix:
            path = strip_prefix(path, service.prefix_depth(route))
        if service.prepend_path:
            if target.path != "/" or target.query:
                path = join_paths(target.path.encode(), target.query.encode(), path, query)
            elif query:
                path = (path or b"/") + b"?" + query
        else:
            path = join_paths(b"/", b"", path, query)
        head = build_request_head(
            service.forward,
            request.method,
            path or b"/",
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
            shown = url.partition(b"?")[0].decode("latin-1")
            log.debug("PROXY %s %s to %s", kind, shown, route.target)
        conn = None if fresh else pool.take()
        if conn is not None:
            self._attach(request, conn, head.head)
        else:
            self._pause(_CONNECTING)
            service.spawn(self._connect(request, pool, head.head))

    def _websocket_acceptable(self, request: Request) -> bool:
        if request.method != b"GET":
            return False
        for name, value in request.headers:
            if name.lower() == b"upgrade":
                return value.strip().lower() == b"websocket"
        return False

    async def _connect(self, request: Request, pool: Pool, head: bytes) -> None:
        try:
            # --proxy-timeout covers connecting too: a target that drops SYNs would otherwise
            # hold the request for the kernel's two minutes of retries
            async with asyncio.timeout(self.service.connect_timeout):
                conn = await pool.connect()
        except TimeoutError:
            self._resume(_CONNECTING)
            self.upstream_failed(request, None, retryable=False, detail="socket hang up")
            return
        except (OSError, ValueError) as e:
            self._resume(_CONNECTING)
            self.upstream_failed(request, e, retryable=False)
            return
        self._resume(_CONNECTING)
        if self.closed or request is not self.active:
            pool.release(conn)
            return
        self._attach(request, conn, head)

    def _attach(self, request: Request, conn: UpstreamConnection, head: bytes) -> None:
        self.upstream = conn
        conn.begin(self, request)
        assert conn.transport is not None
        if self.writing_paused:  # the client is not reading: nor do we, from its new upstream
            conn.transport.pause_reading()
        if request.upgrade:
            conn.transport.write(head)  # what followed the head waits for the 101
            return
        out = [head]
        pending = request.pending or ()
        if request.body_kind == CHUNKED_BODY:
            for chunk in pending:
                out += (b"%x\r\n" % len(chunk), chunk, b"\r\n")
            if request.complete:
                out.append(b"0\r\n\r\n")
        else:
            out += pending
        request.pending = None
        conn.transport.write(b"".join(out) if len(out) > 1 else head)

    def count_response(self, status: int) -> None:
        counts = self.service.stats.requests_proxy
        counts[status] = counts.get(status, 0) + 1

    def response_done(self, request: Request, status: int) -> None:
        """The upstream's answer to `request` has been written in full."""
        self._detach_upstream()
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

    def _detach_upstream(self) -> None:
        """The upstream is done with us: whatever it made us pause for no longer holds."""
        self.upstream = None
        self._resume(_UPSTREAM_FULL)

    def _finish(self, request: Request) -> None:
        if request is not self.active:
            return
        self.active = None
        if not request.keep_alive or self.service.draining:
            self.close()
            return
        if not request.complete:
            # answered before its body was read (an error, the health check, an early answer):
            # read the rest and drop it, so the client can finish sending and read our answer
            # (for LINGER_SECONDS at most, counted from now)
            self.unfinished = request
            self.idle_since = time.monotonic()
            return
        self._next()

    def _next(self) -> None:
        """The previous exchange is over: start the next pipelined request, or wait idle."""
        if self.queue:
            self.start(self.queue.popleft())
            if not self.queue and not self.held:
                self._resume(_PIPELINE)
            self._flush_upstream()
        else:
            self.idle_since = time.monotonic()
            if self.head_began:  # the next head's clock runs from now: we were not reading
                self.head_began = self.idle_since
            if not self.held:
                self._resume(_PIPELINE)
        if self.held and not self.parse_held_soon and len(self.queue) < MAX_PIPELINED:
            # not now: this may run inside a parser callback, and the parser is not re-entrant
            self.parse_held_soon = True
            asyncio.get_running_loop().call_soon(self._parse_held)

    def response_broken(self, request: Request) -> None:
        """The upstream failed after its response began: the client can only be cut off."""
        self.upstream = None
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
        """The upstream failed before its response began."""
        self._detach_upstream()
        if request is not self.active or self.closed:
            return
        route = request.route
        if (
            retryable
            and request.body_kind == NO_BODY
            and request.method in IDEMPOTENT
            and route is not None
        ):
            # a kept-alive connection the target had closed meanwhile: one fresh try
            request.pending = []
            self._forward(request, fresh=True)
            return
        if detail is None:
            try:
                target = self.service.pool_for(route.target)[0] if route else None
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
            self._websocket_error(request, status, detail)
            return
        request.pending = None
        if service.errors.fetches:
            service.spawn(self._send_fetched_error(request, status))
        else:
            self._send_error(request, status, service.errors.page(status))

    def _websocket_error(self, request: Request, status: int, detail: str) -> None:
        # CHP sends a bare `HTTP/1.1 503` line; the reason phrase's space is required (RFC 9112
        # §4), and strict clients (Python's websockets) refuse the line without it
        self.transport_write(
            b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            % (status, reason(status))
        )
        if self.service.access_log is not None:
            self._log_access(request, status, time.monotonic())
        self.active = None
        self.close()

    async def _send_fetched_error(self, request: Request, status: int) -> None:
        body = await self.service.errors.fetch(status, request.url)
        self._send_error(request, status, body)

    def _send_error(self, request: Request, status: int, error: ErrorBody) -> None:
        if self.closed or request is not self.active:
            return
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, reason(status))]
        for name, value in error.headers:
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"Content-Length: %d\r\n" % len(error.body))
        parts.append(self.connection_header(request))
        parts.append(b"\r\n")
        if not request.head:
            parts.append(error.body)
        self.transport_write(b"".join(parts))
        if self.service.access_log is not None:
            self._log_access(request, status, time.monotonic())
        self._finish(request)

    def _send_health(self, request: Request) -> None:
        head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
            % (len(HEALTH_BODY), self.connection_header(request))
        )
        request.pending = None
        self.transport_write(head if request.head else head + HEALTH_BODY)
        self.bytes_logged = self.bytes_sent  # not in the access log, nor in the next line's bytes
        self._finish(request)

    # -- tunnel ----------------------------------------------------------------------------------

    def become_tunnel(self, upstream: UpstreamConnection) -> None:
        """The target accepted the upgrade: from now on, bytes flow unparsed both ways."""
        self.tunnel = True
        self.upstream = upstream
        if self.service.access_log is not None and self.active is not None:
            self._log_access(self.active, 101, self.last_io)
        sock = self.transport.get_extra_info("socket") if self.transport else None
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        request = self.upgrading
        self.upgrading = None
        if request is not None and request.pending:
            upstream.write(b"".join(request.pending))  # what the client sent after its request
        if request is not None:
            request.pending = None
        self._resume(_PIPELINE | _CONNECTING | _UPGRADE)

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
        self.upstream = None
        self.close()


def _shown(url: bytes) -> str:
    """A request-target as error lines show it: without its query, and cut to LOGGED_URL
    characters (a client must not be able to write 64 KiB lines into the log)."""
    path = url.partition(b"?")[0].decode("latin-1")
    return path if len(path) <= LOGGED_URL else path[:LOGGED_URL] + "..."

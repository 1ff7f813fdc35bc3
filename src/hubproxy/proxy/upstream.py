"""The upstream leg: one Protocol per connection to a target, pooled per target.

An `UpstreamConnection` serves one exchange at a time for the `ClientConnection` it is lent to.
It parses the response with httptools and writes it to the client re-framed for the client
(the proxy removes `Transfer-Encoding` and chunks again itself), gathering everything one read
produces into a single write. After a complete response that left the connection reusable it
goes back to its `Pool`; anything else closes it, so a connection whose response was not read
to its end is never reused.

After a `101 Switching Protocols` the connection becomes one half of a byte tunnel (WebSocket),
but only when the request asked for that upgrade: a target that answers 101 to anything else
would otherwise take over the client's connection, and the requests that follow on it.

Limits (docs/limits.md): a response head is held to `--max-header-size` bytes and MAX_HEADERS
lines, counted as bytes arrive (as on the client leg); past them, the client gets the answer for
a broken target. A target that sends more than its response (bytes after a response that ends
by its framing) has its connection closed instead of pooled; the client keeps its answer.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import socket
import ssl
import time
from typing import TYPE_CHECKING

import httptools

from hubproxy.proxy.headers import filter_response_headers, rewrite_location
from hubproxy.proxy.target import Target

if TYPE_CHECKING:
    from hubproxy.proxy.server import ClientConnection, Request

log = logging.getLogger("hubproxy")

MAX_IDLE_PER_TARGET = 256  # Node's keep-alive agent keeps as many free sockets
MAX_HEADERS = 1000  # header lines in a response head (as for requests: see server.py)
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # not allowed in a reason phrase
_REWRITE_STATUSES = frozenset({201, 301, 302, 307, 308})


class BadResponse(Exception):
    """The target's answer cannot be relayed (raised in a parser callback; its message is
    logged)."""


def describe_error(exc: BaseException | None, target: Target) -> str:
    """A one-line error detail in CHP's style (`connect ECONNREFUSED 127.0.0.1:9199`)."""
    where = target.unix_path if target.unix_path is not None else f"{target.host}:{target.port}"
    if isinstance(exc, ssl.SSLCertVerificationError):  # before OSError: its errno is 1 (EPERM)
        return f"{exc.verify_message} {where}"  # "self-signed certificate 127.0.0.1:8443", as Node
    if isinstance(exc, ssl.SSLError):
        return f"TLS {exc.reason or exc} {where}"
    if isinstance(exc, ConnectionRefusedError) or (
        isinstance(exc, OSError) and exc.errno in (errno.ECONNREFUSED, errno.ENOENT)
    ):
        return f"connect {errno.errorcode.get(exc.errno or 0, 'ECONNREFUSED')} {where}"
    if isinstance(exc, OSError) and exc.errno in errno.errorcode:
        return f"{errno.errorcode[exc.errno]} {where}: {exc.strerror}"
    if exc is None:
        return "socket hang up"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class Pool:
    """Idle keep-alive connections to one target, most recently used first."""

    __slots__ = ("idle", "in_use", "loop", "max_head", "ssl_context", "target")

    def __init__(
        self, target: Target, ssl_context: ssl.SSLContext | None, max_head: int = 64 * 1024
    ) -> None:
        self.target = target
        self.max_head = max_head  # a response head's largest size (--max-header-size)
        self.ssl_context = ssl_context
        self.idle: list[UpstreamConnection] = []
        self.in_use = 0
        self.loop = asyncio.get_running_loop()

    @property
    def unused(self) -> bool:
        """Nothing lent, nothing being connected, nothing idle: the pool may be forgotten."""
        return not self.in_use and not self.idle

    def take(self) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                conn.reused = True
                self.in_use += 1
                return conn
        return None

    async def connect(self) -> UpstreamConnection:
        """A new connection, lent to the caller (counted in `in_use` from the first attempt)."""
        target = self.target
        self.in_use += 1
        try:
            if target.unix_path is not None:
                _, conn = await self.loop.create_unix_connection(
                    lambda: UpstreamConnection(self), target.unix_path
                )
            else:
                _, conn = await self.loop.create_connection(
                    lambda: UpstreamConnection(self),
                    target.host,
                    target.port,
                    ssl=self.ssl_context,
                    server_hostname=target.host if self.ssl_context is not None else None,
                )
        except BaseException:
            self.in_use -= 1
            raise
        return conn

    def forget(self) -> None:
        """A lent connection will not come back (it closed, or became a tunnel)."""
        self.in_use -= 1

    def release(self, conn: UpstreamConnection) -> None:
        """A lent connection comes back: pooled if it can serve another request."""
        self.in_use -= 1
        if conn.closed:
            return
        if len(self.idle) >= MAX_IDLE_PER_TARGET:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        # a slow client may have paused its reading; idle, it must notice the target closing
        if conn.transport is not None:
            conn.transport.resume_reading()
        self.idle.append(conn)

    def lost(self, conn: UpstreamConnection) -> None:
        """A connection closed: forget it if it was idle."""
        if conn.client is None and conn in self.idle:
            self.idle.remove(conn)

    def close_idle(self, older_than: float | None = None, now: float | None = None) -> None:
        if now is None:
            now = time.monotonic()
        keep: list[UpstreamConnection] = []
        for conn in self.idle:
            if older_than is None or now - conn.idle_since > older_than:
                conn.close()
            else:
                keep.append(conn)
        self.idle[:] = keep


class UpstreamConnection(asyncio.Protocol):
    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self.last_io = 0.0
        # the exchange in progress
        self.client: ClientConnection | None = None
        self.request: Request | None = None
        self.out: list[bytes] = []
        self._reset_exchange()
        self.tunnel = False

    def _reset_exchange(self) -> None:
        self.got_data = False
        self.headers: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.status = 0
        self.head_sent = False
        self.chunked_out = False
        self.until_close = False  # the response body ends when the upstream closes
        self.informational = False
        self.skip_body = False
        self.keep_alive = False  # read while parsing: httptools forgets it once a message ends
        self.done = False
        self.head_bytes = 0  # of the response head under way, whole lines
        self.unparsed = 0  # bytes read since the parser last completed something

    # -- lifecycle -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def begin(self, client: ClientConnection, request: Request) -> None:
        """Lend this connection to `client` for `request` (whose head the client writes)."""
        self.client = client
        self.request = request
        self.last_io = time.monotonic()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def abandon(self) -> None:
        """The client gives up the exchange before any of the response was relayed: close the
        connection (its request went out in part, or its answer would be nobody's)."""
        self.pool.forget()
        self.abort()

    def abort(self) -> None:
        self.closed = True
        self.client = None
        self.request = None
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        client = self.client
        if client is None:
            self.pool.lost(self)
            return
        if self.tunnel:
            client.tunnel_closed()
            return
        request = self.request
        self.client = None
        self.request = None
        self.pool.forget()
        assert request is not None
        if self.until_close and self.head_sent:
            # a body delimited by the connection's end has just ended
            if self.chunked_out:
                client.transport_write(b"0\r\n\r\n")
            client.response_done(request, self.status)
        elif self.head_sent:
            client.response_broken(request)
        else:
            client.upstream_failed(request, exc, retryable=self.reused and not self.got_data)

    def eof_received(self) -> bool | None:
        if self.tunnel and self.client is not None:
            self.client.peer_eof()
            return True if self.pool.ssl_context is None else None  # TLS has no half-close
        return None

    # -- flow control ----------------------------------------------------------------------------

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.pause_reading_for_upstream()

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.resume_reading_for_upstream()

    # -- reading the response --------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:  # an idle connection has nothing to say; don't trust it again
            self.close()
            return
        # reading here and writing to the client both count against the inactivity timeouts
        self.last_io = client.last_io = time.monotonic()
        if self.tunnel:
            client.transport_write(data)
            return
        self.got_data = True
        self.unparsed += len(data)  # reset by the callbacks that show progress
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._flush(client)
            if self.status == 101:
                self._become_tunnel(client, data[upgrade.args[0] :])
            return
        except httptools.HttpParserError as e:
            self._flush(client)
            if self.done:
                # the response is whole; what followed it is not ours to relay, and the
                # connection cannot be trusted with another request
                self.keep_alive = False
                self._complete(client)
                return
            bad = e.__context__
            self._protocol_error(client, bad if isinstance(bad, BadResponse) else e)
            return
        self._flush(client)
        if self.done:
            self._complete(client)
        elif self.unparsed > self.pool.max_head:
            self._protocol_error(
                client, BadResponse(f"{self.unparsed} bytes of an unfinished response head")
            )

    def _flush(self, client: ClientConnection) -> None:
        out = self.out
        if out:
            client.transport_writelines(out)
            out.clear()

    def _protocol_error(self, client: ClientConnection, exc: Exception) -> None:
        request = self.request
        self.client = None
        self.request = None
        self.pool.forget()
        self.abort()
        assert request is not None
        if self.head_sent:
            client.response_broken(request)
        else:
            client.upstream_failed(request, exc, retryable=False, detail=f"bad response: {exc}")

    def _complete(self, client: ClientConnection) -> None:
        request = self.request
        assert request is not None
        reusable = (
            not self.until_close
            and request.complete
            and request.pending is None
            and self.keep_alive
        )
        if self.skip_body:
            # the parser still waits for the body a HEAD response never has: start afresh
            self.parser = httptools.HttpResponseParser(self)
        status = self.status
        self.client = None
        self.request = None
        self._reset_exchange()
        if reusable:
            self.pool.release(self)
        else:
            self.pool.forget()
            self.close()
        client.response_done(request, status)

    # httptools callbacks

    def on_status(self, reason: bytes) -> None:
        # llhttp lets control characters through; clients choke (`isalpha`: "OK", at once)
        if not reason.isalpha() and _CONTROL.search(reason) is not None:
            raise BadResponse("control characters in the status line")
        self.reason += reason  # in pieces, when the status line comes in several reads
        self.head_bytes += len(reason)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_sent:
            return  # a trailer: dropped (its bytes are bounded by `unparsed`)
        headers = self.headers
        headers.append((name, value))
        self.head_bytes += len(name) + len(value) + 4
        if len(headers) > MAX_HEADERS or self.head_bytes > self.pool.max_head:
            raise BadResponse(
                f"response head too large ({len(headers)} lines, {self.head_bytes} bytes)"
            )

    def on_headers_complete(self) -> None:
        if self.done:  # a second response to one request
            raise BadResponse("more than one response to one request")
        self.unparsed = 0
        status = self.parser.get_status_code()
        self.status = status
        client = self.client
        request = self.request
        assert client is not None and request is not None
        if status < 100:  # llhttp reads any three digits
            raise BadResponse(f"status {status}")
        if status < 200 and status != 101:
            # 100 Continue and friends: relay them (not to HTTP/1.0, which has none: RFC 9110
            # §15.2), then wait for the final response
            self.informational = True
            if request.http11:
                headers, _ = filter_response_headers(self.headers)
                self.out.append(_head(status, self.reason, headers, b""))
            self.headers = []
            self.reason = b""
            self.head_bytes = 0
            return
        if status == 101:
            if not request.websocket:
                # a tunnel the client never asked for would carry its next requests (and
                # their cookies) to this target
                raise BadResponse("101 Switching Protocols to a request that asked for none")
            if not any(
                n.lower() == b"upgrade" and v.strip().lower() == b"websocket"
                for n, v in self.headers
            ):
                raise BadResponse("101 Switching Protocols without Upgrade: websocket")
            self.out.append(_head(status, self.reason, self.headers, b""))
            self.head_sent = True
            return
        self.head_sent = True
        headers, length = filter_response_headers(self.headers)
        rules = client.service
        if rules.rewrite_locations and status in _REWRITE_STATUSES:
            headers = self._rewrite_locations(headers, client, request)
        no_body = request.head or status in (204, 304)
        if no_body:
            framing = b""
            if request.head and (length is None or length != b"0"):
                self.skip_body = True
                # llhttp expects a body (until EOF without a length) and says "not keep-alive";
                # a HEAD response has none, so judge by version and Connection alone
                self.keep_alive = self.parser.get_http_version() == "1.1" and not any(
                    n.lower() == b"connection" and b"close" in v.lower() for n, v in self.headers
                )
                self.done = True
        elif length is not None:
            framing = b""
        elif request.http11:
            framing = b"Transfer-Encoding: chunked\r\n"
            self.chunked_out = True
        else:
            framing = b""
            request.keep_alive = False
        if not no_body and length is None and not _is_chunked(self.headers):
            self.until_close = True
        if request.websocket:  # a refused upgrade: relay the answer, then close both sides
            request.keep_alive = False
        self.out.append(
            _head(status, self.reason, headers, framing + client.connection_header(request))
        )
        client.count_response(status)

    def _rewrite_locations(self, headers, client, request):  # type: ignore[no-untyped-def]
        service = client.service
        host = request.host
        return [
            (
                name,
                rewrite_location(
                    value, self.pool.target, host, service.auto_rewrite, service.protocol_rewrite
                )
                if name.lower() == b"location"
                else value,
            )
            for name, value in headers
        ]

    def on_body(self, body: bytes) -> None:
        self.unparsed = 0
        if self.skip_body:
            # bytes after a HEAD response's head: more than its response; never reuse it
            self.keep_alive = False
            return
        if self.informational:
            return
        if self.chunked_out:
            self.out += (b"%x\r\n" % len(body), body, b"\r\n")
        else:
            self.out.append(body)

    def on_message_complete(self) -> None:
        self.unparsed = 0
        if self.informational:
            self.informational = False
            self.head_sent = False
            return
        if self.chunked_out and not self.skip_body:
            self.out.append(b"0\r\n\r\n")
        self.until_close = False
        self.keep_alive = self.parser.should_keep_alive()
        self.done = True

    # -- tunnel (after 101) ----------------------------------------------------------------------

    def _become_tunnel(self, client: ClientConnection, rest: bytes) -> None:
        self.tunnel = True
        self.pool.forget()  # never returns to the pool
        sock = self.transport.get_extra_info("socket") if self.transport else None
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        client.become_tunnel(self)
        if rest:
            client.transport_write(rest)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def write_eof(self) -> None:
        if self.transport is not None and not self.closed:
            if self.transport.can_write_eof():
                self.transport.write_eof()
            else:
                self.close()  # TLS has no half-close


def _is_chunked(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether the body is chunked: the last coding of the last Transfer-Encoding is `chunked`
    (with any other last coding the body ends when the connection does, RFC 9112 §6.3)."""
    codings = [v for n, v in headers if n.lower() == b"transfer-encoding"]
    return bool(codings) and codings[-1].rpartition(b",")[2].strip().lower() == b"chunked"


def _head(status: int, reason: bytes, headers: list[tuple[bytes, bytes]], extra: bytes) -> bytes:
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts += (extra, b"\r\n")
    return b"".join(parts)

"""The data plane of one process: what the connections of the public listener share (settings,
the route table, pools, numbers, timeouts), and the listener itself.

`app.py` runs one `ProxyService` in its own process (the default), and with --workers N each
worker process runs one (`hubproxy.workers.child`) on its own listening socket.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import Any

from hubproxy.config import Config
from hubproxy.fdlimit import FdWatch
from hubproxy.listen import BACKLOG
from hubproxy.logs import AccessLogWriter
from hubproxy.proxy.errors import ErrorPages
from hubproxy.proxy.headers import ForwardRules, LocationRewrite
from hubproxy.proxy.paths import join_paths, strip_prefix
from hubproxy.proxy.pool import UPSTREAM_IDLE_SECONDS, Pool, Pools
from hubproxy.proxy.server import ClientConnection
from hubproxy.proxy.stats import ProxyStats
from hubproxy.proxy.target import Target
from hubproxy.routing import Route, RouteTable, split_segments
from hubproxy.tls import TLSContexts

log = logging.getLogger("hubproxy")

# --access-log's writer: (status, method, request-target, seconds, bytes sent, route target or
# None, client address); hubproxy.logs.AccessLogWriter is the one
AccessLog = Callable[[int, bytes, bytes, float, int, str | None, bytes], None]

# after an answer sent before its request's body was read (an error, an early answer), the rest
# of the body is read and dropped for this long at most, so that the client reads the answer
# (nginx's lingering_time)
LINGER_SECONDS = 30.0
# a drain waits this long (within the drain time) for the first request of a connection it had
# just accepted: a client sends it right after connecting, so it is on its way
FRESH_SECONDS = 0.5


class ProxyService:
    """Everything the connections of the public listener share, and the listener."""

    def __init__(self, config: Config, table: RouteTable, tls: TLSContexts | None = None) -> None:
        self.config = config
        self.table = table
        self.stats = ProxyStats()
        self.errors = ErrorPages(config)
        self.forward = ForwardRules(config)
        self.host_routing = config.host_routing
        self.include_prefix = config.include_prefix
        self.prepend_path = config.prepend_path
        # the defaults: a request to a `plain` target goes with its own path and query
        self.paths_kept = self.include_prefix and self.prepend_path
        public_tls = bool(config.ssl_key or config.ssl_cert)  # X-Forwarded-Proto
        self.proto = b"https" if public_tls else b"http"
        self.ws_proto = b"wss" if public_tls else b"ws"
        rewrite = None
        if config.auto_rewrite or config.protocol_rewrite:
            protocol = config.protocol_rewrite.encode() if config.protocol_rewrite else None
            rewrite = LocationRewrite(config.auto_rewrite, protocol)
        self.pools = Pools(config, rewrite)
        self.keep_alive_header = b"Connection: keep-alive\r\nKeep-Alive: timeout=%d\r\n" % max(
            1, config.keep_alive_timeout // 1000
        )
        self.max_head_bytes = config.max_header_size
        # --proxy-timeout bounds connecting to a target as well (else: the kernel's retries)
        self.connect_timeout = (config.proxy_timeout or 0) / 1000 or None
        self.debug = log.isEnabledFor(logging.DEBUG)  # checked once: logging calls cost per request
        # --access-log: called with each finished request (see hubproxy.logs.AccessLogWriter)
        self._access_writer = AccessLogWriter(config.log_format) if config.access_log else None
        self.access_log: AccessLog | None = self._access_writer
        self.connections: set[ClientConnection] = set()
        self.fd_watch = FdWatch()
        self.draining = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._server: asyncio.Server | None = None
        self._tls = tls
        if tls is not None and tls.client is not None:  # https targets: now, and after reloads
            self.set_client_ssl(tls.client.current)
            tls.client.on_reload = self.set_client_ssl
        if config.metrics_port is not None or config.metrics_socket:
            self.start_timing()  # request durations and lookup times, for the metrics page

    # -- the listener -----------------------------------------------------------------------------

    async def serve(self, sock: socket.socket) -> None:
        """Accept the public listener's connections on `sock` (bound and listening)."""
        public_tls = self._tls.public if self._tls is not None else None
        # a TLS handshake is the start of a request's head: the same bound (the loop's own
        # default is 60 s whatever the option says)
        handshake_seconds = (self.config.headers_timeout or 60_000) / 1000
        # the loop listens again, with its own backlog (100) unless given ours
        self._server = await asyncio.get_running_loop().create_server(
            self.protocol_factory,
            sock=sock,
            backlog=BACKLOG,
            ssl=public_tls.listening if public_tls is not None else None,
            ssl_handshake_timeout=handshake_seconds if public_tls is not None else None,
        )

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()  # connections carry on while they drain

    async def stop(self, drain_seconds: float, tunnels: bool = False) -> None:
        """Stop accepting, let in-flight requests finish (up to `drain_seconds`), close all.
        With `tunnels`, open WebSockets are waited for too (a hand-over: a successor serves
        new connections meanwhile, so nobody waits on us)."""
        self.stop_accepting()
        await self.drain(drain_seconds, tunnels)
        if self._access_writer is not None:
            self._access_writer.flush()

    # -- used by connections ----------------------------------------------------------------------

    def protocol_factory(self) -> ClientConnection:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        return ClientConnection(self)

    def pool_for(self, target: str) -> tuple[Target, Pool]:
        """A route target parsed, and the pool of connections to its origin (TargetError if
        the target cannot be parsed: a 500 for the request)."""
        return self.pools.pool_for(target)

    def upstream_path(self, path: bytes, query: bytes, route: Route, target: Target) -> bytes:
        """The request-target the target is asked for: the client's path and query, less the
        route's prefix (unless --include-prefix), under the target's own path (--prepend-path)."""
        if not self.include_prefix:
            path = strip_prefix(path, self.prefix_depth(route))
        if self.prepend_path:
            if target.path != "/" or target.query:
                path = join_paths(target.path.encode(), target.query.encode(), path, query)
            elif query:
                path = (path or b"/") + b"?" + query
        else:
            path = join_paths(b"/", b"", path, query)
        return path or b"/"

    def prefix_depth(self, route: Route) -> int:
        depth = len(split_segments(route.prefix))
        return depth - 1 if self.host_routing and depth else depth

    def set_client_ssl(self, context: ssl.SSLContext) -> None:
        """TLS towards https targets and the error target (at start, and after a reload): new
        upstream connections use `context`; pooled ones carry on with theirs."""
        self.pools.set_client_ssl(context)
        self.errors.set_client_ssl(context)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("Uncaught Exception: %s", task.exception(), exc_info=task.exception())

    def _forget_unused_pools(self) -> None:
        self.pools.forget_unused()

    # -- read by the metrics page and the dashboard (hubproxy.metrics.ProxyServiceView) ---------

    async def refresh(self) -> None:
        """Nothing to gather: this process's numbers are current (see workers.WorkerSet)."""

    def start_timing(self) -> None:
        self.stats.timing = True

    def connection_counts(self) -> tuple[int, int]:
        """(open client connections, of which WebSocket tunnels) on the public listener."""
        conns = list(self.connections)
        return len(conns), sum(1 for conn in conns if conn.tunnel)

    def upstream_connections(self) -> tuple[int, int]:
        """(lent to a request or being connected, idle in a pool) connections to targets;
        tunnels not counted."""
        return self.pools.counts()

    def client_bytes(self) -> tuple[int, int]:
        """(received from, sent to) clients of the public listener since the start."""
        received, sent = self.stats.bytes_received, self.stats.bytes_sent
        for conn in self.connections:
            received += conn.bytes_received
            sent += conn.bytes_sent
        return received, sent

    # -- timeouts ---------------------------------------------------------------------------------

    def _sweep_interval(self) -> float:
        config = self.config
        limits = [config.keep_alive_timeout]
        limits += [t for t in (config.timeout, config.proxy_timeout, config.headers_timeout) if t]
        return max(0.05, min(1.0, min(limits) / 1000 / 5))

    async def _sweep(self) -> None:
        """Enforce the idle and inactivity timeouts with one timer for all connections."""
        interval = self._sweep_interval()
        while True:
            await asyncio.sleep(interval)
            self.sweep_once(time.monotonic())

    def sweep_once(self, now: float) -> None:
        """One pass of the timeouts, as at monotonic time `now`."""
        config = self.config
        keep_alive = config.keep_alive_timeout / 1000
        client_timeout = (config.timeout or 0) / 1000
        proxy_timeout = (config.proxy_timeout or 0) / 1000
        headers_timeout = config.headers_timeout / 1000
        tunnels = 0  # each holds a target connection too, no longer in a pool
        for conn in list(self.connections):
            if conn.closed:
                if now - conn.closed_at > LINGER_SECONDS:
                    # closed, and its last answer still unread: a client that never reads
                    # would hold the connection and its buffer for good
                    conn.abort()
                continue
            if conn.tunnel:
                tunnels += 1
                continue
            active = conn.active
            if (
                headers_timeout
                and conn.head_began
                and active is None  # else we may not be reading (flow control)
                and now - conn.head_began > headers_timeout
            ):
                conn.head_timed_out()  # a slow head (slowloris): 408, as Node
                continue
            if active is None:
                if conn.head_began and headers_timeout:
                    continue  # a head under way: its own timeout (above) applies, as in Node
                if now - max(conn.idle_since, conn.last_io) > keep_alive or (
                    conn.unfinished is not None and now - conn.idle_since > LINGER_SECONDS
                ):
                    conn.close()
                continue
            if client_timeout and now - conn.last_io > client_timeout:
                conn.abort()  # CHP drops the client without an answer
                continue
            upstream = active.upstream
            if proxy_timeout and upstream is not None and now - upstream.last_io > proxy_timeout:
                conn.upstream_timed_out()
        self.pools.close_idle(UPSTREAM_IDLE_SECONDS, now)
        self.pools.forget_unused()
        in_use, idle = self.pools.counts()
        self.fd_watch.check(len(self.connections) + tunnels + in_use + idle, now)

    # -- stopping ---------------------------------------------------------------------------------

    async def drain(self, seconds: float, tunnels: bool = False) -> None:
        """Let in-flight requests (and, with `tunnels`, WebSockets) finish (up to `seconds`),
        then close everything."""
        self.draining = True
        started = time.monotonic()
        for conn in list(self.connections):
            if not _busy(conn, tunnels, started):
                conn.close()  # idle between requests: its client retries elsewhere
        deadline = started + seconds
        while any(_busy(c, tunnels, time.monotonic()) for c in self.connections):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in list(self._tasks):
            task.cancel()
        self.pools.close_idle()
        await self.errors.close()


def _busy(conn: ClientConnection, tunnels: bool, now: float) -> bool:
    """Whether a drain waits for `conn`: a request under way (its head arriving, or being
    answered), a connection accepted moments ago whose first request may be in flight (closing
    it would fail a request its client cannot tell was never seen), or, with `tunnels`, a
    WebSocket."""
    if conn.tunnel:
        return tunnels
    if conn.active is not None or conn.head_began:
        return True
    return conn.fresh and now - conn.idle_since < FRESH_SECONDS

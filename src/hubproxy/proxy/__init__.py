"""The data plane: the public listener's protocol, upstream pools, error pages, timeouts."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from bisect import bisect_left
from collections.abc import Callable, Coroutine
from typing import Any

from hubproxy.config import Config
from hubproxy.proxy.errors import ErrorPages
from hubproxy.proxy.headers import ForwardRules
from hubproxy.proxy.server import DURATION_BUCKETS, ClientConnection
from hubproxy.proxy.target import Target, parse_target
from hubproxy.proxy.upstream import Pool
from hubproxy.routing import Route, RouteTable, split_segments
from hubproxy.tls import client_context

log = logging.getLogger("hubproxy")

# --access-log's writer: (status, method, request-target, seconds, bytes sent, route target or
# None, client address); hubproxy.logs.AccessLogWriter is the one
AccessLog = Callable[[int, bytes, bytes, float, int, str | None, bytes], None]

UPSTREAM_IDLE_SECONDS = 30.0  # pooled connections unused this long are closed
# after an answer sent before its request's body was read (an error, an early answer), the rest
# of the body is read and dropped for this long at most, so that the client reads the answer
# (nginx's lingering_time)
LINGER_SECONDS = 30.0


LOOKUP_SAMPLES = 1024  # the newest timed lookups kept for the quantiles


class ProxyStats:
    """Plain numbers the hot path bumps; `hubproxy.metrics` reads them when scraped.

    Always kept: CHP's counters, and bytes (added to per-connection integers, folded in here
    when the connection closes). Kept only while `timing` is on (a metrics listener exists, or
    the dashboard has been opened), as they cost more per request: the request duration
    histogram (a fixed array of buckets per status class) and one timed route lookup in
    LOOKUP_SAMPLE_EVERY (a fixed ring of the newest).
    """

    __slots__ = (
        "bytes_received",
        "bytes_sent",
        "duration_buckets",
        "duration_sums",
        "lookup_ring",
        "lookup_seconds",
        "lookup_timed",
        "lookups",
        "requests_proxy",
        "requests_web",
        "requests_ws",
        "timing",
    )

    def __init__(self) -> None:
        self.timing = False  # see the class's doc
        self.requests_web = 0
        self.requests_ws = 0
        self.requests_proxy: dict[int, int] = {}
        # by status class (status // 100, 0-9): counts per bucket, and the sum of seconds
        self.duration_buckets = [[0] * (len(DURATION_BUCKETS) + 1) for _ in range(10)]
        self.duration_sums = [0.0] * 10
        self.lookups = 0  # route lookups made; one in LOOKUP_SAMPLE_EVERY is timed
        self.lookup_timed = 0
        self.lookup_seconds = 0.0
        self.lookup_ring = [0.0] * LOOKUP_SAMPLES
        # bytes read from / written to clients by connections that have closed
        self.bytes_received = 0
        self.bytes_sent = 0

    def observe_duration(self, status: int, seconds: float) -> None:
        cls = status // 100  # llhttp refuses a status above 999; ours are 4xx and 5xx
        self.duration_buckets[cls][bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.duration_sums[cls] += seconds

    def observe_lookup(self, seconds: float) -> None:
        timed = self.lookup_timed
        self.lookup_ring[timed % LOOKUP_SAMPLES] = seconds
        self.lookup_timed = timed + 1
        self.lookup_seconds += seconds

    # -- across processes (--workers): a worker sends its numbers, the primary adds them up ------

    def counters(self) -> dict[str, Any]:
        """The counters as plain data (lists and dicts copied), for another process."""
        return {
            "requests_web": self.requests_web,
            "requests_ws": self.requests_ws,
            "requests_proxy": dict(self.requests_proxy),
            "duration_buckets": [list(b) for b in self.duration_buckets],
            "duration_sums": list(self.duration_sums),
            "lookups": self.lookups,
            "lookup_timed": self.lookup_timed,
            "lookup_seconds": self.lookup_seconds,
            "lookup_ring": self.lookup_ring[: min(self.lookup_timed, LOOKUP_SAMPLES)],
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
        }

    def add(self, counters: dict[str, Any]) -> None:
        """Add another process's `counters()` to these (the lookup samples are pooled)."""
        self.requests_web += counters["requests_web"]
        self.requests_ws += counters["requests_ws"]
        for status, n in counters["requests_proxy"].items():
            self.requests_proxy[status] = self.requests_proxy.get(status, 0) + n
        for mine, theirs in zip(self.duration_buckets, counters["duration_buckets"], strict=True):
            for i, n in enumerate(theirs):
                mine[i] += n
        for cls, seconds in enumerate(counters["duration_sums"]):
            self.duration_sums[cls] += seconds
        self.lookups += counters["lookups"]
        # quantiles are read over lookup_ring[:min(lookup_timed, len(lookup_ring))]: keep the
        # pooled samples at the front and the ring as long as the samples
        pooled = self.lookup_ring[: min(self.lookup_timed, len(self.lookup_ring))]
        self.lookup_ring = pooled + list(counters["lookup_ring"])
        self.lookup_timed += counters["lookup_timed"]
        self.lookup_seconds += counters["lookup_seconds"]
        self.bytes_received += counters["bytes_received"]
        self.bytes_sent += counters["bytes_sent"]


class ProxyService:
    """Everything the connections of the public listener share."""

    def __init__(self, config: Config, table: RouteTable) -> None:
        self.config = config
        self.table = table
        self.stats = ProxyStats()
        self.errors = ErrorPages(config)
        self.forward = ForwardRules(config)
        self.host_routing = config.host_routing
        self.include_prefix = config.include_prefix
        self.prepend_path = config.prepend_path
        public_tls = bool(config.ssl_key or config.ssl_cert)  # X-Forwarded-Proto
        self.proto = b"https" if public_tls else b"http"
        self.ws_proto = b"wss" if public_tls else b"ws"
        self.client_ssl: ssl.SSLContext | None = None  # for https targets; see set_client_ssl
        self.auto_rewrite = config.auto_rewrite
        self.protocol_rewrite = (
            config.protocol_rewrite.encode() if config.protocol_rewrite else None
        )
        self.rewrite_locations = bool(config.auto_rewrite or config.protocol_rewrite)
        self.keep_alive_header = b"Connection: keep-alive\r\nKeep-Alive: timeout=%d\r\n" % max(
            1, config.keep_alive_timeout // 1000
        )
        self.max_head_bytes = config.max_header_size
        # --proxy-timeout bounds connecting to a target as well (else: the kernel's retries)
        self.connect_timeout = (config.proxy_timeout or 0) / 1000 or None
        self.debug = log.isEnabledFor(logging.DEBUG)  # checked once: logging calls cost per request
        # --access-log: called with each finished request (see hubproxy.logs.AccessLogWriter)
        self.access_log: AccessLog | None = None
        self.connections: set[ClientConnection] = set()
        self.draining = False
        # one pool per origin (scheme, host, port or socket); `_targets` caches each route
        # target's parse and its pool, and forgets both with the pool (see _sweep)
        self._pools: dict[tuple[str, str, int, str | None], Pool] = {}
        self._targets: dict[str, tuple[Target, Pool]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    # -- used by connections ----------------------------------------------------------------------

    def protocol_factory(self) -> ClientConnection:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        return ClientConnection(self)

    def pool_for(self, target: str) -> tuple[Target, Pool]:
        """A route target parsed, and the pool of connections to its origin."""
        found = self._targets.get(target)
        if found is not None:
            return found
        parsed = parse_target(target)  # TargetError propagates: a 500 for this request
        pool = self._pools.get(parsed.pool_key)
        if pool is None:
            ssl_context = None
            if parsed.scheme == "https":
                if self.client_ssl is None:  # no client TLS options: the system's CAs, built once
                    self.client_ssl = client_context(self.config)
                ssl_context = self.client_ssl
            pool = self._pools[parsed.pool_key] = Pool(parsed, ssl_context, self.max_head_bytes)
        found = self._targets[target] = (parsed, pool)
        return found

    def _forget_unused_pools(self) -> None:
        """Drop the pools with nothing in them, and the cached targets that lead to them: a
        hub that starts each server on a new port would otherwise keep a pool per server."""
        unused = [key for key, pool in self._pools.items() if pool.unused]
        if not unused:
            return
        for key in unused:
            del self._pools[key]
        self._targets = {t: found for t, found in self._targets.items() if not found[1].unused}

    def set_client_ssl(self, context: ssl.SSLContext) -> None:
        """TLS towards https targets and the error target (at start, and after a reload): new
        upstream connections use `context`; pooled ones carry on with theirs."""
        self.client_ssl = context
        self.errors.set_client_ssl(context)
        for pool in self._pools.values():
            if pool.ssl_context is not None:
                pool.ssl_context = context

    def prefix_depth(self, route: Route) -> int:
        depth = len(split_segments(route.prefix))
        return depth - 1 if self.host_routing and depth else depth

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("Uncaught Exception: %s", task.exception(), exc_info=task.exception())

    # -- read by the metrics page and the dashboard (hubproxy.metrics.DataPlaneView) ------------

    async def refresh(self) -> None:
        """Nothing to gather: this process's numbers are current (see workers.WorkerSet)."""

    def start_timing(self) -> None:
        self.stats.timing = True

    def connection_counts(self) -> tuple[int, int]:
        """(open client connections, of which WebSocket tunnels) on the public listener."""
        conns = list(self.connections)
        return len(conns), sum(1 for conn in conns if conn.tunnel)

    def upstream_connections(self) -> tuple[int, int]:
        """(lent to a request, idle in a pool) connections to targets; tunnels not counted."""
        in_use = idle = 0
        for pool in self._pools.values():
            in_use += pool.in_use
            idle += len(pool.idle)
        return in_use, idle

    def client_bytes(self) -> tuple[int, int]:
        """(received from, sent to) clients of the public listener since the start."""
        received, sent = self.stats.bytes_received, self.stats.bytes_sent
        for conn in self.connections:
            received += conn.bytes_received
            sent += conn.bytes_sent
        return received, sent

    # -- timeouts ---------------------------------------------------------------------------------

    def _sweep_interval(self) -> float:
        limits = [self.config.keep_alive_timeout]
        if self.config.timeout:
            limits.append(self.config.timeout)
        if self.config.proxy_timeout:
            limits.append(self.config.proxy_timeout)
        if self.config.headers_timeout:
            limits.append(self.config.headers_timeout)
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
        for conn in list(self.connections):
            if conn.tunnel:
                continue
            if (
                headers_timeout
                and conn.head_began
                and conn.active is None  # else we may not be reading (flow control)
                and now - conn.head_began > headers_timeout
            ):
                conn.head_timed_out()  # a slow head (slowloris): 408, as Node
                continue
            if conn.active is None:
                if now - max(conn.idle_since, conn.last_io) > keep_alive or (
                    conn.unfinished is not None and now - conn.idle_since > LINGER_SECONDS
                ):
                    conn.close()
                continue
            if client_timeout and now - conn.last_io > client_timeout:
                conn.abort()  # CHP drops the client without an answer
                continue
            upstream = conn.upstream
            if proxy_timeout and upstream is not None and now - upstream.last_io > proxy_timeout:
                if upstream.head_sent:
                    conn.abort()
                else:
                    request = conn.active
                    upstream.abandon()
                    conn.upstream_failed(request, None, retryable=False, detail="socket hang up")
        for pool in self._pools.values():
            if pool.idle:
                pool.close_idle(UPSTREAM_IDLE_SECONDS, now)
        self._forget_unused_pools()

    # -- stopping ---------------------------------------------------------------------------------

    async def drain(self, seconds: float) -> None:
        """Let in-flight requests finish (up to `seconds`), then close everything."""
        self.draining = True
        for conn in list(self.connections):
            if conn.active is None and not conn.tunnel:
                conn.close()
        deadline = time.monotonic() + seconds
        while any(c.active is not None and not c.tunnel for c in self.connections):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in list(self._tasks):
            task.cancel()
        for pool in self._pools.values():
            pool.close_idle()
        await self.errors.close()

"""Connections to targets, one `Pool` per origin, kept by `Pools`.

A pool lends connections (`take` an idle one, or `connect` a new one), gets them back
(`release`), and forgets the ones that close or become tunnels. Its members are the connections
lent or idle; they join and leave only when a connection changes phase (`UpstreamConnection`
calls `joined` and `left` from its one transition method), and the lent count is derived (the
members less the idle ones), so the gauges cannot drift whichever way an exchange ends, and a
request that reuses a connection changes no count at all.
"""

from __future__ import annotations

import asyncio
import errno
import ssl
import time

from hubproxy.config import Config
from hubproxy.proxy.headers import LocationRewrite
from hubproxy.proxy.target import Target, parse_target
from hubproxy.proxy.upstream import CLOSED, UpstreamConnection
from hubproxy.tls import client_context

MAX_IDLE_PER_TARGET = 256  # Node's keep-alive agent keeps as many free sockets
UPSTREAM_IDLE_SECONDS = 30.0  # pooled connections unused this long are closed

PoolKey = tuple[str, str, int, str | None]


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
    if isinstance(exc, OSError) and exc.errno is not None and exc.errno in errno.errorcode:
        return f"{errno.errorcode[exc.errno]} {where}: {exc.strerror}"
    if exc is None:
        return "socket hang up"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class Pool:
    """Connections to one origin: the idle ones (most recently used last), and counts of those
    lent and being connected."""

    __slots__ = (
        "connecting",
        "idle",
        "loop",
        "max_head",
        "members",
        "rewrite",
        "ssl_context",
        "target",
    )

    def __init__(
        self,
        target: Target,
        ssl_context: ssl.SSLContext | None,
        max_head: int = 64 * 1024,
        rewrite: LocationRewrite | None = None,
    ) -> None:
        self.target = target
        self.max_head = max_head  # a response head's largest size (--max-header-size)
        self.ssl_context = ssl_context
        self.rewrite = rewrite  # Location rewriting (--auto-rewrite, --protocol-rewrite)
        self.idle: list[UpstreamConnection] = []
        self.members = 0  # connections lent or idle (phases in upstream.MEMBER)
        self.connecting = 0  # connections being made
        self.loop = asyncio.get_running_loop()

    @property
    def lent(self) -> int:
        """Connections serving an exchange (phases in upstream.LENT)."""
        return self.members - len(self.idle)

    @property
    def in_use(self) -> int:
        """Lent or being connected: what the metrics call in use."""
        return self.lent + self.connecting

    @property
    def unused(self) -> bool:
        """Nothing lent, nothing being connected, nothing idle: the pool may be forgotten."""
        return not self.members and not self.connecting

    # -- lending and giving back -------------------------------------------------------------------

    def take(self) -> UpstreamConnection | None:
        """An idle connection, lent to the caller; None if there is none."""
        idle = self.idle
        if not idle:
            return None
        conn = idle.pop()
        conn.lend(reused=True)
        return conn

    async def connect(self) -> UpstreamConnection:
        """A new connection, lent to the caller."""
        target = self.target
        self.connecting += 1
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
        finally:
            self.connecting -= 1
        if conn.phase is CLOSED:  # the target spoke (a banner) or hung up before it was asked
            raise ConnectionResetError(errno.ECONNRESET, "closed before a request was sent")
        conn.lend(reused=False)
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """A lent connection comes back: kept idle if it can serve another request."""
        if conn.phase is CLOSED:  # a module global: an Enum's class attribute costs ~70 ns
            return
        if len(self.idle) >= MAX_IDLE_PER_TARGET:
            conn.close()
            return
        conn.rest()
        self.idle.append(conn)

    # -- membership: called by UpstreamConnection._enter, and only there ---------------------------

    def joined(self) -> None:
        """A new connection is lent for the first time."""
        self.members += 1

    def left(self, conn: UpstreamConnection, was_idle: bool) -> None:
        """A connection closed, or became a tunnel (no longer ours to lend)."""
        self.members -= 1
        if was_idle:
            self.idle.remove(conn)

    # -- idle connections --------------------------------------------------------------------------

    def close_idle(self, older_than: float | None = None, now: float | None = None) -> None:
        """Close the idle connections (those idle longer than `older_than` seconds)."""
        if now is None:
            now = time.monotonic()
        for conn in list(self.idle):
            if older_than is None or now - conn.idle_since > older_than:
                conn.close()


class Pools:
    """One `Pool` per origin (scheme, host, port or socket), and each route target's parse.

    A pool with nothing in it is forgotten, with the targets that lead to it: a hub that starts
    each server on a new port would otherwise keep a pool per server it ever started.
    """

    def __init__(self, config: Config, rewrite: LocationRewrite | None) -> None:
        self.config = config
        self.max_head = config.max_header_size
        self.rewrite = rewrite
        self.client_ssl: ssl.SSLContext | None = None  # for https targets; see set_client_ssl
        self._pools: dict[PoolKey, Pool] = {}
        self._targets: dict[str, tuple[Target, Pool]] = {}

    def pool_for(self, target: str) -> tuple[Target, Pool]:
        """A route target parsed, and the pool of connections to its origin (TargetError if
        the target cannot be parsed)."""
        found = self._targets.get(target)
        if found is not None:
            return found
        parsed = parse_target(target)
        pool = self._pools.get(parsed.pool_key)
        if pool is None:
            ssl_context = None
            if parsed.scheme == "https":
                if self.client_ssl is None:  # no client TLS options: the system's CAs, built once
                    self.client_ssl = client_context(self.config)
                ssl_context = self.client_ssl
            pool = Pool(parsed, ssl_context, self.max_head, self.rewrite)
            self._pools[parsed.pool_key] = pool
        found = self._targets[target] = (parsed, pool)
        return found

    def forget_unused(self) -> None:
        """Drop the pools with nothing in them, and the cached targets that lead to them."""
        unused = [key for key, pool in self._pools.items() if pool.unused]
        if not unused:
            return
        for key in unused:
            del self._pools[key]
        self._targets = {t: found for t, found in self._targets.items() if not found[1].unused}

    def set_client_ssl(self, context: ssl.SSLContext) -> None:
        """New connections to https targets use `context`; pooled ones carry on with theirs."""
        self.client_ssl = context
        for pool in self._pools.values():
            if pool.ssl_context is not None:
                pool.ssl_context = context

    def close_idle(self, older_than: float | None = None, now: float | None = None) -> None:
        for pool in self._pools.values():
            if pool.idle:
                pool.close_idle(older_than, now)

    def counts(self) -> tuple[int, int]:
        """(lent or being connected, idle) connections, over all pools."""
        in_use = idle = 0
        for pool in self._pools.values():
            in_use += pool.in_use
            idle += len(pool.idle)
        return in_use, idle

"""Upstream pools, in-process: one per origin, forgotten once empty (a hub that starts each
user's server on a new port must not keep a pool per server it ever started)."""

from __future__ import annotations

import asyncio

from hubproxy.config import Config
from hubproxy.proxy import ProxyService
from hubproxy.routing import RouteTable


async def test_one_pool_per_origin_and_the_route_path_kept() -> None:
    service = ProxyService(Config(), RouteTable())
    bare, pool = service.pool_for("http://h.test:1")
    slash, same = service.pool_for("http://h.test:1/")
    upper, also = service.pool_for("http://H.TEST:1/x?q=1")
    assert pool is same is also
    assert (bare.path, slash.path, upper.path, upper.query) == ("/", "/", "/x", "q=1")
    assert service.pool_for("http://h.test:2")[1] is not pool
    assert service.pool_for("https://h.test:1")[1] is not pool


async def test_empty_pools_are_forgotten_and_busy_ones_kept() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    service = ProxyService(Config(), RouteTable())
    try:
        _, busy = service.pool_for(f"http://127.0.0.1:{port}/a")
        _, empty = service.pool_for("http://127.0.0.1:1/b")
        conn = await busy.connect()  # lent: in use
        service._forget_unused_pools()
        assert service.upstream_connections() == (1, 0)
        assert service.pool_for(f"http://127.0.0.1:{port}/a")[1] is busy
        assert service.pool_for("http://127.0.0.1:1/b")[1] is not empty  # made anew
        busy.release(conn)  # idle in its pool: still worth keeping
        service._forget_unused_pools()
        assert service.pool_for(f"http://127.0.0.1:{port}/a")[1] is busy
        assert service.upstream_connections() == (0, 1)
        busy.close_idle()  # nothing left in it
        service._forget_unused_pools()
        assert service.upstream_connections() == (0, 0)
        assert service.pool_for(f"http://127.0.0.1:{port}/a")[1] is not busy
    finally:
        server.close()
        for writer in accepted:
            writer.close()
        await server.wait_closed()

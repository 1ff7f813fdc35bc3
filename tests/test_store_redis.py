"""The Redis store against a real `redis-server`: the RouteStore contract, the change feed and its
resynchronisation, activity merged across stores, Redis going away and coming back (with and
without its data), and Redis unreachable at start. Several stores in one process stand for
replicas here; tests/test_replicas.py runs real hubproxy processes."""

from __future__ import annotations

import asyncio
import json
import signal
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest

import hubproxy.store.redis as redis_module
from hubproxy.routing import RouteTable
from hubproxy.store import RouteStore, StoreSpecError, StoreUnavailable, open_store
from hubproxy.store.redis import RedisStore, parse_redis_url, redact
from redis_server import RedisServer, free_port, require_redis_server
from support import check_store_contract

NOW = datetime(2026, 11, 26, 3, 19, 15, 214123, tzinfo=UTC)


@pytest.fixture
def prefix() -> str:
    return "t" + uuid.uuid4().hex[:12]  # every test its own keys on the shared server


@pytest.fixture
async def make_store(
    redis_server: RedisServer, prefix: str
) -> AsyncIterator[Callable[..., asyncio.Future[RedisStore]]]:
    """`await make_store()`: a started store (a "replica") on this test's prefix."""
    stores: list[RedisStore] = []

    async def make(url: str | None = None) -> RedisStore:
        store = RedisStore(url or redis_server.url(prefix))
        stores.append(store)
        await store.start()
        return store

    yield make  # type: ignore[misc]
    for store in stores:
        await store.close()


async def followed(store: RedisStore) -> RouteTable:
    table = RouteTable()
    store.watch(table)
    return table


def target(table: RouteTable, key: str) -> str | None:
    route = table.get(key)
    return route.target if route is not None else None


async def eventually_async(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s")
        await asyncio.sleep(0.05)


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> float:
    """Wait until `check()` holds; the seconds it took."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s")
        await asyncio.sleep(0.005)
    return time.monotonic() - started


# -- building it -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "url", "prefix"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0", "hubproxy"),
        ("redis://h:6379/2?prefix=hub-a", "redis://h:6379/2", "hub-a"),
        (
            "rediss://:pw@h:6380/0?prefix={hp}&ssl_cert_reqs=none",
            "rediss://:pw@h:6380/0?ssl_cert_reqs=none",
            "{hp}",
        ),
        ("unix:///run/redis.sock?db=1", "unix:///run/redis.sock?db=1", "hubproxy"),
    ],
)
def test_open_store_builds_redis(spec: str, url: str, prefix: str) -> None:
    store = open_store(spec)
    assert isinstance(store, RedisStore) and isinstance(store, RouteStore)
    assert parse_redis_url(spec) == (url, prefix)
    assert store.prefix == prefix and store.channel == f"{prefix}:changes"


def test_passwords_are_never_shown() -> None:
    assert redact("redis://:s3cret@h:6379/0") == "redis://:***@h:6379/0"
    assert redact("rediss://user:s3cret@h/0") == "rediss://user:***@h/0"
    assert redact("redis://h:6379/0") == "redis://h:6379/0"
    store = open_store("redis://:s3cret@127.0.0.1:1/0")
    assert isinstance(store, RedisStore) and "s3cret" not in store.where
    with pytest.raises(StoreSpecError) as info:
        open_store("redis://:s3cret@h/0?prefix=")
    assert "s3cret" not in str(info.value)


async def test_a_url_redis_py_cannot_use() -> None:
    with pytest.raises(StoreSpecError, match=r"^--storage-backend redis://h:port/0: "):
        await open_store("redis://h:port/0").start()


async def added(store: RedisStore, key: str, target: str) -> bool:
    """Add a route; False while Redis is away (StoreUnavailable)."""
    try:
        await store.add(key, {"target": target})
    except StoreUnavailable:
        return False
    return True


# -- the contract --------------------------------------------------------------------------------


async def test_contract(make_store: Callable[..., asyncio.Future[RedisStore]]) -> None:
    await check_store_contract(await make_store())


async def test_insertion_order(make_store: Callable[..., asyncio.Future[RedisStore]]) -> None:
    store = await make_store()
    for key in ("/c", "/a", "/b"):
        await store.add(key, {"target": "http://x"})
    await store.add("/a", {"target": "http://replaced"})  # re-adding keeps the position
    assert list(await store.get_all()) == ["/c", "/a", "/b"]
    await store.remove("/c")
    await store.add("/c", {"target": "http://x"})
    assert list(await store.get_all()) == ["/a", "/b", "/c"]
    other = await make_store()  # a replica starting later sees the same order
    assert list(await other.get_all()) == ["/a", "/b", "/c"]
    assert list(other._routes) == ["/a", "/b", "/c"]


async def test_data_and_times_round_trip_exactly(
    make_store: Callable[..., asyncio.Future[RedisStore]],
) -> None:
    store = await make_store()
    keys = ["/has space/ü", "/user/秀樹", "/~TestJH", "/has@", "/a//b/", '/q"uo\\te', "/nl\nx", "/"]
    data = {
        "target": "http://127.0.0.1:8888",
        "jupyterhub": True,
        "user": "秀樹",
        "big": 12345678901234567890,
        "float": 1.5,
        "none": None,
        "surrogate": "\ud800",
        "last_activity": NOW,
    }
    for key in keys:
        await store.add(key, data)
    other = await make_store()
    for reader in (store, other):
        routes = await reader.get_all()
        assert list(routes) == keys
        for key in keys:
            assert routes[key] == data and routes[key]["last_activity"].tzinfo is UTC
            assert await reader.get(key) == data
    assert other._routes == {key: data for key in keys}  # the view a replica synchronised


async def test_activity_newest_wins_across_stores(
    make_store: Callable[..., asyncio.Future[RedisStore]],
) -> None:
    a, b = await make_store(), await make_store()
    await a.add("/x", {"target": "http://x", "last_activity": NOW})
    await a.add("/y", {"target": "http://y"})
    later, earlier = NOW + timedelta(seconds=5), NOW - timedelta(seconds=5)
    await b.record_activity({"/x": earlier, "/y": later, "/gone": later})
    assert (await a.get("/x") or {})["last_activity"] == NOW
    assert (await a.get("/y") or {})["last_activity"] == later
    await b.record_activity({"/x": later})
    assert (await a.get("/x") or {})["last_activity"] == later
    assert (await a.get_all())["/x"]["last_activity"] == later
    assert await a.get("/gone") is None
    await a.remove("/y")
    await b.record_activity({"/y": later})  # a batch for a route removed meanwhile
    assert await b.get("/y") is None and "/y" not in await a.get_all()
    await a.update("/x", {"last_activity": earlier})  # CHP's update: a plain set
    assert (await b.get("/x") or {})["last_activity"] == earlier
    many = {f"/m{i}": NOW for i in range(1200)}  # more than one script call
    for key in many:
        await a.add(key, {"target": "http://m"})
    await b.record_activity(many)
    routes = await a.get_all()
    assert all(routes[key]["last_activity"] == NOW for key in many)


# -- the change feed -----------------------------------------------------------------------------


async def test_changes_reach_every_table(
    make_store: Callable[..., asyncio.Future[RedisStore]],
) -> None:
    a, b, c = await make_store(), await make_store(), await make_store()
    ta, tb, tc = await followed(a), await followed(b), await followed(c)
    await a.add("/user/x", {"target": "http://x"})
    assert ta.get("/user/x") is not None  # the writer's own table: at once
    await eventually(lambda: tb.get("/user/x") is not None and tc.get("/user/x") is not None)
    await b.update("/user/x", {"target": "http://x2"})
    await eventually(lambda: all(target(t, "/user/x") == "http://x2" for t in (ta, tb, tc)))
    await c.remove("/user/x")
    assert tc.get("/user/x") is None
    await eventually(lambda: ta.get("/user/x") is None and tb.get("/user/x") is None)
    for key in ("/user/秀樹", '/q"uo\\te/\n/ü'):  # keys travel through Lua's cjson intact
        await a.add(key, {"target": "http://u", "surrogate": "\ud800"})
        await eventually(lambda key=key: target(tb, key) == "http://u")
        assert b._routes[key] == {"target": "http://u", "surrogate": "\ud800"}


async def test_concurrent_writers_converge(
    make_store: Callable[..., asyncio.Future[RedisStore]],
) -> None:
    stores = [await make_store() for _ in range(3)]
    tables = [await followed(s) for s in stores]

    async def write(n: int) -> None:
        s = stores[n]
        for i in range(60):
            await s.add(f"/k{i % 20}", {"target": f"http://{n}/{i}"})
            if i % 7 == 0:
                await s.remove(f"/k{(i + n) % 20}")

    await asyncio.gather(*(write(n) for n in range(3)))
    truth = await stores[0].get_all()

    def converged() -> bool:
        return all(
            {r.key: r.target for r in t} == {k: d["target"] for k, d in truth.items()}
            for t in tables
        ) and all(list(s._routes) == list(truth) for s in stores)

    await eventually(converged)


async def test_a_gap_in_versions_resynchronises(
    make_store: Callable[..., asyncio.Future[RedisStore]], redis_server: RedisServer, prefix: str
) -> None:
    a = await make_store()
    table = await followed(a)
    await a.add("/before", {"target": "http://b"})
    # a change whose message is lost, then a later message: the gap is noticed at once
    redis_server.command("HSET", f"{prefix}:routes", "/sneaked", json.dumps({"target": "http://s"}))
    redis_server.command("ZADD", f"{prefix}:order", "1000", "/sneaked")
    redis_server.command("INCR", f"{prefix}:version")
    other = await make_store()
    await other.add("/after", {"target": "http://a"})
    await eventually(lambda: table.get("/sneaked") is not None and table.get("/after") is not None)


async def test_a_lost_last_message_is_noticed_while_idle(
    make_store: Callable[..., asyncio.Future[RedisStore]], redis_server: RedisServer, prefix: str
) -> None:
    a = await make_store()
    table = await followed(a)
    redis_server.command("HSET", f"{prefix}:routes", "/sneaked", json.dumps({"target": "http://s"}))
    redis_server.command("ZADD", f"{prefix}:order", "1000", "/sneaked")
    redis_server.command("INCR", f"{prefix}:version")
    took = await eventually(lambda: table.get("/sneaked") is not None)
    assert took < 2 * redis_module.IDLE_CHECK + 3


async def test_a_reset_message_resynchronises(
    make_store: Callable[..., asyncio.Future[RedisStore]], redis_server: RedisServer, prefix: str
) -> None:
    a = await make_store()
    table = await followed(a)
    redis_server.command(
        "HSET", f"{prefix}:routes", "/restored", json.dumps({"target": "http://r"})
    )
    redis_server.command("ZADD", f"{prefix}:order", "1000", "/restored")
    version = int(redis_server.command("INCR", f"{prefix}:version")[1:].split(b"\r")[0])
    redis_server.command("PUBLISH", f"{prefix}:changes", json.dumps([version, "reset"]))
    await eventually(lambda: table.get("/restored") is not None, timeout=1.0)


async def test_ten_thousand_routes(make_store: Callable[..., asyncio.Future[RedisStore]]) -> None:
    a = await make_store()
    limit = asyncio.Semaphore(50)  # a burst of API writes, as fifty concurrent clients send them

    async def add(i: int) -> None:
        async with limit:
            data = {
                "target": f"http://10.0.{i // 256}.{i % 256}:8888",
                "user": f"user{i}",
                "jupyterhub": True,
                "last_activity": NOW,
            }
            await a.add(f"/user/user{i}", data)

    started = time.perf_counter()
    await asyncio.gather(*(add(i) for i in range(10_000)))
    add = time.perf_counter() - started
    reads = []
    for _ in range(5):
        started = time.perf_counter()
        routes = await a.get_all()
        reads.append(time.perf_counter() - started)
    assert len(routes) == 10_000 and next(iter(routes)) == "/user/user0"
    started = time.perf_counter()
    b = await make_store()
    load = time.perf_counter() - started
    assert len(b._routes) == 10_000
    print(
        f"\nRedis, 10,000 routes: add (concurrent) {add * 1000:.0f} ms, get_all median "
        f"{statistics.median(reads) * 1000:.1f} ms, a replica's start {load * 1000:.0f} ms"
    )
    assert statistics.median(reads) < 0.5  # generous: a busy 2-core machine


# -- Redis going away -----------------------------------------------------------------------------


async def test_redis_restarted(
    own_server: Callable[..., RedisServer], make_store: Callable[..., asyncio.Future[RedisStore]]
) -> None:
    server = own_server(persistent=True)
    a, b = await make_store(server.url("hp")), await make_store(server.url("hp"))
    ta, tb = await followed(a), await followed(b)
    await a.add("/user/x", {"target": "http://x", "last_activity": NOW})
    await eventually(lambda: tb.get("/user/x") is not None)
    server.stop()
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match=r"Redis at redis://127\.0\.0\.1"):
        await a.add("/user/y", {"target": "http://y"})
    with pytest.raises(StoreUnavailable):
        await b.remove("/user/x")
    with pytest.raises(StoreUnavailable):
        await b.record_activity({"/user/x": NOW + timedelta(seconds=1)})
    assert time.monotonic() - started < 2 * redis_module.OP_TIMEOUT
    # reads answer from the view; the tables keep routing
    assert list(await b.get_all()) == ["/user/x"]
    assert (await b.get("/user/x") or {})["target"] == "http://x"
    assert tb.get("/user/x") is not None and ta.get("/user/y") is None
    server.start()

    # everything comes back: the data (AOF), the feed, the writes
    await eventually_async(lambda: added(a, "/user/y", "http://y"))
    await eventually(lambda: tb.get("/user/y") is not None)
    assert list(await b.get_all()) == ["/user/x", "/user/y"]


async def test_redis_lost_its_data_and_a_replica_restores_it(
    own_server: Callable[..., RedisServer], make_store: Callable[..., asyncio.Future[RedisStore]]
) -> None:
    server = own_server(persistent=False)
    a, b = await make_store(server.url("hp")), await make_store(server.url("hp"))
    tb = await followed(b)
    for i in range(5):
        await a.add(f"/user/{i}", {"target": f"http://{i}", "last_activity": NOW})
    await eventually(lambda: len(tb) == 5)
    server.restart()  # no persistence: it comes back empty
    fresh = await make_store(server.url("hp"))

    async def restored() -> bool:
        return len(await fresh.get_all()) == 5

    await eventually_async(restored)
    routes = await fresh.get_all()
    assert list(routes) == [f"/user/{i}" for i in range(5)]
    assert routes["/user/3"] == {"target": "http://3", "last_activity": NOW}
    assert len(tb) == 5
    # and flushed while running (no reconnect): noticed by the idle version check
    server.command("FLUSHALL")
    await eventually_async(restored)


async def test_unreachable_at_start_then_it_comes(
    own_server: Callable[..., RedisServer],
    make_store: Callable[..., asyncio.Future[RedisStore]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require_redis_server()
    monkeypatch.setattr(redis_module, "CONNECT_WAIT", 0.3)
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0?prefix=hp"
    started = time.monotonic()
    a = await make_store(url)
    assert time.monotonic() - started < 2
    table = await followed(a)
    with pytest.raises(StoreUnavailable):
        await a.get_all()  # never synchronised: no view to answer from
    with pytest.raises(StoreUnavailable):
        await a.get("/x")
    with pytest.raises(StoreUnavailable):
        await a.add("/x", {"target": "http://x"})
    server = own_server(port=port)
    server.command("HSET", "hp:routes", "/waiting", json.dumps({"target": "http://w"}))
    server.command("ZADD", "hp:order", "1", "/waiting")
    await eventually(lambda: table.get("/waiting") is not None)
    await a.add("/x", {"target": "http://x"})
    assert list(await a.get_all()) == ["/waiting", "/x"]


async def test_redis_hanging_is_a_503_in_bounded_time(
    own_server: Callable[..., RedisServer],
    make_store: Callable[..., asyncio.Future[RedisStore]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Redis that accepts connections but never answers (SIGSTOP): writes fail within
    OP_TIMEOUT (JupyterHub waits 5 s for an answer), reads answer from the view."""
    monkeypatch.setattr(redis_module, "OP_TIMEOUT", 1.0)
    server = own_server()
    a = await make_store(server.url("hp"))
    table = await followed(a)
    await a.add("/user/x", {"target": "http://x"})
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await a.add("/user/y", {"target": "http://y"})
        took = time.monotonic() - started
        assert took < 4, took
        started = time.monotonic()
        assert list(await a.get_all()) == ["/user/x"]
        assert time.monotonic() - started < 4
        assert table.get("/user/x") is not None
    finally:
        server.proc.send_signal(signal.SIGCONT)

    await eventually_async(lambda: added(a, "/user/y", "http://y"))
    assert list(await a.get_all()) == ["/user/x", "/user/y"]

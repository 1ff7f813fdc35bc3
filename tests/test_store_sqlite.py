"""The SQLite store: the RouteStore contract, durability, other processes on the same file, and
the proxy restarted (SIGTERM and `kill -9`) with its routes."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import statistics
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from hubproxy.routing import RouteTable
from hubproxy.store import RouteStore, StoreSpecError, StoreUnavailable, open_store
from hubproxy.store.sqlite import SQLiteStore
from support import Backend, Proxy, check_store_contract, http_request

NOW = datetime(2026, 11, 26, 3, 19, 15, 214123, tzinfo=UTC)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "routes.db"


@pytest.fixture
async def store(db: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(str(db))
    await s.start()
    yield s
    await s.close()


async def reopen(db: Path) -> SQLiteStore:
    s = SQLiteStore(str(db))
    await s.start()
    return s


# -- building it from --storage-backend --------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "path", "synchronous"),
    [
        ("sqlite:///var/lib/hubproxy/routes.db", "/var/lib/hubproxy/routes.db", "FULL"),
        ("sqlite:////abs/routes.db", "//abs/routes.db", "FULL"),  # SQLAlchemy's absolute form
        ("sqlite://relative.db", "relative.db", "FULL"),
        ("SQLite:///x.sqlite3?synchronous=normal", "/x.sqlite3", "NORMAL"),
        ("/var/lib/hubproxy/routes.db", "/var/lib/hubproxy/routes.db", "FULL"),
        ("routes.sqlite", "routes.sqlite", "FULL"),
        ("data/Routes.DB", "data/Routes.DB", "FULL"),
    ],
)
def test_open_store_builds_sqlite(spec: str, path: str, synchronous: str) -> None:
    store = open_store(spec)
    assert isinstance(store, SQLiteStore) and isinstance(store, RouteStore)
    assert (store.path, store.synchronous) == (path, synchronous)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("sqlite://", "no file named"),
        ("sqlite:///x.db?journal=off", "unknown option journal=off"),
        ("sqlite:///x.db?synchronous=off", "unknown option synchronous=off"),
        ("routes.json", "expected memory, sqlite:///path/routes.db"),
    ],
)
def test_bad_sqlite_specs(spec: str, message: str) -> None:
    with pytest.raises(StoreSpecError, match=r"^--storage-backend ") as info:
        open_store(spec)
    assert message in str(info.value) and "\n" not in str(info.value)


async def test_a_file_that_cannot_be_opened(tmp_path: Path) -> None:
    with pytest.raises(StoreSpecError, match=r"cannot open .*missing-dir/routes\.db"):
        await SQLiteStore(str(tmp_path / "missing-dir" / "routes.db")).start()
    not_a_db = tmp_path / "text.db"
    not_a_db.write_text("hello, this is not a database file at all, " * 100)
    with pytest.raises(StoreSpecError, match="cannot open"):
        await SQLiteStore(str(not_a_db)).start()


async def test_a_newer_schema_is_refused(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StoreSpecError, match="schema version 99 is newer"):
        await SQLiteStore(str(db)).start()


# -- the RouteStore contract (as test_store.py has it for the memory store) ----------------------


async def test_contract(store: SQLiteStore) -> None:
    await check_store_contract(store)


async def test_get_returns_a_copy(store: SQLiteStore) -> None:
    data = {"target": "http://a", "extra": {"k": 1}}
    await store.add("/a", data)
    data["target"] = "changed by the caller"
    data["extra"]["k"] = 2
    got = await store.get("/a")
    assert got == {"target": "http://a", "extra": {"k": 1}}
    assert got is not None
    got["target"] = "changed again"
    assert (await store.get("/a") or {})["target"] == "http://a"


async def test_insertion_order_survives_readding_and_restart(store: SQLiteStore, db: Path) -> None:
    for key in ("/c", "/a", "/b"):
        await store.add(key, {"target": "http://x"})
    await store.add("/a", {"target": "http://replaced"})  # re-adding keeps the position
    assert list(await store.get_all()) == ["/c", "/a", "/b"]
    await store.remove("/c")
    await store.add("/c", {"target": "http://x"})  # removed and added again: last
    assert list(await store.get_all()) == ["/a", "/b", "/c"]
    await store.close()
    again = await reopen(db)
    try:
        assert list(await again.get_all()) == ["/a", "/b", "/c"]
        assert (await again.get("/a") or {})["target"] == "http://replaced"
    finally:
        await again.close()


async def test_data_and_times_round_trip_exactly(store: SQLiteStore, db: Path) -> None:
    keys = ["/has space/ü", "/user/秀樹", "/~TestJH", "/has@", "/üñîçø∂é", "/a//b/", "/"]
    data = {
        "target": "http://127.0.0.1:8888",
        "jupyterhub": True,
        "user": "秀樹",
        "server_name": "",
        "big": 12345678901234567890,
        "float": 1.5,
        "none": None,
        "surrogate": "\ud800",  # valid in a JSON body, not in UTF-8
        "last_activity": NOW,
    }
    for key in keys:
        await store.add(key, data)
    await store.close()
    again = await reopen(db)
    try:
        routes = await again.get_all()
        assert list(routes) == keys
        for key in keys:
            assert routes[key] == data
            assert routes[key]["last_activity"].tzinfo is UTC
    finally:
        await again.close()


async def test_activity_newest_wins_and_never_resurrects(store: SQLiteStore, db: Path) -> None:
    await store.add("/a", {"target": "http://a", "last_activity": NOW})
    await store.add("/b", {"target": "http://b"})
    later, earlier = NOW + timedelta(seconds=5), NOW - timedelta(seconds=5)
    await store.record_activity({"/a": earlier, "/b": later, "/gone": later})
    assert (await store.get("/a") or {})["last_activity"] == NOW
    assert (await store.get("/b") or {})["last_activity"] == later
    await store.record_activity({"/a": later})
    assert (await store.get("/a") or {})["last_activity"] == later
    assert await store.get("/gone") is None
    await store.close()
    again = await reopen(db)
    try:
        assert (await again.get("/a") or {})["last_activity"] == later
        assert (await again.get("/b") or {})["last_activity"] == later
        assert await again.get("/gone") is None
    finally:
        await again.close()


async def test_update_with_last_activity_replaces_it(store: SQLiteStore) -> None:
    await store.add("/a", {"target": "http://a", "last_activity": NOW})
    earlier = NOW - timedelta(days=1)
    await store.update("/a", {"last_activity": earlier})  # CHP's update: a plain set
    assert await store.get("/a") == {"target": "http://a", "last_activity": earlier}


async def test_the_table_follows(store: SQLiteStore, db: Path) -> None:
    await store.add("/before", {"target": "http://before"})
    table = RouteTable()
    store.watch(table)
    assert table.lookup("/before/x") is not None
    await store.add("/user/a", {"target": "http://a"})
    route = table.lookup("/user/a/tree")
    assert route is not None and route.target == "http://a"
    await store.update("/user/a", {"target": "http://a2"})
    assert (table.lookup("/user/a") or route).target == "http://a2"
    await store.remove("/user/a")
    assert table.lookup("/user/a") is None
    await store.close()
    again = await reopen(db)
    try:
        fresh = RouteTable()
        again.watch(fresh)
        assert [r.key for r in fresh] == ["/before"]
    finally:
        await again.close()


async def test_concurrent_writes_are_committed_together(store: SQLiteStore, db: Path) -> None:
    commits = 0
    original = store._commit

    def counting(conn: sqlite3.Connection, batch: list) -> None:  # type: ignore[type-arg]
        nonlocal commits
        commits += 1
        original(conn, batch)

    store._commit = counting  # type: ignore[method-assign]
    await asyncio.gather(*(store.add(f"/r{i}", {"target": f"http://t/{i}"}) for i in range(500)))
    assert len(await store.get_all()) == 500
    assert commits < 500
    print(f"\n500 concurrent adds: {commits} commits")
    # every one of them is in the file, whatever the mirror says
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM routes").fetchone()[0] == 500
    conn.close()


async def test_wal_and_synchronous(tmp_path: Path) -> None:
    for spec, level in (
        (str(tmp_path / "full.db"), 2),
        (f"sqlite://{tmp_path}/normal.db?synchronous=normal", 1),
    ):
        store = open_store(spec)
        assert isinstance(store, SQLiteStore)
        await store.start()
        try:
            conn = sqlite3.connect(store.path)
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            conn.close()
            # the writer connection's own setting
            got = await store._write(_pragma, "synchronous")
            assert got == level
        finally:
            await store.close()


def _pragma(conn: sqlite3.Connection, name: str) -> object:
    return conn.execute(f"PRAGMA {name}").fetchone()[0]


async def test_a_failed_write_is_unavailable_not_acknowledged(store: SQLiteStore, db: Path) -> None:
    await store.add("/kept", {"target": "http://k"})
    await store._write(_pragma, "busy_timeout = 100")
    # another connection holds the write lock longer than the store waits for it
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreUnavailable, match="cannot write to"):
            await store.add("/lost", {"target": "http://l"})
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert await store.get("/lost") is None
    await store.add("/later", {"target": "http://l"})  # the store carries on
    assert list(await store.get_all()) == ["/kept", "/later"]


async def test_another_process_on_the_same_file_is_followed(db: Path) -> None:
    a, b = await reopen(db), await reopen(db)
    table_b = RouteTable()
    b.watch(table_b)
    try:
        await a.add("/from-a", {"target": "http://a"})
        deadline = time.monotonic() + 5
        while table_b.get("/from-a") is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert table_b.get("/from-a") is not None
        assert await b.get("/from-a") == {"target": "http://a"}
        await b.add("/from-b", {"target": "http://b"})
        await a.remove("/from-a")
        deadline = time.monotonic() + 5
        while table_b.get("/from-a") is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert table_b.get("/from-a") is None
        assert list(await b.get_all()) == ["/from-b"]
        # activity merges with MAX across processes
        await a.record_activity({"/from-b": NOW})
        await b.record_activity({"/from-b": NOW - timedelta(hours=1)})
        await b.close()
        b = await reopen(db)
        assert (await b.get("/from-b") or {})["last_activity"] == NOW
    finally:
        await a.close()
        await b.close()


async def test_ten_thousand_routes(store: SQLiteStore, db: Path) -> None:
    started = time.perf_counter()
    await asyncio.gather(
        *(
            store.add(
                f"/user/user{i}",
                {
                    "target": f"http://10.0.{i // 256}.{i % 256}:8888",
                    "user": f"user{i}",
                    "jupyterhub": True,
                    "last_activity": NOW,
                },
            )
            for i in range(10_000)
        )
    )
    add = time.perf_counter() - started
    reads = []
    for _ in range(5):
        started = time.perf_counter()
        routes = await store.get_all()
        reads.append(time.perf_counter() - started)
    assert len(routes) == 10_000
    await store.close()
    started = time.perf_counter()
    again = await reopen(db)
    load = time.perf_counter() - started
    await again.close()
    print(
        f"\n10,000 routes: add (concurrent) {add * 1000:.0f} ms, get_all "
        f"{statistics.median(reads) * 1000:.2f} ms, load at start {load * 1000:.0f} ms"
    )
    assert max(reads) < 0.1 and load < 5


# -- the proxy with --storage-backend sqlite ---------------------------------------------------


def served(proxy: Proxy, path: str) -> int:
    try:
        status, _, _ = http_request(proxy.host, proxy.port, "GET", path, timeout=5)
    except OSError:
        return 0
    return status


def test_routes_survive_a_restart(
    start_proxy: Callable[..., Proxy], backend: Backend, db: Path
) -> None:
    proxy = start_proxy("--storage-backend", f"sqlite://{db}")
    assert any("Loaded 0 routes from" in line for line in proxy.lines)
    proxy.add_route("/user/alice", backend.url, user="alice", jupyterhub=True)
    proxy.add_route("/user/bob", backend.url)
    before = proxy.routes()
    assert proxy.stop() == 0
    again = start_proxy("--storage-backend", str(db))  # the plain path: the same store
    assert any("Loaded 2 routes from" in line for line in again.lines)
    assert again.routes() == before  # data, order and last_activity
    assert served(again, "/user/alice/tree") == 200


def test_kill_9_right_after_acknowledged_posts(
    start_proxy: Callable[..., Proxy], backend: Backend, db: Path
) -> None:
    """SIGKILL right after a burst of POSTs was acknowledged: every one of them is there."""
    proxy = start_proxy("--storage-backend", f"sqlite://{db}")
    acknowledged: list[str] = []
    lock = threading.Lock()

    def post(n: int) -> None:
        for i in range(n, 300, 10):  # ten clients, as JupyterHub's concurrency
            status, _, _ = proxy.api("POST", f"/user/u{i}", {"target": backend.url, "n": i})
            if status == 201:
                with lock:
                    acknowledged.append(f"/user/u{i}")

    threads = [threading.Thread(target=post, args=(n,)) for n in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    proxy.proc.send_signal(signal.SIGKILL)  # right after the last 201
    proxy.proc.wait(10)
    assert len(acknowledged) == 300
    again = start_proxy("--storage-backend", f"sqlite://{db}")
    routes = again.routes()
    assert set(acknowledged) <= set(routes)
    assert all(routes[key]["n"] == int(key.rsplit("u", 1)[1]) for key in acknowledged)
    assert served(again, "/user/u299/lab") == 200


def test_kill_9_during_a_burst_loses_nothing_acknowledged(
    start_proxy: Callable[..., Proxy], backend: Backend, db: Path
) -> None:
    """SIGKILL while POSTs are in flight: what was acknowledged is there; the rest may be."""
    proxy = start_proxy("--storage-backend", f"sqlite://{db}")
    acknowledged: list[str] = []
    stop = threading.Event()

    def post(n: int) -> None:
        i = n
        while not stop.is_set():
            try:
                status, _, _ = proxy.api("POST", f"/r{i}", {"target": backend.url})
            except OSError:
                return
            if status == 201:
                acknowledged.append(f"/r{i}")
            i += 10

    threads = [threading.Thread(target=post, args=(n,)) for n in range(10)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    proxy.proc.send_signal(signal.SIGKILL)
    proxy.proc.wait(10)
    stop.set()
    for t in threads:
        t.join()
    assert len(acknowledged) > 50
    again = start_proxy("--storage-backend", f"sqlite://{db}")
    missing = set(acknowledged) - set(again.routes())
    assert not missing


def test_restart_gap_measured_through_the_proxy(
    start_proxy: Callable[..., Proxy], backend: Backend, db: Path
) -> None:
    """Poll a user's route through the proxy while the proxy restarts: no 404 ever; the only
    gap is the time no process listens (printed)."""
    proxy = start_proxy("--storage-backend", f"sqlite://{db}", "--port", "0")
    for i in range(200):
        proxy.add_route(f"/user/u{i}", backend.url)
    port = proxy.port
    results: list[tuple[float, int]] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            try:
                status, _, _ = http_request("127.0.0.1", port, "GET", "/user/u123/api", timeout=2)
            except OSError:
                status = 0
            results.append((time.monotonic(), status))
            time.sleep(0.002)

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.2)
    stopped_at = time.monotonic()
    assert proxy.stop() == 0
    exited_at = time.monotonic()
    again = start_proxy("--storage-backend", f"sqlite://{db}", "--port", str(port))
    up_at = time.monotonic()
    time.sleep(0.3)
    done.set()
    poller.join()
    statuses = {status for _, status in results}
    not_found = [t for t, status in results if status == 404]
    refused = [t for t, status in results if status == 0]
    gap = (max(refused) - min(refused)) if refused else 0.0
    print(
        f"\nproxy restart with SQLite: {len(results)} polls, {len(not_found)} answered 404, "
        f"connection refused for {gap * 1000:.0f} ms (SIGTERM to exit "
        f"{(exited_at - stopped_at) * 1000:.0f} ms, start to listening "
        f"{(up_at - exited_at) * 1000:.0f} ms)"
    )
    assert not not_found
    assert statuses <= {200, 0}
    assert served(again, "/user/u199") == 200


def test_api_get_all_with_ten_thousand_routes(
    start_proxy: Callable[..., Proxy], backend: Backend, db: Path
) -> None:
    conn = sqlite3.connect(db)
    conn.execute(
        "CREATE TABLE routes (seq INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, "
        "data TEXT NOT NULL, last_activity INTEGER)"
    )
    conn.executemany(
        "INSERT INTO routes (key, data, last_activity) VALUES (?, ?, ?)",
        [
            (
                f"/user/u{i}",
                json.dumps({"target": backend.url, "user": f"u{i}"}),
                1_790_000_000_000_000 + i,
            )
            for i in range(10_000)
        ],
    )
    conn.commit()
    conn.close()
    proxy = start_proxy("--storage-backend", str(db))
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        routes = proxy.routes()
        timings.append(time.perf_counter() - started)
    assert len(routes) == 10_000 and list(routes)[:2] == ["/user/u0", "/user/u1"]
    assert routes["/user/u1"]["last_activity"] == "2026-09-21T14:13:20.000Z"
    median = statistics.median(timings) * 1000
    print(f"\nGET /api/routes, 10,000 routes from SQLite: median {median:.1f} ms")
    assert statistics.median(timings) < 0.5  # a generous bound for a busy machine


def test_activity_through_the_proxy_is_persisted(
    start_proxy: Callable[..., Proxy], backend: Backend, db: Path
) -> None:
    proxy = start_proxy("--storage-backend", f"sqlite://{db}")
    proxy.add_route("/user/a", backend.url)
    first = proxy.routes()["/user/a"]["last_activity"]
    time.sleep(0.01)
    assert served(proxy, "/user/a/x") == 200
    after = proxy.routes()["/user/a"]["last_activity"]  # the API read flushes first
    assert after > first
    assert proxy.stop() == 0
    again = start_proxy("--storage-backend", f"sqlite://{db}")
    assert again.routes()["/user/a"]["last_activity"] == after


def test_bad_path_exits_1_with_one_line(start_proxy: Callable[..., Proxy], tmp_path: Path) -> None:
    from support import ProxyProcess

    proc = ProxyProcess(
        ["--port", "0", "--api-port", "0", "--storage-backend", str(tmp_path / "no" / "r.db")]
    )
    assert proc.proc.wait(30) == 1
    proc.stop()
    errors = [line for line in proc.lines if " error: " in line]
    assert len(errors) == 1 and "cannot open" in errors[0], proc.output()
    assert "Traceback" not in proc.stderr

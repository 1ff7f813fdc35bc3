"""The activity flusher: marks made on the route table reach the store in batches."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime

import pytest

from hubproxy.activity import ActivityFlusher
from hubproxy.routing import RouteTable
from hubproxy.store import MemoryStore, StoreUnavailable


async def followed_store(*keys: str) -> tuple[MemoryStore, RouteTable]:
    store = MemoryStore()
    table = RouteTable()
    store.watch(table)
    for key in keys:
        await store.add(key, {"target": "http://t"})
    return store, table


async def test_flush_writes_aware_utc_times() -> None:
    store, table = await followed_store("/a", "/b")
    flusher = ActivityFlusher(table, store)
    route = table.get("/a")
    assert route is not None
    table.mark_active(route, 1_000_000_000.25)
    await flusher.flush()
    data = await store.get("/a")
    assert data is not None
    assert data["last_activity"] == datetime(2001, 9, 9, 1, 46, 40, 250000, tzinfo=UTC)
    assert "last_activity" not in (await store.get("/b") or {})
    await flusher.flush()  # nothing new: nothing written
    assert (await store.get("/a")) == data


async def test_stop_flushes_what_is_left() -> None:
    store, table = await followed_store("/a")
    flusher = ActivityFlusher(table, store, interval=3600)
    flusher.start()
    route = table.get("/a")
    assert route is not None
    table.mark_active(route)
    await flusher.stop()
    assert "last_activity" in (await store.get("/a") or {})


class RecordingStore(MemoryStore):
    def __init__(self, failures: int = 0) -> None:
        super().__init__()
        self.failures = failures
        self.batches: asyncio.Queue[dict[str, datetime]] = asyncio.Queue()

    async def record_activity(self, activity: Mapping[str, datetime]) -> None:
        if self.failures:
            self.failures -= 1
            await self.batches.put({})
            raise ConnectionError("store down")
        await super().record_activity(activity)
        await self.batches.put(dict(activity))


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def hub_log() -> Iterator[ListHandler]:
    """The hubproxy logger's messages (whatever its propagation settings)."""
    logger = logging.getLogger("hubproxy")
    handler = ListHandler()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


async def test_periodic_flush_survives_store_errors(hub_log: ListHandler) -> None:
    store = RecordingStore(failures=1)
    table = RouteTable()
    store.watch(table)
    await store.add("/a", {"target": "http://t"})
    route = table.get("/a")
    assert route is not None
    flusher = ActivityFlusher(table, store, interval=0.01)
    flusher.start()
    try:
        table.mark_active(route, 1.0)
        assert await asyncio.wait_for(store.batches.get(), 10) == {}  # the failed one
        table.mark_active(route, 2.0)
        batch = await asyncio.wait_for(store.batches.get(), 10)
    finally:
        await flusher.stop()
    assert batch == {"/a": datetime.fromtimestamp(2.0, UTC)}
    assert "Failed to record route activity" in hub_log.messages


class UnavailableStore(MemoryStore):
    """A shared store that is away (Redis down) until `back` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.back = False

    async def record_activity(self, activity: Mapping[str, datetime]) -> None:
        if not self.back:
            raise StoreUnavailable("redis is down")
        await super().record_activity(activity)


async def test_marks_are_kept_while_the_store_is_away(hub_log: ListHandler) -> None:
    store = UnavailableStore()
    table = RouteTable()
    store.watch(table)
    await store.add("/a", {"target": "http://t"})
    await store.add("/b", {"target": "http://t"})
    flusher = ActivityFlusher(table, store)
    a, b = table.get("/a"), table.get("/b")
    assert a is not None and b is not None
    table.mark_active(a, 3.0)
    await flusher.flush()  # StoreUnavailable is not an error for flush (the API still reads)
    table.mark_active(a, 2.0)  # older than the kept mark: the kept one wins
    table.mark_active(b, 5.0)
    await flusher.flush()
    assert hub_log.messages.count("Route activity kept for later: redis is down") == 1
    store.back = True
    await flusher.flush()
    assert (await store.get("/a") or {})["last_activity"] == datetime.fromtimestamp(3.0, UTC)
    assert (await store.get("/b") or {})["last_activity"] == datetime.fromtimestamp(5.0, UTC)
    assert "Route activity recorded again (2 routes)" in hub_log.messages
    await flusher.flush()  # nothing left over


async def test_stop_survives_a_store_that_is_away() -> None:
    store = UnavailableStore()
    table = RouteTable()
    store.watch(table)
    await store.add("/a", {"target": "http://t"})
    flusher = ActivityFlusher(table, store, interval=3600)
    flusher.start()
    route = table.get("/a")
    assert route is not None
    table.mark_active(route)
    await flusher.stop()  # no exception: the process exits cleanly while Redis is down

"""GET all's serialisation cache gives exactly what serialising the table anew gives."""

from __future__ import annotations

from datetime import UTC, datetime

from hubproxy.api import RouteJsonCache, json_bytes
from hubproxy.store.memory import MemoryStore


async def test_cached_body_follows_every_kind_of_change() -> None:
    store = MemoryStore()
    cache = RouteJsonCache()
    store.watch(cache)
    for i in range(20):
        await store.add(
            f"/user/u{i}", {"target": "http://t", "n": i, "last_activity": datetime.now(UTC)}
        )
    assert cache.body(await store.get_all()) == json_bytes(await store.get_all())

    await store.record_activity({"/user/u5": datetime(2030, 1, 1, tzinfo=UTC)})  # in place
    await store.update("/user/u6", {"extra": {"nested": True}})
    await store.remove("/user/u7")
    await store.add("/user/u8", {"target": "http://other"})  # replaced, keeps its place
    await store.add("/new", {"target": "http://new", "ü": "秀樹"})
    routes = await store.get_all()
    body = cache.body(routes)
    assert body == json_bytes(routes)
    assert (
        b'"/user/u5":{"target":"http://t","n":5,"last_activity":"2030-01-01T00:00:00.000Z"}' in body
    )
    assert b'"/user/u7":' not in body


async def test_routes_gone_without_an_event_are_forgotten() -> None:
    cache = RouteJsonCache()
    routes = {f"/r{i}": {"target": "http://t"} for i in range(5)}
    cache.body(routes)
    del routes["/r3"]  # e.g. a store that reloaded itself
    assert cache.body(routes) == json_bytes(routes)
    assert len(cache._fragments) == 4

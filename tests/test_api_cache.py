"""GET all's serialisation cache gives exactly what serialising the table anew gives."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from hubproxy import api
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


def test_activity_anywhere_in_the_route_is_spliced_exactly() -> None:
    """last_activity first, in the middle, last, naive or in another zone, turned into a string
    and back: the body is always what serialising anew gives."""
    when = datetime(2026, 12, 5, 7, 0, 14, 58123, tzinfo=UTC)
    routes: dict[str, dict[str, object]] = {
        "/first": {"last_activity": when, "target": "http://a", "ü": "秀樹"},
        "/middle": {"target": "http://b", "last_activity": when, "nested": {"x": [1, None]}},
        "/last": {"target": "http://c", "last_activity": when},
        '/quo"ted\\': {"target": "http://d", "last_activity": when},
        "/none": {"target": "http://e"},
    }
    cache = RouteJsonCache()
    assert cache.body(routes) == json_bytes(routes)
    later = [
        datetime(2027, 1, 1, 0, 0, 0, 999999, tzinfo=UTC),
        datetime(2027, 1, 1, 1, 0, 0),  # naive: UTC
        datetime(2027, 1, 1, 3, 0, 0, tzinfo=timezone(timedelta(hours=2))),
        "not a date",
        datetime(2028, 2, 29, tzinfo=UTC),
    ]
    for value in later:
        for data in routes.values():
            if "last_activity" in data:
                data["last_activity"] = value  # in place, as the stores record activity
        assert cache.body(routes) == json_bytes(routes), value


def test_a_changed_activity_does_not_serialise_the_route_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The hub polls GET all every few seconds, and every busy route's activity changed in
    between: serialising them all again made the answer slower than CHP's (hub-day benchmark,
    10,000 routes). Only the date is formatted now."""
    routes = {
        f"/user/u{i}": {"user": f"u{i}", "target": "http://t", "last_activity": datetime.now(UTC)}
        for i in range(100)
    }
    cache = RouteJsonCache()
    cache.body(routes)
    calls = []
    real = api.json_bytes
    monkeypatch.setattr(api, "json_bytes", lambda value: calls.append(value) or real(value))
    for step in range(3):
        for data in routes.values():
            data["last_activity"] = datetime(2030, 1, 1, step, tzinfo=UTC)
        body = cache.body(routes)
        assert body == real(routes)
    assert calls == []

"""MemoryStore (CHP's store_spec.js, spec §6.5), the change feed a RouteTable follows, and the
helpers every store shares (newest activity wins; route data as a row)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from hubproxy.routing import RouteTable
from hubproxy.store import MemoryStore, RouteStore, StoreSpecError, open_store
from hubproxy.store.base import decode_row, encode_row, keep_newest, merge_newest


@pytest.fixture
async def store() -> MemoryStore:
    s = MemoryStore()
    await s.start()
    return s


async def test_is_a_route_store(store: MemoryStore) -> None:
    assert isinstance(store, RouteStore)
    assert isinstance(open_store(None), MemoryStore)
    assert isinstance(open_store("memory"), MemoryStore)
    with pytest.raises(StoreSpecError):
        open_store("mybackend")


async def test_get(store: MemoryStore) -> None:
    await store.add("/myRoute", {"target": "http://localhost:8213"})
    assert await store.get("/myRoute") == {"target": "http://localhost:8213"}


async def test_get_missing(store: MemoryStore) -> None:
    assert await store.get("/wut") is None


async def test_get_target_through_the_table(store: MemoryStore) -> None:
    table = RouteTable()
    store.watch(table)
    await store.add("/myRoute", {"target": "http://localhost:8213"})
    route = table.lookup("/myRoute/some/path")
    assert route is not None
    assert (route.prefix, route.target) == ("/myRoute", "http://localhost:8213")


async def test_get_all(store: MemoryStore) -> None:
    await store.add("/myRoute", {"target": "http://localhost:8213"})
    await store.add("/myOtherRoute", {"target": "http://localhost:8214"})
    assert await store.get_all() == {
        "/myRoute": {"target": "http://localhost:8213"},
        "/myOtherRoute": {"target": "http://localhost:8214"},
    }


async def test_get_all_empty(store: MemoryStore) -> None:
    assert await store.get_all() == {}


async def test_get_all_keeps_insertion_order(store: MemoryStore) -> None:
    for key in ("/c", "/a", "/b"):
        await store.add(key, {"target": "http://x"})
    await store.add("/a", {"target": "http://replaced"})  # re-adding keeps the position
    assert list(await store.get_all()) == ["/c", "/a", "/b"]
    await store.remove("/c")
    await store.add("/c", {"target": "http://x"})  # removing and adding again moves it last
    assert list(await store.get_all()) == ["/a", "/b", "/c"]


async def test_add(store: MemoryStore) -> None:
    await store.add("/myRoute", {"target": "http://localhost:8213"})
    assert await store.get("/myRoute") == {"target": "http://localhost:8213"}


async def test_add_overwrites(store: MemoryStore) -> None:
    await store.add("/myRoute", {"target": "http://localhost:8213", "extra": 1})
    await store.add("/myRoute", {"target": "http://localhost:8214"})
    assert await store.get("/myRoute") == {"target": "http://localhost:8214"}


async def test_update_merges(store: MemoryStore) -> None:
    await store.add("/myRoute", {"target": "http://localhost:8213", "version": 1, "test": "value"})
    await store.update("/myRoute", {"version": 2})
    assert await store.get("/myRoute") == {
        "target": "http://localhost:8213",
        "version": 2,
        "test": "value",
    }


async def test_update_missing_leaves_it_missing(store: MemoryStore) -> None:
    await store.update("/nope", {"version": 2})
    assert await store.get("/nope") is None


async def test_remove(store: MemoryStore) -> None:
    await store.add("/myRoute", {"target": "http://localhost:8213"})
    assert await store.remove("/myRoute") is True
    assert await store.get("/myRoute") is None


async def test_remove_missing_nested_path(store: MemoryStore) -> None:
    assert await store.remove("/definitely/not/here") is False


async def test_has_route(store: MemoryStore) -> None:
    await store.add("/myRoute", {"target": "http://localhost:8213"})
    assert await store.get("/myRoute")
    assert await store.get("/wut") is None


async def test_data_is_copied_in_and_out(store: MemoryStore) -> None:
    data = {"target": "http://x", "nested": {"list": [1]}}
    await store.add("/a", data)
    data["nested"]["list"].append(2)  # the caller's object is not the store's
    data["target"] = "http://changed"
    got = await store.get("/a")
    assert got == {"target": "http://x", "nested": {"list": [1]}}
    assert got is not None
    got["target"] = "http://mine"  # top-level keys of a result are the caller's
    assert (await store.get("/a"))["target"] == "http://x"  # type: ignore[index]
    everything = await store.get_all()
    del everything["/a"]  # the mapping is the caller's (its data is only to be read)
    assert (await store.get("/a"))["target"] == "http://x"  # type: ignore[index]


async def test_record_activity_keeps_the_newest(store: MemoryStore) -> None:
    now = datetime.now(UTC)
    await store.add("/a", {"target": "http://a", "last_activity": now})
    await store.add("/b", {"target": "http://b"})
    await store.record_activity({"/a": now - timedelta(seconds=5), "/b": now, "/missing": now})
    assert (await store.get("/a"))["last_activity"] == now  # type: ignore[index]
    assert (await store.get("/b"))["last_activity"] == now  # type: ignore[index]
    assert await store.get("/missing") is None
    later = now + timedelta(seconds=1)
    await store.record_activity({"/a": later})
    assert (await store.get("/a"))["last_activity"] == later  # type: ignore[index]


async def test_record_activity_over_a_naive_time(store: MemoryStore) -> None:
    naive = datetime(2000, 1, 1)
    await store.add("/a", {"target": "http://a", "last_activity": naive})
    aware = datetime(2000, 1, 1, 0, 0, 1, tzinfo=UTC)
    await store.record_activity({"/a": aware})
    assert (await store.get("/a"))["last_activity"] == aware  # type: ignore[index]


# -- the change feed ----------------------------------------------------------------------------


async def test_watch_starts_with_the_current_routes(store: MemoryStore) -> None:
    await store.add("/", {"target": "http://root"})
    await store.add("/a/b", {"target": "http://ab"})
    table = RouteTable()
    store.watch(table)
    assert table.lookup("/x").target == "http://root"  # type: ignore[union-attr]
    assert table.lookup("/a/b/c").target == "http://ab"  # type: ignore[union-attr]
    assert len(table) == 2


async def test_table_follows_add_replace_remove(store: MemoryStore) -> None:
    table = RouteTable()
    store.watch(table)
    assert table.lookup("/user/x") is None

    await store.add("/user/x", {"target": "http://one"})
    assert table.lookup("/user/x/lab").target == "http://one"  # type: ignore[union-attr]

    await store.add("/user/x", {"target": "http://two"})
    assert table.lookup("/user/x/lab").target == "http://two"  # type: ignore[union-attr]
    assert len(table) == 1

    await store.update("/user/x", {"target": "http://three"})
    assert table.lookup("/user/x/lab").target == "http://three"  # type: ignore[union-attr]

    await store.update("/user/x", {"last_activity": datetime.now(UTC)})  # activity: no event
    assert table.lookup("/user/x/lab").target == "http://three"  # type: ignore[union-attr]

    assert await store.remove("/user/x") is True
    assert table.lookup("/user/x/lab") is None
    assert len(table) == 0
    assert table._root.children == {}


async def test_several_followers(store: MemoryStore) -> None:
    first, second = RouteTable(), RouteTable()
    store.watch(first)
    await store.add("/a", {"target": "http://a"})
    store.watch(second)
    await store.add("/b", {"target": "http://b"})
    await store.remove("/a")
    for table in (first, second):
        assert [route.key for route in table] == ["/b"]


async def test_activity_is_not_a_change(store: MemoryStore) -> None:
    events: list[tuple[str, str]] = []

    class Listener:
        def route_set(self, key: str, data: object) -> None:
            events.append(("set", key))

        def route_removed(self, key: str) -> None:
            events.append(("removed", key))

        def routes_reset(self, routes: object) -> None:
            events.append(("reset", ""))

    store.watch(Listener())
    await store.add("/a", {"target": "http://a"})
    await store.record_activity({"/a": datetime.now(UTC)})
    await store.update("/a", {"last_activity": datetime.now(UTC)})
    await store.remove("/a")
    await store.remove("/a")
    assert events == [("reset", ""), ("set", "/a"), ("removed", "/a")]


# -- what every store shares (store/base.py): newest activity wins, rows ------------------------

T0 = datetime(2000, 1, 1, tzinfo=UTC)
T1 = T0 + timedelta(seconds=1)


@pytest.mark.parametrize(
    ("current", "mark", "kept"),
    [
        (None, T0, T0),  # nothing kept yet
        (T0, T1, T1),
        (T1, T0, T1),
        (T0, T0.astimezone(timezone(timedelta(hours=2))), T0),  # a tie keeps what was there
        (datetime(2000, 1, 1), T1, T1),  # naive is UTC
        (datetime(2000, 1, 1, 0, 0, 2), T1, datetime(2000, 1, 1, 0, 0, 2)),
        ("2000-01-01", T0, T0),  # plain data a client stored is no time
        (None, 5.0, 5.0),  # the flusher's wall-clock seconds
        (6.0, 5.0, 6.0),
        (5.0, 6.0, 6.0),
    ],
)
def test_keep_newest(current: object, mark: Any, kept: Any) -> None:
    assert keep_newest(current, mark) == kept
    assert type(keep_newest(current, mark)) is type(kept)


def test_merge_newest() -> None:
    routes: dict[str, dict[str, Any]] = {
        "/old": {"target": "x", "last_activity": T0},
        "/new": {"target": "x", "last_activity": T1},
        "/none": {"target": "x"},
    }
    merge_newest(routes, {"/old": T1, "/new": T0, "/none": T0, "/gone": T1})
    assert {k: v["last_activity"] for k, v in routes.items()} == {
        "/old": T1,
        "/new": T1,
        "/none": T0,
    }


@pytest.mark.parametrize(
    "data",
    [
        {"target": "http://x", "last_activity": T0.replace(microsecond=123456)},
        {"target": "http://x"},
        {"target": "http://x", "last_activity": "yesterday"},  # not a time: plain data
        {"target": "http://x", "user": "秀樹", "nested": {"a": [1, None]}},
    ],
)
def test_encode_row_and_back(data: dict[str, Any]) -> None:
    text, micros = encode_row(data)
    assert text.isascii()
    assert (micros is None) == (not isinstance(data.get("last_activity"), datetime))
    assert "last_activity" not in text or micros is None
    assert decode_row(text, micros) == data

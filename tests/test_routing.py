"""The route trie and key normalisation (spec §2.3, §3.2–3.3; CHP's trie_spec.js, §6.6)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hubproxy.routing import Route, RouteTable, _Node, clean_path, split_segments


def table_with(*keys: str) -> RouteTable:
    table = RouteTable()
    for key in keys:
        table.route_set(key, {"target": f"http://t{key}"})
    return table


def prefix_of(table: RouteTable, path: str) -> str | None:
    route = table.lookup(path)
    return None if route is None else route.prefix


def node_at(table: RouteTable, path: str) -> _Node:
    node = table._root
    for segment in split_segments(path):
        node = node.children[segment]
    return node


# -- clean_path (spec §2.3) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "key"),
    [
        ("/user/foo@bar/", "/user/foo@bar"),
        ("/has space/ü", "/has space/ü"),
        ("//", "/"),
        ("/a//", "/a/"),  # only one trailing slash goes
        ("/", "/"),
        ("", "/"),
        ("foo", "/foo"),
        ("foo/", "/foo"),
        ("/foo", "/foo"),
        ("//foo", "//foo"),  # leading slashes are kept
        ("/秀樹", "/秀樹"),
    ],
)
def test_clean_path(path: str, key: str) -> None:
    assert clean_path(path) == key


@pytest.mark.parametrize(
    ("path", "segments"),
    [
        ("", []),
        ("/", []),
        ("//", []),
        ("/a", ["a"]),
        ("a/b/", ["a", "b"]),
        ("/bar//x", ["bar", "", "x"]),
        ("///a///", ["a"]),
    ],
)
def test_split_segments(path: str, segments: list[str]) -> None:
    assert split_segments(path) == segments


# -- trie_spec.js --------------------------------------------------------------------------------


def test_init() -> None:
    table = RouteTable()
    root = table._root
    assert root.prefix == "/"
    assert root.children == {}
    assert root.route is None
    assert len(table) == 0
    assert table.lookup("/") is None


def test_root() -> None:
    table = table_with("/")
    for path in ("/1/etc/etc/", "/", ""):
        route = table.lookup(path)
        assert route is not None
        assert route.prefix == "/"
        assert route.key == "/"
        assert route.target == "http://t/"


def test_add() -> None:
    table = RouteTable()
    table.route_set("foo", {"target": "http://foo"})
    assert len(table._root.children) == 1
    assert table._root.children["foo"].route is not None
    assert table._root.children["foo"].prefix == "/foo"

    table.route_set("bar/leaf", {"target": "http://leaf"})
    assert len(table._root.children) == 2
    bar = table._root.children["bar"]
    assert bar.prefix == "/bar"
    assert bar.route is None
    assert bar.children["leaf"].prefix == "/bar/leaf"
    assert bar.children["leaf"].route is not None

    table.route_set("/a/b/c/d", {"target": "http://abcd"})
    assert len(table._root.children) == 3
    node = table._root
    for depth, segment in enumerate("abcd", 1):
        node = node.children[segment]
        assert node.prefix == "/" + "/".join("abcd"[:depth])
        assert len(node.children) == (0 if segment == "d" else 1)
        assert (node.route is not None) == (segment == "d")


GET_ROUTES = ("/1", "/2", "/a/b/c/d", "/a/b/d", "/a/b/e", "/b", "/b/c", "/b/c/d")


@pytest.mark.parametrize(
    ("path", "prefix"),
    [
        ("/not/found", None),
        ("/a", None),
        ("/a/b/c", None),
        ("/1/etc/etc/", "/1"),
        ("/1", "/1"),
        ("/2/", "/2"),
        ("/a/b/c/d/e/f", "/a/b/c/d"),
        ("/b/c/d/word", "/b/c/d"),
        ("/b/c/dword", "/b/c"),
        ("/b/cd", "/b"),
        ("/b/c?x", "/b"),  # the query is not the table's business: `c?x` is one segment
        ("/bar//x", None),
        ("b", "/b"),
        ("///b/c///", "/b/c"),  # all leading and trailing slashes are ignored
        ("//b//c//", "/b"),  # inner ones are not: `b`, ``, `c`
        ("/B", None),  # case-sensitive
    ],
)
def test_get(path: str, prefix: str | None) -> None:
    table = table_with(*GET_ROUTES)
    assert prefix_of(table, path) == prefix


def test_get_returns_target_and_key() -> None:
    table = table_with(*GET_ROUTES)
    route = table.lookup("/b/c/d/word")
    assert isinstance(route, Route)
    assert (route.key, route.prefix, route.target) == ("/b/c/d", "/b/c/d", "http://t/b/c/d")


def test_empty_segments_match_whole_segments() -> None:
    table = table_with("/bar")
    assert prefix_of(table, "/bar//x") == "/bar"
    table.route_set("/bar//x", {"target": "http://x"})
    assert prefix_of(table, "/bar//x/y") == "/bar//x"
    assert prefix_of(table, "/bar/x") == "/bar"
    assert table._root.children["bar"].children[""].prefix == "/bar/"


def test_remove() -> None:
    table = table_with(*GET_ROUTES)
    assert prefix_of(table, "/b/just-b") == "/b"
    size_before = len(table._root.children)
    table.route_removed("/b")
    assert len(table._root.children) == size_before  # /b still has children
    assert table.lookup("/b/just-b") is None
    assert prefix_of(table, "/b/c/word") == "/b/c"

    b = node_at(table, "/a/b")
    assert len(b.children) == 3
    table.route_removed("/a/b/c/d")
    assert len(b.children) == 2  # c pruned: no data and no branches left
    assert "c" not in b.children
    assert prefix_of(table, "/a/b/c/d") is None
    assert prefix_of(table, "/a/b/d") == "/a/b/d"

    table.route_set("/", {"target": "http://root"})
    assert prefix_of(table, "/") == "/"
    table.route_removed("/")
    assert table.lookup("/") is None
    assert prefix_of(table, "/1") == "/1"  # removing the root removes its data only


def test_remove_missing_is_a_noop() -> None:
    table = table_with("/a/b")
    table.route_removed("/nope")
    table.route_removed("/a/b/c/d")
    table.route_removed("/a")
    assert prefix_of(table, "/a/b") == "/a/b"
    assert len(table) == 1


def test_remove_prunes_whole_chain() -> None:
    table = table_with("/x", "/a/b/c/d")
    table.route_removed("/a/b/c/d")
    assert list(table._root.children) == ["x"]


def test_sub_paths() -> None:
    table = table_with("/", "/prefix/sub/tree")
    assert prefix_of(table, "/prefix") == "/"
    assert prefix_of(table, "/prefix/sub") == "/"
    assert prefix_of(table, "/prefix/sub/tree/x") == "/prefix/sub/tree"
    table.route_set("/prefix", {"target": "http://prefix"})
    assert prefix_of(table, "/prefix") == "/prefix"
    assert prefix_of(table, "/prefix/sub") == "/prefix"


def test_remove_first_leaf_does_not_remove_root() -> None:
    table = table_with("/", "/prefix")
    table.route_removed("/prefix/")  # a key the table never had: nothing happens
    assert prefix_of(table, "/prefix/sub") == "/prefix"
    table.route_removed("/prefix")
    assert prefix_of(table, "/prefix/sub") == "/"
    assert table._root.children == {}


# -- following a store ----------------------------------------------------------------------------


def test_replace_changes_target_and_keeps_unflushed_activity() -> None:
    table = table_with("/a")
    old = table.lookup("/a/x")
    assert old is not None
    table.mark_active(old, 100.0)
    table.route_set("/a", {"target": "http://new"})
    new = table.lookup("/a/x")
    assert new is not None and new.target == "http://new"
    assert new.active_at == 100.0
    assert table.take_activity() == {"/a": 100.0}


def test_replace_with_same_target_is_a_noop() -> None:
    table = table_with("/a")
    before = table.lookup("/a")
    table.route_set("/a", {"target": "http://t/a", "extra": True})
    assert table.lookup("/a") is before


def test_data_without_string_target_is_not_routable() -> None:
    table = table_with("/a")
    table.route_set("/a", {"target": 1})
    assert table.lookup("/a") is None
    assert len(table) == 0
    table.route_set("/b", {})
    assert table.lookup("/b") is None


def test_routes_reset() -> None:
    table = table_with("/a", "/b/c", "/d")
    table.routes_reset({"/b/c": {"target": "http://bc2"}, "/e": {"target": "http://e"}})
    assert sorted(route.key for route in table) == ["/b/c", "/e"]
    assert table.lookup("/a") is None
    assert table.lookup("/b/c/x").target == "http://bc2"  # type: ignore[union-attr]
    assert set(table._root.children) == {"b", "e"}


def test_alias_keys_share_a_node() -> None:
    # `/a` and `/a/` (or `//a`) are different store keys on the same trie node: the newest set
    # wins, and removing it brings the other back (CHP would leave `/a` listed but unroutable)
    table = table_with("/a")
    table.route_set("/a/", {"target": "http://slash"})
    assert table.lookup("/a").target == "http://slash"  # type: ignore[union-attr]
    table.route_set("/a", {"target": "http://t/a"})  # re-set with the same target: newest again
    assert table.lookup("/a").key == "/a"  # type: ignore[union-attr]
    table.route_set("//a", {"target": "http://double"})
    table.route_removed("//a")
    assert table.lookup("/a").key == "/a"  # type: ignore[union-attr]
    table.route_removed("/a")
    assert table.lookup("/a").key == "/a/"  # type: ignore[union-attr]
    table.route_removed("/a/")
    assert table.lookup("/a") is None
    assert table._root.children == {}
    table.route_removed("/a")  # no KeyError on a pruned branch


# -- activity ------------------------------------------------------------------------------------


def test_activity_is_taken_once() -> None:
    table = table_with("/a", "/b")
    a, b = table.get("/a"), table.get("/b")
    assert a is not None and b is not None
    table.mark_active(a, 1.0)
    table.mark_active(a, 2.0)
    table.mark_active(b, 3.0)
    assert table.take_activity() == {"/a": 2.0, "/b": 3.0}
    assert table.take_activity() == {}


def test_activity_of_a_replaced_route_keeps_the_newest_mark() -> None:
    table = table_with("/a")
    old = table.get("/a")
    assert old is not None
    table.route_set("/a", {"target": "http://new"})
    new = table.get("/a")
    assert new is not None
    table.mark_active(new, 5.0)
    table.mark_active(old, 7.0)  # a request that started before the replacement finishes
    assert table.take_activity() == {"/a": 7.0}


def test_activity_of_a_removed_route_is_dropped() -> None:
    table = table_with("/a")
    route = table.get("/a")
    assert route is not None
    table.mark_active(route, 1.0)
    table.route_removed("/a")
    assert table.take_activity() == {}


# -- property: the trie is a longest whole-segment prefix match ---------------------------------

segment = st.sampled_from(["a", "b", "c", "", "é", "x y"])
# keys from few segments, so that aliases (`/a`, `/a/`, `//a`: one node, several keys) are common
key_segment = st.sampled_from(["a", "b", ""])
key_text = st.lists(key_segment, max_size=4).map(lambda parts: clean_path("/" + "/".join(parts)))
operation = st.tuples(st.booleans(), key_text)


def brute_force(model: dict[str, tuple[int, str]], path: str) -> str | None:
    """The key whose segments are the longest prefix of the path's; the newest set on ties."""
    wanted = split_segments(path)
    best: tuple[int, int, str] | None = None
    for key, (serial, _target) in model.items():
        segs = split_segments(key)
        if wanted[: len(segs)] == segs:
            candidate = (len(segs), serial, key)
            if best is None or candidate > best:
                best = candidate
    return None if best is None else best[2]


@settings(max_examples=300, deadline=None)
@given(
    operations=st.lists(operation, max_size=30),
    paths=st.lists(st.lists(segment, max_size=6).map("/".join), min_size=1, max_size=10),
)
def test_lookup_is_longest_segment_prefix(
    operations: list[tuple[bool, str]], paths: list[str]
) -> None:
    table = RouteTable()
    model: dict[str, tuple[int, str]] = {}
    for serial, (add, key) in enumerate(operations):
        if add:
            target = f"http://t{serial % 3}"
            table.route_set(key, {"target": target})
            model[key] = (serial, target)
        else:
            table.route_removed(key)
            model.pop(key, None)
    assert sorted(route.key for route in table) == sorted(model)
    for path in [*paths, *model]:
        expected = brute_force(model, path)
        route = table.lookup(path)
        assert (route.key if route else None) == expected, path
        if route is not None:
            assert route.target == model[route.key][1]
            assert route.prefix == "/" + "/".join(split_segments(route.key))
    # nothing is left behind: every leaf of the trie carries a route
    stack = [table._root]
    while stack:
        node = stack.pop()
        for child in node.children.values():
            assert child.route is not None or child.children
            stack.append(child)

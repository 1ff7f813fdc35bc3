"""The in-memory route table: a trie of path segments with CHP's longest-prefix semantics.

The data plane asks it one question per request, `lookup(key)`, which walks at most one node per
path segment, so its cost depends on the depth of the path and never on the size of the table.
The table is a cache of the route store: it follows the store's change feed (`route_set`,
`route_removed`, `routes_reset`) and never calls the store itself.

Activity is marked here on the hot path (`mark_active`: one attribute write and one set insert)
and collected in batches by `take_activity`, so no request ever waits for the store.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any


def clean_path(path: str) -> str:
    """CHP's key normalisation for an already percent-decoded API path.

    Prepends `/` when missing and removes exactly one trailing `/` (so `/a//` stays `/a/`).
    """
    if not path.startswith("/"):
        path = "/" + path
    if len(path) > 1 and path.endswith("/"):
        path = path[:-1]
    return path


def split_segments(path: str) -> list[str]:
    """The trie segments of a key: leading and trailing slashes ignored, inner empty ones kept."""
    path = path.strip("/")
    return path.split("/") if path else []


class Route:
    """One entry of the table, as the data plane sees it."""

    __slots__ = ("active_at", "key", "prefix", "target")

    def __init__(self, key: str, prefix: str, target: str) -> None:
        self.key = key  # the store's key (cleaned API path)
        self.prefix = prefix  # the trie's prefix: segments joined by `/`, used for stripping
        self.target = target
        self.active_at = 0.0  # wall-clock seconds of the newest unflushed activity

    def __repr__(self) -> str:
        return f"Route({self.prefix!r} -> {self.target!r})"


class _Node:
    __slots__ = ("children", "prefix", "route", "shadowed")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.children: dict[str, _Node] = {}
        self.route: Route | None = None
        # Routes of other keys that land on this same node (`/a` and `/a/`, `//a`: keys differ
        # but their segments do not), oldest first. The newest set wins, as in CHP, but removing
        # it brings the previous one back instead of leaving a listed route unroutable.
        self.shadowed: list[Route] | None = None


class RouteTable:
    """Longest-prefix match on whole path segments; see spec §3.2–3.3."""

    def __init__(self) -> None:
        self._root = _Node("/")
        self._routes: dict[str, Route] = {}  # store key -> route
        self._dirty: set[Route] = set()

    # -- the hot path -------------------------------------------------------------------------

    def lookup(self, key: str) -> Route | None:
        """The route of the deepest node on `key`'s path that carries one, or None."""
        node = self._root
        best = node.route
        stripped = key.strip("/")
        if not stripped:
            return best
        children = node.children
        for segment in stripped.split("/"):
            node = children.get(segment)  # type: ignore[assignment]
            if node is None:
                break
            if node.route is not None:
                best = node.route
            children = node.children
        return best

    def mark_active(self, route: Route, when: float | None = None) -> None:
        route.active_at = time.time() if when is None else when
        self._dirty.add(route)

    # -- following the store --------------------------------------------------------------------

    def route_set(self, key: str, data: Mapping[str, Any]) -> None:
        """Add or replace the route stored under `key` (an already cleaned key)."""
        target = data.get("target")
        if not isinstance(target, str):
            # not routable (the API never stores such data); forget any previous route
            self.route_removed(key)
            return
        node = self._root
        for segment in split_segments(key):
            child = node.children.get(segment)
            if child is None:
                prefix = "/" + segment if node is self._root else node.prefix + "/" + segment
                child = node.children[segment] = _Node(prefix)
            node = child
        old = self._routes.get(key)
        if old is not None and old.target == target and node.route is old:
            return
        if old is None or old.target != target:
            route = Route(key, node.prefix, target)
            if old is not None:
                # keep unflushed activity: requests in flight may still mark the old object
                route.active_at = old.active_at
                if self._dirty_remove(old):
                    self._dirty.add(route)
        else:
            route = old  # same target, but shadowed by an alias: bring it back to the front
        if old is not None:
            if node.route is old:
                node.route = None
            else:
                assert node.shadowed is not None
                node.shadowed.remove(old)
        if node.route is not None:
            if node.shadowed is None:
                node.shadowed = []
            node.shadowed.append(node.route)
        node.route = route
        if not node.shadowed:
            node.shadowed = None
        self._routes[key] = route

    def route_removed(self, key: str) -> None:
        route = self._routes.pop(key, None)
        if route is None:
            return
        self._dirty_remove(route)
        segments = split_segments(key)
        path: list[_Node] = [self._root]
        node = self._root
        for segment in segments:
            node = node.children[segment]
            path.append(node)
        if node.route is route:
            node.route = node.shadowed.pop() if node.shadowed else None
        elif node.shadowed is not None:
            node.shadowed.remove(route)
        if not node.shadowed:
            node.shadowed = None
        # prune branches left with neither data nor children, deepest first
        for depth in range(len(segments), 0, -1):
            child = path[depth]
            if child.route is not None or child.children:
                break
            del path[depth - 1].children[segments[depth - 1]]

    def routes_reset(self, routes: Mapping[str, Mapping[str, Any]]) -> None:
        """Replace the whole table (a store's full resynchronisation)."""
        for key in [k for k in self._routes if k not in routes]:
            self.route_removed(key)
        for key, data in routes.items():
            self.route_set(key, data)

    def _dirty_remove(self, route: Route) -> bool:
        if route in self._dirty:
            self._dirty.discard(route)
            return True
        return False

    # -- activity --------------------------------------------------------------------------------

    def merge_activity(self, marks: Mapping[str, float]) -> None:
        """Take another table's `take_activity()` (a worker's): each route keeps the newer mark."""
        for key, when in marks.items():
            route = self._routes.get(key)
            if route is not None and when > route.active_at:
                self.mark_active(route, when)

    def take_activity(self) -> dict[str, float]:
        """The newest activity per store key since the last call, and forget it."""
        if not self._dirty:
            return {}
        marks: dict[str, float] = {}
        for route in self._dirty:
            # a replaced route's old object may still be marked by requests in flight
            if route.active_at > marks.get(route.key, 0.0):
                marks[route.key] = route.active_at
        self._dirty.clear()
        return marks

    # -- inspection ------------------------------------------------------------------------------

    def get(self, key: str) -> Route | None:
        return self._routes.get(key)

    def __len__(self) -> int:
        return len(self._routes)

    def __iter__(self) -> Iterator[Route]:
        return iter(self._routes.values())

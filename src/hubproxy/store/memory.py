"""The embedded default store: routes live in this process's memory only (CHP's behaviour).

Data is copied on the way in (`add` deep-copies, so a caller's later changes never leak into the
table). `get` returns a shallow copy; `get_all` returns a new mapping of the stored data itself,
which callers only read (see the protocol).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from hubproxy.store.base import ChangeListener, RouteData, copy_data, merge_newest


class MemoryStore:
    def __init__(self) -> None:
        self._routes: dict[str, RouteData] = {}
        self._listeners: list[ChangeListener] = []

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def get(self, key: str) -> RouteData | None:
        data = self._routes.get(key)
        return dict(data) if data is not None else None

    async def get_all(self) -> dict[str, RouteData]:
        # a new mapping of the live data: copying 10,000 routes would cost GET /api/routes ~6 ms
        return dict(self._routes)

    async def add(self, key: str, data: RouteData) -> None:
        self._routes[key] = copy_data(data)
        for listener in self._listeners:
            listener.route_set(key, self._routes[key])

    async def update(self, key: str, data: RouteData) -> None:
        route = self._routes.get(key)
        if route is None:
            return
        # a new dict, not an in-place merge: readers may hold the old one (and GET all's
        # serialisation cache tells routes apart by identity); the key keeps its place
        self._routes[key] = route = {**route, **copy_data(data)}
        if "target" in data:
            for listener in self._listeners:
                listener.route_set(key, route)

    async def remove(self, key: str) -> bool:
        if self._routes.pop(key, None) is None:
            return False
        for listener in self._listeners:
            listener.route_removed(key)
        return True

    async def record_activity(self, activity: Mapping[str, datetime]) -> None:
        merge_newest(self._routes, activity)

    def watch(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)
        listener.routes_reset(self._routes)

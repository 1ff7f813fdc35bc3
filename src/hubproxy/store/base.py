"""The RouteStore protocol: the one narrow interface every route store implements.

The store is the truth; each process's RouteTable is a cache of it, kept current through the
change feed (`watch`). Keys given to a store are always cleaned (`routing.clean_path`: the API
cleans them, unlike CHP's plugins, which clean inside `get`/`remove`); data is a JSON-like dict
whose `last_activity`, when present, is an aware UTC `datetime` (the API serialises it).

Data returned by `get` is the caller's to change at the top level only (nested values may be
shared with the store); the mapping `get_all` returns is the caller's, but its route data may be
the store's own and must only be read (GET /api/routes serialises 10,000 routes without copying
them). Any method may raise `StoreUnavailable` when the backing service is down; the API answers
503 then.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar, runtime_checkable

RouteData = dict[str, Any]
_Time = TypeVar("_Time", float, datetime)


class ChangeListener(Protocol):
    """What a store tells its followers (the RouteTable implements this)."""

    def route_set(self, key: str, data: Mapping[str, Any]) -> None: ...

    def route_removed(self, key: str) -> None: ...

    def routes_reset(self, routes: Mapping[str, Mapping[str, Any]]) -> None: ...


class StoreUnavailable(Exception):
    """The store cannot take writes right now (the API answers 503, which JupyterHub retries)."""


class StoreSpecError(ValueError):
    """A --storage-backend value that names no store we can build, or a store that cannot open.

    The message is one line for the log; the process exits 1 with it.
    """


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_IMMUTABLE = (str, int, float, bool, type(None), datetime)


def copy_data(value: Any) -> Any:
    """A deep copy of route data: dicts and lists copied, JSON scalars and datetimes shared
    (they cannot change), anything else through `copy.deepcopy`. A fifth of the cost of
    `copy.deepcopy`, which reconstructs each datetime (every route carries one)."""
    if isinstance(value, dict):
        return {k: v if isinstance(v, _IMMUTABLE) else copy_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [v if isinstance(v, _IMMUTABLE) else copy_data(v) for v in value]
    if isinstance(value, _IMMUTABLE):
        return value
    return copy.deepcopy(value)


def to_micros(when: datetime) -> int:
    """Microseconds since the epoch of an aware (or naive UTC) datetime: how stores keep times."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (when - _EPOCH) // timedelta(microseconds=1)


def from_micros(micros: int) -> datetime:
    """The aware UTC datetime for `to_micros`'s number (exact both ways)."""
    return _EPOCH + timedelta(microseconds=micros)


def _aware(when: datetime) -> datetime:
    """Naive datetimes are UTC by the stores' convention (never compare naive with aware)."""
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


# -- newest activity wins -------------------------------------------------------------------------


def keep_newest(current: object, mark: _Time) -> _Time:
    """The later of a time already kept and a new activity mark (a tie keeps `current`).

    `current` loses when it is no time of the mark's kind: None (nothing kept yet), or a route's
    `last_activity` that a client stored as plain data. Naive datetimes are UTC.
    """
    if isinstance(mark, datetime):
        if isinstance(current, datetime) and _aware(current) >= _aware(mark):
            return current
        return mark
    if isinstance(current, float) and current >= mark:
        return current
    return mark


def merge_newest(routes: Mapping[str, RouteData], marks: Mapping[str, datetime]) -> None:
    """Record activity marks in route data, in place: each route's `last_activity` becomes the
    newer of the two times. Marks of routes not in `routes` are dropped (activity never creates
    a route)."""
    for key, when in marks.items():
        route = routes.get(key)
        if route is not None:
            route["last_activity"] = keep_newest(route.get("last_activity"), when)


# -- route data as a row: how the SQLite and Redis stores keep it ---------------------------------


def encode_row(data: Mapping[str, Any]) -> tuple[str, int | None]:
    """(JSON of the data without a datetime `last_activity`, that time in microseconds or None).

    The time is kept apart so that a store can merge activity (newest wins) without parsing the
    JSON. The JSON is ASCII only: a lone surrogate (valid in a JSON body) can never fail the
    encoding of a whole batch or command.
    """
    activity = data.get("last_activity")
    if isinstance(activity, datetime):
        data = {k: v for k, v in data.items() if k != "last_activity"}
        micros: int | None = to_micros(activity)
    else:
        micros = None
    return json.dumps(data, separators=(",", ":")), micros


def decode_row(text: str, micros: int | None) -> RouteData:
    """The route data that `encode_row` gave (text, micros) for."""
    data: RouteData = json.loads(text)
    if micros is not None:
        data["last_activity"] = from_micros(micros)
    return data


@runtime_checkable
class RouteStore(Protocol):
    async def start(self) -> None:
        """Connect or open; afterwards get_all() answers and the change feed runs."""

    async def close(self) -> None: ...

    async def get(self, key: str) -> RouteData | None:
        """The route's data, or None."""

    async def get_all(self) -> dict[str, RouteData]:
        """Every route, in insertion order (re-adding a key keeps its place); read-only data."""

    async def add(self, key: str, data: RouteData) -> None:
        """Store `data` under `key`, replacing any previous data entirely."""

    async def update(self, key: str, data: RouteData) -> None:
        """Shallow-merge `data` into the existing route; a missing route is left missing."""

    async def remove(self, key: str) -> bool:
        """Remove the route; True if it existed."""

    async def record_activity(self, activity: Mapping[str, datetime]) -> None:
        """Merge a batch of activity marks: each route keeps the newer of the two times."""

    def watch(self, listener: ChangeListener) -> None:
        """Follow route additions, replacements and removals (not activity) from now on."""

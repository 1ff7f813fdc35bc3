"""Route stores: where the route table is kept (memory by default)."""

from __future__ import annotations

from hubproxy.store.base import ChangeListener, RouteData, RouteStore, StoreUnavailable
from hubproxy.store.memory import MemoryStore

__all__ = [
    "ChangeListener",
    "MemoryStore",
    "RouteData",
    "RouteStore",
    "StoreSpecError",
    "StoreUnavailable",
    "open_store",
]


class StoreSpecError(ValueError):
    """A --storage-backend value that names no store we can build."""


def open_store(spec: str | None) -> RouteStore:
    """Build (not yet start) the store that `--storage-backend` names."""
    if spec is None or spec == "memory":
        return MemoryStore()
    raise StoreSpecError(f"--storage-backend {spec} is not supported yet")

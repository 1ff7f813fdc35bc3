"""Route stores: where the route table is kept, chosen by `--storage-backend` (docs/stores.md).

- `memory` (or no option): `MemoryStore`, this process only, as CHP.
- `sqlite:///abs/path.db`, `sqlite://rel/path.db`, or a path ending in `.db`, `.sqlite` or
  `.sqlite3`: `SQLiteStore`, one file, across restarts (`?synchronous=normal`: faster, but a
  power cut may lose the last writes).
- `redis://[:password@]host[:port][/db]`, `rediss://...`, `unix:///path/redis.sock[?db=N]`:
  `RedisStore`, shared by replicas (`pip install 'hubproxy[redis]'`; `?prefix=name` for keys).
- `package.module:Class`: a third-party class implementing `RouteStore`, called with no arguments.

`open_store` builds the store (importing what it needs) without connecting; `start()` connects.
Both raise `StoreSpecError` (one line, exit 1) for a value or a store that cannot be used.
"""

from __future__ import annotations

import importlib
import inspect
import re
from urllib.parse import parse_qsl

from hubproxy.store.base import (
    ChangeListener,
    RouteData,
    RouteStore,
    StoreSpecError,
    StoreUnavailable,
)
from hubproxy.store.memory import MemoryStore

__all__ = [
    "ChangeListener",
    "MemoryStore",
    "RouteData",
    "RouteStore",
    "StoreSpecError",
    "StoreUnavailable",
    "load_plugin",
    "open_store",
]

SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
REDIS_SCHEMES = ("redis", "rediss", "unix")
USAGE = (
    "expected memory, sqlite:///path/routes.db (or a path ending in .db), "
    "redis://host:port/db (rediss://, unix://) or module:Class"
)
_PLUGIN = re.compile(r"[A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
_ASYNC_METHODS = ("start", "close", "get", "get_all", "add", "update", "remove", "record_activity")


def open_store(spec: str | None) -> RouteStore:
    """Build (not yet start) the store that `--storage-backend` names."""
    if spec is None or spec == "memory":
        return MemoryStore()
    scheme, sep, _ = spec.partition("://")
    scheme = scheme.lower() if sep else ""
    if scheme == "sqlite":
        return _sqlite(spec, spec[len("sqlite://") :])
    if scheme in REDIS_SCHEMES:
        return _redis(spec)
    if not sep and spec.lower().endswith(SQLITE_SUFFIXES):
        return _sqlite(spec, spec)
    if _PLUGIN.fullmatch(spec):
        return load_plugin(spec)
    raise StoreSpecError(f"--storage-backend {spec}: {USAGE}")


def _sqlite(spec: str, rest: str) -> RouteStore:
    from hubproxy.store.sqlite import SQLiteStore

    path, _, query = rest.partition("?")
    if not path:
        raise StoreSpecError(f"--storage-backend {spec}: no file named ({USAGE})")
    synchronous = "full"
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name == "synchronous" and value.lower() in ("full", "normal"):
            synchronous = value.lower()
        else:
            raise StoreSpecError(
                f"--storage-backend {spec}: unknown option {name}={value} "
                "(the one option is synchronous=full|normal)"
            )
    return SQLiteStore(path, synchronous, spec=spec)


def _redis(spec: str) -> RouteStore:
    try:
        from hubproxy.store.redis import RedisStore, redact
    except ImportError as e:
        raise StoreSpecError(
            f"--storage-backend {spec.partition('://')[0]}://...: the Redis store needs redis-py "
            f"(pip install 'hubproxy[redis]'): {e}"
        ) from None
    try:
        return RedisStore(spec)
    except ValueError as e:
        if isinstance(e, StoreSpecError):
            raise
        raise StoreSpecError(f"--storage-backend {redact(spec)}: {e}") from None


def load_plugin(spec: str) -> RouteStore:
    """`package.module:Class`: import the module, call the class, check the protocol."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the module raises while importing
        raise StoreSpecError(
            f"--storage-backend {spec}: cannot import {module_name}: {type(e).__name__}: {e}"
        ) from None
    factory: object = module
    for part in attr.split("."):
        try:
            factory = getattr(factory, part)
        except AttributeError:
            raise StoreSpecError(f"--storage-backend {spec}: {module_name} has no {attr}") from None
    if not callable(factory):
        raise StoreSpecError(f"--storage-backend {spec}: {attr} is not a class")
    try:
        store: RouteStore = factory()  # a plugin: checked against the protocol below
    except Exception as e:
        raise StoreSpecError(f"--storage-backend {spec}: {type(e).__name__}: {e}") from None
    missing = [
        name
        for name in (*_ASYNC_METHODS, "watch")
        if not callable(getattr(store, name, None))
        or (name != "watch") != inspect.iscoroutinefunction(getattr(store, name))
    ]
    if missing:
        raise StoreSpecError(
            f"--storage-backend {spec}: not a RouteStore (needs async "
            f"{', '.join(_ASYNC_METHODS)} and a plain watch; wrong or missing: "
            f"{', '.join(missing)})"
        )
    return store

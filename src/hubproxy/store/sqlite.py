"""The SQLite store: routes kept in one file, across restarts and `kill -9` (stdlib sqlite3).

Theory of operation.

- **The file is the truth; the process keeps a mirror.** `start()` loads every row into an
  insertion-ordered dict, which answers `get` and `get_all` without touching the file (GET all
  with 10,000 routes costs what it costs with the memory store) and which the RouteTable follows.
- **One writer thread owns the only connection.** Every write (`add`, `update`, `remove`,
  `record_activity`) is queued to it; the thread commits whatever is queued together (group
  commit: ten concurrent API writes cost one commit) and only then resolves the callers' futures
  and applies the change to the mirror, on the event loop, in queue order. So the API answers a
  write only after it is committed, and the event loop never waits on the disk.
- **Durability.** WAL journal; `synchronous=FULL` by default, so an acknowledged write survives a
  `kill -9` and a power cut (about 0.2 ms per commit here). `?synchronous=normal` survives
  `kill -9` (the WAL is written before the commit returns) but may lose the last commits on a
  power cut, and is faster.
- **Other processes on the same file** are followed: while idle the writer thread asks SQLite
  every `POLL_SECONDS` whether another connection has committed (`PRAGMA data_version`, a
  shared-memory read in WAL mode); if so it reloads the rows and the mirror is reset from them.
  Activity is merged with `MAX`, so processes sharing a file never move a time backwards.

Schema (`PRAGMA user_version = 1`): one table, the row id keeping insertion order, which an
upsert preserves (re-adding a key keeps its place, spec §2.3).

    CREATE TABLE routes (
        seq           INTEGER PRIMARY KEY,  -- insertion order
        key           TEXT NOT NULL UNIQUE, -- the cleaned route key
        data          TEXT NOT NULL,        -- JSON object, without last_activity
        last_activity INTEGER               -- microseconds since the epoch (UTC), or NULL
    );
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Literal

from hubproxy.store.base import (
    ChangeListener,
    RouteData,
    StoreSpecError,
    StoreUnavailable,
    copy_data,
    decode_row,
    encode_row,
    from_micros,
    merge_newest,
    to_micros,
)

log = logging.getLogger("hubproxy")

SCHEMA_VERSION = 1
POLL_SECONDS = 0.25  # how often an idle writer looks for other processes' commits
MAX_BATCH = 512  # writes committed together at most
BUSY_TIMEOUT_MS = 5000  # waiting for another process's write lock before giving up (-> 503)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS routes (
    seq INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    data TEXT NOT NULL,
    last_activity INTEGER
)
"""
_UPSERT = (
    "INSERT INTO routes (key, data, last_activity) VALUES (?, ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET data = excluded.data, last_activity = excluded.last_activity"
)
_ACTIVITY = (
    "UPDATE routes SET last_activity = ?1 "
    "WHERE key = ?2 AND (last_activity IS NULL OR last_activity < ?1)"
)

# a write as the writer thread runs it: (function of the connection, its argument, the future)
_Op = tuple[Callable[[sqlite3.Connection, Any], Any], Any, asyncio.Future[Any]]
_Rows = list[tuple[str, str, int | None]]


class SQLiteStore:
    def __init__(self, path: str, synchronous: str = "FULL", spec: str | None = None) -> None:
        self.path = path
        self.synchronous = synchronous.upper()
        self._spec = spec or path
        self._routes: dict[str, RouteData] = {}
        self._listeners: list[ChangeListener] = []
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        opened: asyncio.Future[_Rows] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(opened,), name="hubproxy-sqlite", daemon=True
        )
        self._thread.start()
        try:
            rows = await opened
        except (sqlite3.Error, OSError) as e:
            await asyncio.to_thread(self._thread.join)
            raise StoreSpecError(
                f"--storage-backend {self._spec}: cannot open {self.path}: {e}"
            ) from None
        self._routes = {key: decode_row(text, micros) for key, text, micros in rows}
        log.info("Loaded %d routes from %s", len(self._routes), self.path)

    async def close(self) -> None:
        if self._thread is None or self._closed:
            return
        self._closed = True
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)

    # -- reads: the mirror -------------------------------------------------------------------------

    async def get(self, key: str) -> RouteData | None:
        data = self._routes.get(key)
        return dict(data) if data is not None else None

    async def get_all(self) -> dict[str, RouteData]:
        return dict(self._routes)

    def watch(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)
        listener.routes_reset(self._routes)

    # -- writes: committed by the writer thread, then applied to the mirror ------------------------

    async def add(self, key: str, data: RouteData) -> None:
        key.encode("utf-8")  # a key SQLite cannot take fails here, not inside a shared batch
        text, micros = encode_row(data)
        await self._write(_add, (key, text, micros))

    async def update(self, key: str, data: RouteData) -> None:
        key.encode("utf-8")
        await self._write(_update, (key, copy_data(dict(data))))

    async def remove(self, key: str) -> bool:
        key.encode("utf-8")
        return bool(await self._write(_remove, key))

    async def record_activity(self, activity: Mapping[str, datetime]) -> None:
        marks = [(to_micros(when), key) for key, when in activity.items()]
        if marks:
            await self._write(_record_activity, marks)

    async def _write(self, fn: Callable[[sqlite3.Connection, Any], Any], arg: Any) -> Any:
        if self._loop is None or self._closed:
            raise StoreUnavailable("the SQLite store is closed")
        future: asyncio.Future[Any] = self._loop.create_future()
        self._queue.put((fn, arg, future))
        # shielded: a caller that goes away (client disconnected) must not stop the mirror from
        # learning what was committed
        return await asyncio.shield(future)

    # -- the mirror, on the event loop ------------------------------------------------------------

    def _deliver(self, batch: list[_Op], results: list[Any], error: BaseException | None) -> None:
        """Apply a committed batch to the mirror in order, then answer its writers."""
        if error is not None:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for (fn, arg, future), result in zip(batch, results, strict=True):
            apply = _APPLY.get(fn)
            try:
                if apply is not None:
                    apply(self, arg, result)
            except Exception:  # a listener's bug must not leave a writer waiting forever
                log.exception("Error applying a committed route change")
            if not future.done():
                future.set_result(result)

    def _apply_add(self, arg: tuple[str, str, int | None], _result: Any) -> None:
        key, text, micros = arg
        self._routes[key] = data = decode_row(text, micros)
        for listener in self._listeners:
            listener.route_set(key, data)

    def _apply_update(
        self, arg: tuple[str, RouteData], result: tuple[str, int | None] | None
    ) -> None:
        if result is None:
            return  # the route was missing and stays missing
        key, changes = arg
        data = decode_row(*result)
        self._routes[key] = data
        if "target" in changes:
            for listener in self._listeners:
                listener.route_set(key, data)

    def _apply_remove(self, key: str, existed: bool) -> None:
        if self._routes.pop(key, None) is not None or existed:
            for listener in self._listeners:
                listener.route_removed(key)

    def _apply_activity(self, marks: list[tuple[int, str]], _result: Any) -> None:
        merge_newest(self._routes, {key: from_micros(micros) for micros, key in marks})

    def _reload(self, routes: dict[str, RouteData]) -> None:
        """Another process changed the file: the mirror becomes what the file holds."""
        self._routes = routes
        for listener in self._listeners:
            listener.routes_reset(routes)

    # -- the writer thread -------------------------------------------------------------------------

    def _run(self, opened: asyncio.Future[_Rows]) -> None:
        loop = self._loop
        assert loop is not None
        try:
            conn = self._open()
            rows = _load(conn)
            seen = _data_version(conn)
        except (sqlite3.Error, OSError) as e:
            loop.call_soon_threadsafe(_settle, opened, None, e)
            return
        loop.call_soon_threadsafe(_settle, opened, rows, None)
        try:
            while True:
                # an operation, None (close), or False (nothing came: poll for other processes)
                first: _Op | Literal[False] | None
                try:
                    first = self._queue.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    first = False
                stop = first is None
                batch: list[_Op] = [first] if first else []
                while first is not None and len(batch) < MAX_BATCH:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    batch.append(item)
                # another process's commits first, so that ours apply on top of them
                try:
                    version = _data_version(conn)
                    if version != seen:
                        seen = version
                        # decoded here, not on the event loop (10,000 routes: ~20 ms)
                        fresh = {key: decode_row(text, us) for key, text, us in _load(conn)}
                        log.info("%s changed by another process: reloaded", self.path)
                        loop.call_soon_threadsafe(self._reload, fresh)
                except sqlite3.Error as e:
                    log.warning("Cannot read %s: %s", self.path, e)
                if batch:
                    # (our own commits leave data_version alone; one by another process between
                    # the check above and this commit is seen on the next turn)
                    self._commit(conn, batch)
                if stop:
                    break
        finally:
            conn.close()

    def _commit(self, conn: sqlite3.Connection, batch: list[_Op]) -> None:
        loop = self._loop
        assert loop is not None
        results: list[Any] = []
        error: BaseException | None = None
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for fn, arg, _ in batch:
                    results.append(fn(conn, arg))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            # the disk is full, the file is locked by another process for too long, ...: the
            # write is not acknowledged; the API answers 503 and JupyterHub retries
            log.error("Cannot write to %s: %s", self.path, e)
            error = StoreUnavailable(f"cannot write to {self.path}: {e}")
        except Exception as e:  # a bug: still answer every writer
            log.exception("SQLite store write failed")
            error = e
        loop.call_soon_threadsafe(self._deliver, batch, results, error)

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("%s: journal mode %s (WAL is not available here)", self.path, mode)
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"schema version {version} is newer than this hubproxy's ({SCHEMA_VERSION})"
                )
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(_SCHEMA)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        return conn


# -- what the writer thread runs, and how the mirror follows ------------------------------------


def _add(conn: sqlite3.Connection, arg: tuple[str, str, int | None]) -> None:
    conn.execute(_UPSERT, arg)


def _update(conn: sqlite3.Connection, arg: tuple[str, RouteData]) -> tuple[str, int | None] | None:
    key, changes = arg
    row = conn.execute("SELECT data, last_activity FROM routes WHERE key = ?", (key,)).fetchone()
    if row is None:
        return None
    data = decode_row(*row)
    data.update(changes)  # CHP's update: a shallow merge; a given last_activity replaces the old
    text, micros = encode_row(data)
    conn.execute("UPDATE routes SET data = ?, last_activity = ? WHERE key = ?", (text, micros, key))
    return text, micros


def _remove(conn: sqlite3.Connection, key: str) -> bool:
    return conn.execute("DELETE FROM routes WHERE key = ?", (key,)).rowcount > 0


def _record_activity(conn: sqlite3.Connection, marks: list[tuple[int, str]]) -> None:
    conn.executemany(_ACTIVITY, marks)


_APPLY: dict[Callable[..., Any], Callable[[SQLiteStore, Any, Any], None]] = {
    _add: SQLiteStore._apply_add,
    _update: SQLiteStore._apply_update,
    _remove: SQLiteStore._apply_remove,
    _record_activity: SQLiteStore._apply_activity,
}


def _load(conn: sqlite3.Connection) -> _Rows:
    return conn.execute("SELECT key, data, last_activity FROM routes ORDER BY seq").fetchall()


def _data_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)

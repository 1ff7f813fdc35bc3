"""Moves activity marks from the route table to the store, in batches.

The data plane only marks routes in memory (`RouteTable.mark_active`); this flusher writes the
newest mark per route to the store at most once per interval, and on demand before the API reads
the table, so `GET /api/routes` is always current without any request waiting on the store.

With --workers, the marks are made in the worker processes: `gather` (the primary's
`WorkerSet.refresh`) asks them for theirs, which land in this process's table, before each flush.

A batch the store could not take is kept and merged into the next one (newest mark per route
wins), so activity seen while a shared store (Redis) is away reaches it when it comes back. The
marks kept are one per route at most. A store that is unavailable (`StoreUnavailable`) is not an
error for `flush()`: the API still answers reads, from what the store can give.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from hubproxy.routing import RouteTable
from hubproxy.store.base import RouteStore, StoreUnavailable, keep_newest

log = logging.getLogger("hubproxy")


class ActivityFlusher:
    def __init__(self, table: RouteTable, store: RouteStore, interval: float = 1.0) -> None:
        self._table = table
        self._store = store
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self.last_flush_duration = 0.0
        self.on_flush: Callable[[float], None] | None = None  # metrics: each flush's seconds
        self._kept: dict[str, float] = {}  # marks of batches the store did not take
        self._unavailable = False  # the last flush met StoreUnavailable (logged once)
        self.gather: Callable[[], Awaitable[None]] | None = None  # see the module's doc

    async def flush(self) -> None:
        """Write the new marks (and any kept ones); keep them if the store cannot take them.

        Raises what the store raised, except `StoreUnavailable`, which is logged once per outage.
        """
        if self.gather is not None:
            await self.gather()
        marks = self._table.take_activity()
        if self._kept:
            kept, self._kept = self._kept, {}
            for key, ts in marks.items():
                kept[key] = keep_newest(kept.get(key), ts)
            marks = kept
        if not marks:
            return
        started = time.perf_counter()  # not loop.time(): uvloop's is cached, in milliseconds
        batch = {key: datetime.fromtimestamp(ts, UTC) for key, ts in marks.items()}
        try:
            await self._store.record_activity(batch)
        except BaseException as e:
            for key, ts in marks.items():  # (marks made meanwhile are in the table still)
                self._kept[key] = keep_newest(self._kept.get(key), ts)
            if not isinstance(e, StoreUnavailable):
                raise
            if not self._unavailable:
                self._unavailable = True
                log.warning("Route activity kept for later: %s", e or "route store unavailable")
            return
        if self._unavailable:
            self._unavailable = False
            log.info("Route activity recorded again (%d routes)", len(marks))
        self.last_flush_duration = duration = time.perf_counter() - started
        if self.on_flush is not None:
            self.on_flush(duration)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await self.flush()
        except Exception:
            log.exception("Failed to record route activity")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.flush()
            except Exception:
                # a store hiccup must not stop future flushes; the marks are kept for the next
                log.exception("Failed to record route activity")

"""Moves activity marks from the route table to the store, in batches.

The data plane only marks routes in memory (`RouteTable.mark_active`); this flusher writes the
newest mark per route to the store at most once per interval, and on demand before the API reads
the table, so `GET /api/routes` is always current without any request waiting on the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime

from hubproxy.routing import RouteTable
from hubproxy.store.base import RouteStore

log = logging.getLogger("hubproxy")


class ActivityFlusher:
    def __init__(self, table: RouteTable, store: RouteStore, interval: float = 1.0) -> None:
        self._table = table
        self._store = store
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self.last_flush_duration = 0.0

    async def flush(self) -> None:
        marks = self._table.take_activity()
        if not marks:
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        batch = {key: datetime.fromtimestamp(ts, UTC) for key, ts in marks.items()}
        await self._store.record_activity(batch)
        self.last_flush_duration = loop.time() - started

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.flush()
            except Exception:
                # a store hiccup must not stop future flushes; the marks of this batch are lost,
                # which costs at most one interval of activity precision
                log.exception("Failed to record route activity")

"""The primary's side of --workers (see `hubproxy.workers`): start, feed, poll and replace the
worker processes, and add up their numbers for the metrics page and the dashboard."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hubproxy import __version__
from hubproxy.config import Config
from hubproxy.proxy import ProxyStats
from hubproxy.routing import RouteTable
from hubproxy.store.base import ChangeListener, RouteData, RouteStore
from hubproxy.workers.channel import Channel, ChannelClosed

log = logging.getLogger("hubproxy")

START_SECONDS = 30.0  # a worker that has not said "ready" by then failed to start
ANSWER_SECONDS = 2.0  # a worker that does not answer a sync or poll by then is passed over
STUCK_SECONDS = 5.0  # ... and one that has answered nothing for this long is stuck: replaced
RESTART_DELAY_MAX = 5.0  # a worker that keeps dying is restarted at most this often
STEADY_SECONDS = 10.0  # a worker that lived this long died of something new: restart at once

_GAUGES = ("clients", "tunnels", "upstream_in_use", "upstream_idle", "received", "sent")


class WorkerStartError(Exception):
    """A worker process did not start; the message says which and why."""


class _Worker:
    """One worker process as the primary sees it."""

    def __init__(self, index: int, proc: asyncio.subprocess.Process, channel: Channel) -> None:
        self.index = index
        self.proc = proc
        self.channel = channel
        self.started = time.monotonic()
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters: dict[int, asyncio.Future[Any]] = {}
        self.counters: dict[str, Any] | None = None  # the newest the worker sent
        self.gauges: dict[str, int] = dict.fromkeys(_GAUGES, 0)
        self.reader: asyncio.Task[None] | None = None
        self.last_answer = self.started  # when it last said anything

    @property
    def serving(self) -> bool:
        return self.ready.done() and self.ready.exception() is None

    def request(self, serial: int, *message: Any) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiters[serial] = future
        self.channel.send(*message)
        return future

    def forget(self) -> None:
        for future in self.waiters.values():
            if not future.done():
                future.set_result(None)
        self.waiters.clear()


class WorkerSet:
    """The workers, their route feed (a store `ChangeListener`) and their numbers (a
    `metrics.ProxyServiceView`)."""

    def __init__(
        self, config: Config, table: RouteTable, count: int, sockets: list[socket.socket]
    ) -> None:
        self.config = config
        self.table = table  # the primary's: activity from the workers lands here
        self.count = count
        self._sockets = sockets  # one per worker (SO_REUSEPORT), or one shared (Unix socket)
        self._workers: dict[int, _Worker] = {}
        # the routable routes in the order they were last set, so that a new worker replays
        # them into a table identical to the others' (keys that share a trie node: last wins)
        self._targets: dict[str, str] = {}
        self._seq = 0  # change-feed messages sent
        self._serial = 0  # requests sent (sync, poll)
        self._timing = False
        self._stopping = False
        self._started = False  # the first start is over: from now on, exits are replaced
        self._quick_deaths: dict[int, int] = {}  # per slot, exits soon after a start in a row
        self._retired = ProxyStats()  # counters of workers that have exited
        self._retired_gauges = {"received": 0, "sent": 0}
        self._retired_requests: dict[int, int] = {}
        self._stats = ProxyStats()
        self.restarts = 0
        self._watchers: set[asyncio.Task[None]] = set()
        self._polling: asyncio.Future[None] | None = None

    # -- the route feed (store.watch(workers)) ------------------------------------------------

    def route_set(self, key: str, data: Mapping[str, Any]) -> None:
        target = data.get("target")
        if not isinstance(target, str):
            self.route_removed(key)
            return
        self._targets.pop(key, None)
        self._targets[key] = target
        self._seq += 1
        for worker in self._workers.values():
            worker.channel.send("set", self._seq, key, target)

    def route_removed(self, key: str) -> None:
        if self._targets.pop(key, None) is None:
            return
        self._seq += 1
        for worker in self._workers.values():
            worker.channel.send("del", self._seq, key)

    def routes_reset(self, routes: Mapping[str, Mapping[str, Any]]) -> None:
        self._targets = {
            key: data["target"]
            for key, data in routes.items()
            if isinstance(data.get("target"), str)
        }
        self._seq += 1
        pairs = list(self._targets.items())
        for worker in self._workers.values():
            worker.channel.send("reset", self._seq, pairs)

    # -- starting and stopping ------------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker and wait until each serves; raises WorkerStartError."""
        try:
            for index in range(self.count):
                await self._spawn(index)
            await self._await_ready(list(self._workers.values()))
        except BaseException:
            await self.stop(0)
            raise
        self._started = True

    async def _await_ready(self, workers: list[_Worker]) -> None:
        waits = {w.ready: w for w in workers}
        done, pending = await asyncio.wait(waits, timeout=START_SECONDS)
        for future in pending:
            raise WorkerStartError(
                f"worker {waits[future].index} did not start in {START_SECONDS:.0f} s"
            )
        for future in done:
            if future.exception() is not None:
                raise WorkerStartError(str(future.exception()))

    async def _spawn(self, index: int) -> _Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        listening = self._sockets[index % len(self._sockets)]
        fds = (theirs.fileno(), listening.fileno())
        env = dict(os.environ)
        # the package this process runs, whatever put it on sys.path (an install, PYTHONPATH),
        # last: it may be site-packages, which must not come before the standard library
        here = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), here) if p)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "hubproxy.workers.child",
                *map(str, fds),
                str(index),
                pass_fds=fds,
                stdin=asyncio.subprocess.DEVNULL,
                env=env,
            )
        except OSError as e:
            ours.close()
            raise WorkerStartError(f"cannot start worker {index}: {e}") from e
        finally:
            theirs.close()
        worker = _Worker(index, proc, await Channel.open(ours))
        worker.channel.send("config", self.config, __version__)
        worker.channel.send("reset", self._seq, list(self._targets.items()))
        if self._timing:
            worker.channel.send("poll", -1, True)  # turns timing on; the answer is dropped
        self._workers[index] = worker
        worker.reader = asyncio.get_running_loop().create_task(self._read(worker))
        watcher = asyncio.get_running_loop().create_task(self._watch(worker))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        log.debug("Started worker %d (pid %d)", index, proc.pid)
        return worker

    async def _read(self, worker: _Worker) -> None:
        """The worker's messages, until its channel closes."""
        try:
            while True:
                message = await worker.channel.receive()
                worker.last_answer = time.monotonic()
                kind = message[0]
                if kind == "ready":
                    if not worker.ready.done():
                        worker.ready.set_result(None)
                elif kind == "reply":
                    if message[2] is not None:  # a poll's: taken even if no one waits any more
                        self._take_report(worker, message[2])
                    future = worker.waiters.pop(message[1], None)
                    if future is not None and not future.done():
                        future.set_result(message[2])
                elif kind == "final":
                    self._take_report(worker, message[1:])
        except ChannelClosed:
            pass
        finally:
            worker.forget()
            if not worker.ready.done():
                worker.ready.set_exception(
                    WorkerStartError(f"worker {worker.index} exited before it served")
                )

    async def _watch(self, worker: _Worker) -> None:
        """Wait for the worker's exit; replace it unless the primary is stopping (or is still
        in its first start, whose failure `start` reports)."""
        code = await worker.proc.wait()
        if worker.reader is not None:
            await worker.reader  # its last messages ("final") are in
        worker.channel.close()
        self._retire(worker)
        if self._workers.get(worker.index) is worker:
            del self._workers[worker.index]
        if self._stopping or not self._started:
            return
        index, pid = worker.index, worker.proc.pid
        how = f"signal {-code}" if code < 0 else f"code {code}"
        what = "exited" if worker.serving else "exited before it served"
        log.error("Worker %d (pid %d) %s with %s: starting another", index, pid, what, how)
        self.restarts += 1
        quick = time.monotonic() - worker.started < STEADY_SECONDS
        deaths = self._quick_deaths[index] = self._quick_deaths.get(index, 0) + 1 if quick else 0
        if deaths:
            await asyncio.sleep(min(RESTART_DELAY_MAX, 0.1 * 2 ** min(deaths, 6)))
        while not self._stopping:
            try:
                replacement = await self._spawn(index)
                break
            except WorkerStartError as e:
                log.error("%s", e)
                await asyncio.sleep(RESTART_DELAY_MAX)
        else:
            return
        try:
            await self._await_ready([replacement])
        except WorkerStartError as e:
            if self._stopping or replacement.ready.done():
                return  # it exited: its own watcher says so and starts the next one
            log.error("%s", e)  # not serving in time: killed, and its watcher does the same
            with contextlib.suppress(ProcessLookupError):
                replacement.proc.kill()
            return
        if not self._stopping:
            log.info("Worker %d (pid %d) serving", index, replacement.proc.pid)

    def _retire(self, worker: _Worker) -> None:
        """Keep a gone worker's counters, so that the totals never go back."""
        if worker.counters is None:
            return
        counters = dict(worker.counters, lookup_ring=[])  # its samples go with it
        self._retired.add(counters)
        for name in ("received", "sent"):
            self._retired_gauges[name] += worker.gauges[name]
        self._retired_requests[worker.index] = self._retired_requests.get(
            worker.index, 0
        ) + _requests(counters)
        worker.counters = None

    async def stop(self, drain_seconds: float, handing_over: bool = False) -> None:
        """SIGTERM to every worker (each drains up to `drain_seconds`), then wait for them;
        a worker still there a few seconds later is killed. `handing_over`: SIGUSR2 instead,
        which has them wait for their WebSockets too (another process serves meanwhile)."""
        self._stopping = True
        how = signal.SIGUSR2 if handing_over else signal.SIGTERM
        for _ in range(2):  # twice: a replacement may have been starting during the first
            workers = list(self._workers.values())
            if not workers:
                break
            for worker in workers:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(how)
            waits = [asyncio.ensure_future(w.proc.wait()) for w in workers]
            _, late = await asyncio.wait(waits, timeout=drain_seconds + 3.0)
            for worker in workers:
                if worker.proc.returncode is None:
                    log.warning(
                        "Worker %d (pid %d) did not stop: killed", worker.index, worker.proc.pid
                    )
                    with contextlib.suppress(ProcessLookupError):
                        worker.proc.kill()
            if late:
                await asyncio.wait(late)
            if self._watchers:  # they collect the workers' last words ("final")
                _, pending = await asyncio.wait(self._watchers, timeout=1.0)
                for watcher in pending:
                    watcher.cancel()

    def reload_tls(self) -> None:
        """SIGHUP: each worker reloads its certificates (public listener, https targets)."""
        for worker in self._workers.values():
            with contextlib.suppress(ProcessLookupError):
                worker.proc.send_signal(signal.SIGHUP)

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers.values()]

    def serving(self) -> int:
        return sum(1 for w in self._workers.values() if w.serving)

    # -- asking the workers ------------------------------------------------------------------

    async def _ask(self, kind: str, *args: Any) -> list[tuple[_Worker, Any]]:
        """Send a request to every worker that serves; their answers (None: none in time)."""
        if self._stopping:  # draining workers no longer read their channel
            return []
        self._serial += 1
        serial = self._serial
        asked = [
            (w, w.request(serial, kind, serial, *args)) for w in self._workers.values() if w.serving
        ]
        if not asked:
            return []
        await asyncio.wait([f for _, f in asked], timeout=ANSWER_SECONDS)
        answers = []
        for worker, future in asked:
            if future.done():
                answers.append((worker, future.result()))
                continue
            worker.waiters.pop(serial, None)
            future.cancel()
            answers.append((worker, None))
            silent = time.monotonic() - worker.last_answer
            if silent < STUCK_SECONDS:
                log.warning("Worker %d did not answer in %.0f s", worker.index, ANSWER_SECONDS)
                continue
            # stuck (a loop that never yields, SIGSTOP): its connections are lost either way;
            # killing it lets its replacement serve the connections queued on its socket
            log.error(
                "Worker %d (pid %d) has answered nothing for %.0f s: killing it",
                worker.index,
                worker.proc.pid,
                silent,
            )
            with contextlib.suppress(ProcessLookupError):
                worker.proc.kill()
        return answers

    async def sync(self) -> None:
        """Return once every worker has applied every route change sent so far."""
        await self._ask("sync")

    async def refresh(self) -> None:
        """Collect every worker's activity (into the primary's table) and numbers.

        Callers that arrive while a poll is out share it."""
        if self._polling is not None:
            await asyncio.shield(self._polling)
            return
        self._polling = asyncio.get_running_loop().create_future()
        try:
            await self._ask("poll", self._timing)  # `_read` takes each report as it comes
            self._sum()
        finally:
            self._polling.set_result(None)
            self._polling = None

    def _take_report(self, worker: _Worker, payload: tuple[Any, ...]) -> None:
        marks, counters, gauges = payload
        self.table.merge_activity(marks)
        worker.counters = counters
        worker.gauges = gauges

    def _sum(self) -> None:
        stats = ProxyStats()
        stats.add(self._retired.counters())
        for worker in self._workers.values():
            if worker.counters is not None:
                stats.add(worker.counters)
        self._stats = stats

    # -- metrics.ProxyServiceView ----------------------------------------------------------------

    @property
    def stats(self) -> ProxyStats:
        return self._stats

    def start_timing(self) -> None:
        self._timing = True  # sent with the next poll

    def _gauge(self, name: str) -> int:
        return sum(w.gauges[name] for w in self._workers.values())

    def connection_counts(self) -> tuple[int, int]:
        return self._gauge("clients"), self._gauge("tunnels")

    def upstream_connections(self) -> tuple[int, int]:
        return self._gauge("upstream_in_use"), self._gauge("upstream_idle")

    def client_bytes(self) -> tuple[int, int]:
        return (
            self._gauge("received") + self._retired_gauges["received"],
            self._gauge("sent") + self._retired_gauges["sent"],
        )

    def collector(self) -> Collector:
        return _WorkersCollector(self)

    def requests_by_worker(self) -> dict[int, int]:
        counts = dict(self._retired_requests)
        for worker in self._workers.values():
            if worker.counters is not None:
                counts[worker.index] = counts.get(worker.index, 0) + _requests(worker.counters)
        return counts


def _requests(counters: Mapping[str, Any]) -> int:
    return int(counters["requests_web"]) + int(counters["requests_ws"])


class _WorkersCollector(Collector):
    def __init__(self, workers: WorkerSet) -> None:
        self.workers = workers

    def collect(self) -> Iterator[Metric]:
        workers = self.workers
        yield GaugeMetricFamily("hubproxy_workers", "Worker processes serving", workers.serving())
        yield CounterMetricFamily(
            "hubproxy_worker_restarts",
            "Worker processes that exited unexpectedly and were replaced",
            workers.restarts,
        )
        requests = CounterMetricFamily(
            "hubproxy_worker_requests",
            "Requests (HTTP and WebSocket) received by each worker",
            labels=["worker"],
        )
        for index, count in sorted(workers.requests_by_worker().items()):
            requests.add_metric([str(index)], count)
        yield requests


class SyncedStore:
    """The route store as the primary's API uses it: a write returns once every worker serves
    it (see `hubproxy.workers`); everything else is the store's own."""

    def __init__(self, store: RouteStore, workers: WorkerSet) -> None:
        self._store = store
        self._workers = workers

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def start(self) -> None:
        await self._store.start()

    async def close(self) -> None:
        await self._store.close()

    async def get(self, key: str) -> RouteData | None:
        return await self._store.get(key)

    async def get_all(self) -> dict[str, RouteData]:
        return await self._store.get_all()

    async def add(self, key: str, data: RouteData) -> None:
        await self._store.add(key, data)
        await self._workers.sync()

    async def update(self, key: str, data: RouteData) -> None:
        await self._store.update(key, data)
        await self._workers.sync()

    async def remove(self, key: str) -> bool:
        existed = await self._store.remove(key)
        await self._workers.sync()
        return existed

    async def record_activity(self, activity: Mapping[str, datetime]) -> None:
        await self._store.record_activity(activity)

    def watch(self, listener: ChangeListener) -> None:
        self._store.watch(listener)

"""The process's lifecycle: store, route table, listeners, signals and a graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from hubproxy import __version__
from hubproxy.activity import ActivityFlusher
from hubproxy.aioweb import start_site
from hubproxy.api import ApiStats, create_api_app
from hubproxy.config import Config
from hubproxy.dashboard import dashboard_pages
from hubproxy.eventloop import log_uncaught, loop_factory
from hubproxy.fdlimit import raise_soft_limit
from hubproxy.fdstore import Notifier, RouteKeeper, keep_routes, notify_ready
from hubproxy.handover import (
    ENV_INTERIM,
    TAKER_START_SECONDS,
    Giver,
    HandoverError,
    Pair,
    adopt_listeners,
    execute_in_place,
    start_taker,
)
from hubproxy.inherit import InheritError, describe, from_systemd
from hubproxy.listen import (
    Bound,
    ListenError,
    bind_tcp,
    bind_tcp_group,
    bind_unix,
    remove_unix_socket,
)
from hubproxy.metrics import Metrics, ProxyServiceView, create_metrics_app
from hubproxy.proxy import ProxyService
from hubproxy.redirect import start_redirect
from hubproxy.routing import RouteTable
from hubproxy.store import RouteStore, StoreSpecError, StoreUnavailable, open_store
from hubproxy.store.base import decode_row, encode_row
from hubproxy.store.memory import MemoryStore
from hubproxy.tls import CertificateWatcher, TLSError, ineffective_options
from hubproxy.tls import build as build_tls
from hubproxy.workers.supervisor import SyncedStore, WorkerSet, WorkerStartError

log = logging.getLogger("hubproxy")


def run(config: Config) -> int:
    """Run the proxy until SIGTERM or SIGINT (or, after SIGUSR2, until it has handed over to
    the hubproxy installed now, which then runs in this process); the process's exit code."""
    raise_soft_limit()  # before any worker starts: they inherit it
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        result = runner.run(serve(config))
    if isinstance(result, Reexec):
        logging.shutdown()  # the log lines written so far, before the image is replaced
        try:
            execute_in_place(result.pair, sys.argv[1:])
        except OSError as e:
            log.error("Cannot execute %s: %s; the interim process serves on", sys.executable, e)
            return 1
    assert isinstance(result, int)
    return result


@dataclass(frozen=True, slots=True)
class Reexec:
    """serve()'s outcome once it has handed over to an interim process: execute the new
    hubproxy in place, which takes everything back over `pair`."""

    pair: Pair


@dataclass(frozen=True, slots=True)
class Listeners:
    publics: list[Bound]  # several with --workers N (one per worker, sharing the port)
    api: Bound
    redirect: Bound | None
    metrics: Bound | None

    def named(self) -> list[tuple[str, Bound]]:
        pairs = [("public", b) for b in self.publics]
        pairs.append(("api", self.api))
        for name, bound in (("redirect", self.redirect), ("metrics", self.metrics)):
            if bound is not None:
                pairs.append((name, bound))
        return pairs

    def close(self, remove_files: bool) -> None:
        for listener in (*self.publics, self.api, self.redirect, self.metrics):
            if listener is not None:
                listener.sock.close()
                if remove_files:
                    remove_unix_socket(listener)


def _bind(config: Config, inherited: dict[str, socket.socket]) -> Listeners:
    """The public listener (with --workers N over TCP: N sockets sharing the port), the API's,
    the redirect's and the metrics' listeners; those systemd passed (`inherited`) are used
    instead of bound."""
    given = {name: Bound.inherited(sock, owns_path=False) for name, sock in inherited.items()}
    if "public" in given:
        publics = [given["public"]]
    elif config.socket:
        publics = [bind_unix(config.socket, "proxy")]
    elif config.workers > 1:
        publics = bind_tcp_group(config.ip, config.port, "proxy", config.workers)
    else:
        publics = [bind_tcp(config.ip, config.port, "proxy")]
    bound = list(publics)
    try:
        if "api" in given:
            api = given["api"]
        elif config.api_socket:
            api = bind_unix(config.api_socket, "API")
        else:
            api = bind_tcp(config.api_ip, config.effective_api_port, "API")
        bound.append(api)
        redirect = given.get("redirect")
        if redirect is None and _wants_redirect(config):
            assert config.redirect_port is not None
            # all interfaces, whatever --ip says, as CHP (spec §3.13)
            redirect = bind_tcp(None, config.redirect_port, "redirect")
        if redirect is not None:
            bound.append(redirect)
        metrics = given.get("metrics") or _bind_metrics(config)
    except ListenError:
        for b in bound:
            b.sock.close()
            remove_unix_socket(b)
        raise
    return Listeners(publics, api, redirect, metrics)


def _adopt(pairs: list[tuple[str, socket.socket]], own_files: list[bool]) -> Listeners:
    """The listeners the process we take over from sent; their socket files become ours unless
    they are systemd's (`own_files`, in the same order; all ours from a giver that sends none)."""
    by_name: dict[str, list[Bound]] = {}
    owned = own_files if len(own_files) == len(pairs) else [True] * len(pairs)
    for (name, sock), owns in zip(pairs, owned, strict=True):
        by_name.setdefault(name, []).append(Bound.inherited(sock, owns_path=owns is not False))
    if not by_name.get("public") or len(by_name.get("api", ())) != 1:
        raise HandoverError(f"listeners {sorted(by_name)}: a public and an API one expected")
    return Listeners(
        by_name["public"],
        by_name["api"][0],
        by_name.get("redirect", [None])[0],
        by_name.get("metrics", [None])[0],
    )


def _bind_metrics(config: Config) -> Bound | None:
    """CHP's rule: a metrics listener only with --metrics-socket or --metrics-port."""
    if config.metrics_socket:
        return bind_unix(config.metrics_socket, "metrics")
    if config.metrics_port is not None:
        return bind_tcp(config.metrics_ip or None, config.metrics_port, "metrics")
    if config.metrics_ip:
        log.warning("No metrics server without --metrics-port (as CHP): --metrics-ip unused")
    return None


def _wants_redirect(config: Config) -> bool:
    """CHP's rule: the redirect listener needs TLS, a TCP public listener and a port not 80."""
    if config.redirect_port is None:
        return False
    if config.socket or config.port == 80:
        why = "--socket" if config.socket else "--port 80"
        log.warning("No HTTP to HTTPS redirection with %s (as CHP): --redirect-port unused", why)
        return False
    return bool(config.ssl_key or config.ssl_cert)


async def _add_default_route(store: RouteStore, target: str) -> None:
    log.info("Adding route / -> %s", target)
    await store.add("/", {"target": target, "last_activity": datetime.now(UTC)})
    log.info("Route added / -> %s", target)


async def _retry_default_route(store: RouteStore, target: str, error: StoreUnavailable) -> None:
    """The store (Redis) was away at start: add `/` once it takes writes, retrying every second."""
    log.warning("Cannot add route / -> %s yet (%s): retrying", target, error)
    while True:
        await asyncio.sleep(1.0)
        try:
            await store.add("/", {"target": target, "last_activity": datetime.now(UTC)})
        except StoreUnavailable:
            continue
        log.info("Route added / -> %s", target)
        return


def _reload(watcher: CertificateWatcher | None, workers: WorkerSet | None) -> None:
    """SIGHUP: reload this process's certificates, and have each worker reload its own."""
    if watcher is not None:
        watcher.reload_all()
    if workers is not None:
        workers.reload_tls()


async def serve(config: Config) -> int | Reexec:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    stop_reason: list[str] = []

    def request_stop(reason: str) -> None:
        stop_reason.append(reason)
        stop.set()

    loop.set_exception_handler(log_uncaught)
    loop.add_signal_handler(signal.SIGTERM, request_stop, "Terminated")
    loop.add_signal_handler(signal.SIGINT, request_stop, "Interrupted")
    # (its default would end the process: an upgrade asked for too early is only refused)
    loop.add_signal_handler(signal.SIGUSR2, log.warning, "SIGUSR2 while starting: ignored")

    try:
        taking_over = Pair.from_environment()  # we were started to take over (handover.py)
    except HandoverError as e:
        log.error("%s", e)
        return 1
    interim = os.environ.pop(ENV_INTERIM, None) is not None

    if config.auto_rewrite:
        log.info("AutoRewrite of Location headers enabled.")
    if config.change_origin:
        log.info("Change Origin of host headers enabled.")
    if config.protocol_rewrite:
        log.info("ProtocolRewrite enabled. Rewriting to %s", config.protocol_rewrite)
    if not config.auth_token:
        log.warning("REST API is not authenticated.")

    try:
        tls = build_tls(config)  # a file that cannot be used stops the start with one line
    except TLSError as e:
        log.error("%s", e)
        return 1
    for option in ineffective_options(config):
        log.debug("%s has no effect (as in CHP)", option)

    try:
        store = open_store(config.storage_backend)
        await store.start()  # Redis: waits a few seconds at most, then starts without it
    except StoreSpecError as e:
        log.error("%s", e)
        return 1
    except Exception as e:  # a third-party store failing to start
        log.error("Cannot start the route store: %s: %s", type(e).__name__, e)
        return 1
    table = RouteTable()
    store.watch(table)
    flusher = ActivityFlusher(table, store)

    giver_pid: int | None = None
    kept_routes: int | None = None  # the routes systemd kept over a restart (fdstore.py)
    try:
        message: dict[str, Any] | None = None
        if taking_over is not None:
            # the giver pauses its API until we serve ours: everything else is built first
            try:
                await taking_over.send({"ask": __version__})
                message, fds = await taking_over.receive(TAKER_START_SECONDS)
            except HandoverError as e:
                if interim:
                    raise  # the process that started us serves on
                # we are the tracked pid, executed in place, and the interim process is gone
                # with the listeners: better our own than none (the memory store's routes
                # are lost; the hub puts them back)
                log.error("Taking back from the interim process failed (%s): binding anew", e)
                taking_over.close()
                taking_over = None
        if taking_over is not None and message is not None:
            listeners = _adopt(
                adopt_listeners(list(message.get("listeners", ())), fds),
                list(message.get("own_files", ())),
            )
            giver_pid = message.get("pid")
            routes = message.get("routes")
            if isinstance(routes, dict) and isinstance(store, MemoryStore):
                for key, (text, micros) in routes.items():
                    await store.add(key, decode_row(text, micros))
            named = {name: bound.sock for name, bound in listeners.named()}
            log.info("Taking over from pid %s: %s", giver_pid, describe(named))
        else:
            passed = from_systemd()
            if passed.sockets:
                log.info("Listening on sockets from systemd: %s", describe(passed.sockets))
            kept_routes = passed.files.get("routes")
            listeners = _bind(config, passed.sockets)
    except (ListenError, InheritError, HandoverError) as e:
        log.error("%s", e)
        await store.close()
        return 1
    # the interim process of an upgrade is no service's main process: systemd ignores it
    notifier = None if interim else Notifier.from_environment()
    keeper: RouteKeeper | None = await keep_routes(store, kept_routes, notifier)
    publics, api, redirect, metrics_bound = (
        listeners.publics,
        listeners.api,
        listeners.redirect,
        listeners.metrics,
    )
    public = publics[0]

    # the data plane: in this process, or in worker processes fed by this one
    plane: ProxyService | None = None
    workers: WorkerSet | None = None
    view: ProxyServiceView
    api_store: RouteStore = store
    if config.workers > 1:
        workers = WorkerSet(config, table, config.workers, [b.sock for b in publics])
        store.watch(workers)
        api_store = SyncedStore(store, workers)  # a write is answered once workers serve it
        flusher.gather = workers.refresh
        view = workers
        # this process reloads the API's certificate; each worker its own sides
        watcher = CertificateWatcher([tls.api]) if tls.api is not None else None
    else:
        plane = ProxyService(config, table, tls)
        view = plane
        watcher = CertificateWatcher(tls.sides) if tls.sides else None
    api_stats = ApiStats()
    metrics = Metrics(view, api_stats, flusher, workers.collector() if workers else None)
    api_app = create_api_app(config, api_store, flusher, api_stats, dashboard_pages(metrics))
    api_runner = web.AppRunner(api_app, handle_signals=False)
    api_ssl = tls.api.listening if tls.api else None
    api_sites: list[web.SockSite] = []
    metrics_runner: web.AppRunner | None = None
    metrics_sites: list[web.SockSite] = []
    redirect_runner: web.BaseRunner | None = None
    pid_written = False
    default_route: asyncio.Task[None] | None = None
    handed_over: Reexec | None = None  # to an interim process: execute the new one in place
    gave_away = False  # the listeners (and their socket files) belong to another process now
    took_over = False  # a taker owns the listeners' socket files once it serves
    upgrade: asyncio.Task[None] | None = None
    interim_proc: asyncio.subprocess.Process | None = None  # ours, once it serves
    aftercare: set[asyncio.Task[None]] = set()  # giving back (interim), reaping (the exec'd)

    async def open_api() -> None:
        # a duplicate of the listening socket: stopping the site (a hand-over) closes it, and
        # the original stays ours to pass on, or to serve again if the hand-over fails
        api_sites.append(await start_site(api_runner, api.sock.dup(), api_ssl))
        if metrics_runner is not None and metrics_bound is not None:
            metrics_sites.append(await start_site(metrics_runner, metrics_bound.sock.dup()))

    async def pause_api() -> None:
        """New API requests wait in the listening socket's queue for the taker; those under
        way are answered first, so that every change is in the routes we send."""
        for site in (*api_sites, *metrics_sites):
            await site.stop()
        api_sites.clear()
        metrics_sites.clear()
        assert api_runner.server is not None
        api_runner.server.pre_shutdown()  # idle keep-alive connections close now
        await api_runner.server.shutdown(5.0)
        await flusher.flush()

    async def routes_to_send() -> dict[str, Any] | None:
        # other stores keep the routes (and the activity just flushed) for the taker; rows
        # as the stores keep them: only a route's own last_activity is a time
        if not isinstance(store, MemoryStore):
            return None
        routes = {key: encode_row(data) for key, data in (await store.get_all()).items()}
        if keeper is not None:
            await keeper.write()  # the table as handed over, should this pid crash now
        return routes

    def giver(pair: Pair) -> Giver:
        named = [(name, bound.sock, bound.owns_path) for name, bound in listeners.named()]
        return Giver(pair, named, pause_api, open_api, routes_to_send)

    async def hand_over() -> None:
        """SIGUSR2: hand over to an interim process, then (run()) execute the new hubproxy in
        place, which takes everything back."""
        nonlocal handed_over, gave_away, interim_proc
        log.info("Upgrading: starting %s -m hubproxy to hand over to", sys.executable)
        proc: asyncio.subprocess.Process | None = None
        pair: Pair | None = None
        try:
            proc, pair = await start_taker(sys.argv[1:])
            pid = await giver(pair).give(proc)
        except (HandoverError, asyncio.CancelledError) as e:
            # failed, or we are stopping meanwhile: the new process must not serve on alone
            if isinstance(e, HandoverError):
                log.error("Upgrade failed, serving on: %s", e)
            if pair is not None:
                pair.close()
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            if isinstance(e, asyncio.CancelledError):
                raise
            return
        interim_proc = proc
        log.info("Pid %d serves; draining, then executing the new hubproxy in place", pid)
        handed_over = Reexec(pair)
        gave_away = True
        request_stop("Handed over for an upgrade")

    async def give_back(pair: Pair) -> None:
        """The interim process: the tracked pid, now the new hubproxy, takes everything back."""
        nonlocal gave_away
        try:
            # the tracked pid asks once it has drained (up to --drain-timeout) and started anew
            pid = await giver(pair).give(wait=TAKER_START_SECONDS + config.drain_seconds)
        except HandoverError as e:
            log.error(
                "Hand-over back to the tracked pid did not happen (%s): serving on as pid %d, "
                "which nothing tracks; restart the service to have a tracked proxy again",
                e,
                os.getpid(),
            )
            pair.close()
            return
        pair.close()
        log.info("Pid %d serves again; draining", pid)
        gave_away = True
        request_stop("Handed back")

    def on_sigusr2() -> None:
        nonlocal upgrade
        if interim or (upgrade is not None and not upgrade.done()) or stop.is_set():
            log.warning("SIGUSR2: an upgrade is under way already")
            return
        upgrade = loop.create_task(hand_over())

    try:
        if config.default_target and taking_over is None:
            try:
                await _add_default_route(store, config.default_target)
            except StoreUnavailable as e:
                default_route = loop.create_task(
                    _retry_default_route(store, config.default_target, e)
                )
        if workers is not None:
            try:
                await workers.start()
            except WorkerStartError as e:
                log.error("%s", e)
                return 1
        else:
            assert plane is not None
            await plane.serve(public.sock)
        await api_runner.setup()
        if metrics_bound is not None:
            metrics_runner = web.AppRunner(create_metrics_app(metrics), handle_signals=False)
            await metrics_runner.setup()
        await open_api()
        redirect_to = None
        if redirect is not None:
            redirect_to = config.redirect_to or public.port
            assert redirect_to is not None
            redirect_runner = await start_redirect(redirect.sock, redirect_to)
        flusher.start()
        if tls.sides:  # without TLS, SIGHUP keeps its default meaning (terminate), as in CHP
            loop.add_signal_handler(signal.SIGHUP, _reload, watcher, workers)
        if watcher is not None:
            watcher.start()
        loop.add_signal_handler(signal.SIGUSR2, on_sigusr2)

        public_url = public.url("https" if tls.public else "http")
        log.info("Proxying %s to %s", public_url, config.default_target or "(no default)")
        if workers is not None:
            log.info("Serving with %d worker processes (pids %s)", config.workers, workers.pids())
        log.info("Proxy API at %s/api/routes", api.url("https" if tls.api else "http"))
        if metrics_bound is not None:
            log.info("Serve metrics at %s/metrics", metrics_bound.url("http"))
        if redirect is not None:
            log.info("Added HTTP to HTTPS redirection from %s to %s", redirect.port, redirect_to)
        if config.pid_file and not interim:
            try:
                with open(config.pid_file, "w") as f:
                    f.write(str(os.getpid()))
            except OSError as e:
                log.error("Cannot write pid file %s: %s", config.pid_file, e.strerror)
                if taking_over is None:
                    return 1
                # executed in place: the pid it holds is still ours, and the interim process
                # has handed everything over already; stopping now would leave nothing
            else:
                pid_written = True
            # logged once written (CHP logs first), so the line tells a reader the file is there
            log.info("Writing pid %s to %s", os.getpid(), config.pid_file)

        if taking_over is not None:
            await taking_over.send({"serving": os.getpid()})
            took_over = True
            if interim:
                aftercare.add(loop.create_task(give_back(taking_over)))
            else:
                taking_over.close()
                if isinstance(giver_pid, int):
                    aftercare.add(loop.create_task(_reap(giver_pid)))

        await notify_ready(notifier)
        await stop.wait()
        (log.info if gave_away else log.warning)("%s", stop_reason[0])
    finally:
        # (removing the handler would let a second SIGUSR2 end the process while it drains)
        loop.add_signal_handler(signal.SIGUSR2, log.warning, "SIGUSR2 while stopping: ignored")
        if upgrade is not None and not upgrade.done():
            upgrade.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await upgrade
        if plane is not None:
            plane.stop_accepting()
        if tls.sides:
            loop.remove_signal_handler(signal.SIGHUP)
        if watcher is not None:
            await watcher.stop()
        if workers is not None:
            # refuse new connections at once, as one process does: the workers close theirs
            for bound in publics:
                bound.sock.close()
            await workers.stop(config.drain_seconds, handing_over=gave_away)
        if plane is not None:
            await plane.stop(config.drain_seconds, tunnels=gave_away)
        await api_runner.cleanup()
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        if redirect_runner is not None:
            await redirect_runner.cleanup()
        if default_route is not None:
            default_route.cancel()
        await flusher.stop()
        if keeper is not None:
            # after a hand-over, the process we gave to keeps the routes from now on
            await keeper.stop(last_write=not gave_away)
        if notifier is not None:
            notifier.close()
        await store.close()
        listeners.close(remove_files=not gave_away and (taking_over is None or took_over))
        if interim and taking_over is not None:
            taking_over.close()  # a give-back still waiting on it ends (its thread too)
        if pid_written and config.pid_file and handed_over is None:
            log.debug("Removing %s", config.pid_file)
            with contextlib.suppress(OSError):
                os.unlink(config.pid_file)
    if handed_over is not None and len(stop_reason) > 1:
        # told to stop while we drained after handing over: the interim process stops too,
        # rather than this pid taking everything back
        log.warning("%s during the upgrade: stopping the interim process too", stop_reason[1])
        handed_over.pair.close()  # first: it waits on the pair for us
        if interim_proc is not None and interim_proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                interim_proc.send_signal(signal.SIGTERM)
            await interim_proc.wait()
        return 0
    return handed_over if handed_over is not None else 0


async def _reap(pid: int) -> None:
    """The interim process was our child before the exec: collect its exit."""
    with contextlib.suppress(ChildProcessError):
        await asyncio.to_thread(os.waitpid, pid, 0)

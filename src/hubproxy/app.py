"""The process's lifecycle: store, route table, listeners, signals and a graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from datetime import UTC, datetime

from aiohttp import web

from hubproxy.activity import ActivityFlusher
from hubproxy.aioweb import start_site
from hubproxy.api import ApiStats, create_api_app
from hubproxy.config import Config
from hubproxy.dashboard import dashboard_pages
from hubproxy.eventloop import log_uncaught, loop_factory
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
from hubproxy.tls import CertificateWatcher, TLSError, ineffective_options
from hubproxy.tls import build as build_tls
from hubproxy.workers.supervisor import SyncedStore, WorkerSet, WorkerStartError

log = logging.getLogger("hubproxy")


def run(config: Config) -> int:
    """Run the proxy until SIGTERM or SIGINT; the process's exit code."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(serve(config))


def _bind(config: Config) -> tuple[list[Bound], Bound, Bound | None, Bound | None]:
    """The public listener (with --workers N over TCP: N sockets sharing the port), the API's,
    the redirect's and the metrics' listeners."""
    if config.socket:
        publics = [bind_unix(config.socket, "proxy")]
    elif config.workers > 1:
        publics = bind_tcp_group(config.ip, config.port, "proxy", config.workers)
    else:
        publics = [bind_tcp(config.ip, config.port, "proxy")]
    bound = list(publics)
    try:
        if config.api_socket:
            api = bind_unix(config.api_socket, "API")
        else:
            api = bind_tcp(config.api_ip, config.effective_api_port, "API")
        bound.append(api)
        redirect = None
        if _wants_redirect(config):
            assert config.redirect_port is not None
            # all interfaces, whatever --ip says, as CHP (spec §3.13)
            redirect = bind_tcp(None, config.redirect_port, "redirect")
            bound.append(redirect)
        metrics = _bind_metrics(config)
    except ListenError:
        for b in bound:
            b.sock.close()
            remove_unix_socket(b)
        raise
    return publics, api, redirect, metrics


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


async def serve(config: Config) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    stop_reason: list[str] = []

    def request_stop(reason: str) -> None:
        stop_reason.append(reason)
        stop.set()

    loop.set_exception_handler(log_uncaught)
    loop.add_signal_handler(signal.SIGTERM, request_stop, "Terminated")
    loop.add_signal_handler(signal.SIGINT, request_stop, "Interrupted")

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

    try:
        publics, api, redirect, metrics_bound = _bind(config)
    except ListenError as e:
        log.error("%s", e)
        await store.close()
        return 1
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
    metrics_runner: web.AppRunner | None = None
    redirect_runner: web.BaseRunner | None = None
    pid_written = False
    default_route: asyncio.Task[None] | None = None
    try:
        if config.default_target:
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
        api_ssl = tls.api.listening if tls.api else None
        await start_site(api_runner, api.sock, api_ssl)
        if metrics_bound is not None:
            metrics_runner = web.AppRunner(create_metrics_app(metrics), handle_signals=False)
            await metrics_runner.setup()
            await start_site(metrics_runner, metrics_bound.sock)
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

        public_url = public.url("https" if tls.public else "http")
        log.info("Proxying %s to %s", public_url, config.default_target or "(no default)")
        if workers is not None:
            log.info("Serving with %d worker processes (pids %s)", config.workers, workers.pids())
        log.info("Proxy API at %s/api/routes", api.url("https" if tls.api else "http"))
        if metrics_bound is not None:
            log.info("Serve metrics at %s/metrics", metrics_bound.url("http"))
        if redirect is not None:
            log.info("Added HTTP to HTTPS redirection from %s to %s", redirect.port, redirect_to)
        if config.pid_file:
            try:
                with open(config.pid_file, "w") as f:
                    f.write(str(os.getpid()))
            except OSError as e:
                log.error("Cannot write pid file %s: %s", config.pid_file, e.strerror)
                return 1
            pid_written = True
            # logged once written (CHP logs first), so the line tells a reader the file is there
            log.info("Writing pid %s to %s", os.getpid(), config.pid_file)

        await stop.wait()
        log.warning("%s", stop_reason[0])
    finally:
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
            await workers.stop(config.drain_seconds)
        if plane is not None:
            await plane.stop(config.drain_seconds)
        await api_runner.cleanup()
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        if redirect_runner is not None:
            await redirect_runner.cleanup()
        if default_route is not None:
            default_route.cancel()
        await flusher.stop()
        await store.close()
        for listener in (*publics, api, redirect, metrics_bound):
            if listener is not None:
                listener.sock.close()
                remove_unix_socket(listener)
        if pid_written and config.pid_file:
            log.debug("Removing %s", config.pid_file)
            with contextlib.suppress(OSError):
                os.unlink(config.pid_file)
    return 0

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
from hubproxy.api import create_api_app
from hubproxy.config import Config
from hubproxy.listen import Bound, ListenError, bind_tcp, bind_unix, remove_unix_socket
from hubproxy.proxy import ProxyService
from hubproxy.routing import RouteTable
from hubproxy.store import RouteStore, open_store

log = logging.getLogger("hubproxy")

# how long a stop waits for in-flight requests; JupyterHub sends SIGKILL 1-2 s after SIGTERM
DRAIN_SECONDS = 1.0


def run(config: Config) -> int:
    """Run the proxy until SIGTERM or SIGINT; the process's exit code."""
    loop_factory = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # uvloop is not available everywhere (Windows)
        pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(serve(config))


def _bind(config: Config) -> tuple[Bound, Bound]:
    if config.socket:
        public = bind_unix(config.socket, "proxy")
    else:
        public = bind_tcp(config.ip, config.port, "proxy")
    try:
        if config.api_socket:
            api = bind_unix(config.api_socket, "API")
        else:
            api = bind_tcp(config.api_ip, config.effective_api_port, "API")
    except ListenError:
        public.sock.close()
        remove_unix_socket(public)
        raise
    return public, api


async def _add_default_route(store: RouteStore, target: str) -> None:
    log.info("Adding route / -> %s", target)
    await store.add("/", {"target": target, "last_activity": datetime.now(UTC)})
    log.info("Route added / -> %s", target)


def _log_uncaught(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
    """Whatever escapes a callback is logged in CHP's words; the proxy carries on."""
    exc = context.get("exception")
    message = context.get("message", "")
    if isinstance(exc, BaseException):
        log.error("Uncaught Exception: %s", exc or message, exc_info=exc)
    else:
        log.error("Uncaught Exception: %s", message)


async def serve(config: Config) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    stop_reason: list[str] = []

    def request_stop(reason: str) -> None:
        stop_reason.append(reason)
        stop.set()

    loop.set_exception_handler(_log_uncaught)
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

    store = open_store(config.storage_backend)
    await store.start()
    table = RouteTable()
    store.watch(table)
    flusher = ActivityFlusher(table, store)

    try:
        public, api = _bind(config)
    except ListenError as e:
        log.error("%s", e)
        await store.close()
        return 1

    proxy = ProxyService(config, table)
    api_runner = web.AppRunner(create_api_app(config, store, flusher), handle_signals=False)
    public_server: asyncio.Server | None = None
    pid_written = False
    try:
        if config.default_target:
            await _add_default_route(store, config.default_target)
        public_server = await loop.create_server(proxy.protocol_factory, sock=public.sock)
        await api_runner.setup()
        await web.SockSite(api_runner, api.sock).start()
        flusher.start()

        log.info("Proxying %s to %s", public.url(), config.default_target or "(no default)")
        log.info("Proxy API at %s/api/routes", api.url())
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
        if public_server is not None:
            public_server.close()  # stop accepting; connections carry on while they drain
        await proxy.drain(DRAIN_SECONDS)
        await api_runner.cleanup()
        await flusher.stop()
        await store.close()
        for bound in (public, api):
            bound.sock.close()
            remove_unix_socket(bound)
        if pid_written:
            log.debug("Removing %s", config.pid_file)
            with contextlib.suppress(OSError):
                os.unlink(config.pid_file)
    return 0

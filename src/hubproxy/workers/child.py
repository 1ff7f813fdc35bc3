"""A worker process (see `hubproxy.workers`):
`python -m hubproxy.workers.child CONTROL LISTEN INDEX`.

CONTROL and LISTEN are file descriptors inherited from the primary: the control channel's end
and the listening socket this worker serves; INDEX is the worker's number, for its log lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from typing import Any

from hubproxy import __version__
from hubproxy.config import Config
from hubproxy.eventloop import log_uncaught, loop_factory
from hubproxy.logs import setup_logging
from hubproxy.proxy import ProxyService
from hubproxy.routing import RouteTable
from hubproxy.tls import CertificateWatcher, TLSError
from hubproxy.tls import build as build_tls
from hubproxy.workers.channel import Channel, ChannelClosed

log = logging.getLogger("hubproxy")


def gauges(proxy: ProxyService) -> dict[str, int]:
    clients, tunnels = proxy.connection_counts()
    in_use, idle = proxy.upstream_connections()
    received, sent = proxy.client_bytes()
    return {
        "clients": clients,
        "tunnels": tunnels,
        "upstream_in_use": in_use,
        "upstream_idle": idle,
        "received": received,
        "sent": sent,
    }


def apply(table: RouteTable, message: tuple[Any, ...]) -> bool:
    """Apply a change-feed message to the table; False if it is not one."""
    kind = message[0]
    if kind == "set":
        table.route_set(message[2], {"target": message[3]})
    elif kind == "del":
        table.route_removed(message[2])
    elif kind == "reset":
        table.routes_reset({key: {"target": target} for key, target in message[2]})
    else:
        return False
    return True


async def serve(control: socket.socket, listening: socket.socket, index: int) -> int:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(log_uncaught)
    channel = await Channel.open(control)
    kind, config, version = await channel.receive()
    assert kind == "config" and isinstance(config, Config)
    setup_logging(config.log_level, config.log_format)
    if version != __version__:  # hubproxy was upgraded in place since the main process started
        log.error("Worker %d runs hubproxy %s, the main process %s", index, __version__, version)
        return 1
    stop = asyncio.Event()
    handing_over = False  # SIGUSR2: the main process hands over; WebSockets drain too

    def hand_over() -> None:
        nonlocal handing_over
        handing_over = True
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGUSR2, hand_over)

    try:
        tls = build_tls(config)
    except TLSError as e:  # the primary built the same files a moment ago; they changed since
        log.error("%s", e)
        return 1
    table = RouteTable()
    # the routes first: connections may be queued on the socket already (a replacement's)
    if not apply(table, await channel.receive()):
        log.error("Worker %d: no route table from the main process", index)
        return 1
    plane = ProxyService(config, table, tls)
    sides = [side for side in (tls.public, tls.client) if side is not None]
    watcher = CertificateWatcher(sides) if sides else None
    if watcher is not None:
        watcher.start()
        loop.add_signal_handler(signal.SIGHUP, watcher.reload_all)

    async def follow() -> None:
        """The primary's messages, in order, until it goes away."""
        while True:
            message = await channel.receive()
            if apply(table, message):
                continue
            if message[0] == "sync":
                channel.send("reply", message[1], None)
            elif message[0] == "poll":
                if message[2]:
                    plane.start_timing()
                marks = table.take_activity()
                payload = (marks, plane.stats.counters(), gauges(plane))
                channel.send("reply", message[1], payload)

    await plane.serve(listening)
    channel.send("ready")
    following = loop.create_task(follow())
    stopping = loop.create_task(stop.wait())
    await asyncio.wait((following, stopping), return_when=asyncio.FIRST_COMPLETED)
    plane.stop_accepting()  # first: the port is free as soon as the main process's is closed
    orphaned = following.done()  # the primary is gone (killed): drain and leave
    if orphaned and not isinstance(following.exception(), ChannelClosed):
        log.error("Worker control channel failed: %s", following.exception())
    following.cancel()
    stopping.cancel()
    log.debug("Worker %d stopping: draining", index)
    if watcher is not None:
        await watcher.stop()
    await plane.stop(config.drain_seconds, tunnels=handing_over)  # the primary waits
    if not orphaned:
        with contextlib.suppress(ChannelClosed):
            channel.send("final", table.take_activity(), plane.stats.counters(), gauges(plane))
            await channel.drain()
    channel.close()
    return 0


def main(argv: list[str]) -> int:
    # Before anything else: Ctrl-C reaches the whole process group, but the main process
    # decides (and sends SIGTERM); SIGHUP is for certificates, and must not end a worker that
    # has none or is still starting
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    control = socket.socket(fileno=int(argv[0]))
    listening = socket.socket(fileno=int(argv[1]))
    listening.setblocking(False)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(serve(control, listening, int(argv[2])))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""One process's public side: the proxy service serving the public listener, its TLS towards
targets, the access log, and the drain at the stop.

`app.py` runs one in its own process (the default), and with --workers N each worker process
runs one (`hubproxy.workers.child`) on its own listening socket.
"""

from __future__ import annotations

import asyncio
import socket

from hubproxy.config import Config
from hubproxy.listen import BACKLOG
from hubproxy.logs import AccessLogWriter
from hubproxy.proxy import ProxyService
from hubproxy.routing import RouteTable
from hubproxy.tls import TLSContexts


class DataPlane:
    def __init__(self, config: Config, table: RouteTable, tls: TLSContexts) -> None:
        self.proxy = ProxyService(config, table)
        self._tls = tls
        if tls.client is not None:  # https targets: now, and again after each reload
            self.proxy.set_client_ssl(tls.client.current)
            tls.client.on_reload = self.proxy.set_client_ssl
        self.access_log = AccessLogWriter(config.log_format) if config.access_log else None
        self.proxy.access_log = self.access_log
        if config.metrics_port is not None or config.metrics_socket:
            self.proxy.start_timing()  # request durations and lookup times, for the metrics page
        self._server: asyncio.Server | None = None
        # a TLS handshake is the start of a request's head: the same bound (the loop's own
        # default is 60 s whatever the option says)
        self._handshake_seconds = (config.headers_timeout or 60_000) / 1000

    async def start(self, sock: socket.socket) -> None:
        public_tls = self._tls.public
        # the loop listens again, with its own backlog (100) unless given ours
        self._server = await asyncio.get_running_loop().create_server(
            self.proxy.protocol_factory,
            sock=sock,
            backlog=BACKLOG,
            ssl=public_tls.listening if public_tls is not None else None,
            ssl_handshake_timeout=self._handshake_seconds if public_tls is not None else None,
        )

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()  # connections carry on while they drain

    async def stop(self, drain_seconds: float) -> None:
        """Stop accepting, let in-flight requests finish (up to `drain_seconds`), close all."""
        self.stop_accepting()
        await self.proxy.drain(drain_seconds)
        if self.access_log is not None:
            self.access_log.flush()

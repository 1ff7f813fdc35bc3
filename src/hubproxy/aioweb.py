"""What the aiohttp listeners (API, metrics, redirect) share: their listen backlog, and one short
line at most for each request aiohttp cannot parse.

aiohttp logs a malformed request (a bad request line or header, an over-long line, a missing
Host) as an error with a traceback. Anyone who can connect, without a token, could fill the log
that way; `ServerLog` makes each such request one debug line of ours instead (the data plane logs
its own at debug too), and passes everything else on to aiohttp's logger unchanged:

    debug: API: Error handling request from 127.0.0.1: 400 Bad status line: Invalid HTTP version
"""

from __future__ import annotations

import logging
import socket
import ssl
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from hubproxy.listen import BACKLOG

log = logging.getLogger("hubproxy")

_REASON_CHARS = 100  # aiohttp's message may quote the client's bytes: a line, not a dump


class ServerLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's server logger (the `logger` of its request handler) for the `listener` named."""

    def __init__(self, listener: str) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})
        self.listener = listener

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            said = str(msg) % args if args else str(msg)  # `Error handling request from <peer>`
            log.debug("%s: %s: %s %s", self.listener, said, exc.code, _reason(exc))
            return
        super().log(level, msg, *args, **kwargs)


def _reason(exc: HttpProcessingError) -> str:
    """aiohttp's message up to the client's bytes it quotes (`b'...'` under a `^`), on a line."""
    words = []
    for line in exc.message.splitlines():
        line = line.strip()
        if line.startswith(("b'", 'b"', "^")):
            break
        if line:
            words.append(line.rstrip(":"))
    return ": ".join(words)[:_REASON_CHARS] or type(exc).__name__


async def start_site(
    runner: web.BaseRunner, sock: socket.socket, ssl_context: ssl.SSLContext | None = None
) -> web.SockSite:
    """Serve `runner` on the bound socket `sock`.

    Starting a server listens again, with the server's own backlog (aiohttp's 128), which would
    replace the one `listen.py` set; so it is given ours again here.
    """
    site = web.SockSite(runner, sock, ssl_context=ssl_context, backlog=BACKLOG)
    await site.start()
    return site

"""The HTTP to HTTPS redirect listener: `--redirect-port` and `--redirect-to` (spec §3.13).

Every request, whatever its method and path, is answered with
`301 Location: https://<Host without its port>[:<P>]<request-target>` and an empty body, where P
is `--redirect-to`, else the public port. A request without a Host header gets 400 and a
sentence saying why. Low volume, so aiohttp's low-level server does the HTTP.

Differences from CHP (docs/compatibility.md): `:443` is left out whether 443 came from
`--port` or from `--redirect-to` (CHP keeps `:443` from `--redirect-to`, a string); the port is
cut correctly from an IPv6 Host (`[::1]:80` -> `[::1]`, CHP: `[`); an empty Host is treated as
missing; an absolute-form request-target contributes only its path and query.
"""

from __future__ import annotations

import socket
import urllib.parse

from aiohttp import web

from hubproxy.aioweb import ServerLog, start_site
from hubproxy.proxy.paths import split_host

NO_HOST = (
    "This server is HTTPS-only on port {port}, but an HTTP request was made and the host could "
    "not be determined from the request."
)


def location(host: str, port: int, target: str) -> str:
    """Where a request for `target` with `Host: host` is sent (`port` is the HTTPS port)."""
    authority = split_host(host)[0]
    if port != 443:
        authority += f":{port}"
    if not target.startswith("/"):  # absolute-form (`http://h/x`) or `*`
        parts = urllib.parse.urlsplit(target)
        path = parts.path if parts.netloc and parts.path.startswith("/") else "/"
        target = path + (f"?{parts.query}" if parts.netloc and parts.query else "")
    return f"https://{authority}{target}"


def redirect_server(port: int) -> web.Server:
    """An aiohttp low-level server redirecting every request to HTTPS on `port`."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        host = request.headers.get("Host", "").strip()
        if not host:
            return web.Response(status=400, text=NO_HOST.format(port=port))
        return web.Response(
            status=301, headers={"Location": location(host, port, request.raw_path)}
        )

    # idle or half-sent connections closed after 5 s (Node's; aiohttp's default is an hour)
    return web.Server(
        handle,
        access_log=None,
        logger=ServerLog("redirect"),
        keepalive_timeout=5,
        lingering_time=0,
    )


async def start_redirect(sock: socket.socket, port: int) -> web.ServerRunner:
    """Serve redirects to `port` on the bound socket `sock`; `cleanup()` the result to stop."""
    runner = web.ServerRunner(redirect_server(port), handle_signals=False)
    await runner.setup()
    await start_site(runner, sock)
    return runner

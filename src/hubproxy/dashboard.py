"""The routes page: a read-only view of the route table and the traffic, on the API listener.

`/dashboard` is a small hand-written page (`static/dashboard.{html,js,css}`, no build step). The
page itself and its script and style load without a token; they hold no data. The script asks
for the API token in a form, keeps it in the tab's `sessionStorage` (never in a URL), and with
it polls, every few seconds, `GET /api/routes` and `GET /dashboard/stats.json`, both behind the
API's own token check (`Authorization: token <token>`; 403 without it). It builds the page with
DOM text nodes only, so nothing in a route's data can inject markup.

The paths are served by the API's dispatcher (`api.Page`): exact paths, GET (and HEAD) only;
anything else keeps CHP's `404 Not Found`. The first authenticated `stats.json` turns request
timing on (`ProxyStats.timing`), so "mean response time" works without a metrics listener while
a proxy nobody watches does not time its requests.
"""

from __future__ import annotations

import json
import time
from importlib import resources

from aiohttp import web

from hubproxy import __version__
from hubproxy.api import Page
from hubproxy.metrics import Metrics

_STATIC = resources.files("hubproxy") / "static"
_FILES = {
    "/dashboard": ("dashboard.html", "text/html"),
    "/dashboard/dashboard.js": ("dashboard.js", "text/javascript"),
    "/dashboard/dashboard.css": ("dashboard.css", "text/css"),
}
# the page runs its own script and style, and talks to this server only
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def stats(metrics: Metrics) -> dict[str, object]:
    """The numbers the page shows beside the routes (counters; the page computes rates)."""
    proxy, api = metrics.proxy, metrics.api
    clients, tunnels = proxy.connection_counts()
    in_use, idle = proxy.upstream_connections()
    received, sent = proxy.client_bytes()
    durations = {
        f"{cls}xx": {"count": sum(buckets), "seconds": proxy.stats.duration_sums[cls]}
        for cls, buckets in enumerate(proxy.stats.duration_buckets)
        if any(buckets)
    }
    return {
        "version": __version__,
        "now": round(time.time() * 1000),
        "started": round(metrics.started * 1000),
        "routes": len(proxy.table),
        "requests": {
            "web": proxy.stats.requests_web,
            "ws": proxy.stats.requests_ws,
            "api": sum(api.requests_api.values()),
            "proxy": {str(status): n for status, n in sorted(proxy.stats.requests_proxy.items())},
        },
        "durations": durations,  # since timing began (see ProxyStats.timing)
        "connections": {
            "clients": clients,
            "websockets": tunnels,
            "upstream_in_use": in_use,
            "upstream_idle": idle,
        },
        "bytes": {"received": received, "sent": sent},
        "activity_flush_seconds": metrics.flusher.last_flush_duration,
    }


def dashboard_pages(metrics: Metrics) -> dict[str, Page]:
    """The dashboard's paths for `create_api_app(pages=...)`."""
    pages: dict[str, Page] = {}
    for path, (name, content_type) in _FILES.items():
        body = (_STATIC / name).read_bytes()
        headers = {"Cache-Control": "no-cache", **_SECURITY_HEADERS}

        async def serve(
            request: web.Request, body: bytes = body, ctype: str = content_type, h: dict = headers
        ) -> web.StreamResponse:
            return web.Response(body=body, content_type=ctype, charset="utf-8", headers=h)

        pages[path] = Page(serve, authenticated=False)

    async def serve_stats(request: web.Request) -> web.StreamResponse:
        # response times are measured from now on (without a metrics listener, the data plane
        # times requests only once someone is looking)
        metrics.proxy.start_timing()
        await metrics.proxy.refresh()
        return web.Response(
            body=json.dumps(stats(metrics), separators=(",", ":")).encode(),
            content_type="application/json",
            headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
        )

    pages["/dashboard/stats.json"] = Page(serve_stats, authenticated=True)
    return pages

"""The REST API: CHP's `/api/routes`, answered the way CHP answers it (spec §2).

Theory of operation. The API is one coroutine, `_RoutesApi.handle`, installed as the aiohttp
application's only middleware, so it sees every request whatever its request-target (aiohttp's
router, which would answer `404: Not Found` by itself, is never consulted). It follows CHP's
order of checks, which clients can observe, but for the body (step 5):

1. dispatch on `^/api/routes(/.*)?$` of the request path (query ignored); else one of the extra
   `pages` (the dashboard: GET only, each with or without the token check of step 4); else 404
   `Not Found`;
2. the method: GET, POST or DELETE, else 405 `Method not supported`, before authentication;
3. the suffix is percent-decoded as strict UTF-8 (`decodeURIComponent`); malformed -> 400;
4. authentication: `token\\s+(\\S+)` searched in Authorization, compared in constant time -> 403;
5. for POST, the body is read (over `MAX_BODY` -> 413) and parsed as JSON (invalid -> 400);
6. the handler for the method.

CHP reads and parses the body before authentication; we check the token first, so that a
client without it cannot make us read, buffer or parse a body (design.md §5). So an
`Expect: 100-continue` is answered only after the token check (aiohttp would answer it before
any check), and a response that leaves any of the request's body unread closes the connection
at once (aiohttp would read and discard the rest for up to 10 s, its `lingering_time`): only
what arrived with the head is ever in memory, in aiohttp's read buffer.

Every response is logged when the handler is done, as CHP does on `finish`:
`<code> <METHOD> <path without query> <message>`, at info (<400), warn (<500) or error.
Error bodies, 201 and 204 carry no Content-Type (aiohttp's `application/octet-stream` default is
taken off in `on_response_prepare`); JSON answers carry exactly `application/json`.

Deliberate differences from CHP (docs/compatibility.md): where CHP hangs (a malformed escape,
`DELETE /api/routes`) we answer 400; store failures answer 503 (retried by JupyterHub) and other
handler crashes 500; the request path is matched as sent (CHP first resolves dot segments and
backslashes with WHATWG URL parsing); a date-time without offset in `inactive_since` is UTC (JS:
local time); the token is checked before the body is read (403 before 400); the body is limited
to `MAX_BODY` bytes (413), must be UTF-8, and may nest `MAX_DEPTH` levels at most (400).
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import HttpVersion11, web

from hubproxy.activity import ActivityFlusher
from hubproxy.aioweb import ServerLog
from hubproxy.config import Config
from hubproxy.jscompat import (
    decode_uri_component,
    epoch_ms,
    format_js_date,
    json_bytes,
    json_parse,
    parse_js_date,
    to_json,
)
from hubproxy.logs import log_info
from hubproxy.routing import clean_path
from hubproxy.store.base import RouteData, RouteStore, StoreUnavailable

log = logging.getLogger("hubproxy")

# the largest POST body we read; CHP has no limit (a token holder could still fill the memory)
MAX_BODY = 1024 * 1024
# how deep a POST body may nest: a hub's route data is one flat object, and data nested ~950
# deep parsed, then broke the encoders (json, the stores) on their way through: a 500
MAX_DEPTH = 64

_API_PATH = re.compile(r"^/api/routes(/.*)?$")
_ABSOLUTE_FORM = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://[^/?#]*")
_TOKEN = re.compile(r"token\s+(\S+)")
_METHODS = frozenset({"GET", "POST", "DELETE"})


# -- counters for the metrics page --------------------------------------------------------------


@dataclass(slots=True)
class ApiStats:
    """What the API counts, under CHP's metric names (the metrics module exposes them)."""

    api_route_get: int = 0  # full-table GETs answered 200
    api_route_add: int = 0  # POSTs answered 201
    api_route_delete: int = 0  # DELETEs answered 204 or 404
    requests_api: Counter[int] = field(default_factory=Counter)  # every response, by status


API_STATS = web.AppKey("hubproxy_api_stats", ApiStats)


@dataclass(frozen=True, slots=True)
class Page:
    """A GET-only page served beside `/api/routes` at an exact path (the dashboard's)."""

    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    authenticated: bool  # behind the API's token check


# -- pure helpers (JavaScript's own are in jscompat) ---------------------------------------------


def parse_body(body: bytes) -> Any:
    """`JSON.parse(body) || {}`: a falsy document (`null`, `false`, `0`, `""`) becomes `{}`.

    Raises ValueError with the text for `Body not valid JSON: <text>`.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"body is not UTF-8 ({e.reason} at byte {e.start})") from None
    data = json_parse(text)
    if not _nests_within(data, MAX_DEPTH):
        raise ValueError(f"nested more than {MAX_DEPTH} levels deep")
    if data is None or data is False or data == "" or (type(data) in (int, float) and data == 0):
        return {}
    return data


def _nests_within(value: Any, depth: int) -> bool:
    """Whether `value`'s arrays and objects nest at most `depth` levels (without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if level > depth:
            return False
        stack.extend((child, level + 1) for child in children)
    return True


def request_path(raw: str) -> str:
    """The path of a raw request-target: no query or fragment; absolute-form reduced to it."""
    end = len(raw)
    for sep in "?#":
        i = raw.find(sep)
        if 0 <= i < end:
            end = i
    path = raw[:end]
    if not path.startswith("/") and (match := _ABSOLUTE_FORM.match(path)):
        path = path[match.end() :] or "/"
    return path


# -- the application ----------------------------------------------------------------------------


class _Bare(web.Response):
    """A response sent without Content-Type (CHP's errors, 201 and 204)."""


def _bare(status: int, text: str = "") -> _Bare:
    return _Bare(status=status, body=text.encode("utf-8") if text else None)


def _json_response(value: Any) -> web.Response:
    return web.Response(body=json_bytes(value), content_type="application/json")


class RouteJsonCache:
    """GET all's body, assembled from one serialised `"key":{data}` fragment per route.

    The hub polls GET all every few seconds, and between two polls the activity of every busy
    route has changed (in place: the only value a store changes without replacing the route's
    data). So each route's JSON is kept in two pieces around its `last_activity` value, made
    once per data object, and a changed activity costs formatting one date, not serialising
    the route again: for 10,000 routes all active, a few ms instead of ~100 (more than CHP's
    whole answer). The change feed drops replaced and removed routes.
    """

    def __init__(self) -> None:
        self._fragments: dict[str, _Fragment] = {}

    def route_set(self, key: str, data: Mapping[str, Any]) -> None:
        self._fragments.pop(key, None)

    def route_removed(self, key: str) -> None:
        self._fragments.pop(key, None)

    def routes_reset(self, routes: Mapping[str, Mapping[str, Any]]) -> None:
        self._fragments.clear()

    def body(self, routes: Mapping[str, Mapping[str, Any]]) -> bytes:
        fragments = self._fragments
        parts = []
        for key, data in routes.items():
            fragment = fragments.get(key)
            if fragment is None or fragment.data is not data:
                fragment = fragments[key] = _Fragment(key, data)
            parts.append(fragment.current())
        if len(fragments) > len(routes):  # gone without a feed event (a store's own reload)
            for key in [k for k in fragments if k not in routes]:
                del fragments[key]
        return b"{" + b",".join(parts) + b"}"


# stands in for a route's last_activity while its JSON is split around it; a process's own
# random value, which no route's data can hold by chance
_ACTIVITY_MARK = f"hubproxy-activity-{secrets.token_hex(16)}"
_ACTIVITY_MARK_JSON = json_bytes(_ACTIVITY_MARK)


class _Fragment:
    """One route's `"key":{data}`, as the pieces before and after its last_activity value."""

    __slots__ = ("activity", "after", "before", "data", "json", "key")

    def __init__(self, key: str, data: Mapping[str, Any]) -> None:
        self.key = json_bytes(key) + b":"
        self.data = data
        self.activity: Any = data.get("last_activity")
        self.json = self.key + json_bytes(data)
        self.before = self.after = b""
        if isinstance(self.activity, datetime):
            marked = json_bytes({**data, "last_activity": _ACTIVITY_MARK})
            before, mark, after = marked.partition(_ACTIVITY_MARK_JSON)
            if mark and _ACTIVITY_MARK_JSON not in after:
                self.before, self.after = self.key + before, after

    def current(self) -> bytes:
        """The fragment with the route's last_activity as it is now."""
        activity = self.data.get("last_activity")
        if activity != self.activity:
            self.activity = activity
            if self.before and isinstance(activity, datetime):
                date = format_js_date(activity).encode()
                self.json = b"".join((self.before, b'"', date, b'"', self.after))
            else:
                self.json = self.key + json_bytes(self.data)  # no longer a date: as a whole
                self.before = self.after = b""
        return self.json


async def _drop_default_content_type(request: web.Request, response: web.StreamResponse) -> None:
    if isinstance(response, _Bare):
        response.headers.popall("Content-Type", None)


def _expects_continue(request: web.Request) -> bool:
    return request.headers.get("Expect", "").lower() == "100-continue"


async def _continue_later(request: web.Request) -> None:
    """The route's `Expect` handler: `100-continue` waits for the token check (`_read_json`);
    any other expectation is refused as aiohttp refuses it."""
    if request.version >= HttpVersion11 and not _expects_continue(request):
        raise web.HTTPExpectationFailed(text=f"Unknown Expect: {request.headers['Expect']}")


class _Answer(Exception):
    """Finish the request early with an error status and message (CHP's `fail`)."""

    def __init__(self, status: int, message: str = "", body: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.body = message if body is None else body


class _RoutesApi:
    def __init__(
        self,
        config: Config,
        store: RouteStore,
        flusher: ActivityFlusher,
        stats: ApiStats,
        pages: Mapping[str, Page],
    ) -> None:
        self.store = store
        self.route_json = RouteJsonCache()  # GET all's serialised routes
        store.watch(self.route_json)
        self.flusher = flusher
        self.stats = stats
        self.pages = pages
        self.host_routing = config.host_routing
        token = config.auth_token or None
        self.token = token.encode("utf-8", "surrogateescape") if token else None

    @web.middleware
    async def handle(self, request: web.Request, handler: Any) -> web.StreamResponse:
        method = request.method
        log_path = request.raw_path.split("?", 1)[0]
        message = ""
        try:
            response = await self.dispatch(request, method)
        except _Answer as answer:
            response, message = _bare(answer.status, answer.body), answer.message
        except StoreUnavailable as e:
            message = f"Route store unavailable: {e}" if str(e) else "Route store unavailable"
            response = _bare(503, message)
        except Exception as e:
            log.error("Error in handler for %s %s: %s", method, log_path, e, exc_info=True)
            message = f"Internal error: {type(e).__name__}"
            response = _bare(500, message)
        if request.can_read_body:
            # a body we did not read (no token, wrong method, over MAX_BODY) is not read after
            # the answer either: the connection closes (`lingering_time` is 0)
            response.force_close()
        status = response.status
        self.stats.requests_api[status] += 1
        if status < 400:
            log_info("%s %s %s %s", status, method.upper(), log_path, message)
        else:
            level = logging.WARNING if status < 500 else logging.ERROR
            log.log(level, "%s %s %s %s", status, method.upper(), log_path, message)
        return response

    async def unreachable(self, request: web.Request) -> web.StreamResponse:
        raise AssertionError("the middleware answers every request")

    async def dispatch(self, request: web.Request, method: str) -> web.StreamResponse:
        path_only = request_path(request.raw_path)
        match = _API_PATH.match(path_only)
        if match is None:
            page = self.pages.get(path_only)
            if page is None:
                raise _Answer(404, body="Not Found")
            if method not in ("GET", "HEAD"):
                raise _Answer(405, "Method not supported")
            if page.authenticated:
                self._authenticate(request)
            return await page.handler(request)
        if method not in _METHODS:
            raise _Answer(405, "Method not supported")
        path: str | None = match.group(1)
        if path is not None:
            try:
                path = decode_uri_component(path)
            except ValueError as e:
                raise _Answer(400, f"Route path is not valid percent-encoded UTF-8: {e}") from None
        self._authenticate(request)
        if method == "POST":
            return await self.post(path, await self._read_json(request))
        if method == "GET":
            if path and path != "/":
                return await self.get_one(path)
            return await self.get_all(request)
        return await self.delete(path)

    async def _read_json(self, request: web.Request) -> Any:
        if request.version >= HttpVersion11 and _expects_continue(request):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # as aiohttp's own: the response is still to come
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _Answer(413, f"Body larger than {MAX_BODY} bytes") from None
        except ConnectionError as e:  # the client went away mid-body: its fault, not ours
            raise _Answer(400, f"Body not received: {e}") from None
        try:
            return parse_body(body)
        except ValueError as e:
            raise _Answer(400, f"Body not valid JSON: {e}") from None

    def _authenticate(self, request: web.Request) -> None:
        if self.token is None:
            return
        header = request.headers.get("Authorization")
        match = _TOKEN.search(header) if header else None
        presented = match.group(1).encode("utf-8", "surrogateescape") if match else b""
        # compare even without a token, so that a miss costs the same as a wrong token
        if hmac.compare_digest(presented, self.token) and match:
            return
        # CHP logs the whole Authorization header here; we never log what was presented
        log.debug(
            "Rejecting API request from %s: %s",
            request.remote or "unknown",
            "wrong token" if match else "no token",
        )
        raise _Answer(403)

    async def get_one(self, path: str) -> web.StreamResponse:
        await self.flusher.flush()
        data = await self.store.get(clean_path(path))
        if data is None:
            return _bare(404)
        return _json_response(data)

    async def get_all(self, request: web.Request) -> web.StreamResponse:
        since: int | None = None
        params = dict(reversed(parse_qsl(request.query_string, keep_blank_values=True)))
        value = params.get("inactiveSince") or params.get("inactive_since")
        if value:
            since = parse_js_date(value)
            if since is None:
                raise _Answer(400, f"Invalid datestamp '{value}' must be ISO8601.")
        await self.flusher.flush()
        routes: dict[str, RouteData] = await self.store.get_all()
        if since is not None:
            routes = {
                key: data
                for key, data in routes.items()
                if isinstance(activity := data.get("last_activity"), datetime)
                and epoch_ms(activity) < since
            }
        # a filtered view is serialised as it is; the cache keeps the whole table's fragments
        body = self.route_json.body(routes) if since is None else json_bytes(routes)
        response = web.Response(body=body, content_type="application/json")
        self.stats.api_route_get += 1
        return response

    async def post(self, path: str | None, data: Any) -> web.StreamResponse:
        if not isinstance(data, dict) or not isinstance(data.get("target"), str):
            log.warning("Bad POST data: %s", to_json(data))
            raise _Answer(400, "Must specify 'target' as string")
        key = clean_path(path or "/")
        if self.host_routing and key != "/":
            data["host"] = key.split("/")[1]
        target = data["target"]
        log_info("Adding route %s -> %s", key, target)
        data["last_activity"] = datetime.now(UTC)
        await self.store.add(key, data)
        log_info("Route added %s -> %s", key, target)
        self.stats.api_route_add += 1
        return _bare(201)

    async def delete(self, path: str | None) -> web.StreamResponse:
        if path is None:
            # CHP throws inside its store and never answers
            raise _Answer(400, "DELETE needs a route: /api/routes/<path> (/api/routes/ for '/')")
        existed = await self.store.remove(clean_path(path))
        self.stats.api_route_delete += 1
        if not existed:
            return _bare(404)
        log_info("Removing route %s", path)
        return _bare(204)


def create_api_app(
    config: Config,
    store: RouteStore,
    flusher: ActivityFlusher,
    stats: ApiStats | None = None,
    pages: Mapping[str, Page] | None = None,
) -> web.Application:
    """The API as an aiohttp application; its counters are `app[API_STATS]`; `pages` are served
    beside it at their exact paths (see `Page`)."""
    stats = stats if stats is not None else ApiStats()
    api = _RoutesApi(config, store, flusher, stats, pages or {})
    app = web.Application(
        middlewares=[api.handle],
        client_max_size=MAX_BODY,
        # an idle kept-alive connection is closed after 5 s, as Node's (CHP's) API server does;
        # aiohttp's own default keeps it an hour
        handler_args={"logger": ServerLog("API"), "lingering_time": 0, "keepalive_timeout": 5},
    )
    # `api.handle` answers every request itself; this route only lets aiohttp resolve a path
    # without building a 404 exception first (~10 us of each API request)
    app.router.add_route("*", "/{tail:.*}", api.unreachable, expect_handler=_continue_later)
    app[API_STATS] = stats
    app.on_response_prepare.append(_drop_default_content_type)
    return app

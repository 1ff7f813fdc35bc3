"""The REST API (spec §2; CHP's api_spec.js, §6.2; the extra observed behaviours of §6.7).

Most tests build the aiohttp application in-process on a MemoryStore (so a test can put routes
with any `last_activity` in the store, or make the store fail) and talk to it over a real
loopback socket with request-targets sent exactly as written. A few at the end go through the
real process (`python -m hubproxy`), as JupyterHub does.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from hubproxy.activity import ActivityFlusher
from hubproxy.api import (
    API_STATS,
    MAX_BODY,
    ApiStats,
    create_api_app,
    parse_body,
    request_path,
)
from hubproxy.config import Config
from hubproxy.jscompat import format_js_date, parse_js_date
from hubproxy.routing import RouteTable
from hubproxy.store import MemoryStore, StoreUnavailable

TOKEN = "secret"
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
_UNSET: Any = object()


# -- pure helpers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "data"),
    [
        (b'{"target": "http://x"}', {"target": "http://x"}),
        (b"null", {}),
        (b"false", {}),
        (b"0", {}),
        (b"-0.0", {}),
        (b'""', {}),
        (b"[]", []),  # truthy in JS: kept (and later refused for its missing target)
        (b"{}", {}),
        (b"true", True),
        (b'"x"', "x"),
        (b' \n{"a": [1, {"b": null}]}\t', {"a": [1, {"b": None}]}),
        ('{"ü": "秀樹"}'.encode(), {"ü": "秀樹"}),
        (b'{"big": 1e400, "small": -1e400, "x": 1.5}', {"big": None, "small": None, "x": 1.5}),
        (b'{"n": 123456789012345678901234567890}', {"n": 123456789012345678901234567890}),
    ],
)
def test_parse_body(body: bytes, data: Any) -> None:
    assert parse_body(body) == data


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "SyntaxError: Unexpected end of JSON input"),
        (b"  \n", "SyntaxError: Unexpected end of JSON input"),
        (b"nope", "SyntaxError: "),
        (b"{", "SyntaxError: "),
        (b'{"a": NaN}', "SyntaxError: "),
        (b"Infinity", "SyntaxError: "),
        (b"\xff", "not UTF-8"),
        (b"[" * 100_000, "SyntaxError: "),
        (b'{"a": 1} x', "SyntaxError: "),
        (b'\xef\xbb\xbf{"a": 1}', "SyntaxError: "),  # a BOM, as JSON.parse
        (b"1" * 5000, "SyntaxError: "),  # beyond int()'s digit limit
    ],
)
def test_parse_body_rejects(body: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_body(body)


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ("/api/routes", "/api/routes"),
        ("/api/routes?x=1", "/api/routes"),
        ("/api/routes/a#frag", "/api/routes/a"),
        ("/api/routes/a?b#c", "/api/routes/a"),
        ("http://host:1/api/routes/x?y", "/api/routes/x"),
        ("http://host", "/"),
        ("*", "*"),
        ("//api/routes", "//api/routes"),
    ],
)
def test_request_path(raw: str, path: str) -> None:
    assert request_path(raw) == path


# -- the in-process harness -----------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        assert self.headers.get("Content-Type") == "application/json", self.headers
        return json.loads(self.body)

    @property
    def content_type(self) -> str | None:
        return self.headers.get("Content-Type")


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]

    def at(self, level: int) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == level]

    def text(self) -> str:
        return "\n".join(
            r.getMessage() + ("\n" + repr(r.exc_info) if r.exc_info else "") for r in self.records
        )


@pytest.fixture
def hub_log() -> Iterator[ListHandler]:
    """Everything the hubproxy logger says at any level (whatever its propagation settings)."""
    logger = logging.getLogger("hubproxy")
    handler = ListHandler()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@dataclass
class Api:
    server: TestServer
    session: aiohttp.ClientSession
    store: MemoryStore
    table: RouteTable
    stats: ApiStats
    token: str | None

    async def call(
        self,
        method: str,
        path: str = "",
        data: Any = _UNSET,
        *,
        body: bytes | None = None,
        token: str | bool | None = True,
        auth: str | None = None,
        target: str | None = None,
    ) -> Reply:
        """`method /api/routes<path>`; `target` sends any raw request-target instead."""
        headers: dict[str, str] = {}
        if auth is not None:
            headers["Authorization"] = auth
        else:
            if token is True:
                token = self.token
            if token:
                headers["Authorization"] = f"token {token}"
        if data is not _UNSET:
            body = json.dumps(data).encode()
        raw = target if target is not None else "/api/routes" + path
        if not raw.startswith("/"):  # `*`, absolute-form: beyond what a client library sends
            return await self.raw(method, raw, headers)
        url = URL(f"http://127.0.0.1:{self.server.port}{raw}", encoded=True)
        payload: Any = body
        if body is not None and len(body) > 65536:
            payload = io.BytesIO(body)  # aiohttp warns about large bytes bodies
        async with self.session.request(
            method, url, data=payload, headers=headers, skip_auto_headers=["Content-Type"]
        ) as resp:
            return Reply(resp.status, resp.headers, await resp.read())

    async def raw(self, method: str, target: str, headers: dict[str, str]) -> Reply:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
        try:
            lines = [f"{method} {target} HTTP/1.1", "Host: x", "Connection: close"]
            lines += [f"{name}: {value}" for name, value in headers.items()]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            status, head, body = await read_response(reader, method)
        finally:
            writer.close()
        return Reply(status, CIMultiDictProxy(CIMultiDict(head)), body)

    async def routes(self, query: str = "") -> dict[str, Any]:
        reply = await self.call("GET", query)
        assert reply.status == 200, reply
        data: dict[str, Any] = reply.json()
        return data

    async def add(self, path: str, target: str, **extra: Any) -> None:
        reply = await self.call("POST", path, {"target": target, **extra})
        assert reply.status == 201, reply


MakeApi = Callable[..., Awaitable[Api]]


@pytest.fixture
async def make_api() -> AsyncIterator[MakeApi]:
    started: list[Api] = []

    async def make(
        token: str | None = TOKEN, store: MemoryStore | None = None, **config: Any
    ) -> Api:
        store = store if store is not None else MemoryStore()
        await store.start()
        table = RouteTable()
        store.watch(table)
        flusher = ActivityFlusher(table, store)
        stats = ApiStats()
        app = create_api_app(Config(auth_token=token, **config), store, flusher, stats)
        assert app[API_STATS] is stats
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        session = aiohttp.ClientSession()
        api = Api(server, session, store, table, stats, token)
        started.append(api)
        return api

    yield make
    for api in started:
        await api.session.close()
        await api.server.close()


@pytest.fixture
async def api(make_api: MakeApi) -> Api:
    return await make_api()


# -- api_spec.js (§6.2) -------------------------------------------------------------------------


async def test_default_route_is_found_for_any_url(api: Api) -> None:
    await api.store.add("/", {"target": "http://127.0.0.1:8902"})
    for path in ("/", "/any/random/url"):
        route = api.table.lookup(path)
        assert route is not None
        assert (route.prefix, route.target) == ("/", "http://127.0.0.1:8902")


async def test_get_routes_fetches_the_routing_table(api: Api) -> None:
    await api.store.add("/", {"target": "http://127.0.0.1:8902"})
    reply = await api.call("GET")
    assert reply.status == 200
    assert reply.content_type == "application/json"
    assert list(reply.json()) == ["/"]  # `/` is included, whatever CHP's README says


async def test_get_single_route(api: Api) -> None:
    await api.add("/path", "https://127.0.0.1:54321")
    reply = await api.call("GET", "/path")
    assert reply.status == 200
    assert reply.content_type == "application/json"
    assert reply.json()["target"] == "https://127.0.0.1:54321"


async def test_get_single_missing_route_is_404(api: Api) -> None:
    reply = await api.call("GET", "/path")
    assert (reply.status, reply.body, reply.content_type) == (404, b"", None)


async def test_post_creates_a_route(api: Api) -> None:
    before = datetime.now(UTC)
    reply = await api.call("POST", "/user/foo", {"target": "http://127.0.0.1:9999"})
    assert (reply.status, reply.body, reply.content_type) == (201, b"", None)
    data = await api.store.get("/user/foo")
    assert data is not None
    assert data["target"] == "http://127.0.0.1:9999"
    assert isinstance(data["last_activity"], datetime)
    assert data["last_activity"].tzinfo is not None
    assert before <= data["last_activity"] <= datetime.now(UTC)


async def test_post_handles_uri_escapes(api: Api) -> None:
    await api.add("/user/foo%40bar", "http://127.0.0.1:9999")
    assert await api.store.get("/user/foo@bar") is not None
    route = api.table.lookup("/user/foo@bar/path")
    assert route is not None and route.prefix == "/user/foo@bar"


async def test_post_creates_the_root_route(api: Api) -> None:
    reply = await api.call("POST", "", {"target": "http://127.0.0.1:9999"})
    assert reply.status == 201
    assert list(await api.store.get_all()) == ["/"]


async def test_delete_deletes_a_route(api: Api) -> None:
    await api.add("/user/bar", "http://127.0.0.1:9999")
    reply = await api.call("DELETE", "/user/bar")
    assert (reply.status, reply.body, reply.content_type) == (204, b"", None)
    assert await api.store.get("/user/bar") is None
    assert api.table.lookup("/user/bar") is None


async def test_inactive_since_bad_value_is_400(api: Api) -> None:
    reply = await api.call("GET", "?inactiveSince=endoftheuniverse")
    assert reply.status == 400
    assert reply.body == b"Invalid datestamp 'endoftheuniverse' must be ISO8601."
    assert reply.content_type is None


async def test_inactive_since_filters_inactive_entries(api: Api) -> None:
    now = datetime.now(UTC)
    await api.store.add("/yesterday", {"target": "http://y", "last_activity": now - timedelta(1)})
    await api.store.add("/today", {"target": "http://t", "last_activity": now - timedelta(0, 60)})

    def since(when: datetime) -> str:
        return "?inactiveSince=" + quote(format_js_date(when))

    assert await api.routes(since(datetime(1970, 1, 1, tzinfo=UTC))) == {}
    assert list(await api.routes(since(now - timedelta(hours=1)))) == ["/yesterday"]
    assert list(await api.routes(since(now + timedelta(hours=1)))) == ["/yesterday", "/today"]


# -- authentication and the order of checks (§2.1, §2.2, quirk 4) --------------------------------


@pytest.mark.parametrize(
    "auth",
    [
        "token secret",
        "Bearer token secret",
        "xtoken secret",
        "token secret trailing-junk",
        "token   secret",
        "token\tsecret",
        "foo token secret",
    ],
)
async def test_token_accepted(api: Api, auth: str) -> None:
    reply = await api.call("GET", auth=auth)
    assert reply.status == 200


@pytest.mark.parametrize(
    "auth",
    [None, "", "Token secret", "TOKEN secret", "token", "token ", "secret", "token secretx",
     "token secre", "Bearer secret", "token wrong secret"],
)  # fmt: skip
async def test_token_rejected(api: Api, auth: str | None, hub_log: ListHandler) -> None:
    reply = await (api.call("GET", token=None) if auth is None else api.call("GET", auth=auth))
    assert (reply.status, reply.body, reply.content_type) == (403, b"", None)
    assert "403 GET /api/routes " in hub_log.at(logging.WARNING)
    assert TOKEN not in hub_log.text()


async def test_rejected_token_is_never_logged(api: Api, hub_log: ListHandler) -> None:
    await api.call("GET", auth="token hunter2-not-the-token")
    await api.call("POST", "/x", {"target": "http://x"}, auth="Bearer hunter2-not-the-token")
    assert [r for r in hub_log.messages if "Rejecting API request" in r]
    assert "hunter2" not in hub_log.text()


async def test_accepted_token_is_never_logged(make_api: MakeApi, hub_log: ListHandler) -> None:
    api = await make_api(token="s3cr3t-token-value")
    await api.add("/a", "http://a")
    await api.routes()
    await api.call("DELETE", "/a")
    await api.call("GET", token="wrong")
    assert "s3cr3t-token-value" not in hub_log.text()


async def test_no_token_configured_means_no_authentication(make_api: MakeApi) -> None:
    for token in (None, ""):
        api = await make_api(token=token)
        assert (await api.call("POST", "/a", {"target": "http://a"})).status == 201
        assert (await api.call("GET", "/a", token="whatever")).status == 200
        assert (await api.call("DELETE", "/a")).status == 204


@pytest.mark.parametrize("method", ["PUT", "PATCH", "HEAD", "OPTIONS", "TRACE", "PROPFIND"])
@pytest.mark.parametrize("path", ["", "/", "/user/x"])
async def test_405_before_authentication(api: Api, method: str, path: str) -> None:
    reply = await api.call(method, path, token=None)
    assert reply.status == 405
    assert reply.content_type is None
    if method != "HEAD":
        assert reply.body == b"Method not supported"


async def test_405_log_line(api: Api, hub_log: ListHandler) -> None:
    await api.call("PUT", "/x?q=1", token=None)
    assert "405 PUT /api/routes/x Method not supported" in hub_log.at(logging.WARNING)


@pytest.mark.parametrize(
    "target",
    ["/", "/api", "/api/", "/api/routesfoo", "/api/route", "/API/routes", "/x/api/routes",
     "//api/routes", "/api//routes", "/api/routes%2F"],
)  # fmt: skip
@pytest.mark.parametrize("method", ["GET", "POST", "PUT"])
async def test_not_found_outside_api_routes(
    api: Api, target: str, method: str, hub_log: ListHandler
) -> None:
    reply = await api.call(method, target=target, token=None)
    assert (reply.status, reply.body, reply.content_type) == (404, b"Not Found", None)
    log_path = target.split("?")[0]
    assert f"404 {method} {log_path} " in hub_log.at(logging.WARNING)


async def test_asterisk_form_is_not_found(api: Api) -> None:
    reply = await api.call("OPTIONS", target="*", token=None)  # dispatch comes before 405
    assert (reply.status, reply.body, reply.content_type) == (404, b"Not Found", None)


async def test_absolute_form_request_target(api: Api) -> None:
    await api.add("/a", "http://a")
    reply = await api.call("GET", target=f"http://127.0.0.1:{api.server.port}/api/routes/a")
    assert reply.status == 200
    assert reply.json()["target"] == "http://a"


async def test_bad_json_is_400(api: Api, hub_log: ListHandler) -> None:
    reply = await api.call("POST", "/foo", body=b"not json")
    assert reply.status == 400
    assert reply.body.startswith(b"Body not valid JSON: SyntaxError: ")
    assert reply.content_type is None
    assert any(
        m.startswith("400 POST /api/routes/foo Body not valid JSON: ") for m in hub_log.messages
    )


@pytest.mark.parametrize("depth", [65, 300, 600, 800, 900, 5000])
async def test_deeply_nested_json_is_400_and_the_api_goes_on(api: Api, depth: int) -> None:
    """Route data nested deeper than MAX_DEPTH (64) is refused with a 400 (at ~950 levels it
    parsed, then broke the JSON encoder: a 500); 64 levels are kept and served whole."""
    deep = b'{"target": "http://x", "data": ' + b"[" * depth + b"]" * depth + b"}"
    reply = await api.call("POST", "/deep", body=deep)
    assert reply.status == 400
    assert reply.body in (
        b"Body not valid JSON: nested more than 64 levels deep",
        b"Body not valid JSON: SyntaxError: nested too deeply",  # past the parser's own limit
    )
    ok = b'{"target": "http://x", "data": ' + b"[" * 63 + b"]" * 63 + b"}"
    assert (await api.call("POST", "/deep", body=ok)).status == 201
    data = (await api.call("GET", "/deep")).json()["data"]
    for _ in range(62):
        (data,) = data
    assert data == []


async def test_empty_body_is_bad_json(api: Api) -> None:
    reply = await api.call("POST", "/foo", body=b"")
    assert (reply.status, reply.body) == (
        400,
        b"Body not valid JSON: SyntaxError: Unexpected end of JSON input",
    )


async def test_valid_json_without_token_is_403(api: Api) -> None:
    reply = await api.call("POST", "/foo", body=b"null", token=None)
    assert reply.status == 403  # authenticated first, then parsed, then checked
    reply = await api.call("POST", "/foo", {"target": "http://x"}, token="wrong")
    assert reply.status == 403
    assert await api.store.get("/foo") is None


async def test_malformed_escape_is_400_before_authentication(api: Api) -> None:
    for method in ("GET", "POST", "DELETE"):
        reply = await api.call(method, "/%E0%A4%A", body=b"{", token=None)
        assert reply.status == 400  # CHP never answers (quirk 5)
        assert reply.body.startswith(b"Route path is not valid percent-encoded UTF-8")
        assert reply.content_type is None


@pytest.mark.parametrize("path", ["/%", "/a%2", "/%FF", "/%C3", "/%ED%A0%80", "/%C0%AF"])
async def test_malformed_escapes(api: Api, path: str) -> None:
    assert (await api.call("GET", path)).status == 400
    assert (await api.call("POST", path, {"target": "http://x"})).status == 400
    assert await api.store.get_all() == {}


# -- POST (§2.3) ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "logged"),
    [
        (b"null", "{}"),
        (b"false", "{}"),
        (b"0", "{}"),
        (b'""', "{}"),
        (b"{}", "{}"),
        (b"[]", "[]"),
        (b'["http://x"]', '["http://x"]'),
        (b'"http://x"', '"http://x"'),
        (b"1", "1"),
        (b"true", "true"),
        (b'{"target": 1}', '{"target":1}'),
        (b'{"target": null}', '{"target":null}'),
        (b'{"target": ["http://x"]}', '{"target":["http://x"]}'),
        (b'{"target": {"url": "http://x"}}', '{"target":{"url":"http://x"}}'),
        (b'{"Target": "http://x"}', '{"Target":"http://x"}'),
    ],
)
async def test_post_needs_a_string_target(
    api: Api, body: bytes, logged: str, hub_log: ListHandler
) -> None:
    reply = await api.call("POST", "/foo", body=body)
    assert (reply.status, reply.body, reply.content_type) == (
        400,
        b"Must specify 'target' as string",
        None,
    )
    assert f"Bad POST data: {logged}" in hub_log.at(logging.WARNING)
    assert "400 POST /api/routes/foo Must specify 'target' as string" in hub_log.at(logging.WARNING)
    assert await api.store.get_all() == {}


async def test_post_needs_no_content_type(api: Api) -> None:
    # JupyterHub 6 sends its JSON with no Content-Type; any other one is ignored too
    for content_type in (None, "text/plain", "application/x-www-form-urlencoded"):
        headers = {"Authorization": f"token {TOKEN}"}
        if content_type:
            headers["Content-Type"] = content_type
        async with api.session.post(
            f"http://127.0.0.1:{api.server.port}/api/routes/ct",
            data=b'{"target": "http://x"}',
            headers=headers,
            skip_auto_headers=["Content-Type"],
        ) as resp:
            assert resp.status == 201


async def test_post_echoes_every_key(api: Api) -> None:
    extra = {
        "jupyterhub": True,
        "user": "ü",
        "server_name": "",
        "nested": {"a": [1, 2.5, None, {"b": "c"}], "empty": {}},
        "count": 3,
    }
    await api.add("/user/x", "http://x", **extra)
    data = (await api.call("GET", "/user/x")).json()
    assert list(data) == ["target", *extra, "last_activity"]
    assert {k: data[k] for k in extra} == extra
    assert ISO_MS.match(data["last_activity"])
    assert (await api.routes())["/user/x"] == data


async def test_post_replaces_whole_data_and_keeps_position(api: Api) -> None:
    await api.add("/a", "http://a1", extra=1, keep="me")
    await api.add("/b", "http://b")
    await api.add("/a", "http://a2", other=2)
    routes = await api.routes()
    assert list(routes) == ["/a", "/b"]
    assert {k: v for k, v in routes["/a"].items() if k != "last_activity"} == {
        "target": "http://a2",
        "other": 2,
    }
    assert api.table.lookup("/a/x").target == "http://a2"  # type: ignore[union-attr]


async def test_post_overrides_client_last_activity(api: Api) -> None:
    before = datetime.now(UTC)
    await api.add("/a", "http://a", last_activity="1999-01-01T00:00:00.000Z", x=1)
    data = (await api.call("GET", "/a")).json()
    assert list(data) == ["target", "last_activity", "x"]  # the client's key keeps its place
    assert parse_js_date(data["last_activity"]) >= int(before.timestamp() * 1000)  # type: ignore[operator]


@pytest.mark.parametrize(
    ("path", "key"),
    [
        ("/user/foo%40bar/", "/user/foo@bar"),
        ("/has%20space/%C3%BC", "/has space/ü"),
        ("/a//", "/a/"),
        ("//", "/"),
        ("/", "/"),
        ("", "/"),
        ("/%2F", "/"),
        ("/a%2Fb", "/a/b"),
        ("/trailing/", "/trailing"),
        ("/~TestJH", "/~TestJH"),
        ("/a%25b", "/a%b"),
        ("/user/a?query=ignored", "/user/a"),
    ],
)
async def test_post_keys_are_decoded_and_cleaned(api: Api, path: str, key: str) -> None:
    await api.add(path, "http://x")
    assert list(await api.routes()) == [key]


async def test_post_log_lines(api: Api, hub_log: ListHandler) -> None:
    await api.add("/user/foo%40bar/", "http://127.0.0.1:1234")
    assert hub_log.at(logging.INFO) == [
        "Adding route /user/foo@bar -> http://127.0.0.1:1234",
        "Route added /user/foo@bar -> http://127.0.0.1:1234",
        "201 POST /api/routes/user/foo%40bar/ ",
    ]


async def test_post_with_host_routing(make_api: MakeApi) -> None:
    api = await make_api(host_routing=True)
    await api.add("/river.example.com/user/river", "http://r", host="client-value")
    await api.add("", "http://hub")
    await api.add("//odd", "http://odd")
    routes = await api.routes()
    assert routes["/river.example.com/user/river"]["host"] == "river.example.com"
    assert "host" not in routes["/"]
    assert routes["//odd"]["host"] == ""  # `//odd`.split("/")[1], as CHP
    route = api.table.lookup("/river.example.com/user/river/lab")
    assert route is not None and route.prefix == "/river.example.com/user/river"


async def test_post_without_host_routing_keeps_client_host(api: Api) -> None:
    await api.add("/a", "http://a", host="mine")
    assert (await api.call("GET", "/a")).json()["host"] == "mine"


async def test_post_target_is_not_validated(api: Api) -> None:
    for target in ("not a url", "ws://x", ""):
        assert (await api.call("POST", "/t", {"target": target})).status == 201


async def test_body_too_large_is_413(api: Api) -> None:
    body = b'{"target": "http://x", "pad": "' + b"x" * MAX_BODY + b'"}'
    reply = await api.call("POST", "/big", body=body)
    assert reply.status == 413
    assert reply.content_type is None
    assert await api.store.get("/big") is None
    assert (await api.call("GET")).status == 200  # and the API carries on


async def test_body_of_any_size_up_to_the_limit(api: Api) -> None:
    pad = "x" * (MAX_BODY - 100)
    await api.add("/big", "http://x", pad=pad)
    assert (await api.call("GET", "/big")).json()["pad"] == pad


# -- GET (§2.3) ----------------------------------------------------------------------------------


async def test_get_all_forms(api: Api) -> None:
    await api.store.add("/", {"target": "http://root"})
    await api.add("/a", "http://a")
    for path in ("", "/", "?", "?x=1", "/?x=1"):
        routes = await api.routes(path)
        assert list(routes) == ["/", "/a"], path


async def test_double_slash_is_the_root_route(api: Api) -> None:
    await api.store.add("/", {"target": "http://root"})
    await api.add("/a", "http://a")
    for path in ("//", "/%2F", "//?x=1"):
        reply = await api.call("GET", path)
        assert reply.json() == {"target": "http://root"}, path


async def test_get_single_cleans_the_key(api: Api) -> None:
    await api.add("/user/foo@bar", "http://x")
    for path in ("/user/foo@bar", "/user/foo%40bar", "/user/foo%40bar/", "user/foo@bar"):
        reply = await api.call("GET", path if path.startswith("/") else "/" + path)
        assert reply.status == 200, path
    assert (await api.call("GET", "/user/foo@bar//")).status == 404  # only one slash goes
    assert (await api.call("GET", "/user")).status == 404  # no prefix matching here


async def test_get_single_ignores_filter(api: Api) -> None:
    await api.add("/a", "http://a")
    assert (await api.call("GET", "/a?inactive_since=garbage")).status == 200


async def test_get_all_is_insertion_ordered_json(api: Api) -> None:
    keys = ["/z", "/a", "/m/n", "/秀樹", "/has space"]
    for key in keys:
        await api.add(quote(key), "http://x")
    reply = await api.call("GET")
    assert reply.content_type == "application/json"
    assert list(json.loads(reply.body)) == keys
    assert "秀樹".encode() in reply.body  # raw UTF-8, as JSON.stringify writes it


async def test_last_activity_format_and_flush_before_read(api: Api) -> None:
    await api.add("/a", "http://a")
    route = api.table.get("/a")
    assert route is not None
    api.table.mark_active(route, datetime(2100, 1, 2, 3, 4, 5, 678999, tzinfo=UTC).timestamp())
    assert (await api.routes())["/a"]["last_activity"] == "2100-01-02T03:04:05.678Z"
    api.table.mark_active(route, datetime(2100, 1, 2, 3, 4, 6, tzinfo=UTC).timestamp())
    assert (await api.call("GET", "/a")).json()["last_activity"] == "2100-01-02T03:04:06.000Z"


async def test_inactive_since_parameter_names(api: Api) -> None:
    now = datetime.now(UTC)
    await api.store.add("/old", {"target": "http://o", "last_activity": now - timedelta(days=2)})
    await api.store.add("/new", {"target": "http://n", "last_activity": now})
    await api.store.add("/never", {"target": "http://never"})  # no last_activity
    day_ago = quote(format_js_date(now - timedelta(days=1)))
    assert list(await api.routes(f"?inactive_since={day_ago}")) == ["/old"]
    assert list(await api.routes(f"?inactiveSince={day_ago}")) == ["/old"]
    # inactiveSince first; an empty one falls back to inactive_since
    assert list(await api.routes(f"?inactiveSince={day_ago}&inactive_since=bad")) == ["/old"]
    assert list(await api.routes(f"?inactiveSince=&inactive_since={day_ago}")) == ["/old"]
    assert (await api.call("GET", "?inactiveSince=&inactive_since=bad")).status == 400
    assert (await api.call("GET", f"?inactive_since=bad&inactiveSince={day_ago}")).status == 200
    # the first of repeated parameters counts
    assert list(await api.routes(f"?inactiveSince={day_ago}&inactiveSince=bad")) == ["/old"]
    # empty values: no filter at all, so routes without last_activity are listed too
    for query in ("?inactiveSince=", "?inactive_since=", "?inactiveSince=&inactive_since="):
        assert list(await api.routes(query)) == ["/old", "/new", "/never"]
    # a filter never lists routes without last_activity
    assert list(await api.routes("?inactiveSince=275000")) == ["/old", "/new"]


async def test_inactive_since_is_strict(api: Api) -> None:
    when = datetime(2020, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    await api.store.add("/a", {"target": "http://a", "last_activity": when})
    shown = (await api.routes())["/a"]["last_activity"]
    assert shown == "2020-05-06T07:08:09.123Z"
    assert await api.routes("?inactiveSince=" + shown) == {}  # not strictly before itself
    assert list(await api.routes("?inactiveSince=2020-05-06T07:08:09.124Z")) == ["/a"]


class _Any:
    def __eq__(self, other: object) -> bool:
        return True


ANY_ROUTE = _Any()


@pytest.mark.parametrize(
    ("since", "listed"),
    [
        ("12345", True),  # a year
        ("2000-01-01", False),
        ("2020-05-06", False),
        ("2020-05-07", True),
        ("2020-05-06T08:00:00%2B01:00", False),  # 07:00 UTC
        ("2020-05-06T06:00:00-01:00", False),  # 07:00 UTC
        ("2020-05-06T07:00:00-01:00", True),  # 08:00 UTC
        ("2020-05-06T07:00", False),  # no offset: UTC (JS: local time)
        ("2020-05-06T07:08:10", True),
        ("2020-05-06T07:08:09.5", True),
        (quote("Wed, 06 May 2020 08:00:00 GMT"), True),
        ("Wed,+06+May+2020+07:00:00+GMT", False),  # `+` is a space in a query
        ("2020", False),
    ],
)
async def test_inactive_since_forms(api: Api, since: str, listed: bool) -> None:
    when = datetime(2020, 5, 6, 7, 8, 9, tzinfo=UTC)
    await api.store.add("/a", {"target": "http://a", "last_activity": when})
    assert (await api.routes("?inactive_since=" + since) == {"/a": ANY_ROUTE}) is listed


@pytest.mark.parametrize("since", ["endoftheuniverse", "tomorrow", "2020-13-01", "1e3", "%00"])
async def test_inactive_since_invalid(api: Api, since: str, hub_log: ListHandler) -> None:
    reply = await api.call("GET", "?inactive_since=" + since)
    assert reply.status == 400
    value = since.replace("%00", "\x00")
    assert reply.body == f"Invalid datestamp '{value}' must be ISO8601.".encode()
    assert f"400 GET /api/routes Invalid datestamp '{value}' must be ISO8601." in hub_log.at(
        logging.WARNING
    )


# -- DELETE (§2.3) -------------------------------------------------------------------------------


async def test_delete_missing_is_404(api: Api) -> None:
    reply = await api.call("DELETE", "/nope")
    assert (reply.status, reply.body, reply.content_type) == (404, b"", None)


async def test_delete_cleans_and_logs_the_raw_path(api: Api, hub_log: ListHandler) -> None:
    await api.add("/user/foo@bar", "http://x")
    reply = await api.call("DELETE", "/user/foo%40bar/")
    assert reply.status == 204
    assert "Removing route /user/foo@bar/" in hub_log.at(logging.INFO)
    assert "204 DELETE /api/routes/user/foo%40bar/ " in hub_log.at(logging.INFO)
    assert await api.store.get_all() == {}


async def test_delete_root(api: Api) -> None:
    await api.store.add("/", {"target": "http://root"})
    await api.add("/a", "http://a")
    assert (await api.call("DELETE", "/")).status == 204
    assert list(await api.routes()) == ["/a"]
    assert (await api.call("DELETE", "/")).status == 404
    await api.store.add("/", {"target": "http://root"})
    assert (await api.call("DELETE", "//")).status == 204


async def test_delete_without_path_is_400(api: Api, hub_log: ListHandler) -> None:
    await api.store.add("/", {"target": "http://root"})
    reply = await api.call("DELETE", "")
    assert reply.status == 400  # CHP never answers (quirk 5)
    assert reply.body and reply.content_type is None
    assert list(await api.routes()) == ["/"]
    assert any(m.startswith("400 DELETE /api/routes ") for m in hub_log.messages)
    assert (await api.call("DELETE", "", token=None)).status == 403  # authenticated first


async def test_delete_parent_keeps_children(api: Api) -> None:
    await api.add("/a", "http://a")
    await api.add("/a/b", "http://ab")
    assert (await api.call("DELETE", "/a")).status == 204
    assert list(await api.routes()) == ["/a/b"]
    assert api.table.lookup("/a/b/c").target == "http://ab"  # type: ignore[union-attr]
    assert api.table.lookup("/a/x") is None


# -- responses, logs, counters, failures ---------------------------------------------------------


async def test_response_log_levels(api: Api, hub_log: ListHandler) -> None:
    await api.add("/a", "http://a")
    await api.call("GET", "?x=1")
    await api.call("GET", token=None)
    assert "201 POST /api/routes/a " in hub_log.at(logging.INFO)
    assert "200 GET /api/routes " in hub_log.at(logging.INFO)
    assert "403 GET /api/routes " in hub_log.at(logging.WARNING)


async def test_stats(api: Api) -> None:
    await api.add("/a", "http://a")
    await api.routes()
    await api.routes("/")
    await api.call("GET", "/a")  # single GETs are not counted as api_route_get
    await api.call("DELETE", "/a")
    await api.call("DELETE", "/a")
    await api.call("POST", "/b", body=b"{}")
    await api.call("PUT", "/b")
    await api.call("GET", "?inactiveSince=bad")
    assert (api.stats.api_route_get, api.stats.api_route_add, api.stats.api_route_delete) == (
        2,
        1,
        2,
    )
    assert api.stats.requests_api == {201: 1, 200: 3, 204: 1, 404: 1, 400: 2, 405: 1}


class FailingStore(MemoryStore):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    async def add(self, key: str, data: dict[str, Any]) -> None:
        raise self.error

    async def remove(self, key: str) -> bool:
        raise self.error

    async def get_all(self) -> dict[str, dict[str, Any]]:
        raise self.error


async def test_store_unavailable_is_503(make_api: MakeApi, hub_log: ListHandler) -> None:
    api = await make_api(store=FailingStore(StoreUnavailable("redis is down")))
    for method, path, data in (("POST", "/a", {"target": "http://a"}), ("DELETE", "/a", _UNSET),
                               ("GET", "", _UNSET)):  # fmt: skip
        reply = await api.call(method, path, data)
        assert reply.status == 503, method
        assert reply.body == b"Route store unavailable: redis is down"
        assert reply.content_type is None
    assert "503 POST /api/routes/a Route store unavailable: redis is down" in hub_log.at(
        logging.ERROR
    )


async def test_handler_crash_is_500_and_logged(make_api: MakeApi, hub_log: ListHandler) -> None:
    api = await make_api(store=FailingStore(RuntimeError("boom")))
    reply = await api.call("POST", "/a?x=1", {"target": "http://a"})
    assert reply.status == 500
    assert reply.content_type is None
    crash = [r for r in hub_log.records if r.getMessage().startswith("Error in handler for")]
    assert [r.getMessage() for r in crash] == ["Error in handler for POST /api/routes/a: boom"]
    assert crash[0].levelno == logging.ERROR and crash[0].exc_info is not None
    assert any(m.startswith("500 POST /api/routes/a ") for m in hub_log.at(logging.ERROR))
    assert (await api.call("GET", "/a")).status == 404  # the API carries on


async def test_response_headers(api: Api) -> None:
    await api.add("/a", "http://a")
    json_reply = await api.call("GET")
    assert json_reply.headers.getall("Content-Type") == ["application/json"]
    for reply in (
        await api.call("POST", "/b", {"target": "http://b"}),
        await api.call("DELETE", "/b"),
        await api.call("DELETE", "/b"),
        await api.call("GET", "/b"),
        await api.call("GET", token=None),
        await api.call("PUT"),
        await api.call("GET", target="/nope"),
        await api.call("POST", "/b", body=b"x"),
    ):
        assert "Content-Type" not in reply.headers, reply


# -- JupyterHub's view (§7.3, §7.5 item 4) --------------------------------------------------------


def jupyterhub_chp_path(routespec: str) -> str:
    """JupyterHub's `_routespec_to_chp_path`: trailing slashes off, except for `/`."""
    if not routespec.startswith("/"):
        routespec = "/" + routespec
    return routespec.rstrip("/") or "/"


def jupyterhub_routespec(key: str) -> str:
    """What `get_all_routes` makes of a key: `quote(key, safe='@/~')` plus a trailing `/`."""
    routespec = quote(key, safe="@/~")
    return routespec if routespec.endswith("/") else routespec + "/"


JUPYTERHUB_ROUTESPECS = [
    "/@/space%20word/",  # the MockHub base_url
    "/@/space%20word/hub/",
    "/@/space%20word/user/" + quote("秀樹", safe="@~") + "/",
    "/user/" + quote("秀樹", safe="@~") + "/",
    "/user/~TestJH/",
    "/user/has@/",
    "/user/" + quote("üñîçø∂é", safe="@~") + "/",
    "/user/" + quote("üñîçø∂é", safe="@~") + "/" + quote("named server", safe="@~") + "/",
    "/services/" + quote("a&b=c?d#e%f", safe="@~") + "/",
    "/",
]


async def test_jupyterhub_keys_round_trip(api: Api) -> None:
    for routespec in JUPYTERHUB_ROUTESPECS:
        reply = await api.call(
            "POST",
            jupyterhub_chp_path(routespec) if routespec != "/" else "",
            {"user": "x", "server_name": "", "target": "http://t", "jupyterhub": True},
        )
        assert reply.status == 201, routespec
    routes = await api.routes()
    assert sorted(jupyterhub_routespec(key) for key in routes) == sorted(JUPYTERHUB_ROUTESPECS)
    assert "/@/space word" in routes
    assert "/user/秀樹" in routes
    assert "/user/üñîçø∂é" in routes
    for key in routes:  # every key can be fetched and deleted as JupyterHub addresses it
        chp_path = jupyterhub_chp_path(jupyterhub_routespec(key))
        assert (await api.call("GET", chp_path if chp_path != "/" else "//")).status == 200
        assert (await api.call("DELETE", chp_path)).status == 204, key
    assert await api.routes() == {}


async def test_jupyterhub_client_style(api: Api) -> None:
    """The exact calls of JupyterHub 6's `api_request`: aiohttp, str body, no Content-Type."""
    url = f"http://127.0.0.1:{api.server.port}/api/routes"
    headers = {"Authorization": f"token {TOKEN}"}
    async with aiohttp.ClientSession() as session:
        body = json.dumps({"user": "秀樹", "target": "http://127.0.0.1:5555", "jupyterhub": True})
        async with session.post(
            url + "/user/%E7%A7%80%E6%A8%B9", data=body, headers=headers
        ) as resp:
            assert resp.status == 201
        async with session.get(url, headers=headers) as resp:
            routes = await resp.json()  # raises unless Content-Type is application/json
        assert routes["/user/秀樹"]["user"] == "秀樹"
        async with session.delete(url + "/user/%E7%A7%80%E6%A8%B9", headers=headers) as resp:
            assert resp.status == 204
        async with session.delete(url + "/user/%E7%A7%80%E6%A8%B9", headers=headers) as resp:
            assert resp.status == 404  # tolerated by JupyterHub


# -- concurrency and keep-alive ------------------------------------------------------------------


async def read_response(
    reader: asyncio.StreamReader, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (Content-Length framed, as the API sends them); names lower-cased."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    assert "chunked" not in headers.get("transfer-encoding", "")
    length = 0 if method == "HEAD" else int(headers.get("content-length", "0"))
    return status, headers, await reader.readexactly(length)


async def keep_alive_client(host: str, port: int, n: int, rounds: int) -> list[int]:
    """One connection, `rounds` POST/GET/GET-all/DELETE cycles on it; the statuses seen."""
    reader, writer = await asyncio.open_connection(host, port)
    statuses: list[int] = []
    auth = f"Authorization: token {TOKEN}\r\n"
    try:
        for i in range(rounds):
            path = f"/api/routes/client{n}/r%C3%BC{i}"
            body = json.dumps({"target": f"http://127.0.0.1:{1000 + i}", "n": n}).encode()
            requests = [
                f"POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {len(body)}\r\n\r\n"
                .encode() + body,
                f"GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode(),
                f"GET /api/routes HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode(),
                f"DELETE {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode(),
            ]  # fmt: skip
            for request in requests:
                writer.write(request)
                status, headers, body = await read_response(reader)
                assert headers.get("connection", "").lower() != "close"
                statuses.append(status)
                if request.startswith(b"GET " + path.encode()):
                    assert json.loads(body)["n"] == n
    finally:
        writer.close()
    return statuses


async def test_ten_concurrent_keep_alive_clients(api: Api) -> None:
    results = await asyncio.wait_for(
        asyncio.gather(
            *(keep_alive_client("127.0.0.1", api.server.port, n, 15) for n in range(10))
        ),
        timeout=60,
    )
    for statuses in results:
        assert statuses == [201, 200, 200, 204] * 15
    assert await api.routes() == {}
    assert len(api.table) == 0


# -- through the real process ---------------------------------------------------------------------


def test_process_default_target_and_round_trip(start_proxy: Any, backend: Any) -> None:
    proxy = start_proxy("--default-target", backend.url, "--log-level", "debug")
    status, headers, body = proxy.api("GET")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    routes = json.loads(body)
    assert list(routes) == ["/"]
    assert routes["/"]["target"] == backend.url
    assert ISO_MS.match(routes["/"]["last_activity"])

    proxy.add_route("/user/foo%40bar/", backend.url, jupyterhub=True, nested={"a": [1]})
    status, headers, body = proxy.api("GET", "/user/foo@bar")
    assert status == 200
    data = json.loads(body)
    assert (data["target"], data["jupyterhub"], data["nested"]) == (backend.url, True, {"a": [1]})

    # the route is live on the data plane at once
    status, _, body = proxy.request("GET", "/user/foo@bar/lab?x=1")
    assert status == 200
    assert json.loads(body)["url"] == "/user/foo@bar/lab?x=1"

    status, headers, body = proxy.api("DELETE", "/user/foo@bar")
    assert (status, body, headers.get("Content-Type")) == (204, b"", None)
    status, headers, body = proxy.api("DELETE", "/user/foo@bar")
    assert (status, body, headers.get("Content-Type")) == (404, b"", None)

    status, headers, body = proxy.api("PUT", "", token=False)
    assert (status, body, headers.get("Content-Type")) == (405, b"Method not supported", None)
    status, _, body = proxy.api("POST", "/x", raw_body=b"{")
    assert status == 400 and body.startswith(b"Body not valid JSON: ")
    status, _, body = proxy.api("GET", "", token="wrong")
    assert (status, body) == (403, b"")

    proxy.wait_for_line(r"info: Route added /user/foo@bar -> ")
    proxy.wait_for_line(r"info: 201 POST /api/routes/user/foo%40bar/ $")
    proxy.wait_for_line(r"info: Removing route /user/foo@bar$")
    proxy.wait_for_line(r"warn: 403 GET /api/routes $")
    proxy.wait_for_line(r"debug: Rejecting API request")
    assert proxy.token not in proxy.output()


def test_process_without_token(start_proxy: Any) -> None:
    proxy = start_proxy(token=None)
    status, _, _ = proxy.api("POST", "/a", {"target": "http://a"}, token=False)
    assert status == 201
    assert list(proxy.routes()) == ["/a"]


def test_process_ten_concurrent_keep_alive_clients(start_proxy: Any) -> None:
    proxy = start_proxy()

    async def run() -> list[list[int]]:
        return await asyncio.wait_for(
            asyncio.gather(
                *(keep_alive_client(proxy.api_host, proxy.api_port, n, 10) for n in range(10))
            ),
            timeout=60,
        )

    for statuses in asyncio.run(run()):
        assert statuses == [201, 200, 200, 204] * 10
    assert proxy.routes() == {}


def test_process_hanging_cases_answer(start_proxy: Any) -> None:
    """Where CHP never answers (quirk 5), we answer 400 and keep serving."""
    proxy = start_proxy()
    with socket.create_connection((proxy.api_host, proxy.api_port), timeout=10) as sock:
        for target, method in (("/api/routes/%E0%A4%A", "GET"), ("/api/routes", "DELETE")):
            sock.sendall(
                f"{method} {target} HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: token {proxy.token}\r\n\r\n".encode()
            )
            response = b""
            while b"\r\n\r\n" not in response:
                chunk = sock.recv(65536)
                assert chunk, "connection closed without an answer"
                response += chunk
            assert response.startswith(b"HTTP/1.1 400 "), response
            head, _, rest = response.partition(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
            while len(rest) < length:
                rest += sock.recv(65536)
    assert proxy.routes() == {}

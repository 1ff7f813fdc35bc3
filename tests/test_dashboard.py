"""The routes page on the API listener: HTTP behaviour, then the page in real headless Chromium."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from browser import Browser, find_chromium
from support import TOKEN, Backend, Proxy, http_request


def _get(proxy: Proxy, path: str, token: str | None = None, method: str = "GET"):  # type: ignore[no-untyped-def]
    headers = {"Authorization": f"token {token}"} if token else {}
    return http_request(proxy.api_host, proxy.api_port, method, path, headers=headers)


# -- HTTP -----------------------------------------------------------------------------------------


def test_page_loads_without_token_and_holds_no_data(start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy()
    proxy.add_route("/user/alice", "http://127.0.0.1:9", user="alice")
    status, headers, body = _get(proxy, "/dashboard")
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert "form-action 'none'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert b'<form id="login" method="post"' in body
    assert b"alice" not in body
    for path, ctype in (
        ("/dashboard/dashboard.js", "text/javascript"),
        ("/dashboard/dashboard.css", "text/css"),
    ):
        status, headers, body = _get(proxy, path)
        assert (status, headers["Content-Type"]) == (200, f"{ctype}; charset=utf-8")
        assert body


def test_stats_need_the_token(start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy()
    assert _get(proxy, "/dashboard/stats.json")[0] == 403
    assert _get(proxy, "/dashboard/stats.json", token="wrong")[0] == 403
    status, headers, body = _get(proxy, "/dashboard/stats.json", token=TOKEN)
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "no-store"
    stats = json.loads(body)
    assert set(stats) == {
        "version",
        "now",
        "started",
        "routes",
        "requests",
        "durations",
        "connections",
        "bytes",
        "activity_flush_seconds",
    }


def test_stats_follow_traffic(start_proxy: Callable[..., Proxy], backend: Backend) -> None:
    proxy = start_proxy("--default-target", backend.url)
    assert proxy.request("GET", "/x")[0] == 200  # before anyone looks: not timed
    stats = json.loads(_get(proxy, "/dashboard/stats.json", token=TOKEN)[2])
    assert stats["durations"] == {}
    for _ in range(2):
        assert proxy.request("GET", "/x")[0] == 200
    assert proxy.request("GET", "/_chp_healthz")[0] == 200  # not a proxied request
    stats = json.loads(_get(proxy, "/dashboard/stats.json", token=TOKEN)[2])
    assert stats["routes"] == 1
    assert stats["requests"]["web"] == 3
    assert stats["requests"]["proxy"] == {"200": 3}
    assert stats["durations"]["2xx"]["count"] == 2  # timed once the page asked
    assert stats["durations"]["2xx"]["seconds"] > 0
    assert stats["connections"]["upstream_idle"] >= 1
    assert stats["bytes"]["received"] > 0 and stats["bytes"]["sent"] > 0
    assert stats["now"] >= stats["started"]


def test_unauthenticated_api_serves_stats(start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(token=None)
    assert _get(proxy, "/dashboard/stats.json")[0] == 200


@pytest.mark.parametrize(
    ("method", "path", "status", "body"),
    [
        ("POST", "/dashboard", 405, b"Method not supported"),
        ("DELETE", "/dashboard/stats.json", 405, b"Method not supported"),
        ("GET", "/dashboard/", 404, b"Not Found"),
        ("GET", "/dashboard/nothing.js", 404, b"Not Found"),
        ("GET", "/dashboardx", 404, b"Not Found"),
        ("GET", "/metrics", 404, b"Not Found"),
        ("GET", "/", 404, b"Not Found"),
    ],
)
def test_other_paths_keep_chps_answers(
    start_proxy: Callable[..., Proxy], method: str, path: str, status: int, body: bytes
) -> None:
    proxy = start_proxy()
    got = _get(proxy, path, token=TOKEN, method=method)
    assert (got[0], got[2]) == (status, body)


def test_head_of_the_page(start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy()
    status, _, body = _get(proxy, "/dashboard", method="HEAD")
    assert (status, body) == (200, b"")


def test_dashboard_requests_are_api_requests_in_the_log(start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy()
    _get(proxy, "/dashboard/stats.json")
    proxy.wait_for_line(r"warn: 403 GET /dashboard/stats.json $")


# -- in a real browser -----------------------------------------------------------------------------

CHROMIUM = find_chromium()
if CHROMIUM is None and os.environ.get("CI"):
    raise RuntimeError(
        "CI: chromium is required for the dashboard tests (apt-get install chromium)"
    )
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")

ROWS = "[...document.querySelectorAll('#routes tbody tr')]"


@needs_chromium
async def test_dashboard_in_chromium(
    start_proxy: Callable[..., Proxy], backend: Backend, tmp_path: Path
) -> None:
    assert CHROMIUM is not None
    proxy = start_proxy("--default-target", backend.url)
    proxy.add_route("/user/alice", backend.url, user="alice", server_name="")
    assert proxy.request("GET", "/user/alice/lab")[0] == 200
    page_url = f"http://{proxy.api_host}:{proxy.api_port}/dashboard"

    async with Browser(CHROMIUM) as page:
        await page.navigate(page_url)
        await page.wait_for("document.readyState === 'complete'")
        # without the token: the form, and nothing else; no data was even asked for
        assert await page.evaluate("!document.getElementById('login').hidden")
        assert await page.evaluate("document.getElementById('data').hidden")
        assert "alice" not in await page.evaluate("document.body.innerText")
        requested = await page.evaluate(
            "performance.getEntriesByType('resource').map(e => e.name).join(' ')"
        )
        assert "api/routes" not in requested and "stats.json" not in requested
        await page.screenshot(tmp_path / "dashboard-login.png")

        # a wrong token is refused, and forgotten
        await _submit(page, "not-the-token")
        await page.wait_for("document.getElementById('status').textContent.includes('refused')")
        assert await page.evaluate("document.getElementById('data').hidden")
        assert await page.evaluate("sessionStorage.length") == 0
        assert "alice" not in await page.evaluate("document.body.innerText")

        # the token: the route table, with its data and activity
        await _submit(page, TOKEN)
        await page.wait_for(f"{ROWS}.some(r => r.dataset.prefix === '/user/alice')")
        row = await page.evaluate(
            f"{ROWS}.filter(r => r.dataset.prefix === '/user/alice')"
            ".map(r => [...r.cells].map(c => c.textContent))[0]"
        )
        assert row[0] == "/user/alice"
        assert row[1] == backend.url
        assert row[2] == "just now" or row[2].endswith(" s ago")
        assert "user=alice" in row[3]
        prefixes = await page.evaluate(f"{ROWS}.map(r => r.dataset.prefix)")
        assert prefixes == ["/", "/user/alice"]
        # the token is in this tab's sessionStorage, never in the URL
        assert await page.evaluate("location.href") == page_url
        assert TOKEN in await page.evaluate("JSON.stringify(Object.values(sessionStorage))")
        assert await page.evaluate("document.getElementById('token').value") == ""

        # a route added through the API shows up at the next refresh; traffic shows in the stats
        proxy.add_route("/user/bob", backend.url, user="bob")
        for _ in range(5):
            proxy.request("GET", "/user/bob/api")
        await page.wait_for(f"{ROWS}.some(r => r.dataset.prefix === '/user/bob')", timeout=15)
        await page.wait_for("document.getElementById('s-rate').textContent !== '–'", timeout=15)
        requests = await page.evaluate("document.getElementById('s-requests').textContent")
        assert requests.endswith("since start") and int(requests.split()[0]) >= 6

        # the filter
        await page.evaluate(
            "(() => { const f = document.getElementById('filter'); f.value = 'bob';"
            " f.dispatchEvent(new Event('input')); })()"
        )
        assert await page.evaluate(f"{ROWS}.map(r => r.dataset.prefix)") == ["/user/bob"]
        await page.evaluate(
            "(() => { const f = document.getElementById('filter'); f.value = '';"
            " f.dispatchEvent(new Event('input')); })()"
        )
        await page.screenshot(tmp_path / "dashboard.png")
        assert (tmp_path / "dashboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        # forgetting the token hides everything again
        await page.evaluate("document.getElementById('forget').click()")
        assert await page.evaluate("document.getElementById('data').hidden")
        assert "alice" not in await page.evaluate("document.body.innerText")
        assert await page.evaluate("sessionStorage.length") == 0


@needs_chromium
async def test_route_data_is_text_not_markup(
    start_proxy: Callable[..., Proxy], tmp_path: Path
) -> None:
    assert CHROMIUM is not None
    proxy = start_proxy()
    evil = "<img src=x onerror=\"document.title='pwned'\">"
    proxy.add_route("/user/<b>x</b>", "http://127.0.0.1:9", note=evil)
    async with Browser(CHROMIUM) as page:
        await page.navigate(f"http://{proxy.api_host}:{proxy.api_port}/dashboard")
        await _submit(page, TOKEN)
        await page.wait_for(f"{ROWS}.length === 1")
        assert (
            await page.evaluate("document.querySelectorAll('#routes img, #routes b').length") == 0
        )
        assert await page.evaluate(f"{ROWS}[0].cells[0].textContent") == "/user/<b>x</b>"
        assert evil in await page.evaluate(f"{ROWS}[0].cells[3].textContent")
        assert await page.evaluate("document.title") == "hubproxy routes"


async def _submit(page: Browser, token: str) -> None:
    await page.evaluate(
        "(() => { document.getElementById('token').value = " + json.dumps(token) + ";"
        " document.getElementById('login').requestSubmit(); })()"
    )

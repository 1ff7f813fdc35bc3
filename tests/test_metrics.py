"""Prometheus metrics (spec §3.12, quirk 17): CHP's names and types exactly, Python's process
metrics, hubproxy's own; served over TCP and a Unix socket; moving with traffic."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from hubproxy.metrics import (
    CONTENT_TYPE,
    QUANTILES,
    Samples,
    _exposition,
    _summary,
    quantile,
)
from hubproxy.proxy import DURATION_BUCKETS, ProxyStats
from hubproxy.proxy.server import LOOKUP_SAMPLE_EVERY
from support import (
    Backend,
    Proxy,
    ProxyProcess,
    _address,
    http_request,
    http_request_unix,
    ws_echo_app,
)

_SERVE = re.compile(r"info: Serve metrics at (\S+)/metrics$")

CHP_COUNTERS = ("api_route_get", "api_route_add", "api_route_delete", "requests_ws", "requests_web")
CHP_LABELLED = ("requests_proxy", "requests_api")
CHP_SUMMARIES = ("find_target_for_req", "last_activity_updating")
PROCESS = {
    "process_cpu_seconds": "counter",
    "process_cpu_user_seconds": "counter",
    "process_cpu_system_seconds": "counter",
    "process_start_time_seconds": "gauge",
    "process_resident_memory_bytes": "gauge",
    "process_virtual_memory_bytes": "gauge",
    "process_open_fds": "gauge",
    "process_max_fds": "gauge",
    "python_info": "gauge",
    "python_gc_objects_collected": "counter",
    "python_gc_collections": "counter",
}
OWN = {
    "hubproxy_info": "gauge",
    "hubproxy_request_duration_seconds": "histogram",
    "hubproxy_client_connections": "gauge",
    "hubproxy_websockets": "gauge",
    "hubproxy_upstream_connections": "gauge",
    "hubproxy_client_received_bytes": "counter",
    "hubproxy_client_sent_bytes": "counter",
    "hubproxy_routes": "gauge",
    "hubproxy_activity_flush_seconds": "gauge",
}


class Scrape:
    """One scrape: the raw text, and the values by (sample name, sorted labels)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in self.families.values():
            for s in family.samples:
                self.values[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def get(self, name: str, **labels: str) -> float:
        """A sample's value as written on the page (0 when absent)."""
        for line in self.text.splitlines():
            if line.startswith("#"):
                continue
            sample, _, value = line.rpartition(" ")
            sname, _, rest = sample.partition("{")
            if sname != name:
                continue
            found = dict(re.findall(r'(\w+)="([^"]*)"', rest))
            if found == labels:
                return float(value)
        return 0.0


def metrics_address(proxy: ProxyProcess) -> tuple[str, int, str | None]:
    return _address(proxy.wait_for_line(_SERVE.pattern).group(1))


def scrape_raw(proxy: ProxyProcess, path: str = "/metrics", method: str = "GET"):  # type: ignore[no-untyped-def]
    host, port, unix = metrics_address(proxy)
    if unix is not None:
        return http_request_unix(unix, method, path)
    return http_request(host, port, method, path)


def scrape(proxy: ProxyProcess) -> Scrape:
    status, headers, body = scrape_raw(proxy)
    assert status == 200, body
    assert headers["Content-Type"] == CONTENT_TYPE
    return Scrape(body.decode("utf-8"))


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the page's shape ------------------------------------------------------------------------------


def check_shape(page: Scrape) -> None:
    text = page.text
    for name in (*CHP_COUNTERS, *CHP_LABELLED):
        # exactly CHP's: no `_total` on the TYPE line nor on the samples (quirk 17)
        assert f"# TYPE {name} counter\n" in text
        assert f"{name}_total" not in text
        assert page.families[name].type == "counter"
    for name in CHP_COUNTERS:
        assert re.search(rf"^{name} \S+$", text, re.M), name
    for name in CHP_SUMMARIES:
        assert f"# TYPE {name} summary\n" in text
        quantiles = re.findall(rf'^{name}{{quantile="([^"]+)"}} ', text, re.M)
        assert quantiles == ["0.01", "0.05", "0.5", "0.9", "0.95", "0.99", "0.999"]
        assert re.search(rf"^{name}_sum \S+$", text, re.M)
        assert re.search(rf"^{name}_count \S+$", text, re.M)
    assert "# HELP requests_web Count of web requests\n" in text
    assert "# HELP find_target_for_req Summary of find target requests\n" in text
    for name, kind in {**PROCESS, **OWN}.items():
        assert name in page.families, name
        assert page.families[name].type == kind, name
    assert not any(name.startswith("nodejs_") for name in page.families)


def test_every_metric_present_and_moving(
    start_proxy: Callable[..., Proxy], start_backend: Callable[..., Backend]
) -> None:
    backend = start_backend(ws_echo_app())
    proxy = start_proxy("--metrics-ip", "127.0.0.1", "--metrics-port", "0")
    before = scrape(proxy)
    check_shape(before)
    for name in (*CHP_COUNTERS, "find_target_for_req_count", "last_activity_updating_count"):
        assert before.get(name) == 0, name
    assert before.get("hubproxy_routes") == 0

    # API: add, get all, get one, delete (204 and 404), a 403
    proxy.add_route("/", backend.url)
    proxy.add_route("/dead", f"http://127.0.0.1:{dead_port()}")
    proxy.routes()
    assert proxy.api("GET", "/dead")[0] == 200  # one route: not api_route_get
    proxy.add_route("/gone", backend.url)
    assert proxy.api("DELETE", "/gone")[0] == 204
    assert proxy.api("DELETE", "/gone")[0] == 404
    assert proxy.api("GET", token="wrong")[0] == 403
    # web: 3 proxied, a 503 (dead target), the health check (not counted)
    for _ in range(3):
        assert proxy.request("GET", "/x")[0] == 200
    pooled = scrape(proxy)
    assert pooled.get("hubproxy_upstream_connections", state="idle") == 1
    assert pooled.get("hubproxy_upstream_connections", state="in_use") == 0
    assert proxy.request("GET", "/dead/x")[0] == 503
    assert proxy.request("GET", "/_chp_healthz")[0] == 200

    async def websocket() -> Scrape:
        async with websockets.connect(f"ws://{proxy.host}:{proxy.port}/ws") as ws:
            await ws.send("hello")
            assert await ws.recv() == "hello"
            return await asyncio.to_thread(scrape, proxy)

    during = asyncio.run(websocket())
    proxy.routes()  # writes the activity marks to the store now (last_activity_updating)
    assert during.get("hubproxy_websockets") == 1
    assert during.get("hubproxy_client_connections") >= 1
    after = scrape(proxy)
    check_shape(after)

    assert after.get("api_route_add") == 3
    assert after.get("api_route_get") == 2
    assert after.get("api_route_delete") == 2
    assert after.get("requests_web") == 4
    assert after.get("requests_ws") == 1
    assert after.get("requests_proxy", status="200") == 3
    assert after.get("requests_proxy", status="503") == 1
    assert after.get("requests_api", status="201") == 3
    assert after.get("requests_api", status="200") == 3
    assert after.get("requests_api", status="204") == 1
    assert after.get("requests_api", status="404") == 1
    assert after.get("requests_api", status="403") == 1
    # 5 lookups: the first one is timed
    assert after.get("find_target_for_req_count") == 1
    assert 0 < after.get("find_target_for_req_sum") < 0.1
    assert after.get("find_target_for_req", quantile="0.5") > 0
    assert after.get("last_activity_updating_count") >= 1
    assert after.get("last_activity_updating_sum") > 0
    assert after.get("hubproxy_activity_flush_seconds") > 0

    ok = after.get("hubproxy_request_duration_seconds_count", status_class="2xx")
    assert ok == 3
    assert after.get("hubproxy_request_duration_seconds_count", status_class="5xx") == 1
    assert after.get("hubproxy_request_duration_seconds_sum", status_class="2xx") > 0
    inf = after.get("hubproxy_request_duration_seconds_bucket", le="+Inf", status_class="2xx")
    assert inf == 3
    assert after.get("hubproxy_websockets") == 0
    assert after.get("hubproxy_routes") == 2
    # the WebSocket took the pooled connection: a tunnel is not a pooled connection
    assert after.get("hubproxy_upstream_connections", state="idle") == 0
    assert after.get("hubproxy_upstream_connections", state="in_use") == 0
    for name in ("hubproxy_client_received_bytes_total", "hubproxy_client_sent_bytes_total"):
        assert after.get(name) > during.get(name) > 0, name
    assert after.get("process_cpu_seconds_total") > 0
    assert after.get("process_open_fds") > 0


def test_metrics_over_a_unix_socket(
    start_proxy: Callable[..., Proxy], backend: Backend, tmp_path: Path
) -> None:
    path = tmp_path / "metrics.sock"
    proxy = start_proxy("--metrics-socket", str(path), "--default-target", backend.url)
    assert proxy.wait_for_line(_SERVE.pattern).group(1).startswith("http+unix://")
    assert proxy.request("GET", "/a")[0] == 200
    page = scrape(proxy)
    check_shape(page)
    assert page.get("requests_web") == 1
    assert page.get("requests_proxy", status="200") == 1
    assert page.get("api_route_add") == 0  # the default route is not an API request
    proxy.stop()
    assert not path.exists()


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/metrics", 200),
        ("POST", "/metrics", 200),  # CHP: any method
        ("GET", "/metrics?x", 404),
        ("GET", "/metrics/", 404),
        ("GET", "/", 404),
        ("GET", "/api/routes", 404),
    ],
)
def test_only_exactly_slash_metrics(
    start_proxy: Callable[..., Proxy], method: str, path: str, status: int
) -> None:
    proxy = start_proxy("--metrics-ip", "127.0.0.1", "--metrics-port", "0")
    got, headers, body = scrape_raw(proxy, path, method)
    assert got == status
    if status == 404:
        assert body == b"Not Found"
        assert "Content-Type" not in headers


def test_scrapes_are_not_logged_nor_counted(start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy("--metrics-ip", "127.0.0.1", "--metrics-port", "0")
    scrape(proxy)
    page = scrape(proxy)
    assert page.get("requests_api", status="200") == 0
    proxy.stop()
    assert not any("GET /metrics" in line for line in proxy.output().splitlines())


def test_startup_line_after_the_api_line(start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy("--metrics-ip", "127.0.0.1", "--metrics-port", "0")
    proxy.wait_for_line(_SERVE.pattern)
    lines = proxy.output().splitlines()
    api = next(i for i, line in enumerate(lines) if "Proxy API at" in line)
    assert "Serve metrics at http://127.0.0.1:" in lines[api + 1]


def test_no_metrics_server_without_port_or_socket(start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy("--metrics-ip", "127.0.0.1")
    proxy.stop()
    out = proxy.output()
    assert "Serve metrics" not in out
    assert "warn: No metrics server without --metrics-port (as CHP): --metrics-ip unused" in out


def test_metrics_port_in_use_exits_1() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = ProxyProcess(
            [
                *("--ip", "127.0.0.1", "--port", "0", "--api-ip", "127.0.0.1", "--api-port", "0"),
                *("--metrics-ip", "127.0.0.1", "--metrics-port", str(port)),
            ]
        )
        assert proc.proc.wait(30) == 1
        proc.stop()
        assert f"error: metrics: cannot listen on 127.0.0.1:{port}" in proc.output()


# -- units -----------------------------------------------------------------------------------------


def test_quantile_interpolates_and_is_zero_when_empty() -> None:
    assert quantile([], 0.5) == 0.0
    assert quantile([3.0], 0.99) == 3.0
    values = [float(i) for i in range(101)]
    assert quantile(values, 0.5) == 50.0
    assert quantile(values, 0.999) == pytest.approx(99.9)
    assert quantile(values, 0.01) == pytest.approx(1.0)


def test_samples_ring_keeps_the_newest() -> None:
    samples = Samples(size=4)
    for i in range(10):
        samples.observe(float(i))
    assert samples.count == 10 and samples.sum == 45.0
    assert sorted(samples.newest()) == [6.0, 7.0, 8.0, 9.0]


def test_exposition_keeps_chps_names() -> None:
    text = _exposition([_summary("x", "help", [1.0, 2.0], 2, 3.0)])
    assert text.startswith("# HELP x help\n# TYPE x summary\n")
    assert f'x{{quantile="{QUANTILES[-1]}"}} ' in text
    assert "x_sum 3.0\nx_count 2.0\n" in text


def test_duration_buckets_are_upper_bounds() -> None:
    stats = ProxyStats()
    stats.observe_duration(200, DURATION_BUCKETS[0])  # le: on the bound counts in that bucket
    stats.observe_duration(404, 1e9)  # beyond every bound: +Inf
    stats.observe_duration(999, 0.0)  # llhttp's largest status
    assert stats.duration_buckets[2][0] == 1
    assert stats.duration_buckets[4][-1] == 1
    assert stats.duration_buckets[9][0] == 1


def test_one_lookup_in_n_is_timed(start_proxy: Callable[..., Proxy], backend: Backend) -> None:
    proxy = start_proxy(
        "--default-target", backend.url, "--metrics-ip", "127.0.0.1", "--metrics-port", "0"
    )
    for _ in range(LOOKUP_SAMPLE_EVERY + 1):
        assert proxy.request("GET", "/")[0] == 200
    page = scrape(proxy)
    assert page.get("requests_web") == LOOKUP_SAMPLE_EVERY + 1
    assert page.get("find_target_for_req_count") == 2


def test_websocket_to_a_dead_target_is_logged_and_counted(
    start_proxy: Callable[..., Proxy],
) -> None:
    proxy = start_proxy("--metrics-ip", "127.0.0.1", "--metrics-port", "0")
    proxy.add_route("/ws", f"http://127.0.0.1:{dead_port()}")

    async def refused() -> None:
        with pytest.raises(websockets.InvalidStatus) as info:
            async with websockets.connect(f"ws://{proxy.host}:{proxy.port}/ws/x"):
                pass
        assert info.value.response.status_code == 503

    asyncio.run(refused())
    proxy.wait_for_line(r"error: 503 GET /ws/x connect ECONNREFUSED 127\.0\.0\.1:\d+$")
    page = scrape(proxy)
    assert page.get("requests_ws") == 1
    assert page.get("requests_proxy", status="503") == 1

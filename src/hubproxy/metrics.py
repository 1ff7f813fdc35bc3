"""Prometheus metrics: CHP's names and types exactly, Python's process metrics, and our own.

Theory of operation. Nothing here runs per request. The data plane bumps plain integers and
floats (`ProxyStats`: counters, a fixed array of histogram buckets, a ring of timed lookups),
the API bumps `ApiStats`, the activity flusher reports each flush's duration; when Prometheus
scrapes `/metrics`, the collectors below read those numbers and the exposition is built then.

Three groups, in this order on the page:

- Python's process metrics, from prometheus_client's own collectors (`process_*`, `python_*`),
  in place of CHP's Node.js ones (`nodejs_*`), plus CHP's `process_cpu_user_seconds_total` and
  `process_cpu_system_seconds_total`.
- CHP's metrics (spec §3.12), with CHP's names, help texts, types and labels. prom-client writes
  counters without the `_total` suffix (`requests_web 5`), which prometheus_client's exposition
  would add, so this group is written by `_exposition` below rather than `generate_latest`.
  The summaries carry CHP's quantiles (0.01 ... 0.999); they are computed at scrape time over a
  ring of the newest observations (`find_target_for_req`: the newest 1,024 timed lookups, one
  lookup in 16 being timed; `last_activity_updating`: the newest 1,024 activity flushes).
- hubproxy's own metrics (`hubproxy_*`), named the Prometheus way (`_total` on counters).

The request duration histogram and the timed lookups cost the data plane more than a counter,
so it keeps them only while `ProxyStats.timing` is on: from the start with a metrics listener
(app.py), or from the dashboard's first look. docs/observability.md lists every metric.

The exposition is the Prometheus text format 0.0.4, as CHP serves it.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Iterator, Sized
from typing import Protocol

from aiohttp import web
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    generate_latest,
)
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from hubproxy import __version__
from hubproxy.activity import ActivityFlusher
from hubproxy.aioweb import ServerLog
from hubproxy.api import ApiStats
from hubproxy.proxy import DURATION_BUCKETS, ProxyStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
QUANTILES = (0.01, 0.05, 0.5, 0.9, 0.95, 0.99, 0.999)  # prom-client's default, CHP's
FLUSH_SAMPLES = 1024


class ProxyServiceView(Protocol):
    """What the metrics page and the dashboard read of the data plane: this process's
    `ProxyService`, or with --workers the primary's `WorkerSet`, which adds up its workers'."""

    @property
    def stats(self) -> ProxyStats: ...

    @property
    def table(self) -> Sized: ...

    async def refresh(self) -> None:
        """Make the numbers current (workers are asked for theirs)."""

    def start_timing(self) -> None:
        """Keep request durations and lookup times from now on (see ProxyStats.timing)."""

    def connection_counts(self) -> tuple[int, int]: ...

    def upstream_connections(self) -> tuple[int, int]: ...

    def client_bytes(self) -> tuple[int, int]: ...


def quantile(ordered: list[float], q: float) -> float:
    """The `q` quantile of sorted values, interpolating between the closest ranks; 0 if none
    (prom-client shows 0 for an empty summary)."""
    if not ordered:
        return 0.0
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class Samples:
    """Count, sum and the newest `size` observations of a duration (a summary's raw data)."""

    __slots__ = ("count", "ring", "sum")

    def __init__(self, size: int = FLUSH_SAMPLES) -> None:
        self.count = 0
        self.sum = 0.0
        self.ring = [0.0] * size

    def observe(self, seconds: float) -> None:
        self.ring[self.count % len(self.ring)] = seconds
        self.count += 1
        self.sum += seconds

    def newest(self) -> list[float]:
        return self.ring[: min(self.count, len(self.ring))]


def _counter(name: str, help: str, value: float) -> Metric:
    """A counter as prom-client writes it: the sample has the family's name, no `_total`."""
    metric = Metric(name, help, "counter")
    metric.add_sample(name, {}, value)
    return metric


def _labelled_counter(name: str, help: str, label: str, counts: dict[int, int]) -> Metric:
    metric = Metric(name, help, "counter")
    for key, value in sorted(counts.items()):
        metric.add_sample(name, {label: str(key)}, value)
    return metric


def _summary(name: str, help: str, newest: list[float], count: int, total: float) -> Metric:
    metric = Metric(name, help, "summary")
    ordered = sorted(newest)
    for q in QUANTILES:
        metric.add_sample(name, {"quantile": floatToGoString(q)}, quantile(ordered, q))
    metric.add_sample(name + "_sum", {}, total)
    metric.add_sample(name + "_count", {}, count)
    return metric


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _exposition(metrics: Iterable[Metric]) -> str:
    """The text format for metrics written exactly as named (no suffix added to counters)."""
    out: list[str] = []
    for metric in metrics:
        help = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {metric.name} {help}\n# TYPE {metric.name} {metric.type}\n")
        for sample in metric.samples:
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sample.labels.items())
            labels = "{" + labels + "}" if labels else ""
            out.append(f"{sample.name}{labels} {floatToGoString(sample.value)}\n")
    return "".join(out)


class ChpCollector(Collector):
    """CHP's nine metrics (spec §3.12), read from the counters the proxy and the API keep."""

    def __init__(self, proxy: ProxyServiceView, api: ApiStats, flushes: Samples) -> None:
        self.proxy = proxy
        self.api = api
        self.flushes = flushes

    def collect(self) -> Iterator[Metric]:
        api, stats, flushes = self.api, self.proxy.stats, self.flushes
        yield _counter("api_route_get", "Count of API route get requests", api.api_route_get)
        yield _counter("api_route_add", "Count of API route add requests", api.api_route_add)
        yield _counter(
            "api_route_delete", "Count of API route delete requests", api.api_route_delete
        )
        timed = min(stats.lookup_timed, len(stats.lookup_ring))
        yield _summary(
            "find_target_for_req",
            "Summary of find target requests",
            stats.lookup_ring[:timed],
            stats.lookup_timed,
            stats.lookup_seconds,
        )
        yield _summary(
            "last_activity_updating",
            "Summary of last activity updating requests",
            flushes.newest(),
            flushes.count,
            flushes.sum,
        )
        yield _counter("requests_ws", "Count of websocket requests", stats.requests_ws)
        yield _counter("requests_web", "Count of web requests", stats.requests_web)
        yield _labelled_counter(
            "requests_proxy", "Count of proxy requests", "status", stats.requests_proxy
        )
        yield _labelled_counter(
            "requests_api", "Count of API requests", "status", dict(api.requests_api)
        )


class HubproxyCollector(Collector):
    """What CHP does not measure: durations, connections, bytes, routes, activity flushes."""

    def __init__(self, proxy: ProxyServiceView, flusher: ActivityFlusher) -> None:
        self.proxy = proxy
        self.flusher = flusher

    def collect(self) -> Iterator[Metric]:
        proxy, stats = self.proxy, self.proxy.stats
        times = os.times()
        yield CounterMetricFamily(
            "process_cpu_user_seconds", "Total user CPU time spent in seconds.", times.user
        )
        yield CounterMetricFamily(
            "process_cpu_system_seconds", "Total system CPU time spent in seconds.", times.system
        )
        info = GaugeMetricFamily("hubproxy_info", "hubproxy's version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info

        durations = HistogramMetricFamily(
            "hubproxy_request_duration_seconds",
            "Proxied requests, from their first byte read to their response's last byte "
            "written, by status class (WebSocket sessions are not included)",
            labels=["status_class"],
        )
        bounds = [floatToGoString(b) for b in DURATION_BUCKETS] + ["+Inf"]
        for cls, buckets in enumerate(stats.duration_buckets):
            if not any(buckets) and cls not in (2, 3, 4, 5):
                continue
            cumulative, running = [], 0
            for bound, count in zip(bounds, buckets, strict=True):
                running += count
                cumulative.append((bound, running))
            durations.add_metric([f"{cls}xx"], cumulative, stats.duration_sums[cls])
        yield durations

        clients, tunnels = proxy.connection_counts()
        yield GaugeMetricFamily(
            "hubproxy_client_connections",
            "Open client connections on the public listener (WebSockets included)",
            clients,
        )
        yield GaugeMetricFamily("hubproxy_websockets", "Open WebSocket tunnels", tunnels)
        in_use, idle = proxy.upstream_connections()
        upstream = GaugeMetricFamily(
            "hubproxy_upstream_connections",
            "Open HTTP connections to targets: lent to a request, or idle in a keep-alive pool "
            "(WebSocket tunnels are not included)",
            labels=["state"],
        )
        upstream.add_metric(["in_use"], in_use)
        upstream.add_metric(["idle"], idle)
        yield upstream
        received, sent = proxy.client_bytes()
        yield CounterMetricFamily(
            "hubproxy_client_received_bytes",
            "Bytes read from clients on the public listener (heads, bodies, WebSocket data)",
            received,
        )
        yield CounterMetricFamily(
            "hubproxy_client_sent_bytes",
            "Bytes written to clients on the public listener (heads, bodies, WebSocket data)",
            sent,
        )
        yield GaugeMetricFamily("hubproxy_routes", "Routes in the table", len(proxy.table))
        yield GaugeMetricFamily(
            "hubproxy_activity_flush_seconds",
            "Duration of the newest write of route activity to the store",
            self.flusher.last_flush_duration,
        )


class Metrics:
    """Everything the metrics page and the dashboard read, and the page itself."""

    def __init__(
        self,
        proxy: ProxyServiceView,
        api: ApiStats,
        flusher: ActivityFlusher,
        extra: Collector | None = None,
    ) -> None:
        self.proxy = proxy
        self.api = api
        self.flusher = flusher
        self.started = time.time()
        self.flushes = Samples()
        flusher.on_flush = self.flushes.observe
        self.process = CollectorRegistry(auto_describe=False)
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.process.register(collector)
        self.chp = ChpCollector(proxy, api, self.flushes)
        self.own = CollectorRegistry(auto_describe=False)
        self.own.register(HubproxyCollector(proxy, flusher))
        if extra is not None:  # with --workers: the workers' own gauges and counters
            self.own.register(extra)

    def render(self) -> bytes:
        """The whole page in the text format."""
        return (
            generate_latest(self.process)
            + _exposition(self.chp.collect()).encode("utf-8")
            + generate_latest(self.own)
        )


# -- the metrics listener -------------------------------------------------------------------------


class _Bare(web.Response):
    """A response without Content-Type, as CHP's 404 here."""


async def _drop_content_type(request: web.Request, response: web.StreamResponse) -> None:
    if isinstance(response, _Bare):
        response.headers.popall("Content-Type", None)


def create_metrics_app(metrics: Metrics) -> web.Application:
    """CHP's metrics server: the raw request-target must be exactly `/metrics` (any method);
    anything else, `/metrics?x` included, is 404 `Not Found`. No authentication, no log line."""

    @web.middleware
    async def handle(request: web.Request, handler: object) -> web.StreamResponse:
        if request.raw_path != "/metrics":
            return _Bare(status=404, body=b"Not Found")
        await metrics.proxy.refresh()
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    # idle or half-sent connections closed after 5 s (Node's; aiohttp's default is an hour)
    handler_args = {"logger": ServerLog("metrics"), "keepalive_timeout": 5, "lingering_time": 0}
    app = web.Application(middlewares=[handle], handler_args=handler_args)
    app.on_response_prepare.append(_drop_content_type)
    return app

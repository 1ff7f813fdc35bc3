"""The data plane's numbers: plain counters the hot path bumps, read when metrics are scraped."""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

# request durations: upper bounds (seconds) of the histogram's buckets; a last bucket is +Inf
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LOOKUP_SAMPLE_EVERY = 16  # one route lookup in this many is timed (find_target_for_req)
LOOKUP_SAMPLES = 1024  # the newest timed lookups kept for the quantiles


class ProxyStats:
    """Plain numbers the hot path bumps; `hubproxy.metrics` reads them when scraped.

    Always kept: CHP's counters, and bytes (added to per-connection integers, folded in here
    when the connection closes). Kept only while `timing` is on (a metrics listener exists, or
    the dashboard has been opened), as they cost more per request: the request duration
    histogram (a fixed array of buckets per status class) and one timed route lookup in
    LOOKUP_SAMPLE_EVERY (a fixed ring of the newest).
    """

    __slots__ = (
        "bytes_received",
        "bytes_sent",
        "duration_buckets",
        "duration_sums",
        "lookup_ring",
        "lookup_seconds",
        "lookup_timed",
        "lookups",
        "requests_proxy",
        "requests_web",
        "requests_ws",
        "timing",
    )

    def __init__(self) -> None:
        self.timing = False  # see the class's doc
        self.requests_web = 0
        self.requests_ws = 0
        self.requests_proxy: dict[int, int] = {}
        # by status class (status // 100, 0-9): counts per bucket, and the sum of seconds
        self.duration_buckets = [[0] * (len(DURATION_BUCKETS) + 1) for _ in range(10)]
        self.duration_sums = [0.0] * 10
        self.lookups = 0  # route lookups made; one in LOOKUP_SAMPLE_EVERY is timed
        self.lookup_timed = 0
        self.lookup_seconds = 0.0
        self.lookup_ring = [0.0] * LOOKUP_SAMPLES
        # bytes read from / written to clients by connections that have closed
        self.bytes_received = 0
        self.bytes_sent = 0

    def observe_duration(self, status: int, seconds: float) -> None:
        cls = status // 100  # llhttp refuses a status above 999; ours are 4xx and 5xx
        self.duration_buckets[cls][bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.duration_sums[cls] += seconds

    def observe_lookup(self, seconds: float) -> None:
        timed = self.lookup_timed
        self.lookup_ring[timed % LOOKUP_SAMPLES] = seconds
        self.lookup_timed = timed + 1
        self.lookup_seconds += seconds

    # -- across processes (--workers): a worker sends its numbers, the primary adds them up ------

    def counters(self) -> dict[str, Any]:
        """The counters as plain data (lists and dicts copied), for another process."""
        return {
            "requests_web": self.requests_web,
            "requests_ws": self.requests_ws,
            "requests_proxy": dict(self.requests_proxy),
            "duration_buckets": [list(b) for b in self.duration_buckets],
            "duration_sums": list(self.duration_sums),
            "lookups": self.lookups,
            "lookup_timed": self.lookup_timed,
            "lookup_seconds": self.lookup_seconds,
            "lookup_ring": self.lookup_ring[: min(self.lookup_timed, LOOKUP_SAMPLES)],
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
        }

    def add(self, counters: dict[str, Any]) -> None:
        """Add another process's `counters()` to these (the lookup samples are pooled)."""
        self.requests_web += counters["requests_web"]
        self.requests_ws += counters["requests_ws"]
        for status, n in counters["requests_proxy"].items():
            self.requests_proxy[status] = self.requests_proxy.get(status, 0) + n
        for mine, theirs in zip(self.duration_buckets, counters["duration_buckets"], strict=True):
            for i, n in enumerate(theirs):
                mine[i] += n
        for cls, seconds in enumerate(counters["duration_sums"]):
            self.duration_sums[cls] += seconds
        self.lookups += counters["lookups"]
        # quantiles are read over lookup_ring[:min(lookup_timed, len(lookup_ring))]: keep the
        # pooled samples at the front and the ring as long as the samples
        pooled = self.lookup_ring[: min(self.lookup_timed, len(self.lookup_ring))]
        self.lookup_ring = pooled + list(counters["lookup_ring"])
        self.lookup_timed += counters["lookup_timed"]
        self.lookup_seconds += counters["lookup_seconds"]
        self.bytes_received += counters["bytes_received"]
        self.bytes_sent += counters["bytes_sent"]

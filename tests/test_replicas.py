"""Several hubproxy processes sharing one Redis: what a route added through one replica does on the
others, activity across replicas, Redis restarted under them, a replica restarted, and Redis
unreachable when a replica starts. Propagation latency is measured and printed, not asserted
tightly (the machine may be busy); correctness is asserted with generous bounds."""

from __future__ import annotations

import http.client
import statistics
import time
import uuid
from collections.abc import Callable

import pytest

from redis_server import RedisServer, free_port, require_redis_server
from support import Backend, Proxy

GENEROUS = 10.0  # seconds: what "eventually" means in these tests


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url("t" + uuid.uuid4().hex[:12])


class Poller:
    """GETs through one replica's public port on a kept-alive connection."""

    def __init__(self, proxy: Proxy) -> None:
        self.host, self.port = proxy.host, proxy.port
        self.conn: http.client.HTTPConnection | None = None

    def status(self, path: str) -> int:
        for _ in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
            try:
                self.conn.request("GET", path)
                response = self.conn.getresponse()
                response.read()
                if response.getheader("Connection", "").lower() == "close":
                    self.close()
                return response.status
            except (OSError, http.client.HTTPException):
                self.close()
        return 0

    def wait_for(self, path: str, status: int, timeout: float = GENEROUS) -> float:
        started = time.perf_counter()
        while (got := self.status(path)) != status:
            if time.perf_counter() - started > timeout:
                raise AssertionError(f"{path}: {got}, not {status}, after {timeout} s")
            time.sleep(0.0005)
        return time.perf_counter() - started

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def wait_until(check: Callable[[], bool], timeout: float = GENEROUS) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s")
        time.sleep(0.01)
    return time.monotonic() - started


def distribution(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    return (
        f"min {ms[0]:.2f} ms, median {statistics.median(ms):.2f} ms, p95 {p95:.2f} ms, "
        f"max {ms[-1]:.2f} ms (n={len(ms)})"
    )


def test_a_route_added_through_a_is_served_by_b(
    start_proxy: Callable[..., Proxy], backend: Backend, redis_url: str
) -> None:
    a = start_proxy("--storage-backend", redis_url)
    b = start_proxy("--storage-backend", redis_url)
    poll_b = Poller(b)
    latencies, after_ack = [], []
    for i in range(50):
        path = f"/user/u{i}"
        assert poll_b.status(path + "/x") == 404
        started = time.perf_counter()
        a.add_route(path, backend.url, user=f"u{i}")
        acknowledged = time.perf_counter()
        poll_b.wait_for(path + "/x", 200)
        served = time.perf_counter()
        latencies.append(served - started)
        after_ack.append(max(0.0, served - acknowledged))
    print(f"\nadded through A -> served by B, from the POST: {distribution(latencies)}")
    print(f"added through A -> served by B, after A's 201: {distribution(after_ack)}")
    # deletes propagate too
    deletes = []
    for i in range(0, 50, 5):
        started = time.perf_counter()
        status, _, _ = a.api("DELETE", f"/user/u{i}")
        assert status == 204
        poll_b.wait_for(f"/user/u{i}/x", 404)
        deletes.append(time.perf_counter() - started)
    print(f"deleted through A -> 404 on B: {distribution(deletes)}")
    assert poll_b.status("/user/u1/x") == 200
    assert list(b.routes()) == list(a.routes()) == [f"/user/u{i}" for i in range(50) if i % 5]
    poll_b.close()


def test_three_replicas_share_one_table(
    start_proxy: Callable[..., Proxy], backend: Backend, redis_url: str
) -> None:
    replicas = [start_proxy("--storage-backend", redis_url) for _ in range(3)]
    for n, proxy in enumerate(replicas):
        proxy.add_route(f"/user/from-{n}", backend.url, n=n)
    pollers = [Poller(p) for p in replicas]
    for poller in pollers:
        for n in range(3):
            poller.wait_for(f"/user/from-{n}/api", 200)
    tables = [p.routes() for p in replicas]
    # the same routes and data (each GET first flushes its own replica's activity marks, so
    # last_activity may differ by the polls above)
    without_activity = [
        {k: {f: v for f, v in d.items() if f != "last_activity"} for k, d in t.items()}
        for t in tables
    ]
    assert without_activity[0] == without_activity[1] == without_activity[2]
    assert list(tables[0]) == ["/user/from-0", "/user/from-1", "/user/from-2"]
    # a replacement through one replica (new target) is what all of them route to
    status, _, _ = replicas[2].api("POST", "/user/from-0", {"target": "http://127.0.0.1:1"})
    assert status == 201
    for poller in pollers:
        poller.wait_for("/user/from-0/api", 503)  # nothing listens on port 1
        poller.close()
    assert list(replicas[0].routes()) == list(tables[0])  # re-adding keeps the place


def test_activity_seen_by_b_shows_in_a(
    start_proxy: Callable[..., Proxy], backend: Backend, redis_url: str
) -> None:
    a = start_proxy("--storage-backend", redis_url)
    b = start_proxy("--storage-backend", redis_url)
    a.add_route("/user/busy", backend.url)
    first = a.routes()["/user/busy"]["last_activity"]
    poll_b = Poller(b)
    poll_b.wait_for("/user/busy/api/kernels", 200)
    poll_b.close()
    # B flushes its marks once a second; A's GET reads Redis, where they are merged
    took = wait_until(lambda: a.routes()["/user/busy"]["last_activity"] > first)
    print(f"\nactivity through B visible in A's GET after {took * 1000:.0f} ms")
    assert b.routes()["/user/busy"]["last_activity"] == a.routes()["/user/busy"]["last_activity"]


def test_a_restarted_replica_reloads_everything(
    start_proxy: Callable[..., Proxy], backend: Backend, redis_url: str
) -> None:
    a = start_proxy("--storage-backend", redis_url)
    b = start_proxy("--storage-backend", redis_url)
    for i in range(100):
        a.add_route(f"/user/u{i}", backend.url)
    assert b.stop() == 0
    a.add_route("/user/while-b-was-down", backend.url)
    b = start_proxy("--storage-backend", redis_url)
    assert any("Loaded 101 routes from Redis" in line for line in b.lines)
    poll_b = Poller(b)
    # from its very first request, without waiting for anything
    assert poll_b.status("/user/while-b-was-down/x") == 200
    assert poll_b.status("/user/u0/x") == 200
    poll_b.close()
    assert b.routes() == a.routes()


def test_redis_restarted_mid_test(
    start_proxy: Callable[..., Proxy], backend: Backend, own_server: Callable[..., RedisServer]
) -> None:
    """Redis (AOF on) stops and comes back: the data plane routes all along, API writes are 503
    meanwhile (reads answer from the replica's table), and everything catches up."""
    server = own_server(persistent=True)
    a = start_proxy("--storage-backend", server.url())
    b = start_proxy("--storage-backend", server.url())
    c = start_proxy("--storage-backend", server.url())
    a.add_route("/user/before", backend.url)
    poll_a, poll_b = Poller(a), Poller(b)
    poll_b.wait_for("/user/before/x", 200)
    server.stop()
    outage_started = time.monotonic()
    for _ in range(20):  # the data plane keeps routing from the tables
        assert poll_a.status("/user/before/x") == 200
        assert poll_b.status("/user/before/x") == 200
    status, _, body = b.api("POST", "/user/during", {"target": backend.url})
    assert status == 503 and body.startswith(b"Route store unavailable: Redis at redis://127.0.0.1")
    assert a.api("DELETE", "/user/before")[0] == 503
    assert list(a.routes()) == ["/user/before"]  # from the table
    assert poll_b.status("/user/during/x") == 404
    wait_until(lambda: any("is unreachable" in line for line in b.lines))
    stopping = time.monotonic()  # a replica stopped while Redis is away exits cleanly, promptly
    assert c.stop() == 0 and time.monotonic() - stopping < 5
    assert "Traceback" not in c.stderr
    time.sleep(0.5)
    server.start()
    print(f"\nRedis down for {time.monotonic() - outage_started:.1f} s")
    # JupyterHub retries its 503s: the retry now works
    wait_until(lambda: b.api("POST", "/user/during", {"target": backend.url})[0] == 201)
    poll_a.wait_for("/user/during/x", 200)
    wait_until(lambda: any("is back after" in line for line in a.lines))
    assert list(a.routes()) == list(b.routes()) == ["/user/before", "/user/during"]
    poll_a.close()
    poll_b.close()


def test_redis_without_persistence_restarted(
    start_proxy: Callable[..., Proxy], backend: Backend, own_server: Callable[..., RedisServer]
) -> None:
    """Redis comes back empty: the replicas write their tables back; no user route is lost."""
    server = own_server(persistent=False)
    a = start_proxy("--storage-backend", server.url())
    b = start_proxy("--storage-backend", server.url())
    for i in range(20):
        a.add_route(f"/user/u{i}", backend.url, user=f"u{i}")
    before = a.routes()
    Poller(b).wait_for("/user/u19/x", 200)
    server.restart()
    poll_b = Poller(b)
    for _ in range(10):
        assert poll_b.status("/user/u7/x") == 200
    wait_until(lambda: b.api("GET")[0] == 200 and len(b.routes()) == 20)
    c = start_proxy("--storage-backend", server.url())  # a new replica sees them in Redis
    assert {k: v["target"] for k, v in c.routes().items()} == {
        k: v["target"] for k, v in before.items()
    }
    assert list(c.routes()) == list(before)
    assert any("lost its routes: restored" in line for line in a.lines + b.lines)
    poll_b.close()


def test_redis_unreachable_at_start(
    start_proxy: Callable[..., Proxy], backend: Backend, own_server: Callable[..., RedisServer]
) -> None:
    """The replica starts anyway (its listeners within JupyterHub's ~10 s), answers 503 until
    Redis comes, then fills its table and adds its default route."""
    require_redis_server()
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    started = time.monotonic()
    proxy = start_proxy("--storage-backend", url, "--default-target", backend.url)
    took = time.monotonic() - started
    print(f"\nlisteners up {took:.1f} s after the start, with Redis unreachable")
    assert took < 10
    assert any("is unreachable" in line for line in proxy.lines)
    proxy.wait_for_line(r"warn: Cannot add route / -> \S+ yet \(Route store unavailable|Redis")
    assert proxy.api("GET")[0] == 503
    assert proxy.api("POST", "/user/a", {"target": backend.url})[0] == 503
    assert proxy.request("GET", "/_chp_healthz")[0] == 200
    server = own_server(port=port)
    wait_until(lambda: proxy.api("POST", "/user/a", {"target": backend.url})[0] == 201)
    poller = Poller(proxy)
    poller.wait_for("/user/a/x", 200)
    poller.wait_for("/anything", 200)  # the default route, added once Redis answered
    assert set(proxy.routes()) == {"/", "/user/a"}
    poller.close()
    server.stop()


def test_bad_redis_url_exits_1(start_proxy: Callable[..., Proxy]) -> None:
    from support import ProxyProcess

    proc = ProxyProcess(
        ["--port", "0", "--api-port", "0", "--storage-backend", "redis://:pw@h:notaport/0"]
    )
    assert proc.proc.wait(30) == 1
    proc.stop()
    errors = [line for line in proc.lines if " error: " in line]
    assert len(errors) == 1 and "--storage-backend redis://:***@h:notaport/0" in errors[0]
    assert "pw" not in proc.output().replace("notaport", "")

"""One run of one proxy: start it, measure every step in order, stop it.

Order matters and is the same for every proxy. A first process: idle RSS, idle WebSockets. A
second, fresh one (a heap grown by thousands of sockets would slow the rest): small keep-alive,
API add, small keep-alive again with the big table, API GET all, API DELETE of the routes and
small keep-alive once more (the table's cost is taken against the mean of the 1-route figures
before and after), new connection per request, 1 MiB (peak RSS is read right after it),
WebSocket echo, API latency under load, and
in the first run only, the soak (many requests and WebSocket cycles; fds and RSS must come back).
A step that fails is recorded with its error and the run goes on with the next one.

A byte-relay floor (``FloorRun``: socat, bench/relay.c) runs only the steps a relay can serve
(keep-alive and WebSocket echo): what forwarding bytes costs here with no HTTP work.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
import statistics
import time
import traceback
import urllib.request
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bench import api, procs, wrk, wsload
from bench.config import Mode, ProxySpec, RelaySpec
from bench.meter import Meter, StepStats, wait_quiet

T = TypeVar("T")
# steps that can be measured again on the same process (the others change its state for good)
REPEATABLE = {"keepalive", "close", "big", "websocket", "api_get_all", "routes", "api_under_load"}
# (routes_removed is not: it removes the routes; its keep-alive part is noise-flagged on its own)


@dataclass
class Bench:
    """What all runs share."""

    mode: Mode
    backend: procs.Managed
    backend_port: int
    proxy_core: int
    load_core: int
    logs: Path


@dataclass
class Run:
    spec: ProxySpec
    bench: Bench
    index: int
    port: int = 0
    api_port: int = 0
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    proxy: procs.Managed | None = None
    meter: Meter | None = None
    quiet_wait: float = 0.0  # before each measured step, wait up to this long for quiet
    retries: int = 0  # redo a repeatable step that came out noisy, at most this often
    cores: str | None = None  # taskset's list for the proxy; None: the proxy core alone
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def mode(self) -> Mode:
        return self.bench.mode

    def url(self, what: str) -> str:
        return f"http://127.0.0.1:{self.port}/user/u{self.mode.routes // 2}/{what}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.error is None,
            "error": self.error,
            "metrics": self.metrics,
            "steps": self.steps,
            "errors": self.errors,
        }

    # -- helpers ---------------------------------------------------------------------------
    def settle(self) -> dict[str, float]:
        """With --wait-quiet: wait for other processes to go quiet before a measured step."""
        if self.quiet_wait <= 0:
            return {}
        background, waited = wait_quiet(self.quiet_wait)
        return {"background_before": background, "waited_s": waited}

    def measured(self, name: str, work: Callable[[], T]) -> tuple[T, StepStats]:
        assert self.meter is not None
        quiet = self.settle()
        before = self.meter.snap()
        result = work()
        stats = self.meter.stats(before, self.meter.snap())
        self.steps[name] = stats.as_dict() | quiet
        return result, stats

    def wrk_step(
        self, name: str, url: str, conns: int, headers: tuple[str, ...] = ()
    ) -> tuple[wrk.WrkResult, StepStats]:
        argv = wrk.command(url, self.bench.load_core, conns, self.mode.duration, headers)
        res, stats = self.measured(name, lambda: wrk.run(argv, self.mode.duration))
        self.steps[name]["requests"] = res.requests
        self.steps[name]["wrk_errors"] = res.socket_errors + res.non_2xx
        self.metrics["wrk_errors"] = self.metrics.get("wrk_errors", 0) + res.socket_errors
        self.metrics["wrk_non_2xx"] = self.metrics.get("wrk_non_2xx", 0) + res.non_2xx
        if res.requests == 0:
            raise RuntimeError(f"no request completed:\n{res.raw[-400:]}")
        return res, stats

    def rss(self, field_name: str = "VmRSS") -> float:
        assert self.proxy is not None
        return procs.tree_mib(self.proxy.pid, field_name)

    # -- the run ---------------------------------------------------------------------------
    def execute(self) -> None:
        """Two processes per run: the first only for memory (opening thousands of sockets
        grows a runtime's heap for good, and Node is then ~30% slower per request), the second
        for everything else."""
        memory = [("websocket_idle", self.step_websocket_idle)]
        load = [  # "routes" right after "keepalive": the two differ by the table alone
            ("warmup", self.step_warmup),
            ("keepalive", self.step_keepalive),
            ("api_add", self.step_api_add),
            ("routes", self.step_routes),
            ("api_get_all", self.step_api_get_all),
            ("routes_removed", self.step_routes_removed),
            ("close", self.step_close),
            ("big", self.step_big),
            ("websocket", self.step_websocket),
            ("api_under_load", self.step_api_under_load),
        ]
        if self.index == 1:  # long: once per proxy; last, on a process every step has warmed
            load.append(("soak", self.step_soak))
        if self.phase(1, memory):
            self.phase(2, load)

    def phase(self, number: int, steps: list[tuple[str, Callable[[], None]]]) -> bool:
        """Start a fresh proxy, run ``steps``, stop it; False if it could not start."""
        try:
            self.start(number)
        except Exception as exc:
            self.error = f"failed to start: {exc}"
            self.metrics.clear()
            if self.proxy is not None:
                tail = self.proxy.log_tail()
                if tail:
                    self.error += "\n" + tail
                self.proxy.stop()
            return False
        try:
            for name, step in steps:
                assert self.proxy is not None
                if not self.proxy.alive():
                    self.errors[name] = "proxy is not running:\n" + self.proxy.log_tail()
                    continue
                self.run_step(name, step)
        finally:
            assert self.proxy is not None
            if self.proxy.alive():
                with contextlib.suppress(OSError):
                    self.metrics[f"rss_end_phase{number}_mib"] = self.rss()
            else:
                self.error = self.error or "proxy died during the run:\n" + self.proxy.log_tail()
            self.proxy.stop()
        return True

    def run_step(self, name: str, step: Callable[[], None]) -> None:
        try:
            tries = 1 + (self.retries if name in REPEATABLE else 0)
            attempts = 0
            while attempts < tries:
                attempts += 1
                step()
                if not self.steps.get(name, {}).get("noisy"):
                    break
            if name in self.steps:
                self.steps[name]["attempts"] = attempts
        except Exception as exc:
            self.errors[name] = f"{type(exc).__name__}: {exc}"
            with (self.bench.logs / "errors.log").open("a") as f:
                f.write(f"{self.spec.name} run {self.index} {name}\n")
                f.write(traceback.format_exc() + "\n")

    def start(self, phase: int) -> None:
        self.port, self.api_port = procs.free_port(), procs.free_port()
        target = f"http://127.0.0.1:{self.bench.backend_port}"
        self.proxy = procs.Managed(
            self.spec.name,
            self.spec.command(self.port, self.api_port, target),
            self.cores or self.bench.proxy_core,
            self.bench.logs / f"{self.spec.name}-run{self.index}-{phase}.log",
            env={"CONFIGPROXY_AUTH_TOKEN": self.token, **dict(self.spec.env)},
        )
        timeout = self.mode.start_timeout
        waited = procs.wait_port(self.port, self.proxy.proc, timeout)
        waited += procs.wait_port(self.api_port, self.proxy.proc, timeout)
        self.metrics.setdefault("startup_s", waited)
        self.first_get("proxied")

    def first_get(self, how: str) -> None:
        """One GET through the started proxy (or relay), then the meter and the idle RSS."""
        assert self.proxy is not None
        try:
            with urllib.request.urlopen(self.url("small"), timeout=10) as resp:
                body = resp.read()
        except OSError as exc:
            raise RuntimeError(f"first {how} GET {self.url('small')}: {exc}") from None
        if body != b"Hello, World!":
            raise RuntimeError(f"{how} GET returned {body[:80]!r}")
        self.meter = Meter(
            self.proxy.pid, self.bench.backend.pid, self.bench.proxy_core, self.bench.load_core
        )
        self.metrics.setdefault("rss_idle_mib", self.rss())

    def step_warmup(self) -> None:
        mode = self.mode
        wrk.run(wrk.command(self.url("small"), self.bench.load_core, mode.conns, mode.warmup), 1)

    def step_keepalive(self) -> None:
        res, st = self.wrk_step("keepalive", self.url("small"), self.mode.conns)
        self.metrics |= {
            "ka_rps": res.rps,
            "ka_p50_ms": res.p50_ms or 0.0,
            "ka_p99_ms": res.p99_ms or 0.0,
            "ka_cpu_us": st.proxy_cpu_s / res.requests * 1e6,
            "ka_sys_us": st.proxy_sys_s / res.requests * 1e6,
        }

    def step_close(self) -> None:
        res, st = self.wrk_step("close", self.url("small"), self.mode.conns, ("Connection: close",))
        self.metrics |= {
            "close_rps": res.rps,
            "close_cpu_us": st.proxy_cpu_s / res.requests * 1e6,
        }

    def step_big(self) -> None:
        res, st = self.wrk_step("big", self.url("big"), self.mode.big_conns)
        self.metrics |= {
            "big_mibps": res.rps,  # one MiB per request
            "big_cpu_ms": st.proxy_cpu_s / res.requests * 1e3,
            "big_hwm_mib": self.rss("VmHWM"),
        }

    def _run_async(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            import uvloop

            factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        except ImportError:
            factory = asyncio.new_event_loop
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(coro)

    def step_websocket_idle(self) -> None:
        """First step, on a fresh proxy: a runtime's GC has not grown its heap with load yet."""
        self._run_async(self._websocket_idle())

    async def _websocket_idle(self) -> None:
        """RSS with N idle sockets open, then the marginal cost of N more (a runtime's heap grows
        in steps, so the first N also pay for heap growth; the second N show the per-socket
        cost). On a process of its own, so rss_idle_mib is this process's."""
        n = self.mode.idle_ws
        counter = wsload.Counter(0)
        clients: list[wsload.WsClient] = []
        samples = [self.rss()]
        try:
            for _ in range(2):
                clients += await wsload.open_sockets(self.port, n, counter, timeout=60)
                await asyncio.sleep(1.0)
                samples.append(self.rss())
            assert self.proxy is not None
            self.steps["websocket_idle"] = {
                "sockets": [0, n, 2 * n],
                "rss_mib": samples,
                "proxy_fds": len(os.listdir(f"/proc/{self.proxy.pid}/fd")),
            }
            self.metrics["ws_idle_rss_mib"] = samples[1]
            self.metrics["ws_idle_mib_per_1000"] = (samples[2] - samples[1]) * 1000 / n
        finally:
            wsload.close_all(clients)
        await asyncio.sleep(0.5)  # let the proxy tear the sockets down

    def step_websocket(self) -> None:
        self._run_async(self._websocket())

    async def _websocket(self) -> None:
        mode = self.mode
        counter = wsload.Counter(mode.ws_max_messages)
        clients = await wsload.open_sockets(self.port, mode.ws_sockets, counter, timeout=30)
        try:
            assert self.meter is not None
            quiet = await asyncio.to_thread(self.settle)
            before = self.meter.snap()
            done, elapsed = await wsload.echo(clients, counter, mode.ws_duration)
            stats = self.meter.stats(before, self.meter.snap())
            self.steps["websocket"] = stats.as_dict() | quiet | {"messages": done}
            if done == 0:
                raise RuntimeError("no websocket echo came back")
            self.metrics |= {
                "ws_msgps": done / elapsed,
                "ws_cpu_us": stats.proxy_cpu_s / done * 1e6,
                "ws_sys_us": stats.proxy_sys_s / done * 1e6,
            }
        finally:
            wsload.close_all(clients)

    def step_api_add(self) -> None:
        client = api.ApiClient(self.api_port, self.token)
        target = f"http://127.0.0.1:{self.bench.backend_port}"
        deadline = time.perf_counter() + max(60.0, self.mode.routes * 0.01)
        try:
            (added, failures), st = self.measured(
                "api_add", lambda: api.add_routes(client, self.mode.routes, target, deadline)
            )
        finally:
            client.close()
        self.steps["api_add"] |= {"added": added, "failures": failures}
        if failures or added < self.mode.routes:
            raise RuntimeError(f"added {added} of {self.mode.routes} routes, {failures} refused")
        self.metrics |= {
            "api_add_s": st.wall_s,
            "api_add_ms": st.wall_s / added * 1e3,
            "api_add_cpu_us": st.proxy_cpu_s / added * 1e6,
        }

    def step_api_get_all(self) -> None:
        client = api.ApiClient(self.api_port, self.token, timeout=30)
        times: list[float] = []

        def work() -> int:
            count = 0
            for _ in range(self.mode.get_repeats):
                elapsed, count = api.get_all(client)
                times.append(elapsed)
            return count

        try:
            count, _ = self.measured("api_get_all", work)
        finally:
            client.close()
        self.steps["api_get_all"] |= {"times_s": times, "routes": count}
        if count < self.mode.routes:
            raise RuntimeError(f"GET /api/routes listed {count} routes")
        self.metrics["api_get_all_ms"] = statistics.median(times) * 1e3

    def step_routes(self) -> None:
        res, st = self.wrk_step("routes", self.url("small"), self.mode.conns)
        self.metrics |= {
            "routes_rps": res.rps,
            "routes_p99_ms": res.p99_ms or 0.0,
            "routes_cpu_us": st.proxy_cpu_s / res.requests * 1e6,
        }
        if "ka_rps" in self.metrics:
            self.metrics["routes_ratio"] = res.rps / self.metrics["ka_rps"]

    def step_routes_removed(self) -> None:
        """Remove the N routes, then small keep-alive again with 1 route: the "N routes / 1
        route" ratio is taken against the mean of the 1-route figures before and after, so
        that a drift of the machine or the process over the steps in between (either way: it
        was seen both ways) does not pass for the table's cost."""
        client = api.ApiClient(self.api_port, self.token)
        deadline = time.perf_counter() + max(60.0, self.mode.routes * 0.01)
        try:
            (removed, failures), st = self.measured(
                "api_delete", lambda: api.remove_routes(client, self.mode.routes, deadline)
            )
        finally:
            client.close()
        if failures or removed < self.mode.routes:
            raise RuntimeError(f"removed {removed} of {self.mode.routes} routes, {failures} failed")
        self.metrics["api_delete_ms"] = st.wall_s / removed * 1e3
        res, _ = self.wrk_step("keepalive_after", self.url("small"), self.mode.conns)
        self.metrics["ka_after_rps"] = res.rps
        if "ka_rps" in self.metrics and "routes_rps" in self.metrics:
            one_route = (self.metrics["ka_rps"] + res.rps) / 2
            self.metrics["routes_ratio"] = self.metrics["routes_rps"] / one_route

    def step_api_under_load(self) -> None:
        mode = self.mode
        argv = wrk.command(self.url("small"), self.bench.load_core, mode.conns, mode.duration)
        latencies: list[float] = []
        errors = 0

        def work() -> wrk.WrkResult:
            nonlocal errors
            load = wrk.start(argv)
            try:
                time.sleep(min(0.5, mode.duration / 4))  # let wrk saturate the data plane
                end = time.perf_counter() + mode.duration + 5
                i = 0
                while load.poll() is None and i < mode.max_probes and time.perf_counter() < end:
                    path = f"/api/routes/probe/p{i // 2}"
                    try:
                        if i % 2 == 0:
                            target = f"http://127.0.0.1:{self.bench.backend_port}"
                            lat = api.probe_once(
                                self.api_port, self.token, "POST", path, {"target": target}
                            )
                        else:
                            lat = api.probe_once(self.api_port, self.token, "DELETE", path)
                        latencies.append(lat)
                    except Exception:
                        errors += 1
                    i += 1
                    time.sleep(mode.probe_interval)
            finally:
                res = wrk.finish(load, mode.duration)
            return res

        res, _ = self.measured("api_under_load", work)
        self.steps["api_under_load"] |= {"probes": len(latencies), "probe_errors": errors}
        if not latencies:
            raise RuntimeError("no API probe succeeded under load")
        lat = sorted(latencies)
        self.metrics |= {
            "api_load_p50_ms": percentile(lat, 50) * 1e3,
            "api_load_p99_ms": percentile(lat, 99) * 1e3,
            "api_load_max_ms": lat[-1] * 1e3,
            "api_load_errors": float(errors),
            "api_load_dp_rps": res.rps,
        }

    # -- soak ----------------------------------------------------------------------------------
    def fds(self) -> dict[str, int]:
        assert self.proxy is not None
        return procs.tree_fds(self.proxy.pid, self.bench.backend_port)

    def wait_fds(
        self, done: Callable[[dict[str, int], dict[str, int] | None], bool], timeout: float
    ) -> tuple[dict[str, int], float, bool]:
        """Poll the proxy's fds (every 50 ms, for at most ``timeout`` s) until
        ``done(now, previous sample)``; returns (last sample, seconds waited, whether done)."""
        start = time.perf_counter()
        prev: dict[str, int] | None = None
        while True:
            now = self.fds()
            if done(now, prev):
                return now, time.perf_counter() - start, True
            if time.perf_counter() - start > timeout:
                return now, time.perf_counter() - start, False
            prev = now
            time.sleep(0.05)

    def soak_leaked(self, base: dict[str, int], now: dict[str, int]) -> int:
        """fds the soak left behind: any fd beyond the baseline's, except that connections to
        the backend may stay up to ``conns`` (an idle keep-alive pool after load at that
        concurrency: reused, closed by the pool's idle timer, not a leak)."""
        pool = max(base["upstream"], self.mode.conns)
        fixed = now["total"] - now["upstream"] - (base["total"] - base["upstream"])
        return max(0, fixed) + max(0, now["upstream"] - pool)

    def step_soak(self) -> None:
        """design §4 soak: fds and RSS at a baseline (warm process, quiet), then at least
        soak_requests keep-alive requests and soak_ws WebSocket open/close cycles; then poll
        until the fds are back (or settle_timeout) and read fds and RSS again."""
        mode = self.mode
        # warm-up doing what the soak does, in the same order, so that the runtime's heap sizing
        # (V8 grows its young generation under load) is in the same state at both readings
        if mode.soak_warmup > 0:
            argv = wrk.command(
                self.url("small"), self.bench.load_core, mode.conns, mode.soak_warmup
            )
            wrk.run(argv, mode.soak_warmup)
        self._run_async(self._churn(max(100, mode.soak_ws // 20), 30.0))
        base, _, quiet = self.wait_fds(
            lambda now, prev: now["client"] == 0 and now == prev, mode.settle_timeout
        )
        rss_base = self.rss()
        if not quiet:
            raise RuntimeError(f"fds did not settle before the soak: {base}")
        ws_result: list[tuple[int, int, str]] = []

        def work() -> wrk.Budget:
            budget = wrk.run_budget(
                self.url("small"), self.bench.load_core, mode.conns, mode.soak_requests,
                mode.soak_timeout,
            )  # fmt: skip
            self._run_async(self._churn(mode.soak_ws, mode.soak_timeout, ws_result))
            return budget

        budget, st = self.measured("soak", work)
        cycles, ws_errors, first_error = ws_result[0]
        after, settle_s, _ = self.wait_fds(
            lambda now, _: self.soak_leaked(base, now) == 0, mode.settle_timeout
        )
        rss_after = self.rss()
        leaked = self.soak_leaked(base, after)
        errors = budget.socket_errors + budget.non_2xx + ws_errors
        self.steps["soak"] |= {
            "requests": budget.requests,
            "wrk_runs": budget.runs,
            "requests_s": budget.seconds,
            "ws_cycles": cycles,
            "ws_errors": ws_errors,
            "ws_first_error": first_error,
            "ws_s": st.wall_s - budget.seconds,
            "fds_base": base,
            "fds_after": after,
            "settle_s": settle_s,
            "rss_base_mib": rss_base,
            "rss_after_mib": rss_after,
        }
        self.metrics |= {
            "soak_s": st.wall_s,
            "soak_requests": float(budget.requests),
            "soak_ws_cycles": float(cycles),
            "soak_errors": float(errors),
            "soak_fds_base": float(base["total"]),
            "soak_fds_after": float(after["total"]),
            "soak_fds_leaked": float(leaked),
            "soak_settle_s": settle_s,
            "soak_rss_base_mib": rss_base,
            "soak_rss_after_mib": rss_after,
            "soak_rss_delta_mib": rss_after - rss_base,
            "soak_rss_growth_pct": (rss_after - rss_base) / rss_base * 100,
            "soak_cpu_us": st.proxy_cpu_s / max(1, budget.requests + cycles) * 1e6,
        }
        short = budget.requests < mode.soak_requests or cycles < mode.soak_ws
        if short:
            raise RuntimeError(
                f"soak incomplete in {mode.soak_timeout:.0f} s per part: {budget.requests:,} of "
                f"{mode.soak_requests:,} requests, {cycles:,} of {mode.soak_ws:,} WebSocket "
                f"cycles ({ws_errors} failed{': ' + first_error if first_error else ''})"
            )

    async def _churn(
        self, total: int, limit_s: float, out: list[tuple[int, int, str]] | None = None
    ) -> None:
        result = await wsload.churn(self.port, total, self.mode.soak_ws_sockets, limit_s)
        if out is not None:
            out.append(result)


class WorkersRun(Run):
    """hubproxy with ``--workers N`` on the cores given: small keep-alive and new connection per
    request, the steps whose throughput more processes should raise."""

    def execute(self) -> None:
        self.phase(
            1,
            [
                ("warmup", self.step_warmup),
                ("keepalive", self.step_keepalive),
                ("close", self.step_close),
            ],
        )

    def step_keepalive(self) -> None:
        """Also: how evenly the kernel spread the connections (the busiest worker's share of the
        workers' CPU; 1/N is even)."""
        assert self.proxy is not None
        workers = procs.children(self.proxy.pid)
        before = {pid: procs.cpu_seconds(pid) for pid in workers}
        super().step_keepalive()
        used = [procs.cpu_seconds(pid) - before[pid] for pid in workers]
        if len(used) > 1 and sum(used) > 0:
            self.metrics["ka_busiest_worker_share"] = max(used) / sum(used)


class FloorRun(Run):
    """A byte relay in front of the backend, measured like a proxy where it can be: it has no
    API and no HTTP, so only warm-up-free keep-alive and WebSocket echo (the backend answers
    any path, and the upgrade and frames pass through as bytes)."""

    def __init__(self, relay: RelaySpec, bench: Bench, index: int) -> None:
        super().__init__(ProxySpec(relay.name, relay.argv, relay.env), bench, index)
        self.relay = relay

    def execute(self) -> None:
        self.phase(1, [("keepalive", self.step_keepalive), ("websocket", self.step_websocket)])

    def start(self, phase: int) -> None:
        self.port = procs.free_port()
        self.proxy = procs.Managed(
            self.relay.name,
            self.relay.command(self.port, self.bench.backend_port),
            self.bench.proxy_core,
            self.bench.logs / f"{self.relay.name}-run{self.index}-{phase}.log",
            env=dict(self.relay.env),
        )
        self.metrics.setdefault(
            "startup_s", procs.wait_port(self.port, self.proxy.proc, self.mode.start_timeout)
        )
        self.first_get("relayed")


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    rank = max(1, min(len(sorted_values), math.ceil(pct / 100 * len(sorted_values))))
    return sorted_values[rank - 1]

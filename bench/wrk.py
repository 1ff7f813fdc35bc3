"""Run wrk pinned to the load core and parse its ``--latency`` report."""

from __future__ import annotations

import math
import re
import subprocess
import time
from dataclasses import dataclass

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}  # -> milliseconds
_TIME = r"([\d.]+)(us|ms|s|m|h)"


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    socket_errors: int
    non_2xx: int
    raw: str


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit]


def parse(out: str) -> WrkResult:
    m = re.search(r"(\d+) requests in " + _TIME, out)
    if not m:
        raise RuntimeError(f"unreadable wrk output:\n{out[-800:]}")
    requests, duration_s = int(m.group(1)), _ms(m.group(2), m.group(3)) / 1e3
    pct = {p: _ms(v, u) for p, v, u in re.findall(r"^\s+(50|99)%\s+" + _TIME, out, re.M)}
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return WrkResult(
        requests=requests,
        duration_s=duration_s,
        rps=requests / duration_s if duration_s else 0.0,
        p50_ms=pct.get("50"),
        p99_ms=pct.get("99"),
        socket_errors=sum(int(g) for g in errs.groups()) if errs else 0,
        non_2xx=int(non2xx.group(1)) if non2xx else 0,
        raw=out,
    )


def command(
    url: str, core: int, connections: int, duration: float, headers: tuple[str, ...] = ()
) -> list[str]:
    assert url.startswith("http://127.0.0.1:"), "bench traffic stays on loopback"
    argv = ["taskset", "-c", str(core), "wrk", "-t1", f"-c{connections}"]
    argv += [f"-d{max(1, round(duration))}s", "--timeout", "5s", "--latency"]
    for h in headers:
        argv += ["-H", h]
    return [*argv, url]


def start(argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen[str], duration: float) -> WrkResult:
    """Wait (bounded) for a started wrk and parse it."""
    try:
        out, _ = proc.communicate(timeout=duration + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise RuntimeError("wrk did not finish in time") from None
    return parse(out)


def run(argv: list[str], duration: float) -> WrkResult:
    return finish(start(argv), duration)


@dataclass(frozen=True)
class Budget:
    """What ``run_budget`` did: requests completed, wrk's errors, wrk processes run."""

    requests: int
    socket_errors: int
    non_2xx: int
    runs: int
    seconds: float


def run_budget(
    url: str,
    core: int,
    connections: int,
    total: int,
    limit_s: float,
    headers: tuple[str, ...] = (),
    chunk_s: float = 30.0,
) -> Budget:
    """At least ``total`` requests (wrk has no request budget): wrk runs one after another, each
    sized from the rate of the one before (the first for 1 s), until ``total`` are done or
    ``limit_s`` seconds have passed. Bounded in count (stops at ``total``; at most one run per
    second of ``limit_s``) and in time; overshoots by at most about a second of requests."""
    start = time.perf_counter()
    deadline = start + limit_s
    done = socket_errors = non_2xx = runs = 0
    rate = 0.0
    while done < total and runs < max(1, int(limit_s)):
        left_s = deadline - time.perf_counter()
        if left_s < 1:
            break
        want = (total - done) / rate if rate else 1.0
        seconds = max(1, min(math.ceil(want), int(left_s), int(chunk_s)))
        res = run(command(url, core, connections, seconds, headers), seconds)
        runs += 1
        done += res.requests
        socket_errors += res.socket_errors
        non_2xx += res.non_2xx
        if res.requests == 0:
            break  # nothing gets through: do not spin
        rate = res.rps
    return Budget(done, socket_errors, non_2xx, runs, time.perf_counter() - start)

"""CPU accounting for one measured step.

Before and after a step we read the proxy's CPU time (its process tree), the backend's, our own,
the children we reaped (wrk), and the machine's /proc/stat. From that:

- ``proxy_cpu_s`` divided by the work done is the figure a saturated load generator cannot hide;
- ``proxy_util`` near 1.0 means the proxy was the bottleneck (it has one core);
- ``load_ours_util`` (CPU of wrk, the backend and this process, all pinned to the load core)
  near 1.0 with ``proxy_util`` well below means the load side was the bottleneck;
- ``other_util`` is CPU that processes we did not start used during the step; above
  ``NOISE_UTIL`` (or any steal) the step is flagged noisy.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import asdict, dataclass

from bench import procs

NOISE_UTIL = 0.10  # of one core
STEAL_UTIL = 0.05
MIN_NOISE_S = 0.03  # CPU seconds others must have used before a step counts as noisy
SHORT_S = 0.5  # below this, a step's utilisation figures are tick noise


def _self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@dataclass(frozen=True)
class Snapshot:
    t: float
    proxy: float
    proxy_sys: float  # of ``proxy``, system (kernel) time
    backend: float
    own: float
    reaped: float
    machine: dict[str, procs.CpuTimes]


@dataclass(frozen=True)
class StepStats:
    wall_s: float
    proxy_cpu_s: float
    proxy_sys_s: float  # of proxy_cpu_s, in the kernel (system calls, loopback TCP, softirq)
    proxy_util: float
    backend_util: float
    proxy_core_util: float
    load_core_util: float
    load_ours_util: float
    other_util: float
    steal_util: float
    noisy: bool
    bound: str  # "proxy", "load", "contended" (noisy, neither saturated) or ""

    def as_dict(self) -> dict[str, float | bool | str]:
        return asdict(self)


class Meter:
    def __init__(self, proxy_pid: int, backend_pid: int, proxy_core: int, load_core: int) -> None:
        self.proxy_pid = proxy_pid
        self.backend_pid = backend_pid
        self.proxy_core = f"cpu{proxy_core}"
        self.load_core = f"cpu{load_core}"

    def snap(self) -> Snapshot:
        t = time.perf_counter()
        user, system = procs.tree_cpu_split(self.proxy_pid)
        return Snapshot(
            t=t,
            proxy=user + system,
            proxy_sys=system,
            backend=procs.tree_cpu_seconds(self.backend_pid),
            own=_self_cpu(),
            reaped=_children_cpu(),
            machine=procs.machine_cpu(),
        )

    def stats(self, a: Snapshot, b: Snapshot) -> StepStats:
        wall = max(b.t - a.t, 1e-9)
        proxy = b.proxy - a.proxy
        backend = b.backend - a.backend
        known = proxy + backend + (b.own - a.own) + (b.reaped - a.reaped)

        def util(core: str, attr: str) -> float:
            return (getattr(b.machine[core], attr) - getattr(a.machine[core], attr)) / wall

        other = max(0.0, util("cpu", "work") - known / wall)
        steal = util("cpu", "steal")
        proxy_util = proxy / wall
        ours_on_load_core = (known - proxy) / wall  # backend, wrk and this process are pinned there
        # /proc counts in ticks (10 ms): a short step needs more than a tick or two to be noisy
        noisy = (other > NOISE_UTIL and other * wall > MIN_NOISE_S) or steal > STEAL_UTIL
        if proxy_util > 0.9:
            bound = "proxy"
        elif ours_on_load_core > 0.85:
            bound = "load"
        else:
            bound = "contended" if noisy else ""
        return StepStats(
            wall_s=wall,
            proxy_cpu_s=proxy,
            proxy_sys_s=b.proxy_sys - a.proxy_sys,
            proxy_util=proxy_util,
            backend_util=backend / wall,
            proxy_core_util=util(self.proxy_core, "busy"),
            load_core_util=util(self.load_core, "busy"),
            load_ours_util=ours_on_load_core,
            other_util=other,
            steal_util=steal,
            noisy=noisy,
            bound=bound,
        )


def quiet_check(seconds: float = 1.0) -> float:
    """CPU (in cores) that other processes use while the bench sits still."""
    a, t0 = procs.machine_cpu()["cpu"], time.perf_counter()
    time.sleep(seconds)
    b, t1 = procs.machine_cpu()["cpu"], time.perf_counter()
    return (b.work - a.work) / (t1 - t0)


def wait_quiet(limit: float) -> tuple[float, float]:
    """Wait up to ``limit`` s until other processes use under NOISE_UTIL for a second.

    Returns (their use in the last second, seconds waited)."""
    start = time.perf_counter()
    background = quiet_check()
    while background > NOISE_UTIL and time.perf_counter() - start < limit:
        background = quiet_check()
    return background, time.perf_counter() - start

"""How many CPUs this process may use, for `--workers auto`: its affinity mask and its cgroup's
CPU quota, whichever allows fewer.

A Kubernetes pod limited to 1 CPU on a 32-core node still sees 32 cores in its affinity mask:
a CFS quota limits time, not cores. Counting only the mask would start 32 workers that share
one CPU's worth of time (each throttled most of every period, each holding its own memory).

The quota is read from the cgroup file system (the cgroup root is a parameter, for tests):

- cgroup v2: `cpu.max` holds `<quota> <period>` in microseconds, or `max <period>` for none;
- cgroup v1 (and the hybrid layout, where the `cpu` controller stays on v1):
  `cpu.cfs_quota_us` (`-1` for none) and `cpu.cfs_period_us`.

Every cgroup from the process's own up to the hierarchy's root may carry a quota (a pod's and
its container's, say); the tightest one is the limit. Without a cgroup namespace, a container
sees its host-side cgroup path in /proc/self/cgroup while its own cgroup is mounted as the root:
a path that does not exist under the mount means that, and the mount's root is read instead.

A fractional quota is rounded up (1.5 CPUs: 2 workers), as the JVM does: the workers then use
all of the time the pod is given. Anything unreadable or malformed counts as "no quota".
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def affinity_cpus() -> int:
    """The cores this process may run on (taskset, a cgroup cpuset)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def available_cpus(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """The CPUs `--workers auto` counts: the affinity mask, capped by the cgroup's quota."""
    cores = affinity_cpus()
    quota = cgroup_cpu_quota(cgroup_root, proc_cgroup)
    if quota is None:
        return cores
    return max(1, min(cores, math.ceil(quota)))


def cgroup_cpu_quota(
    cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP
) -> float | None:
    """The CPUs' worth of time the tightest quota on this process's cgroup path allows (1.5 for
    150 ms per 100 ms), or None when there is no quota (or none can be read)."""
    try:
        membership = proc_cgroup.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    v1_path: str | None = None
    v2_path: str | None = None
    for line in membership.splitlines():
        hierarchy, sep, rest = line.partition(":")
        controllers, sep2, path = rest.partition(":")
        if not (sep and sep2):
            continue
        if hierarchy == "0" and controllers == "":
            v2_path = path
        elif "cpu" in controllers.split(","):
            v1_path = path
    if v1_path is not None:  # the cpu controller is on a v1 hierarchy (v1, or the hybrid layout)
        mount = _v1_cpu_mount(cgroup_root)
        return None if mount is None else _tightest(mount, v1_path, _v1_quota)
    if v2_path is not None:
        return _tightest(cgroup_root, v2_path, _v2_quota)
    return None


def _v1_cpu_mount(root: Path) -> Path | None:
    """The v1 hierarchy holding the cpu controller: `cpu,cpuacct` (often with `cpu` as a link
    to it), or `cpu` mounted on its own."""
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return None
    for entry in entries:
        if "cpu" in entry.name.split(",") and (entry / "cpu.cfs_quota_us").is_file():
            return entry
    return None


def _tightest(mount: Path, path: str, read: Callable[[Path], float | None]) -> float | None:
    relative = Path(path.strip("/"))
    if ".." in relative.parts:  # not a cgroup path; do not wander outside the mount
        return None
    if not (mount / relative).is_dir():  # a container's own cgroup, mounted as the root
        relative = Path()
    quotas = []
    for step in (relative, *relative.parents):  # the leaf, then each parent up to the mount
        quota = read(mount / step)
        if quota is not None:
            quotas.append(quota)
    return min(quotas, default=None)


def _fields(path: Path) -> list[str] | None:
    try:
        return path.read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError):
        return None


def _quota(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    if q <= 0 or p <= 0:  # -1 (v1's "no quota"), or nonsense
        return None
    return q / p


def _v2_quota(directory: Path) -> float | None:
    fields = _fields(directory / "cpu.max")
    if fields is None or len(fields) != 2 or fields[0] == "max":
        return None
    return _quota(fields[0], fields[1])


def _v1_quota(directory: Path) -> float | None:
    quota = _fields(directory / "cpu.cfs_quota_us")
    period = _fields(directory / "cpu.cfs_period_us")
    if not quota or not period or len(quota) != 1 or len(period) != 1:
        return None
    return _quota(quota[0], period[0])

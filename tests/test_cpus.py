"""`--workers auto` in a container: the cgroup CPU quota caps the affinity mask (hubproxy.cpus).

The parsing is checked on cgroup trees written into temporary directories, laid out as the
kernel lays them out (v2, v1, the hybrid layout, with and without a cgroup namespace); one test
then puts a real process into a real cgroup with a quota, where the machine allows it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hubproxy.cpus import affinity_cpus, available_cpus, cgroup_cpu_quota
from support import ProxyProcess


def tree(root: Path, files: dict[str, str]) -> Path:
    """Write `files` (path relative to root: contents) and return root."""
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def membership(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "proc-self-cgroup"
    path.write_text(text)
    return path


V1_MEMBERSHIP = "4:memory:/kubepods/pod1/ctr\n3:cpu,cpuacct:/kubepods/pod1/ctr\n0::/\n"


@pytest.mark.parametrize(
    ("proc_cgroup", "files", "expected"),
    [
        # cgroup v2, in a cgroup namespace: the container's own cgroup is the mount's root
        ("0::/\n", {"cpu.max": "max 100000\n"}, None),
        ("0::/\n", {"cpu.max": "100000 100000\n"}, 1.0),
        ("0::/\n", {"cpu.max": "150000 100000\n"}, 1.5),
        ("0::/\n", {"cpu.max": "50000 100000\n"}, 0.5),
        ("0::/\n", {"cpu.max": "400000 50000\n"}, 8.0),
        # v2 without a namespace: the path is walked up, the tightest quota wins
        (
            "0::/kubepods/pod1/ctr\n",
            {
                "kubepods/cpu.max": "max 100000\n",
                "kubepods/pod1/cpu.max": "200000 100000\n",
                "kubepods/pod1/ctr/cpu.max": "max 100000\n",
            },
            2.0,
        ),
        (
            "0::/kubepods/pod1/ctr\n",
            {
                "kubepods/pod1/cpu.max": "300000 100000\n",
                "kubepods/pod1/ctr/cpu.max": "100000 100000\n",
            },
            1.0,
        ),
        # the root cgroup has no cpu.max at all
        ("0::/\n", {"cgroup.controllers": "cpu memory\n"}, None),
        # a host-side path that is not under the mount: the container's cgroup is the root
        ("0::/kubepods/pod1/ctr\n", {"cpu.max": "250000 100000\n"}, 2.5),
        # malformed or odd files count as no quota
        ("0::/\n", {"cpu.max": "garbage\n"}, None),
        ("0::/\n", {"cpu.max": "100000\n"}, None),
        ("0::/\n", {"cpu.max": "0 100000\n"}, None),
        ("0::/\n", {"cpu.max": "100000 0\n"}, None),
        ("0::/\n", {"cpu.max": "-5 100000\n"}, None),
        ("0::/../../etc\n", {"cpu.max": "100000 100000\n"}, None),
        # cgroup v1: cpu,cpuacct mounted together
        (
            V1_MEMBERSHIP,
            {
                "cpu,cpuacct/kubepods/pod1/ctr/cpu.cfs_quota_us": "-1\n",
                "cpu,cpuacct/kubepods/pod1/ctr/cpu.cfs_period_us": "100000\n",
                "cpu,cpuacct/kubepods/pod1/cpu.cfs_quota_us": "150000\n",
                "cpu,cpuacct/kubepods/pod1/cpu.cfs_period_us": "100000\n",
                "cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
                "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
            },
            1.5,
        ),
        # v1 in a container without a namespace: its own cgroup mounted as the hierarchy's root
        (
            V1_MEMBERSHIP,
            {
                "cpu,cpuacct/cpu.cfs_quota_us": "100000\n",
                "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
            },
            1.0,
        ),
        (
            V1_MEMBERSHIP,
            {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
            None,
        ),
        # v1 with cpu mounted on its own (this kind of machine), and the hybrid layout: the cpu
        # controller on v1 while cgroup v2 is mounted at unified/ without it
        (
            "2:cpuacct:/\n1:cpu:/job\n0::/\n",
            {
                "cpu/job/cpu.cfs_quota_us": "300000\n",
                "cpu/job/cpu.cfs_period_us": "100000\n",
                "cpu/cpu.cfs_quota_us": "-1\n",
                "cpu/cpu.cfs_period_us": "100000\n",
                "unified/cgroup.controllers": "\n",
                "cpuacct/cpuacct.usage": "0\n",
            },
            3.0,
        ),
        # v1 membership but no cpu hierarchy mounted
        (V1_MEMBERSHIP, {"memory/memory.limit_in_bytes": "1\n"}, None),
        (V1_MEMBERSHIP, {"cpu,cpuacct/cpu.cfs_quota_us": "x\n"}, None),
        # nothing to go on
        ("", {"cpu.max": "100000 100000\n"}, None),
        ("not a cgroup line\n", {"cpu.max": "100000 100000\n"}, None),
    ],
)
def test_cgroup_quota(
    tmp_path: Path, proc_cgroup: str, files: dict[str, str], expected: float | None
) -> None:
    root = tree(tmp_path / "cgroup", files)
    assert cgroup_cpu_quota(root, membership(tmp_path, proc_cgroup)) == expected


def test_unreadable_membership_is_no_quota(tmp_path: Path) -> None:
    root = tree(tmp_path / "cgroup", {"cpu.max": "100000 100000\n"})
    assert cgroup_cpu_quota(root, tmp_path / "missing") is None
    assert cgroup_cpu_quota(tmp_path / "no-root", membership(tmp_path, "0::/\n")) is None


@pytest.mark.parametrize(
    ("cpu_max", "cap"),
    [
        ("max 100000", None),
        ("100000 100000", 1),  # a pod limited to 1 CPU: one process, whatever the node has
        ("10000 100000", 1),  # a tenth of a CPU still needs a process
        ("150000 100000", 2),  # rounded up: the workers may use all of the time given
        ("6400000 100000", None),  # 64 CPUs: the affinity mask is the tighter limit
    ],
)
def test_available_cpus_is_the_tighter_limit(tmp_path: Path, cpu_max: str, cap: int | None) -> None:
    root = tree(tmp_path / "cgroup", {"cpu.max": cpu_max + "\n"})
    cores = affinity_cpus()
    expected = cores if cap is None else min(cores, cap)
    assert available_cpus(root, membership(tmp_path, "0::/\n")) == expected


# --- a real cgroup ---------------------------------------------------------------------------


@contextlib.contextmanager
def cpu_cgroup(quota_us: int, period_us: int) -> Iterator[Path]:
    """A new cgroup with a CPU quota, on whichever hierarchy holds the cpu controller; skips
    when this machine does not let us make one (not root, or no writable cpu controller)."""
    v1 = Path("/sys/fs/cgroup/cpu")
    v2 = Path("/sys/fs/cgroup")
    path: Path | None = None
    try:
        if (v1 / "cpu.cfs_quota_us").is_file():
            path = v1 / f"hubproxy-test-{os.getpid()}"
            path.mkdir()
            (path / "cpu.cfs_period_us").write_text(str(period_us))
            (path / "cpu.cfs_quota_us").write_text(str(quota_us))
        elif "cpu" in (v2 / "cgroup.subtree_control").read_text().split():
            path = v2 / f"hubproxy-test-{os.getpid()}"
            path.mkdir()
            (path / "cpu.max").write_text(f"{quota_us} {period_us}")
        else:
            pytest.skip("no cgroup with the cpu controller to make a child in")
    except OSError as e:
        if path is not None and path.exists():
            path.rmdir()
        pytest.skip(f"cannot make a cgroup here: {e}")
    try:
        yield path
    finally:
        path.rmdir()  # its processes have exited: an empty cgroup can be removed


def join(cgroup: Path) -> None:
    """In the child, before exec: move this process into the cgroup."""
    (cgroup / "cgroup.procs").write_text(str(os.getpid()))


@pytest.mark.skipif(affinity_cpus() < 2, reason="a 1-CPU quota changes nothing on one core")
def test_workers_auto_in_a_real_one_cpu_cgroup() -> None:
    """A process in a cgroup limited to 1 CPU counts 1, on a machine with more cores; hubproxy
    --workers auto there runs in one process (no worker processes), and 2 workers outside."""
    with cpu_cgroup(100_000, 100_000) as cgroup:
        code = "from hubproxy.cpus import available_cpus; print(available_cpus())"
        inside = subprocess.run(
            [sys.executable, "-c", code],
            preexec_fn=lambda: join(cgroup),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert inside.stdout.strip() == "1"

        args = ["--ip", "127.0.0.1", "--port", "0", "--api-ip", "127.0.0.1", "--api-port", "0"]
        proxy = ProxyProcess([*args, "--workers", "auto"], preexec=lambda: join(cgroup))
        try:
            proxy.wait_for_line(r"info: Proxy API at ")  # logged after the workers' line
            assert "worker processes" not in proxy.output()
        finally:
            assert proxy.stop() == 0
    outside = ProxyProcess([*args, "--workers", "auto"])
    try:
        outside.wait_for_line(r"info: Proxy API at ")
        expected = available_cpus()  # this machine's own (CI may run under a quota too)
        if expected > 1:
            assert f"Serving with {expected} worker processes" in outside.output()
        else:
            assert "worker processes" not in outside.output()
    finally:
        assert outside.stop() == 0

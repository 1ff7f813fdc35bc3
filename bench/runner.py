"""The whole bench: install, start the backend, run every proxy N times (interleaved), collect."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import deps, procs
from bench.config import CHP_BIN, REPO, Mode, ProxySpec, RelaySpec
from bench.meter import NOISE_UTIL, quiet_check
from bench.steps import Bench, FloorRun, Run, WorkersRun


def _cmd_output(argv: list[str], env: dict[str, str] | None = None) -> str:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=30, env={**os.environ, **(env or {})}
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    out = (done.stdout or done.stderr).strip().splitlines()
    return out[0] if out and done.returncode in (0, 1) else "unavailable"


def machine_info() -> dict[str, str]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return {
        "cpu": model,
        "nproc": str(os.cpu_count()),
        "memory": f"{int(mem) / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
    }


def versions(specs: list[ProxySpec]) -> dict[str, str]:
    out = {
        "python": platform.python_version(),
        "node": _cmd_output(["node", "--version"]),
        "wrk": _cmd_output(["wrk", "--version"]).split(" [")[0],
    }
    if CHP_BIN.exists():
        out["configurable-http-proxy"] = _cmd_output([str(CHP_BIN), "--version"])
    for spec in specs:
        if spec.name == "hubproxy":
            code = "import hubproxy; print(getattr(hubproxy, '__version__', 'unknown'))"
            out["hubproxy"] = _cmd_output([spec.argv[0], "-c", code], dict(spec.env))
    rev = _cmd_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = _cmd_output(["git", "-C", str(REPO), "status", "--porcelain"])
    out["repo"] = rev + (" (with uncommitted changes)" if dirty not in ("", "unavailable") else "")
    return out


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def print_status(run: Run, started: float) -> None:
    """The end of a run's console line: ok or what failed, and how long it took."""
    status = run.error.splitlines()[0] if run.error else "ok"
    if run.errors:
        status += f" ({len(run.errors)} step(s) failed: {', '.join(run.errors)})"
    print(f"{status} [{time.perf_counter() - started:.0f} s]", flush=True)


def workers_setups(cores: list[int]) -> list[tuple[str, int, str, bool]]:
    """(label, workers, taskset cores, shares the load core) for the workers table.

    The load side keeps the last core. With spare cores, N workers get N of them. A 2-core
    machine has one spare: there the table shows 1 worker on core 0, 2 workers on core 0 (what
    splitting costs) and 2 workers on both cores, sharing core 1 with the load (as far as such a
    machine goes)."""
    spare = cores[:-1] or cores
    setups = [
        (f"{n} worker{'s' if n > 1 else ''}, cores {','.join(map(str, spare[:n]))}", n,
         ",".join(map(str, spare[:n])), False)
        for n in range(1, min(len(spare), 4) + 1)
    ]  # fmt: skip
    if len(spare) == 1 and len(cores) == 2:
        both = ",".join(map(str, cores))
        setups.append((f"2 workers, core {spare[0]}", 2, str(spare[0]), False))
        setups.append((f"2 workers, cores {both} (shared with the load)", 2, both, True))
    return setups


def run_all(
    specs: list[ProxySpec],
    mode: Mode,
    command: str,
    out_dir: Path,
    quiet_wait: float = 0.0,
    retries: int = 0,
    floors: list[RelaySpec] | None = None,
) -> dict[str, Any]:
    raise_fd_limit()
    cores = sorted(os.sched_getaffinity(0))
    proxy_core, load_core = cores[0], cores[-1]
    if proxy_core == load_core:
        print("warning: one core only; proxy and load share it", flush=True)
    os.sched_setaffinity(0, {load_core})  # our own clients run beside wrk and the backend

    deps.ensure_python({"uvloop": "uvloop", "httptools": "httptools"})
    if not deps.ensure_wrk():
        raise SystemExit("wrk is not installed and could not be installed")
    if any(s.name == "chp" for s in specs) and not deps.ensure_chp():
        print("warning: Node CHP could not be installed; it will fail to start", flush=True)

    floor_skipped: dict[str, str] = {}
    for floor in floors or []:
        why = deps.ensure_floor(floor.name)
        if why:
            floor_skipped[floor.name] = why
            print(f"warning: floor {floor.name} skipped: {why}", flush=True)
    floors = [f for f in floors or [] if f.name not in floor_skipped]

    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    logs = out_dir / "logs" / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    background = quiet_check()
    if background > NOISE_UTIL:
        print(f"warning: other processes use {background:.0%} of a core at rest", flush=True)

    hubproxy = next((s for s in specs if s.name == "hubproxy"), None)
    worker_setups = workers_setups(cores) if hubproxy is not None else []
    results: dict[str, Any] = {
        "command": command,
        "started": started,
        "mode": mode.__dict__,
        "machine": machine_info()
        | {"cores": f"proxy on core {proxy_core}, load on core {load_core}"},
        "versions": versions(specs),
        "background_cpu_at_start": background,
        "logs": str(logs),
        "proxies": {s.name: {"command": [*s.argv], "runs": []} for s in specs},
        # byte relays, not competitors: only the keepalive and websocket steps
        "floors": {f.name: {"command": [*f.argv], "runs": []} for f in floors}
        | {name: {"skipped": why, "runs": []} for name, why in floor_skipped.items()},
        # hubproxy --workers N on the cores given: keep-alive and new-connection steps only
        "workers": {
            label: {"workers": n, "cores": cores_text, "shares_load_core": shared, "runs": []}
            for label, n, cores_text, shared in worker_setups
        },
    }
    backend_port = procs.free_port()
    backend = procs.Managed(
        "backend",
        [sys.executable, "-m", "bench.backend", "--port", str(backend_port)],
        load_core,
        logs / "backend.log",
        env={"PYTHONPATH": str(REPO)},
    )
    try:
        procs.wait_port(backend_port, backend.proc, 20)
        bench = Bench(mode, backend, backend_port, proxy_core, load_core, logs)
        for i in range(mode.runs):
            for spec in specs:
                t0 = time.perf_counter()
                print(f"[run {i + 1}/{mode.runs}] {spec.name} ...", end=" ", flush=True)
                run = Run(spec, bench, i + 1, quiet_wait=quiet_wait, retries=retries)
                run.execute()
                results["proxies"][spec.name]["runs"].append(run.as_dict())
                print_status(run, t0)
            for floor in floors:
                t0 = time.perf_counter()
                print(f"[run {i + 1}/{mode.runs}] floor {floor.name} ...", end=" ", flush=True)
                run = FloorRun(floor, bench, i + 1)
                run.execute()
                results["floors"][floor.name]["runs"].append(run.as_dict())
                print_status(run, t0)
            for label, n, cores_text, _ in worker_setups:
                assert hubproxy is not None
                t0 = time.perf_counter()
                print(f"[run {i + 1}/{mode.runs}] {label} ...", end=" ", flush=True)
                spec = ProxySpec(
                    f"hubproxy-w{n}", (*hubproxy.argv, "--workers", str(n)), hubproxy.env
                )
                run = WorkersRun(spec, bench, i + 1, cores=cores_text)
                run.execute()
                results["workers"][label]["command"] = [*spec.argv]
                results["workers"][label]["runs"].append(run.as_dict())
                print_status(run, t0)
    finally:
        backend.stop()
    return results

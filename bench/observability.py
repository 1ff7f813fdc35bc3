"""What observability costs the data plane: wrk against hubproxy with metrics off and on (scraped
every second), with the access log, against a checkout without the metrics code, and Node CHP.

    python -m bench.observability [--rounds 3] [--seconds 10] [--baseline /path/to/src]
        [--chp /path/to/configurable-http-proxy]

Core 0: the proxy (`taskset -c 0`); core 1: the backend (`python -m bench.backend`) and wrk
(`-t1 -c50`). Variants run interleaved, `--rounds` times each; each figure is the median over
rounds: requests/s, p99, and the proxy's CPU time per request (utime+stime from /proc, which the
load side cannot hide). `--baseline` is the `src` directory of a checkout to compare with (for
example `git worktree add /tmp/base <commit>`; run with `PYTHONPATH=/tmp/base/src`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass

from bench import wrk

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


@dataclass
class Variant:
    name: str
    argv: list[str]  # the proxy's command, without listen options
    env: dict[str, str]
    metrics: bool = False


@dataclass
class Result:
    rps: float
    p99_ms: float
    cpu_us: float


def run_one(variant: Variant, backend: str, seconds: int, logdir: str) -> Result:
    port, api, mport = free_port(), free_port(), free_port()
    argv = [*variant.argv, "--ip", "127.0.0.1", "--port", str(port)]
    argv += ["--api-ip", "127.0.0.1", "--api-port", str(api), "--default-target", backend]
    if variant.metrics:
        argv += ["--metrics-ip", "127.0.0.1", "--metrics-port", str(mport)]
    logname = "".join(c if c.isalnum() else "-" for c in variant.name) + ".log"
    log = open(os.path.join(logdir, logname), "a")  # noqa: SIM115
    proc = subprocess.Popen(["taskset", "-c", "0", *argv], stdout=log, stderr=log, env=variant.env)
    stop = threading.Event()
    scraper = None
    try:
        wait_port(port)
        wait_port(api)
        url = f"http://127.0.0.1:{port}/"
        urllib.request.urlopen(url, timeout=5).read()
        if variant.metrics:

            def scrape() -> None:
                while not stop.wait(1.0):
                    with urllib.request.urlopen(
                        f"http://127.0.0.1:{mport}/metrics", timeout=5
                    ) as r:
                        r.read()

            scraper = threading.Thread(target=scrape, daemon=True)
            scraper.start()
        before = cpu_seconds(proc.pid)
        out = subprocess.run(
            wrk.command(url, 1, 50, seconds), capture_output=True, text=True, check=True
        ).stdout
        used = cpu_seconds(proc.pid) - before
        result = wrk.parse(out)
        if result.socket_errors or result.non_2xx:
            print(f"  {variant.name}: {result.socket_errors} errors, {result.non_2xx} non-2xx")
        return Result(result.rps, result.p99_ms or 0.0, used / result.requests * 1e6)
    finally:
        stop.set()
        if scraper is not None:
            scraper.join(5)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--baseline", help="src directory of a checkout without the metrics code")
    ap.add_argument("--chp", help="Node CHP's configurable-http-proxy binary")
    ap.add_argument("--keep-logs", action="store_true", help="keep the proxies' output")
    args = ap.parse_args()

    env = {**os.environ, "CONFIGPROXY_AUTH_TOKEN": "bench"}
    hubproxy = [sys.executable, "-m", "hubproxy", "--log-level", "warn"]
    variants = []
    if args.baseline:
        base_env = {**env, "PYTHONPATH": args.baseline}
        variants.append(Variant("baseline (no metrics code)", hubproxy, base_env))
    variants += [
        Variant("metrics off", hubproxy, env),
        Variant("metrics on, scraped 1/s", hubproxy, env, metrics=True),
        Variant("access log (text, to a file)", [*hubproxy, "--access-log"], env),
        Variant(
            "access log (json, to a file)", [*hubproxy, "--access-log", "--log-format", "json"], env
        ),
    ]
    if args.chp:
        variants.append(
            Variant("Node CHP, metrics on", [args.chp, "--log-level", "warn"], env, True)
        )

    bport = free_port()
    backend = subprocess.Popen(
        ["taskset", "-c", "1", sys.executable, "-m", "bench.backend", "--port", str(bport)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    results: dict[str, list[Result]] = {v.name: [] for v in variants}
    logdir = tempfile.mkdtemp(prefix="obsbench-")
    try:
        wait_port(bport)
        for round_ in range(args.rounds):
            for variant in variants:
                r = run_one(variant, f"http://127.0.0.1:{bport}", args.seconds, logdir)
                results[variant.name].append(r)
                print(
                    f"round {round_ + 1} {variant.name:32} {r.rps:8.0f} req/s"
                    f"  p99 {r.p99_ms:6.2f} ms  {r.cpu_us:6.1f} us CPU/req",
                    flush=True,
                )
    finally:
        backend.send_signal(signal.SIGTERM)
        backend.wait(10)

    if args.keep_logs:
        print(f"logs: {logdir}")
    else:
        shutil.rmtree(logdir, ignore_errors=True)  # the access logs are large
    print(f"\nmedians over {args.rounds} rounds, wrk -t1 -c50 -d{args.seconds}s")
    print("| variant | requests/s | p99 ms | proxy CPU per request (us) |")
    print("|---|---|---|---|")
    for name, rs in results.items():
        rps = statistics.median(r.rps for r in rs)
        p99 = statistics.median(r.p99_ms for r in rs)
        cpu = statistics.median(r.cpu_us for r in rs)
        print(f"| {name} | {rps:,.0f} | {p99:.2f} | {cpu:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

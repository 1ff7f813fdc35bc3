"""Run modes (how long and how much) and the proxies the harness knows."""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
CACHE = BENCH_DIR / ".cache"
RESULTS = BENCH_DIR / "results"
CHP_DIR = CACHE / "chp"
CHP_BIN = CHP_DIR / "node_modules" / ".bin" / "configurable-http-proxy"


@dataclass(frozen=True)
class Mode:
    name: str
    runs: int  # each figure is the median over runs (fresh proxy each run)
    duration: float  # seconds per wrk step
    warmup: float  # seconds of unrecorded load after start (JIT, pools)
    routes: int  # routes added through the API for the "many routes" figures
    conns: int = 50
    big_conns: int = 10
    ws_sockets: int = 50
    ws_duration: float = 10.0
    ws_max_messages: int = 5_000_000
    idle_ws: int = 1000
    get_repeats: int = 5
    probe_interval: float = 0.02  # seconds between API probes under load
    max_probes: int = 2000
    start_timeout: float = 20.0
    # soak (run 1 only, last step of the load process): at least this many keep-alive requests
    # and WebSocket open/close cycles; each part also stops at soak_timeout seconds
    soak_requests: int = 1_000_000
    soak_ws: int = 100_000
    soak_ws_sockets: int = 50  # WebSocket cycles in flight at once
    soak_warmup: float = 2.0  # seconds of wrk before the baseline (0: none)
    soak_timeout: float = 900.0
    settle_timeout: float = 60.0  # for fds to come back to the baseline afterwards
    # byte-relay floors measured beside the proxies (keepalive and websocket steps only)
    floors: tuple[str, ...] = ("c-relay", "socat")


MODES = {
    "full": Mode("full", runs=3, duration=10, warmup=2, routes=10_000),
    "quick": Mode(
        "quick",
        runs=1,
        duration=3,
        warmup=1,
        routes=2_000,
        ws_duration=3,
        get_repeats=3,
        soak_requests=100_000,
        soak_ws=5_000,
        soak_warmup=1,
        soak_timeout=120,
        settle_timeout=30,
    ),
    "smoke": Mode(
        "smoke",
        runs=1,
        duration=1,
        warmup=0.5,
        routes=50,
        conns=10,
        big_conns=2,
        ws_sockets=5,
        ws_duration=1,
        ws_max_messages=100_000,
        idle_ws=100,
        get_repeats=1,
        probe_interval=0.05,
        max_probes=50,
        soak_requests=2_000,
        soak_ws=200,
        soak_ws_sockets=10,
        soak_warmup=0,  # keep CI's smoke short: the steps before warmed the process
        soak_timeout=20,
        settle_timeout=10,
        floors=("c-relay",),
    ),
}


def mode_for(name: str, runs: int | None) -> Mode:
    mode = MODES[name]
    return replace(mode, runs=runs) if runs else mode


@dataclass(frozen=True)
class ProxySpec:
    """A proxy under test: a command that takes CHP's CLI, appended by the harness."""

    name: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()

    def command(self, port: int, api_port: int, target: str) -> list[str]:
        return [
            *self.argv,
            "--ip",
            "127.0.0.1",
            "--port",
            str(port),
            "--api-ip",
            "127.0.0.1",
            "--api-port",
            str(api_port),
            "--default-target",
            target,
            "--log-level",
            "warn",
        ]


@dataclass(frozen=True)
class RelaySpec:
    """A byte relay (no HTTP, no API) measured as a floor, not as a competitor: ``argv`` with
    ``{port}`` and ``{backend_port}`` filled in."""

    name: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()

    def command(self, port: int, backend_port: int) -> list[str]:
        return [a.format(port=port, backend_port=backend_port) for a in self.argv]


RELAY_SRC = BENCH_DIR / "relay.c"
RELAY_BIN = CACHE / "relay"


def known_floors() -> dict[str, RelaySpec]:
    return {
        # single thread, epoll, one read() and one write() per event, no fork (bench/relay.c)
        "c-relay": RelaySpec("c-relay", (str(RELAY_BIN), "{port}", "{backend_port}")),
        # one forked process per connection, select() loop, 8 KiB reads, TCP_NODELAY
        "socat": RelaySpec(
            "socat",
            (
                "socat",
                "TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,nodelay",
                "TCP:127.0.0.1:{backend_port},nodelay",
            ),
        ),
    }


def _pythonpath() -> str:
    parts = [str(REPO / "src"), os.environ.get("PYTHONPATH", "")]
    return ":".join(p for p in parts if p)


def known_proxies() -> dict[str, ProxySpec]:
    return {
        "chp": ProxySpec("chp", (str(CHP_BIN),)),
        "hubproxy": ProxySpec(
            "hubproxy", (sys.executable, "-m", "hubproxy"), (("PYTHONPATH", _pythonpath()),)
        ),
    }


def parse_extra(text: str) -> ProxySpec:
    """``NAME=COMMAND`` (split on spaces) from ``--proxy-cmd``."""
    name, sep, cmd = text.partition("=")
    if not sep or not name or not cmd.strip():
        raise ValueError(f"--proxy-cmd wants NAME=COMMAND, got {text!r}")
    return ProxySpec(name, tuple(shlex.split(cmd)), (("PYTHONPATH", _pythonpath()),))

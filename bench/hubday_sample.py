"""The hub day's sampler: once a second, for each proxy, what /proc says.

A process of its own (on the load core), so that reading /proc/net/tcp, thousands of lines when
TIME_WAIT piles up, never stalls the simulated users' event loop, whose latencies are measured.

Per proxy and sample: RSS and peak RSS of its process tree, open fds, CPU seconds so far, and its
TCP sockets by state, sorted by whose end they are. Each connection is in /proc/net/tcp twice on
loopback, once per end, and a socket in TIME_WAIT belongs to no process any more, so ends are
told apart by ports:

- ``proxy_client``: local port is the proxy's public port (connections it accepted);
- ``client_end``: the users' end of those (remote port is the proxy's);
- ``proxy_api`` / ``hub_end``: the same for the REST API port (the hub's calls);
- ``proxy_target``: remote port in the world's backend range, local port outside it (the
  proxy's connections to user servers and to the hub's error page);
- ``target_end``: the servers' end of those (local port in the range, remote outside it).

``eph_ports``: distinct local ports of ``proxy_target`` sockets in any state, the ephemeral
ports the proxy holds (CHP #557). ``machine``: TIME_WAIT sockets and local ports inside the
kernel's ephemeral range, for the whole network namespace.

Run as ``python -m bench.hubday_sample SPEC_JSON``; writes one JSON line per sample to the
spec's ``out`` and stops on SIGTERM or after ``limit_s``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench import procs

STATES = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "03": "SYN_RECV",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
}
ENDS = ("proxy_client", "client_end", "proxy_api", "hub_end", "proxy_target", "target_end")


def ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def tcp_table() -> list[tuple[int, int, str]]:
    """(local port, remote port, state) of every TCP socket in /proc/net/tcp{,6}."""
    out: list[tuple[int, int, str]] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f, None)
            for line in f:
                fields = line.split(None, 4)
                local, remote = fields[1], fields[2]
                out.append((int(local[-4:], 16), int(remote[-4:], 16), fields[3]))
    return out


def fd_count(pid: int) -> int:
    total = 0
    for p in procs.tree(pid):
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{p}/fd"))
    return total


def sort_sockets(
    table: list[tuple[int, int, str]], proxy: dict[str, Any]
) -> tuple[dict[str, dict[str, int]], int]:
    """Sockets by end and state (see the module's doc) and the proxy's ephemeral ports."""
    port, api, lo, hi = proxy["port"], proxy["api_port"], proxy["lo"], proxy["hi"]
    ends: dict[str, Counter[str]] = {end: Counter() for end in ENDS}
    ports: set[int] = set()
    for local, remote, state in table:
        if state == "0A":
            continue
        name = STATES.get(state, state)
        if local == port:
            ends["proxy_client"][name] += 1
        elif remote == port:
            ends["client_end"][name] += 1
        elif local == api:
            ends["proxy_api"][name] += 1
        elif remote == api:
            ends["hub_end"][name] += 1
        elif lo <= remote < hi and not lo <= local < hi:
            ends["proxy_target"][name] += 1
            ports.add(local)
        elif lo <= local < hi and not lo <= remote < hi:
            ends["target_end"][name] += 1
    return {end: dict(c) for end, c in ends.items()}, len(ports)


def sample(spec: dict[str, Any], eph: tuple[int, int]) -> dict[str, Any]:
    t = time.monotonic() - spec["t0"]
    table = tcp_table()
    out: dict[str, Any] = {"t": round(t, 3), "proxies": {}}
    for proxy in spec["proxies"]:
        pid = proxy["pid"]
        entry: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError, IndexError):
            entry = {
                "rss": procs.tree_mib(pid),
                "hwm": procs.tree_mib(pid, "VmHWM"),
                "fds": fd_count(pid),
                "cpu": procs.tree_cpu_seconds(pid),
            }
        sockets, ports = sort_sockets(table, proxy)
        entry |= {"tcp": sockets, "eph_ports": ports}
        out["proxies"][proxy["name"]] = entry
    low, high = eph
    out["machine"] = {
        "time_wait": sum(1 for _, _, s in table if s == "06"),
        "eph_in_use": len({loc for loc, _, s in table if low <= loc <= high and s != "0A"}),
    }
    out["took_ms"] = round((time.monotonic() - spec["t0"] - t) * 1e3, 1)
    return out


def run(spec: dict[str, Any]) -> None:
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    eph = ephemeral_range()
    interval, end = float(spec["interval"]), time.monotonic() + float(spec["limit_s"])
    next_at = time.monotonic()
    with open(spec["out"], "a") as out:
        while not stop and time.monotonic() < end:
            out.write(json.dumps(sample(spec, eph)) + "\n")
            out.flush()
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_at = time.monotonic()


if __name__ == "__main__":
    run(json.loads(sys.argv[1]))

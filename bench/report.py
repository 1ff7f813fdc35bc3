"""Medians, the comparison table, docs/benchmarks.md and docs/benchmarks.png."""

from __future__ import annotations

import copy
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.meter import SHORT_S

BASELINE = "chp"
# soak: RSS after may exceed the baseline by less than this share of it (see bench/README.md).
# At full counts that catches a leak of more than ~4 bytes per request (hubproxy, ~45 MiB) or
# ~10 (Node CHP, ~110 MiB). A runtime's heap noise grows with its heap: right after load, Node
# CHP's RSS was -2.6 to +9.1 MiB off a baseline read the same way, and hubproxy's 0 to +2 MiB.
SOAK_RSS_PCT = 10.0


@dataclass(frozen=True)
class Target:
    kind: str  # "ratio" (to CHP) or "abs"
    op: str  # ">=", "<=", "<"
    value: float

    def text(self) -> str:
        return f"{'x CHP ' if self.kind == 'ratio' else ''}{self.op} {self.value:g}"

    def met(self, value: float, base: float | None) -> bool | None:
        if self.kind == "ratio":
            if not base:
                return None
            value = value / base
        return {
            ">=": value >= self.value,
            "<=": value <= self.value,
            "<": value < self.value,
        }[self.op]


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    step: str  # the step(s) whose noise flag applies, "a+b" when it comes from two
    target: Target | None = None


def _m(key: str, label: str, unit: str, step: str, target: Target | None = None) -> Metric:
    return Metric(key, label, unit, step, target)


R, A = "ratio", "abs"
METRICS = [
    _m("ka_rps", "small, keep-alive, {c} conns", "req/s", "keepalive", Target(R, ">=", 2)),
    _m("ka_cpu_us", "  proxy CPU per request", "us", "keepalive", Target(R, "<=", 0.5)),
    _m("ka_p50_ms", "  latency p50", "ms", "keepalive"),
    _m("ka_p99_ms", "  latency p99", "ms", "keepalive", Target(R, "<=", 1)),
    _m("close_rps", "small, new connection each", "req/s", "close", Target(R, ">=", 1.5)),
    _m("close_cpu_us", "  proxy CPU per request", "us", "close"),
    _m("big_mibps", "1 MiB responses", "MiB/s", "big", Target(R, ">=", 1)),
    _m("big_cpu_ms", "  proxy CPU per MiB", "ms", "big", Target(R, "<=", 1)),
    _m("big_hwm_mib", "  peak RSS (VmHWM) after", "MiB", "big"),
    _m("routes_rps", "small, keep-alive, {n} routes", "req/s", "routes"),
    _m("routes_cpu_us", "  proxy CPU per request", "us", "routes"),
    _m(
        "routes_ratio",
        "  {n} routes / 1 route (before and after)",
        "x",
        "keepalive+routes+keepalive_after",
        Target(A, ">=", 0.95),
    ),
    _m("ws_msgps", "WebSocket echo, {s} sockets", "msg/s", "websocket", Target(R, ">=", 1)),
    _m("ws_cpu_us", "  proxy CPU per message", "us", "websocket", Target(R, "<=", 0.5)),
    _m("rss_idle_mib", "RSS idle", "MiB", "", Target(R, "<=", 1)),
    _m("ws_idle_rss_mib", "RSS with {w} idle WebSockets", "MiB", "", Target(R, "<=", 1)),
    _m("ws_idle_mib_per_1000", "  per 1,000 more", "MiB", "", Target(R, "<=", 1)),
    _m("api_add_s", "API: add {n} routes", "s", "api_add", Target(R, "<=", 1)),
    _m("api_add_ms", "  per route", "ms", "api_add"),
    _m("api_add_cpu_us", "  proxy CPU per route", "us", "api_add"),
    _m("api_get_all_ms", "API: GET /api/routes with {n}", "ms", "api_get_all", Target(R, "<=", 1)),
    _m("api_delete_ms", "API: DELETE, per route (of {n})", "ms", "api_delete"),
    _m("api_load_p50_ms", "API latency, data plane saturated: p50", "ms", "api_under_load"),
    _m("api_load_p99_ms", "  p99", "ms", "api_under_load", Target(A, "<", 100)),
    _m("api_load_max_ms", "  max", "ms", "api_under_load"),
    _m("api_load_dp_rps", "  data plane meanwhile", "req/s", "api_under_load"),
    _m("soak_s", "soak: {sr} requests + {sw} WebSocket opens/closes", "s", "soak"),
    _m("soak_fds_leaked", "  fds not back to baseline", "", "", Target(A, "<=", 0)),
    _m(
        "soak_rss_growth_pct", "  RSS growth (details: Soak)", "%", "", Target(A, "<", SOAK_RSS_PCT)
    ),
    _m("soak_errors", "  errors", "", "", Target(A, "<=", 0)),
    _m("startup_s", "start to listening", "s", ""),
    _m("wrk_errors", "wrk socket errors, all steps", "", "", Target(A, "<=", 0)),
    _m("wrk_non_2xx", "wrk non-2xx answers, all steps", "", "", Target(A, "<=", 0)),
]
CHART = [
    "ka_rps", "ka_cpu_us", "ka_p99_ms", "close_rps", "big_mibps", "big_cpu_ms", "ws_msgps",
    "ws_cpu_us", "routes_ratio", "rss_idle_mib", "ws_idle_rss_mib", "ws_idle_mib_per_1000",
    "api_add_s",
    "api_get_all_ms", "api_load_p99_ms",
]  # fmt: skip
STEPS = [
    "keepalive", "api_add", "routes", "api_get_all", "close", "big", "websocket", "api_under_load",
    "soak",
]  # fmt: skip


@dataclass(frozen=True)
class Summary:
    median: float
    low: float
    high: float
    n: int
    noisy: bool


def pool(many: list[dict[str, Any]]) -> dict[str, Any]:
    """Several raw results of the same mode as one: the runs of each proxy put together."""
    first = copy.deepcopy(many[0])
    for other in many[1:]:
        for key in ("name", "routes", "duration", "idle_ws"):
            if other["mode"][key] != first["mode"][key]:
                raise ValueError(f"cannot pool results of different modes ({key} differs)")
        for group in ("proxies", "floors", "workers"):
            for name, data in other.get(group, {}).items():
                first.setdefault(group, {}).setdefault(name, {**data, "runs": []})
                first[group][name]["runs"] += data["runs"]
    if len(many) > 1:
        first["started"] = f"{many[0]['started']} to {many[-1]['started']}"
        first["mode"]["runs"] = max(len(d["runs"]) for d in first["proxies"].values())
        first["command"] = "; ".join(dict.fromkeys(d["command"] for d in many))
    return first


def fmt(v: float) -> str:
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}" if abs(v) >= 1 else f"{v:.3g}"


def noisy(run: dict[str, Any], steps: str) -> bool:
    return any(run["steps"].get(step, {}).get("noisy") for step in steps.split("+") if step)


def summarize(runs: list[dict[str, Any]], metric: Metric) -> Summary | None:
    """Median over the runs whose step was quiet; over all runs (flagged noisy) if none was."""
    ok = [r for r in runs if metric.key in r["metrics"]]
    if not ok:
        return None
    clean = [r for r in ok if not noisy(r, metric.step)]
    use = clean or ok
    vals = [float(r["metrics"][metric.key]) for r in use]
    return Summary(statistics.median(vals), min(vals), max(vals), len(vals), not clean)


def cell(s: Summary | None) -> str:
    if s is None:
        return "—"
    text = fmt(s.median)
    if s.n > 1:
        text += f" ({fmt(s.low)}–{fmt(s.high)})"
    return text + (" *" if s.noisy else "")


def label_args(mode: dict[str, Any]) -> dict[str, str]:
    return {
        "n": f"{mode['routes']:,}",
        "w": f"{mode['idle_ws']:,}",
        "c": str(mode["conns"]),
        "s": str(mode["ws_sockets"]),
        "sr": f"{mode.get('soak_requests', 0):,}",
        "sw": f"{mode.get('soak_ws', 0):,}",
    }


def verdict(m: Metric, mine: Summary | None, base: Summary | None) -> str:
    if m.target is None or mine is None:
        return ""
    met = m.target.met(mine.median, base.median if base else None)
    return "" if met is None else "yes" if met else "NO"


def table(results: dict[str, Any]) -> str:
    """The comparison as a markdown table (also what the console shows)."""
    names = list(results["proxies"])
    others = [n for n in names if n != BASELINE] if BASELINE in names else []
    head = ["measure", "unit", *names]
    for o in others:
        head += [f"{o}/{BASELINE}", "target", "met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in METRICS:
        sums = {n: summarize(results["proxies"][n]["runs"], m) for n in names}
        label = m.label.format(**label_args(results["mode"])).replace("  ", "&nbsp;&nbsp;")
        row = [label, m.unit, *(cell(sums[n]) for n in names)]
        base = sums.get(BASELINE)
        for o in others:
            mine = sums[o]
            ratio = fmt(mine.median / base.median) if mine and base and base.median else "—"
            row += [ratio, m.target.text() if m.target else "", verdict(m, mine, base)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def bottleneck_table(results: dict[str, Any]) -> str:
    """Per step: proxy CPU use of its core, load core use, others' CPU: who limited the figure."""
    head = ["proxy", "step", "proxy CPU", "load side CPU", "of it backend", "load core busy"]
    head += ["others' CPU", "bound"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups = list(results["proxies"].items())
    groups += [(f"floor: {n}", d) for n, d in results.get("floors", {}).items()]
    for name, data in groups:
        for step in STEPS:
            got = [r["steps"][step] for r in data["runs"] if step in r["steps"]]
            if not got:
                continue
            if statistics.median(float(g["wall_s"]) for g in got) < SHORT_S:
                continue  # too short for /proc's 10 ms ticks to say anything
            noisy_runs = sum(1 for g in got if g["noisy"])
            got = [g for g in got if not g["noisy"]] or got  # as the figures: quiet runs first

            def med(key: str, got: list[dict[str, Any]] = got) -> str:
                vals = [float(g[key]) for g in got if key in g]
                return f"{statistics.median(vals):.0%}" if vals else "—"

            bound = Counter(g["bound"] for g in got).most_common(1)[0][0] or "neither"
            others = med("other_util") + (f" ({noisy_runs} noisy)" if noisy_runs else "")
            row = [name, step, med("proxy_util"), med("load_ours_util"), med("backend_util")]
            row += [med("load_core_util")]
            lines.append("| " + " | ".join([*row, others, bound]) + " |")
    return "\n".join(lines)


def _soak_cell(runs: list[dict[str, Any]]) -> list[str] | None:
    got = [r for r in runs if "soak" in r["steps"] and "soak_fds_leaked" in r["metrics"]]
    if not got:
        return None
    st, m = got[0]["steps"]["soak"], got[0]["metrics"]
    base, after = st["fds_base"], st["fds_after"]
    fds_ok = m["soak_fds_leaked"] <= 0
    rss_ok = m["soak_rss_growth_pct"] < SOAK_RSS_PCT
    return [
        f"{st['requests']:,} in {st['requests_s']:.0f} s",
        f"{st['ws_cycles']:,} in {st['ws_s']:.0f} s",
        f"{int(m['soak_errors']):,}",
        f"{base['total']} → {after['total']} (to backend {base['upstream']} → {after['upstream']})",
        f"{st['settle_s']:.2f} s",
        f"{m['soak_rss_base_mib']:.1f} → {m['soak_rss_after_mib']:.1f} "
        f"({m['soak_rss_delta_mib']:+.1f}, {m['soak_rss_growth_pct']:+.1f}%)",
        ("yes" if fds_ok and rss_ok else "NO")
        + ("" if fds_ok else ": fds")
        + ("" if rss_ok else ": RSS"),
    ]


def soak_table(results: dict[str, Any]) -> str:
    """design §4 soak row, per proxy (first run only): the work, fds and RSS before and after."""
    head = ["proxy", "keep-alive requests", "WebSocket cycles", "errors", "open fds"]
    head += ["fds back after", "RSS MiB", "back to baseline"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, data in results["proxies"].items():
        row = _soak_cell(data["runs"])
        if row:
            lines.append("| " + " | ".join([name, *row]) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


FLOOR_ROWS = [
    ("ka_rps", "small, keep-alive, {c} conns", "req/s"),
    ("ka_cpu_us", "  CPU per request", "us"),
    ("ka_sys_us", "  of it in the kernel", "us"),
    ("ws_msgps", "WebSocket echo, {s} sockets", "msg/s"),
    ("ws_cpu_us", "  CPU per message", "us"),
    ("ws_sys_us", "  of it in the kernel", "us"),
]


def floor_table(results: dict[str, Any]) -> str:
    """Byte relays (no HTTP work) beside the proxies, same run, same steps: the floor."""
    floors = {n: d for n, d in results.get("floors", {}).items() if d["runs"]}
    if not floors:
        return ""
    cols = [*(f"floor: {n}" for n in floors), *results["proxies"]]
    groups = [*floors.values(), *results["proxies"].values()]
    lines = ["| measure | unit | " + " | ".join(cols) + " |", "|" + "---|" * (2 + len(cols))]
    for key, label, unit in FLOOR_ROWS:
        m = Metric(key, label, unit, "keepalive" if key.startswith("ka") else "websocket")
        sums = [summarize(g["runs"], m) for g in groups]
        label = label.format(**label_args(results["mode"])).replace("  ", "&nbsp;&nbsp;")
        lines.append(f"| {label} | {unit} | " + " | ".join(cell(x) for x in sums) + " |")
    return "\n".join(lines)


def workers_table(results: dict[str, Any]) -> str:
    """hubproxy --workers N on the cores given; ratios to the first setup (1 worker)."""
    setups = {k: d for k, d in results.get("workers", {}).items() if d["runs"]}
    if not setups:
        return ""
    head = ["setup", "keep-alive req/s", "vs 1 worker", "CPU per request (us)"]
    head += ["new connection req/s", "vs 1 worker", "CPU per request (us)", "load core busy"]
    head += ["busiest worker's CPU share"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base: dict[str, Summary | None] = {}
    for label, data in setups.items():
        row = [label]
        for step, prefix in (("keepalive", "ka"), ("close", "close")):
            rps = summarize(data["runs"], Metric(f"{prefix}_rps", "", "", step))
            cpu = summarize(data["runs"], Metric(f"{prefix}_cpu_us", "", "", step))
            first = base.setdefault(step, rps)
            ratio = fmt(rps.median / first.median) if rps and first and first.median else "—"
            row += [cell(rps), ratio, cell(cpu)]
        busy = [
            float(r["steps"]["keepalive"]["load_core_util"])
            for r in data["runs"]
            if "keepalive" in r["steps"]
        ]
        row.append(f"{statistics.median(busy):.0%}" if busy else "—")
        share = summarize(data["runs"], Metric("ka_busiest_worker_share", "", "", "keepalive"))
        row.append(f"{share.median:.0%} of {data['workers']}" if share else "—")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def floor_notes(results: dict[str, Any]) -> list[str]:
    """What the floor says about the CPU-per-unit targets, in numbers."""
    floors = results.get("floors", {})
    relay = next((n for n in ("c-relay", "socat") if floors.get(n, {}).get("runs")), None)
    if relay is None:
        return []
    out = []
    for key, what, target in (
        ("ws_cpu_us", "a WebSocket message", "WebSocket"),
        ("ka_cpu_us", "a keep-alive request", "keep-alive"),
    ):
        step = "websocket" if key.startswith("ws") else "keepalive"
        m = Metric(key, "", "", step)
        floor = summarize(floors[relay]["runs"], m)
        kernel = summarize(floors[relay]["runs"], Metric(key.replace("cpu", "sys"), "", "", step))
        chp = summarize(results["proxies"].get(BASELINE, {"runs": []})["runs"], m)
        if not floor or not chp:
            continue
        text = (
            f"{target} target (<= 0.5x CHP's CPU per unit): {0.5 * chp.median:.1f} us for "
            f"{what}; {relay} spends {floor.median:.1f} us"
            + (f" ({kernel.median:.1f} in the kernel)" if kernel else "")
            + f", {floor.median / chp.median:.2f}x CHP"
        )
        for name, data in results["proxies"].items():
            mine = summarize(data["runs"], m)
            if name != BASELINE and mine:
                text += f", {name} {mine.median:.1f} us ({mine.median / floor.median:.2f}x {relay})"
        out.append(text + ".")
    return out


def failures(results: dict[str, Any]) -> list[str]:
    out = []
    groups = list(results["proxies"].items())
    groups += [(f"floor {n}", d) for n, d in results.get("floors", {}).items()]
    groups += list(results.get("workers", {}).items())
    for name, data in groups:
        if data.get("skipped"):
            out.append(f"{name}: skipped: {data['skipped']}")
        for i, run in enumerate(data["runs"]):
            if run["error"]:
                lines = run["error"].splitlines()
                detail = "; ".join(x.strip() for x in lines[1:4])
                log = f" (log: {detail})" if detail else ""
                out.append(f"{name} run {i + 1}: {lines[0]}{log}")
            for step, err in run["errors"].items():
                out.append(f"{name} run {i + 1}, {step}: {err.splitlines()[0][:200]}")
    return out


def console(results: dict[str, Any]) -> str:
    parts = [table(results), "", "median of the runs whose step was quiet; * = noisy in all runs"]
    parts += [""]
    parts += [bottleneck_table(results)]
    soak = soak_table(results)
    if soak:
        parts += ["", f"Soak (RSS may grow less than {SOAK_RSS_PCT:g}%):", soak]
    floor = floor_table(results)
    if floor:
        parts += ["", "Byte-relay floor (no HTTP work; not a competitor):", floor]
        parts += floor_notes(results)
    workers = workers_table(results)
    if workers:
        parts += ["", "hubproxy --workers N:", workers]
    fails = failures(results)
    if fails:
        parts += ["", "Failures:", *(f"- {f}" for f in fails)]
    return "\n".join(parts)


def markdown(results: dict[str, Any], chart_name: str) -> str:
    mach, ver, mode = results["machine"], results["versions"], results["mode"]
    fails = failures(results)
    lines = [
        "# Benchmarks: hubproxy vs Node configurable-http-proxy",
        "",
        "Generated by `bench/` (do not edit by hand). Command:",
        "",
        f"    {results['command']}",
        "",
        f"Run {results['started']}, mode `{mode['name']}`: each figure is the median of "
        f"{mode['runs']} run(s) (min–max in brackets), {mode['duration']:g} s per load step, "
        f'{mode["routes"]:,} routes for the "N routes" rows.',
        "",
        "## Machine and versions",
        "",
        *(f"- {k}: {v}" for k, v in {**mach, **ver}.items()),
        "",
        "## Results",
        "",
        table(results),
        "",
        "A figure is the median over the runs in which its step was quiet; `*` = noisy in every "
        "run: processes the bench did not start used more than 10% of a core (or the hypervisor "
        "stole time) during that step, so rerun on a quiet machine before trusting it (the "
        "CPU-per-unit figures suffer least).",
        "",
        f"![benchmarks]({chart_name})",
        "",
        "## Who was the bottleneck",
        "",
        "Proxy CPU is the proxy's own utime+stime over the step's wall time (it has one core). "
        "Load side CPU is that of wrk, the backend and the bench's own WebSocket and API "
        "clients, all pinned to core 1; load core busy is core 1 as /proc/stat sees it (anyone's "
        "work). `bound` is `proxy` above 90% proxy CPU, `load` when the load side is above 85% "
        "while the proxy is not (then throughput is the load generator's limit and only the "
        "CPU-per-unit figures compare the proxies), `contended` when neither is saturated but "
        "other processes took CPU: then only the CPU-per-unit figures mean much.",
        "",
        bottleneck_table(results),
        "",
    ]
    soak = soak_table(results)
    if soak:
        lines += [
            "## Soak",
            "",
            f"First run only, last step of the load process: at least {mode['soak_requests']:,} "
            f"small keep-alive requests (wrk, {mode['conns']} connections, run again until the "
            f"count is reached), then {mode['soak_ws']:,} WebSocket open/close cycles "
            f"({mode['soak_ws_sockets']} at a time; half closed by the client, half by a close "
            "frame the backend answers by hanging up). The baseline is read after a warm-up doing "
            "the same on a smaller scale, once the proxy has no client connection and its fds "
            "are steady; "
            "afterwards the fds are polled until back. Open fds are /proc/PID/fd of the process "
            "tree; connections to the backend may stay up to the load's concurrency (an idle "
            "keep-alive pool is reused, not leaked), anything else must be back exactly. "
            f"RSS must grow by less than {SOAK_RSS_PCT:g}% of the baseline (a heap's noise "
            "grows with the heap; at full counts this still catches a leak of a few bytes per "
            "request).",
            "",
            soak,
            "",
        ]
    floor = floor_table(results)
    if floor:
        lines += [
            "## Byte-relay floor",
            "",
            "What relaying the same bytes costs on this machine with no HTTP or WebSocket work "
            "at all: a relay in front of the backend, pinned to the proxy's core, measured by "
            "the same keep-alive and WebSocket echo steps in the same run. Not a competitor: a "
            "floor. `c-relay` is `bench/relay.c` (one thread, epoll, one read() and one write() "
            "per event, TCP_NODELAY); `socat` forks a process per connection (their CPU counts: "
            "the process tree's, reaped children included). On loopback the kernel's receive "
            "path of the far end runs in the sender's system call, so most of this is kernel "
            "time any proxy pays.",
            "",
            floor,
            "",
            *(f"- {n}" for n in floor_notes(results)),
            "",
        ]
    workers = workers_table(results)
    if workers:
        lines += [
            "## Workers",
            "",
            "hubproxy alone, with `--workers N` (docs/workers.md), on the cores given "
            "(`taskset`), measured by the keep-alive and new-connection steps in the same run; "
            "CPU per request is the whole process tree's (the primary and its workers). The "
            "load side (wrk, the backend) keeps its core. A machine with a core to spare per "
            "worker shows how far requests/s follow the cores; on a 2-core machine only one "
            "core is spare, so the last setup gives the workers both cores while wrk and the "
            "backend use one of them too: its requests/s are what such a machine can do, not "
            "the workers' limit. The busiest worker's share of the workers' CPU during the "
            "keep-alive step shows how evenly SO_REUSEPORT spread the 50 connections (50% of 2 "
            "is even).",
            "",
            workers,
            "",
        ]
    lines += [
        "## Method",
        "",
        "- The proxy runs alone on core 0 (`taskset -c 0`); the backend (uvloop + httptools, "
        "`bench/backend.py`), wrk and the bench's clients run on core 1. Loopback only.",
        "- Each run starts the proxy with CHP's CLI (`--default-target` to the backend) twice: "
        "a first process for idle RSS and idle WebSockets (thousands of sockets grow a "
        "runtime's heap for good: Node CHP is then about 30% slower per request), then a fresh "
        "one for keep-alive, API add, keep-alive again with the big table, API GET all, API "
        "DELETE of the N routes and keep-alive once more with 1 route (the N-routes ratio is "
        "taken against the mean of the two 1-route figures, so that a drift of the machine or "
        "the process over those steps does not pass for the table's cost), new connection per "
        "request (`Connection: close`), 1 MiB, WebSocket echo, API latency under load, in that "
        "order.",
        f"- Small = 13-byte body. wrk: one thread, {mode['conns']} connections "
        f"({mode['big_conns']} for 1 MiB), `--latency`.",
        "- WebSocket message = one 32-byte frame sent and its echo received (ping-pong on each "
        "socket). Idle WebSockets: handshaken and silent, on the fresh process; RSS read 1 s "
        'after opening N, and again after N more: "per 1,000 more" is that second increment '
        "(the first also pays for a runtime's heap growth).",
        "- API add: sequential POSTs over one keep-alive connection. GET all: median of several. "
        "Under load: alternate POST/DELETE of a route, each on a fresh connection every 20 ms, "
        "while wrk saturates the data plane.",
        "- CPU per unit = proxy utime+stime from /proc/PID/stat (whole process tree, reaped "
        "children included) over the "
        "step, divided by requests, MiB or messages.",
    ]
    if fails:
        lines += ["", "## Failures", "", *(f"- {f}" for f in fails)]
    return "\n".join(lines) + "\n"


CHART_TITLES = {
    "ka_cpu_us": "keep-alive: proxy CPU per request",
    "ka_p99_ms": "keep-alive: latency p99",
    "big_cpu_ms": "1 MiB: proxy CPU per MiB",
    "ws_cpu_us": "WebSocket: proxy CPU per message",
    "ws_idle_mib_per_1000": "RSS per 1,000 more idle WebSockets",
    "routes_ratio": "keep-alive, {n} routes / 1 route",
    "api_load_p99_ms": "API p99, data plane saturated",
}


def chart_title(m: Metric, mode: dict[str, Any]) -> str:
    label = CHART_TITLES.get(m.key, m.label.strip())
    return label.format(**label_args(mode))


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["proxies"])
    by_key = {m.key: m for m in METRICS}
    cols = 4
    rows = (len(CHART) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows))
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"]
    for ax, key in zip(axes.flat, CHART, strict=False):
        m = by_key[key]
        sums = [summarize(results["proxies"][n]["runs"], m) for n in names]
        meds = [s.median if s else 0.0 for s in sums]
        errs = [
            [s.median - s.low if s else 0.0 for s in sums],
            [s.high - s.median if s else 0.0 for s in sums],
        ]
        ax.bar(names, meds, yerr=errs, color=colors[: len(names)], capsize=3)
        ax.set_title(f"{chart_title(m, results['mode'])} ({m.unit})", fontsize=9)
        ax.tick_params(labelsize=8)
        for x, v in enumerate(meds):
            ax.annotate(fmt(v), (x, v), ha="center", va="bottom", fontsize=8)
        ax.set_ylim(0, max([*meds, *(s.high for s in sums if s)], default=1) * 1.18 or 1)
    for ax in list(axes.flat)[len(CHART) :]:
        ax.axis("off")
    fig.suptitle(f"hubproxy bench ({results['mode']['name']}, {results['started']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)

"""The hub day's figures: the end-state table, CSV files and time-series charts.

``summarize`` reads what ``bench.hubday.run`` returned; ``markdown`` and ``console`` print the
table; ``write_csv`` and ``charts`` write files (matplotlib is imported only by ``charts``).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

STATES = ("ESTABLISHED", "TIME_WAIT", "CLOSE_WAIT")
SIDES = {"proxy_target": "toward targets", "proxy_client": "toward clients", "proxy_api": "API"}
COLORS = {"chp": "tab:orange", "hubproxy": "tab:blue"}
KINDS = ("req", "ws", "api_get", "api_post", "api_delete", "dead", "dead_ws", "download", "upload")
STYLES = {"ESTABLISHED": "-", "TIME_WAIT": "--", "CLOSE_WAIT": ":"}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (t, y): units of y per second."""
    if len(points) < 3:
        return math.nan
    mt = _mean([t for t, _ in points])
    my = _mean([y for _, y in points])
    den = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (y - my) for t, y in points) / den if den else math.nan


def _state(sample: dict[str, Any], side: str, state: str) -> int:
    return int(sample.get("tcp", {}).get(side, {}).get(state, 0))


def summarize(day: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per proxy: the figures of the end-state table (see docs/hub-day.md)."""
    load_s = float(day["mode"]["load_s"])
    out: dict[str, dict[str, Any]] = {}
    for name, p in day["proxies"].items():
        samples = [s for s in p["samples"] if "rss" in s]
        totals = p["totals"]
        row: dict[str, Any] = {"error": p.get("error")}
        if samples:
            idle = [s for s in samples if s["t"] < 0] or samples[:1]
            load = [s for s in samples if 0 <= s["t"] < load_s] or samples
            half = [s for s in load if s["t"] >= load_s / 2] or load
            end = [s for s in load if s["t"] >= load_s - 10] or load[-1:]
            last = samples[-1]
            seconds = [r for r in p["seconds"] if load_s / 2 <= r["t"] < load_s]
            active = _mean([r["active"] for r in seconds]) if seconds else math.nan
            cpu_util = (
                (half[-1]["cpu"] - half[0]["cpu"]) / (half[-1]["t"] - half[0]["t"])
                if len(half) > 1 and half[-1]["t"] > half[0]["t"]
                else math.nan
            )
            rss_idle = sorted(s["rss"] for s in idle)[len(idle) // 2]
            rss_half = _mean([s["rss"] for s in half])
            row |= {
                "rss_idle": rss_idle,
                "rss_end": _mean([s["rss"] for s in end]),
                "rss_peak": max(s["hwm"] for s in samples),
                "rss_after": last["rss"],
                "growth_mib_h": slope([(s["t"], s["rss"]) for s in half]) * 3600,
                "half_s": (half[-1]["t"] - half[0]["t"]) if half else 0.0,
                "fds_idle": idle[-1]["fds"],
                "fds_end": end[-1]["fds"],
                "fds_max": max(s["fds"] for s in samples),
                "fds_after": last["fds"],
                "eph_max": max(s["eph_ports"] for s in samples),
                "eph_end": end[-1]["eph_ports"],
                "active_half": active,
                "active_max": max((r["active"] for r in p["seconds"]), default=0),
                "cpu_util_half": cpu_util,
                "cpu_per_100": cpu_util / active * 100 if active else math.nan,
                "mib_per_100": (rss_half - rss_idle) / active * 100 if active else math.nan,
                "cpu_total_s": last["cpu"] - idle[0]["cpu"],
            }
            for side in SIDES:
                for state in STATES:
                    key = f"{side}:{state}"
                    row[f"{key}:end"] = _state(end[-1], side, state)
                    row[f"{key}:max"] = max(_state(s, side, state) for s in samples)
                    row[f"{key}:after"] = _state(last, side, state)
            for end_name in ("client_end", "hub_end", "target_end"):
                row[f"{end_name}:TIME_WAIT:max"] = max(
                    _state(s, end_name, "TIME_WAIT") for s in samples
                )
        lat = totals["latency"]
        for kind in KINDS:
            row[f"lat:{kind}"] = lat.get(kind, {"n": 0})
        row["errors"] = totals["errors"]
        row["expected"] = totals["expected"]
        row["counts"] = totals["counts"]
        row["first_errors"] = totals.get("first_errors", {})
        polls = p["polls"]
        row["routes_max"] = max((r for _, _, r in polls), default=0)
        out[name] = row
    return out


def _f(value: Any, fmt: str = ".1f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, fmt)


def _lat(row: dict[str, Any], kind: str, keys: tuple[str, ...] = ("p50", "p99", "max")) -> str:
    """p50 / p99 / worst in ms (downloads and uploads in s)."""
    lat = row.get(f"lat:{kind}", {"n": 0})
    if not lat.get("n"):
        return "–"
    div = 1e3 if kind in ("download", "upload") else 1.0
    cells = []
    for key in keys:
        value = lat[f"{key}_ms"] / div
        cells.append(_f(value, ".0f" if value >= 100 else ".1f" if value >= 1 else ".2f"))
    return " / ".join(cells)


def _kinds(counter: dict[str, int]) -> str:
    if not counter:
        return "0"
    return ", ".join(f"{k} {v:,}" for k, v in sorted(counter.items(), key=lambda kv: -kv[1]))


def _slash(row: dict[str, Any], *keys: str) -> str:
    return " / ".join(str(row[k]) for k in keys) if all(k in row for k in keys) else "–"


def cells(day: dict[str, Any], r: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, cell) of one proxy's column of the end-state table."""
    m = day["mode"]
    out = [
        ("RSS idle, MiB", _f(r.get("rss_idle"))),
        ("RSS at the end of the day (last 10 s), MiB", _f(r.get("rss_end"))),
        ("peak RSS (VmHWM), MiB", _f(r.get("rss_peak"))),
        (
            "RSS growth over the second half of the day, extrapolated, MiB per hour",
            _f(r.get("growth_mib_h"), "+.1f"),
        ),
        (f"RSS {m['cooldown_s']:.0f} s after the last user left, MiB", _f(r.get("rss_after"))),
        (
            "open fds: idle / end of day / max / after",
            _slash(r, "fds_idle", "fds_end", "fds_max", "fds_after"),
        ),
    ]
    for side, label in SIDES.items():
        for state in STATES:
            k = f"{side}:{state}"
            out.append(
                (
                    f"sockets {label}, {state}: end / max / after",
                    _slash(r, *(f"{k}:{w}" for w in ("end", "max", "after"))),
                )
            )
    out += [
        ("ephemeral ports held toward targets: end / max", _slash(r, "eph_end", "eph_max")),
        (
            "TIME_WAIT at the other ends, max: users / hub (API calls) / servers",
            _slash(r, *(f"{e}:TIME_WAIT:max" for e in ("client_end", "hub_end", "target_end"))),
        ),
        ("errors (live servers), by kind", _kinds(r["errors"])),
        ("dead servers' requests (expected), by kind", _kinds(r["expected"])),
        ("requests answered (pages, static, API polls)", f"{r['lat:req'].get('n', 0):,}"),
        ("request latency p50 / p99 / worst, ms", _lat(r, "req")),
        ("kernel message round trip p50 / p99 / worst, ms", _lat(r, "ws")),
        ("dead server, error page (HTTP) p50 / p99 / worst, ms", _lat(r, "dead")),
        ("dead server, WebSocket refused p50 / p99 / worst, ms", _lat(r, "dead_ws")),
        (
            f"{m['download_mib']} MiB downloads: done, p50 / worst s",
            f"{r['lat:download'].get('n', 0)}, {_lat(r, 'download', ('p50', 'max'))}",
        ),
        (
            f"{m['upload_s']:.0f} s uploads: whole / planned, worst s",
            f"{r['lat:upload'].get('n', 0)} / {day['uploads_planned']}, "
            f"{_lat(r, 'upload', ('max',))}",
        ),
        ("GET /api/routes p50 / p99 / worst, ms", _lat(r, "api_get")),
        ("POST route p50 / p99 / worst, ms", _lat(r, "api_post")),
        ("DELETE route p50 / p99 / worst, ms", _lat(r, "api_delete")),
        (
            "active users: mean (second half) / max",
            f"{_f(r.get('active_half'), '.0f')} / {r.get('active_max', '–')}",
        ),
        ("proxy CPU, second half, % of a core", _f(r.get("cpu_util_half", math.nan) * 100)),
        ("CPU per 100 active users, % of a core", _f(r.get("cpu_per_100", math.nan) * 100)),
        ("memory per 100 active users (above idle), MiB", _f(r.get("mib_per_100"))),
    ]
    return out


def markdown(day: dict[str, Any]) -> str:
    rows = summarize(day)
    names = list(rows)
    columns = [cells(day, r) for r in rows.values()]
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for i, (label, _) in enumerate(columns[0] if columns else []):
        lines.append(f"| {label} | " + " | ".join(c[i][1] for c in columns) + " |")
    for name, row in rows.items():
        if row.get("error"):
            lines.append(f"\n{name}: {row['error'].splitlines()[0]}")
    return "\n".join(lines) + "\n"


def console(day: dict[str, Any]) -> str:
    m = day["mode"]
    head = (
        f"hub day ({m['name']}): {m['users']} users, {m['load_s']:.0f} s, "
        f"{day['sessions']} server starts ({day['dead_sessions']} died), "
        f"{day['wall_s']:.0f} s wall"
    )
    if day.get("error"):
        head += f"\n  failed: {day['error']}"
    return head + "\n" + markdown(day)


def problems(day: dict[str, Any]) -> list[str]:
    """What makes a day fail --strict: it did not finish, a proxy failed, unexpected errors,
    samples missing, an upload that did not arrive whole."""
    out = []
    if day.get("error"):
        out.append(f"hub day: {day['error']}")
    for name, row in summarize(day).items():
        p = day["proxies"][name]
        if row.get("error"):
            out.append(f"{name}: {row['error'].splitlines()[0]}")
        if row["errors"]:
            out.append(f"{name}: errors {row['errors']}")
        if len(p["samples"]) < day["mode"]["load_s"] / 2:
            out.append(f"{name}: {len(p['samples'])} samples")
        if row["lat:upload"].get("n", 0) < day["uploads_planned"]:
            out.append(
                f"{name}: {row['lat:upload'].get('n', 0)} uploads of {day['uploads_planned']}"
            )
    return out


# -- files ----------------------------------------------------------------------------------------
def write_csv(day: dict[str, Any], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    ends = (*SIDES, "client_end", "hub_end", "target_end")
    kept = ("ESTABLISHED", "TIME_WAIT", "CLOSE_WAIT", "FIN_WAIT2", "LAST_ACK")
    cols = [f"{end}:{state}" for end in ends for state in kept]
    samples = folder / "samples.csv"
    with samples.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t", "proxy", "rss_mib", "hwm_mib", "fds", "cpu_s", "eph_ports", *cols])
        for name, p in day["proxies"].items():
            for s in p["samples"]:
                if "rss" not in s:
                    continue
                states = [s["tcp"].get(c.split(":")[0], {}).get(c.split(":")[1], 0) for c in cols]
                w.writerow([s["t"], name, round(s["rss"], 2), round(s["hwm"], 2), s["fds"],
                            round(s["cpu"], 3), s["eph_ports"], *states])  # fmt: skip
    seconds = folder / "seconds.csv"
    with seconds.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t", "proxy", "active", "dead", "routes", "requests", "ws_messages",
                    "errors", "expected", "req_p50_ms", "req_p99_ms", "ws_p99_ms"])  # fmt: skip
        for name, p in day["proxies"].items():
            for r in p["seconds"]:
                lat = r.get("lat", {})
                w.writerow([r["t"], name, r["active"], r["dead"], r["routes"],
                            r["n"].get("req", 0), r["n"].get("ws", 0), sum(r["errors"].values()),
                            sum(r["expected"].values()),
                            _f(lat.get("req", {}).get("p50_ms"), ".2f"),
                            _f(lat.get("req", {}).get("p99_ms"), ".2f"),
                            _f(lat.get("ws", {}).get("p99_ms"), ".2f")])  # fmt: skip
    polls = folder / "polls.csv"
    with polls.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t", "proxy", "get_routes_ms", "routes"])
        for name, p in day["proxies"].items():
            for t, s, n in p["polls"]:
                w.writerow([round(t, 3), name, round(s * 1e3, 2), n])
    return [samples, seconds, polls]


def charts(day: dict[str, Any], folder: Path, dpi: int = 80) -> list[Path]:
    """memory.png, fds.png, sockets.png, latency.png: both proxies on the same axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    m = day["mode"]
    minutes = m["load_s"] >= 300
    scale, unit = (60.0, "min") if minutes else (1.0, "s")
    proxies = day["proxies"]
    title = f"{m['users']} users, {m['load_s'] / scale:.0f} {unit}"
    written: list[Path] = []

    def xs(rows: list[dict[str, Any]]) -> list[float]:
        return [r["t"] / scale for r in rows]

    def finish(fig: Any, ax: Any, name: str, ylabel: str) -> None:
        for a in ax if isinstance(ax, list | tuple) else [ax]:
            a.axvline(m["load_s"] / scale, color="grey", lw=0.8, ls="--")
            a.grid(alpha=0.3)
            a.set_xlabel(f"time ({unit}); dashed line: the last users leave")
        if ylabel:
            (ax[0] if isinstance(ax, list | tuple) else ax).set_ylabel(ylabel)
        fig.tight_layout()
        path = folder / name
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        written.append(path)

    def samples(p: dict[str, Any]) -> list[dict[str, Any]]:
        return [s for s in p["samples"] if "rss" in s]

    # memory, with the active users behind
    fig, ax = plt.subplots(figsize=(9, 4))
    for name, p in proxies.items():
        ss = samples(p)
        ax.plot(xs(ss), [s["rss"] for s in ss], color=COLORS.get(name), label=f"{name} RSS")
    ax.set_ylim(bottom=0)
    first = next(iter(proxies.values()))
    twin = ax.twinx()
    twin.fill_between(xs(first["seconds"]), [r["active"] for r in first["seconds"]],
                      color="grey", alpha=0.15, step="post", label="active users")  # fmt: skip
    twin.set_ylabel("active users")
    twin.set_ylim(bottom=0)
    ax.set_zorder(twin.get_zorder() + 1)
    ax.patch.set_visible(False)
    lines = ax.get_legend_handles_labels()
    extra = twin.get_legend_handles_labels()
    ax.legend(lines[0] + extra[0], lines[1] + extra[1], loc="upper left", fontsize=8)
    ax.set_title(f"Proxy memory (RSS of the process tree), {title}")
    finish(fig, ax, "memory.png", "MiB")

    fig, ax = plt.subplots(figsize=(9, 4))
    for name, p in proxies.items():
        ss = samples(p)
        ax.plot(xs(ss), [s["fds"] for s in ss], color=COLORS.get(name), label=name)
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"Open file descriptors of the proxy, {title}")
    finish(fig, ax, "fds.png", "fds")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    for ax, side in zip(axes, ("proxy_target", "proxy_client"), strict=True):
        for name, p in proxies.items():
            ss = samples(p)
            for state in STATES:
                ax.plot(xs(ss), [_state(s, side, state) for s in ss], color=COLORS.get(name),
                        ls=STYLES[state], lw=1.2, label=f"{name} {state}")  # fmt: skip
        ax.set_title(f"the proxy's sockets {SIDES[side]}", fontsize=10)
        ax.set_ylim(bottom=0)
    axes[0].legend(loc="upper left", fontsize=7)
    fig.suptitle(f"TCP sockets by state (the proxy's end), {title}", fontsize=11)
    finish(fig, list(axes), "sockets.png", "sockets")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, p in proxies.items():
        rows = [r for r in p["seconds"] if r.get("lat", {}).get("req", {}).get("n")]
        color = COLORS.get(name)
        axes[0].plot(xs(rows), [r["lat"]["req"]["p50_ms"] for r in rows], color=color,
                     lw=1, label=f"{name} p50")  # fmt: skip
        axes[0].plot(xs(rows), [r["lat"]["req"]["p99_ms"] for r in rows], color=color,
                     lw=1, ls="--", label=f"{name} p99")  # fmt: skip
        polls = p["polls"]
        axes[1].plot([t / scale for t, _, _ in polls], [s * 1e3 for _, s, _ in polls],
                     color=color, lw=0.8, marker=".", ms=2, label=name)  # fmt: skip
    window = m["lat_window"]
    axes[0].set_title(f"requests (pages, static, API polls), per {window} s", fontsize=10)
    axes[0].set_yscale("log")
    axes[1].set_title(f"the hub's GET /api/routes, every {m['api_poll_s']:g} s", fontsize=10)
    axes[1].set_ylim(bottom=0)
    for ax in axes:
        ax.legend(loc="upper left", fontsize=7)
    fig.suptitle(f"Latency, {title}", fontsize=11)
    finish(fig, list(axes), "latency.png", "ms")
    return written

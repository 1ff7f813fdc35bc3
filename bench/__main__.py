"""python -m bench: compare proxies side by side; see ``--help``."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import deps, hubday, hubday_report, report
from bench.config import MODES, REPO, RESULTS, known_floors, known_proxies, mode_for, parse_extra
from bench.runner import machine_info, raise_fd_limit, run_all, versions

EPILOG = """modes:
  (default)  full: 3 runs per proxy, 10 s per load step, 10,000 routes (about 70 s a run)
  --quick    1 run, 3 s per step, 2,000 routes: under 2 minutes for two proxies
  --smoke    1 run, 1 s steps, tiny counts: proves the harness runs end to end (CI)
Each mode ends the first run of each proxy with a soak (full: 1,000,000 requests and 100,000
WebSocket opens/closes; quick: 100,000 and 5,000) and measures byte-relay floors (--floors).
Then a day at a busy hub, all proxies side by side (full: 300 users, 20 minutes; quick: 100
users, 3 minutes; smoke: 12 users, 15 s): --no-hub-day skips it, --hub-day only runs it alone.

Raw results go to bench/results/<time>-<mode>.json; docs/benchmarks.md and .png are written
only with --write-docs. A proxy that does not start is reported as failed; the others go on.
"""


def write_docs(results: dict[str, Any], docs_dir: Path) -> None:
    docs_dir.mkdir(parents=True, exist_ok=True)
    png = docs_dir / "benchmarks.png"
    (docs_dir / "benchmarks.md").write_text(report.markdown(results, png.name))
    if deps.ensure_matplotlib():
        report.chart(results, png)
    else:
        print("matplotlib missing: no chart written")
    print(f"wrote {docs_dir / 'benchmarks.md'} and {png}")


def write_hub_day_docs(day: dict[str, Any], docs_dir: Path) -> None:
    """docs/hub-day/*.png (the text of docs/hub-day.md is written by hand around the table that
    the console prints)."""
    if deps.ensure_matplotlib():
        paths = hubday_report.charts(day, docs_dir / "hub-day")
        print("wrote " + ", ".join(str(p) for p in paths))
    else:
        print("matplotlib missing: no hub day chart written")


def hub_day_files(day: dict[str, Any]) -> None:
    """CSV beside the day's JSON, and the charts when matplotlib is there (never installed
    for this: the step runs without it)."""
    folder = Path(day["dir"])
    hubday_report.write_csv(day, folder)
    try:
        hubday_report.charts(day, folder)
    except ImportError:
        print(f"matplotlib missing: hub day charts not drawn ({folder} has the CSV)")


def main(argv: list[str] | None = None) -> int:
    known = known_proxies()
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark hubproxy against Node configurable-http-proxy on this machine.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--proxies",
        default="chp,hubproxy",
        help=f"comma-separated, from {', '.join(known)} and --proxy-cmd names; "
        "default: %(default)s",
    )
    parser.add_argument(
        "--proxy-cmd",
        action="append",
        default=[],
        metavar="NAME=COMMAND",
        help="another proxy taking CHP's CLI, e.g. 'hp2=python -m hubproxy --workers 2'",
    )
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument("--quick", action="store_true", help="1 run, short steps")
    speed.add_argument("--smoke", action="store_true", help="seconds, tiny counts (CI)")
    parser.add_argument("--runs", type=int, help="runs per proxy (median of them)")
    parser.add_argument(
        "--floors",
        metavar="LIST",
        help="byte relays measured as a floor (keepalive and websocket only), from "
        f"{', '.join(known_floors())}, or 'none'; default: c-relay,socat (smoke: c-relay)",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="before each measured step, wait up to S seconds for other processes to go quiet",
    )
    parser.add_argument(
        "--retry-noisy",
        type=int,
        default=0,
        metavar="N",
        help="measure a step again (at most N times) when other processes disturbed it",
    )
    parser.add_argument(
        "--hub-day",
        nargs="?",
        const="on",
        choices=["on", "only"],
        default="on",
        help="the day at a busy hub, after the runs (default: on); 'only': run it alone",
    )
    parser.add_argument(
        "--no-hub-day", dest="hub_day", action="store_const", const="off", help="skip it"
    )
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help="write docs/benchmarks.md/.png (and docs/hub-day/*.png for a hub day)",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 unless every proxy ran every step without error (CI's smoke)",
    )
    parser.add_argument("--docs-dir", type=Path, default=REPO / "docs", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS, help="raw results folder")
    parser.add_argument(
        "--report",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="do not run: report on raw results file(s) of one mode, their runs pooled; "
        "with --write-docs, write the docs from them",
    )
    args = parser.parse_args(argv)
    if args.report:
        try:
            results = report.pool([json.loads(p.read_text()) for p in args.report])
        except ValueError as exc:
            parser.error(str(exc))
        if any(p["runs"] for p in results.get("proxies", {}).values()):
            print(report.console(results))
            if args.write_docs:
                write_docs(results, args.docs_dir)
        if results.get("hub_day"):
            print(hubday_report.console(results["hub_day"]))
            if args.write_docs:
                write_hub_day_docs(results["hub_day"], args.docs_dir)
        return 0

    try:
        extra = {spec.name: spec for spec in map(parse_extra, args.proxy_cmd)}
    except ValueError as exc:
        parser.error(str(exc))
    available = known | extra
    names = [n.strip() for n in args.proxies.split(",") if n.strip()]
    names += [n for n in extra if n not in names]
    unknown = [n for n in names if n not in available]
    if unknown or not names:
        parser.error(f"unknown proxy {unknown}; choose from {', '.join(available)}")
    mode = mode_for("smoke" if args.smoke else "quick" if args.quick else "full", args.runs)
    assert mode.name in MODES
    floor_names = list(mode.floors) if args.floors is None else [
        n.strip() for n in args.floors.split(",") if n.strip() and n.strip() != "none"
    ]  # fmt: skip
    floors_known = known_floors()
    if [n for n in floor_names if n not in floors_known]:
        parser.error(f"unknown floor in {args.floors!r}; choose from {', '.join(floors_known)}")

    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    specs = [available[n] for n in names]
    if args.hub_day == "only":
        raise_fd_limit()
        deps.ensure_python({"uvloop": "uvloop", "httptools": "httptools"})
        if any(s.name == "chp" for s in specs) and not deps.ensure_chp():
            print("warning: Node CHP could not be installed; it will fail to start", flush=True)
        results = {
            "command": command.strip(),
            "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "mode": mode.__dict__,
            "machine": machine_info(),
            "versions": versions(specs),
            "proxies": {},
        }
    else:
        results = run_all(
            specs,
            mode,
            command.strip(),
            args.out,
            args.wait_quiet,
            args.retry_noisy,
            [floors_known[n] for n in floor_names],
        )
    if args.hub_day in ("on", "only"):
        m = hubday.DAY_MODES[mode.name]
        print(f"[hub day] {', '.join(names)} side by side, {m.users} users, {m.load_s:.0f} s ...",
              flush=True)  # fmt: skip
        t_day = time.perf_counter()
        results["hub_day"] = hub = hubday.run(specs, mode.name, args.out)
        hub_day_files(hub)
        print(f"[hub day] {'ok' if not hub['error'] else hub['error']} "
              f"[{time.perf_counter() - t_day:.0f} s]", flush=True)  # fmt: skip
    results["elapsed_s"] = time.perf_counter() - t0

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    raw = args.out / f"{stamp}-{mode.name}.json"
    raw.write_text(json.dumps(results, indent=1))
    print()
    runs = [(name, r) for name, p in results["proxies"].items() for r in p["runs"]]
    if runs:
        print(report.console(results))
    day: dict[str, Any] | None = results.get("hub_day")
    if day:
        print(hubday_report.console(day))
        print(f"hub day files: {day['dir']}")
    print(f"\nraw results: {raw}  ({results['elapsed_s']:.0f} s)")

    if args.write_docs:
        if runs:
            write_docs(results, args.docs_dir)
        if day:
            write_hub_day_docs(day, args.docs_dir)
    if args.strict:
        floor_runs = [(f"floor {n}", r) for n, f in results.get("floors", {}).items()
                      for r in f["runs"]]  # fmt: skip
        bad = sorted({name for name, r in runs + floor_runs if not r["ok"] or r.get("errors")})
        if bad:
            print(f"--strict: failed or incomplete runs of {', '.join(bad)}", file=sys.stderr)
            return 1
        day_problems = hubday_report.problems(day) if day else []
        if day_problems:
            print("--strict: hub day: " + "; ".join(day_problems), file=sys.stderr)
            return 1
    if day and not runs:
        return 0 if not day["error"] and not any(p["error"] for p in day["proxies"].values()) else 1
    return 0 if any(r["ok"] for _, r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())

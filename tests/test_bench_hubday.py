"""The hub day benchmark step (bench/hubday.py), tiny, against hubproxy only: real processes on
loopback (the proxy, the backend, the sampler) on ports the OS hands out, a few seconds.

It checks that the day runs end to end and that what it produces is sane: every kind of sample
for the proxy, the per-second counts, the hub's polls, no unexpected error, the expected ones
from the server that died, the upload that arrived whole, the table and the CSV files.
"""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from bench import hubday, hubday_report
from bench.config import known_proxies
from bench.hubday_sample import ENDS, sort_sockets

TINY = replace(
    hubday.DAY_MODES["smoke"],
    name="test",
    users=4,
    load_s=6,
    idle_s=0.5,
    cooldown_s=1,
    session_s=(2, 4),
    gap_s=(0.5, 1),
    notice_s=(1, 1.5),
    dead_share=0.5,
    ws_every=0.5,
    poll_every=1,
    page_every=2,
    retry_every=0.3,
    download_mib=1,
    upload_s=0.5,
    api_poll_s=0.5,
    error_delay=0.2,
)


@pytest.fixture(scope="module")
def day(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("hubday")
    return hubday.run([known_proxies()["hubproxy"]], "test", out, mode=TINY)


def test_schedule_is_fixed_and_has_every_event() -> None:
    schedule = hubday.build_schedule(TINY)
    assert schedule == hubday.build_schedule(TINY)  # both proxies get the same day
    sessions = [s for user in schedule for s in user]
    assert any(s.dead for s in sessions)
    assert any(s.upload_at is not None for s in sessions)
    assert any(s.download_at is not None for s in sessions)
    for s in sessions:
        assert 0 <= s.start < s.end <= s.notice <= TINY.load_s
        if s.upload_at is not None:
            assert s.upload_at + TINY.upload_s < s.end


def test_sockets_are_sorted_by_whose_end_they_are() -> None:
    proxy = {"port": 8000, "api_port": 8001, "lo": 20000, "hi": 20100}
    table = [
        (8000, 0, "0A"),  # listening: not counted
        (8000, 40000, "01"),  # a user's connection, the proxy's end
        (40000, 8000, "06"),  # ... the user's end, in TIME_WAIT
        (8001, 40001, "06"),  # an API call the proxy closed
        (40002, 20005, "01"),  # the proxy to a server
        (40003, 20005, "06"),  # ... one it closed first
        (20005, 40004, "06"),  # one the server closed first
        (40005, 30000, "01"),  # someone else's
    ]
    ends, ports = sort_sockets(table, proxy)
    assert set(ends) == set(ENDS)
    assert ends["proxy_client"] == {"ESTABLISHED": 1}
    assert ends["client_end"] == {"TIME_WAIT": 1}
    assert ends["proxy_api"] == {"TIME_WAIT": 1}
    assert ends["proxy_target"] == {"ESTABLISHED": 1, "TIME_WAIT": 1}
    assert ends["target_end"] == {"TIME_WAIT": 1}
    assert ports == 2


def test_day_runs_without_errors(day: dict[str, Any]) -> None:
    assert day["error"] is None
    p = day["proxies"]["hubproxy"]
    assert p["error"] is None
    assert p["totals"]["errors"] == {}, p["totals"]["first_errors"]
    assert hubday_report.problems(day) == []
    # the server that died: its user's requests got the hub's error page (503), as expected
    assert sum(p["totals"]["expected"].values()) > 0
    assert p["totals"]["expected"].get("http_503", 0) > 0
    # the hub's calls: its own route and each user server's route added and deleted
    counts = p["totals"]["counts"]
    assert counts["api_post"] == day["sessions"] + 1
    assert counts["api_delete"] == day["sessions"]
    assert counts["upload"] == day["uploads_planned"] >= 1
    assert counts["download"] == day["downloads_planned"] >= 1
    assert counts["ws"] > 0 and counts["req"] > 0 and counts["api_get"] > 0
    assert p["backend"]["uploads"] == day["uploads_planned"]


def test_samples_have_every_kind(day: dict[str, Any]) -> None:
    samples = day["proxies"]["hubproxy"]["samples"]
    assert len(samples) >= TINY.load_s
    assert min(s["t"] for s in samples) < 0 < TINY.load_s < max(s["t"] for s in samples)
    for s in samples:
        assert {"rss", "hwm", "fds", "cpu", "tcp", "eph_ports"} <= set(s)
        assert 10 < s["rss"] <= s["hwm"] < 1024
        assert s["fds"] > 0
        assert set(s["tcp"]) == set(ENDS)
    load = [s for s in samples if 0 < s["t"] < TINY.load_s]
    assert max(s["tcp"]["proxy_client"].get("ESTABLISHED", 0) for s in load) > 0
    assert max(s["tcp"]["proxy_target"].get("ESTABLISHED", 0) for s in load) > 0
    assert max(s["eph_ports"] for s in load) > 0
    assert samples[-1]["cpu"] > samples[0]["cpu"]
    assert day["machine"] and "time_wait" in day["machine"][0]
    seconds = day["proxies"]["hubproxy"]["seconds"]
    assert len(seconds) >= TINY.load_s
    assert max(r["active"] for r in seconds) >= 2
    assert seconds[-1]["active"] == 0 and seconds[-1]["dead"] == 0  # everybody left
    assert any("req" in r.get("lat", {}) for r in seconds)
    polls = day["proxies"]["hubproxy"]["polls"]
    assert len(polls) >= TINY.load_s / TINY.api_poll_s / 2
    assert max(n for _, _, n in polls) >= 2  # the hub's route and a user's


def test_report_and_files(day: dict[str, Any], tmp_path: Path) -> None:
    row = hubday_report.summarize(day)["hubproxy"]
    assert row["rss_idle"] > 0 and row["fds_end"] > 0
    assert 0 <= row["cpu_util_half"] < 1
    assert row["lat:req"]["p50_ms"] <= row["lat:req"]["p99_ms"] <= row["lat:req"]["max_ms"]
    text = hubday_report.markdown(day)
    assert text.startswith("| | hubproxy |")
    assert "GET /api/routes p50 / p99 / worst, ms" in text
    assert "errors (live servers), by kind | 0 |" in text
    paths = hubday_report.write_csv(day, tmp_path)
    with paths[0].open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(day["proxies"]["hubproxy"]["samples"])
    assert {"rss_mib", "fds", "proxy_target:TIME_WAIT", "proxy_client:CLOSE_WAIT"} <= set(rows[0])
    for path in paths:
        assert path.stat().st_size > 0

"""File descriptors: the soft limit raised to the hard one at start, and a warning (at most
once a minute) when the connections come near it, instead of connections silently closed."""

from __future__ import annotations

import logging
import resource
import socket
from collections.abc import Callable

import pytest

from hubproxy.fdlimit import NR_OPEN, OTHERS, WARN_EVERY, FdWatch
from support import Proxy

SOFT, HARD = resource.getrlimit(resource.RLIMIT_NOFILE)


def limited(soft: int, hard: int) -> Callable[[], None]:
    """A preexec: the child starts with these limits (as `ulimit -Sn`/`-Hn` would set them)."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return apply


def soft_limit_of(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise AssertionError("no Max open files line")


@pytest.mark.skipif(HARD < 2048, reason="needs a hard limit of at least 2048")
def test_the_soft_limit_is_raised_to_the_hard_one(start_proxy: Callable[..., Proxy]) -> None:
    hard = min(HARD, NR_OPEN)
    proxy = start_proxy(preexec=limited(1024, hard))
    assert soft_limit_of(proxy.proc.pid) == hard
    assert proxy.request("GET", "/_chp_healthz")[0] == 200


def test_a_low_limit_is_said_at_start_and_connections_near_it_warn(
    start_proxy: Callable[..., Proxy],
) -> None:
    """With 160 descriptors, the start says so; 120 open connections (plus OTHERS) warn once,
    and the proxy serves on once they are gone."""
    proxy = start_proxy(preexec=limited(160, 160))
    proxy.wait_for_line(r"Only 160 file descriptors allowed")
    socks = []
    try:
        for _ in range(120):
            socks.append(socket.create_connection((proxy.host, proxy.port)))
        line = proxy.wait_for_line(r"file descriptors in use \((\d+) connections\)")
        assert int(line.group(1)) + OTHERS >= 160 * 0.9
    finally:
        for sock in socks:
            sock.close()
    assert proxy.request("GET", "/_chp_healthz")[0] == 200
    proxy.stop()
    warnings = [line for line in proxy.output().splitlines() if "descriptors in use" in line]
    assert len(warnings) == 1


def test_the_warning_comes_near_the_limit_and_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    watch = FdWatch(limit=1000)
    with caplog.at_level(logging.WARNING, logger="hubproxy"):
        assert not watch.check(900 - OTHERS - 1, now=0.0)
        assert watch.check(900 - OTHERS, now=1.0)
        assert not watch.check(990, now=1.0 + WARN_EVERY - 0.1)
        assert watch.check(990, now=1.0 + WARN_EVERY)
    said = [r.getMessage().partition(" file")[0] for r in caplog.records]
    assert said == ["About 900 of 1000", "About 1022 of 1000"]

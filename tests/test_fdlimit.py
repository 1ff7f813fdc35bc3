"""File descriptors: the soft limit raised to the hard one at start, and a warning (at most
once a minute) when the connections come near it, instead of connections silently closed."""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import socket
from collections.abc import Callable, Iterator

import pytest

from hubproxy.fdlimit import NR_OPEN, OTHERS, WARN_EVERY, FdWatch
from support import TOKEN, Proxy

SOFT, HARD = resource.getrlimit(resource.RLIMIT_NOFILE)


def limited(soft: int, hard: int) -> Callable[[], None]:
    """A preexec: the child starts with these limits (as `ulimit -Sn`/`-Hn` would set them)."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return apply


@contextlib.contextmanager
def proxy_with(soft: int, hard: int, *args: str) -> Iterator[Proxy]:
    env = {k: v for k, v in os.environ.items() if k != "CONFIGPROXY_AUTH_TOKEN"}
    env["CONFIGPROXY_AUTH_TOKEN"] = TOKEN
    argv = ["--ip", "127.0.0.1", "--port", "0", "--api-ip", "127.0.0.1", "--api-port", "0"]
    proxy = Proxy([*argv, *args], env, TOKEN, preexec=limited(soft, hard))
    try:
        yield proxy
    finally:
        proxy.stop()


def soft_limit_of(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise AssertionError("no Max open files line")


@pytest.mark.skipif(HARD < 2048, reason="needs a hard limit of at least 2048")
def test_the_soft_limit_is_raised_to_the_hard_one() -> None:
    hard = min(HARD, NR_OPEN)
    with proxy_with(1024, hard) as proxy:
        assert soft_limit_of(proxy.proc.pid) == hard
        assert proxy.request("GET", "/_chp_healthz")[0] == 200


def test_a_low_limit_is_said_at_start_and_connections_near_it_warn() -> None:
    """With 160 descriptors, the start says so; 120 open connections (plus OTHERS) warn once,
    and the proxy serves on once they are gone."""
    with proxy_with(160, 160) as proxy:
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

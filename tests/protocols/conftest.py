"""Fixtures of the protocol tests: an in-process proxy whose target connections are fakes, and
the invariants every test must leave true (checked at teardown)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from hubproxy.proxy.pool import UPSTREAM_IDLE_SECONDS
from hubproxy.proxy.upstream import Phase

from .fakes import FakeConnector, Proxy

MakeProxy = Callable[..., Proxy]


@pytest.fixture
async def connector(monkeypatch: pytest.MonkeyPatch) -> FakeConnector:
    """The running loop's `create_connection` (what `Pool.connect` calls) made fake."""
    fake = FakeConnector()
    monkeypatch.setattr(asyncio.get_running_loop(), "create_connection", fake.create_connection)
    return fake


@pytest.fixture
async def make_proxy(
    connector: FakeConnector, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[MakeProxy]:
    """`make_proxy(**config)`: a proxy with a route `/` to fakes.TARGET. Error pages are the
    plain reason phrases (an empty --error-path).

    At teardown: no exception reached the loop, and once every client is gone and the idle
    connections have timed out, no target connection is lent, connecting or idle, and each is
    CLOSED (the pool's counts cannot drift, whichever way an exchange ended).
    """
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: errors.append(context))
    made: list[Proxy] = []

    def make(**config: Any) -> Proxy:
        config.setdefault("error_path", str(tmp_path))
        proxy = Proxy.build(connector, **config)
        proxy.route()
        made.append(proxy)
        return proxy

    try:
        yield make
        for proxy in made:
            await proxy.run_callbacks()
            assert not errors, errors
            await wind_down(proxy)
            assert not errors, errors
        uncaught = [r.getMessage() for r in caplog.records if "Uncaught" in r.getMessage()]
        assert not uncaught, uncaught
    finally:
        loop.set_exception_handler(previous)


async def wind_down(proxy: Proxy) -> None:
    """Every client goes away, and the idle connections time out: nothing may be left."""
    proxy.connector.finish_connecting()
    await proxy.run_callbacks()
    for client in proxy.clients:
        if not client.lost:
            client.reset()
    await proxy.run_callbacks()
    assert proxy.counts()[0] == 0, "target connections still lent with no client left"
    proxy.sweep(UPSTREAM_IDLE_SECONDS + 1)
    await proxy.run_callbacks()
    assert proxy.counts() == (0, 0)
    for target in proxy.targets:
        assert target.protocol.phase is Phase.CLOSED
        if target.buffered and not target.lost:
            target.drain()  # a close waits for the writes queued; the target reads them now
            await proxy.run_callbacks()
        assert target.lost


@pytest.fixture
async def proxy(make_proxy: MakeProxy) -> Proxy:
    """A proxy with the default configuration."""
    return make_proxy()

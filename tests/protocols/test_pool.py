"""The pool: a connection given back becomes IDLE and is lent again; its counts (lent,
connecting, idle) follow the phases, whichever way an exchange ends."""

from __future__ import annotations

import pytest

from hubproxy.proxy import pool as pool_module
from hubproxy.proxy.upstream import Phase, UpstreamConnection

from .fakes import Client, Proxy, Target, forwarded, request, response


@pytest.fixture
def phases(monkeypatch: pytest.MonkeyPatch) -> list[Phase]:
    """Every phase any target connection enters, in order."""
    seen: list[Phase] = []
    enter = UpstreamConnection._enter

    def spy(self: UpstreamConnection, phase: Phase) -> None:
        enter(self, phase)
        seen.append(phase)

    monkeypatch.setattr(UpstreamConnection, "_enter", spy)
    return seen


async def exchange(proxy: Proxy, client: Client, path: str = "/") -> Target:
    """One GET answered on `client`; the target connection that answered it."""
    client.receive(request("GET", path))
    await proxy.run_callbacks()
    target = next(t for t in proxy.targets if t.writes)
    assert target.take() == forwarded("GET", path)
    target.receive(response(body=b"ok"))
    assert client.take().endswith(b"ok")
    return target


async def test_given_back_then_lent_again(proxy: Proxy, phases: list[Phase]) -> None:
    """A connection given back is IDLE in its pool, and the next request borrows it (reused):
    one connection, its phases NEW -> WAITING -> BODY -> DONE -> IDLE, twice."""
    client = proxy.client()
    first = await exchange(proxy, client)
    assert first.protocol.phase is Phase.IDLE and not first.protocol.reused
    pool = first.protocol.pool
    assert pool.idle == [first.protocol] and pool.lent == 0
    assert first.protocol.idle_since > 0
    second = await exchange(proxy, client, "/again")
    assert second is first and first.protocol.reused
    assert len(proxy.connector.attempts) == 1
    one = [Phase.WAITING, Phase.BODY, Phase.DONE, Phase.IDLE]
    assert phases == one + one


async def test_counts_follow_the_phases(proxy: Proxy) -> None:
    """(in use, idle) through an exchange: connecting and lent count as in use, idle as
    idle, a closed connection as neither."""
    proxy.connector.hold = True
    client = proxy.client()
    client.receive(request())
    await proxy.run_callbacks()
    assert proxy.counts() == (1, 0)  # connecting
    proxy.connector.finish_connecting()
    await proxy.run_callbacks()
    [target] = proxy.targets
    assert proxy.counts() == (1, 0)  # lent: WAITING
    target.receive(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
    assert target.protocol.phase is Phase.BODY and proxy.counts() == (1, 0)
    target.receive(b"ok")
    assert proxy.counts() == (0, 1)
    client.receive(request())
    assert proxy.counts() == (1, 0)
    target.reset()
    await proxy.run_callbacks()
    assert proxy.counts() == (1, 0)  # the GET, retried, connecting
    assert proxy.targets[-1] is not target
    proxy.targets[-1].receive(response(body=b"ok"))
    assert proxy.counts() == (0, 1)


async def test_most_recently_used_is_lent_first(proxy: Proxy) -> None:
    """Two connections pooled: the one given back last is lent first (the other may time
    out)."""
    one, two = proxy.client(), proxy.client()
    one.receive(request("GET", "/1"))
    two.receive(request("GET", "/2"))
    await proxy.run_callbacks()
    first, second = proxy.targets
    second.take()
    second.receive(response(body=b""))
    first.take()
    first.receive(response(body=b""))
    assert proxy.counts() == (0, 2)
    three = proxy.client()
    three.receive(request("GET", "/3"))
    assert first.take() == forwarded("GET", "/3")
    assert second.protocol.phase is Phase.IDLE


async def test_idle_limit_per_origin(proxy: Proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_IDLE_PER_TARGET idle connections, one given back is closed instead."""
    monkeypatch.setattr(pool_module, "MAX_IDLE_PER_TARGET", 1)
    one, two = proxy.client(), proxy.client()
    one.receive(request("GET", "/1"))
    two.receive(request("GET", "/2"))
    await proxy.run_callbacks()
    first, second = proxy.targets
    first.receive(response(body=b""))
    second.receive(response(body=b""))
    assert first.protocol.phase is Phase.IDLE
    assert second.protocol.phase is Phase.CLOSED and second.closing
    assert proxy.counts() == (0, 1)


async def test_one_pool_per_origin(proxy: Proxy) -> None:
    """Routes to two origins: a pool each, with their own counts; a connection is lent to
    requests for its own origin only."""
    proxy.route("/b", "http://b.test:9000")
    client = proxy.client()
    a = await exchange(proxy, client, "/a")
    client.receive(request("GET", "/b/x"))
    await proxy.run_callbacks()
    b = proxy.targets[-1]
    assert b is not a and proxy.connector.attempts[-1] == ("b.test", 9000)
    assert a.protocol.pool is not b.protocol.pool
    assert proxy.counts() == (1, 1)
    b.receive(response(body=b""))
    assert proxy.counts() == (0, 2)


@pytest.mark.parametrize(
    "answer",
    [
        response(200, body=b"ok", version="1.0"),
        response(200, [("Connection", "close")], body=b"ok"),
        response(200, length=False) + b"ok",
    ],
    ids=["http10", "connection-close", "close-delimited"],
)
async def test_not_reusable_is_not_pooled(proxy: Proxy, answer: bytes) -> None:
    """An answer after which the target will not take another request closes its connection:
    never IDLE, never lent again."""
    client = proxy.client()
    client.receive(request())
    await proxy.run_callbacks()
    [target] = proxy.targets
    target.receive(answer)
    if target.protocol.phase is Phase.BODY:  # the body ends with the connection
        target.eof()
        await proxy.run_callbacks()
    assert target.protocol.phase is Phase.CLOSED
    assert proxy.counts() == (0, 0)
    client.receive(request())
    await proxy.run_callbacks()
    assert len(proxy.targets) == 2


async def test_idle_pool_forgotten_after_its_last_connection(proxy: Proxy) -> None:
    """A pool with nothing in it is forgotten by the sweeper; its next request makes a new
    one."""
    client = proxy.client()
    target = await exchange(proxy, client)
    old_pool = target.protocol.pool
    target.eof()
    await proxy.run_callbacks()
    proxy.sweep(0)
    assert proxy.service.pool_for("http://target.test:8080")[1] is not old_pool

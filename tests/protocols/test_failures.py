"""A leg that goes away in each phase of an exchange: the target (reset or EOF) in WAITING,
HEAD and BODY, an idle pooled connection, the retry of a GET on a reused connection; and the
client, while connecting and in each phase."""

from __future__ import annotations

import pytest

from hubproxy.proxy.upstream import Phase

from .fakes import KEEP_ALIVE, Client, Proxy, Target, forwarded, request, response

UNAVAILABLE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 19\r\n"
    + KEEP_ALIVE
    + b"\r\nService Unavailable"
)


def reset(target: Target, how: str) -> None:
    """The target goes away: a reset, or a clean EOF (the transport then closes)."""
    if how == "reset":
        target.reset()
    else:
        target.eof()


async def lent(proxy: Proxy, path: str = "/", method: str = "GET") -> tuple[Client, Target]:
    """A client whose request is in WAITING on a new target connection: (client, target)."""
    client = proxy.client()
    client.receive(request(method, path))
    await proxy.run_callbacks()
    target = proxy.targets[-1]
    assert target.protocol.phase is Phase.WAITING
    target.take()
    return client, target


HOW = pytest.mark.parametrize("how", ["reset", "eof"])


@HOW
async def test_target_gone_while_waiting(proxy: Proxy, how: str) -> None:
    """The target goes away before a byte of its answer, on a new connection: a 503 (no
    retry: a new connection that fails says the target is down)."""
    client, target = await lent(proxy)
    reset(target, how)
    await proxy.run_callbacks()
    assert client.take() == UNAVAILABLE
    assert target.protocol.phase is Phase.CLOSED
    assert len(proxy.connector.attempts) == 1
    assert proxy.counts() == (0, 0)


@HOW
async def test_target_gone_in_head(proxy: Proxy, how: str) -> None:
    """The target goes away in the middle of its answer's head: still ours to answer, a 503."""
    client, target = await lent(proxy)
    target.receive(b"HTTP/1.1 200 OK\r\nContent-Le")
    assert target.protocol.phase is Phase.WAITING and not target.protocol.heard_nothing
    reset(target, how)
    await proxy.run_callbacks()
    assert client.take() == UNAVAILABLE
    assert not client.closing
    assert proxy.counts() == (0, 0)


@HOW
async def test_target_gone_in_body(proxy: Proxy, how: str) -> None:
    """The target goes away before the end of a body it announced: the client, who has the
    head already, is cut off."""
    client, target = await lent(proxy)
    target.receive(response(200, [("Content-Length", "10")]) + b"12345")
    assert target.protocol.phase is Phase.BODY
    client.take()
    reset(target, how)
    await proxy.run_callbacks()
    assert client.aborted
    assert client.writes == []
    assert proxy.counts() == (0, 0)


async def test_target_gone_in_chunked_body(proxy: Proxy) -> None:
    """The same for a chunked body: no last chunk is made up for the client."""
    client, target = await lent(proxy)
    target.receive(response(200, [("Transfer-Encoding", "chunked")]) + b"3\r\nabc\r\n")
    client.take()
    target.eof()
    await proxy.run_callbacks()
    assert client.aborted and client.writes == []


async def test_target_reset_in_close_delimited_body(proxy: Proxy) -> None:
    """A body that ends with the connection ends with a clean close only: a reset means it was
    cut short, so the client is cut off too, with no last chunk."""
    client, target = await lent(proxy)
    target.receive(response(200, length=False) + b"some")
    client.take()
    target.reset()
    await proxy.run_callbacks()
    assert client.writes == []
    assert client.aborted


async def test_idle_pooled_connection_closed_by_target(proxy: Proxy) -> None:
    """A pooled connection whose target closes it leaves the pool; nothing is in use."""
    client, target = await lent(proxy)
    target.receive(response(body=b"ok"))
    assert proxy.counts() == (0, 1)
    target.eof()
    await proxy.run_callbacks()
    assert target.protocol.phase is Phase.CLOSED
    assert proxy.counts() == (0, 0)
    assert not client.closing


async def test_idle_pooled_connection_that_speaks_is_closed(proxy: Proxy) -> None:
    """An idle connection has nothing to say: bytes from it close it."""
    _, target = await lent(proxy)
    target.receive(response(body=b"ok"))
    target.receive(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
    assert target.closing
    await proxy.run_callbacks()
    assert proxy.counts() == (0, 0)


async def pooled(proxy: Proxy) -> tuple[Client, Target]:
    """A client with one exchange done; its target connection idle in the pool."""
    client, target = await lent(proxy)
    target.receive(response(body=b"ok"))
    client.take()
    assert target.protocol.phase is Phase.IDLE
    return client, target


@HOW
async def test_get_retried_on_a_fresh_connection(proxy: Proxy, how: str) -> None:
    """A GET sent on a reused connection that the target had closed meanwhile (no byte of an
    answer) is sent once more on a new connection; the client sees only that answer."""
    client, stale = await pooled(proxy)
    client.receive(request("GET", "/again"))
    assert stale.take() == forwarded("GET", "/again")
    assert stale.protocol.reused
    reset(stale, how)
    await proxy.run_callbacks()
    fresh = proxy.targets[-1]
    assert fresh is not stale
    assert fresh.take() == forwarded("GET", "/again")
    assert not fresh.protocol.reused
    fresh.receive(response(body=b"second try"))
    assert client.take().endswith(b"\r\n\r\nsecond try")
    assert proxy.counts() == (0, 1)


async def test_retry_fails_too_503(proxy: Proxy) -> None:
    """The retry is made once: if the fresh connection fails as well, a 503."""
    client, stale = await pooled(proxy)
    client.receive(request("GET", "/again"))
    proxy.connector.failures.append(ConnectionRefusedError(111, "Connection refused"))
    stale.reset()
    await proxy.run_callbacks()
    assert client.take() == UNAVAILABLE
    assert len(proxy.connector.attempts) == 2


async def test_post_not_retried(proxy: Proxy) -> None:
    """A POST on a stale reused connection is not sent again (it may have been acted on): a
    503."""
    client, stale = await pooled(proxy)
    client.receive(request("POST", "/form", body=b"a=1"))
    stale.reset()
    await proxy.run_callbacks()
    assert client.take() == UNAVAILABLE
    assert len(proxy.connector.attempts) == 1


async def test_no_retry_once_the_answer_began(proxy: Proxy) -> None:
    """A reused connection that fails after a byte of the answer: a 503, no retry."""
    client, stale = await pooled(proxy)
    client.receive(request("GET", "/again"))
    stale.receive(b"HTTP/1.1 2")
    stale.reset()
    await proxy.run_callbacks()
    assert client.take() == UNAVAILABLE
    assert len(proxy.connector.attempts) == 1


async def test_no_retry_after_an_interim_answer(proxy: Proxy) -> None:
    """A reused connection that fails after a whole 1xx (relayed already): a 503, no retry."""
    client, stale = await pooled(proxy)
    client.receive(request("GET", "/again"))
    stale.receive(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n")
    assert stale.protocol.phase is Phase.WAITING and not stale.protocol.heard_nothing
    stale.reset()
    await proxy.run_callbacks()
    assert client.take().endswith(UNAVAILABLE)
    assert len(proxy.connector.attempts) == 1


# -- the client goes away ---------------------------------------------------------------------


async def test_client_gone_while_connecting(proxy: Proxy) -> None:
    """The client leaves while its target connection is being made: the connection, once
    made, goes to the pool unused (WAITING -> IDLE), nothing sent on it."""
    proxy.connector.hold = True
    client = proxy.client()
    client.receive(request())
    await proxy.run_callbacks()
    assert proxy.counts() == (1, 0)
    client.reset()
    proxy.connector.finish_connecting()
    await proxy.run_callbacks()
    [target] = proxy.targets
    assert target.protocol.phase is Phase.IDLE
    assert target.writes == []
    assert proxy.counts() == (0, 1)


async def test_client_gone_while_waiting(proxy: Proxy) -> None:
    """The client leaves before the answer: its target connection is aborted, never reused."""
    client, target = await lent(proxy)
    client.reset()
    assert target.aborted
    await proxy.run_callbacks()
    assert target.protocol.phase is Phase.CLOSED
    assert proxy.counts() == (0, 0)


async def test_client_gone_in_head(proxy: Proxy) -> None:
    """The same while the answer's head is arriving."""
    client, target = await lent(proxy)
    target.receive(b"HTTP/1.1 200 OK\r\n")
    client.reset()
    assert target.aborted
    await proxy.run_callbacks()
    assert proxy.counts() == (0, 0)


async def test_client_gone_in_body(proxy: Proxy) -> None:
    """The same in the answer's body: the rest of it would be nobody's."""
    client, target = await lent(proxy)
    target.receive(response(200, [("Content-Length", "10")]) + b"12345")
    client.reset()
    assert target.aborted
    await proxy.run_callbacks()
    assert target.protocol.phase is Phase.CLOSED
    assert proxy.counts() == (0, 0)


async def test_client_gone_while_sending_its_body(proxy: Proxy) -> None:
    """The client leaves half-way through its request's body: the target connection is
    aborted (the request it got is incomplete)."""
    client = proxy.client()
    client.receive(request("POST", "/", [("Content-Length", "10")]) + b"123")
    await proxy.run_callbacks()
    [target] = proxy.targets
    client.reset()
    assert target.aborted
    await proxy.run_callbacks()
    assert proxy.counts() == (0, 0)


async def test_client_eof_abandons_the_exchange(proxy: Proxy) -> None:
    """A client's EOF outside a tunnel closes its connection (as Node's server without
    allowHalfOpen): the exchange under way is abandoned."""
    client, target = await lent(proxy)
    client.eof()
    await proxy.run_callbacks()
    assert client.lost
    assert target.aborted
    assert proxy.counts() == (0, 0)


async def test_client_gone_while_idle(proxy: Proxy) -> None:
    """A client between requests leaves: its pooled connection stays in the pool."""
    client, target = await pooled(proxy)
    client.reset()
    await proxy.run_callbacks()
    assert target.protocol.phase is Phase.IDLE
    assert proxy.counts() == (0, 1)


@pytest.mark.parametrize("first", ["speaks", "reset", "eof"])
async def test_target_gone_before_it_is_lent(proxy: Proxy, first: str) -> None:
    """A new connection the target speaks on (a banner) or closes before the pool has lent it:
    never lent, a 503 (a new connection that fails says the target is down), nothing left."""

    def act(target: Target) -> None:
        if first == "speaks":
            target.receive(b"SSH-2.0-OpenSSH\r\n")
        else:
            reset(target, first)

    proxy.connector.on_connected = act
    client = proxy.client()
    client.receive(request())
    await proxy.run_callbacks()
    assert client.take() == UNAVAILABLE
    [target] = proxy.targets
    assert target.protocol.phase is Phase.CLOSED and target.writes == []
    assert len(proxy.connector.attempts) == 1
    assert proxy.counts() == (0, 0)

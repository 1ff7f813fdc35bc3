"""Flow control both ways: a client that does not read our answers stops the target's reading
(CLIENT_FULL), a target that does not read the request stops the client's (UPSTREAM_FULL); each
leg pauses only its own transport, for reasons kept by its ReadGate."""

from __future__ import annotations

from hubproxy.proxy.flow import CLIENT_FULL, CONNECTING, UPSTREAM_FULL
from hubproxy.proxy.upstream import Phase

from .fakes import Client, Proxy, Target, request, response


async def answering(proxy: Proxy) -> tuple[Client, Target]:
    """A client whose answer's body is under way (10 of 100 bytes relayed)."""
    client = proxy.client()
    client.receive(request())
    await proxy.run_callbacks()
    [target] = proxy.targets
    target.receive(response(200, [("Content-Length", "100")]) + b"x" * 10)
    client.take()
    return client, target


async def test_client_full_pauses_the_target(proxy: Proxy) -> None:
    """The client's write buffer over its high-water mark: the target is not read (nor the
    client's further requests); resume_writing resumes both."""
    client, target = await answering(proxy)
    client.fill()
    assert not target.reading
    assert target.protocol.gate.reasons == CLIENT_FULL
    assert not client.reading
    assert client.protocol.gate.reasons == CLIENT_FULL
    client.drain()
    assert target.reading and client.reading
    assert target.protocol.gate.reasons == client.protocol.gate.reasons == 0
    target.receive(b"y" * 90)
    assert client.take() == b"y" * 90
    assert target.protocol.phase is Phase.IDLE


async def test_target_linked_while_client_full_starts_paused(proxy: Proxy) -> None:
    """A target connection linked while the client is full is paused from its first moment."""
    proxy.connector.hold = True
    client = proxy.client()
    client.receive(request())
    await proxy.run_callbacks()
    client.fill()
    assert client.protocol.gate.reasons == CLIENT_FULL | CONNECTING
    proxy.connector.finish_connecting()
    await proxy.run_callbacks()
    [target] = proxy.targets
    assert target.protocol.gate.reasons == CLIENT_FULL
    assert not target.reading
    client.drain()
    assert target.reading and client.reading


async def test_pooled_connection_drops_client_full(proxy: Proxy) -> None:
    """A connection given back to its pool while its client was full reads again (an idle
    connection must notice its target closing), and serves the next client unpaused."""
    client, target = await answering(proxy)
    client.fill_on_write = True  # the write of the answer's end fills the client up
    target.receive(b"y" * 90)
    assert client.buffered and client.protocol.gate.reasons == CLIENT_FULL
    assert target.protocol.phase is Phase.IDLE
    assert target.reading and target.protocol.gate.reasons == 0
    other = proxy.client()
    other.receive(request("GET", "/2"))
    assert target.protocol.phase is Phase.WAITING
    assert target.reading


async def test_client_full_while_idle_lends_unpaused(proxy: Proxy) -> None:
    """A client that fills up between requests pauses only itself; its next request, once it
    drains, gets a target connection that reads."""
    client, target = await answering(proxy)
    target.receive(b"y" * 90)
    client.fill()
    assert target.reading  # idle: nothing to do with that client any more
    client.drain()
    client.receive(request("GET", "/2"))
    assert target.protocol.phase is Phase.WAITING and target.reading


async def test_target_full_pauses_the_client(proxy: Proxy) -> None:
    """The target connection's write buffer over its high-water mark: the client's body is
    not read; resume_writing resumes it."""
    client = proxy.client()
    client.receive(request("POST", "/", [("Content-Length", "1000")]) + b"a" * 100)
    await proxy.run_callbacks()
    [target] = proxy.targets
    target.fill()
    assert not client.reading
    assert client.protocol.gate.reasons == UPSTREAM_FULL
    assert target.reading  # the target's answer is still read
    target.drain()
    assert client.reading and client.protocol.gate.reasons == 0
    client.receive(b"b" * 900)
    target.receive(response(200, body=b"ok"))
    assert client.take().endswith(b"ok")
    assert proxy.counts() == (0, 1)


async def test_answer_done_drops_upstream_full(proxy: Proxy) -> None:
    """When the answer ends (here: an early one) the client no longer waits for that target's
    buffer: reading resumes."""
    client = proxy.client()
    client.receive(request("POST", "/", [("Content-Length", "1000")]) + b"a" * 100)
    await proxy.run_callbacks()
    [target] = proxy.targets
    target.fill()
    target.receive(response(413, body=b""))
    assert client.reading and client.protocol.gate.reasons == 0
    assert target.protocol.phase is Phase.CLOSED


async def test_both_ways_at_once(proxy: Proxy) -> None:
    """Both buffers full: each leg is paused for its own reasons, and resumes only when the
    last of them clears."""
    client = proxy.client()
    client.receive(request("POST", "/", [("Content-Length", "1000")]) + b"a" * 100)
    await proxy.run_callbacks()
    [target] = proxy.targets
    target.receive(response(200, [("Content-Length", "100")]) + b"x")
    target.fill()
    client.fill()
    assert client.protocol.gate.reasons == UPSTREAM_FULL | CLIENT_FULL
    assert target.protocol.gate.reasons == CLIENT_FULL
    target.drain()
    assert not client.reading  # still full itself
    client.drain()
    assert client.reading and target.reading


async def test_pooled_connection_still_full_pauses_its_next_client(proxy: Proxy) -> None:
    """A connection given back with its write buffer still full (the target answered without
    reading the whole body yet) pauses the next client that borrows it, until it drains."""
    client = proxy.client()
    client.receive(request("POST", "/", body=b"a" * 1000))
    await proxy.run_callbacks()
    [target] = proxy.targets
    target.fill()  # the whole body is in its buffer, unread by the target
    target.receive(response(200, body=b"ok"))
    assert target.protocol.phase is Phase.IDLE
    other = proxy.client()
    other.receive(request("POST", "/2", [("Content-Length", "1000")]))
    assert target.protocol.phase is Phase.WAITING
    assert not other.reading
    target.drain()
    assert other.reading

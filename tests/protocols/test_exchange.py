"""Plain exchanges through both legs: requests with and without bodies, each way a response can
be framed, HEAD, 204/304, and interim (1xx) responses."""

from __future__ import annotations

import socket

import pytest

from hubproxy.proxy.exchange import STREAM
from hubproxy.proxy.upstream import Phase

from .fakes import CLOSE, KEEP_ALIVE, Proxy, forwarded, request, response


async def test_get_through_both_legs(proxy: Proxy) -> None:
    """A GET reaches the target re-headed; its answer reaches the client with the proxy's
    Connection header; the target connection goes back to its pool, idle."""
    client = proxy.client()
    proxy.connector.hold = True
    client.receive(request("GET", "/a/b?c=1", [("Accept", "*/*")]))
    await proxy.run_callbacks()
    assert not client.reading  # while the target connection is being made
    assert proxy.counts() == (1, 0)  # connecting counts as in use
    proxy.connector.finish_connecting()
    await proxy.run_callbacks()
    assert client.reading
    [target] = proxy.targets
    assert target.protocol.phase is Phase.WAITING
    assert target.take() == forwarded("GET", "/a/b?c=1", [("Accept", "*/*")])
    target.receive(response(200, [("Content-Type", "text/plain")], b"hello"))
    assert client.take() == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
        + KEEP_ALIVE
        + b"\r\nhello"
    )
    assert target.protocol.phase is Phase.IDLE
    assert target.protocol.request is None
    assert proxy.counts() == (0, 1)
    assert client.protocol.active is None and not client.closing
    nodelay = (socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assert client.socket.options == target.socket.options == {nodelay: 1}
    assert client.protocol.client_ip == b"203.0.113.7"


async def test_post_body_in_the_head_read(proxy: Proxy) -> None:
    """A POST's body read with its head waits (BUFFER) until the target connection is linked,
    then goes out in the same write as the head."""
    client = proxy.client()
    client.receive(request("POST", "/form", body=b"x=1&y=2"))
    await proxy.run_callbacks()
    [target] = proxy.targets
    assert target.writes == [forwarded("POST", "/form", [("Content-Length", "7")]) + b"x=1&y=2"]
    target.receive(response(201, body=b"made"))
    assert client.take().startswith(b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n")
    assert proxy.counts() == (0, 1)


async def test_post_body_streams_after_link(proxy: Proxy) -> None:
    """Once linked (STREAM), each read of the body is one write to the target."""
    client = proxy.client()
    client.receive(request("POST", "/up", [("Content-Length", "10")]))
    await proxy.run_callbacks()
    [target] = proxy.targets
    assert client.protocol.active is not None and client.protocol.active.sink is STREAM
    target.take()
    client.receive(b"01234")
    client.receive(b"56789")
    assert target.writes == [b"01234", b"56789"]
    target.receive(response(200, body=b"ok"))
    assert client.take().endswith(b"\r\n\r\nok")
    assert proxy.counts() == (0, 1)


async def test_chunked_request_body_is_chunked_again(proxy: Proxy) -> None:
    """A chunked request body is parsed and chunked again by the proxy (its own framing),
    trailers dropped."""
    client = proxy.client()
    client.receive(request("PUT", "/f", [("Transfer-Encoding", "chunked")]) + b"3\r\nabc\r\n")
    await proxy.run_callbacks()
    [target] = proxy.targets
    assert target.take() == (
        forwarded("PUT", "/f")[:-2] + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
    )
    client.receive(b"2\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\n")
    assert target.take() == b"2\r\nde\r\n0\r\n\r\n"
    target.receive(response(204, length=False))
    assert client.take() == b"HTTP/1.1 204 No Content\r\n" + KEEP_ALIVE + b"\r\n"
    assert proxy.counts() == (0, 1)


async def test_chunked_response_is_chunked_again(proxy: Proxy) -> None:
    """A chunked response is relayed chunk by chunk, one write per read of the target, and the
    connection is pooled after its last chunk."""
    client = proxy.client()
    client.receive(request())
    await proxy.run_callbacks()
    [target] = proxy.targets
    target.receive(response(200, [("Transfer-Encoding", "chunked")]) + b"5\r\nhello\r\n")
    assert client.take() == (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n" + KEEP_ALIVE + b"\r\n5\r\nhello\r\n"
    )
    assert target.protocol.phase is Phase.BODY
    target.receive(b"1\r\n!\r\n0\r\nX-Trailer: t\r\n\r\n")
    assert client.writes == [b"1\r\n!\r\n0\r\n\r\n"]
    assert target.protocol.phase is Phase.IDLE
    assert proxy.counts() == (0, 1)


async def test_content_length_response_in_pieces(proxy: Proxy) -> None:
    """A Content-Length body is relayed as it comes; the head may arrive in several reads."""
    client = proxy.client()
    client.receive(request())
    await proxy.run_callbacks()
    [target] = proxy.targets
    target.receive(b"HTTP/1.1 200 O")
    assert target.protocol.phase is Phase.WAITING
    assert client.writes == []
    target.receive(b"K\r\nContent-Length: 6\r\n\r\nabc")
    assert target.protocol.phase is Phase.BODY
    assert client.take() == b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n" + KEEP_ALIVE + b"\r\nabc"
    target.receive(b"def")
    assert client.take() == b"def"
    assert target.protocol.phase is Phase.IDLE


async def test_close_delimited_response(proxy: Proxy) -> None:
    """A body without a length ends with the target's connection: chunked for an HTTP/1.1
    client, its last chunk sent at the target's EOF; the connection is not pooled."""
    client = proxy.client()
    client.receive(request())
    await proxy.run_callbacks()
    [target] = proxy.targets
    target.receive(response(200, length=False) + b"part one")
    assert client.take() == (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n" + KEEP_ALIVE + b"\r\n8\r\npart one\r\n"
    )
    target.eof()
    await proxy.run_callbacks()
    assert client.take() == b"0\r\n\r\n"
    assert target.protocol.phase is Phase.CLOSED
    assert proxy.counts() == (0, 0)
    assert not client.closing  # the client's connection carries on
    client.receive(request("GET", "/next"))
    await proxy.run_callbacks()
    assert len(proxy.targets) == 2


async def test_close_delimited_response_to_http10(proxy: Proxy) -> None:
    """To an HTTP/1.0 client a body without a length is relayed as it is, and the client's
    connection closes after it."""
    client = proxy.client()
    client.receive(request(version="1.0"))
    await proxy.run_callbacks()
    [target] = proxy.targets
    target.receive(response(200, length=False) + b"all of it")
    assert client.take() == b"HTTP/1.1 200 OK\r\n" + CLOSE + b"\r\nall of it"
    target.eof()
    await proxy.run_callbacks()
    assert client.closing and client.writes == []
    assert proxy.counts() == (0, 0)


async def test_chunked_response_to_http10(proxy: Proxy) -> None:
    """An HTTP/1.0 client cannot read chunks: a chunked response reaches it de-chunked and
    ends with its connection; the target connection is pooled all the same."""
    client = proxy.client()
    client.receive(request(version="1.0"))
    await proxy.run_callbacks()
    [target] = proxy.targets
    target.receive(response(200, [("Transfer-Encoding", "chunked")]) + b"3\r\nabc\r\n")
    assert client.take() == b"HTTP/1.1 200 OK\r\n" + CLOSE + b"\r\nabc"
    target.receive(b"0\r\n\r\n")
    assert client.writes == [] and client.closing
    assert target.protocol.phase is Phase.IDLE


async def test_head_response_has_no_body(proxy: Proxy) -> None:
    """A HEAD's answer ends after its head, whatever its Content-Length says; the connection is
    pooled, and its parser serves the next request as new."""
    client = proxy.client()
    client.receive(request("HEAD", "/big"))
    await proxy.run_callbacks()
    [target] = proxy.targets
    target.receive(response(200, [("Content-Length", "1000")]))
    assert client.take() == b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n" + KEEP_ALIVE + b"\r\n"
    assert target.protocol.phase is Phase.IDLE
    client.receive(request("GET", "/small"))
    assert proxy.targets == [target]  # lent again
    assert target.take().endswith(forwarded("GET", "/small"))
    target.receive(response(200, body=b"tiny"))
    assert client.take().endswith(b"\r\n\r\ntiny")
    assert target.protocol.phase is Phase.IDLE


@pytest.mark.parametrize(("status", "line"), [(204, b"204 No Content"), (304, b"304 Not Modified")])
async def test_no_body_statuses(proxy: Proxy, status: int, line: bytes) -> None:
    """204 and 304 have no body (a 304's Content-Length is the resource's, passed on); the
    connection is pooled at once."""
    client = proxy.client()
    client.receive(request())
    await proxy.run_callbacks()
    [target] = proxy.targets
    headers = [("ETag", '"e"')] + ([("Content-Length", "10")] if status == 304 else [])
    target.receive(response(status, headers, length=False))
    length = b"Content-Length: 10\r\n" if status == 304 else b""
    head = b"HTTP/1.1 " + line + b'\r\nETag: "e"\r\n' + length
    assert client.take() == head + KEEP_ALIVE + b"\r\n"
    assert target.protocol.phase is Phase.IDLE
    assert proxy.counts() == (0, 1)


async def test_interim_responses_relayed(proxy: Proxy) -> None:
    """1xx responses (103 Early Hints) go to an HTTP/1.1 client as they come; the connection
    waits (WAITING) for the final response."""
    client = proxy.client()
    client.receive(request())
    await proxy.run_callbacks()
    [target] = proxy.targets
    target.receive(response(103, [("Link", "</s.css>; rel=preload")], length=False))
    assert client.take() == b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
    assert target.protocol.phase is Phase.WAITING
    target.receive(response(200, body=b"ok"))
    assert client.take() == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + KEEP_ALIVE + b"\r\nok"
    assert target.protocol.phase is Phase.IDLE


async def test_interim_responses_not_relayed_to_http10(proxy: Proxy) -> None:
    """HTTP/1.0 has no 1xx: the client gets the final response only."""
    client = proxy.client()
    client.receive(request(version="1.0", headers=[("Connection", "keep-alive")]))
    await proxy.run_callbacks()
    [target] = proxy.targets
    target.receive(response(100, length=False) + response(200, body=b"ok"))
    assert client.take() == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + KEEP_ALIVE + b"\r\nok"


async def test_target_connection_close_is_not_pooled(proxy: Proxy) -> None:
    """A response with `Connection: close` is relayed, and its connection closed, not pooled;
    the client's connection is kept."""
    client = proxy.client()
    client.receive(request())
    await proxy.run_callbacks()
    [target] = proxy.targets
    target.receive(response(200, [("Connection", "close")], b"bye"))
    assert client.take() == b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n" + KEEP_ALIVE + b"\r\nbye"
    assert target.closing and target.protocol.phase is Phase.CLOSED
    assert proxy.counts() == (0, 0)
    assert not client.closing


async def test_client_connection_close_closes_after_the_answer(proxy: Proxy) -> None:
    """A request with `Connection: close` is answered with `Connection: close`, then its
    connection closes; the target connection is pooled still."""
    client = proxy.client()
    client.receive(request(headers=[("Connection", "close")]))
    await proxy.run_callbacks()
    [target] = proxy.targets
    target.receive(response(200, body=b"ok"))
    assert client.take() == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + CLOSE + b"\r\nok"
    assert client.closing
    assert proxy.counts() == (0, 1)


async def test_bytes_after_a_whole_response_close_the_target(proxy: Proxy) -> None:
    """A target that sends more than its response keeps the client's answer, but its
    connection is not trusted again."""
    client = proxy.client()
    client.receive(request())
    await proxy.run_callbacks()
    [target] = proxy.targets
    target.receive(response(200, body=b"ok") + b"HTTP/1.1 200 OK\r\n\r\nextra")
    assert client.take() == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + KEEP_ALIVE + b"\r\nok"
    assert target.protocol.phase is Phase.CLOSED
    assert proxy.counts() == (0, 0)
    assert not client.closing

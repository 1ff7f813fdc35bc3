"""Several requests on one client connection: pipelining (answers in order, reading paused while
requests wait), answers that come before their request's body is whole, and 100-continue."""

from __future__ import annotations

import pytest

from hubproxy.proxy.server import FEED_SLICE, MAX_PIPELINED, piece_end
from hubproxy.proxy.upstream import Phase

from .fakes import CLOSE, KEEP_ALIVE, Proxy, forwarded, request, response


def ok(body: bytes, extra: bytes = KEEP_ALIVE) -> bytes:
    """A 200 with `body` as the proxy relays it."""
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def test_pipelined_requests_answered_in_order(proxy: Proxy) -> None:
    """Three requests in one read: one at a time goes to the target (over the one pooled
    connection), answers come back in order, and the client is not read while requests wait."""
    client = proxy.client()
    client.receive(request("GET", "/1") + request("GET", "/2") + request("GET", "/3"))
    assert [r.url for r in client.protocol.queue] == [b"/2", b"/3"]
    await proxy.run_callbacks()
    [target] = proxy.targets
    assert not client.reading  # two requests wait
    assert target.take() == forwarded("GET", "/1")
    target.receive(response(body=b"one"))
    assert client.take() == ok(b"one")
    assert target.take() == forwarded("GET", "/2")  # the same connection, lent again
    assert target.protocol.phase is Phase.WAITING
    assert not client.reading  # one still waits
    target.receive(response(body=b"two"))
    assert client.take() == ok(b"two")
    assert target.take() == forwarded("GET", "/3")
    assert client.reading  # none waits: the client may send more
    target.receive(response(body=b"three"))
    assert client.take() == ok(b"three")
    assert proxy.targets == [target]
    assert proxy.counts() == (0, 1)


async def test_pipelined_request_with_body_after_a_get(proxy: Proxy) -> None:
    """A POST pipelined behind a GET keeps its body (BUFFER) until its turn, then sends it with
    its head."""
    client = proxy.client()
    client.receive(request("GET", "/1") + request("POST", "/2", body=b"payload"))
    await proxy.run_callbacks()
    [target] = proxy.targets
    assert target.take() == forwarded("GET", "/1")
    target.receive(response(body=b"one"))
    assert target.take() == forwarded("POST", "/2", [("Content-Length", "7")]) + b"payload"
    target.receive(response(body=b"two"))
    assert client.take() == ok(b"one") + ok(b"two")


async def test_pipelined_reads_past_the_slice_are_held(proxy: Proxy) -> None:
    """A read of more than FEED_SLICE bytes is parsed in slices; once MAX_PIPELINED requests
    wait, the rest is held unparsed and parsed as answers make room: all are answered, in
    order."""
    pad = [("X-Pad", "p" * 1000)]
    count = 60
    client = proxy.client()
    client.receive(b"".join(request("GET", f"/{i}", pad) for i in range(count)))
    assert client.protocol.held
    assert len(client.protocol.queue) <= 2 * MAX_PIPELINED
    await proxy.run_callbacks()
    [target] = proxy.targets
    for i in range(count):
        assert target.take() == forwarded("GET", f"/{i}", pad)
        target.receive(response(body=b"%d" % i))
        await proxy.run_callbacks()  # held bytes are parsed in a later callback
        assert client.take() == ok(b"%d" % i)
    assert not client.protocol.held and not client.protocol.queue
    assert client.reading


async def test_pipelining_limit_holds_within_one_read(proxy: Proxy) -> None:
    """At most MAX_PIPELINED requests are parsed ahead of the one answered (docs: "32 parsed
    ahead at most"), however small they are."""
    client = proxy.client()
    client.receive(request("GET", "/x", host="h") * 200)  # 200 requests, 4 KiB
    assert len(client.protocol.queue) <= MAX_PIPELINED


async def test_pipelining_limit_holds_for_large_requests_in_one_read(proxy: Proxy) -> None:
    """Requests of a few hundred bytes each (cookies) pipelined in reads of every size: never
    more than MAX_PIPELINED wait, and all are answered, in order."""
    cookie = [("Cookie", "c" * 300)]
    count = 80
    stream = b"".join(request("GET", f"/{i}", cookie, host="h") for i in range(count))
    client = proxy.client()
    for size in (700, 5000, len(stream)):
        client.receive(stream[:size])
        stream = stream[size:]
        assert len(client.protocol.queue) <= MAX_PIPELINED
        if not client.reading:
            break
    await proxy.run_callbacks()
    [target] = proxy.targets
    answered = 0
    while answered < count:
        if stream and client.reading:
            client.receive(stream)
            stream = b""
            assert len(client.protocol.queue) <= MAX_PIPELINED
        assert target.take().startswith(b"GET /%d " % answered)
        target.receive(response(body=b"%d" % answered))
        await proxy.run_callbacks()
        assert client.take() == ok(b"%d" % answered)
        answered += 1
    assert not client.protocol.held and not client.protocol.queue and not stream


HEAD = b"GET / HTTP/1.0\r\n\r\n"  # the shortest head
LONG = b"GET /" + b"x" * 22 + b" HTTP/1.0\r\n\r\n"  # 40 bytes


@pytest.mark.parametrize(
    ("data", "start", "room", "end"),
    [
        (HEAD * 3, 0, 5, len(HEAD) * 3),  # room for all: the whole read
        (HEAD * 3, 0, 2, len(HEAD) * 2),  # 36 bytes hold two heads at most
        (HEAD * 3, 0, 1, len(HEAD)),
        (HEAD * 3, len(HEAD) - 1, 1, len(HEAD) * 2 - 1),  # the last byte of a head, then one
        (LONG * 3, 0, 2, len(LONG) * 2 - 1),  # inside the second head's end
        (b"\r\n\r\n" * 20, 0, 2, 36),  # a body of head ends: the pieces stay 18 * room long
        (b"\r\n\r\n\r\n", 0, 1, 6),
        (b"x" * (FEED_SLICE + 10), 0, 1, FEED_SLICE),  # no head end: a slice at most
        (b"x" * (FEED_SLICE + 10), 10, 1, FEED_SLICE + 10),
        (b"", 0, 3, 0),
    ],
)
def test_piece_end(data: bytes, start: int, room: int, end: int) -> None:
    assert piece_end(data, start, room) == end


@pytest.mark.parametrize("room", [1, 2, 5, MAX_PIPELINED])
@pytest.mark.parametrize("size", [18, 40, 333])
def test_a_piece_completes_no_more_heads_than_there_is_room_for(room: int, size: int) -> None:
    """Fed piece by piece to a real parser (a head may be under way from an earlier piece), no
    piece completes more than `room` heads, and every head is completed."""
    import httptools

    one = b"GET /" + b"x" * (size - 18) + b" HTTP/1.1\r\n\r\n"

    class Counter:
        heads = 0

        def on_headers_complete(self) -> None:
            self.heads += 1

    for offset in range(0, size, 7):  # where the stream is cut before the pieces begin
        stream = one * 50
        counter = Counter()
        parser = httptools.HttpRequestParser(counter)
        parser.feed_data(stream[:offset])
        start = offset
        while start < len(stream):
            end = piece_end(stream, start, room)
            assert end > start
            before = counter.heads
            parser.feed_data(stream[start:end])
            assert counter.heads - before <= room
            start = end
        assert counter.heads == 50


@pytest.mark.parametrize(
    "first",
    [
        request("GET", "/1", [("Connection", "close")]),
        request("GET", "/1", version="1.0"),
    ],
    ids=["connection-close", "http10"],
)
async def test_bytes_after_a_closing_request(proxy: Proxy, first: bytes) -> None:
    """A request that ends the connection is answered, then the connection closes; whatever
    followed it in the read is ignored (never forwarded, never a 400)."""
    client = proxy.client()
    client.receive(first + request("GET", "/2"))
    await proxy.run_callbacks()
    assert client.writes == []  # not a 400: the request is the target's to answer
    [target] = proxy.targets
    assert target.take() == forwarded("GET", "/1")
    target.receive(response(body=b"one"))
    assert client.take() == ok(b"one", CLOSE)
    assert client.closing


async def test_early_answer_then_body_dropped(proxy: Proxy) -> None:
    """The target answers before the request's body is whole: the answer is relayed, the
    target connection closed (its request was not sent whole), the rest of the body read and
    dropped, and the client connection serves the next request."""
    client = proxy.client()
    client.receive(request("POST", "/up", [("Content-Length", "10")]) + b"012")
    await proxy.run_callbacks()
    [first] = proxy.targets
    first.take()
    first.receive(response(413, body=b"too big"))
    assert client.take() == (
        b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Length: 7\r\n"
        + KEEP_ALIVE
        + b"\r\ntoo big"
    )
    assert first.protocol.phase is Phase.CLOSED
    assert client.protocol.unfinished is not None
    client.receive(b"3456789")  # the rest of the body: dropped
    assert client.protocol.unfinished is None
    assert first.late_writes == []
    client.receive(request("GET", "/next"))
    await proxy.run_callbacks()
    second = proxy.targets[-1]
    assert second is not first
    assert second.take() == forwarded("GET", "/next")


async def warm(proxy: Proxy, *paths: str) -> None:
    """Leave one idle pooled connection per path (each on a client of its own)."""
    clients = [proxy.client() for _ in paths]
    for client, path in zip(clients, paths, strict=True):
        client.receive(request("GET", path))
    await proxy.run_callbacks()
    for target in proxy.targets:
        if target.protocol.phase is Phase.WAITING:
            target.take()
            target.receive(response(body=b""))


async def test_early_answer_body_never_reaches_the_next_target(proxy: Proxy) -> None:
    """After an early answer, the rest of the body and the next request arrive in one read,
    and the next request's target (another user's) has an idle pooled connection: it gets the
    next request alone, none of the dropped body (which could be a request of its own)."""
    proxy.route("/bob", "http://bob.test:8080")
    await warm(proxy, "/bob/warm")
    [bob] = proxy.targets
    smuggled = b"GET /secret HTTP/1.1\r\nHost: bob.test\r\n\r\n"
    length = str(10 + len(smuggled))
    client = proxy.client()
    client.receive(request("POST", "/alice/up", [("Content-Length", length)]) + b"0123456789")
    await proxy.run_callbacks()
    alice = proxy.targets[-1]
    alice.receive(response(200, body=b"early"))
    assert client.take().endswith(b"early")
    assert client.protocol.unfinished is not None
    client.receive(smuggled + request("GET", "/bob/next"))
    assert bob.take() == forwarded("GET", "/bob/next")


async def test_early_answer_chunked_body_never_reaches_the_next_target(proxy: Proxy) -> None:
    """As above with a chunked body, and the next request to the same target (two connections
    pooled): the dropped chunks must not follow the next request's head."""
    await warm(proxy, "/warm", "/warm")
    one = proxy.client()
    one.receive(request("POST", "/up", [("Transfer-Encoding", "chunked")]) + b"3\r\nabc\r\n")
    answering = next(t for t in proxy.targets if t.writes)
    answering.take()
    answering.receive(response(200, body=b"early"))
    one.receive(b"2\r\nde\r\n0\r\n\r\n" + request("GET", "/next"))
    [idle] = [t for t in proxy.targets if t is not answering]
    assert idle.take() == forwarded("GET", "/next")


async def test_early_answer_with_connection_close(proxy: Proxy) -> None:
    """An early answer to a request that closes the connection: relayed with Connection:
    close, the target connection closed (when the client's closes: see
    test_own_answers.test_closing_answer_reads_the_rest_first)."""
    client = proxy.client()
    client.receive(request("POST", "/up", [("Content-Length", "10"), ("Connection", "close")]))
    await proxy.run_callbacks()
    [target] = proxy.targets
    target.take()
    target.receive(response(403, body=b"no"))
    assert client.take() == b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n" + CLOSE + b"\r\nno"
    assert target.closing and target.protocol.phase is Phase.CLOSED
    assert proxy.counts() == (0, 0)


async def test_100_continue(proxy: Proxy) -> None:
    """`Expect: 100-continue` goes to the target; its 100 is relayed; the body follows; the
    final answer ends the exchange."""
    client = proxy.client()
    client.receive(request("POST", "/up", [("Expect", "100-continue"), ("Content-Length", "5")]))
    await proxy.run_callbacks()
    [target] = proxy.targets
    assert target.take() == forwarded(
        "POST", "/up", [("Expect", "100-continue"), ("Content-Length", "5")]
    )
    target.receive(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert client.take() == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert target.protocol.phase is Phase.WAITING  # a 1xx came; the final head is awaited
    client.receive(b"hello")
    assert target.take() == b"hello"
    target.receive(response(200, body=b"got it"))
    assert client.take() == ok(b"got it")
    assert proxy.counts() == (0, 1)


async def test_100_continue_refused(proxy: Proxy) -> None:
    """The target answers without a 100 (417): relayed; its connection is closed, not pooled
    (its request was not sent whole); the body the client sends anyway is dropped."""
    client = proxy.client()
    client.receive(request("POST", "/up", [("Expect", "100-continue"), ("Content-Length", "5")]))
    await proxy.run_callbacks()
    [target] = proxy.targets
    target.receive(response(417, body=b""))
    assert client.take().startswith(b"HTTP/1.1 417 Expectation Failed\r\n")
    assert target.protocol.phase is Phase.CLOSED
    assert client.protocol.unfinished is not None
    client.receive(b"hello")
    assert client.protocol.unfinished is None
    assert target.late_writes == [] and client.writes == []


async def test_own_answers_stop_parsing_once_the_client_is_full(proxy: Proxy) -> None:
    """Requests the proxy answers itself (here health checks) never wait in the queue: once
    the client stops reading them, the rest of the read waits unparsed (not a few thousand
    answers buffered), and is answered once the client reads again."""
    count = 300
    client = proxy.client()
    client.fill_on_write = True  # the first answer fills the client's buffer
    client.receive(request("GET", "/_chp_healthz", host="h") * count)
    assert client.protocol.held
    assert len(client.writes) <= MAX_PIPELINED
    answered = len(client.writes)
    while client.protocol.held or client.buffered:
        client.fill_on_write = True
        client.drain()
        await proxy.run_callbacks()
        assert len(client.writes) - answered <= MAX_PIPELINED
        answered = len(client.writes)
    assert answered == count
    assert all(w.startswith(b"HTTP/1.1 200 ") for w in client.writes)
    assert client.reading and not client.protocol.queue


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_a_body_of_head_ends_costs_one_write_a_read(proxy: Proxy, framing: str) -> None:
    """Body bytes cost the same whatever they hold: a body made of `\\r\\n\\r\\n` (which the
    pipelining pieces count as possible head ends) reaches the target in one write per read,
    as a body of anything else (it went in one write per 128 bytes)."""
    read = b"\r\n\r\n" * (64 * 1024 // 4)
    reads = 8
    if framing == "length":
        headers = [("Content-Length", str(len(read) * reads))]
        pieces = [read] * reads
    else:
        headers = [("Transfer-Encoding", "chunked")]
        chunk = b"%x\r\n" % (len(read) - 16) + read[: len(read) - 16] + b"\r\n"
        pieces = [chunk] * reads + [b"0\r\n\r\n"]
    client = proxy.client()
    client.receive(request("POST", "/up", headers))
    await proxy.run_callbacks()
    [target] = proxy.targets
    target.take()
    for piece in pieces:
        client.receive(piece)
    assert len(target.writes) == len(pieces)
    target.receive(response(body=b"ok"))
    assert client.take().endswith(b"ok")

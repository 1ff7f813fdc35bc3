"""Pages from `--error-target` (spec §3.8; design §5 "error pages"): a page is read whole,
however many reads it takes and whatever its framing; a page over `ERROR_PAGE_LIMIT`, one cut
short, or one that does not arrive within `ERROR_TARGET_TIMEOUT` gives the same fallback as an
error target that is down (the status's reason phrase), and its connection is closed rather
than read on.

The error target here is a raw asyncio server, so a test decides exactly how the page's bytes
are framed and written. What it answers is spelled in the request's path, which the proxy
passes on as the `url` parameter: `/page/<framing>/<size>/<style>/<nonce>` (see `PageServer`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from hubproxy.proxy.errors import ERROR_PAGE_LIMIT, ERROR_TARGET_TIMEOUT
from procs import ProxyCache
from rawhttp import RawClient
from support import Proxy

# a page's bytes: numbered lines, so a piece missing or out of place shows in a comparison
BLOCK = b"".join(b"%07d\n" % i for i in range(8192))  # 64 KiB
PAUSE = 0.1  # between the pieces of a page, so that they reach the proxy in separate reads
TRICKLE_PAUSE = 0.25  # between the bytes of a trickled page: 1,272 bytes take over 5 minutes
FALLBACK = b"Not Found"  # the plain default for a 404, as when the error target is down
_nonce = itertools.count()


def page(size: int) -> bytes:
    return (BLOCK * (size // len(BLOCK) + 1))[:size]


def pieces(size: int, piece: int) -> Iterator[bytes]:
    """`page(size)` in pieces of `piece` bytes (a divisor of the block's size)."""
    assert len(BLOCK) % piece == 0
    for start in range(0, size, piece):
        offset = start % len(BLOCK)
        yield BLOCK[offset : offset + min(piece, size - start)]


@dataclass
class Connection:
    """One connection the proxy made to the error target, as the error target saw it."""

    urls: list[str] = field(default_factory=list)  # the `url` of each request, in order
    sent: int = 0  # body bytes written on it
    ended: threading.Event = field(default_factory=threading.Event)
    closed_by_proxy: bool = False


class PageServer:
    """An HTTP/1.1 error target on 127.0.0.1, run by an event loop in a thread of its own.

    For a request whose `url` is `/page/<framing>/<size>/<style>/<nonce>` it answers 200 with
    `page(size)` as `text/html`, framed by `length` (Content-Length), `chunked`, or `close`
    (the end of the connection), and written in the given style:

    - `pieces`: the head, then the body in four writes, each drained, with a pause before each;
    - `fast`: the head, then the body in 64 KiB writes, each drained;
    - `cut`: Content-Length `size`, half the body, a pause, then the connection closed;
    - `trickle`: the head, then one byte every TRICKLE_PAUSE;
    - `stall`: the head and 100 bytes, then nothing until the proxy goes away.

    Connections are kept alive (except `close` and `cut`), and each is recorded.
    With `close`, the server half-closes after the page and waits for the proxy to close.
    """

    def __init__(self) -> None:
        self.connections: list[Connection] = []
        self._lock = threading.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self.port = 0
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("the error target did not start")
        self.url = f"http://127.0.0.1:{self.port}"

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        started.set()
        self._loop.run_forever()
        self._server.close()
        for task in self._tasks:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*self._tasks, return_exceptions=True))
        self._loop.close()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def connection_of(self, url: str) -> Connection:
        """The connection on which the page for `url` was asked for."""
        with self._lock:
            found = [conn for conn in self.connections if url in conn.urls]
        assert len(found) == 1, f"{url} asked on {len(found)} connections"
        return found[0]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = Connection()
        with self._lock:
            self.connections.append(conn)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    conn.closed_by_proxy = True  # between requests, or during a page
                    return
                target = head.split(b" ", 2)[1].decode("latin-1")
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(target).query)
                url = query["url"][0]
                conn.urls.append(url)
                if not await self._answer(url, reader, writer, conn):
                    return
        except ConnectionError:
            conn.closed_by_proxy = True  # reset, or a write after the proxy closed
        except asyncio.CancelledError:
            pass  # the server is stopping; asyncio would report the cancellation as an error
        finally:
            writer.close()
            conn.ended.set()
            self._tasks.discard(task)

    async def _answer(
        self,
        url: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: Connection,
    ) -> bool:
        """Write the page `url` asks for; True if the connection serves on."""
        _, _, framing, size_text, style, _ = url.split("/")
        size = int(size_text)
        head = [b"HTTP/1.1 200 OK", b"Content-Type: text/html"]
        if framing == "length" or style == "cut":
            head.append(b"Content-Length: %d" % size)
        elif framing == "chunked":
            head.append(b"Transfer-Encoding: chunked")
        else:
            head.append(b"Connection: close")
        writer.write(b"\r\n".join(head) + b"\r\n\r\n")
        await writer.drain()

        async def send(data: bytes) -> None:
            writer.write(b"%x\r\n%s\r\n" % (len(data), data) if framing == "chunked" else data)
            await writer.drain()
            conn.sent += len(data)

        body = page(size)
        if style == "pieces":
            quarter = -(-size // 4)
            for start in range(0, size, quarter):
                await asyncio.sleep(PAUSE)
                await send(body[start : start + quarter])
        elif style == "fast":
            for data in pieces(size, 1 << 16):
                await send(data)
        elif style == "cut":
            await send(body[: size // 2])
            await asyncio.sleep(PAUSE)
            return False
        elif style == "trickle":
            for i in range(size):
                await send(body[i : i + 1])
                await asyncio.sleep(TRICKLE_PAUSE)
        elif style == "stall":
            await send(body[:100])
            await reader.read(1)  # b"" once the proxy closes
            conn.closed_by_proxy = True
            return False
        if framing == "chunked":
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        elif framing == "close":
            # the page ends with our half of the connection; the proxy then closes its half
            writer.write_eof()
            await reader.read(1)
            conn.closed_by_proxy = True
            return False
        return True


@pytest.fixture(scope="module")
def page_server() -> Iterator[PageServer]:
    server = PageServer()
    yield server
    server.stop()


def page_url(framing: str, size: int, style: str) -> str:
    return f"/page/{framing}/{size}/{style}/{next(_nonce)}"


def fetch(proxy: Proxy, url: str, timeout: float = 30.0) -> tuple[int, str | None, bytes]:
    """GET `url` through the proxy (no route: a 404): status, Content-Type and the body."""
    with RawClient(proxy.host, proxy.port, timeout=timeout) as client:
        client.request("GET", url)
        resp = client.response()
        return resp.status, resp.header("Content-Type"), resp.body


def assert_page(answer: tuple[int, str | None, bytes], size: int) -> None:
    status, content_type, body = answer
    assert (status, content_type) == (404, "text/html")
    assert len(body) == size
    assert body == page(size)


def assert_fallback(answer: tuple[int, str | None, bytes]) -> None:
    status, content_type, body = answer
    assert (status, content_type, len(body)) == (404, None, len(FALLBACK))
    assert body == FALLBACK


def assert_closed_by_proxy(server: PageServer, url: str) -> Connection:
    """The page's connection was closed by the proxy, with no request after it."""
    conn = server.connection_of(url)
    assert conn.ended.wait(10), "the proxy kept the connection of a refused page"
    assert conn.closed_by_proxy
    assert conn.urls[-1] == url
    return conn


# -- pages served whole ---------------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
def test_page_in_pieces_is_served_whole(
    proxies: ProxyCache, page_server: PageServer, framing: str
) -> None:
    """The finding's page (1,272 bytes) in four writes: the client gets every byte of it."""
    proxy = proxies.get("--error-target", page_server.url)
    url = page_url(framing, 1272, "pieces")
    assert_page(fetch(proxy, url), 1272)


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
def test_page_at_the_limit_is_served_whole(
    proxies: ProxyCache, page_server: PageServer, framing: str
) -> None:
    """A page of exactly ERROR_PAGE_LIMIT bytes is still a page."""
    proxy = proxies.get("--error-target", page_server.url)
    url = page_url(framing, ERROR_PAGE_LIMIT, "fast")
    assert_page(fetch(proxy, url), ERROR_PAGE_LIMIT)


# -- pages refused: the plain default, as when the error target is down ---------------------------


def assert_refused(proxy: Proxy, url: str) -> None:
    """The page for `url` was refused for its size: the plain reason, and one short line."""
    assert_fallback(fetch(proxy, url))
    line = proxy.wait_for_line(
        rf"error: Failed to get custom error page: 404 page .*{ERROR_PAGE_LIMIT}-byte limit$"
    )
    assert len(line.string) < 200
    assert proxy.output().count("Failed to get custom error page") == 1


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
def test_page_over_the_limit_falls_back(
    proxies: ProxyCache, page_server: PageServer, framing: str
) -> None:
    """The finding's 5 MB page, with its length announced or not: the plain reason, one log
    line, the page's connection closed, and the next page served whole on another."""
    proxy = proxies.get("--error-target", page_server.url, tag=f"5MB-{framing}")
    url = page_url(framing, 5_000_000, "fast")
    assert_refused(proxy, url)
    assert_closed_by_proxy(page_server, url)
    after = page_url("length", 1272, "fast")
    assert_page(fetch(proxy, after), 1272)
    assert page_server.connection_of(after) is not page_server.connection_of(url)


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_page_one_byte_over_the_limit_falls_back(
    proxies: ProxyCache, page_server: PageServer, framing: str
) -> None:
    """One byte over is over. Unannounced, such a page may have arrived whole before it is
    refused; its connection is then as clean as after any page, and the next page is whole."""
    proxy = proxies.get("--error-target", page_server.url, tag=f"limit-{framing}")
    assert_refused(proxy, page_url(framing, ERROR_PAGE_LIMIT + 1, "fast"))
    assert_page(fetch(proxy, page_url(framing, 1272, "fast")), 1272)


@pytest.mark.skipif(sys.platform != "linux", reason="reads the proxy's peak RSS from /proc")
def test_page_over_the_limit_is_not_read_on(proxies: ProxyCache, page_server: PageServer) -> None:
    """A 64 MiB page without a length: the proxy stops reading it at the limit (the error
    target cannot write it all), and its peak memory does not grow by anything like the page."""
    proxy = proxies.get("--error-target", page_server.url, tag="memory")
    # the largest page that is served, first: what it costs is the baseline
    assert_page(fetch(proxy, page_url("chunked", ERROR_PAGE_LIMIT, "fast")), ERROR_PAGE_LIMIT)
    before = peak_rss(proxy)
    size = 64 << 20
    url = page_url("chunked", size, "fast")
    assert_fallback(fetch(proxy, url))
    assert peak_rss(proxy) - before < ERROR_PAGE_LIMIT
    conn = assert_closed_by_proxy(page_server, url)
    assert conn.sent < size


def peak_rss(proxy: Proxy) -> int:
    with open(f"/proc/{proxy.proc.pid}/status") as status:
        match = re.search(r"^VmHWM:\s+(\d+) kB$", status.read(), re.M)
    assert match
    return int(match.group(1)) * 1024


def test_page_cut_short_falls_back(proxies: ProxyCache, page_server: PageServer) -> None:
    """The error target closes before the length it announced: no half page."""
    proxy = proxies.get("--error-target", page_server.url)
    assert_fallback(fetch(proxy, page_url("length", 1272, "cut")))


def test_slow_page_is_bounded_by_the_timeout(proxies: ProxyCache, page_server: PageServer) -> None:
    """A page trickled a byte at a time, and one whose body never ends, both get the fallback
    once ERROR_TARGET_TIMEOUT has passed (the two wait at once), and their connections close."""
    proxy = proxies.get("--error-target", page_server.url, tag="slow")
    timeout = (ERROR_TARGET_TIMEOUT.total or 0) + 30
    urls = [page_url("length", 1272, "trickle"), page_url("chunked", 1272, "stall")]
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(RawClient(proxy.host, proxy.port, timeout)) for _ in urls]
        for client, url in zip(clients, urls, strict=True):
            client.request("GET", url)
        for client in clients:
            resp = client.response()
            assert_fallback((resp.status, resp.header("Content-Type"), resp.body))
    for url in urls:
        assert_closed_by_proxy(page_server, url)
    assert proxy.output().count("Failed to get custom error page: timeout") == 2

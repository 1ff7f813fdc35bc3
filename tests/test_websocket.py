"""WebSockets through the proxy (spec §3.7, §2.5, §6.3 cases 2, 16, 26–28)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import socket
import warnings
from datetime import UTC, datetime

import aiohttp
import pytest
import websockets
from aiohttp import web

from support import Backend, Proxy

MAX = 32 * 1024 * 1024


def ws_app(push: int = 0) -> web.Application:
    """CHP's test backend: says `connected`, then echoes each message back.

    `push` messages are sent by the server unprompted right after `connected`; a text message
    `close-me` makes the server start the closing handshake. The server records what it saw.
    """
    app = web.Application()
    warnings.simplefilter("ignore", web.NotAppKeyWarning)
    app["closed_by_client"] = asyncio.Event()
    app["seen"] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return web.json_response({"url": request.raw_path})
        app["seen"].append(dict(request.headers))
        ws = web.WebSocketResponse(max_msg_size=MAX, autoping=True)
        await ws.prepare(request)
        await ws.send_str("connected")
        for i in range(push):
            await ws.send_str(f"tick {i}")
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                if msg.data == "close-me":
                    await ws.close(code=4000, message=b"server says bye")
                    break
                await ws.send_str(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        if ws.close_code is not None and ws.close_code != 4000:
            request.app["closed_by_client"].set()
        return ws

    app.router.add_route("GET", "/{tail:.*}", handler)
    return app


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def activity(proxy: Proxy, key: str) -> str:
    return proxy.routes()[key]["last_activity"]


def ms_now() -> str:
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


async def wait_past(stamp: str) -> None:
    """Let the clock pass `stamp` (millisecond resolution), so a new mark must differ from it."""
    for _ in range(1000):
        if ms_now() > stamp:
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"clock stuck at {stamp}")


@pytest.fixture
def ws_backend(start_backend) -> Backend:
    return start_backend(ws_app())


async def test_basic_websocket(start_proxy, ws_backend):
    proxy = start_proxy("--default-target", ws_backend.url)
    async with websockets.connect(f"ws://127.0.0.1:{proxy.port}/") as ws:
        assert await ws.recv() == "connected"
        await ws.send("hi")
        assert await ws.recv() == "hi"
    headers = ws_backend._app["seen"][0]
    assert headers["X-Forwarded-Proto"] == "ws"
    assert headers["X-Forwarded-For"] == "127.0.0.1"
    assert "X-Forwarded-Host" not in headers


async def test_only_client_data_counts_as_activity(start_proxy, start_backend):
    backend = start_backend(ws_app(push=5))
    proxy = start_proxy()
    proxy.add_route("/ws", backend.url)
    async with websockets.connect(f"ws://127.0.0.1:{proxy.port}/ws/x") as ws:
        assert await ws.recv() == "connected"
        for i in range(5):
            assert await ws.recv() == f"tick {i}"
        before = activity(proxy, "/ws")
        # five messages from the server, and the upgrade itself, did not count
        assert activity(proxy, "/ws") == before
        await wait_past(before)
        await ws.send("from the client")
        assert await ws.recv() == "from the client"
    assert activity(proxy, "/ws") > before


async def test_dead_target_gives_bare_503_and_no_activity(start_proxy):
    proxy = start_proxy()
    proxy.add_route("/missing", "http://127.0.0.1:1")
    before = activity(proxy, "/missing")
    with pytest.raises(websockets.InvalidStatus) as info:
        async with websockets.connect(f"ws://127.0.0.1:{proxy.port}/missing/ws"):
            pass
    assert info.value.response.status_code == 503
    assert activity(proxy, "/missing") == before


def raw_exchange(port: int, request: bytes) -> bytes:
    """Send `request`, read until the proxy closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


UPGRADE = (
    b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: %s\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)


def test_no_route_gives_bare_404_and_closes(start_proxy):
    proxy = start_proxy()
    answer = raw_exchange(proxy.port, UPGRADE % (b"/nowhere", b"websocket"))
    assert answer == b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def test_non_websocket_upgrade_is_dropped(start_proxy, ws_backend):
    proxy = start_proxy("--default-target", ws_backend.url)
    assert raw_exchange(proxy.port, UPGRADE % (b"/", b"h2c")) == b""


def test_refused_upgrade_is_relayed(start_proxy, backend):
    # the echo backend answers the upgrade request with a plain 200
    proxy = start_proxy("--default-target", backend.url)
    answer = raw_exchange(proxy.port, UPGRADE % (b"/plain", b"websocket"))
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b'"url": "/plain"' in answer


async def test_many_messages_of_mixed_sizes_arrive_intact(start_proxy, ws_backend):
    proxy = start_proxy("--default-target", ws_backend.url)
    rng = random.Random(1234)
    sizes = [rng.randrange(0, 4096) for _ in range(10_000)]
    for i in range(0, 10_000, 1000):
        sizes[i] = 1 << 20
    sizes[5] = sizes[9_995] = 16 * 1024 * 1024
    async with websockets.connect(
        f"ws://127.0.0.1:{proxy.port}/", max_size=MAX, compression=None
    ) as ws:
        assert await ws.recv() == "connected"

        async def send_all() -> None:
            for i, size in enumerate(sizes):
                payload = rng.randbytes(size) if size > 4096 else bytes([i % 256]) * size
                if i % 2:
                    await ws.send(payload)
                else:
                    await ws.send(payload.hex()[:size])

        sent = asyncio.ensure_future(send_all())
        for i, size in enumerate(sizes):
            message = await asyncio.wait_for(ws.recv(), 60)
            assert len(message) == size, i
            assert isinstance(message, bytes) == bool(i % 2), i
        await sent


async def test_ping_pong_passes_through(start_proxy, ws_backend):
    proxy = start_proxy("--default-target", ws_backend.url)
    async with websockets.connect(f"ws://127.0.0.1:{proxy.port}/") as ws:
        assert await ws.recv() == "connected"
        latency = await asyncio.wait_for(await ws.ping(b"are you there"), 10)
        assert latency >= 0


async def test_close_by_client_ends_both_sides(start_proxy, ws_backend):
    proxy = start_proxy("--default-target", ws_backend.url)
    async with websockets.connect(f"ws://127.0.0.1:{proxy.port}/") as ws:
        assert await ws.recv() == "connected"
    assert ws.close_code == 1000
    await asyncio.wait_for(asyncio.wrap_future(_event_future(ws_backend)), 10)


def _event_future(backend: Backend):
    import concurrent.futures

    future: concurrent.futures.Future[None] = concurrent.futures.Future()

    async def wait() -> None:
        await backend._app["closed_by_client"].wait()
        future.set_result(None)

    asyncio.run_coroutine_threadsafe(wait(), backend._loop)
    return future


async def test_close_by_server_ends_both_sides(start_proxy, ws_backend):
    proxy = start_proxy("--default-target", ws_backend.url)
    async with websockets.connect(f"ws://127.0.0.1:{proxy.port}/") as ws:
        assert await ws.recv() == "connected"
        await ws.send("close-me")
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
    assert ws.close_code == 4000
    assert ws.close_reason == "server says bye"


async def test_many_concurrent_websockets_and_no_leaked_fds(start_proxy, ws_backend):
    proxy = start_proxy("--default-target", ws_backend.url)
    pid = proxy.proc.pid
    # warm up: the first request opens files (modules, pools) that stay open
    async with websockets.connect(f"ws://127.0.0.1:{proxy.port}/") as ws:
        assert await ws.recv() == "connected"
    baseline = fd_count(pid)

    async def one(i: int) -> str:
        async with websockets.connect(f"ws://127.0.0.1:{proxy.port}/n{i}") as ws:
            assert await ws.recv() == "connected"
            digest = hashlib.sha256(str(i).encode()).hexdigest()
            await ws.send(digest)
            assert await ws.recv() == digest
            return digest

    sockets = [websockets.connect(f"ws://127.0.0.1:{proxy.port}/") for _ in range(200)]
    opened = [await s.__aenter__() for s in sockets]
    try:
        for ws in opened:
            assert await ws.recv() == "connected"
        assert fd_count(pid) >= baseline + 200  # a client and an upstream socket each
        results = await asyncio.gather(*(one(i) for i in range(50)))
        assert len(set(results)) == 50
    finally:
        for s in sockets:
            await s.__aexit__(None, None, None)
    for _ in range(200):  # bounded: the proxy closes its sides as the close frames pass
        if fd_count(pid) <= baseline:
            break
        await asyncio.sleep(0.05)
    assert fd_count(pid) <= baseline


async def test_unix_listener_to_unix_target(start_proxy, start_backend, tmp_path):
    backend_sock = str(tmp_path / "backend.sock")
    backend = start_backend(ws_app(), unix_path=backend_sock)
    proxy_sock = str(tmp_path / "proxy.sock")
    api_sock = str(tmp_path / "api.sock")
    proxy = start_proxy("--socket", proxy_sock, "--api-socket", api_sock)
    proxy.add_route("/unix", backend.url)
    # plain HTTP over both sockets (case 26/27)
    status, _, body = proxy.request("GET", "/unix/path")
    assert status == 200
    assert b'"url": "/unix/path"' in body
    before = activity(proxy, "/unix")
    await wait_past(before)
    async with websockets.unix_connect(proxy_sock, "ws://localhost/unix/ws") as ws:
        assert await ws.recv() == "connected"
        await ws.send("over unix sockets")
        assert await ws.recv() == "over unix sockets"
    assert activity(proxy, "/unix") > before
    proxy.stop()
    assert not os.path.exists(proxy_sock)
    assert not os.path.exists(api_sock)

"""WebSocket load: ping-pong echo over N sockets, and N idle sockets held open.

A raw asyncio Protocol client (a library client would cost more CPU than the proxy we measure):
the masked request frame is built once, and a reply is recognised by its length alone, since the
echo backend answers every frame with the same payload unmasked. One "message" is one round trip:
a frame through the proxy to the backend and its echo back.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import os
import time
from collections.abc import Callable
from typing import cast

from bench.procs import HOST

PAYLOAD = b"hubproxy-bench-message-32-bytes!"  # 32 bytes
MASK = b"\x12\x34\x56\x78"


def _masked_frame(payload: bytes) -> bytes:
    assert len(payload) < 126
    key = (MASK * (len(payload) // 4 + 1))[: len(payload)]
    body = bytes(a ^ b for a, b in zip(payload, key, strict=True))
    return bytes((0x82, 0x80 | len(payload))) + MASK + body


FRAME = _masked_frame(PAYLOAD)
CLOSE_FRAME = bytes((0x88, 0x82)) + MASK + bytes((0x03 ^ MASK[0], 0xE8 ^ MASK[1]))  # 1000
REPLY_LEN = 2 + len(PAYLOAD)


class Counter:
    def __init__(self, limit: int) -> None:
        self.count = 0
        self.limit = limit
        self.running = False


class WsClient(asyncio.Protocol):
    def __init__(self, port: int, path: str, counter: Counter) -> None:
        self.port, self.path, self.counter = port, path, counter
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.pending = 0
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write(
            f"GET {self.path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )

    def data_received(self, data: bytes) -> None:
        if not self.opened.done():
            self.buf += data
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if not sep:
                return
            if not head.startswith((b"HTTP/1.1 101", b"HTTP/1.0 101")):
                self.opened.set_exception(RuntimeError(head.split(b"\r\n")[0].decode()))
                return
            self.opened.set_result(None)
            data = rest
        self.pending += len(data)
        counter = self.counter
        while self.pending >= REPLY_LEN:
            self.pending -= REPLY_LEN
            counter.count += 1
            if counter.running and counter.count < counter.limit:
                assert self.transport is not None
                self.transport.write(FRAME)
            else:
                counter.running = False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed during handshake"))
        if not self.lost.done():
            self.lost.set_result(None)

    def send(self) -> None:
        assert self.transport is not None
        self.transport.write(FRAME)

    def send_close(self) -> None:
        assert self.transport is not None
        self.transport.write(CLOSE_FRAME)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_sockets(
    port: int, n: int, counter: Counter, timeout: float, batch: int = 100
) -> list[WsClient]:
    """Open ``n`` sockets through the proxy and complete their handshakes, ``batch`` at a time."""
    loop = asyncio.get_running_loop()
    clients: list[WsClient] = []

    async def one(i: int) -> WsClient:
        factory: Callable[[], WsClient] = lambda: WsClient(port, f"/ws/echo/{i}", counter)  # noqa: E731
        _, proto = await loop.create_connection(factory, HOST, port)
        await proto.opened
        return proto

    deadline = time.perf_counter() + timeout
    try:
        for start in range(0, n, batch):
            left = deadline - time.perf_counter()
            if left <= 0:
                raise TimeoutError(f"opened {len(clients)} of {n} websockets in {timeout:.0f} s")
            group = [one(i) for i in range(start, min(n, start + batch))]
            clients += await asyncio.wait_for(asyncio.gather(*group), left)
    except BaseException:
        close_all(clients)
        raise
    return clients


async def churn(
    port: int, total: int, concurrency: int, duration: float, timeout: float = 10.0
) -> tuple[int, int, str]:
    """Open and close ``total`` WebSockets, ``concurrency`` at a time, for at most ``duration``
    s (a cycle in flight then gets up to ``timeout`` s more). One cycle: connect, handshake,
    close, and wait until the connection is gone. Even cycles close the TCP connection
    (client-initiated teardown); odd ones send a close frame, the backend answers and hangs up,
    so the proxy must close our side (backend-initiated teardown).
    Returns (cycles completed, cycles failed, the first error)."""
    loop = asyncio.get_running_loop()
    counter = Counter(0)  # no echo load: replies are only counted
    deadline = time.perf_counter() + duration
    started = done = errors = 0
    first_error = ""

    async def worker() -> None:
        nonlocal started, done, errors, first_error
        while started < total and time.perf_counter() < deadline:
            i = started
            started += 1
            transport: asyncio.BaseTransport | None = None
            try:
                async with asyncio.timeout(timeout):
                    transport, proto = await loop.create_connection(
                        functools.partial(WsClient, port, f"/ws/soak/{i}", counter), HOST, port
                    )
                    await proto.opened
                    if i % 2:
                        proto.send_close()
                    else:
                        transport.close()
                    await proto.lost
                done += 1
            except Exception as exc:
                errors += 1
                first_error = first_error or f"{type(exc).__name__}: {exc}"
                if transport is not None:
                    cast(asyncio.Transport, transport).abort()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done, errors, first_error


def close_all(clients: list[WsClient]) -> None:
    for c in clients:
        c.close()


async def echo(clients: list[WsClient], counter: Counter, duration: float) -> tuple[int, float]:
    """Ping-pong on every socket for ``duration`` s (or ``counter.limit`` messages)."""
    counter.count = 0
    counter.running = True
    start = time.perf_counter()
    for c in clients:
        c.send()
    deadline = start + duration
    while counter.running and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
    done, elapsed = counter.count, time.perf_counter() - start
    counter.running = False
    await asyncio.sleep(0.05)  # let in-flight echoes land before the sockets close
    return done, elapsed

"""The hub day's backend: many single-user servers (one listening port each) and a slow hub, in
one asyncio process, steered over a control port.

- control (``--control-port``): ``POST /start`` opens a new user server on the next free port of
  the range and answers its number; ``POST /stop?port=P`` closes its listener and its
  connections (the hub stopped it); ``POST /kill?port=P`` does the same with aborts, as when a
  server dies (the route stays: the proxy's connections are refused from then on);
  ``GET /stats`` counts what was served.
- the hub (first port of the range): ``/hub/error/<code>?url=...`` answers an error page after
  ``--error-delay`` seconds (a busy hub, as in CHP #557); anything else at once.
- a user server: ``/lab`` a 16 KiB page, ``/static/...`` 64 KiB, ``/files/big?size=N`` N bytes
  (streamed with flow control), ``PUT .../upload`` reads the whole body and answers how many
  bytes it got, ``/api/...`` a small JSON answer; ``Upgrade: websocket`` echoes frames (a
  kernel's channels).

User servers take ports from ``--port-base + 1`` upwards, never one twice in a run, inside
``--port-span``: the range sits below the kernel's ephemeral ports, so a socket's port says
whose end it is (the sampler counts sockets by state that way).

Run as ``python -m bench.hubday_backend --control-port C --port-base B --port-span S``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import hashlib
import json
import signal
import urllib.parse
from collections import Counter

HOST = "127.0.0.1"
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
PAGE = b"<!doctype html><title>lab</title>" + b"<!-- lab page -->" * 1000  # ~16 KiB
STATIC = b"/* static */" + b"x" * (64 * 1024 - 12)
API_BODY = json.dumps({"content": [{"name": f"notebook-{i}.ipynb"} for i in range(30)]}).encode()
HUB_PAGE = b"<!doctype html><title>hub</title>" + b"<!-- hub -->" * 170  # ~2 KiB
ERROR_PAGE = b"<!doctype html><title>503</title><p>Your server is not running." + b" " * 2900
BLOCK = b"b" * (256 * 1024)
MAX_HEAD = 64 * 1024


def response(status: str, body: bytes, ctype: bytes, keep: bool) -> bytes:
    head = b"HTTP/1.1 " + status.encode() + b"\r\nContent-Type: " + ctype
    head += b"\r\nContent-Length: %d\r\n" % len(body)
    if not keep:
        head += b"Connection: close\r\n"
    return head + b"\r\n" + body


def parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return method, target, headers


async def read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> int:
    """Read and drop a request body; return its length."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        total = 0
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailers
                return total
            total += len(await reader.readexactly(size))
            await reader.readexactly(2)
    left = int(headers.get("content-length", "0") or 0)
    total = 0
    while left > 0:
        chunk = await reader.read(min(left, 1 << 16))
        if not chunk:
            raise asyncio.IncompleteReadError(b"", left)
        left -= len(chunk)
        total += len(chunk)
    return total


def ws_frame(first: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes((first, n)) + payload
    if n < 1 << 16:
        return bytes((first, 126)) + n.to_bytes(2, "big") + payload
    return bytes((first, 127)) + n.to_bytes(8, "big") + payload


async def ws_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        b1, b2 = await reader.readexactly(2)
        n = b2 & 0x7F
        if n == 126:
            n = int.from_bytes(await reader.readexactly(2), "big")
        elif n == 127:
            n = int.from_bytes(await reader.readexactly(8), "big")
        mask = await reader.readexactly(4) if b2 & 0x80 else b""
        payload = await reader.readexactly(n)
        if mask and n:
            key = (mask * (n // 4 + 1))[:n]
            payload = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(
                n, "big"
            )
        opcode = b1 & 0x0F
        if opcode == 0x8:
            writer.write(ws_frame(0x88, payload[:2]))
            await writer.drain()
            return
        if opcode == 0x9:
            writer.write(ws_frame(0x8A, payload))
        elif opcode in (0x1, 0x2, 0x0):
            writer.write(ws_frame(b1 & 0x8F, payload))
        await writer.drain()


class Backend:
    def __init__(self, base: int, span: int, error_delay: float) -> None:
        self.base, self.span, self.error_delay = base, span, error_delay
        self.next_port = base + 1
        self.servers: dict[int, asyncio.Server] = {}
        self.conns: dict[int, set[asyncio.StreamWriter]] = {}
        self.counts: Counter[str] = Counter()

    async def listen(self, port: int, kind: str) -> asyncio.Server:
        handler = functools.partial(self.handle, port, kind)
        return await asyncio.start_server(
            handler, HOST, port, backlog=511, reuse_address=True, limit=MAX_HEAD
        )

    async def start_user(self) -> int:
        while self.next_port < self.base + self.span:
            port, self.next_port = self.next_port, self.next_port + 1
            try:
                self.servers[port] = await self.listen(port, "user")
            except OSError:
                self.counts["ports_skipped"] += 1
                continue
            self.counts["started"] += 1
            return port
        raise RuntimeError(f"port range {self.base}+{self.span} used up")

    def end_user(self, port: int, kill: bool) -> bool:
        server = self.servers.pop(port, None)
        if server is None:
            return False
        server.close()
        for writer in self.conns.pop(port, set()):
            if kill:
                writer.transport.abort()
            else:
                writer.close()
        self.counts["killed" if kill else "stopped"] += 1
        return True

    async def handle(
        self, port: int, kind: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        conns = self.conns.setdefault(port, set())
        conns.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, target, headers = parse_head(head)
                if headers.get("upgrade", "").lower() == "websocket":
                    await self.upgrade(reader, writer, headers)
                    return
                received = await read_body(reader, headers)
                keep = headers.get("connection", "").lower() != "close"
                await self.answer(kind, method, target, received, writer, keep)
                if not keep:
                    return
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        except (ValueError, UnicodeDecodeError):
            with contextlib.suppress(ConnectionError):
                writer.write(response("400 Bad Request", b"", b"text/plain", False))
        finally:
            conns.discard(writer)
            writer.close()

    async def upgrade(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, headers: dict[str, str]
    ) -> None:
        key = headers.get("sec-websocket-key", "").encode()
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        self.counts["websockets"] += 1
        await ws_echo(reader, writer)

    async def answer(
        self,
        kind: str,
        method: str,
        target: str,
        received: int,
        writer: asyncio.StreamWriter,
        keep: bool,
    ) -> None:
        url = urllib.parse.urlsplit(target)
        path, query = url.path, urllib.parse.parse_qs(url.query)
        self.counts[f"{kind}_requests"] += 1
        if kind == "control":
            body = await self.control(method, path, query)
            writer.write(response("200 OK", body, b"application/json", keep))
        elif kind == "hub":
            if path.startswith("/hub/error/"):
                self.counts["error_pages"] += 1
                await asyncio.sleep(self.error_delay)
                writer.write(response("200 OK", ERROR_PAGE, b"text/html", keep))
            else:
                writer.write(response("200 OK", HUB_PAGE, b"text/html", keep))
        elif path.endswith("/upload"):
            self.counts["uploads"] += 1
            self.counts["upload_bytes"] += received
            body = json.dumps({"received": received}).encode()
            writer.write(response("200 OK", body, b"application/json", keep))
        elif "/files/big" in path:
            await self.download(int(query.get("size", ["1048576"])[0]), writer, keep)
        elif "/static/" in path:
            writer.write(response("200 OK", STATIC, b"application/javascript", keep))
        elif "/api/" in path:
            writer.write(response("200 OK", API_BODY, b"application/json", keep))
        else:
            writer.write(response("200 OK", PAGE, b"text/html", keep))
        await writer.drain()

    async def download(self, size: int, writer: asyncio.StreamWriter, keep: bool) -> None:
        self.counts["downloads"] += 1
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
        head += b"Content-Length: %d\r\n" % size
        writer.write(head + (b"\r\n" if keep else b"Connection: close\r\n\r\n"))
        left = size
        while left > 0:
            piece = BLOCK if left >= len(BLOCK) else BLOCK[:left]
            writer.write(piece)
            left -= len(piece)
            await writer.drain()

    async def control(self, method: str, path: str, query: dict[str, list[str]]) -> bytes:
        if path == "/start" and method == "POST":
            return json.dumps({"port": await self.start_user()}).encode()
        if path in ("/stop", "/kill") and method == "POST":
            done = self.end_user(int(query["port"][0]), kill=path == "/kill")
            return json.dumps({"done": done}).encode()
        if path == "/stats":
            return json.dumps(dict(self.counts) | {"open": len(self.servers)}).encode()
        raise ValueError(f"unknown control {method} {path}")


async def serve(control_port: int, base: int, span: int, error_delay: float) -> None:
    backend = Backend(base, span, error_delay)
    hub = await backend.listen(base, "hub")
    control = await backend.listen(control_port, "control")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in (hub, control, *backend.servers.values()):
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--control-port", type=int, required=True)
    parser.add_argument("--port-base", type=int, required=True, help="the hub's port")
    parser.add_argument("--port-span", type=int, required=True)
    parser.add_argument("--error-delay", type=float, default=1.0)
    args = parser.parse_args()
    coro = serve(args.control_port, args.port_base, args.port_span, args.error_delay)
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


if __name__ == "__main__":
    main()

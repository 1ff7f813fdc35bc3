"""The benchmark's backend: HTTP/1.1 and WebSocket echo on one port, built to never be the
bottleneck (uvloop + httptools Protocol, responses prebuilt once).

- any path containing ``big`` answers a 1 MiB body, anything else ``Hello, World!`` (13 bytes);
- keep-alive unless the request asks to close;
- ``Upgrade: websocket`` switches the connection to an echo of every data frame (server frames
  unmasked, as RFC 6455 requires); ping is answered by pong, close by close.

Run as ``python -m bench.backend --port N`` (the harness pins it to the load core).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import signal
from typing import cast

import httptools

SMALL_BODY = b"Hello, World!"
BIG_BODY = b"x" * (1 << 20)
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _response(body: bytes, keep_alive: bool) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n" % len(body)
    if not keep_alive:
        head += b"Connection: close\r\n"
    return head + b"\r\n" + body


RESPONSES = {
    (big, ka): _response(BIG_BODY if big else SMALL_BODY, ka)
    for big in (False, True)
    for ka in (False, True)
}
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def unmask(payload: bytes, mask: bytes) -> bytes:
    """XOR ``payload`` with the repeated 4-byte ``mask`` (one big-int XOR, fast in CPython)."""
    n = len(payload)
    if n == 0:
        return payload
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def frame(first_byte: int, payload: bytes) -> bytes:
    """An unmasked (server) frame."""
    n = len(payload)
    if n < 126:
        return bytes((first_byte, n)) + payload
    if n < 1 << 16:
        return bytes((first_byte, 126)) + n.to_bytes(2, "big") + payload
    return bytes((first_byte, 127)) + n.to_bytes(8, "big") + payload


class WsEcho:
    """Frame parser + echo for one upgraded connection."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.buf = bytearray()

    def feed(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        out: list[bytes] = []
        pos, end = 0, len(buf)
        while end - pos >= 2:
            b1, b2 = buf[pos], buf[pos + 1]
            length, hdr = b2 & 0x7F, 2
            if length == 126:
                if end - pos < 4:
                    break
                length, hdr = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if end - pos < 10:
                    break
                length, hdr = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            if b2 & 0x80:
                hdr += 4
            if end - pos < hdr + length:
                break
            payload = bytes(buf[pos + hdr : pos + hdr + length])
            if b2 & 0x80:
                payload = unmask(payload, bytes(buf[pos + hdr - 4 : pos + hdr]))
            pos += hdr + length
            opcode = b1 & 0x0F
            if opcode == 0x8:  # close: answer and hang up
                out.append(frame(0x88, payload[:2]))
                self.transport.write(b"".join(out))
                self.transport.close()
                return
            if opcode == 0x9:
                out.append(frame(0x8A, payload))
            elif opcode != 0xA:
                out.append(frame(b1 & 0x8F, payload))
        del buf[:pos]
        if out:
            self.transport.write(b"".join(out))


class BackendProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.ws_key = b""
        self.ws: WsEcho | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.ws is not None:
            self.ws.feed(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade(data[exc.args[0] :])
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.write(BAD_REQUEST)
            self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.ws_key = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"sec-websocket-key":
            self.ws_key = value

    def on_message_complete(self) -> None:
        if self.parser.should_upgrade():
            return  # answered in _upgrade
        assert self.transport is not None
        keep_alive = self.parser.should_keep_alive()
        self.transport.write(RESPONSES[(b"big" in self.url, keep_alive)])
        if not keep_alive:
            self.transport.close()

    def _upgrade(self, rest: bytes) -> None:
        assert self.transport is not None
        if not self.ws_key:
            self.transport.write(BAD_REQUEST)
            self.transport.close()
            return
        accept = base64.b64encode(hashlib.sha1(self.ws_key + WS_GUID).digest())
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        self.ws = WsEcho(self.transport)
        if rest:
            self.ws.feed(rest)


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(BackendProtocol, host, port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # still correct, only slower
        asyncio.run(serve(args.host, args.port))
    else:
        uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()

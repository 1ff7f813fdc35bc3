"""Byte-level HTTP/1.1 helpers for tests: a raw client socket and a raw upstream server.

The tests that check framing, pipelining, `Expect: 100-continue`, timeouts and misbehaving
peers need to see and send exact bytes, which no HTTP client library lets them do. Everything
here blocks with a generous socket timeout (so a hang fails a test instead of stalling it) and
every loop is bounded by the bytes it is given or by EOF.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

TIMEOUT = 10.0
MAX_HEAD = 1 << 20  # a response head longer than this is a test failure, not a head


@dataclass
class RawResponse:
    version: bytes
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    chunked: bool = False
    until_close: bool = False
    raw_head: bytes = b""
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        """The value of the first header called `name` (case-insensitive), or None."""
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        lowered = name.lower().encode()
        return [v.decode("latin-1") for n, v in self.headers if n.lower() == lowered]


class RawClient:
    """One client connection with a buffered reader; `send` bytes, read whole responses."""

    def __init__(self, host: str, port: int, timeout: float = TIMEOUT) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.reader = self.sock.makefile("rb")

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.reader.close()
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(
        self,
        method: str,
        path: str,
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
        host: str = "proxy.test",
        version: str = "HTTP/1.1",
    ) -> None:
        """Send a request; Content-Length is added for a non-empty body unless given."""
        lines = [f"{method} {path} {version}"]
        given = {name.lower() for name, _ in headers or []}
        if host and "host" not in given:
            lines.append(f"Host: {host}")
        lines += [f"{name}: {value}" for name, value in headers or []]
        if body and "content-length" not in given and "transfer-encoding" not in given:
            lines.append(f"Content-Length: {len(body)}")
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

    def read_head(self) -> RawResponse:
        """Read one status line and header block (a 1xx counts as a response of its own)."""
        raw = b""
        line = self._readline()
        raw += line
        version, _, rest = line.rstrip(b"\r\n").partition(b" ")
        code, _, reason = rest.partition(b" ")
        headers: list[tuple[bytes, bytes]] = []
        while True:
            line = self._readline()
            raw += line
            if len(raw) > MAX_HEAD:
                raise AssertionError("response head too long")
            if line in (b"\r\n", b"\n"):
                break
            name, _, value = line.rstrip(b"\r\n").partition(b":")
            headers.append((name, value.strip()))
        return RawResponse(version, int(code), reason, headers, raw_head=raw)

    def response(self, method: str = "GET", skip_informational: bool = True) -> RawResponse:
        """Read one complete response, its body decoded from whatever framing it uses."""
        resp = self.read_head()
        while skip_informational and 100 <= resp.status < 200 and resp.status != 101:
            resp = self.read_head()
        if method == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200:
            return resp
        te = (resp.header("transfer-encoding") or "").lower()
        length = resp.header("content-length")
        if "chunked" in te:
            resp.chunked = True
            resp.body, resp.trailers = self._read_chunked()
        elif length is not None:
            resp.body = self._read_exact(int(length))
        else:
            resp.until_close = True
            resp.body = self.read_to_eof()
        return resp

    def read_to_eof(self, limit: int = 1 << 30) -> bytes:
        """Everything until the peer closes (raises on a timeout, which fails the test)."""
        parts = []
        total = 0
        while total <= limit:
            chunk = self.reader.read1(65536)
            if not chunk:
                return b"".join(parts)
            parts.append(chunk)
            total += len(chunk)
        raise AssertionError(f"more than {limit} bytes before EOF")

    def closed_by_peer(self) -> bool:
        """True once the peer closes (EOF or reset), with nothing sent before; waits up to the
        socket timeout. Any data before the close is a failure and is raised."""
        try:
            data = self.read_to_eof(limit=1 << 20)
        except ConnectionResetError:
            return True
        if data:
            raise AssertionError(f"expected the connection to close, got {data[:200]!r}")
        return True

    def _readline(self) -> bytes:
        line = self.reader.readline(MAX_HEAD)
        if not line:
            raise ConnectionError("connection closed while reading a response head")
        return line

    def _read_exact(self, n: int) -> bytes:
        data = self.reader.read(n)
        if len(data) != n:
            raise ConnectionError(f"incomplete body: {len(data)} of {n} bytes")
        return data

    def _read_chunked(self) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        parts = []
        while True:
            size_line = self._readline()
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                break
            parts.append(self._read_exact(size))
            if self._readline() not in (b"\r\n", b"\n"):
                raise AssertionError("chunk not followed by CRLF")
        trailers = []
        while True:
            line = self._readline()
            if line in (b"\r\n", b"\n"):
                break
            name, _, value = line.rstrip(b"\r\n").partition(b":")
            trailers.append((name, value.strip()))
        return b"".join(parts), trailers


def chunked(*chunks: bytes) -> bytes:
    """A chunked body from `chunks` (the last, empty chunk is added)."""
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks if c) + b"0\r\n\r\n"


class RawServer:
    """A TCP server on 127.0.0.1 that hands every accepted socket to `handler` in a thread.

    `handler(conn)` does whatever misbehaviour a test needs; sockets it leaves open are closed
    by `stop()` (also on exit from a `with` block).
    """

    def __init__(self, handler: Callable[[socket.socket], None]) -> None:
        self.handler = handler
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections: list[socket.socket] = []
        self.accepted = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def __enter__(self) -> RawServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                if self._stopped:
                    conn.close()
                    return
                self.connections.append(conn)
            conn.settimeout(TIMEOUT)
            self.accepted.release()
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self.handler(conn)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            connections, self.connections = self.connections, []
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.close()
        self._thread.join(5)


def read_request_head(conn: socket.socket) -> bytes:
    """Read from `conn` up to the end of a request head (for RawServer handlers)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_HEAD:
            break
    return data


def dead_port() -> tuple[socket.socket, int]:
    """A loopback port nothing listens on, kept reserved while the socket is open.

    A bound socket that never listens makes connects to its port fail with ECONNREFUSED, and
    holding it stops the OS from giving the port to anything else meanwhile.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]

"""Fake transports and an in-process proxy for the protocol tests.

`FakeTransport` stands in for both legs' sockets: it records what its protocol does to it
(writes, half-close, close, abort, pausing reading) and lets the test play the peer (`receive`,
`eof`, `reset`, `fill`/`drain` for the write buffer). Like asyncio's own transports, `close()`
and `abort()` deliver `connection_lost` in a later loop callback (`Proxy.run_callbacks`), and a
peer's EOF closes the transport unless `eof_received` returns true.

`FakeConnector` replaces the event loop's `create_connection` (the call `Pool.connect` makes),
so that every connection to a target is an `UpstreamConnection` on a `FakeTransport`. Attempts
can be made to fail, or held until the test lets them finish (`hold`).

`Proxy` is one `ProxyService` with a route table, the connector, and helpers to open client
connections and to run the loop's pending callbacks.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any, Generic, TypeVar

from hubproxy.config import Config
from hubproxy.proxy import ProxyService
from hubproxy.proxy.server import ClientConnection
from hubproxy.proxy.upstream import UpstreamConnection
from hubproxy.routing import RouteTable

P = TypeVar("P", bound=asyncio.BaseProtocol)

CLIENT_ADDRESS = ("203.0.113.7", 50123)
PROXY_ADDRESS = ("192.0.2.1", 8000)
TARGET = "http://target.test:8080"
HIGH_WATER = 64 * 1024

# what the proxy adds to a response it lets the client connection outlive (Config defaults)
KEEP_ALIVE = b"Connection: keep-alive\r\nKeep-Alive: timeout=5\r\n"
CLOSE = b"Connection: close\r\n"


class FakeSocket:
    """What `get_extra_info("socket")` returns: records the options set on it."""

    family = socket.AF_INET

    def __init__(self) -> None:
        self.options: dict[tuple[int, int], int] = {}

    def setsockopt(self, level: int, name: int, value: int) -> None:
        self.options[(level, name)] = value


class FakeTransport(asyncio.Transport, Generic[P]):
    """One side of a connection: the protocol's transport, and the test's handle on the peer."""

    def __init__(
        self,
        protocol: P,
        *,
        peername: Any = CLIENT_ADDRESS,
        sockname: Any = PROXY_ADDRESS,
        can_write_eof: bool = True,
    ) -> None:
        super().__init__()
        self.protocol = protocol
        self.peername = peername
        self.sockname = sockname
        self.socket = FakeSocket()
        self.half_close = can_write_eof  # False: as TLS, which has no half-close
        self.writes: list[bytes] = []  # what the protocol wrote, write by write
        self.late_writes: list[bytes] = []  # written after close/abort (asyncio drops them)
        self.reading = True
        self.pauses = 0  # pause_reading calls that paused
        self.closing = False  # close() or abort() was called (or the peer reset)
        self.aborted = False
        self.eof_written = False
        self.lost = False  # connection_lost was delivered
        self.lost_with: Exception | None = None
        self.buffered = 0  # what get_write_buffer_size says
        self.fill_on_write = False  # the next write passes the high-water mark (`fill`)
        self._lost_soon = False

    def connect(self) -> FakeTransport[P]:
        """Hand the transport to its protocol (`connection_made`)."""
        self.protocol.connection_made(self)
        return self

    # -- what the test sees ----------------------------------------------------------------------

    @property
    def data(self) -> bytes:
        """Everything written so far."""
        return b"".join(self.writes)

    def take(self) -> bytes:
        """Everything written since the last `take`."""
        data = self.data
        self.writes.clear()
        return data

    # -- the peer, played by the test ------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        """The peer sent `data` (one read)."""
        assert not self.closing, "a closed transport reads nothing"
        assert self.reading, "a paused transport reads nothing"
        self.protocol.data_received(data)  # type: ignore[attr-defined]

    def eof(self) -> None:
        """The peer finished sending (FIN): the transport closes unless the protocol keeps it
        half-open."""
        assert not self.closing
        keep_open = self.protocol.eof_received()  # type: ignore[attr-defined]
        if not keep_open:
            self.close()

    def reset(self, exc: Exception | None = None) -> None:
        """The connection is gone at once (RST, or a read error): `connection_lost(exc)`."""
        self.closing = True
        self._deliver_lost(
            ConnectionResetError(104, "Connection reset by peer") if exc is None else exc
        )

    def hang_up(self) -> None:
        """The connection ended cleanly, at once: `connection_lost(None)` (what a peer's FIN
        comes to once the transport closes)."""
        self.closing = True
        self._deliver_lost(None)

    def fill(self) -> None:
        """The write buffer passes its high-water mark: `pause_writing`."""
        self.buffered = HIGH_WATER + 1
        self.protocol.pause_writing()

    def drain(self) -> None:
        """The write buffer empties: `resume_writing` (and a close waiting for it completes)."""
        self.buffered = 0
        self.protocol.resume_writing()
        if self.closing and not self.aborted:
            self._lose_soon()

    # -- asyncio.Transport -----------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.eof_written, "write() after write_eof()"
        if self.closing:
            self.late_writes.append(bytes(data))
            return
        self.writes.append(bytes(data))
        if self.fill_on_write:  # as asyncio does, from inside write()
            self.fill_on_write = False
            self.fill()

    def write_eof(self) -> None:
        assert self.half_close, "write_eof() on a transport that cannot"
        self.eof_written = True

    def can_write_eof(self) -> bool:
        return self.half_close

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            if not self.buffered:  # as asyncio: what is queued is written first
                self._lose_soon()

    def abort(self) -> None:
        self.aborted = True
        self.closing = True
        self._lose_soon()

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        if self.reading and not self.closing:
            self.reading = False
            self.pauses += 1

    def resume_reading(self) -> None:
        if not self.closing:
            self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (HIGH_WATER // 4, HIGH_WATER)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {
            "peername": self.peername,
            "sockname": self.sockname,
            "socket": self.socket,
        }.get(name, default)

    def _lose_soon(self) -> None:
        if not self._lost_soon and not self.lost:
            self._lost_soon = True
            asyncio.get_running_loop().call_soon(self._deliver_lost, None)

    def _deliver_lost(self, exc: Exception | None) -> None:
        if not self.lost:
            self.lost = True
            self.lost_with = exc
            self.protocol.connection_lost(exc)


Target = FakeTransport[UpstreamConnection]
Client = FakeTransport[ClientConnection]


class FakeConnector:
    """Stands in for `loop.create_connection`: each attempt makes an `UpstreamConnection` on a
    `FakeTransport` (no half-close when TLS is asked for)."""

    def __init__(self) -> None:
        self.targets: list[Target] = []  # every connection made, oldest first
        self.attempts: list[tuple[str, int]] = []
        self.failures: list[BaseException] = []  # raised by the next attempts, in turn
        self.hold = False  # attempts wait for `finish_connecting`
        # the peer's first moves, between connection_made and the pool getting the connection
        self.on_connected: Callable[[Target], None] | None = None
        self._held: list[asyncio.Future[None]] = []

    async def create_connection(
        self,
        protocol_factory: Callable[[], UpstreamConnection],
        host: str,
        port: int,
        *,
        ssl: Any = None,
        server_hostname: str | None = None,
        **_: Any,
    ) -> tuple[Target, UpstreamConnection]:
        self.attempts.append((host, port))
        if self.hold:
            held = asyncio.get_running_loop().create_future()
            self._held.append(held)
            await held
        if self.failures:
            raise self.failures.pop(0)
        protocol = protocol_factory()
        transport = FakeTransport(protocol, peername=(host, port), can_write_eof=ssl is None)
        self.targets.append(transport.connect())
        if self.on_connected is not None:
            self.on_connected(self.targets[-1])
        return transport, protocol

    @property
    def held(self) -> int:
        return sum(1 for future in self._held if not future.done())

    def finish_connecting(self) -> None:
        """Let the held attempts go on (to connect, or to fail with `failures`)."""
        self.hold = False
        for future in self._held:
            if not future.done():
                future.set_result(None)


class Proxy:
    """One `ProxyService` in-process: its route table, the fake connector, its clients."""

    def __init__(self, service: ProxyService, connector: FakeConnector) -> None:
        self.service = service
        self.table: RouteTable = service.table
        self.connector = connector
        self.clients: list[Client] = []

    @classmethod
    def build(cls, connector: FakeConnector, **config: Any) -> Proxy:
        return cls(ProxyService(Config(**config), RouteTable()), connector)

    def route(self, prefix: str = "/", target: str = TARGET) -> None:
        self.table.route_set(prefix, {"target": target})

    def client(self, *, can_write_eof: bool = True) -> Client:
        """A new client connection, made."""
        transport = FakeTransport(ClientConnection(self.service), can_write_eof=can_write_eof)
        self.clients.append(transport.connect())
        return transport

    @property
    def targets(self) -> list[Target]:
        return self.connector.targets

    def counts(self) -> tuple[int, int]:
        """(lent or being connected, idle) target connections."""
        return self.service.upstream_connections()

    async def run_callbacks(self, rounds: int = 8) -> None:
        """Run what the loop has pending (tasks connecting, call_soon callbacks): a few passes
        of the loop, no waiting on a clock."""
        for _ in range(rounds):
            await asyncio.sleep(0)

    def sweep(self, after: float) -> None:
        """One pass of the timeouts, as `after` seconds from now."""
        self.service.sweep_once(time.monotonic() + after)


# -- messages ------------------------------------------------------------------------------------


def request(
    method: str = "GET",
    path: str = "/",
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    *,
    version: str = "1.1",
    host: str | None = "proxy.test",
) -> bytes:
    """A request's bytes; a Content-Length is added for a body unless `headers` frame it."""
    lines = [f"{method} {path} HTTP/{version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    names = set()
    for name, value in headers:
        lines.append(f"{name}: {value}")
        names.add(name.lower())
    if body and not names & {"content-length", "transfer-encoding"}:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def response(
    status: int = 200,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    *,
    reason: str = "",
    version: str = "1.1",
    length: bool = True,
) -> bytes:
    """A response's bytes; a Content-Length is added unless `length` is false or `headers`
    frame the body."""
    lines = [f"HTTP/{version} {status} {reason or _reason(status)}"]
    names = set()
    for name, value in headers:
        lines.append(f"{name}: {value}")
        names.add(name.lower())
    if length and not names & {"content-length", "transfer-encoding"}:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Whatever"


def head_of(data: bytes) -> bytes:
    """The head of the first message in `data` (up to its blank line, included)."""
    end = data.find(b"\r\n\r\n")
    assert end >= 0, f"no whole head in {data!r}"
    return data[: end + 4]


def forwarded(
    method: str = "GET",
    path: str = "/",
    headers: Iterable[tuple[str, str]] = (),
    *,
    host: str = "proxy.test",
    websocket: bool = False,
) -> bytes:
    """The head the proxy sends the target for a request from CLIENT_ADDRESS with `headers`
    (those it passes on as they are), under the default configuration."""
    lines = [f"{method} {path} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines += [
        f"Host: {host}",
        f"X-Forwarded-For: {CLIENT_ADDRESS[0]}",
        "X-Forwarded-Port: 80",
        f"X-Forwarded-Proto: {'ws' if websocket else 'http'}",
    ]
    if websocket:
        lines += ["Connection: Upgrade", "Upgrade: websocket"]
    else:
        lines.append(f"X-Forwarded-Host: {host}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

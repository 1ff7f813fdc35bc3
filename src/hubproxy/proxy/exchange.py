"""One request and its answer, between the two legs, and what each leg may ask of the other.

A `Request` is made by the client leg when a request head begins. It owns the link between the
client connection it arrived on and the target connection lent to answer it: `link` and
`unlink` are the only places that link is made and undone. The legs speak to each other only
through the two interfaces below (`ClientSide`, `UpstreamSide`); neither writes the other's
fields.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Protocol

from hubproxy.proxy.headers import NO_BODY

if TYPE_CHECKING:
    from hubproxy.routing import Route


class Sink(enum.Enum):
    """Where the request's body goes as it is parsed."""

    BUFFER = "buffer"  # kept in `pending` until a target connection is linked
    STREAM = "stream"  # written to the linked target connection
    DROP = "drop"  # read and dropped: the proxy answered the request itself


# the hot path reads these as module globals (an Enum's class attribute costs ~90 ns)
BUFFER, STREAM, DROP = Sink.BUFFER, Sink.STREAM, Sink.DROP


class UpstreamSide(Protocol):
    """What the client leg may ask of the target connection linked to its request."""

    last_io: float
    request: Request | None  # written by Request.link and Request.unlink only

    def send(self, data: bytes, now: float) -> None:
        """Write the request's bytes (or, in a tunnel, the client's) to the target."""

    def send_eof(self) -> None:
        """The client finished sending (a tunnel's half-close)."""

    def client_full(self) -> None:
        """The client's write buffer is full: stop reading the target."""

    def client_drained(self) -> None:
        """The client's write buffer has room again."""

    @property
    def answering(self) -> bool:
        """Whether the target's answer has begun reaching the client (it cannot be replaced)."""

    def abandon(self) -> None:
        """The client gives the exchange up: close the connection, never reuse it."""


class ClientSide(Protocol):
    """What the target connection may ask of the client leg of its request."""

    def send(self, data: bytes, now: float) -> None:
        """Write the target's bytes to the client (`now`: when they were read)."""

    def send_parts(self, parts: list[bytes], now: float) -> None:
        """Write several pieces at once."""

    def answer_begins(self, request: Request, status: int, keep: bool) -> bytes:
        """The target's answer to `request` (its `status`) is about to go out: it is counted,
        and the Connection header its head ends with is returned (`keep`: the response allows
        the client connection to serve another request)."""

    def response_done(self, request: Request, status: int) -> None:
        """The answer to `request` has been relayed whole (the link is already undone)."""

    def response_broken(self, request: Request) -> None:
        """The target failed after its answer began: the client can only be cut off."""

    def upstream_failed(
        self,
        request: Request,
        exc: BaseException | None,
        retryable: bool,
        detail: str | None = None,
    ) -> None:
        """The target failed before its answer began (the link is already undone)."""

    def upstream_full(self) -> None:
        """The target connection's write buffer is full: stop reading the client."""

    def upstream_drained(self) -> None: ...

    def tunnel_opened(self, request: Request) -> None:
        """The target accepted the upgrade: bytes flow unparsed both ways from now on."""

    def peer_eof(self) -> None:
        """The target finished sending, in a tunnel."""

    def tunnel_closed(self) -> None: ...


class Request:
    """A request from its head's first byte until its answer is written."""

    __slots__ = (
        "body_kind",
        "client",
        "complete",
        "head",
        "headers",
        "headers_done",
        "host",
        "http11",
        "keep_alive",
        "method",
        "pending",
        "route",
        "sink",
        "started",
        "upgrade",
        "upstream",
        "url",
        "websocket",
    )

    def __init__(self, client: ClientSide, started: float) -> None:
        self.client = client
        self.started = started  # monotonic time of the read that began it (durations)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.method = b""
        self.http11 = True
        self.keep_alive = True  # the client connection may serve another request after this
        self.upgrade = False
        self.websocket = False
        self.head = False
        self.complete = False  # parsed to its end (body and trailers)
        self.sink = BUFFER
        # body chunks parsed before a target was linked (made by the first: most requests
        # have no body, and a linked one needs it no more)
        self.pending: list[bytes] | None = None
        self.route: Route | None = None
        self.host: bytes | None = None
        self.body_kind = NO_BODY
        self.upstream: UpstreamSide | None = None

    def link(self, upstream: UpstreamSide) -> None:
        """A target connection answers this request: from now on its body streams there."""
        self.upstream = upstream
        self.sink = STREAM
        upstream.request = self

    def unlink(self) -> UpstreamSide | None:
        """The target connection is done with this request (answered, failed or abandoned);
        the connection is returned, if there was one. What is still to come of the body is
        dropped: once the next request is answered in the same read, body bytes left streaming
        would reach that request's target (request smuggling)."""
        self.sink = DROP
        upstream = self.upstream
        if upstream is not None:
            upstream.request = None
            self.upstream = None
        return upstream

    def answered_here(self) -> None:
        """The proxy answers this request itself: the rest of its body is dropped."""
        self.sink = DROP
        self.pending = None

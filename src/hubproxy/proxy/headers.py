"""Header rewriting for both legs: pure functions over lists of raw `(name, value)` pairs.

Upstream requests keep the client's headers except the hop-by-hop ones (RFC 9110 §7.6.1, plus
`trailer` as CHP strips it), take the custom headers on top, and gain CHP's X-Forwarded-*.
Responses keep the upstream's headers except the hop-by-hop ones; the proxy frames each leg
itself and says so in `Connection` / `Transfer-Encoding`.
"""

from __future__ import annotations

from typing import NamedTuple

from hubproxy.config import Config
from hubproxy.proxy.paths import split_host
from hubproxy.proxy.target import DEFAULT_PORTS, Target

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"transfer-encoding", b"upgrade"}
)
# `Connection` options that name no header to drop: the options themselves, and the headers
# that frame a message, which a peer must not be able to strip (`Connection: content-length`
# would leave its body to be read as the next request: a smuggled request)
_CONNECTION_OPTIONS = frozenset(
    {b"close", b"keep-alive", b"upgrade", b"content-length", b"transfer-encoding", b"host"}
)

# What the request builder must look at (anything else is copied through untouched).
_HOST, _XFF, _XFPORT, _XFPROTO, _XFHOST, _LENGTH, _CHUNKED, _CONNECTION, _DROP = range(9)
_SPECIAL_REQUEST = {
    b"host": _HOST,
    b"x-forwarded-for": _XFF,
    b"x-forwarded-port": _XFPORT,
    b"x-forwarded-proto": _XFPROTO,
    b"x-forwarded-host": _XFHOST,
    b"content-length": _LENGTH,
    b"transfer-encoding": _CHUNKED,
    b"connection": _CONNECTION,
    b"keep-alive": _DROP,
    b"proxy-connection": _DROP,
    b"te": _DROP,
    b"upgrade": _DROP,
    b"trailer": _DROP,
}

# how a request's body is framed; the last two are requests that cannot be forwarded (400)
NO_BODY, LENGTH_BODY, CHUNKED_BODY, BAD_FRAMING, BAD_HOST = 0, 1, 2, 3, 4


class ForwardRules:
    """The request-rewriting part of the configuration, rendered to bytes once."""

    __slots__ = ("change_origin", "custom", "custom_host", "custom_xf", "special", "x_forward")

    def __init__(self, config: Config) -> None:
        self.x_forward = config.x_forward
        self.change_origin = config.change_origin
        custom: dict[bytes, tuple[bytes, bytes]] = {}
        for name, value in config.custom_headers:
            raw = name.encode("latin-1")
            custom[raw.lower()] = (raw, value.encode("latin-1"))
        self.custom = b"".join(n + b": " + v + b"\r\n" for n, v in custom.values())
        special = dict(_SPECIAL_REQUEST)
        if not self.x_forward:  # X-Forwarded-* pass through untouched
            for forwarded in (
                b"x-forwarded-for",
                b"x-forwarded-port",
                b"x-forwarded-proto",
                b"x-forwarded-host",
            ):
                del special[forwarded]
        for lowered in custom:  # custom headers replace the client's, whatever their case
            special[lowered] = _DROP
        # the client's Host is still read (RFC 9112 §3.2: exactly one, or a 400), even when a
        # custom Host replaces it upstream
        special[b"host"] = _HOST
        self.special = special
        # a custom Host or X-Forwarded-* also replaces the one the proxy would compute
        self.custom_host = b"host" in custom and not config.change_origin
        self.custom_xf = frozenset(n for n in custom if n.startswith(b"x-forwarded-"))


class RequestHead(NamedTuple):
    head: bytes
    body: int  # NO_BODY, LENGTH_BODY, CHUNKED_BODY, or BAD_FRAMING / BAD_HOST (a 400)
    host: bytes | None  # the client's Host header


def build_request_head(
    rules: ForwardRules,
    method: bytes,
    path: bytes,
    headers: Headers,
    target: Target,
    client_ip: bytes,
    proto: bytes,
    websocket: bool = False,
) -> RequestHead:
    """The upstream request line and headers, and how its body is framed."""
    out = [method, b" ", path, b" HTTP/1.1\r\n"]
    special = rules.special
    host = xff = xfport = xfproto = xfhost = None
    body = NO_BODY
    connection_options: list[bytes] = []
    for name, value in headers:
        kind = special.get(name.lower())
        if kind is None:
            out += (name, b": ", value, b"\r\n")
        elif kind == _HOST:
            if host is not None:  # which one would the target believe? (RFC 9112 §3.2)
                return RequestHead(b"", BAD_HOST, host)
            host = value
        elif kind == _LENGTH:
            body = LENGTH_BODY
            out += (name, b": ", value, b"\r\n")
        elif kind == _CHUNKED:
            # llhttp refuses other codings only after the head is parsed, so check here: we
            # frame bodies ourselves and understand nothing but `chunked` (RFC 9112 §6.1: 400),
            # spelt on one line or several (a second line is a second coding)
            if body == CHUNKED_BODY or value.strip().lower() != b"chunked":
                return RequestHead(b"", BAD_FRAMING, host)
            body = CHUNKED_BODY
        elif kind == _CONNECTION:
            connection_options += (o.strip().lower() for o in value.split(b","))
        elif kind == _XFF:
            xff = value if xff is None else xff + b"," + value
        elif kind == _XFPORT:
            xfport = value if xfport is None else xfport + b"," + value
        elif kind == _XFPROTO:
            xfproto = value if xfproto is None else xfproto + b"," + value
        elif kind == _XFHOST:
            xfhost = value if xfhost is None else xfhost
    if connection_options:
        named = {o for o in connection_options if o and o not in _CONNECTION_OPTIONS}
        if named:  # headers the client marked as hop-by-hop go no further (RFC 9110 §7.6.1)
            out = _without(out, named)
    if rules.change_origin:
        out += (b"Host: ", target.netloc, b"\r\n")
    elif not rules.custom_host:
        out += (b"Host: ", target.netloc if host is None else host, b"\r\n")
    if rules.x_forward:
        port: bytes | None = None
        if host and host[:1] != b"[":  # split_host's common case, spelt out: per request
            _, colon, given = host.partition(b":")
            if colon and given.isdigit():  # (bytes.isdigit: ASCII digits only)
                port = given
        elif host:
            port = split_host(host)[1]
        if port is None:
            port = b"443" if proto in (b"https", b"wss") else b"80"
        # spelt out, not a loop over a list of tuples: this runs for every request
        custom_xf = rules.custom_xf
        if b"x-forwarded-for" not in custom_xf:
            value = client_ip if xff is None else xff + b"," + client_ip
            out += (b"X-Forwarded-For: ", value, b"\r\n")
        if b"x-forwarded-port" not in custom_xf:
            value = port if xfport is None else xfport + b"," + port
            out += (b"X-Forwarded-Port: ", value, b"\r\n")
        if b"x-forwarded-proto" not in custom_xf:
            value = proto if xfproto is None else xfproto + b"," + proto
            out += (b"X-Forwarded-Proto: ", value, b"\r\n")
        if not websocket and b"x-forwarded-host" not in custom_xf:
            # CHP sends none on WebSocket upgrades, and never appends to it
            out += (b"X-Forwarded-Host: ", xfhost or host or b"", b"\r\n")
    if rules.custom:
        out.append(rules.custom)
    if body == CHUNKED_BODY:
        out.append(b"Transfer-Encoding: chunked\r\n")
    elif body == NO_BODY and method in (b"DELETE", b"OPTIONS"):
        out.append(b"Content-Length: 0\r\n")
    if websocket:
        out.append(b"Connection: Upgrade\r\nUpgrade: websocket\r\n")
    out.append(b"\r\n")
    # (tuple.__new__: a NamedTuple's own __new__ is a Python function, a call per request)
    return tuple.__new__(RequestHead, (b"".join(out), body, host))


def _without(out: list[bytes], names: set[bytes]) -> list[bytes]:
    """`out` (a request line then name/": "/value/CRLF quadruples) without the named headers."""
    kept = out[:4]
    for i in range(4, len(out), 4):
        if out[i].lower() not in names:
            kept += out[i : i + 4]
    return kept


# -- responses -----------------------------------------------------------------------------------

_RESPONSE_DROP = HOP_BY_HOP | {b"trailer"}


def rewrite_location(
    location: bytes,
    target: Target,
    client_host: bytes | None,
    auto_rewrite: bool,
    protocol_rewrite: bytes | None,
) -> bytes:
    """CHP's Location rewrite: only absolute Locations that point at the target itself."""
    scheme, sep, rest = location.partition(b"://")
    if not sep:
        return location
    end = len(rest)
    for delimiter in (b"/", b"?", b"#"):
        found = rest.find(delimiter)
        if 0 <= found < end:
            end = found
    authority, tail = rest[:end], rest[end:]
    if authority.lower() not in _authorities(target):
        return location
    if auto_rewrite and client_host:
        authority = client_host
    if protocol_rewrite:
        scheme = protocol_rewrite
    return scheme + b"://" + authority + tail


def _authorities(target: Target) -> tuple[bytes, ...]:
    """The spellings of the target's host:port in a URL (the port may be left out if default)."""
    host = f"[{target.host}]" if ":" in target.host else target.host
    explicit = f"{host}:{target.port}".encode().lower()
    if DEFAULT_PORTS.get(target.scheme) == target.port:
        return explicit, host.encode().lower()
    return (explicit,)


def filter_response_headers(headers: Headers) -> tuple[Headers, bytes | None]:
    """Drop hop-by-hop headers; also return the Content-Length value if there is one."""
    kept: Headers = []
    length = None
    named: set[bytes] | None = None  # made only for a Connection header (runs per response)
    for name, value in headers:
        lowered = name.lower()
        if lowered in _RESPONSE_DROP:
            if lowered == b"connection":
                if named is None:
                    named = set()
                named.update(o.strip().lower() for o in value.split(b","))
            continue
        if lowered == b"content-length":
            length = value
        kept.append((name, value))
    if named:
        named -= _CONNECTION_OPTIONS
        if named:
            kept = [(n, v) for n, v in kept if n.lower() not in named]
    return kept, length


class LocationRewrite(NamedTuple):
    """How `Location` headers of redirects are rewritten (None: they are not)."""

    auto: bool  # --auto-rewrite: the client's Host replaces the target's
    protocol: bytes | None  # --protocol-rewrite: this scheme replaces the target's


REWRITE_STATUSES = frozenset({201, 301, 302, 307, 308})  # whose Location CHP rewrites


def rewrite_locations(
    headers: Headers, rewrite: LocationRewrite, target: Target, client_host: bytes | None
) -> Headers:
    """`headers` with their Location rewritten (see rewrite_location)."""
    return [
        (
            name,
            rewrite_location(value, target, client_host, rewrite.auto, rewrite.protocol)
            if name.lower() == b"location"
            else value,
        )
        for name, value in headers
    ]


# -- response framing: how a response's body ends, and how it is relayed ------------------------

# how the body of a final response is relayed to the client
RELAY_NONE = 0  # there is none (HEAD, 204, 304)
RELAY_AS_IS = 1  # as the target framed it: its Content-Length is passed on
RELAY_CHUNKED = 2  # chunked by the proxy, for an HTTP/1.1 client (the target's has no length)
RELAY_TO_CLOSE = 3  # until the client connection closes (an HTTP/1.0 client, no length)


class ResponseFraming(NamedTuple):
    relay: int  # one of RELAY_*
    ends_at_close: bool  # the target's body ends when its connection does (RFC 9112 §6.3)
    skip_body: bool  # the parser will expect a body that a HEAD response never has
    keep_client: bool  # the client connection may serve another request after this one


def is_chunked(headers: Headers) -> bool:
    """Whether the body is chunked: the last coding of the last Transfer-Encoding is `chunked`
    (with any other last coding the body ends when the connection does, RFC 9112 §6.3)."""
    codings = [v for n, v in headers if n.lower() == b"transfer-encoding"]
    return bool(codings) and codings[-1].rpartition(b",")[2].strip().lower() == b"chunked"


def response_framing(
    status: int,
    headers: Headers,
    length: bytes | None,
    head_request: bool,
    client_http11: bool,
    websocket_request: bool,
) -> ResponseFraming:
    """How the body of a final (>= 200) response to a request ends and is relayed.

    `length` is the response's Content-Length (as `filter_response_headers` found it).
    """
    keep_client = not websocket_request  # a refused upgrade: answered, then both sides close
    if head_request or status in (204, 304):
        # no body; llhttp knows it for 204 and 304 but expects one after a HEAD's head
        skip = head_request and length != b"0"
        return _FRAMINGS[RELAY_NONE, False, skip, keep_client]
    ends_at_close = length is None and not is_chunked(headers)
    if length is not None:
        return _FRAMINGS[RELAY_AS_IS, ends_at_close, False, keep_client]
    if client_http11:
        return _FRAMINGS[RELAY_CHUNKED, ends_at_close, False, keep_client]
    return _FRAMINGS[RELAY_TO_CLOSE, ends_at_close, False, False]


# every answer response_framing can give, made once (it runs for every response)
_FRAMINGS = {
    (relay, ends, skip, keep): ResponseFraming(relay, ends, skip, keep)
    for relay in (RELAY_NONE, RELAY_AS_IS, RELAY_CHUNKED, RELAY_TO_CLOSE)
    for ends in (False, True)
    for skip in (False, True)
    for keep in (False, True)
}


def keep_alive(http11: bool, headers: Headers) -> bool:
    """Whether a target keeps its connection after a response, judged from its version and its
    Connection header alone (HTTP/1.1 unless `close`; HTTP/1.0 never, as we send no
    `keep-alive` to it)."""
    return http11 and not any(
        n.lower() == b"connection" and b"close" in v.lower() for n, v in headers
    )


def upgrades_to_websocket(headers: Headers) -> bool:
    """Whether a 101 response's headers say `Upgrade: websocket`."""
    return any(n.lower() == b"upgrade" and v.strip().lower() == b"websocket" for n, v in headers)


def response_head(status: int, phrase: bytes, headers: Headers, extra: bytes) -> bytes:
    """A relayed response head: its status line (with the target's own reason `phrase`, as it
    sent it), `headers`, then `extra` (pre-rendered lines). The proxy's own answers take their
    status lines from `status.status_line`."""
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, phrase)]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts += (extra, b"\r\n")
    return b"".join(parts)

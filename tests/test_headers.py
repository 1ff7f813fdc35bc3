"""Header rewriting as tables of cases (spec §3.5, §3.6): the upstream request head, the
response headers passed back, and CHP's Location rewrite."""

from __future__ import annotations

import pytest

from hubproxy.config import Config
from hubproxy.proxy.headers import (
    CHUNKED_BODY,
    LENGTH_BODY,
    NO_BODY,
    ForwardRules,
    RequestHead,
    build_request_head,
    filter_response_headers,
    rewrite_location,
)
from hubproxy.proxy.target import parse_target

TARGET = "http://127.0.0.1:8888"
HOST = b"proxy.example:8000"


def build(
    headers: list[tuple[bytes, bytes]],
    method: bytes = b"GET",
    path: bytes = b"/x",
    target: str = TARGET,
    client_ip: bytes = b"127.0.0.1",
    proto: bytes = b"http",
    websocket: bool = False,
    **config: object,
) -> tuple[bytes, list[tuple[bytes, bytes]], RequestHead]:
    """Build a head and parse it back: (request line, [(name, value)], RequestHead)."""
    rules = ForwardRules(Config(**config))  # type: ignore[arg-type]
    result = build_request_head(
        rules, method, path, headers, parse_target(target), client_ip, proto, websocket=websocket
    )
    assert result.head.endswith(b"\r\n\r\n")
    lines = result.head[:-4].split(b"\r\n")
    parsed = []
    for line in lines[1:]:
        name, sep, value = line.partition(b": ")
        assert sep, line
        parsed.append((name, value))
    return lines[0], parsed, result


def values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for n, v in headers if n.lower() == name.lower()]


def names(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    return {n.lower() for n, _ in headers}


# -- the request line and the Host header ----------------------------------------------------------


def test_request_line_is_http11_with_the_given_path() -> None:
    line, _, _ = build([(b"Host", HOST)], method=b"PATCH", path=b"/a%20b?q=1")
    assert line == b"PATCH /a%20b?q=1 HTTP/1.1"


def test_host_passes_through_unchanged() -> None:
    _, headers, result = build([(b"host", b"Some.Host:8000")])
    assert values(headers, b"host") == [b"Some.Host:8000"]
    assert result.host == b"Some.Host:8000"


@pytest.mark.parametrize(
    ("target", "host"),
    [
        ("http://127.0.0.1:8888", b"127.0.0.1:8888"),
        ("http://example.com:80/path", b"example.com"),  # the scheme's default port is left out
        ("http://example.com", b"example.com"),
        ("https://example.com:443", b"example.com"),
        ("https://example.com:8443", b"example.com:8443"),
        ("http://[::1]:8888", b"[::1]:8888"),
    ],
)
def test_change_origin_sets_the_targets_host(target: str, host: bytes) -> None:
    _, headers, result = build([(b"Host", HOST)], target=target, change_origin=True)
    assert values(headers, b"host") == [host]
    # X-Forwarded-Host and -Port still describe what the client asked for
    assert values(headers, b"x-forwarded-host") == [HOST]
    assert values(headers, b"x-forwarded-port") == [b"8000"]
    assert result.host == HOST


def test_missing_host_gets_the_targets() -> None:
    """An HTTP/1.0 client may send no Host; Node's client then adds the target's."""
    _, headers, result = build([(b"Accept", b"*/*")])
    assert values(headers, b"host") == [b"127.0.0.1:8888"]
    assert values(headers, b"x-forwarded-host") == [b""]
    assert values(headers, b"x-forwarded-port") == [b"80"]
    assert result.host is None


# -- X-Forwarded-* --------------------------------------------------------------------------------


def test_x_forwarded_added() -> None:
    _, headers, _ = build([(b"Host", HOST)])
    assert values(headers, b"x-forwarded-for") == [b"127.0.0.1"]
    assert values(headers, b"x-forwarded-port") == [b"8000"]
    assert values(headers, b"x-forwarded-proto") == [b"http"]
    assert values(headers, b"x-forwarded-host") == [HOST]


def test_x_forwarded_appended_without_spaces() -> None:
    """Spec §3.5's observed example: `1.2.3.4` becomes `1.2.3.4,127.0.0.1`, `https` becomes
    `https,http`; X-Forwarded-Host is kept, not appended to."""
    _, headers, _ = build(
        [
            (b"Host", HOST),
            (b"X-Forwarded-For", b"1.2.3.4"),
            (b"X-Forwarded-Proto", b"https"),
            (b"X-Forwarded-Port", b"443"),
            (b"X-Forwarded-Host", b"hub.example.org"),
        ]
    )
    assert values(headers, b"x-forwarded-for") == [b"1.2.3.4,127.0.0.1"]
    assert values(headers, b"x-forwarded-proto") == [b"https,http"]
    assert values(headers, b"x-forwarded-port") == [b"443,8000"]
    assert values(headers, b"x-forwarded-host") == [b"hub.example.org"]


def test_x_forwarded_names_match_case_insensitively() -> None:
    _, headers, _ = build([(b"HOST", HOST), (b"x-FORWARDED-for", b"1.2.3.4")])
    assert values(headers, b"x-forwarded-for") == [b"1.2.3.4,127.0.0.1"]
    assert values(headers, b"x-forwarded-host") == [HOST]


def test_repeated_x_forwarded_for_becomes_one_list() -> None:
    """Two client XFF lines make one header holding both, then the client's address. (Node joins
    repeats with `, `; the addresses in the list are what matters to Tornado's xheaders.)"""
    _, headers, _ = build(
        [(b"Host", HOST), (b"X-Forwarded-For", b"1.1.1.1"), (b"X-Forwarded-For", b"2.2.2.2")]
    )
    (xff,) = values(headers, b"x-forwarded-for")
    assert [part.strip() for part in xff.split(b",")] == [b"1.1.1.1", b"2.2.2.2", b"127.0.0.1"]


@pytest.mark.parametrize(
    ("host", "proto", "port"),
    [
        (b"h:8000", b"http", b"8000"),
        (b"h", b"http", b"80"),
        (b"h", b"https", b"443"),
        (b"h:8443", b"https", b"8443"),
        (b"[::1]:9010", b"http", b"9010"),  # CHP gives `1` here (quirk); we take the real port
        (b"[::1]", b"http", b"80"),
        (b"h:", b"http", b"80"),
    ],
)
def test_x_forwarded_port(host: bytes, proto: bytes, port: bytes) -> None:
    _, headers, _ = build([(b"Host", host)], proto=proto)
    assert values(headers, b"x-forwarded-port") == [port]
    assert values(headers, b"x-forwarded-proto") == [proto]


@pytest.mark.parametrize(
    "host",
    [b"h:8000", b"h", b"h:", b"h:80x", b"h:8:0", b"a:b:80", b"h:\xd9\xa1", b":80", b"[::1]:9010",
     b"[::1]", b"[::1]x:80", b"[::1", b"8080", b"h:+80", b"h: 80"],
)  # fmt: skip
def test_x_forwarded_port_is_split_hosts_port(host: bytes) -> None:
    """build_request_head spells split_host's common case out (it runs per request): the same
    port for every Host, the odd ones too, or the default one where split_host finds none."""
    from hubproxy.proxy.paths import split_host

    _, headers, _ = build([(b"Host", host)])
    assert values(headers, b"x-forwarded-port") == [split_host(host)[1] or b"80"]


def test_x_forwarded_for_is_the_client_address() -> None:
    _, headers, _ = build([(b"Host", HOST)], client_ip=b"::ffff:10.0.0.7")
    assert values(headers, b"x-forwarded-for") == [b"::ffff:10.0.0.7"]


def test_websocket_gets_no_x_forwarded_host() -> None:
    _, headers, _ = build(
        [
            (b"Host", HOST),
            (b"Connection", b"Upgrade"),
            (b"Upgrade", b"websocket"),
            (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
            (b"Sec-WebSocket-Version", b"13"),
        ],
        proto=b"ws",
        websocket=True,
    )
    assert b"x-forwarded-host" not in names(headers)
    assert values(headers, b"x-forwarded-proto") == [b"ws"]
    assert values(headers, b"x-forwarded-for") == [b"127.0.0.1"]
    assert values(headers, b"x-forwarded-port") == [b"8000"]
    assert [v.lower() for v in values(headers, b"upgrade")] == [b"websocket"]
    assert [v.lower() for v in values(headers, b"connection")] == [b"upgrade"]
    assert values(headers, b"sec-websocket-key") == [b"dGhlIHNhbXBsZSBub25jZQ=="]


def test_no_x_forward_adds_nothing_and_passes_the_clients() -> None:
    _, headers, _ = build(
        [(b"Host", HOST), (b"X-Forwarded-For", b"1.2.3.4"), (b"X-Forwarded-Host", b"a.b")],
        x_forward=False,
    )
    assert values(headers, b"x-forwarded-for") == [b"1.2.3.4"]
    assert values(headers, b"x-forwarded-host") == [b"a.b"]
    assert b"x-forwarded-proto" not in names(headers)
    assert b"x-forwarded-port" not in names(headers)


def test_no_x_forward_without_client_headers() -> None:
    _, headers, _ = build([(b"Host", HOST)], x_forward=False)
    assert not any(n.startswith(b"x-forwarded-") for n in names(headers))


# -- custom headers -------------------------------------------------------------------------------


def test_custom_headers_are_added() -> None:
    """§6.4 case 5: `k1: v1` and ` k2 : host:123 ` (as the CLI parses them)."""
    _, headers, _ = build([(b"Host", HOST)], custom_headers=(("k1", "v1"), ("k2", "host:123")))
    assert values(headers, b"k1") == [b"v1"]
    assert values(headers, b"k2") == [b"host:123"]


@pytest.mark.parametrize("client_name", [b"x-custom", b"X-Custom", b"X-CUSTOM"])
def test_custom_headers_override_client_values_whatever_the_case(client_name: bytes) -> None:
    _, headers, _ = build(
        [(b"Host", HOST), (client_name, b"from-client")], custom_headers=(("X-Custom", "v"),)
    )
    assert values(headers, b"x-custom") == [b"v"]


def test_custom_header_overrides_a_repeated_client_header() -> None:
    _, headers, _ = build(
        [(b"Host", HOST), (b"X-Custom", b"a"), (b"x-custom", b"b")],
        custom_headers=(("x-custom", "v"),),
    )
    assert values(headers, b"x-custom") == [b"v"]


def test_custom_header_overrides_x_forwarded_proto() -> None:
    """`--custom-header "X-Forwarded-Proto: https"` behind a TLS terminator: the upstream must
    see one X-Forwarded-Proto, the custom one (custom headers override, §3.5)."""
    _, headers, _ = build(
        [(b"Host", HOST), (b"X-Forwarded-Proto", b"http")],
        custom_headers=(("X-Forwarded-Proto", "https"),),
    )
    assert values(headers, b"x-forwarded-proto") == [b"https"]


def test_custom_header_overrides_host() -> None:
    """A custom Host replaces the client's: a request with two Host lines is invalid."""
    _, headers, _ = build([(b"Host", HOST)], custom_headers=(("Host", "custom.example"),))
    assert values(headers, b"host") == [b"custom.example"]


# -- hop-by-hop headers ---------------------------------------------------------------------------


def test_hop_by_hop_headers_are_stripped() -> None:
    _, headers, _ = build(
        [
            (b"Host", HOST),
            (b"Connection", b"keep-alive, X-Hop"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Proxy-Connection", b"keep-alive"),
            (b"TE", b"trailers"),
            (b"Upgrade", b"h2c"),
            (b"Trailer", b"X-Checksum"),
            (b"X-Hop", b"1"),
            (b"X-Keep", b"2"),
            (b"Cookie", b"a=b"),
            (b"Authorization", b"token abc"),
        ]
    )
    present = names(headers)
    for hop in (
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"upgrade",
        b"trailer",
        b"x-hop",
        b"transfer-encoding",
    ):
        assert hop not in present
    assert values(headers, b"x-keep") == [b"2"]
    assert values(headers, b"cookie") == [b"a=b"]
    assert values(headers, b"authorization") == [b"token abc"]


@pytest.mark.parametrize(
    "connection", [b"close, X-A", b"X-A,X-B", b"  x-a ,  X-B  ", b"Upgrade, X-A, x-b"]
)
def test_headers_named_in_connection_are_stripped(connection: bytes) -> None:
    _, headers, _ = build(
        [
            (b"Host", HOST),
            (b"X-A", b"1"),
            (b"Connection", connection),
            (b"X-B", b"2"),
            (b"X-C", b"3"),
        ]
    )
    present = names(headers)
    assert b"x-a" not in present
    if b"b" in connection.lower():
        assert b"x-b" not in present
    assert values(headers, b"x-c") == [b"3"]


def test_connection_cannot_strip_end_to_end_essentials_by_accident() -> None:
    """`Connection: close` only concerns the client's hop; nothing else is lost."""
    _, headers, _ = build([(b"Host", HOST), (b"Connection", b"close"), (b"Cookie", b"c=1")])
    assert values(headers, b"cookie") == [b"c=1"]
    assert values(headers, b"host") == [HOST]


@pytest.mark.parametrize(
    "connection", [b"content-length", b"keep-alive, Content-Length", b"host, transfer-encoding"]
)
def test_connection_cannot_strip_the_framing(connection: bytes) -> None:
    """A body whose Content-Length a peer could strip would be read upstream as the next
    request (a smuggled request, with X-Forwarded-* of the client's choosing)."""
    _, headers, result = build(
        [(b"Host", HOST), (b"Connection", connection), (b"Content-Length", b"76")]
    )
    assert result.body == LENGTH_BODY
    assert values(headers, b"content-length") == [b"76"]
    assert values(headers, b"host") == [HOST]


def test_filter_response_connection_cannot_strip_its_length() -> None:
    kept, length = filter_response_headers(
        [(b"Connection", b"content-length"), (b"Content-Length", b"5")]
    )
    assert kept == [(b"Content-Length", b"5")]
    assert length == b"5"


# -- body framing ---------------------------------------------------------------------------------


def test_no_body() -> None:
    _, headers, result = build([(b"Host", HOST)])
    assert result.body == NO_BODY
    assert b"content-length" not in names(headers)
    assert b"transfer-encoding" not in names(headers)


def test_content_length_body() -> None:
    _, headers, result = build([(b"Host", HOST), (b"Content-Length", b"12")], method=b"POST")
    assert result.body == LENGTH_BODY
    assert values(headers, b"content-length") == [b"12"]
    assert b"transfer-encoding" not in names(headers)


@pytest.mark.parametrize("value", [b"chunked", b"Chunked"])
def test_chunked_body(value: bytes) -> None:
    _, headers, result = build([(b"Host", HOST), (b"Transfer-Encoding", value)], method=b"POST")
    assert result.body == CHUNKED_BODY
    assert [v.lower() for v in values(headers, b"transfer-encoding")] == [b"chunked"]
    assert b"content-length" not in names(headers)


@pytest.mark.parametrize("method", [b"DELETE", b"OPTIONS"])
def test_delete_and_options_without_body_get_content_length_0(method: bytes) -> None:
    _, headers, result = build([(b"Host", HOST)], method=method)
    assert values(headers, b"content-length") == [b"0"]
    assert result.body == NO_BODY


@pytest.mark.parametrize("method", [b"DELETE", b"OPTIONS"])
def test_delete_and_options_keep_their_content_length(method: bytes) -> None:
    _, headers, result = build([(b"Host", HOST), (b"Content-Length", b"5")], method=method)
    assert values(headers, b"content-length") == [b"5"]
    assert result.body == LENGTH_BODY


def test_chunked_delete_stays_chunked() -> None:
    """CHP (http-proxy's deleteLength) would set `content-length: 0` and drop the
    transfer-encoding while still piping the body: a desynchronised upstream. We keep the
    client's framing."""
    _, headers, result = build(
        [(b"Host", HOST), (b"Transfer-Encoding", b"chunked")], method=b"DELETE"
    )
    assert result.body == CHUNKED_BODY
    assert b"content-length" not in names(headers)
    assert [v.lower() for v in values(headers, b"transfer-encoding")] == [b"chunked"]


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"PUT"])
def test_other_methods_without_body_get_no_content_length(method: bytes) -> None:
    _, headers, _ = build([(b"Host", HOST)], method=method)
    assert b"content-length" not in names(headers)


# -- responses ------------------------------------------------------------------------------------


def test_filter_response_headers_drops_hop_by_hop() -> None:
    kept, length = filter_response_headers(
        [
            (b"Content-Type", b"text/plain"),
            (b"Connection", b"keep-alive, X-Private"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Trailer", b"X-Sum"),
            (b"Upgrade", b"h2c"),
            (b"Proxy-Connection", b"close"),
            (b"TE", b"trailers"),
            (b"X-Private", b"secret"),
            (b"X-Public", b"1"),
        ]
    )
    assert [(n.lower(), v) for n, v in kept] == [
        (b"content-type", b"text/plain"),
        (b"x-public", b"1"),
    ]
    assert length is None


def test_filter_response_headers_returns_content_length() -> None:
    kept, length = filter_response_headers([(b"Content-Length", b"42"), (b"ETag", b'"x"')])
    assert length == b"42"
    assert (b"Content-Length", b"42") in kept
    assert (b"ETag", b'"x"') in kept


def test_filter_response_headers_keeps_repeated_headers_in_order() -> None:
    cookies = [(b"Set-Cookie", b"a=1; Path=/"), (b"Set-Cookie", b"b=2; HttpOnly")]
    kept, _ = filter_response_headers([(b"Date", b"now"), *cookies, (b"Vary", b"Cookie")])
    assert [h for h in kept if h[0] == b"Set-Cookie"] == cookies
    assert kept[0] == (b"Date", b"now") and kept[-1] == (b"Vary", b"Cookie")


def test_filter_response_connection_close_drops_nothing_else() -> None:
    kept, _ = filter_response_headers([(b"Connection", b"close"), (b"Location", b"/x")])
    assert kept == [(b"Location", b"/x")]


# -- Location rewrite (§3.6) ----------------------------------------------------------------------

CLIENT_HOST = b"proxy.example:8000"

REWRITE = [
    # (target, Location, auto_rewrite, protocol_rewrite, expected)
    # relative Locations and other hosts never match
    (TARGET, b"/relative/path", True, b"https", b"/relative/path"),
    (TARGET, b"relative", True, b"https", b"relative"),
    (TARGET, b"http://foo.com:12345/whatever", True, b"https", b"http://foo.com:12345/whatever"),
    (TARGET, b"http://127.0.0.1:9999/x", True, b"https", b"http://127.0.0.1:9999/x"),
    (TARGET, b"http://127.0.0.1/x", True, b"https", b"http://127.0.0.1/x"),
    # the target itself: host:port, scheme or both
    (TARGET, b"http://127.0.0.1:8888/whatever", True, None, b"http://proxy.example:8000/whatever"),
    (
        TARGET,
        b"http://127.0.0.1:8888/whatever",
        False,
        b"https",
        b"https://127.0.0.1:8888/whatever",
    ),
    (TARGET, b"http://127.0.0.1:8888/a?b=c", True, b"https", b"https://proxy.example:8000/a?b=c"),
    # §6.3 case 22: an https Location naming the (http) target's host:port
    (
        TARGET,
        b"https://127.0.0.1:8888/whatever",
        True,
        b"https",
        b"https://proxy.example:8000/whatever",
    ),
    (TARGET, b"http://127.0.0.1:8888", True, None, b"http://proxy.example:8000"),
    # host names compare case-insensitively; the default port may be left out
    (
        "http://localhost:8888",
        b"http://LOCALHOST:8888/x",
        True,
        None,
        b"http://proxy.example:8000/x",
    ),
    ("http://example.com", b"http://example.com/x", True, None, b"http://proxy.example:8000/x"),
    ("http://example.com", b"http://example.com:80/x", True, None, b"http://proxy.example:8000/x"),
    ("http://example.com:8080", b"http://example.com/x", True, None, b"http://example.com/x"),
    ("http://[::1]:8888", b"http://[::1]:8888/x", True, None, b"http://proxy.example:8000/x"),
    # neither option: untouched (the caller does not even ask, but the function agrees)
    (TARGET, b"http://127.0.0.1:8888/x", False, None, b"http://127.0.0.1:8888/x"),
]


@pytest.mark.parametrize(("target", "location", "auto", "proto", "expected"), REWRITE)
def test_rewrite_location(
    target: str, location: bytes, auto: bool, proto: bytes | None, expected: bytes
) -> None:
    assert rewrite_location(location, parse_target(target), CLIENT_HOST, auto, proto) == expected


def test_rewrite_location_without_client_host_keeps_the_authority() -> None:
    location = b"http://127.0.0.1:8888/x"
    assert rewrite_location(location, parse_target(TARGET), None, True, None) == location
    assert (
        rewrite_location(location, parse_target(TARGET), None, True, b"https")
        == b"https://127.0.0.1:8888/x"
    )


def test_rewrite_location_with_a_query_and_no_path() -> None:
    """`http://h:p?x=1` names the target as much as `http://h:p/?x=1` does (CHP parses it as a
    URL and rewrites it)."""
    result = rewrite_location(
        b"http://127.0.0.1:8888?x=1", parse_target(TARGET), CLIENT_HOST, True, None
    )
    assert result in (b"http://proxy.example:8000?x=1", b"http://proxy.example:8000/?x=1")

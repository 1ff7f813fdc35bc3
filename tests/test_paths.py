"""Request paths as tables of cases: routing keys and forwarded paths (spec §3.2, §3.4).

`split_target` is CHP's WHATWG parse of the request-target reduced to what matters (dot segments,
`\\`, absolute-form, percent-encoding of bytes a URL path may not hold); `decode_path` is
decodeURIComponent (strict UTF-8); `split_host` cuts a Host into name and port; `host_key` builds
the host-routing key; `strip_prefix` and `join_paths` make the upstream path
(`--no-include-prefix`, http-proxy's urlJoin).
"""

from __future__ import annotations

import pytest

from hubproxy.proxy.paths import (
    BadPath,
    decode_path,
    host_key,
    join_paths,
    split_host,
    split_target,
    strip_prefix,
)

# -- split_target ---------------------------------------------------------------------------------

SPLIT_TARGET = [
    # plain paths and queries pass through untouched
    (b"/", b"/", b""),
    (b"/any/thing?x=1", b"/any/thing", b"x=1"),
    (b"/a?b?c", b"/a", b"b?c"),
    (b"/a?", b"/a", b""),
    (b"/a?x=/../y&z=%2e%2e", b"/a", b"x=/../y&z=%2e%2e"),  # dot segments in a query stay
    (b"/bar//x", b"/bar//x", b""),  # empty segments are kept
    (b"/b%40r/b%20r/rest/of/it", b"/b%40r/b%20r/rest/of/it", b""),  # escapes kept as sent
    (b"/b@r/b%20r/rest/of/it", b"/b@r/b%20r/rest/of/it", b""),  # `@` stays literal
    (b"/a%2Fb", b"/a%2Fb", b""),  # an encoded slash is not a separator here
    (b"/.well-known/x", b"/.well-known/x", b""),  # a dot that starts a name is no dot segment
    (b"/a/.../b", b"/a/.../b", b""),
    (b"/a/..%2fb", b"/a/..%2fb", b""),  # `..%2f` is not a dot segment
    # dot segments are resolved (WHATWG), a trailing one leaves a trailing slash
    (b"/a/../bar/x", b"/bar/x", b""),
    (b"/a/./b", b"/a/b", b""),
    (b"/a/b/..", b"/a/", b""),
    (b"/a/b/.", b"/a/b/", b""),
    (b"/a/b/../", b"/a/", b""),
    (b"/a/..", b"/", b""),
    (b"/..", b"/", b""),
    (b"/./", b"/", b""),
    (b"/../../x", b"/x", b""),
    (b"/a/./../b/./c?q=/./", b"/b/c", b"q=/./"),
    # ... also when spelled with %2e, in either case
    (b"/a/%2e%2e/b", b"/b", b""),
    (b"/a/%2E%2E/b", b"/b", b""),
    (b"/a/.%2e/b", b"/b", b""),
    (b"/a/%2e./b", b"/b", b""),
    (b"/a/%2E./b", b"/b", b""),
    (b"/a/%2e/b", b"/a/b", b""),
    (b"/a/b/%2e%2e", b"/a/", b""),
    (b"/user/alice/%2e%2e/%2e%2e/hub/admin", b"/hub/admin", b""),
    # a backslash is read as a slash
    (b"/a\\b", b"/a/b", b""),
    (b"/a\\..\\b", b"/b", b""),
    (b"/user\\alice\\..\\bob?x", b"/user/bob", b"x"),
    # absolute-form: only the path and query count
    (b"http://example.com/x/y?q=1", b"/x/y", b"q=1"),
    (b"http://example.com", b"/", b""),
    (b"http://example.com?q=1", b"/", b"q=1"),
    (b"HTTPS://Example.com:8443/a/../b", b"/b", b""),
    (b"http://user@example.com:80/p", b"/p", b""),
    # asterisk-form and other relative targets are read relative to the root
    (b"*", b"/*", b""),
    # a fragment (which clients never send) is dropped
    (b"/a#frag", b"/a", b""),
    (b"/a?b=1#frag", b"/a", b"b=1"),
    # bytes a URL path may not hold are percent-encoded (WHATWG path percent-encode set)
    (b'/a"b', b"/a%22b", b""),
    (b"/a{b}", b"/a%7Bb%7D", b""),
    (b"/a<b>`", b"/a%3Cb%3E%60", b""),
    (b"/\xc3\xbc", b"/%C3%BC", b""),
    (b"/\xe7\xa7\x80/x", b"/%E7%A7%80/x", b""),
    # a leading `//` is a path, as in CHP's upstream path (see test_double_slash_is_a_path)
    (b"//bar/x", b"//bar/x", b""),
]


@pytest.mark.parametrize(("raw", "path", "query"), SPLIT_TARGET)
def test_split_target(raw: bytes, path: bytes, query: bytes) -> None:
    assert split_target(raw) == (path, query)


def test_double_slash_is_a_path() -> None:
    """CHP's WHATWG parse reads `//bar/x` as host `bar` and path `/x` for routing, but forwards
    `//bar/x` upstream; we keep one reading for both: a path whose first segment is `bar`."""
    path, _ = split_target(b"//bar/x")
    assert decode_path(path) == "//bar/x"


@pytest.mark.parametrize("raw", [row[0] for row in SPLIT_TARGET])
def test_split_target_is_idempotent(raw: bytes) -> None:
    """Normalising a normalised path changes nothing (the forwarded path is stable)."""
    path, query = split_target(raw)
    again = path + (b"?" + query if query else b"")
    assert split_target(again) == (path, query)


# -- decode_path ----------------------------------------------------------------------------------

DECODE = [
    (b"/", "/"),
    (b"/plain/path", "/plain/path"),
    (b"/has%20space/%C3%BC", "/has space/ü"),
    (b"/user/foo%40bar", "/user/foo@bar"),
    (b"/b%40r/b%20r", "/b@r/b r"),
    (b"/a%2Fb", "/a/b"),  # decodes to a separator
    (b"/a%2fb", "/a/b"),
    (b"/%E7%A7%80%E6%A8%B9", "/秀樹"),
    (b"/%e2%82%ac", "/€"),  # lower-case hex
    (b"/100%25", "/100%"),
    (b"/%2525", "/%25"),  # decoded once only
    (b"/~TestJH/has@", "/~TestJH/has@"),
    (b"/%F0%9F%98%80", "/\U0001f600"),
]


@pytest.mark.parametrize(("path", "key"), DECODE)
def test_decode_path(path: bytes, key: str) -> None:
    assert decode_path(path) == key


@pytest.mark.parametrize(
    "path",
    [
        # malformed escapes
        b"/%",
        b"/a%",
        b"/%4",
        b"/%zz",
        b"/%g0",
        b"/%%41",
        b"/%E0%A4%A",  # CHP's own example
        # escapes of bytes that are not UTF-8
        b"/%FF",
        b"/%C3",  # truncated sequence
        b"/%C3%28",  # bad continuation byte
        b"/%C0%AF",  # overlong `/`
        b"/%ED%A0%80",  # a UTF-16 surrogate
        b"/%F4%90%80%80",  # beyond U+10FFFF
        b"/ok/%80/x",
    ],
)
def test_decode_path_refuses(path: bytes) -> None:
    with pytest.raises(BadPath):
        decode_path(path)


def test_bad_path_is_a_value_error() -> None:
    """The data plane answers BadPath with 500; it must not be mistaken for anything else."""
    assert issubclass(BadPath, ValueError)


# -- split_host -----------------------------------------------------------------------------------

SPLIT_HOST = [
    ("example.org", ("example.org", None)),
    ("example.org:8000", ("example.org", "8000")),
    ("127.0.0.1:9000", ("127.0.0.1", "9000")),
    ("[::1]", ("[::1]", None)),
    ("[::1]:9010", ("[::1]", "9010")),
    ("[fe80::1%25eth0]:80", ("[fe80::1%25eth0]", "80")),
    ("[::1", ("[::1", None)),  # never closed: all name
    ("[::1]x", ("[::1]", None)),
    ("[::1]:", ("[::1]", None)),
    ("example.org:", ("example.org", None)),  # an empty port is no port
    ("example.org:http", ("example.org", None)),  # nor is one that is not digits
    ("example.org:８０", ("example.org", None)),  # nor one of non-ASCII digits
    ("a:1:2", ("a", None)),
    ("", ("", None)),
]


@pytest.mark.parametrize(("host", "parts"), SPLIT_HOST)
def test_split_host(host: str, parts: tuple[str, str | None]) -> None:
    assert split_host(host) == parts
    # bytes in, bytes out: the data plane splits Host headers as it received them
    raw = host.encode("utf-8")
    name, port = parts
    assert split_host(raw) == (name.encode("utf-8"), port.encode() if port else None)


# -- host_key -------------------------------------------------------------------------------------

HOST_KEYS = [
    (b"test.localhost.jovyan.org:8000", "/some/path", "/test.localhost.jovyan.org/some/path"),
    (b"test.example.com", "/", "/test.example.com/"),
    (b"TEST.example.com", "/x", "/TEST.example.com/x"),  # case kept: lookup is case-sensitive
    (None, "/x", "/undefined/x"),  # no Host at all (HTTP/1.0): CHP's literal `undefined`
    (b"", "/x", "//x"),  # an empty Host is an empty segment
    (b"127.0.0.1:9000", "/a", "/127.0.0.1/a"),
    # A bracketed IPv6 literal keeps its brackets (CHP cuts at the first `:` and gets `[`).
    (b"[::1]:9010", "/x", "/[::1]/x"),
    (b"[::1]", "/x", "/[::1]/x"),
    (b"h\xc3\xa9.example", "/", "/h\xc3\xa9.example/"),  # bytes are taken as latin-1
]


@pytest.mark.parametrize(("host", "path", "key"), HOST_KEYS)
def test_host_key(host: bytes | None, path: str, key: str) -> None:
    assert host_key(host, path) == key


# -- strip_prefix ---------------------------------------------------------------------------------

STRIP = [
    (b"/bar/rest/of/it", 1, b"/rest/of/it"),
    (b"/bar", 1, b""),  # nothing after the prefix: the target's path is used unchanged
    (b"/bar/", 1, b"/"),
    (b"/any", 0, b"/any"),  # prefix `/`: nothing is cut (CHP would cut the leading slash)
    (b"/", 0, b"/"),
    (b"/a/b/c", 2, b"/c"),
    (b"/a/b/c/", 3, b"/"),
    # Whole encoded segments are cut, whatever their escapes (CHP slices the raw string by the
    # length of the decoded prefix and so cuts in the wrong place; spec §9 quirk 10).
    (b"/b%40r/b%20r/rest/of/it", 2, b"/rest/of/it"),
    (b"/%E7%A7%80/x", 1, b"/x"),
    (b"/bar//x", 1, b"//x"),
]


@pytest.mark.parametrize(("path", "segments", "rest"), STRIP)
def test_strip_prefix(path: bytes, segments: int, rest: bytes) -> None:
    assert strip_prefix(path, segments) == rest


# -- join_paths -----------------------------------------------------------------------------------

JOIN = [
    # (target path, target query, request path, request query) -> upstream request-target
    (b"/", b"", b"/any/thing", b"x=1", b"/any/thing?x=1"),
    (b"/foo", b"", b"/bar/rest/of/it", b"", b"/foo/bar/rest/of/it"),
    (b"/foo", b"", b"/bar", b"query=foo", b"/foo/bar?query=foo"),
    (b"/foo", b"tq=1", b"/bar", b"q=3", b"/foo/bar?tq=1&q=3"),
    (b"/foo", b"", b"/rest/of/it", b"", b"/foo/rest/of/it"),
    (b"/", b"", b"/rest/of/it", b"", b"/rest/of/it"),
    (b"/foo", b"", b"/b%40r/b%20r/rest/of/it", b"", b"/foo/b%40r/b%20r/rest/of/it"),
    (b"/foo", b"", b"/b@r/b%20r/rest/of/it", b"", b"/foo/b@r/b%20r/rest/of/it"),
    (b"/foo", b"tq=1", b"/bar//x", b"", b"/foo/bar//x?tq=1"),  # other double slashes stay
    # exactly one slash at the boundary
    (b"/foo/", b"", b"/bar", b"", b"/foo/bar"),
    (b"/foo", b"", b"bar", b"", b"/foo/bar"),
    (b"/foo//", b"", b"/bar", b"", b"/foo//bar"),
    (b"/foo", b"", b"/", b"", b"/foo/"),
    (b"/foo/", b"", b"/", b"", b"/foo/"),
    (b"/", b"", b"/", b"", b"/"),
    # an empty request part (--no-include-prefix on an exact match) leaves the target alone
    (b"/foo", b"", b"", b"", b"/foo"),
    (b"/foo", b"", b"", b"q=1", b"/foo?q=1"),
    (b"/foo", b"tq=1", b"", b"", b"/foo?tq=1"),
    (b"/foo", b"tq=1", b"", b"q=1", b"/foo?tq=1&q=1"),
]


@pytest.mark.parametrize(("tpath", "tquery", "path", "query", "joined"), JOIN)
def test_join_paths(tpath: bytes, tquery: bytes, path: bytes, query: bytes, joined: bytes) -> None:
    assert join_paths(tpath, tquery, path, query) == joined


# -- spec §3.4's table, composed from the pure functions ------------------------------------------

SPEC_TABLE = [
    # (target path, target query, prefix depth, request, include_prefix, prepend_path, upstream)
    ("/", "", 0, b"/any/thing?x=1", True, True, b"/any/thing?x=1"),
    ("/foo", "", 1, b"/bar/rest/of/it", True, True, b"/foo/bar/rest/of/it"),
    ("/foo", "tq=1", 1, b"/bar?q=3", True, True, b"/foo/bar?tq=1&q=3"),
    ("/foo", "", 1, b"/bar/rest/of/it", True, False, b"/bar/rest/of/it"),
    ("/foo", "", 1, b"/bar/rest/of/it", False, True, b"/foo/rest/of/it"),
    ("/foo", "", 1, b"/bar/rest/of/it", False, False, b"/rest/of/it"),
    ("/foo", "", 2, b"/b%40r/b%20r/rest/of/it", True, True, b"/foo/b%40r/b%20r/rest/of/it"),
    ("/foo", "", 2, b"/b@r/b%20r/rest/of/it", True, True, b"/foo/b@r/b%20r/rest/of/it"),
    ("/foo", "tq=1", 1, b"/bar//x", True, True, b"/foo/bar//x?tq=1"),
]


def _upstream_path(
    tpath: str, tquery: str, depth: int, raw: bytes, include_prefix: bool, prepend_path: bool
) -> bytes:
    """The upstream request-target the way the data plane composes it (server.py `start`)."""
    path, query = split_target(raw)
    if not include_prefix:
        path = strip_prefix(path, depth)
    if prepend_path:
        return join_paths(tpath.encode(), tquery.encode(), path, query) or b"/"
    return join_paths(b"/", b"", path, query) or b"/"


@pytest.mark.parametrize(
    ("tpath", "tquery", "depth", "raw", "include", "prepend", "upstream"), SPEC_TABLE
)
def test_spec_table(
    tpath: str,
    tquery: str,
    depth: int,
    raw: bytes,
    include: bool,
    prepend: bool,
    upstream: bytes,
) -> None:
    assert _upstream_path(tpath, tquery, depth, raw, include, prepend) == upstream

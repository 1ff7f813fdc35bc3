"""Request paths: the routing key of a request, and the path it is forwarded with.

Pure functions of bytes, so they are tested as tables of cases. CHP parses the request-target as
a WHATWG URL; the parts of that which matter are done here: dot segments (also `%2e`) resolved,
`\\` read as `/`, an absolute-form target reduced to its path. The common case, a plain path
with none of those characters, is recognised by a few substring checks and left untouched.
`split_host` cuts a Host value into name and port, for host routing, X-Forwarded-Port and the
redirect listener alike.
"""

from __future__ import annotations

import re
from typing import AnyStr

from hubproxy.jscompat import decode_uri_component

_SCHEME = re.compile(rb"^[A-Za-z][A-Za-z0-9+.-]*://")
# bytes WHATWG percent-encodes in a path (beyond what the HTTP parser already refuses)
_PATH_ENCODE = re.compile(rb'[\x00-\x20"<>`{}\x7f-\xff]')


class BadPath(ValueError):
    """A request path that cannot be decoded (CHP answers 500)."""


def split_target(raw: bytes) -> tuple[bytes, bytes]:
    """(path, query) of a request-target, the path normalised and still percent-encoded.

    The query comes without its `?`; a fragment, which clients should never send, is dropped.
    """
    if b"#" in raw:
        raw = raw.partition(b"#")[0]
    path, _, query = raw.partition(b"?")
    if not path.startswith(b"/"):
        match = _SCHEME.match(path)
        if match:  # absolute-form: keep only the path
            rest = path[match.end() :]
            slash = rest.find(b"/")
            path = rest[slash:] if slash >= 0 else b"/"
        else:  # asterisk-form and anything else: a path relative to the root
            path = b"/" + path
    if b"/." in path or b"\\" in path or b"%2e" in path or b"%2E" in path:
        path = _normalise(path)
    if _PATH_ENCODE.search(path):
        path = _PATH_ENCODE.sub(lambda m: b"%%%02X" % m.group()[0], path)
    return path, query


def _normalise(path: bytes) -> bytes:
    """Resolve dot segments (`.`, `..`, and their `%2e` spellings) and read `\\` as `/`."""
    path = path.replace(b"\\", b"/")
    segments = path.split(b"/")[1:]
    out: list[bytes] = []
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        lowered = segment.lower()
        if lowered in (b".", b"%2e"):
            if last:
                out.append(b"")
        elif lowered in (b"..", b".%2e", b"%2e.", b"%2e%2e"):
            if out:
                out.pop()
            if last:
                out.append(b"")
        else:
            out.append(segment)
    return b"/" + b"/".join(out)


def decode_path(path: bytes) -> str:
    """Percent-decode strictly as UTF-8, as JavaScript's decodeURIComponent does."""
    # latin-1 maps bytes to characters one to one; the HTTP parser only lets ASCII through
    if b"%" not in path:
        return path.decode("latin-1")  # nearly every path: nothing to decode
    try:
        return decode_uri_component(path.decode("latin-1"))
    except ValueError as e:
        raise BadPath("URI malformed") from e


def host_key(host: bytes | None, path: str) -> str:
    """The routing key with host routing: `/<host without port><path>`.

    The host keeps its case (CHP's lookup is case-sensitive); a missing Host gives CHP's
    `undefined`; a bracketed IPv6 literal keeps its brackets.
    """
    name = "undefined" if host is None else split_host(host.decode("latin-1"))[0]
    return "/" + name + path


def strip_prefix(path: bytes, segments: int) -> bytes:
    """`path` without its first `segments` segments (for `--no-include-prefix`).

    Returns b"" when nothing follows the prefix, so that the target's path is used unchanged.
    """
    if segments == 0:
        return path
    parts = path.lstrip(b"/").split(b"/", segments)
    return b"/" + parts[segments] if len(parts) > segments else b""


def join_paths(target_path: bytes, target_query: bytes, path: bytes, query: bytes) -> bytes:
    """Join the target's path and query with the request's: one `/` at the boundary, queries
    joined with `&`, the target's first (http-proxy's urlJoin)."""
    if not path:
        joined = target_path
    elif target_path.endswith(b"/"):
        joined = target_path + (path[1:] if path.startswith(b"/") else path)
    else:
        joined = target_path + (path if path.startswith(b"/") else b"/" + path)
    if target_query and query:
        return joined + b"?" + target_query + b"&" + query
    if target_query or query:
        return joined + b"?" + (target_query or query)
    return joined


def split_host(host: AnyStr) -> tuple[AnyStr, AnyStr | None]:
    """(name, port) of a Host header's value, as str or bytes: `example.org:80` -> `example.org`
    and `80`; `[::1]:80` -> `[::1]` and `80` (a bracketed IPv6 literal keeps its brackets).

    The port is None when there is none, or when it is not all ASCII digits; a `[` that is never
    closed leaves the whole value as the name.
    """
    if isinstance(host, str):
        colon, bracket, close = ":", "[", "]"
    else:
        colon, bracket, close = b":", b"[", b"]"
    if host.startswith(bracket):
        end = host.find(close)
        if end < 0:
            return host, None
        name, rest = host[: end + 1], host[end + 1 :]
        port = rest[1:] if rest.startswith(colon) else None
    else:
        name, found, port = host.partition(colon)
        if not found:
            return name, None
    return name, port if port and port.isascii() and port.isdigit() else None

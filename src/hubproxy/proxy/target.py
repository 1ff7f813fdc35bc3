"""Route targets: parsing a target URL once into what the data plane needs to reach it."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

DEFAULT_PORTS = {"http": 80, "https": 443}


class TargetError(ValueError):
    """A route's target that is not a URL we can proxy to (CHP answers these with 500)."""


class UnresolvableTarget(TargetError):
    """A target URL whose host name no resolver could look up (its labels cannot be encoded
    in IDNA): CHP fails its DNS lookup and answers 503, and so do we."""


@dataclass(frozen=True, slots=True)
class Target:
    url: str
    scheme: str  # "http", "https" or "unix"
    host: str  # host name or address, without brackets; "" for unix
    port: int  # 0 for unix
    unix_path: str | None
    path: str  # the target's own path ("/" when it has none)
    query: str  # the target's own query, without "?"
    netloc: bytes  # `host[:port]` as a Host header names this target (port only if not default)
    plain: bool  # no path of its own ("/") and no query: requests keep theirs as they are

    @property
    def pool_key(self) -> tuple[str, str, int, str | None]:
        return (self.scheme, self.host, self.port, self.unix_path)


def parse_target(url: str) -> Target:
    """Parse `http://h:p/path?q`, `https://…`, `http+unix://<%-encoded socket>/path`.

    `unix+http://` is accepted too (CHP 5.1's spelling).
    """
    lowered = url[:12].lower()
    if lowered.startswith(("http+unix://", "unix+http://")):
        rest = url[len("http+unix://") :]
        socket_part, sep, path_query = rest.partition("/")
        if not socket_part:
            raise TargetError(f"no socket path in target {url!r}")
        path, _, query = (sep + path_query).partition("?")
        return Target(
            url=url,
            scheme="unix",
            host="",
            port=0,
            unix_path=urllib.parse.unquote(socket_part),
            path=path or "/",
            query=query,
            netloc=b"localhost",
            plain=(path or "/") == "/" and not query,
        )
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise TargetError(f"invalid target {url!r}: {e}") from e
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        raise TargetError(f"invalid target {url!r}: expected an http(s) URL")
    host = parts.hostname
    if port is None:
        port = DEFAULT_PORTS[scheme]
    if ":" not in host:  # a name (or IPv4 address) must be encodable to be looked up
        try:
            host.encode("idna")
        except UnicodeError as e:
            raise UnresolvableTarget(f"getaddrinfo ENOTFOUND {host} ({e})") from None
    shown_host = f"[{host}]" if ":" in host else host
    netloc = shown_host if port == DEFAULT_PORTS[scheme] else f"{shown_host}:{port}"
    return Target(
        url=url,
        scheme=scheme,
        host=host,
        port=port,
        unix_path=None,
        path=parts.path or "/",
        query=parts.query,
        netloc=netloc.encode("idna" if not netloc.isascii() else "ascii"),
        plain=(parts.path or "/") == "/" and not parts.query,
    )

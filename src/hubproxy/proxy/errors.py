"""Error responses of the data plane: 404 (no route), 503 (upstream failure), 500 (internal).

Three sources, as in CHP: an `--error-target` server asked for `<target>/<code>?url=<url>` (its
body and content type served under our status), else `<dir>/<code>.html` or `<dir>/error.html`
from `--error-path` (our built-in pages by default), else the plain reason phrase.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import pathlib
import ssl
import urllib.parse
from typing import NamedTuple

import aiohttp
import yarl

from hubproxy.config import Config
from hubproxy.proxy.status import reason
from hubproxy.proxy.target import TargetError, parse_target

log = logging.getLogger("hubproxy")

BUILTIN_PAGES = pathlib.Path(__file__).resolve().parent.parent / "error"
# A fetched page is held whole before it is sent (the client is told its length, and a page that
# fails half-way can still fall back), so its size is bounded. JupyterHub's pages are a few KiB;
# anything past 1 MiB is a misconfigured or hostile error target, not a page.
ERROR_PAGE_LIMIT = 1 << 20
# The whole exchange, connect to last byte: a target that trickles its page, or never ends it,
# must not hold the client's answer (or our memory) for longer than this.
ERROR_TARGET_TIMEOUT = aiohttp.ClientTimeout(total=10)


class PageTooLarge(Exception):
    """The error target's page is over ERROR_PAGE_LIMIT: announced, or found while reading."""


class ErrorBody(NamedTuple):
    headers: list[tuple[bytes, bytes]]  # content-type / content-encoding to send
    body: bytes


class ErrorPages:
    def __init__(self, config: Config, client_ssl: ssl.SSLContext | None = None) -> None:
        self._pages: dict[int | None, bytes] = {}
        self._error_url: str | None = None
        self._unix_path: str | None = None
        self._session: aiohttp.ClientSession | None = None
        self._client_ssl = client_ssl
        if config.error_target:
            url = (
                config.error_target
                if config.error_target.endswith("/")
                else config.error_target + "/"
            )
            target = parse_target(url)  # validated by the CLI; raises TargetError otherwise
            if target.unix_path is not None:
                self._unix_path = target.unix_path
                query = "?" + target.query if target.query else ""
                url = "http://localhost" + target.path + query
            self._error_url = url
        else:
            directory = pathlib.Path(config.error_path) if config.error_path else BUILTIN_PAGES
            for name, code in (
                ("404.html", 404),
                ("503.html", 503),
                ("500.html", 500),
                ("error.html", None),
            ):
                with contextlib.suppress(OSError):
                    self._pages[code] = (directory / name).read_bytes()

    @property
    def fetches(self) -> bool:
        """True if error bodies come from an error target (asynchronously)."""
        return self._error_url is not None

    def page(self, code: int) -> ErrorBody:
        """An error body available at once: a page file, else the plain reason phrase."""
        html = self._pages.get(code) or self._pages.get(None)
        if html is not None:
            return ErrorBody([(b"Content-Type", b"text/html")], html)
        return ErrorBody([], reason(code))

    async def fetch(self, code: int, request_url: bytes) -> ErrorBody:
        """Ask the error target for the page of `code`; the plain body if that fails.

        Every failure (refused, timed out, cut short, too large) gives the same plain body,
        CHP's fallback when its error request fails: a failing target's page is not served in
        part."""
        assert self._error_url is not None
        url = _with_query(f"{self._error_url}{code}", request_url.decode("latin-1"))
        log.debug("Requesting custom error page: %s", url)
        try:
            session = self._get_session()
            async with session.get(
                yarl.URL(url, encoded=True), allow_redirects=False, ssl=self._client_ssl or True
            ) as resp:
                body = await _read_page(resp, code)
                headers = [
                    (name.encode("latin-1"), resp.headers[name].encode("latin-1"))
                    for name in ("Content-Type", "Content-Encoding")
                    if name in resp.headers
                ]
                return ErrorBody(headers, body)
        except (
            TimeoutError,
            aiohttp.ClientError,
            OSError,
            ValueError,
            TargetError,
            PageTooLarge,
        ) as e:
            log.error("Failed to get custom error page: %s", _describe(e))
            return ErrorBody([], reason(code))

    def set_client_ssl(self, context: ssl.SSLContext) -> None:
        """The TLS context for an https error target (applies to the next request)."""
        self._client_ssl = context

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector: aiohttp.BaseConnector
            if self._unix_path is not None:
                connector = aiohttp.UnixConnector(path=self._unix_path)
            else:
                connector = aiohttp.TCPConnector(ssl=self._client_ssl or True)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=ERROR_TARGET_TIMEOUT,
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _read_page(resp: aiohttp.ClientResponse, code: int) -> bytes:
    """The whole body of `resp`, however many reads it takes, up to ERROR_PAGE_LIMIT.

    A page over the limit is refused as soon as that is known, before its bytes are taken in, and
    the rest is not read (it may never end): its connection is closed, since it cannot serve
    another request before that rest is read. (A page aiohttp had already received to its end is
    back in the pool by then, as clean as after any page; closing it could cut a request that
    took it since.)"""
    announced = resp.content_length
    if announced is not None and announced > ERROR_PAGE_LIMIT:
        resp.close()
        raise PageTooLarge(
            f"{code} page of {announced} bytes, over the {ERROR_PAGE_LIMIT}-byte limit"
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > ERROR_PAGE_LIMIT:
            resp.close()
            raise PageTooLarge(f"{code} page over the {ERROR_PAGE_LIMIT}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _with_query(url: str, request_url: str) -> str:
    """Add `url=<request_url>` (form-encoded, as URLSearchParams does) to `url`'s query."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.urlencode({"url": request_url})
    query = parts.query + "&" + query if parts.query else query
    return urllib.parse.urlunsplit(parts._replace(query=query))


def _describe(error: BaseException) -> str:
    """Node's words for a refused connection (`connect ECONNREFUSED 127.0.0.1:8081`, as in
    CHP's line); aiohttp's own text shows its SSL context's repr."""
    if isinstance(error, aiohttp.ClientConnectorError) and error.os_error.errno:
        name = errno.errorcode.get(error.os_error.errno, str(error.os_error.errno))
        return f"connect {name} {error.host}:{error.port}"
    if isinstance(error, TimeoutError):
        # aiohttp's timeout errors carry no text; with one total timeout, this is the one
        return f"timeout: no whole page within {ERROR_TARGET_TIMEOUT.total:g} s"
    return str(error) or type(error).__name__

"""Test support: the proxy started as users start it, and real backends on loopback.

The proxy runs as `python -m hubproxy` in a subprocess with `--port 0 --api-port 0`; its startup
lines tell us the ports the OS chose, which doubles as the readiness probe (no sleeps, no fixed
ports). Backends are aiohttp servers running in a thread of their own, so a test may talk to the
proxy with blocking or asyncio clients alike.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

TOKEN = "secret"
START_TIMEOUT = 30.0

_PROXYING = re.compile(r"info: Proxying (\S+) to ")
_API_AT = re.compile(r"info: Proxy API at (\S+)/api/routes")


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the test run dies, so no proxy outlives a killed pytest."""
    if sys.platform == "linux":
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class ProxyProcess:
    """A hubproxy subprocess; its stdout is collected line by line in a thread."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str] | None = None,
        umask: int = -1,
        *,
        command: list[str] | None = None,
        preexec: Callable[[], None] | None = None,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        """`command` replaces `python -m hubproxy`; `preexec` runs in the child before it;
        `pass_fds` are kept open in the child (as subprocess.Popen's)."""
        self.args = args
        self.lines: list[str] = []
        self._cond = threading.Condition()

        def before_exec() -> None:
            if preexec is not None:  # first: a change of user would clear the death signal
                preexec()
            _die_with_parent()

        self.proc = subprocess.Popen(
            [*(command or [sys.executable, "-m", "hubproxy"]), *args],
            umask=umask,
            preexec_fn=before_exec,
            pass_fds=pass_fds,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        self.stderr = ""
        self._eof = False
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_for_line(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        """Block until a stdout line matches `pattern` (a regex); fail if the process exits."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    match = regex.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                if self._eof:
                    raise AssertionError(
                        f"hubproxy exited ({self.proc.returncode}) before {pattern!r}:\n"
                        + "\n".join(self.lines)
                        + self._read_stderr()
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"no line {pattern!r} within {timeout}s:\n" + "\n".join(self.lines)
                    )
                self._cond.wait(min(remaining, 0.2))

    def _read_stderr(self) -> str:
        if self.proc.stderr is not None and not self.proc.stderr.closed:
            self.proc.wait(10)
            self.stderr += self.proc.stderr.read()
        return ("\nstderr:\n" + self.stderr) if self.stderr else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(10)  # the process is gone: its stdout reaches EOF
        if self.proc.stderr is not None and not self.proc.stderr.closed:
            self.stderr += self.proc.stderr.read()  # kept in .stderr
            self.proc.stderr.close()
        if self.proc.stdout is not None and not self._reader.is_alive():
            self.proc.stdout.close()
        return self.proc.returncode

    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)


class Proxy(ProxyProcess):
    """A running proxy with the URLs it announced and small HTTP helpers."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str] | None,
        token: str | None,
        umask: int = -1,
        *,
        command: list[str] | None = None,
        preexec: Callable[[], None] | None = None,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        super().__init__(args, env, umask, command=command, preexec=preexec, pass_fds=pass_fds)
        self.token = token
        self.public_url = self.wait_for_line(_PROXYING.pattern).group(1)
        self.api_url = self.wait_for_line(_API_AT.pattern).group(1)
        # with --socket / --api-socket the URL is `http+unix://<%-encoded path>` (port 0)
        self.host, self.port, self.unix_path = _address(self.public_url)
        self.api_host, self.api_port, self.api_unix_path = _address(self.api_url)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 10.0,
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        if self.unix_path is not None:
            return http_request_unix(self.unix_path, method, path, body, headers, timeout)
        return http_request(self.host, self.port, method, path, body, headers, timeout)

    def api(
        self,
        method: str,
        path: str = "",
        data: Any = None,
        headers: dict[str, str] | None = None,
        token: str | bool | None = True,
        raw_body: bytes | None = None,
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """Call the REST API at `/api/routes<path>`; `token=True` sends the proxy's token."""
        hdrs = dict(headers or {})
        if token is True:
            token = self.token
        if token:
            hdrs["Authorization"] = f"token {token}"
        body = (
            raw_body
            if raw_body is not None
            else (None if data is None else json.dumps(data).encode())
        )
        if self.api_unix_path is not None:
            return http_request_unix(self.api_unix_path, method, "/api/routes" + path, body, hdrs)
        return http_request(self.api_host, self.api_port, method, "/api/routes" + path, body, hdrs)

    def routes(self) -> dict[str, Any]:
        status, _, body = self.api("GET")
        assert status == 200, body
        return json.loads(body)

    def add_route(self, path: str, target: str, **data: Any) -> None:
        status, _, body = self.api("POST", path, {"target": target, **data})
        assert status == 201, body


def _address(url: str) -> tuple[str, int, str | None]:
    if "+unix://" in url:
        return "localhost", 0, urllib.parse.unquote(url.partition("+unix://")[2])
    match = re.match(r"\w+://\[?([^\]]+?)\]?:(\d+)$", url)
    assert match, url
    return match.group(1), int(match.group(2)), None


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def http_request(
    host: str,
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    return exchange(conn, method, path, body, headers)


def exchange(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request on `conn` (plain, TLS or Unix socket), its answer, and the connection closed."""
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._unix_path)
        self.sock = sock


def http_request_unix(
    path_to_socket: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    return exchange(_UnixHTTPConnection(path_to_socket, timeout), method, path, body, headers)


class Backend:
    """An aiohttp server in a thread of its own, on an OS-chosen loopback port."""

    def __init__(self, app: web.Application, unix_path: str | None = None) -> None:
        self._app = app
        self._unix_path = unix_path
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("backend did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._cleanup())
        self._loop.close()

    async def _start(self) -> None:
        self._runner = web.AppRunner(self._app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        if self._unix_path is not None:
            site: web.BaseSite = web.UnixSite(self._runner, self._unix_path)
            await site.start()
        else:
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            server = site._server
            assert server is not None and server.sockets
            self.port = server.sockets[0].getsockname()[1]

    async def _cleanup(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        if self._unix_path is not None:
            from urllib.parse import quote

            return "http+unix://" + quote(self._unix_path, safe="")
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


def echo_handler(name: str = "backend") -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A handler answering with JSON describing what it received (CHP's test echo server)."""

    async def echo(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        return web.json_response(
            {
                "target": name,
                "method": request.method,
                "url": request.raw_path,
                "headers": dict(request.headers),
                "header_list": [
                    [k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers
                ],
                "body_length": len(body),
            }
        )

    return echo


def echo_app(name: str = "backend") -> web.Application:
    """Answers every request with JSON describing what it received (CHP's test echo server)."""
    app = web.Application(client_max_size=1024**3)
    app.router.add_route("*", "/{tail:.*}", echo_handler(name))
    return app


def ws_echo_app() -> web.Application:
    """Echoes each text message of a WebSocket on any path; a plain request gets `plain`."""

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return web.Response(text="plain")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str(msg.data)
        return ws

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handler)
    return app


async def check_store_contract(store: Any) -> None:
    """The RouteStore contract every store keeps (on an empty store)."""
    assert await store.get_all() == {}
    assert await store.get("/nope") is None
    await store.add("/myRoute", {"target": "http://localhost:8213", "nested": {"a": [1, 2]}})
    assert await store.get("/myRoute") == {
        "target": "http://localhost:8213",
        "nested": {"a": [1, 2]},
    }
    await store.add("/myRoute", {"target": "http://localhost:8214"})  # replaces, no merge
    assert await store.get("/myRoute") == {"target": "http://localhost:8214"}
    await store.update("/myRoute", {"version": 2, "test": "x"})
    await store.update("/myRoute", {"version": 3})  # shallow merge
    assert await store.get("/myRoute") == {
        "target": "http://localhost:8214",
        "version": 3,
        "test": "x",
    }
    await store.update("/missing", {"target": "http://x"})  # a missing route stays missing
    assert await store.get("/missing") is None
    assert await store.remove("/myRoute") is True
    assert await store.remove("/myRoute") is False
    assert await store.get_all() == {}

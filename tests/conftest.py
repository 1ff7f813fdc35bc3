"""Shared fixtures (the helpers they use live in `support.py`, importable by any test)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from hubproxy.logs import LIBRARY_LOGGERS, LOGGER_NAME
from procs import ProxyCache
from redis_server import RedisServer
from support import TOKEN, Backend, Proxy, echo_app


@pytest.fixture
def start_proxy() -> Iterator[Callable[..., Proxy]]:
    """Start hubproxy on OS-chosen loopback ports: `start_proxy("--default-target", url)`.

    `token=None` runs the API unauthenticated; `env` adds environment variables; `preexec`
    runs in the child before hubproxy (as Popen's preexec_fn).
    """
    started: list[Proxy] = []

    def start(
        *args: str,
        token: str | None = TOKEN,
        env: dict[str, str] | None = None,
        umask: int = -1,
        preexec: Callable[[], None] | None = None,
    ) -> Proxy:
        full_env = {k: v for k, v in os.environ.items() if k != "CONFIGPROXY_AUTH_TOKEN"}
        if token is not None:
            full_env["CONFIGPROXY_AUTH_TOKEN"] = token
        full_env.update(env or {})
        argv = []
        if not any(a.split("=")[0] == "--socket" for a in args):
            argv += ["--ip", "127.0.0.1", "--port", "0"]
        if not any(a.split("=")[0] == "--api-socket" for a in args):
            argv += ["--api-ip", "127.0.0.1", "--api-port", "0"]
        proxy = Proxy([*argv, *args], full_env, token, umask, preexec=preexec)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture
def start_backend() -> Iterator[Callable[..., Backend]]:
    """Start a backend: `start_backend()` echoes; `start_backend(app)` serves your own app."""
    started: list[Backend] = []

    def start(app: web.Application | None = None, unix_path: str | None = None) -> Backend:
        backend = Backend(app if app is not None else echo_app(), unix_path)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.stop()


@pytest.fixture
def backend(start_backend: Callable[..., Backend]) -> Backend:
    return start_backend()


@pytest.fixture
def restore_loggers() -> Iterator[None]:
    """Put the loggers a test reconfigures (setup_logging) back as they were."""
    names = (LOGGER_NAME, *LIBRARY_LOGGERS, "aiohttp.access")
    saved = {}
    for name in names:
        lg = logging.getLogger(name)
        saved[name] = (lg.handlers[:], lg.level, lg.propagate, lg.disabled)
    yield
    for name, (handlers, level, propagate, disabled) in saved.items():
        lg = logging.getLogger(name)
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate
        lg.disabled = disabled


@pytest.fixture(scope="module")
def proxies() -> Iterator[ProxyCache]:
    """Proxies shared by one module's tests, one per set of flags; none may log a traceback."""
    cache = ProxyCache()
    yield cache
    outputs = [p.output() for p in cache.all()]
    cache.close()
    for output in outputs:
        assert "Traceback" not in output, output


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for a module's tests (each test keeps to its own key prefix)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Redis servers of a test's own, for tests that stop, restart or empty them."""
    servers: list[RedisServer] = []

    def make(persistent: bool = True, port: int | None = None) -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(servers)}", persistent=persistent, port=port)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()

"""Proxies and backends shared by the tests of one module.

Starting `python -m hubproxy` costs about half a second (imports), which adds up over a hundred
tests; tests that only need "a proxy started with these flags" share one per set of flags
through `ProxyCache`. A test that depends on the whole route table, on the process's own log, or
on its resources (fds, memory) starts its own with conftest's `start_proxy` instead.
"""

from __future__ import annotations

import os

from support import TOKEN, Proxy


def start(*args: str, token: str | None = TOKEN, env: dict[str, str] | None = None) -> Proxy:
    """Start a proxy the way conftest's `start_proxy` does (OS-chosen loopback ports)."""
    full_env = {k: v for k, v in os.environ.items() if k != "CONFIGPROXY_AUTH_TOKEN"}
    if token is not None:
        full_env["CONFIGPROXY_AUTH_TOKEN"] = token
    full_env.update(env or {})
    argv = ["--ip", "127.0.0.1", "--port", "0", "--api-ip", "127.0.0.1", "--api-port", "0"]
    return Proxy([*argv, *args], full_env, token)


class ProxyCache:
    """One running proxy per tuple of command-line arguments, stopped by `close()`."""

    def __init__(self) -> None:
        self._proxies: dict[tuple[str, ...], Proxy] = {}

    def get(self, *args: str, tag: str = "") -> Proxy:
        """The proxy started with `args` (`tag` tells apart proxies a test wants for itself)."""
        key = (tag, *args)
        proxy = self._proxies.get(key)
        if proxy is None or proxy.proc.poll() is not None:
            proxy = self._proxies[key] = start(*args)
        return proxy

    def all(self) -> list[Proxy]:
        return list(self._proxies.values())

    def close(self) -> None:
        for proxy in self._proxies.values():
            proxy.stop()
        self._proxies.clear()

"""--drain-timeout: how long requests in flight get after SIGTERM (hubproxy's own option).

Each test holds a request in the backend until the proxy has logged the signal, so what is
checked is the option's effect, never a race: a long drain time lets the request finish, none
cuts it at once.
"""

from __future__ import annotations

import asyncio
import http.client
import signal
import threading
from collections.abc import Callable

from aiohttp import web

from support import Backend, Proxy


def held_backend(
    start_backend: Callable[..., Backend],
) -> tuple[Backend, threading.Event, threading.Event]:
    """A backend whose `/slow` answers only once `release` is set; `received` says it is held."""
    received = threading.Event()
    release = threading.Event()

    async def slow(request: web.Request) -> web.Response:
        received.set()
        await asyncio.to_thread(release.wait, 60)
        return web.Response(text="done")

    app = web.Application()
    app.router.add_get("/slow", slow)
    return start_backend(app), received, release


def fetch_in_thread(proxy: Proxy) -> tuple[threading.Thread, list[object]]:
    outcome: list[object] = []

    def fetch() -> None:
        try:
            status, _, body = proxy.request("GET", "/slow", timeout=60)
            outcome.append((status, body))
        except (OSError, http.client.HTTPException) as e:
            outcome.append(e)

    thread = threading.Thread(target=fetch)
    thread.start()
    return thread, outcome


def test_a_long_drain_time_lets_the_request_in_flight_finish(
    start_proxy: Callable[..., Proxy], start_backend: Callable[..., Backend]
) -> None:
    backend, received, release = held_backend(start_backend)
    proxy = start_proxy("--default-target", backend.url, "--drain-timeout", "60000")
    thread, outcome = fetch_in_thread(proxy)
    assert received.wait(30)
    proxy.proc.send_signal(signal.SIGTERM)
    proxy.wait_for_line(r"warn: Terminated$")
    assert proxy.proc.poll() is None  # still draining, the request held
    release.set()
    thread.join(30)
    assert outcome == [(200, b"done")]
    assert proxy.stop() == 0


def test_no_drain_time_cuts_the_request_in_flight(
    start_proxy: Callable[..., Proxy], start_backend: Callable[..., Backend]
) -> None:
    backend, received, release = held_backend(start_backend)
    proxy = start_proxy("--default-target", backend.url, "--drain-timeout", "0")
    thread, outcome = fetch_in_thread(proxy)
    try:
        assert received.wait(30)
        proxy.proc.send_signal(signal.SIGTERM)
        assert proxy.proc.wait(30) == 0  # exits with the backend still holding the request
        thread.join(30)
        assert len(outcome) == 1 and isinstance(outcome[0], (OSError, http.client.HTTPException))
    finally:
        release.set()

"""--workers N: the data plane in N processes, fed and polled by the primary (hubproxy.workers)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
import websockets
from aiohttp import web

from support import Backend, Proxy, echo_app, http_request, ws_echo_app

NEW_CONNECTIONS = 60  # each request on a new connection: the kernel spreads them over workers


def worker_pids(proxy: Proxy) -> list[int]:
    match = proxy.wait_for_line(r"info: Serving with \d+ worker processes \(pids \[([\d, ]+)\]\)")
    return [int(p) for p in match.group(1).split(", ")]


def metrics_url(proxy: Proxy) -> tuple[str, int]:
    match = proxy.wait_for_line(r"info: Serve metrics at http://\[?([^\]]+?)\]?:(\d+)/metrics")
    return match.group(1), int(match.group(2))


def scrape(proxy: Proxy) -> dict[str, float]:
    host, port = metrics_url(proxy)
    status, _, body = http_request(host, port, "GET", "/metrics")
    assert status == 200
    values = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def wait_gone(pids: list[int], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, f"still running: {[p for p in pids if alive(p)]}"
        time.sleep(0.02)


def write_pair(leaf: trustme.LeafCert, folder: Path) -> tuple[Path, Path]:
    """The leaf's key and certificate as files in `folder`: (key, cert)."""
    key, cert = folder / "key.pem", folder / "cert.pem"
    leaf.private_key_pem.write_to_path(str(key))
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    return key, cert


def get_json(proxy: Proxy, path: str) -> tuple[int, dict]:
    status, _, body = proxy.request("GET", path)
    return status, (json.loads(body) if status == 200 else {})


def test_every_worker_serves_each_route_as_soon_as_the_api_answers(
    start_proxy: Callable[..., Proxy], start_backend: Callable[..., Backend]
) -> None:
    a, b = start_backend(echo_app("a")), start_backend(echo_app("b"))
    proxy = start_proxy("--workers", "2", "--metrics-port", "0")
    assert len(worker_pids(proxy)) == 2
    for i in range(NEW_CONNECTIONS):
        backend, name = (a, "a") if i % 2 else (b, "b")
        proxy.add_route(f"/user/u{i}", backend.url)
        # the very next request, on a new connection, to whichever worker the kernel picks
        status, echoed = get_json(proxy, f"/user/u{i}/tree")
        assert (status, echoed.get("target"), echoed.get("url")) == (200, name, f"/user/u{i}/tree")
    for i in range(NEW_CONNECTIONS):
        assert proxy.api("DELETE", f"/user/u{i}")[0] == 204
        assert proxy.request("GET", f"/user/u{i}/tree")[0] == 404
    per_worker = {
        name: value
        for name, value in scrape(proxy).items()
        if name.startswith("hubproxy_worker_requests_total")
    }
    # 120 connections hashed over two sockets: each worker had its share
    assert len(per_worker) == 2 and all(v > 0 for v in per_worker.values()), per_worker
    assert sum(per_worker.values()) == 2 * NEW_CONNECTIONS


def test_metrics_add_up_the_workers(start_proxy: Callable[..., Proxy], backend: Backend) -> None:
    proxy = start_proxy("--workers", "2", "--metrics-port", "0", "--default-target", backend.url)
    for _ in range(NEW_CONNECTIONS):
        assert proxy.request("GET", "/x")[0] == 200
    values = scrape(proxy)
    assert values["requests_web"] == NEW_CONNECTIONS
    assert values['requests_proxy{status="200"}'] == NEW_CONNECTIONS
    assert values['hubproxy_request_duration_seconds_count{status_class="2xx"}'] == NEW_CONNECTIONS
    assert values["hubproxy_workers"] == 2
    assert values["hubproxy_worker_restarts_total"] == 0
    assert values["hubproxy_routes"] == 1
    assert values["hubproxy_client_received_bytes_total"] > 0
    assert values['hubproxy_upstream_connections{state="idle"}'] >= 1


def test_activity_in_workers_reaches_the_api_at_once(
    start_proxy: Callable[..., Proxy], backend: Backend
) -> None:
    proxy = start_proxy("--workers", "2")
    proxy.add_route("/user/a", backend.url)
    before = proxy.routes()["/user/a"]["last_activity"]
    # a request in a worker, then the API: the primary asks the workers before it answers
    deadline = time.monotonic() + 10
    while proxy.routes()["/user/a"]["last_activity"] == before:
        assert time.monotonic() < deadline, "activity never reached the API"
        assert proxy.request("GET", "/user/a/x")[0] == 200  # (ms resolution: may need a second)
    status, _, body = proxy.api("GET", "/user/a")
    assert status == 200 and json.loads(body)["last_activity"] > before


def test_a_killed_worker_is_replaced_and_counters_never_go_back(
    start_proxy: Callable[..., Proxy], backend: Backend
) -> None:
    proxy = start_proxy("--workers", "2", "--metrics-port", "0", "--default-target", backend.url)
    pids = worker_pids(proxy)
    for _ in range(NEW_CONNECTIONS):
        assert proxy.request("GET", "/x")[0] == 200
    assert scrape(proxy)["requests_web"] == NEW_CONNECTIONS
    os.kill(pids[0], signal.SIGKILL)
    proxy.wait_for_line(
        rf"error: Worker 0 \(pid {pids[0]}\) exited with signal 9: starting another"
    )
    new_pid = int(proxy.wait_for_line(r"info: Worker 0 \(pid (\d+)\) serving").group(1))
    assert new_pid not in pids and alive(new_pid)
    # connections queued for the dead worker's socket were kept for its replacement
    for _ in range(NEW_CONNECTIONS):
        assert proxy.request("GET", "/x")[0] == 200
    values = scrape(proxy)
    assert values["requests_web"] == 2 * NEW_CONNECTIONS
    assert values["hubproxy_worker_restarts_total"] == 1
    assert values["hubproxy_workers"] == 2


def test_a_stuck_worker_is_killed_and_replaced(
    start_proxy: Callable[..., Proxy], backend: Backend
) -> None:
    proxy = start_proxy("--workers", "2", "--default-target", backend.url)
    pids = worker_pids(proxy)
    os.kill(pids[1], signal.SIGSTOP)  # alive, but answers nothing: as a worker stuck in a loop
    try:
        for i in range(3):  # each write waits for the stuck worker's answer, then goes on
            proxy.add_route(f"/stuck{i}", backend.url)
        proxy.wait_for_line(
            rf"error: Worker 1 \(pid {pids[1]}\) has answered nothing for \d+ s: killing it"
        )
        new_pid = int(proxy.wait_for_line(r"info: Worker 1 \(pid (\d+)\) serving").group(1))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pids[1], signal.SIGCONT)
    assert new_pid != pids[1] and not alive(pids[1])
    for _ in range(NEW_CONNECTIONS):  # the replacement serves the routes added meanwhile
        status, echoed = get_json(proxy, "/stuck2/x")
        assert status == 200 and echoed["url"] == "/stuck2/x"


def test_sigterm_drains_workers_and_stops_them(
    start_proxy: Callable[..., Proxy], start_backend: Callable[..., Backend]
) -> None:
    received = threading.Event()
    release = threading.Event()

    async def slow(request: web.Request) -> web.Response:
        received.set()
        await asyncio.to_thread(release.wait, 10)  # answers once the worker drains
        return web.Response(text="done")

    app = web.Application()
    app.router.add_get("/slow", slow)
    backend = start_backend(app)
    # a drain time far longer than the test needs: the release below is never a race
    proxy = start_proxy("--workers", "2", "--default-target", backend.url, "--log-level", "debug",
                        "--drain-timeout", "60000")  # fmt: skip
    pids = worker_pids(proxy)
    result: list[tuple[int, bytes]] = []

    def fetch() -> None:
        status, _, body = proxy.request("GET", "/slow")
        result.append((status, body))

    thread = threading.Thread(target=fetch)
    thread.start()
    assert received.wait(10)
    proxy.proc.send_signal(signal.SIGTERM)
    proxy.wait_for_line(r"debug: Worker \d stopping: draining")
    release.set()
    assert proxy.stop(signal.SIGTERM) == 0
    thread.join(10)
    assert result == [(200, b"done")]  # the request in flight finished
    wait_gone(pids)
    assert "Traceback" not in proxy.output()


def test_workers_leave_when_the_primary_is_killed(
    start_proxy: Callable[..., Proxy], backend: Backend
) -> None:
    proxy = start_proxy("--workers", "2", "--default-target", backend.url)
    pids = worker_pids(proxy)
    proxy.stop(signal.SIGKILL)
    wait_gone(pids)


async def test_websockets_through_workers(
    start_proxy: Callable[..., Proxy], start_backend: Callable[..., Backend]
) -> None:
    backend = start_backend(ws_echo_app())
    proxy = start_proxy("--workers", "2", "--default-target", backend.url)
    for i in range(20):  # new connections: both workers tunnel some
        async with websockets.connect(f"ws://127.0.0.1:{proxy.port}/ws") as ws:
            await ws.send(f"hello {i}")
            assert await ws.recv() == f"hello {i}"


def test_unix_socket_listener_is_shared_by_the_workers(
    start_proxy: Callable[..., Proxy], backend: Backend, tmp_path: Path
) -> None:
    path = str(tmp_path / "proxy.sock")
    proxy = start_proxy("--workers", "2", "--socket", path, "--default-target", backend.url)
    assert len(worker_pids(proxy)) == 2
    for _ in range(20):
        assert proxy.request("GET", "/x")[0] == 200


def test_tls_reload_reaches_every_worker(
    start_proxy: Callable[..., Proxy], backend: Backend, tmp_path: Path
) -> None:
    ca = trustme.CA()
    first, second = ca.issue_cert("127.0.0.1"), ca.issue_cert("127.0.0.1")
    key, cert = write_pair(first, tmp_path)
    proxy = start_proxy(
        "--workers", "2", "--ssl-key", str(key), "--ssl-cert", str(cert),
        "--default-target", backend.url,
    )  # fmt: skip
    client = ssl.create_default_context()
    ca.configure_trust(client)

    def serials() -> set[int]:
        seen = set()
        for _ in range(NEW_CONNECTIONS // 2):
            raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
            with client.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                der = tls.getpeercert(binary_form=True)
                assert der is not None
                seen.add(hash(der))
        return seen

    assert serials() == {hash(_der(first))}
    # new files, then SIGHUP to the primary: each worker reloads (and says so)
    tmp = tmp_path / "new"
    tmp.mkdir()
    second.private_key_pem.write_to_path(str(tmp / "key.pem"))
    second.cert_chain_pems[0].write_to_path(str(tmp / "cert.pem"))
    os.replace(tmp / "key.pem", key)
    os.replace(tmp / "cert.pem", cert)
    proxy.proc.send_signal(signal.SIGHUP)
    _wait_lines(proxy, r"info: Reloaded TLS certificate for the proxy listener", 2)
    assert serials() == {hash(_der(second))}


def _der(leaf: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())


def _wait_lines(proxy: Proxy, pattern: str, count: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while sum(1 for line in proxy.output().splitlines() if re.search(pattern, line)) < count:
        assert time.monotonic() < deadline, f"fewer than {count} lines {pattern!r}"
        proxy.wait_for_line(pattern, timeout=max(0.1, deadline - time.monotonic()))
        time.sleep(0.02)


def test_workers_with_the_sqlite_store_keep_routes_across_a_restart(
    start_proxy: Callable[..., Proxy], backend: Backend, tmp_path: Path
) -> None:
    db = str(tmp_path / "routes.db")
    proxy = start_proxy("--workers", "2", "--storage-backend", db)
    proxy.add_route("/user/kept", backend.url)
    assert proxy.stop(signal.SIGTERM) == 0
    again = start_proxy("--workers", "2", "--storage-backend", db)
    for _ in range(20):  # every worker of the new process has the route from the file
        status, echoed = get_json(again, "/user/kept/x")
        assert status == 200 and echoed["url"] == "/user/kept/x"


def test_sighup_with_only_api_tls_leaves_the_workers_alone(
    start_proxy: Callable[..., Proxy], backend: Backend, tmp_path: Path
) -> None:
    key, cert = write_pair(trustme.CA().issue_cert("127.0.0.1"), tmp_path)
    proxy = start_proxy(
        "--workers", "2", "--api-ssl-key", str(key), "--api-ssl-cert", str(cert),
        "--default-target", backend.url,
    )  # fmt: skip
    pids = worker_pids(proxy)
    proxy.proc.send_signal(signal.SIGHUP)
    proxy.wait_for_line(r"info: Reloaded TLS certificate for the API listener")
    for _ in range(NEW_CONNECTIONS):  # served by the same two workers: none was ended
        assert proxy.request("GET", "/x")[0] == 200
    assert all(alive(pid) for pid in pids)
    assert "exited" not in proxy.output()


def test_a_port_in_use_stops_the_start(backend: Backend) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "hubproxy", "--workers", "2", "--ip", "127.0.0.1",
             "--port", str(port), "--api-port", "0"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert result.returncode == 1
    assert f"proxy: cannot listen on 127.0.0.1:{port}: Address already in use" in result.stdout


@pytest.mark.parametrize("value", ["0", "-1", "two", "257", ""])
def test_bad_workers_values_exit_1(value: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hubproxy", "--workers", value],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1
    assert "--workers" in result.stderr and "is invalid" in result.stderr

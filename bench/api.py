"""The CHP REST API as JupyterHub drives it: /api/routes with ``Authorization: token``."""

from __future__ import annotations

import http.client
import json
import time

from bench.procs import HOST


class ApiClient:
    """One keep-alive connection (reopened if the server closes it)."""

    def __init__(self, port: int, token: str, timeout: float = 10.0) -> None:
        self.port, self.timeout = port, timeout
        self.headers = {"Authorization": f"token {token}", "Content-Type": "application/json"}
        self.conn = http.client.HTTPConnection(HOST, port, timeout=timeout)

    def request(self, method: str, path: str, body: object = None) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        for attempt in (1, 2):
            try:
                self.conn.request(method, path, body=data, headers=self.headers)
                resp = self.conn.getresponse()
                return resp.status, resp.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.conn.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.conn.close()


def route_path(i: int) -> str:
    return f"/user/u{i}"


def add_routes(client: ApiClient, n: int, target: str, deadline: float) -> tuple[int, int]:
    """POST ``n`` routes one after another; returns (added, failures). Stops at ``deadline``."""
    added = failures = 0
    for i in range(n):
        if time.perf_counter() > deadline:
            break
        status, _ = client.request("POST", "/api/routes" + route_path(i), {"target": target})
        if status in (200, 201):
            added += 1
        else:
            failures += 1
    return added, failures


def remove_routes(client: ApiClient, n: int, deadline: float) -> tuple[int, int]:
    """DELETE the routes ``add_routes`` made; returns (removed, failures). Stops at ``deadline``."""
    removed = failures = 0
    for i in range(n):
        if time.perf_counter() > deadline:
            break
        status, _ = client.request("DELETE", "/api/routes" + route_path(i))
        if status == 204:
            removed += 1
        else:
            failures += 1
    return removed, failures


def get_all(client: ApiClient) -> tuple[float, int]:
    """Time GET /api/routes; returns (seconds, number of routes in the answer)."""
    start = time.perf_counter()
    status, body = client.request("GET", "/api/routes")
    elapsed = time.perf_counter() - start
    if status != 200:
        raise RuntimeError(f"GET /api/routes answered {status}")
    return elapsed, len(json.loads(body))


def probe_once(port: int, token: str, method: str, path: str, body: object = None) -> float:
    """One request on a fresh connection, as JupyterHub's client makes it; returns seconds."""
    start = time.perf_counter()
    client = ApiClient(port, token, timeout=10.0)
    try:
        status, _ = client.request(method, path, body)
    finally:
        client.close()
    if status >= 300:
        raise RuntimeError(f"{method} {path} answered {status}")
    return time.perf_counter() - start

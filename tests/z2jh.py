"""zero-to-jupyterhub's way of running the proxy, for the tests that check hubproxy under it.

The chart's command (jupyterhub/templates/proxy/deployment.yaml), with the hub's Service as
the default and error target, is:

    configurable-http-proxy --ip= --api-ip= --api-port=8001
        --default-target=http://hub:$(HUB_SERVICE_PORT)
        --error-target=http://hub:$(HUB_SERVICE_PORT)/hub/error
        --port=8000                                   # or, with HTTPS from a Secret:
        --port=8443 --redirect-port=8000 --redirect-to=443 --ssl-key=... --ssl-cert=...
        [--log-level=debug] [extraCommandLineFlags...]

The tests keep the flags' exact form and give ports from the OS instead of 8000 and 8001. The
kubelet probes `/_chp_healthz` with a 1 s timeout, and the hub pod reaches the API through a
Service, so on the pod's own address: never through the pod's loopback. Here, an address of
this machine that is not 127.0.0.1 stands in for it: 127.0.0.2, which a listener bound to
127.0.0.1 refuses, and ::1 where IPv6 exists, which only a dual-stack listener takes. (The
machine's own non-loopback addresses are left alone: tests send nothing but loopback traffic.)
"""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import subprocess
import time

import pytest

from support import has_ipv6_loopback as has_ipv6

POD_ADDRESS = "127.0.0.2"  # "not 127.0.0.1": refused by a listener bound to 127.0.0.1 only


def http_flags(hub: str, port: int, api_port: int) -> list[str]:
    return [
        "--ip=",
        "--api-ip=",
        f"--api-port={api_port}",
        f"--default-target={hub}",
        f"--error-target={hub}/hub/error",
        f"--port={port}",
    ]


def https_flags(
    hub: str, port: int, api_port: int, redirect_port: int, key: str, cert: str
) -> list[str]:
    return [
        *http_flags(hub, port, api_port),
        f"--redirect-port={redirect_port}",
        "--redirect-to=443",
        f"--ssl-key={key}",
        f"--ssl-cert={cert}",
    ]


def pod_addresses() -> list[str]:
    """Where the hub pod and the kubelet would come from: not 127.0.0.1."""
    return [POD_ADDRESS, "::1"] if has_ipv6() else [POD_ADDRESS]


def listen_addresses(port: int) -> set[str]:
    """The local addresses listening on TCP `port`, as `ss -ltn` shows them (`*:8001`,
    `0.0.0.0:8001`, `[::]:8001`, `127.0.0.1:8001`)."""
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    return {line.split()[3] for line in out.splitlines() if line.strip()}


def free_port() -> int:
    """A port the OS has just handed out on every interface (for Node CHP, which reads
    `--port 0` as 8000: the tests never use a fixed port)."""
    family = socket.AF_INET6 if has_ipv6() else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        return int(s.getsockname()[1])


def get(
    host: str,
    port: int,
    path: str,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
    tls: ssl.SSLContext | None = None,
) -> tuple[int, http.client.HTTPMessage, bytes, float]:
    """One GET on a new connection: (status, headers, body, seconds it took)."""
    conn: http.client.HTTPConnection
    if tls is not None:
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=tls)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    started = time.monotonic()
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, resp.headers, body, time.monotonic() - started
    finally:
        conn.close()


def insecure_tls() -> ssl.SSLContext:
    """A client context that takes the test's self-made certificate, as the kubelet's probe
    does (it does not verify)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def unavailable(why: str) -> None:
    """Skip for want of a tool or a privilege; under CI (.ci/run installs everything these
    tests need) that is a failure instead."""
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)

"""The edge of the aiohttp listeners (API, metrics, redirect) and every listener's backlog, as
regression tests against a real proxy: what a client without the token can make us log or read,
and how many connection attempts each listener queues (design.md §5, docs/limits.md)."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme

from procs import ProxyCache
from rawhttp import RawClient
from support import TOKEN, Proxy

AUTH = ("Authorization", f"token {TOKEN}")
NODE_BACKLOG = 511  # Node's listen() default, which CHP inherits and listen.py sets

# requests aiohttp's parser rejects; before any handler runs, so no token is involved
MALFORMED = [
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 32,  # TLS on a plain port
    b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20_000 + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",  # no Host
    b"G\x00T / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
]


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A key and certificate for 127.0.0.1 (the redirect listener needs a TLS proxy)."""
    folder = tmp_path_factory.mktemp("tls")
    leaf = trustme.CA().issue_cert("127.0.0.1")
    key, cert = folder / "key.pem", folder / "cert.pem"
    leaf.private_key_pem.write_to_path(str(key))
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    return str(key), str(cert)


def start_every_listener(
    start_proxy: Callable[..., Proxy], tls: tuple[str, str], *args: str
) -> tuple[Proxy, int, int]:
    """A TLS proxy with metrics and redirect listeners: (proxy, metrics port, redirect port)."""
    proxy = start_proxy(
        "--ssl-key", tls[0], "--ssl-cert", tls[1], "--redirect-port", "0",
        "--metrics-ip", "127.0.0.1", "--metrics-port", "0", *args,
    )  # fmt: skip
    metrics = proxy.wait_for_line(r"Serve metrics at http://127\.0\.0\.1:(\d+)/metrics")
    redirect = proxy.wait_for_line(r"Added HTTP to HTTPS redirection from (\d+) to")
    return proxy, int(metrics.group(1)), int(redirect.group(1))


# -- finding 11: a malformed request costs one short line at most --------------------------------


def test_malformed_requests_log_one_short_line_each(
    start_proxy: Callable[..., Proxy], tls_pair: tuple[str, str]
) -> None:
    """aiohttp logged each one as an error with a traceback: a log flood open to anyone."""
    proxy, metrics_port, redirect_port = start_every_listener(
        start_proxy, tls_pair, "--log-level", "debug"
    )
    assert proxy.api("GET", "/edge-start")[0] == 404  # marks where the burst's lines begin
    proxy.wait_for_line(r"404 GET /api/routes/edge-start")
    sent = 0
    for port in (proxy.api_port, metrics_port, redirect_port):
        for request in MALFORMED:
            with RawClient("127.0.0.1", port) as client:
                client.send(request)
                assert client.response().status == 400
            sent += 1
    assert proxy.api("GET", "/edge-end")[0] == 404  # one process: its lines come in order
    proxy.wait_for_line(r"404 GET /api/routes/edge-end")

    lines = proxy.output().splitlines()
    start = next(i for i, line in enumerate(lines) if "404 GET /api/routes/edge-start" in line)
    end = next(i for i, line in enumerate(lines) if "404 GET /api/routes/edge-end" in line)
    burst = lines[start + 1 : end]
    assert len(burst) <= sent, "\n".join(burst)
    for line in burst:
        assert re.match(r"\S+Z \[ConfigProxy\] debug: ", line) and len(line) <= 250, line
    assert "Traceback" not in proxy.output()


def test_api_client_gone_mid_body_is_one_line(proxies: ProxyCache) -> None:
    """An authenticated POST whose client leaves before its body ends: one warn line, no 500."""
    proxy = proxies.get()
    with RawClient(proxy.api_host, proxy.api_port) as client:
        headers = [AUTH, ("Content-Length", "100")]
        client.request("POST", "/api/routes/gone", headers, body=b'{"target"')
        client.sock.shutdown(socket.SHUT_WR)
        client.read_to_eof()
    proxy.wait_for_line(r"warn: 400 POST /api/routes/gone Body not received: ")


# -- finding 12: the token before the body -------------------------------------------------------


def test_post_without_token_is_403_and_its_body_is_not_parsed(proxies: ProxyCache) -> None:
    """CHP parses the body first (400 for bad JSON); we check the token first (design.md §5)."""
    proxy = proxies.get()
    with RawClient(proxy.api_host, proxy.api_port) as client:
        client.request("POST", "/api/routes/nojson", body=b"not json")
        resp = client.response()
        assert (resp.status, resp.body, resp.header("Connection")) == (403, b"", "close")
        assert client.closed_by_peer()
    proxy.wait_for_line(r"warn: 403 POST /api/routes/nojson $")
    assert "POST /api/routes/nojson Body" not in proxy.output()


def test_post_without_token_is_answered_before_its_body_arrives(proxies: ProxyCache) -> None:
    """A gigabyte announced, nothing sent: 403 at once, and the connection closes rather than
    wait for (or read) a body nobody asked for."""
    proxy = proxies.get()
    with RawClient(proxy.api_host, proxy.api_port) as client:
        client.request("POST", "/api/routes/huge", [("Content-Length", str(1 << 30))])
        resp = client.response()
        assert (resp.status, resp.header("Connection")) == (403, "close")
        assert client.closed_by_peer()


def test_expect_100_continue_only_after_the_token(proxies: ProxyCache) -> None:
    """aiohttp would say `100 Continue` to anyone, inviting the body before the token check."""
    proxy = proxies.get()
    expect = ("Expect", "100-continue")
    with RawClient(proxy.api_host, proxy.api_port) as client:
        client.request("POST", "/api/routes/e", [expect, ("Content-Length", "30")])
        assert client.response(skip_informational=False).status == 403
    body = b'{"target": "http://127.0.0.1:9"}'
    with RawClient(proxy.api_host, proxy.api_port) as client:
        client.request("POST", "/api/routes/e", [AUTH, expect, ("Content-Length", str(len(body)))])
        assert client.read_head().status == 100
        client.send(body)
        assert client.response().status == 201
    assert proxy.routes()["/e"]["target"] == "http://127.0.0.1:9"


def test_connection_kept_unless_a_body_is_left_unread(proxies: ProxyCache) -> None:
    """A 403 without a body, and a body read (even a bad one), keep the connection alive."""
    proxy = proxies.get()
    with RawClient(proxy.api_host, proxy.api_port) as client:
        client.request("GET", "/api/routes")
        resp = client.response()
        assert (resp.status, resp.header("Connection")) == (403, None)
        client.request("POST", "/api/routes/ka", [AUTH], body=b"{")
        resp = client.response()
        assert (resp.status, resp.header("Connection")) == (400, None)
        client.request("GET", "/api/routes", [AUTH])
        assert client.response().status == 200
        client.request("PUT", "/api/routes/ka", [AUTH], body=b"{}")  # 405: its body unread
        resp = client.response()
        assert (resp.status, resp.header("Connection")) == (405, "close")
        assert client.closed_by_peer()


# -- finding 15: the listen backlog of every listener --------------------------------------------


def expected_backlog() -> int:
    """The kernel caps a listen() backlog at net.core.somaxconn (of this network namespace)."""
    return min(NODE_BACKLOG, int(Path("/proc/sys/net/core/somaxconn").read_text()))


def listening_backlogs(kind: str, local: Callable[[str], bool]) -> list[int]:
    """The backlogs (Send-Q column of `ss`) of listening sockets whose local address matches:
    `kind` is `t` (TCP) or `x` (Unix)."""
    ss = shutil.which("ss")
    assert ss, "this test needs ss (iproute2)"
    out = subprocess.run([ss, f"-l{kind}nH"], capture_output=True, text=True, check=True).stdout
    backlogs = []
    for line in out.splitlines():
        fields = line.split()
        for i, field in enumerate(fields):
            if i > 0 and local(field):
                backlogs.append(int(fields[i - 1]))
    return backlogs


def tcp_backlogs(port: int) -> list[int]:
    return listening_backlogs("t", lambda address: address.endswith(f":{port}"))


def test_every_tcp_listener_has_nodes_backlog(
    start_proxy: Callable[..., Proxy], tls_pair: tuple[str, str]
) -> None:
    """uvloop (100) and aiohttp (128) listened again over listen.py's 511."""
    proxy, metrics_port, redirect_port = start_every_listener(start_proxy, tls_pair)
    want = expected_backlog()
    listeners = {
        "public": proxy.port,
        "API": proxy.api_port,
        "metrics": metrics_port,
        "redirect": redirect_port,
    }
    found = {name: tcp_backlogs(port) for name, port in listeners.items()}
    assert found == {name: [want] for name in listeners}


def test_worker_listeners_have_nodes_backlog(start_proxy: Callable[..., Proxy]) -> None:
    """--workers 2: two SO_REUSEPORT sockets, each listened on again by its worker."""
    proxy = start_proxy("--workers", "2")
    assert tcp_backlogs(proxy.port) == [expected_backlog()] * 2


@pytest.mark.parametrize("workers", ["1", "2"])
def test_every_unix_listener_has_nodes_backlog(
    start_proxy: Callable[..., Proxy], tmp_path: Path, workers: str
) -> None:
    paths = [str(tmp_path / name) for name in ("public.sock", "api.sock", "metrics.sock")]
    start_proxy(
        "--socket", paths[0], "--api-socket", paths[1], "--metrics-socket", paths[2],
        "--workers", workers,
    )  # fmt: skip
    found = [listening_backlogs("x", lambda address, p=path: address == p) for path in paths]
    assert found == [[expected_backlog()]] * 3


# -- idle and half-sent connections on the aiohttp listeners -------------------------------------


def test_idle_and_half_sent_connections_are_closed_after_5_s(
    start_proxy: Callable[..., Proxy], tls_pair: tuple[str, str]
) -> None:
    """As Node's (CHP's) 5 s keep-alive timeout. aiohttp's own default kept them an hour, so
    anyone who could connect could hold connections (and fds) there for good."""
    proxy, metrics_port, redirect_port = start_every_listener(start_proxy, tls_pair)
    clients = []
    try:
        for port in (proxy.api_port, metrics_port, redirect_port):
            for first in (b"", b"GET /api/routes HTTP/1.1\r\nHo"):  # idle, half a head
                client = RawClient("127.0.0.1", port, timeout=30)
                clients.append(client)
                if first:
                    client.send(first)
            client = RawClient("127.0.0.1", port, timeout=30)  # idle after an answer
            clients.append(client)
            client.send(b"GET /api/routes HTTP/1.1\r\nHost: x\r\nAuthorization: token x\r\n\r\n")
            client.response()
        for client in clients:  # all wait at once: about 5 s in all
            assert client.closed_by_peer()
    finally:
        for client in clients:
            client.close()

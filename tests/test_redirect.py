"""The HTTP to HTTPS redirect listener: `--redirect-port`, `--redirect-to` (§3.13, §6.4 3–4)."""

from __future__ import annotations

import json
import re
import socket
import ssl
from collections.abc import Callable

import pytest

from hubproxy.redirect import NO_HOST, location
from rawhttp import RawClient
from support import Backend, Proxy, http_request
from test_tls import PKI, https, run_to_exit

_ADDED = r"info: Added HTTP to HTTPS redirection from (\d+) to (\d+)"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


def start_redirecting(
    start_proxy: Callable[..., Proxy], pki: PKI, *args: str
) -> tuple[Proxy, int, int]:
    """A TLS proxy with `--redirect-port 0` (OS-chosen); (proxy, redirect port, port named)."""
    proxy = start_proxy(
        "--ssl-key", pki.server.key, "--ssl-cert", pki.server.cert, "--redirect-port", "0", *args
    )  # fmt: skip
    match = proxy.wait_for_line(_ADDED)
    return proxy, int(match.group(1)), int(match.group(2))


def raw(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    with RawClient("127.0.0.1", port) as client:
        client.send(request)
        resp = client.response()
    headers = {n.decode().lower(): v.decode() for n, v in resp.headers}
    return resp.status, headers, resp.body


def test_redirect_port(pki: PKI, start_proxy: Callable[..., Proxy], backend: Backend) -> None:
    """CHP's CLI test "redirect-port" (§6.4 case 3): 301 to the proxy; following it works."""
    proxy, redirect_port, named = start_redirecting(
        start_proxy, pki, "--default-target", backend.url
    )
    assert named == proxy.port and redirect_port not in (0, proxy.port)
    status, headers, body = http_request("127.0.0.1", redirect_port, "GET", "/some/path?x=1&y")
    assert status == 301 and body == b""
    assert headers["Location"] == f"https://127.0.0.1:{proxy.port}/some/path?x=1&y"
    # following it reaches the default target, over TLS
    target = headers["Location"].removeprefix(f"https://127.0.0.1:{proxy.port}")
    status, _, body = https(proxy.port, target, pki.client_context())
    assert status == 200
    assert json.loads(body)["url"] == "/some/path?x=1&y"


def test_redirect_to(pki: PKI, start_proxy: Callable[..., Proxy]) -> None:
    """CHP's CLI test "redirect-to" (§6.4 case 4)."""
    proxy, redirect_port, named = start_redirecting(start_proxy, pki, "--redirect-to", "8914")
    assert named == 8914
    status, headers, _ = http_request("127.0.0.1", redirect_port, "GET", "/")
    assert status == 301
    assert headers["Location"] == "https://127.0.0.1:8914/"
    assert proxy.proc.poll() is None


def test_redirect_to_443_leaves_the_port_out(pki: PKI, start_proxy: Callable[..., Proxy]) -> None:
    """CHP writes `:443` when 443 comes from --redirect-to (a string); we never do."""
    _, redirect_port, named = start_redirecting(start_proxy, pki, "--redirect-to", "443")
    assert named == 443
    status, headers, _ = http_request(
        "127.0.0.1", redirect_port, "GET", "/hub/login", headers={"Host": "hub.example.org:8000"}
    )
    assert (status, headers["Location"]) == (301, "https://hub.example.org/hub/login")


def test_every_method_and_path_is_redirected(pki: PKI, start_proxy: Callable[..., Proxy]) -> None:
    proxy, redirect_port, _ = start_redirecting(start_proxy, pki)
    for method in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"):
        status, headers, _ = http_request(
            "127.0.0.1", redirect_port, method, "/a%20b/c?d=%2F", body=b"x" * 10
        )
        assert status == 301, method
        assert headers["Location"] == f"https://127.0.0.1:{proxy.port}/a%20b/c?d=%2F"
    # /_chp_healthz is redirected too: it is answered on the TLS port
    status, headers, _ = http_request("127.0.0.1", redirect_port, "GET", "/_chp_healthz")
    assert (status, headers["Location"]) == (301, f"https://127.0.0.1:{proxy.port}/_chp_healthz")


def test_ipv6_host_and_keep_alive(pki: PKI, start_proxy: Callable[..., Proxy]) -> None:
    proxy, redirect_port, _ = start_redirecting(start_proxy, pki)
    with RawClient("127.0.0.1", redirect_port) as client:
        for host, expected in (("[::1]:80", "[::1]"), ("example.org", "example.org")):
            client.request("GET", "/x", host=host)
            resp = client.response()
            assert resp.status == 301
            assert resp.header("Location") == f"https://{expected}:{proxy.port}/x"


@pytest.mark.parametrize(
    "request_bytes",
    [b"GET /x HTTP/1.0\r\n\r\n", b"GET /x HTTP/1.1\r\nHost:\r\nConnection: close\r\n\r\n"],
)
def test_no_host_is_400(pki: PKI, start_proxy: Callable[..., Proxy], request_bytes: bytes) -> None:
    proxy, redirect_port, _ = start_redirecting(start_proxy, pki)
    status, headers, body = raw(redirect_port, request_bytes)
    assert status == 400
    assert body.decode() == (
        f"This server is HTTPS-only on port {proxy.port}, but an HTTP request was made and the "
        "host could not be determined from the request."
    )
    assert headers["content-type"].startswith("text/plain")


def test_redirect_listens_on_all_interfaces(pki: PKI, start_proxy: Callable[..., Proxy]) -> None:
    """Whatever --ip says, as CHP (spec §1.1)."""
    proxy, redirect_port, _ = start_redirecting(start_proxy, pki)
    lines = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{proxy.proc.pid}/net/{table}") as f:
            lines += f.read().splitlines()[1:]
    listening = {
        (ln.split()[1].rsplit(":", 1)[0], int(ln.split()[1].rsplit(":", 1)[1], 16))
        for ln in lines
        if ln.split()[3] == "0A"  # TCP_LISTEN
    }
    wildcard = {"00000000", "00000000000000000000000000000000"}
    assert any(addr in wildcard and port == redirect_port for addr, port in listening)


def test_no_redirect_listener_with_a_unix_socket(
    pki: PKI, tmp_path_factory: pytest.TempPathFactory, start_proxy: Callable[..., Proxy]
) -> None:
    sock = tmp_path_factory.mktemp("redirect") / "proxy.sock"
    proxy = start_proxy(
        "--socket", str(sock), "--ssl-key", pki.server.key, "--ssl-cert", pki.server.cert,
        "--redirect-port", "0",
    )  # fmt: skip
    assert proxy.public_url.startswith("https+unix://")
    out = proxy.output()
    assert (
        "warn: No HTTP to HTTPS redirection with --socket (as CHP): --redirect-port unused" in out
    )
    assert "Added HTTP to HTTPS redirection" not in out


def test_redirect_port_in_use_exits_1(pki: PKI) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_to_exit(
            "--ssl-key", pki.server.key, "--ssl-cert", pki.server.cert,
            "--redirect-port", str(port),
        )  # fmt: skip
    assert result.returncode == 1
    assert re.search(rf"error: redirect: cannot listen on .*:{port}: ", result.stdout)


# --- units ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "target", "expected"),
    [
        ("127.0.0.1:8913", 8902, "/", "https://127.0.0.1:8902/"),
        ("example.org", 443, "/hub/?next=%2F", "https://example.org/hub/?next=%2F"),
        ("example.org:80", 8443, "/a/b", "https://example.org:8443/a/b"),
        ("[::1]:8000", 8443, "/", "https://[::1]:8443/"),
        ("[::1]", 443, "/x", "https://[::1]/x"),
        ("example.org:80", 8443, "http://example.org/p?q=1", "https://example.org:8443/p?q=1"),
        ("example.org", 8443, "*", "https://example.org:8443/"),
    ],
)
def test_location(host: str, port: int, target: str, expected: str) -> None:
    assert location(host, port, target) == expected


def test_location_cuts_the_port_of_any_host() -> None:
    # the Host is split by proxy.paths.split_host (tested there as a table)
    assert location("a.b:1", 443, "/") == "https://a.b/"
    assert location("[fe80::1]:80", 443, "/") == "https://[fe80::1]/"
    assert location("[broken", 443, "/") == "https://[broken/"
    assert "{port}" in NO_HOST


def test_tls_verification_of_the_redirected_client(
    pki: PKI, start_proxy: Callable[..., Proxy]
) -> None:
    """The redirect listener is plain HTTP; the TLS port refuses a client that does not trust it."""
    proxy, redirect_port, _ = start_redirecting(start_proxy, pki)
    assert http_request("127.0.0.1", redirect_port, "GET", "/")[0] == 301
    untrusting = ssl.create_default_context()  # system CAs: not trustme's
    with pytest.raises(ssl.SSLError):
        https(proxy.port, "/", untrusting)

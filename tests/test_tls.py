"""TLS on every side (spec §1.2, §3.10, §6.3 case 24, §6.4 case 2, §7.2, §7.5 item 8).

Certificates come from trustme CAs written to a temporary directory; the proxy runs as a process
on OS-chosen loopback ports; clients are the standard library's (`http.client`, `ssl`) and
`websockets`. Backends are aiohttp servers, plain or TLS (optionally requiring a client
certificate), in a thread of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
import websockets
from aiohttp import web

from hubproxy.config import Config
from hubproxy.tls import (
    CHP_CIPHERS,
    CertificateWatcher,
    ReloadableTLS,
    TLSError,
    client_context,
    ineffective_options,
    protocol_range,
    public_side,
    server_context,
)
from support import TOKEN, Backend, Proxy, echo_app, exchange
from test_websocket import ws_app

# RFC 7919 ffdhe2048, as `openssl genpkey -genparam -algorithm DH -pkeyopt group:ffdhe2048` writes
FFDHE2048 = """-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


# --- certificates ---------------------------------------------------------------------------------


@dataclass
class Pair:
    """A leaf certificate written as files: `cert` (chain), `key`, and its serial number."""

    cert: str
    key: str
    serial: str
    leaf: trustme.LeafCert

    def load_into(self, ctx: ssl.SSLContext) -> ssl.SSLContext:
        ctx.load_cert_chain(self.cert, self.key)
        return ctx


class PKI:
    """Two CAs (as JupyterHub's internal SSL has several) and the certificates tests need."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = trustme.CA()
        self.other_ca = trustme.CA()  # trusted by nobody unless a test says so
        self.ca_file = self._write("ca.pem", self.ca.cert_pem.bytes())
        self.other_ca_file = self._write("other-ca.pem", self.other_ca.cert_pem.bytes())
        self.bundle_file = self._write(  # several certificates in one CA file
            "bundle.pem", self.other_ca.cert_pem.bytes() + self.ca.cert_pem.bytes()
        )
        self.server = self.issue("server", self.ca, "127.0.0.1", "localhost")
        self.server2 = self.issue("server2", self.ca, "127.0.0.1", "localhost")
        self.client = self.issue("client", self.ca, "proxy-client")
        self.backend = self.issue("backend", self.other_ca, "127.0.0.1")
        self.api_client = self.issue("hub-client", self.other_ca, "hub")
        self.localhost_only = self.issue("localhost-only", self.ca, "localhost")
        self.rsa_ca = trustme.CA(key_type=trustme.KeyType.RSA)
        self.rsa_ca_file = self._write("rsa-ca.pem", self.rsa_ca.cert_pem.bytes())
        self.rsa = self.issue("rsa", self.rsa_ca, "127.0.0.1", key_type=trustme.KeyType.RSA)
        self.dhparam = self._write("dh.pem", FFDHE2048.encode())

    def _write(self, name: str, data: bytes) -> str:
        path = self.root / name
        path.write_bytes(data)
        return str(path)

    def issue(
        self,
        name: str,
        ca: trustme.CA,
        *identities: str,
        key_type: trustme.KeyType = trustme.KeyType.ECDSA,
    ) -> Pair:
        leaf = ca.issue_cert(*identities, key_type=key_type)
        cert = self._write(f"{name}.crt", b"".join(b.bytes() for b in leaf.cert_chain_pems))
        key = self._write(f"{name}.key", leaf.private_key_pem.bytes())
        return Pair(cert, key, _serial_of(cert), leaf)

    def client_context(
        self, cert: Pair | None = None, ca_file: str | None = None
    ) -> ssl.SSLContext:
        """What a browser that trusts our CA (and optionally presents `cert`) would use."""
        ctx = ssl.create_default_context(cafile=ca_file or self.ca_file)
        if cert is not None:
            cert.load_into(ctx)
        return ctx


def _serial_of(cert_file: str) -> str:
    decoded = ssl._ssl._test_decode_cert(cert_file)  # type: ignore[attr-defined]
    return str(decoded["serialNumber"])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


# --- clients and servers --------------------------------------------------------------------------


class TLSBackend(Backend):
    """A Backend serving TLS with `context` (which may require client certificates)."""

    def __init__(self, app: web.Application, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__(app)

    async def _start(self) -> None:
        self._runner = web.AppRunner(self._app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._context)
        await site.start()
        server = site._server
        assert server is not None and server.sockets
        self.port = server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


def tls_server_context(pair: Pair, client_ca: str | None = None) -> ssl.SSLContext:
    ctx = pair.load_into(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    if client_ca is not None:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@pytest.fixture
def start_tls_backend() -> Iterator[Callable[..., TLSBackend]]:
    started: list[TLSBackend] = []

    def start(context: ssl.SSLContext, app: web.Application | None = None) -> TLSBackend:
        backend = TLSBackend(app if app is not None else echo_app("tls-backend"), context)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.stop()


def server_tls(pki: PKI) -> tuple[str, ...]:
    """The public listener's TLS options with the PKI's server certificate."""
    return ("--ssl-key", pki.server.key, "--ssl-cert", pki.server.cert)


def https(
    port: int,
    path: str,
    context: ssl.SSLContext,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    return exchange(conn, method, path, body, headers)


def api_https(
    proxy: Proxy,
    context: ssl.SSLContext,
    method: str = "GET",
    path: str = "",
    data: Any = None,
) -> tuple[int, bytes]:
    body = None if data is None else json.dumps(data).encode()
    status, _, reply = https(
        proxy.api_port,
        "/api/routes" + path,
        context,
        method,
        body,
        {"Authorization": f"token {TOKEN}"},
    )
    return status, reply


def peer_serial(port: int, context: ssl.SSLContext) -> str:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        return str(tls.getpeercert()["serialNumber"])


def open_websocket(sock: socket.socket) -> None:
    """Upgrade to a WebSocket on `sock` (ws_app's /ws) and read up to its first message."""
    sock.sendall(
        b"GET /ws HTTP/1.1\r\nHost: example.org\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    seen = b""
    while b"connected" not in seen:
        chunk = sock.recv(4096)
        assert chunk, seen
        seen += chunk
    assert seen.startswith(b"HTTP/1.1 101 ")


def run_to_exit(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the proxy expecting it to stop by itself (a start-up error)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIGPROXY_")}
    full_env.update(env or {})
    argv = ["--ip", "127.0.0.1", "--port", "0", "--api-ip", "127.0.0.1", "--api-port", "0"]
    return subprocess.run(
        [sys.executable, "-m", "hubproxy", *argv, *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=30,
    )


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one error line of a failed start (CHP's format, on stdout)."""
    lines = [line for line in result.stdout.splitlines() if " error: " in line]
    assert len(lines) == 1, result.stdout + result.stderr
    return lines[0].split(" error: ", 1)[1]


def replace_file(path: str, data: bytes) -> None:
    """Replace a file's contents at once, as certificate managers do (write, then rename)."""
    tmp = path + ".new"
    Path(tmp).write_bytes(data)
    os.replace(tmp, path)


# --- public HTTPS -------------------------------------------------------------------------------


def test_basic_https_request(pki: PKI, start_proxy: Callable[..., Proxy], backend: Backend) -> None:
    """CHP's CLI test "basic HTTPS request" (§6.4 case 2), with a verifying client."""
    proxy = start_proxy(*server_tls(pki), "--default-target", backend.url)
    assert proxy.public_url.startswith("https://127.0.0.1:")
    assert proxy.api_url.startswith("http://")  # the API stays plain without --api-ssl-*
    status, _, body = https(proxy.port, "/some/path?x=1", pki.client_context())
    assert status == 200
    seen = json.loads(body)
    assert seen["url"] == "/some/path?x=1"
    assert seen["headers"]["X-Forwarded-Proto"] == "https"
    assert seen["headers"]["X-Forwarded-Port"] == str(proxy.port)
    # a plain-HTTP request on the TLS port is not answered as HTTP
    with pytest.raises((http.client.HTTPException, OSError)):
        proxy.request("GET", "/")


def test_health_check_and_errors_over_https(pki: PKI, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy("--ssl-key", pki.server.key, "--ssl-cert", pki.server.cert)
    status, _, body = https(proxy.port, "/_chp_healthz", pki.client_context())
    assert (status, body) == (200, b'{"status":"OK"}')
    status, _, body = https(proxy.port, "/nothing/here", pki.client_context())
    assert status == 404 and b"404:" in body


async def test_wss_through_the_proxy(
    pki: PKI, start_proxy: Callable[..., Proxy], start_backend: Callable[..., Backend]
) -> None:
    """A WebSocket over TLS to a plain backend: X-Forwarded-Proto is `wss`."""
    app = ws_app()
    backend = start_backend(app)
    proxy = start_proxy(*server_tls(pki), "--default-target", backend.url)
    url = f"wss://127.0.0.1:{proxy.port}/ws/path"
    async with websockets.connect(url, ssl=pki.client_context(), close_timeout=1) as ws:
        assert await ws.recv() == "connected"
        for size in (1, 1000, 100_000):
            await ws.send("x" * size)
            assert await ws.recv() == "x" * size
    seen = app["seen"][0]
    assert seen["X-Forwarded-Proto"] == "wss"
    # closing a TLS client must not make the proxy complain
    status, _, _ = https(proxy.port, "/_chp_healthz", pki.client_context())
    assert status == 200
    assert " warn: " not in proxy.output() and " error: " not in proxy.output()


async def test_wss_close_is_prompt(
    pki: PKI, start_proxy: Callable[..., Proxy], start_backend: Callable[..., Backend]
) -> None:
    """The target ends the WebSocket (as RFC 6455 has servers do): the TLS client sees the end
    at once, not after its own close timeout."""
    backend = start_backend(ws_app())
    proxy = start_proxy(*server_tls(pki), "--default-target", backend.url)
    started = time.monotonic()
    url = f"wss://127.0.0.1:{proxy.port}/ws"
    async with websockets.connect(url, ssl=pki.client_context(), close_timeout=2) as ws:
        assert await ws.recv() == "connected"
    assert time.monotonic() - started < 1.5


def test_tls_client_ending_a_tunnel_is_quiet(
    pki: PKI, start_proxy: Callable[..., Proxy], start_backend: Callable[..., Backend]
) -> None:
    """A TLS client that ends a WebSocket with close_notify: the tunnel closes, nothing logged."""
    app = ws_app()
    backend = start_backend(app)
    proxy = start_proxy(*server_tls(pki), "--default-target", backend.url)
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    with pki.client_context().wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        open_websocket(tls)
        with contextlib.suppress(OSError):
            tls.unwrap()  # close_notify, while the tunnel is open
    deadline = time.monotonic() + 10
    while not app["closed_by_client"].is_set():  # the proxy closed the upstream leg
        assert time.monotonic() < deadline, "the tunnel to the target stayed open"
        time.sleep(0.02)
    proxy.add_route("/marker", backend.url)  # a log line after anything the close logged
    proxy.wait_for_line(r"info: 201 POST /api/routes/marker")
    assert " warn: " not in proxy.output()


def test_public_request_cert(pki: PKI, start_proxy: Callable[..., Proxy], backend: Backend) -> None:
    """`--ssl-request-cert` alone requires a valid client certificate, as CHP behaves."""
    proxy = start_proxy(
        *server_tls(pki),
        "--ssl-ca", pki.ca_file, "--ssl-request-cert",
        "--default-target", backend.url,
    )  # fmt: skip
    with pytest.raises((ssl.SSLError, ConnectionError)):
        https(proxy.port, "/", pki.client_context())
    status, _, _ = https(proxy.port, "/", pki.client_context(cert=pki.client))
    assert status == 200
    # a certificate from a CA the proxy does not trust is refused too
    with pytest.raises((ssl.SSLError, ConnectionError)):
        https(proxy.port, "/", pki.client_context(cert=pki.api_client))


def test_ssl_protocol_limits_the_version(
    pki: PKI, start_proxy: Callable[..., Proxy], backend: Backend
) -> None:
    proxy = start_proxy(
        *server_tls(pki),
        "--ssl-protocol", "TLSv1_2", "--default-target", backend.url,
    )  # fmt: skip
    tls12 = pki.client_context()
    conn = http.client.HTTPSConnection("127.0.0.1", proxy.port, context=tls12, timeout=10)
    conn.request("GET", "/")
    assert conn.getresponse().status == 200
    assert conn.sock.version() == "TLSv1.2"
    conn.close()
    tls13 = pki.client_context()
    tls13.minimum_version = ssl.TLSVersion.TLSv1_3
    with pytest.raises((ssl.SSLError, ConnectionError)):
        https(proxy.port, "/", tls13)


def test_dhparam_and_ciphers(pki: PKI, start_proxy: Callable[..., Proxy], backend: Backend) -> None:
    """`--ssl-dhparam` enables the DHE suites of CHP's list; `--ssl-ciphers` restricts them."""
    proxy = start_proxy(
        "--ssl-key", pki.rsa.key, "--ssl-cert", pki.rsa.cert, "--ssl-dhparam", pki.dhparam,
        "--ssl-protocol", "TLSv1_2", "--ssl-ciphers", "DHE-RSA-AES128-GCM-SHA256",
        "--default-target", backend.url,
    )  # fmt: skip
    ctx = pki.client_context(ca_file=pki.rsa_ca_file)
    conn = http.client.HTTPSConnection("127.0.0.1", proxy.port, context=ctx, timeout=10)
    conn.request("GET", "/")
    assert conn.getresponse().status == 200
    assert conn.sock.cipher()[0] == "DHE-RSA-AES128-GCM-SHA256"
    conn.close()
    ecdhe_only = pki.client_context(ca_file=pki.rsa_ca_file)
    ecdhe_only.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
    ecdhe_only.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        https(proxy.port, "/", ecdhe_only)


def test_encrypted_key_with_passphrase(
    pki: PKI, tmp_path: Path, start_proxy: Callable[..., Proxy], backend: Backend
) -> None:
    key = _encrypted_key(pki.server, tmp_path, b"s3cret")
    proxy = start_proxy(
        "--ssl-key", key, "--ssl-cert", pki.server.cert, "--default-target", backend.url,
        env={"CONFIGPROXY_SSL_KEY_PASSPHRASE": "s3cret"},
    )  # fmt: skip
    status, _, _ = https(proxy.port, "/", pki.client_context())
    assert status == 200


def _encrypted_key(pair: Pair, tmp_path: Path, passphrase: bytes) -> str:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pair.leaf.private_key_pem.bytes(), None)
    path = tmp_path / "encrypted.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(passphrase),
        )
    )
    return str(path)


# --- start-up errors: exit 1 with one line --------------------------------------------------------


def test_wrong_passphrase_exits_1(pki: PKI, tmp_path: Path) -> None:
    key = _encrypted_key(pki.server, tmp_path, b"right")
    result = run_to_exit(
        "--ssl-key", key, "--ssl-cert", pki.server.cert,
        env={"CONFIGPROXY_SSL_KEY_PASSPHRASE": "wrong"},
    )  # fmt: skip
    assert result.returncode == 1
    assert error_line(result) == (
        f"--ssl-key {key}: wrong passphrase in CONFIGPROXY_SSL_KEY_PASSPHRASE"
    )
    assert "Proxying" not in result.stdout


def test_encrypted_key_without_passphrase_exits_1(pki: PKI, tmp_path: Path) -> None:
    key = _encrypted_key(pki.server, tmp_path, b"right")
    result = run_to_exit("--api-ssl-key", key, "--api-ssl-cert", pki.server.cert)
    assert result.returncode == 1
    assert error_line(result) == (
        f"--api-ssl-key {key}: the key is encrypted; set CONFIGPROXY_API_SSL_KEY_PASSPHRASE"
    )


def test_unreadable_key_exits_1(pki: PKI, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.key")
    result = run_to_exit("--ssl-key", missing, "--ssl-cert", pki.server.cert)
    assert result.returncode == 1
    assert error_line(result) == (
        f"--ssl-key {missing}: cannot read the file: No such file or directory"
    )
    result = run_to_exit("--ssl-key", str(tmp_path), "--ssl-cert", pki.server.cert)
    assert result.returncode == 1
    assert error_line(result) == f"--ssl-key {tmp_path}: cannot read the file: Is a directory"


def test_mismatched_key_and_cert_exit_1(pki: PKI) -> None:
    result = run_to_exit("--ssl-key", pki.server2.key, "--ssl-cert", pki.server.cert)
    assert result.returncode == 1
    assert error_line(result) == (
        f"--ssl-key {pki.server2.key}: the key does not match --ssl-cert {pki.server.cert}"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--ssl-protocol", "TLSv1"],
            "--ssl-protocol TLSv1: TLS 1.0 is insecure and not supported",
        ),
        (["--ssl-protocol", "QUIC"], "--ssl-protocol QUIC: unknown protocol"),
        (["--ssl-ciphers", "NOPE-NOTHING"], "--ssl-ciphers NOPE-NOTHING: no cipher matches"),
        (["--client-ssl-ca", "{missing}"], "--client-ssl-ca {missing}: cannot read the file"),
        (["--client-ssl-ca", "{key}"], "--client-ssl-ca {key}: no PEM certificate in the file"),
        (["--ssl-cert", "{cert}"], "--ssl-cert {cert}: no --ssl-key given and the file holds no"),
        (["--ssl-key", "{key}"], "--ssl-key {key}: no --ssl-cert given and the file holds no"),
        (["--ssl-key", "{key}", "--ssl-cert", "{key}"], "--ssl-cert {key}: no PEM certificate"),
        (
            ["--ssl-key", "{key}", "--ssl-cert", "{cert}", "--ssl-dhparam", "{key}"],
            "--ssl-dhparam {key}: not PEM Diffie-Hellman parameters",
        ),
    ],
)
def test_bad_tls_options_exit_1(pki: PKI, tmp_path: Path, args: list[str], message: str) -> None:
    values = {"missing": str(tmp_path / "nope.pem"), "key": pki.server.key, "cert": pki.server.cert}
    result = run_to_exit(*(a.format(**values) for a in args))
    assert result.returncode == 1
    assert error_line(result).startswith(message.format(**values))


def test_cert_file_holding_the_key_too(
    pki: PKI, tmp_path: Path, start_proxy: Callable[..., Proxy], backend: Backend
) -> None:
    both = tmp_path / "both.pem"
    both.write_bytes(Path(pki.server.cert).read_bytes() + Path(pki.server.key).read_bytes())
    proxy = start_proxy("--ssl-cert", str(both), "--default-target", backend.url)
    assert https(proxy.port, "/", pki.client_context())[0] == 200


# --- the API over TLS ---------------------------------------------------------------------------


def test_api_https_requires_client_cert(pki: PKI, start_proxy: Callable[..., Proxy]) -> None:
    """JupyterHub's test: without a certificate the API fails at the TLS level (§3.10)."""
    proxy = start_proxy(
        "--api-ssl-key", pki.server.key, "--api-ssl-cert", pki.server.cert,
        "--api-ssl-ca", pki.bundle_file, "--api-ssl-request-cert",
    )  # fmt: skip
    assert proxy.api_url.startswith("https://")
    assert proxy.public_url.startswith("http://")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        api_https(proxy, pki.client_context())
    # a CA file with several certificates: either CA's client certificate is accepted
    for cert in (pki.client, pki.api_client):
        status, body = api_https(proxy, pki.client_context(cert=cert))
        assert status == 200 and json.loads(body) == {}
    # and plain HTTP gets nothing
    with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
        proxy.api("GET")


# --- https targets (client side) ------------------------------------------------------------------


def test_https_target_requiring_client_cert(
    pki: PKI,
    start_proxy: Callable[..., Proxy],
    start_tls_backend: Callable[..., TLSBackend],
) -> None:
    """CHP's "internal ssl test" (§6.3 case 24): mutual TLS to the target."""
    backend = start_tls_backend(tls_server_context(pki.backend, client_ca=pki.ca_file))
    proxy = start_proxy(
        "--client-ssl-key", pki.client.key, "--client-ssl-cert", pki.client.cert,
        "--client-ssl-ca", pki.other_ca_file,
    )  # fmt: skip
    proxy.add_route("/backend", backend.url)
    for _ in range(3):  # pooled: the same upstream connection serves again
        status, _, body = proxy.request("GET", "/backend/urlpath/")
        assert status == 200, body
        assert json.loads(body)["url"] == "/backend/urlpath/"


def test_https_target_without_client_cert_is_503(
    pki: PKI,
    start_proxy: Callable[..., Proxy],
    start_tls_backend: Callable[..., TLSBackend],
) -> None:
    backend = start_tls_backend(tls_server_context(pki.backend, client_ca=pki.ca_file))
    proxy = start_proxy("--client-ssl-ca", pki.other_ca_file)
    proxy.add_route("/backend", backend.url)
    status, _, _ = proxy.request("GET", "/backend/x")
    assert status == 503


def test_https_target_verification_and_insecure(
    pki: PKI,
    start_proxy: Callable[..., Proxy],
    start_tls_backend: Callable[..., TLSBackend],
) -> None:
    """Targets are verified (system CAs by default; the host name too) unless --insecure."""
    untrusted = start_tls_backend(tls_server_context(pki.backend))
    wrong_name = start_tls_backend(tls_server_context(pki.localhost_only))
    verifying = start_proxy("--client-ssl-ca", pki.ca_file)
    default = start_proxy()  # the system's CAs, which do not know trustme's
    insecure = start_proxy("--insecure")
    for proxy in (verifying, default, insecure):
        proxy.add_route("/untrusted", untrusted.url)
        proxy.add_route("/wrong-name", wrong_name.url)
        proxy.add_route("/by-name", f"https://localhost:{wrong_name.port}")
    for path in ("/untrusted", "/wrong-name"):
        assert verifying.request("GET", path)[0] == 503
        assert default.request("GET", path)[0] == 503
        assert insecure.request("GET", path)[0] == 200
    assert verifying.request("GET", "/by-name")[0] == 200
    assert re.search(r"error: 503 GET /untrusted .*certificate", verifying.output())


def test_https_error_target_with_client_cert(
    pki: PKI,
    start_proxy: Callable[..., Proxy],
    start_tls_backend: Callable[..., TLSBackend],
) -> None:
    async def error_page(request: web.Request) -> web.Response:
        return web.Response(text=f"custom {request.path} {request.query['url']}")

    app = web.Application()
    app.router.add_get("/hub/error/{code}", error_page)
    hub = start_tls_backend(tls_server_context(pki.backend, client_ca=pki.ca_file), app)
    proxy = start_proxy(
        "--error-target", f"{hub.url}/hub/error",
        "--client-ssl-key", pki.client.key, "--client-ssl-cert", pki.client.cert,
        "--client-ssl-ca", pki.other_ca_file,
    )  # fmt: skip
    status, headers, body = proxy.request("GET", "/user/x/")
    assert status == 404
    assert body == b"custom /hub/error/404 /user/x/"
    assert headers["Content-Type"].startswith("text/plain")


async def test_wss_to_an_https_target(
    pki: PKI,
    start_proxy: Callable[..., Proxy],
    start_tls_backend: Callable[..., TLSBackend],
) -> None:
    """TLS on both legs of a WebSocket, with the client certificate on the upstream leg."""
    backend = start_tls_backend(tls_server_context(pki.backend, client_ca=pki.ca_file), ws_app())
    proxy = start_proxy(
        *server_tls(pki),
        "--client-ssl-key", pki.client.key, "--client-ssl-cert", pki.client.cert,
        "--client-ssl-ca", pki.other_ca_file, "--default-target", backend.url,
    )  # fmt: skip
    async with websockets.connect(
        f"wss://127.0.0.1:{proxy.port}/ws", ssl=pki.client_context()
    ) as ws:
        assert await ws.recv() == "connected"
        await ws.send("hi")
        assert await ws.recv() == "hi"


# --- JupyterHub's internal SSL (§7.2, §7.5 item 8) -----------------------------------------------


def test_jupyterhub_internal_ssl_command_line(
    pki: PKI,
    tmp_path: Path,
    start_proxy: Callable[..., Proxy],
    start_tls_backend: Callable[..., TLSBackend],
) -> None:
    """JupyterHub's exact internal-SSL options: API over mutual TLS, mutual TLS to targets.

    As certipy sets it up: the proxy's API and client certificates come from one CA, the hub's
    and the backends' from another, and each side's CA file trusts both.
    """
    proxy_api = pki.issue("proxy-api", pki.ca, "127.0.0.1", "localhost")
    proxy_client = pki.issue("proxy-client", pki.ca, "proxy-client")
    trust = pki.bundle_file
    backend = start_tls_backend(tls_server_context(pki.backend, client_ca=trust))
    hub = start_tls_backend(tls_server_context(pki.backend, client_ca=trust))
    proxy = start_proxy(
        "--error-target", f"{hub.url}/hub/error",
        "--log-level", "info",
        "--api-ssl-key", proxy_api.key, "--api-ssl-cert", proxy_api.cert,
        "--api-ssl-ca", trust, "--api-ssl-request-cert", "--api-ssl-reject-unauthorized",
        "--client-ssl-key", proxy_client.key, "--client-ssl-cert", proxy_client.cert,
        "--client-ssl-ca", trust, "--client-ssl-request-cert", "--client-ssl-reject-unauthorized",
    )  # fmt: skip
    hub_ctx = pki.client_context(cert=pki.api_client, ca_file=trust)
    status, _ = api_https(
        proxy, hub_ctx, "POST", "/user/river", {"target": backend.url, "jupyterhub": True}
    )
    assert status == 201
    status, body = api_https(proxy, hub_ctx)
    assert status == 200 and json.loads(body)["/user/river"]["target"] == backend.url
    with pytest.raises((ssl.SSLError, ConnectionError)):
        api_https(proxy, pki.client_context(ca_file=trust))  # no certificate: refused
    status, _, body = proxy.request("GET", "/user/river/lab?x=1")
    assert status == 200
    assert json.loads(body)["url"] == "/user/river/lab?x=1"
    assert json.loads(body)["headers"]["X-Forwarded-Proto"] == "http"


# --- reload without restart -----------------------------------------------------------------------


def _reload_setup(
    pki: PKI, tmp_path: Path, start_proxy: Callable[..., Proxy], backend: Backend
) -> tuple[Proxy, str, str]:
    key, cert = str(tmp_path / "live.key"), str(tmp_path / "live.crt")
    Path(key).write_bytes(Path(pki.server.key).read_bytes())
    Path(cert).write_bytes(Path(pki.server.cert).read_bytes())
    proxy = start_proxy(
        "--ssl-key", key, "--ssl-cert", cert, "--default-target", backend.url,
        "--keep-alive-timeout", "60000",
    )  # fmt: skip
    return proxy, key, cert


def _install(pair: Pair, key: str, cert: str) -> None:
    replace_file(key, Path(pair.key).read_bytes())
    replace_file(cert, Path(pair.cert).read_bytes())


def _get(conn: http.client.HTTPSConnection, path: str = "/") -> int:
    conn.request("GET", path)
    resp = conn.getresponse()
    resp.read()
    return resp.status


def test_sighup_reloads_the_certificate(
    pki: PKI, tmp_path: Path, start_proxy: Callable[..., Proxy], backend: Backend
) -> None:
    proxy, key, cert = _reload_setup(pki, tmp_path, start_proxy, backend)
    ctx = pki.client_context()
    kept = http.client.HTTPSConnection("127.0.0.1", proxy.port, context=ctx, timeout=10)
    assert _get(kept) == 200
    kept_sock = kept.sock
    assert kept_sock.getpeercert()["serialNumber"] == pki.server.serial

    _install(pki.server2, key, cert)
    proxy.proc.send_signal(signal.SIGHUP)
    proxy.wait_for_line(r"info: Reloaded TLS certificate for the proxy listener")
    assert peer_serial(proxy.port, ctx) == pki.server2.serial
    assert https(proxy.port, "/", ctx)[0] == 200
    # the established connection carries on, with the certificate it started with
    assert _get(kept, "/again") == 200
    assert kept.sock is kept_sock
    assert kept_sock.getpeercert()["serialNumber"] == pki.server.serial
    kept.close()

    # a broken new certificate is logged and the current one kept
    replace_file(cert, b"not a certificate\n")
    proxy.proc.send_signal(signal.SIGHUP)
    proxy.wait_for_line(r"error: TLS reload for the proxy listener failed, keeping the current")
    assert peer_serial(proxy.port, ctx) == pki.server2.serial
    assert proxy.proc.poll() is None


def test_changed_files_are_reloaded(
    pki: PKI, tmp_path: Path, start_proxy: Callable[..., Proxy], backend: Backend
) -> None:
    """No signal: the watcher notices the new files within a few seconds."""
    proxy, key, cert = _reload_setup(pki, tmp_path, start_proxy, backend)
    ctx = pki.client_context()
    kept = http.client.HTTPSConnection("127.0.0.1", proxy.port, context=ctx, timeout=10)
    assert _get(kept) == 200
    _install(pki.server2, key, cert)
    deadline = time.monotonic() + 15
    while peer_serial(proxy.port, ctx) != pki.server2.serial:
        assert time.monotonic() < deadline, "the new certificate was not picked up"
        time.sleep(0.2)
    assert _get(kept, "/still-there") == 200
    assert kept.sock.getpeercert()["serialNumber"] == pki.server.serial
    kept.close()
    assert re.search(r"info: Reloaded TLS certificate for the proxy listener", proxy.output())


def test_sighup_reloads_api_and_client_sides(
    pki: PKI,
    tmp_path: Path,
    start_proxy: Callable[..., Proxy],
    start_tls_backend: Callable[..., TLSBackend],
) -> None:
    """The API's certificate and the client certificate are reloaded as well."""
    backend = start_tls_backend(tls_server_context(pki.backend, client_ca=pki.ca_file))
    api_key, api_cert = str(tmp_path / "api.key"), str(tmp_path / "api.crt")
    _install(pki.server, api_key, api_cert)
    client_key, client_cert = str(tmp_path / "client.key"), str(tmp_path / "client.crt")
    _install(pki.api_client, client_key, client_cert)  # from a CA the backend does not trust
    proxy = start_proxy(
        "--api-ssl-key", api_key, "--api-ssl-cert", api_cert,
        "--client-ssl-key", client_key, "--client-ssl-cert", client_cert,
        "--client-ssl-ca", pki.other_ca_file, "--default-target", backend.url,
    )  # fmt: skip
    assert proxy.request("GET", "/")[0] == 503
    assert peer_serial(proxy.api_port, pki.client_context()) == pki.server.serial

    _install(pki.server2, api_key, api_cert)
    _install(pki.client, client_key, client_cert)
    proxy.proc.send_signal(signal.SIGHUP)
    proxy.wait_for_line(r"info: Reloaded TLS certificate for https targets")
    proxy.wait_for_line(r"info: Reloaded TLS certificate for the API listener")
    assert peer_serial(proxy.api_port, pki.client_context()) == pki.server2.serial
    assert proxy.request("GET", "/")[0] == 200


def test_sighup_without_tls_terminates_as_chp(start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy()
    proxy.proc.send_signal(signal.SIGHUP)
    assert proxy.proc.wait(10) == -signal.SIGHUP


# --- units ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "versions"),
    [
        (None, (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.MAXIMUM_SUPPORTED)),
        ("TLS", (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.MAXIMUM_SUPPORTED)),
        ("SSLv23", (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.MAXIMUM_SUPPORTED)),
        ("TLSv1_2", (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2)),
        ("TLSv1_2_method", (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2)),
        ("TLSv1_3", (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_3)),
    ],
)
def test_protocol_names(name: str | None, versions: tuple[ssl.TLSVersion, ssl.TLSVersion]) -> None:
    assert protocol_range(name) == versions


@pytest.mark.parametrize("name", ["TLSv1", "TLSv1_1", "SSLv3", "SSLv2", "tlsv1_2", ""])
def test_protocol_names_refused(name: str) -> None:
    with pytest.raises(TLSError):
        protocol_range(name)


def test_server_context_defaults(pki: PKI) -> None:
    config = Config(ssl_key=pki.server.key, ssl_cert=pki.server.cert)
    side = public_side(config)
    assert side is not None
    ctx = server_context(config, side)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert ctx.verify_mode == ssl.CERT_NONE
    names = {c["name"] for c in ctx.get_ciphers()}
    assert "ECDHE-ECDSA-AES128-GCM-SHA256" in names
    assert not any("RC4" in n or "CAMELLIA" in n for n in names)
    assert CHP_CIPHERS.startswith("ECDHE-RSA-AES128-GCM-SHA256:") and CHP_CIPHERS.endswith(
        ":!CAMELLIA"
    )
    requiring = Config(ssl_key=pki.server.key, ssl_cert=pki.server.cert, ssl_request_cert=True)
    side = public_side(requiring)
    assert side is not None
    assert server_context(requiring, side).verify_mode == ssl.CERT_REQUIRED


def test_client_context(pki: PKI) -> None:
    ctx = client_context(Config())
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    insecure = client_context(Config(insecure=True, client_ssl_ca=pki.ca_file))
    assert insecure.verify_mode == ssl.CERT_NONE and not insecure.check_hostname
    assert insecure.cert_store_stats()["x509_ca"] == 1


def test_ineffective_options_are_named() -> None:
    config = Config(
        ssl_allow_rc4=True,
        ssl_reject_unauthorized=True,
        client_ssl_request_cert=True,
        client_ssl_reject_unauthorized=True,
        api_ssl_reject_unauthorized=True,
        api_ssl_request_cert=True,
    )
    assert ineffective_options(config) == [
        "--ssl-allow-rc4",
        "--ssl-reject-unauthorized without --ssl-request-cert",
        "--client-ssl-request-cert",
        "--client-ssl-reject-unauthorized",
    ]


async def test_watcher_settles_and_does_not_retry_a_broken_file(tmp_path: Path) -> None:
    """A change is loaded once the files look the same twice; a failure waits for a change."""
    watched = tmp_path / "cert.pem"
    watched.write_text("v1")
    builds: list[str] = []

    def build() -> ssl.SSLContext:
        content = watched.read_text()
        builds.append(content)
        if content.startswith("broken"):
            raise TLSError(f"cannot use {content}")
        return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)

    side = ReloadableTLS("a test side", build, [str(watched)])
    applied: list[ssl.SSLContext] = []
    side.on_reload = applied.append
    watcher = CertificateWatcher([side], interval=0.01)
    watcher.start()

    async def until(condition: Callable[[], bool]) -> None:
        for _ in range(500):
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("timed out")

    try:
        replace_file(str(watched), b"v2")
        await until(lambda: builds[-1] == "v2")
        assert applied and side.current is applied[-1]
        replace_file(str(watched), b"broken")
        await until(lambda: builds[-1] == "broken")
        await asyncio.sleep(0.2)  # many polls: the same broken file is not tried again
        assert builds.count("broken") == 1 and side.current is applied[-1]
        replace_file(str(watched), b"v3")
        await until(lambda: builds[-1] == "v3")
        assert len(applied) == 2
        watcher.reload_all()  # SIGHUP: rebuilt even though nothing changed
        await until(lambda: len(builds) == 5)
        assert builds == ["v1", "v2", "broken", "v3", "v3"]
    finally:
        await watcher.stop()


def test_client_eof_on_a_tunnel_to_an_https_target_ends_both_legs(
    pki: PKI,
    start_proxy: Callable[..., Proxy],
    start_tls_backend: Callable[..., TLSBackend],
) -> None:
    """A plain client half-closes a WebSocket tunnel whose target speaks TLS (which has no
    half-close): the proxy closes the target's leg and then the client's too, rather than
    leaving the client's connection open for good."""
    backend = start_tls_backend(tls_server_context(pki.backend), ws_app())
    proxy = start_proxy("--insecure", "--default-target", backend.url)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        open_websocket(sock)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(4096):  # until the end, not the 10 s timeout (socket.timeout)
            pass

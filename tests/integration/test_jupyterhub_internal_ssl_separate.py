"""hubproxy run on its own with JupyterHub's `internal_ssl` (docs/jupyterhub.md, section 4).

The steps docs/jupyterhub.md gives an operator: make the certificates with `jupyterhub
--generate-certs` (the hub's config: `internal_ssl = True`, `internal_certs_location`), copy the
proxy's six files from `internal_certs_location` into a directory of hubproxy's own, start
hubproxy with the `--api-ssl-*` and `--client-ssl-*` options JupyterHub would pass itself and
https `--default-target`/`--error-target`, then start the hub with `should_start = False` and an
https `ConfigurableHTTPProxy.api_url`. The tests run in file order:

1. the proxy's API: it presents proxy-api.crt, refuses a client without a certificate at the
   handshake, and answers the hub (its hub-internal certificate);
2. alice's server (https, its certificate signed by notebooks-ca) through the proxy: browser
   login with the OAuth redirects, a token, `1+1` on a kernel over its WebSocket;
3. renewal: with alice's server and the hub stopped, every certificate made anew
   (`--generate-certs` with `recreate_internal_certs`), copied again, SIGHUP: the proxy presents
   the new certificate and refuses the old hub certificate; the restarted hub reaches the proxy and
   a new server for alice works through it;
4. a dead server: the proxy answers with the hub's "server appears to be down" page (its https
   error target, reached with the proxy's client certificate).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# without the `integration` extra, this module is skipped (as a whole, before its imports)
pytest.importorskip("jupyterhub", reason="needs jupyterhub: pip install -e '.[test,integration]'")
pytest.importorskip("requests", reason="needs requests: pip install -e '.[test,integration]'")

import requests
from jhub import (
    MEASUREMENTS,
    PROXY_TOKEN,
    ExternalProxy,
    Hub,
    alice_on_separate_proxy,
    free_port,
    login,
    pid_alive,
    print_logs_if_failed,
    run_one_plus_one,
    singleuser_pids,
    wait_until,
)

pytestmark = pytest.mark.timeout(300)

# what hubproxy needs from internal_certs_location (copied flat into a directory of its own)
PROXY_CERT_FILES = (
    "proxy-api/proxy-api.key",
    "proxy-api/proxy-api.crt",
    "proxy-api-ca_trust.crt",
    "proxy-client/proxy-client.key",
    "proxy-client/proxy-client.crt",
    "proxy-client-ca_trust.crt",
)


def proxy_tls_args(tls_dir: Path) -> list[str]:
    """The options docs/jupyterhub.md gives (JupyterHub passes the same when it starts one)."""
    d = str(tls_dir)
    return [
        "--api-ssl-key", f"{d}/proxy-api.key",
        "--api-ssl-cert", f"{d}/proxy-api.crt",
        "--api-ssl-ca", f"{d}/proxy-api-ca_trust.crt",
        "--api-ssl-request-cert", "--api-ssl-reject-unauthorized",
        "--client-ssl-key", f"{d}/proxy-client.key",
        "--client-ssl-cert", f"{d}/proxy-client.crt",
        "--client-ssl-ca", f"{d}/proxy-client-ca_trust.crt",
        "--client-ssl-request-cert", "--client-ssl-reject-unauthorized",
    ]  # fmt: skip


def generate_certs(hub: Hub, recreate: bool = False) -> None:
    """`jupyterhub -f <config> --generate-certs` in the hub's directory, as an operator runs it."""
    cmd = [sys.executable, "-m", "jupyterhub", "-f", str(hub.write_config()), "--generate-certs"]
    if recreate:
        cmd.append("--JupyterHub.recreate_internal_certs=True")
    with open(hub.log_path, "ab") as log:
        log.write(f"=== {' '.join(cmd[2:])} ===\n".encode())
        log.flush()
        done = subprocess.run(
            cmd,
            cwd=hub.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=60,
            check=False,
        )
    assert done.returncode == 0, hub.log()


def copy_proxy_certs(certs_dir: Path, tls_dir: Path) -> None:
    """Copy the proxy's files (`install -m 0640` in the docs); rewrites existing copies in place."""
    tls_dir.mkdir(mode=0o750, exist_ok=True)
    for relative in PROXY_CERT_FILES:
        target = tls_dir / Path(relative).name
        shutil.copyfile(certs_dir / relative, target)
        os.chmod(target, 0o640)


def pem_to_der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


@dataclass
class Stack:
    proxy: ExternalProxy
    hub: Hub
    tls_dir: Path  # hubproxy's copies of its certificates
    token: str  # alice's API token
    server_path: str

    @property
    def certs_dir(self) -> Path:
        return self.hub.certs_dir

    def hub_pair(self) -> tuple[str, str]:
        base = self.certs_dir / "hub-internal" / "hub-internal"
        return f"{base}.crt", f"{base}.key"

    def api_certificate(self) -> bytes:
        """The certificate the proxy's API presents, in a handshake made as the hub makes it."""
        ctx = ssl.create_default_context(cafile=str(self.certs_dir / "hub-ca_trust.crt"))
        ctx.load_cert_chain(*self.hub_pair())
        with (
            socket.create_connection(("127.0.0.1", self.proxy.api_port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der

    def alice(self, path: str = "api/status") -> requests.Response:
        return requests.get(
            self.proxy.public_url + self.server_path + path,
            headers={"Authorization": f"token {self.token}"},
            allow_redirects=False,
            timeout=30,
        )


def prepare_certs(hub: Hub, tls_dir: Path) -> None:
    """As the doc says: generate the hub's certificates, then copy the proxy's."""
    generate_certs(hub)
    copy_proxy_certs(hub.certs_dir, tls_dir)


@pytest.fixture(scope="module")
def stack(jh_workdir: Path) -> Iterator[Stack]:
    hub = Hub(
        jh_workdir,
        free_port(),
        free_port(),
        free_port(),
        should_start_proxy=False,
        internal_ssl=True,
    )
    tls_dir = jh_workdir / "hubproxy-tls"
    proxy = ExternalProxy(
        jh_workdir,
        hub.public_port,
        hub.proxy_api_port,
        hub.hub_url,  # https://127.0.0.1:<port>: the hub listens with TLS under internal_ssl
        extra_args=proxy_tls_args(tls_dir),
        api_tls={
            "cert": (
                str(hub.certs_dir / "hub-internal" / "hub-internal.crt"),
                str(hub.certs_dir / "hub-internal" / "hub-internal.key"),
            ),
            "verify": str(hub.certs_dir / "hub-ca_trust.crt"),
        },
    )
    assert proxy.api_url == hub.proxy_api_url  # https://127.0.0.1:<port>
    with alice_on_separate_proxy(
        proxy, hub, jh_workdir, before=lambda: prepare_certs(hub, tls_dir)
    ) as (token, server_path):
        yield Stack(proxy, hub, tls_dir, token, server_path)


@pytest.fixture(autouse=True)
def logs_on_failure(request: pytest.FixtureRequest, stack: Stack) -> Iterator[None]:
    yield
    print_logs_if_failed(request, stack.hub, stack.proxy)


def test_proxy_api_over_tls(stack: Stack) -> None:
    # the API presents the proxy-api certificate from internal_certs_location ...
    assert stack.api_certificate() == pem_to_der(stack.certs_dir / "proxy-api/proxy-api.crt")
    # ... and requires a client certificate: none is a TLS error, not an HTTP status
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(
            stack.proxy.api_url + "/api/routes",
            headers={"Authorization": f"token {PROXY_TOKEN}"},
            verify=str(stack.certs_dir / "hub-ca_trust.crt"),
            timeout=10,
        )
    # the hub's certificate is accepted, and the hub wrote its routes through this API
    routes = stack.hub.proxy_routes()
    assert routes["/"]["hub"] is True and routes["/"]["target"] == stack.hub.hub_url, routes
    assert stack.hub.hub_url.startswith("https://127.0.0.1:"), stack.hub.hub_url
    alice = routes["/user/alice"]
    assert alice["user"] == "alice" and alice["jupyterhub"] is True, alice
    assert alice["target"].startswith("https://127.0.0.1:"), alice


def test_user_server_through_proxy(stack: Stack) -> None:
    browser = login(stack.proxy.public_url, "alice")
    resp = browser.get(stack.proxy.public_url + "/user/alice/files/hello.txt", timeout=30)
    assert resp.status_code == 200, (resp.status_code, resp.url, resp.text[:300])
    assert resp.text == "hello alice\n"
    assert any(r.status_code == 302 for r in resp.history), "expected the OAuth redirects"

    resp = stack.alice()
    assert resp.status_code == 200, (resp.status_code, resp.text[:300])
    assert run_one_plus_one(stack.proxy.public_url, stack.server_path, stack.token) == "2"


def test_certificate_renewal_with_sighup(stack: Stack) -> None:
    """Every certificate made anew while the proxy keeps running; SIGHUP loads the new ones."""
    hub, proxy = stack.hub, stack.proxy
    old_hub_pair = stack.tls_dir.parent / "old-hub-internal"
    old_hub_pair.mkdir()
    for name in stack.hub_pair():
        shutil.copy(name, old_hub_pair)
    old_api_cert = stack.api_certificate()

    # servers started with the old CAs would not be trusted any more: stop them first
    hub.stop_server("alice")
    assert hub.stop(signal.SIGTERM) == 0, hub.log()
    generate_certs(hub, recreate=True)
    new_api_cert = pem_to_der(stack.certs_dir / "proxy-api/proxy-api.crt")
    assert new_api_cert != old_api_cert
    copy_proxy_certs(stack.certs_dir, stack.tls_dir)

    assert proxy.proc is not None
    hup_at = time.monotonic()
    proxy.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: stack.api_certificate() == new_api_cert, 20, "the new API certificate")
    MEASUREMENTS["internal_ssl renewal: new API certificate served after SIGHUP"] = (
        f"{time.monotonic() - hup_at:.2f}s"
    )
    assert proxy.proc.poll() is None, proxy.log()  # SIGHUP reloads, it does not end the proxy
    log = proxy.log_path.read_text()
    assert "Reloading TLS certificates (SIGHUP)" in log, proxy.log()
    wait_until(
        lambda: "Reloaded TLS certificate for https targets" in proxy.log_path.read_text(),
        10,
        "the client side to reload",
    )
    # the old hub certificate (old hub-ca) is refused now, the new one accepted
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(
            proxy.api_url + "/api/routes",
            headers={"Authorization": f"token {PROXY_TOKEN}"},
            cert=(
                str(old_hub_pair / "hub-internal.crt"),
                str(old_hub_pair / "hub-internal.key"),
            ),
            verify=str(stack.certs_dir / "hub-ca_trust.crt"),
            timeout=10,
        )
    assert "/" in proxy.routes()

    # the hub comes back on the new certificates; /hub/health goes through the proxy to it
    hub.start()
    assert hub.proxy_routes()["/"]["target"] == hub.hub_url
    assert hub.start_server("alice") == stack.server_path
    resp = stack.alice()
    assert resp.status_code == 200, (resp.status_code, resp.text[:300])
    assert run_one_plus_one(proxy.public_url, stack.server_path, stack.token) == "2"


def test_dead_server_gets_hub_error_page(stack: Stack) -> None:
    assert stack.alice().status_code == 200
    pids = singleuser_pids(stack.hub.home("alice"))
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    wait_until(lambda: not pid_alive(pids[0]), 10, "alice's server to die", 0.05)
    resp = stack.alice()
    assert resp.status_code == 503, (resp.status_code, resp.text[:300])
    assert resp.headers["Content-Type"].startswith("text/html"), resp.headers
    assert "Your server appears to be down" in resp.text, resp.text[:1000]
    stack.hub.stop_server("alice")
    wait_until(lambda: "/user/alice" not in stack.proxy.routes(), 30, "alice's route to go")

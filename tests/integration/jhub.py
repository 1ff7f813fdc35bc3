"""Helpers for the JupyterHub integration tests: a real hub, real single-user servers, hubproxy.

Everything runs as subprocesses on loopback with ports from the OS, in a temporary directory of
its own (config file, sqlite database, cookie secret, users' homes, logs). Every process started
here is stopped by its PID at the end; single-user servers and kernels are found by their working
directory (inside our temporary directory), never by name. Waits are bounded polls.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import requests

from systemd_like import ServiceManager

T = TypeVar("T")

PROXY_TOKEN = "integration-proxy-" + uuid.uuid4().hex
ADMIN_TOKEN = "integration-admin-" + uuid.uuid4().hex
BIN_DIR = Path(sys.executable).parent  # where pip put hubproxy's console scripts
HUB_START_TIMEOUT = 60.0
# name -> value: outage and delay measurements, printed in pytest's terminal summary
MEASUREMENTS: dict[str, str] = {}
SPAWN_TIMEOUT = 90.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(
    check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.1
) -> T:
    """Call `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = check()
        except (requests.RequestException, OSError, ValueError, KeyError) as exc:
            value, last_error = None, exc
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} ({last_error!r})")
        time.sleep(interval)


def parse_time(value: str) -> dt.datetime:
    """An ISO-8601 timestamp (JupyterHub's and the proxy's) as an aware UTC datetime."""
    parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed


def path_without_node_chp() -> str:
    """PATH with hubproxy's scripts first and no other `configurable-http-proxy` before them."""
    ours = (BIN_DIR / "configurable-http-proxy").resolve()
    kept = [str(BIN_DIR)]
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        if not entry or entry == str(BIN_DIR):
            continue
        candidate = Path(entry) / "configurable-http-proxy"
        if candidate.exists() and candidate.resolve() != ours:
            continue  # Node's CHP, or a shim that might lead to it
        kept.append(entry)
    return os.pathsep.join(kept)


def _tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} unreadable)"
    return f"--- last lines of {path.name} ---\n" + "\n".join(text.splitlines()[-lines:])


def _stop_pid(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def pid_alive(pid: int) -> bool:
    """True if `pid` is a live process (zombies count as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def process_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


@dataclass
class ExternalProxy:
    """hubproxy run as its own service (JupyterHub's `should_start = False` mode)."""

    workdir: Path
    port: int
    api_port: int
    hub_url: str  # e.g. http://127.0.0.1:8081
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    extra_args: list[str] = field(default_factory=list)  # appended to the command line
    # an https API (--api-ssl-*): what `routes()` passes to requests, {"cert": ..., "verify": ...}
    api_tls: dict[str, Any] | None = None
    activation: Activation | None = None  # started as systemd would, with its sockets and store

    @property
    def public_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        scheme = "https" if self.api_tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.api_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "hubproxy.log"

    def start(self, timeout: float = 30.0) -> None:
        env = dict(os.environ, CONFIGPROXY_AUTH_TOKEN=PROXY_TOKEN)
        self.starts += 1
        command, fds = [sys.executable, "-m", "hubproxy"], ()
        if self.activation is not None:
            command, fds = self.activation.command(env)
        with open(self.log_path, "ab") as log:
            log.write(f"=== start #{self.starts} ===\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [
                    *command,
                    "--ip", "127.0.0.1", "--port", str(self.port),
                    "--api-ip", "127.0.0.1", "--api-port", str(self.api_port),
                    "--default-target", self.hub_url,
                    "--error-target", self.hub_url + "/hub/error",
                    "--log-level", "info",
                    *self.extra_args,
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                pass_fds=fds,
            )  # fmt: skip
        if self.activation is not None:
            self.activation.manager.main_pid = self.proc.pid  # the same after the exec

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"hubproxy exited {self.proc.returncode}\n{self.log()}")
            return self.routes() is not None and _connects(self.port)

        wait_until(ready, timeout, "hubproxy to listen", interval=0.05)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None:
            return None
        return _stop_pid(self.proc, sig)

    def routes(self) -> dict[str, Any]:
        resp = requests.get(
            self.api_url + "/api/routes",
            headers={"Authorization": f"token {PROXY_TOKEN}"},
            timeout=5,
            **(self.api_tls or {}),
        )
        resp.raise_for_status()
        return resp.json()

    def log(self) -> str:
        return _tail(self.log_path)


@dataclass
class Activation:
    """systemd's part for an ExternalProxy: the listening sockets (socket units) and the
    service's notify socket and file descriptor store live here, across its processes."""

    public: socket.socket
    api: socket.socket
    manager: ServiceManager

    @classmethod
    def on(cls, port: int, api_port: int, workdir: Path) -> Activation:
        public = socket.create_server(("127.0.0.1", port), backlog=511)
        api = socket.create_server(("127.0.0.1", api_port), backlog=511)
        notify = workdir / f"notify-{uuid.uuid4().hex[:8]}.sock"
        return cls(public, api, ServiceManager(str(notify)))

    def command(self, env: dict[str, str]) -> tuple[list[str], tuple[int, ...]]:
        """The command that starts hubproxy with the sockets and what the store holds (`env`
        gets the notify socket), and the descriptors to pass."""
        fds = [self.public.fileno(), self.api.fileno()]
        names = ["public", "api"]
        for name, fd in self.manager.passed():
            fds.append(fd)
            names.append(name)
        env.update(self.manager.environment())
        script = str(Path(__file__).parent.parent / "systemd_like.py")
        return [sys.executable, script, ":".join(names), *map(str, fds), "--"], tuple(fds)

    def close(self) -> None:
        self.public.close()
        self.api.close()
        self.manager.close()


def _connects(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@dataclass
class Hub:
    """A JupyterHub process (`python -m jupyterhub -f <config>`) in a directory of its own."""

    workdir: Path
    public_port: int
    hub_port: int
    proxy_api_port: int
    should_start_proxy: bool = True
    proxy_command: list[str] | None = None  # None: JupyterHub's default, from PATH
    env: dict[str, str] = field(default_factory=dict)
    last_activity_interval: int = 2
    internal_ssl: bool = False
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def public_url(self) -> str:
        return f"http://127.0.0.1:{self.public_port}"

    @property
    def hub_url(self) -> str:
        """The hub's own listener (what the proxy's default target and error target point at)."""
        scheme = "https" if self.internal_ssl else "http"
        return f"{scheme}://127.0.0.1:{self.hub_port}"

    @property
    def proxy_api_url(self) -> str:
        scheme = "https" if self.internal_ssl else "http"
        return f"{scheme}://127.0.0.1:{self.proxy_api_port}"

    @property
    def certs_dir(self) -> Path:
        """JupyterHub's `internal_certs_location` (with `internal_ssl`)."""
        return self.workdir / "internal-ssl"

    def proxy_routes(self) -> dict[str, Any]:
        """`GET /api/routes` on the proxy's API, as the hub calls it (its certificate if TLS)."""
        kwargs: dict[str, Any] = {}
        if self.internal_ssl:
            hub_pair = self.certs_dir / "hub-internal" / "hub-internal"
            kwargs["cert"] = (f"{hub_pair}.crt", f"{hub_pair}.key")
            kwargs["verify"] = str(self.certs_dir / "hub-ca_trust.crt")
        resp = requests.get(
            self.proxy_api_url + "/api/routes",
            headers={"Authorization": f"token {PROXY_TOKEN}"},
            timeout=10,
            **kwargs,
        )
        assert resp.status_code == 200, (resp.status_code, resp.text)
        assert resp.headers["Content-Type"].startswith("application/json"), resp.headers
        return resp.json()

    @property
    def log_path(self) -> Path:
        return self.workdir / "jupyterhub.log"

    @property
    def proxy_pid_file(self) -> Path:
        return self.workdir / "jupyterhub-proxy.pid"

    def home(self, user: str) -> Path:
        return self.workdir / "home" / user

    def write_config(self) -> Path:
        settings = {
            "public": self.public_url,
            "hub": self.hub_url,
            "db": f"sqlite:///{self.workdir / 'jupyterhub.sqlite'}",
            "cookie_secret": str(self.workdir / "jupyterhub_cookie_secret"),
            "home": str(self.workdir / "home" / "{username}"),
            "python": sys.executable,
            "proxy_api": self.proxy_api_url,
            "internal_ssl": self.internal_ssl,
            "certs": str(self.certs_dir),
            "proxy_token": PROXY_TOKEN,
            "admin_token": ADMIN_TOKEN,
            "should_start": self.should_start_proxy,
            "command": self.proxy_command,
            "interval": self.last_activity_interval,
        }
        config = textwrap.dedent(
            """\
            # written by hubproxy's integration tests
            import json
            s = json.loads({settings!r})
            c = get_config()  # noqa: F821
            c.JupyterHub.bind_url = s["public"]
            c.JupyterHub.hub_bind_url = s["hub"]
            c.JupyterHub.db_url = s["db"]
            c.JupyterHub.cookie_secret_file = s["cookie_secret"]
            c.JupyterHub.log_level = "DEBUG"
            c.JupyterHub.last_activity_interval = s["interval"]
            c.JupyterHub.authenticator_class = "dummy"
            c.Authenticator.allow_all = True
            c.JupyterHub.spawner_class = "simple"
            c.SimpleLocalProcessSpawner.home_dir_template = s["home"]
            c.Spawner.cmd = [s["python"], "-m", "jupyterhub.singleuser"]
            c.Spawner.args = ["--allow-root"]  # the tests run as root
            # jupyter_server alone (JupyterLab, if installed, would start too and be slower)
            c.Spawner.environment = {{
                "JUPYTERHUB_SINGLEUSER_APP": "jupyter_server.serverapp.ServerApp"
            }}
            c.Spawner.start_timeout = 90
            c.Spawner.http_timeout = 90
            c.JupyterHub.services = [{{"name": "integration-admin", "api_token": s["admin_token"]}}]
            c.JupyterHub.load_roles = [{{"name": "admin", "services": ["integration-admin"]}}]
            c.ConfigurableHTTPProxy.api_url = s["proxy_api"]
            c.ConfigurableHTTPProxy.auth_token = s["proxy_token"]
            c.ConfigurableHTTPProxy.should_start = s["should_start"]
            if s["command"] is not None:
                c.ConfigurableHTTPProxy.command = s["command"]
            if not s["should_start"]:
                c.JupyterHub.cleanup_servers = False
            if s["internal_ssl"]:
                c.JupyterHub.internal_ssl = True
                c.JupyterHub.internal_certs_location = s["certs"]
            """
        ).format(settings=json.dumps(settings))
        path = self.workdir / "jupyterhub_config.py"
        path.write_text(config)
        return path

    def start(self, wait: bool = True) -> None:
        config = self.write_config()
        self.starts += 1
        env = dict(os.environ)
        env.pop("CONFIGPROXY_AUTH_TOKEN", None)
        env.update(self.env)
        with open(self.log_path, "ab") as log:
            log.write(f"=== start #{self.starts} ===\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "jupyterhub", "-f", str(config)],
                cwd=self.workdir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = HUB_START_TIMEOUT) -> None:
        """Poll `/hub/health` through the proxy until the hub answers 200."""

        def healthy() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"jupyterhub exited {self.proc.returncode}\n{self.log()}")
            return requests.get(self.public_url + "/hub/health", timeout=5).status_code == 200

        wait_until(healthy, timeout, "the hub's /hub/health through the proxy", interval=0.2)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        return _stop_pid(self.proc, sig, timeout)

    def log(self) -> str:
        return _tail(self.log_path, 80)

    # --- the hub's REST API, through the proxy, as the admin service ---------------------------
    def api(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"token {ADMIN_TOKEN}", **kwargs.pop("headers", {})}
        return requests.request(
            method, self.public_url + "/hub/api" + path, headers=headers, timeout=30, **kwargs
        )

    def user_model(self, name: str) -> dict[str, Any]:
        resp = self.api("GET", f"/users/{name}")
        resp.raise_for_status()
        return resp.json()

    def start_server(self, name: str) -> str:
        """Start `name`'s default server and wait until the hub calls it ready; its URL path."""
        self.home(name).mkdir(parents=True, exist_ok=True)
        (self.home(name) / "hello.txt").write_text(f"hello {name}\n")
        resp = self.api("POST", f"/users/{name}")
        assert resp.status_code in (201, 409), (resp.status_code, resp.text)  # 409: exists
        resp = self.api("POST", f"/users/{name}/server")
        assert resp.status_code in (201, 202), (resp.status_code, resp.text, self.log())

        def ready() -> dict[str, Any] | None:
            server = self.user_model(name).get("servers", {}).get("")
            return server if server and server.get("ready") else None

        try:
            server = wait_until(ready, SPAWN_TIMEOUT, f"{name}'s server to be ready", 0.25)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log()}") from None
        return server["url"]

    def stop_server(self, name: str) -> None:
        resp = self.api("DELETE", f"/users/{name}/server")
        assert resp.status_code in (202, 204), (resp.status_code, resp.text)

        def stopped() -> bool:
            return "" not in self.user_model(name).get("servers", {})

        wait_until(stopped, 60, f"{name}'s server to stop", 0.25)

    def user_token(self, name: str) -> str:
        resp = self.api(
            "POST", f"/users/{name}/tokens", json={"note": "integration test", "expires_in": 3600}
        )
        assert resp.status_code == 201, (resp.status_code, resp.text)
        return resp.json()["token"]

    def proxy_pid(self) -> int:
        return int(self.proxy_pid_file.read_text().strip())


def login(public_url: str, name: str) -> requests.Session:
    """Log in through the proxy with the login form, as a browser does."""
    session = requests.Session()
    resp = session.get(public_url + "/hub/login", timeout=30)
    assert resp.status_code == 200, (resp.status_code, resp.text[:500])
    xsrf = session.cookies.get("_xsrf")
    assert xsrf, "the login page set no _xsrf cookie"
    resp = session.post(
        public_url + "/hub/login",
        data={"username": name, "password": "any", "_xsrf": xsrf},
        allow_redirects=False,
        timeout=30,
    )
    assert resp.status_code == 302, (resp.status_code, resp.text[:500])
    assert any(c.name.startswith("jupyterhub-") for c in session.cookies), session.cookies
    return session


def run_one_plus_one(public_url: str, server_path: str, token: str, timeout: float = 60) -> str:
    """Start a kernel through the proxy, run `1+1` over its WebSocket, return the result."""
    from websockets.sync.client import connect

    headers = {"Authorization": f"token {token}"}
    api = public_url + server_path.rstrip("/") + "/api/kernels"
    resp = requests.post(api, json={"name": "python3"}, headers=headers, timeout=30)
    assert resp.status_code == 201, (resp.status_code, resp.text[:500])
    kernel_id = resp.json()["id"]
    try:
        ws_url = (
            public_url.replace("http://", "ws://", 1)
            + server_path.rstrip("/")
            + f"/api/kernels/{kernel_id}/channels"
        )
        session = uuid.uuid4().hex
        msg_id = uuid.uuid4().hex
        request = {
            "header": {
                "msg_id": msg_id,
                "session": session,
                "username": "integration",
                "msg_type": "execute_request",
                "version": "5.3",
                "date": dt.datetime.now(dt.UTC).isoformat(),
            },
            "parent_header": {},
            "metadata": {},
            "content": {
                "code": "1+1",
                "silent": False,
                "store_history": True,
                "user_expressions": {},
                "allow_stdin": False,
                "stop_on_error": True,
            },
            "channel": "shell",
            "buffers": [],
        }
        deadline = time.monotonic() + timeout
        with connect(ws_url, additional_headers=headers, open_timeout=30, max_size=None) as ws:
            ws.send(json.dumps(request))
            while True:
                remaining = deadline - time.monotonic()
                assert remaining > 0, "no execute_result within the time limit"
                msg = json.loads(ws.recv(timeout=remaining))
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                if msg["msg_type"] == "execute_result":
                    return msg["content"]["data"]["text/plain"]
                if msg["msg_type"] == "error":
                    raise AssertionError(f"kernel error: {msg['content']}")
    finally:
        requests.delete(f"{api}/{kernel_id}", headers=headers, timeout=30)


class Prober:
    """Polls a URL through the proxy at a bounded rate in a thread; records every outcome."""

    def __init__(self, url: str, headers: dict[str, str], interval: float = 0.05) -> None:
        self.url = url
        self.headers = headers
        self.interval = interval
        self.samples: list[tuple[float, bool, str]] = []  # (monotonic time, ok, detail)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                resp = session.get(self.url, headers=self.headers, timeout=2, allow_redirects=False)
                ok, detail = resp.status_code == 200, str(resp.status_code)
            except requests.RequestException as exc:
                ok, detail = False, type(exc).__name__
            self.samples.append((started, ok, detail))
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    @property
    def failures(self) -> list[tuple[float, bool, str]]:
        return [s for s in self.samples if not s[1]]

    def unreachable_seconds(self) -> float:
        """Longest span from the first failed probe to the next successful one (0: none)."""
        longest = 0.0
        first_fail: float | None = None
        for t, ok, _ in self.samples:
            if not ok and first_fail is None:
                first_fail = t
            elif ok and first_fail is not None:
                longest = max(longest, t - first_fail)
                first_fail = None
        if first_fail is not None:  # still failing at the end
            longest = max(longest, self.samples[-1][0] - first_fail)
        return longest

    def summary(self) -> str:
        details: dict[str, int] = {}
        for _, ok, detail in self.samples:
            if not ok:
                details[detail] = details.get(detail, 0) + 1
        return (
            f"{len(self.samples)} probes, {len(self.failures)} failed {details or ''}, "
            f"longest outage {self.unreachable_seconds():.3f}s"
        )


def singleuser_pids(home: Path) -> list[int]:
    """PIDs of single-user servers running in `home` (their working directory)."""
    found = []
    home_str = str(home.resolve())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if cwd == home_str and "jupyterhub.singleuser" in process_cmdline(int(entry.name)):
            found.append(int(entry.name))
    return found


def kill_leftovers(root: Path) -> list[int]:
    """SIGKILL processes whose working directory is inside `root` (single-user servers, kernels)."""
    killed = []
    root_str = str(root.resolve())
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if cwd == root_str or cwd.startswith(root_str + os.sep):
            with contextlib.suppress(OSError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
    return killed


@contextlib.contextmanager
def alice_on_separate_proxy(
    proxy: ExternalProxy, hub: Hub, workdir: Path, before: Callable[[], None] | None = None
) -> Iterator[tuple[str, str]]:
    """The separately run proxy, then the hub, then alice's server: yields (alice's token, her
    server's path). On the way out alice's server is stopped through the hub (while it runs),
    then the hub, the proxy and anything left under `workdir`; their logs are printed if the
    set-up failed. `before` runs first (certificates to make, say)."""
    try:
        if before is not None:
            before()
        proxy.start()
        hub.start()
        server_path = hub.start_server("alice")
        yield hub.user_token("alice"), server_path
        if hub.proc is not None and hub.proc.poll() is None:
            try:
                hub.stop_server("alice")
            except (AssertionError, requests.RequestException) as exc:
                print(f"could not stop alice's server through the hub: {exc}")
    except BaseException:
        print(hub.log())
        print(proxy.log())
        raise
    finally:
        hub.stop()
        proxy.stop()
        kill_leftovers(workdir)


def print_logs_if_failed(request: Any, hub: Hub, proxy: ExternalProxy) -> None:
    """For an autouse fixture, after its yield: both logs when the test failed."""
    report = getattr(request.node, "jh_report_call", None)
    if report is not None and report.failed:
        print(hub.log())
        print(proxy.log())

"""Restarts and upgrades that no user notices: listening sockets from systemd (socket
activation) and the SIGUSR2 hand-over (hubproxy.handover).

The proof tests keep three kinds of traffic going through the proxy while it restarts or
upgrades: requests on one keep-alive connection, requests each on a new connection, and an open
WebSocket. A request is failed if it gets anything but the backend's answer; the one exception
is what every HTTP client does (RFC 9112 §9.3.1): a GET on a reused keep-alive connection that
the server closed while idle is sent again on a new connection (counted as `retried`).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from hubproxy.fdstore import SnapshotError, decode
from hubproxy.inherit import InheritError, Passed, adopt_named, from_systemd
from redis_server import RedisServer, free_port
from support import TOKEN, Backend, Proxy, ws_echo_app
from systemd_like import ServiceManager

HERE = Path(__file__).parent
SYSTEMD_LIKE = str(HERE / "systemd_like.py")
DRAIN_MS = 2000
MAX_REQUESTS = 20_000  # per client thread: every loop is bounded in count as well as in time
LOAD_SECONDS = 120.0


# --- the environment rules (sd_listen_fds) -------------------------------------------------------


def test_sockets_meant_for_another_process_are_ignored() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
    assert from_systemd(env) == Passed()
    assert env == {}, "the variables are removed, so that no process we start reads them"


def test_no_variables_no_sockets() -> None:
    assert from_systemd({}) == Passed()


@pytest.mark.parametrize(
    ("fds", "names", "message"),
    [
        ("0", None, "LISTEN_FDS='0'"),
        ("x", None, "LISTEN_FDS='x'"),
        ("2", "public", "LISTEN_FDNAMES names 1 sockets, LISTEN_FDS passes 2"),
    ],
)
def test_bad_variables_are_refused(fds: str, names: str | None, message: str) -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": fds}
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    with pytest.raises(InheritError, match=re.escape(message)):
        from_systemd(env)


@pytest.fixture
def sockets() -> Iterator[Callable[..., socket.socket]]:
    made: list[socket.socket] = []

    def make(kind: str = "listening") -> socket.socket:
        if kind == "udp":
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        if kind == "listening":
            sock.listen(8)
        made.append(sock)
        return sock

    yield make
    for sock in made:
        sock.close()


def test_names_choose_the_listeners(sockets: Callable[..., socket.socket]) -> None:
    public, api = sockets(), sockets()
    passed = adopt_named([os.dup(public.fileno()), os.dup(api.fileno())], ["api", "public"])
    adopted = passed.sockets
    assert passed.files == {}
    try:
        assert set(adopted) == {"public", "api"}
        assert adopted["api"].getsockname() == public.getsockname()
        assert adopted["public"].getsockname() == api.getsockname()
        assert not adopted["api"].get_inheritable()
    finally:
        for sock in adopted.values():
            sock.close()


def test_one_unnamed_socket_is_the_public_one(sockets: Callable[..., socket.socket]) -> None:
    adopted = adopt_named([os.dup(sockets().fileno())], ["hubproxy.socket"]).sockets
    assert list(adopted) == ["public"]
    adopted["public"].close()


def test_the_stored_routes_file_is_no_socket(sockets: Callable[..., socket.socket]) -> None:
    """What the file descriptor store gives back comes among the sockets, named `routes`; of
    two (never ours: one is removed before the next is stored), the first is the newer one, as
    systemd passes them."""
    newer, older = os.memfd_create("newer"), os.memfd_create("older")
    passed = adopt_named([os.dup(sockets().fileno()), newer, older], ["public", "routes", "routes"])
    try:
        assert list(passed.sockets) == ["public"]
        assert passed.files == {"routes": newer}
    finally:
        passed.sockets["public"].close()
        os.close(newer)
    alone = os.memfd_create("alone")
    assert adopt_named([alone], ["routes"]) == Passed({}, {"routes": alone}), "not the public one"
    os.close(alone)


@pytest.mark.parametrize(
    ("kinds", "names", "message"),
    [
        (["listening", "listening"], ["public", "web"], "socket named 'web'"),
        (["listening", "listening"], ["public", "public"], "two sockets named 'public'"),
        (["bound"], ["public"], "is not listening"),
        (["udp"], ["public"], "is not a stream socket"),
    ],
)
def test_unusable_sockets_are_refused(
    sockets: Callable[..., socket.socket], kinds: list[str], names: list[str], message: str
) -> None:
    fds = [sockets(kind).fileno() for kind in kinds]
    with pytest.raises(InheritError, match=re.escape(message)):
        adopt_named(fds, names)


# --- socket activation, end to end ---------------------------------------------------------------


class Activator:
    """systemd's part: the listening sockets live here, across the proxy processes, and so
    does the service's file descriptor store (`manager`), as the documented units set it up
    (`FileDescriptorStoreMax=1`, `Type=notify`)."""

    def __init__(self, tmp_path: Path) -> None:
        self.public = socket.create_server(("127.0.0.1", 0), backlog=511)
        self.api_path = str(tmp_path / "api.sock")
        self.api = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.api.bind(self.api_path)
        self.api.listen(511)
        self.port = self.public.getsockname()[1]
        self.manager = ServiceManager(str(tmp_path / "notify.sock"))

    def start(
        self, *args: str, names: str = "public:api", env: dict[str, str], fdstore: bool = True
    ) -> Proxy:
        """Start the service (with the store: what it holds is passed back, as systemd does)."""
        fds = [self.public.fileno(), self.api.fileno()]
        env = dict(env)
        if fdstore:
            for name, fd in self.manager.passed():
                fds.append(fd)
                names += f":{name}"
            env.update(self.manager.environment())
        proxy = Proxy(
            list(args),
            env,
            TOKEN,
            command=[sys.executable, SYSTEMD_LIKE, names, *map(str, fds), "--"],
            pass_fds=tuple(fds),
        )
        self.manager.main_pid = proxy.proc.pid  # the same after systemd_like's exec
        if fdstore:
            self.manager.wait_for("READY")
        return proxy

    def close(self) -> None:
        self.public.close()
        self.api.close()
        self.manager.close()


def proxy_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    env["CONFIGPROXY_AUTH_TOKEN"] = TOKEN
    env.update(extra)
    return env


@pytest.fixture
def activator(tmp_path: Path) -> Iterator[Activator]:
    made = Activator(tmp_path)
    yield made
    made.close()


@pytest.fixture
def running() -> Iterator[list[Proxy]]:
    """Proxies to stop at the end, whatever the test did."""
    proxies: list[Proxy] = []
    yield proxies
    for proxy in proxies:
        proxy.stop()


def test_socket_activation_serves_the_sockets_it_is_given(
    activator: Activator, running: list[Proxy], backend: Backend
) -> None:
    proxy = activator.start("--default-target", backend.url, env=proxy_env())
    running.append(proxy)
    proxy.wait_for_line(
        r"info: Listening on sockets from systemd: public on 127\.0\.0\.1:\d+, api on "
    )
    assert proxy.port == activator.port
    assert proxy.api_unix_path == activator.api_path
    assert proxy.request("GET", "/x")[0] == 200
    assert "/" in proxy.routes()
    assert proxy.stop() == 0
    assert os.path.exists(activator.api_path), "systemd's socket file is not ours to remove"


def test_socket_activation_with_a_bad_name_says_so(
    activator: Activator, backend: Backend, tmp_path: Path
) -> None:
    fds = (activator.public.fileno(), activator.api.fileno())
    proc = __import__("subprocess").run(
        [sys.executable, SYSTEMD_LIKE, "public:rest", *map(str, fds), "--"],
        pass_fds=fds,
        env=proxy_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "socket named 'rest'" in proc.stdout + proc.stderr


# --- the load that must not notice ---------------------------------------------------------------


@dataclass
class Report:
    ok: int = 0
    retried: int = 0
    failed: list[str] = field(default_factory=list)
    ws_messages: int = 0
    ws_closes: list[float] = field(default_factory=list)  # monotonic times the proxy closed it
    ws_reconnects: int = 0
    longest: float = 0.0  # seconds: the slowest request (retry included), the gap a user saw

    def summary(self) -> str:
        """The report with only the first failures (a missing route fails thousands)."""
        failed = [detail[:200] for detail in self.failed[:3]]
        return f"{self.ok} ok, {len(self.failed)} failed, first {failed}, {self.ws_messages} echoes"


class Load:
    """Keep-alive requests, new-connection requests and a WebSocket, each in a thread, through
    the proxy at 127.0.0.1:`port`, until stopped (or MAX_REQUESTS, or LOAD_SECONDS)."""

    def __init__(self, port: int, path: str = "/user/alice/", tls: ssl.SSLContext | None = None):
        self.port = port
        self.path = path
        self.tls = tls
        self.report = Report()
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._deadline = time.monotonic() + LOAD_SECONDS
        self._threads = [
            threading.Thread(target=self._keep_alive, daemon=True),
            threading.Thread(target=self._new_connections, daemon=True),
            threading.Thread(target=self._websocket, daemon=True),
        ]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _going(self, count: int) -> bool:
        return (
            not self._stop.is_set() and count < MAX_REQUESTS and time.monotonic() < self._deadline
        )

    def wait_for(self, ok: int, messages: int, timeout: float = 60.0) -> None:
        """Until `ok` more requests and `messages` more WebSocket echoes have been seen."""
        with self._lock:
            want_ok, want_messages = self.report.ok + ok, self.report.ws_messages + messages
            assert self._lock.wait_for(
                lambda: self.report.ok >= want_ok and self.report.ws_messages >= want_messages,
                timeout,
            ), f"the load stalled: {self.report.summary()}"

    def _count(self, outcome: str, detail: str = "") -> None:
        with self._lock:
            if outcome == "ok":
                self.report.ok += 1
            elif outcome == "retried":
                self.report.retried += 1
            elif outcome == "message":
                self.report.ws_messages += 1
            elif outcome == "reconnect":
                self.report.ws_reconnects += 1
            elif outcome == "ws-closed":
                self.report.ws_closes.append(time.monotonic())
            else:
                self.report.failed.append(detail)
            self._lock.notify_all()

    def _connection(self) -> http.client.HTTPConnection:
        if self.tls is not None:
            return http.client.HTTPSConnection("127.0.0.1", self.port, timeout=30, context=self.tls)
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

    def _took(self, started: float) -> None:
        with self._lock:
            self.report.longest = max(self.report.longest, time.monotonic() - started)

    def _get(self, conn: http.client.HTTPConnection) -> None:
        conn.request("GET", self.path)
        response = conn.getresponse()
        body = response.read()
        if response.status != 200 or body != b"plain":
            self._count("failed", f"{response.status} {body[:80]!r}")
        else:
            self._count("ok")
        if response.will_close:
            conn.close()

    def _keep_alive(self) -> None:
        conn = self._connection()
        used = False
        for count in range(MAX_REQUESTS):
            if not self._going(count):
                break
            started = time.monotonic()
            try:
                self._get(conn)
                used = conn.sock is not None
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
                conn.close()
                if not used:
                    self._count("failed", f"keep-alive, new connection: {e!r}")
                    continue
                self._count("retried")  # the idle connection was closed: again, on a new one
                used = False
                try:
                    self._get(conn)
                    used = conn.sock is not None
                except OSError as again:
                    self._count("failed", f"keep-alive, retry: {again!r}")
            except OSError as e:
                conn.close()
                used = False
                self._count("failed", f"keep-alive: {e!r}")
            self._took(started)
        conn.close()

    def _new_connections(self) -> None:
        for count in range(MAX_REQUESTS):
            if not self._going(count):
                break
            conn = self._connection()
            started = time.monotonic()
            try:
                self._get(conn)
            except OSError as e:
                self._count("failed", f"new connection: {e!r}")
            finally:
                conn.close()
            self._took(started)

    def _websocket(self) -> None:
        scheme = "wss" if self.tls is not None else "ws"
        url = f"{scheme}://127.0.0.1:{self.port}{self.path}ws"
        for count in range(MAX_REQUESTS):
            if not self._going(count):
                break
            try:
                ws = ws_connect(url, ssl=self.tls, open_timeout=30, close_timeout=1)
            except Exception as e:
                self._count("failed", f"websocket connect: {e!r}")
                continue
            if count:
                self._count("reconnect")
            with ws:
                try:
                    for n in range(MAX_REQUESTS):
                        if not self._going(n):
                            return
                        ws.send(str(n))
                        if ws.recv(timeout=30) != str(n):
                            self._count("failed", "websocket: wrong echo")
                        self._count("message")
                        self._stop.wait(0.01)  # a kernel's pace, not a flood
                except ConnectionClosed:
                    self._count("ws-closed")
                except TimeoutError:
                    self._count("failed", "websocket: no echo in 30 s")


# --- a restart under socket activation -----------------------------------------------------------


@dataclass
class StoreCase:
    name: str
    args: tuple[str, ...]


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreCase:
    if request.param == "memory":
        return StoreCase("memory", ())
    if request.param == "sqlite":
        return StoreCase("sqlite", ("--storage-backend", f"sqlite:///{tmp_path}/routes.db"))
    redis: RedisServer = request.getfixturevalue("redis_server")
    prefix = f"restarts-{request.node.name}-{time.monotonic_ns()}"
    return StoreCase("redis", ("--storage-backend", redis.url(prefix)))


def test_socket_activated_restart_fails_no_request(
    activator: Activator,
    running: list[Proxy],
    start_backend: Callable[..., Backend],
    store: StoreCase,
) -> None:
    """systemctl restart with the sockets in a socket unit: requests wait in the listening
    socket's queue while no process accepts. The routes come back from the store; the memory
    store's from systemd's file descriptor store (an answer from the default target, where a
    missing route would send alice, is a failed request)."""
    backend = start_backend(ws_echo_app())
    hub = start_backend()  # the default target: its echo is no `plain`
    args = ("--default-target", hub.url, "--drain-timeout", str(DRAIN_MS), *store.args)
    first = activator.start(*args, env=proxy_env())
    running.append(first)
    first.add_route("/user/alice", backend.url)
    with Load(activator.port, "/user/alice/") as load:
        load.wait_for(ok=50, messages=5)
        assert first.stop() == 0
        second = activator.start(*args, env=proxy_env())
        running.append(second)
        load.wait_for(ok=50, messages=5)
    report = load.report
    print(f"socket-activated restart, {store.name}: {report}")
    assert report.failed == [], report
    assert second.routes()["/user/alice"]["target"] == backend.url
    assert activator.manager.refused == []
    # a plain restart ends the WebSocket when its process stops: the client connects again
    assert report.ws_reconnects == len(report.ws_closes)


def kept_routes(manager: ServiceManager, *keys: str, timeout: float = 30.0) -> dict[str, Any]:
    """The routes systemd keeps for the service, once they include `keys` (a readiness probe:
    the proxy writes them a moment after the change)."""
    deadline = time.monotonic() + timeout
    while True:
        manager.take()
        with contextlib.suppress(AssertionError, SnapshotError):
            routes = decode(manager.content())
            if set(keys) <= routes.keys():
                return routes
        assert time.monotonic() < deadline, f"{keys} never kept: {manager.stored}"
        time.sleep(0.05)


def test_the_memory_stores_routes_survive_a_crash(
    activator: Activator, running: list[Proxy], start_backend: Callable[..., Backend]
) -> None:
    """Restart= after kill -9: the routes kept before the crash come back, with their last
    activity, before the first request."""
    backend = start_backend(ws_echo_app())
    hub = start_backend()
    first = activator.start("--default-target", hub.url, env=proxy_env())
    running.append(first)
    first.add_route("/user/alice", backend.url, user="alice")
    kept_routes(activator.manager, "/user/alice")
    before = first.routes()["/user/alice"]
    first.proc.kill()
    first.proc.wait()
    second = activator.start("--default-target", hub.url, env=proxy_env())
    running.append(second)
    second.wait_for_line(r"info: Restored 2 routes kept by the service manager")
    assert second.routes()["/user/alice"] == before
    status, _, body = second.request("GET", "/user/alice/")
    assert (status, body) == (200, b"plain")


def test_a_hand_over_under_systemd_keeps_one_current_table(
    activator: Activator, running: list[Proxy], start_backend: Callable[..., Backend]
) -> None:
    """After SIGUSR2 the tracked pid (the new hubproxy) keeps the routes in systemd's store in
    place of the old one; the interim process, which systemd would not listen to, says nothing.
    A restart after the upgrade finds the routes added after it."""
    backend = start_backend(ws_echo_app())
    args = ("--default-target", backend.url, "--drain-timeout", "500")
    proxy = activator.start(*args, env=proxy_env())
    running.append(proxy)
    proxy.add_route("/user/alice", backend.url)
    # a time-like string in nested data stays a string (it was made a time in the hand-over,
    # which then stopped every later table from being written)
    proxy.add_route("/user/carol", backend.url, server={"last_activity": "2026-01-01T00:00:00Z"})
    carol = proxy.routes()["/user/carol"]
    kept_routes(activator.manager, "/user/alice")
    handed_over(proxy)
    assert proxy.routes()["/user/carol"] == carol
    proxy.add_route("/user/bob", backend.url)
    kept = kept_routes(activator.manager, "/user/alice", "/user/bob")
    assert kept["/user/carol"]["server"] == {"last_activity": "2026-01-01T00:00:00Z"}
    assert activator.manager.refused == [], "only the main process tells systemd anything"
    assert proxy.stop() == 0
    assert os.path.exists(activator.api_path), "systemd's socket file, after an upgrade too"
    again = activator.start(*args, env=proxy_env())
    running.append(again)
    assert {"/user/alice", "/user/bob"} <= again.routes().keys()


# --- the hand-over (SIGUSR2) ---------------------------------------------------------------------


def handed_over(proxy: Proxy) -> tuple[int, float]:
    """Send SIGUSR2 and wait until the tracked pid serves again and the interim process has
    gone; (the interim pid, when SIGUSR2 was sent)."""
    sent = time.monotonic()
    proxy.proc.send_signal(signal.SIGUSR2)
    pid = proxy.proc.pid
    proxy.wait_for_line(rf"info: Pid {pid} serves again; draining", timeout=60)
    # the tracked pid's own line (the two processes' lines may come in either order)
    took = proxy.wait_for_line(rf"info: Taking over from pid (?!{pid}:)(\d+):", timeout=60)
    interim = int(took.group(1))
    deadline = time.monotonic() + 60
    while Path(f"/proc/{interim}").exists():  # exited, and reaped by its parent (us)
        assert time.monotonic() < deadline, f"interim process {interim} still there"
        time.sleep(0.05)
    assert proxy.proc.poll() is None, "the tracked pid never exits"
    return interim, sent


def non_socket_fds(pid: int) -> list[str]:
    kinds = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if not target.startswith("socket:"):
                kinds.append(re.sub(r"\d+", "N", target))
    return sorted(kinds)


def test_hand_over_fails_no_request(
    start_proxy: Callable[..., Proxy], start_backend: Callable[..., Backend], store: StoreCase
) -> None:
    """SIGUSR2: the new hubproxy serves, the routes and their last activity come along, the
    old process finishes what it has (WebSockets up to the drain time), the pid stays."""
    backend = start_backend(ws_echo_app())
    proxy = start_proxy("--drain-timeout", str(DRAIN_MS), *store.args)
    proxy.add_route("/user/alice", backend.url, user="alice")
    for n in range(50):
        proxy.add_route(f"/user/u{n}", backend.url)
    files_before = non_socket_fds(proxy.proc.pid)
    with Load(proxy.port) as load:
        load.wait_for(ok=50, messages=5)
        routes_before = proxy.routes()
        _, sent = handed_over(proxy)
        load.wait_for(ok=50, messages=5)
    report = load.report
    print(f"hand-over, {store.name}: {report}")
    assert report.failed == [], report
    # a WebSocket is closed by a process it outlived the drain time of, never earlier
    assert all(closed - sent >= DRAIN_MS / 1000 for closed in report.ws_closes), report
    routes_after = proxy.routes()
    assert routes_after.keys() == routes_before.keys()
    assert routes_after["/user/alice"]["user"] == "alice"
    for key, data in routes_before.items():  # activity is never lost, only newer
        assert routes_after[key]["last_activity"] >= data["last_activity"]
    assert non_socket_fds(proxy.proc.pid) == files_before
    proxy.add_route("/after", backend.url)  # the API is the new process's
    assert proxy.request("GET", "/after/")[0] == 200
    assert proxy.stop() == 0


def test_hand_over_with_workers(
    start_proxy: Callable[..., Proxy], start_backend: Callable[..., Backend]
) -> None:
    backend = start_backend(ws_echo_app())
    proxy = start_proxy("--workers", "2", "--drain-timeout", str(DRAIN_MS))
    proxy.add_route("/user/alice", backend.url)
    old_workers = proxy.wait_for_line(r"Serving with 2 worker processes \(pids \[(\d+), (\d+)\]")
    with Load(proxy.port) as load:
        load.wait_for(ok=50, messages=5)
        handed_over(proxy)
        load.wait_for(ok=50, messages=5)
    assert load.report.failed == [], load.report
    for pid in map(int, old_workers.groups()):
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    assert proxy.stop() == 0


def test_hand_over_with_tls(
    start_proxy: Callable[..., Proxy], start_backend: Callable[..., Backend], tmp_path: Path
) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    key_file, cert_file = tmp_path / "key.pem", tmp_path / "cert.pem"
    cert.private_key_pem.write_to_path(str(key_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    backend = start_backend(ws_echo_app())
    proxy = start_proxy(
        "--ssl-key", str(key_file), "--ssl-cert", str(cert_file), "--drain-timeout", str(DRAIN_MS)
    )
    proxy.add_route("/user/alice", backend.url)
    with Load(proxy.port, tls=client) as load:
        load.wait_for(ok=20, messages=5)
        handed_over(proxy)
        load.wait_for(ok=20, messages=5)
    assert load.report.failed == [], load.report

    # a new process that cannot start (its certificate file is now broken): the old one serves
    # on, API included, and says why
    cert_file.write_text("not a certificate\n")
    proxy.proc.send_signal(signal.SIGUSR2)
    proxy.wait_for_line(r"error: Upgrade failed, serving on: the new process exited with status 1")
    proxy.add_route("/still", backend.url)
    conn = http.client.HTTPSConnection("127.0.0.1", proxy.port, timeout=10, context=client)
    conn.request("GET", "/still/")
    assert conn.getresponse().status == 200
    conn.close()
    assert proxy.proc.poll() is None


# --- the hand-over, disturbed ---------------------------------------------------------------------


@pytest.fixture
def draining_proxy(
    start_proxy: Callable[..., Proxy], start_backend: Callable[..., Backend]
) -> Iterator[tuple[Proxy, int]]:
    """A proxy whose hand-over drain is held open by a WebSocket (up to its 4 s drain time);
    (the proxy, the interim pid) once the drain has begun."""
    backend = start_backend(ws_echo_app())
    # ports the OS chose, given explicitly: a proxy that binds anew must find the same ones
    ports = [str(free_port()), str(free_port())]
    proxy = start_proxy(
        "--port", ports[0], "--api-port", ports[1],
        "--default-target", backend.url, "--drain-timeout", "4000",
    )  # fmt: skip
    with ws_connect(f"ws://127.0.0.1:{proxy.port}/ws", open_timeout=30) as ws:
        ws.send("hold")
        assert ws.recv(timeout=30) == "hold"
        proxy.proc.send_signal(signal.SIGUSR2)
        served = proxy.wait_for_line(r"info: Pid (\d+) serves; draining, then executing")
        yield proxy, int(served.group(1))


def test_a_second_sigusr2_while_draining_is_refused(draining_proxy: tuple[Proxy, int]) -> None:
    proxy, _ = draining_proxy
    proxy.proc.send_signal(signal.SIGUSR2)
    proxy.wait_for_line(r"warn: SIGUSR2 while stopping: ignored")
    proxy.wait_for_line(rf"info: Pid {proxy.proc.pid} serves again; draining")
    assert proxy.proc.poll() is None
    assert proxy.request("GET", "/x")[0] == 200


def test_sigterm_while_draining_stops_the_interim_process_too(
    draining_proxy: tuple[Proxy, int],
) -> None:
    proxy, interim = draining_proxy
    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.proc.wait(30) == 0
    proxy.wait_for_line(r"warn: Terminated during the upgrade: stopping the interim process")
    assert not Path(f"/proc/{interim}").exists(), "the interim process outlived the stop"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=5).close()


def test_the_tracked_pid_binds_anew_when_the_interim_process_dies(
    draining_proxy: tuple[Proxy, int],
) -> None:
    """kill -9 of the interim process while the tracked pid drains: the new image finds nobody
    to take back from, and binds the listeners from its options rather than serve nothing."""
    proxy, interim = draining_proxy
    os.kill(interim, signal.SIGKILL)
    proxy.wait_for_line(r"error: Taking back from the interim process failed .*: binding anew")
    proxy.wait_for_line(r"info: Proxy API at ", timeout=60)
    deadline = time.monotonic() + 30
    while True:  # the last "Proxy API at" line may precede the listener by a moment
        with contextlib.suppress(OSError):
            if proxy.request("GET", "/x")[0] == 200:
                break
        assert time.monotonic() < deadline, "the tracked pid serves nothing"
        time.sleep(0.05)
    assert proxy.proc.poll() is None
    assert "/" in proxy.routes()

"""hubproxy run as its own service; JupyterHub with `should_start = False` (spec §7.4).

One stack per module: hubproxy (`--default-target` and `--error-target` at the hub,
`CONFIGPROXY_AUTH_TOKEN`), a hub with `cleanup_servers = False` and a small
`last_activity_interval`, and alice's running server. The tests run in file order and each
leaves the stack healthy (hub up, proxy up, alice's server reachable):

1. routes: the hub's routes carry JupyterHub's data, the hub's `/` replaced `--default-target`'s;
   a 7 MiB upload to jupyter_server's contents API and its download, through the proxy;
2. activity: traffic through the proxy advances alice's `last_activity` in the hub;
3. hub restart (SIGTERM, then SIGKILL): alice's server stays reachable through the proxy (probed
   every 50 ms), `/hub/` answers an error at once while the hub is down, and the restarted hub
   reconciles routes;
4. proxy hand-over (SIGUSR2, an upgrade in place): alice's server stays reachable, same routes,
   same pid;
5. proxy restart: the hub puts the routes back (periodic check, then `POST /hub/api/proxy`);
   the outage is measured;
6. proxy restart under systemd (socket activation, routes in its file descriptor store):
   alice's server stays reachable.
"""

from __future__ import annotations

import signal
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
    Activation,
    ExternalProxy,
    Hub,
    Prober,
    alice_on_separate_proxy,
    free_port,
    parse_time,
    print_logs_if_failed,
    run_one_plus_one,
    wait_until,
)

from hubproxy.fdstore import decode

pytestmark = pytest.mark.timeout(300)

LAST_ACTIVITY_INTERVAL = 2  # seconds: how often the hub reads the proxy's routes


@dataclass
class Stack:
    proxy: ExternalProxy
    hub: Hub
    token: str  # alice's API token
    server_path: str

    def alice(self, path: str = "api/status", timeout: float = 5) -> requests.Response:
        return requests.get(
            self.proxy.public_url + self.server_path + path,
            headers={"Authorization": f"token {self.token}"},
            allow_redirects=False,
            timeout=timeout,
        )

    def prober(self) -> Prober:
        return Prober(
            self.proxy.public_url + self.server_path + "api/status",
            {"Authorization": f"token {self.token}"},
            interval=0.05,
        )


@pytest.fixture(scope="module")
def stack(jh_workdir: Path) -> Iterator[Stack]:
    hub_port = free_port()
    proxy = ExternalProxy(jh_workdir, free_port(), free_port(), f"http://127.0.0.1:{hub_port}")
    hub = Hub(
        jh_workdir,
        proxy.port,
        hub_port,
        proxy.api_port,
        should_start_proxy=False,
        last_activity_interval=LAST_ACTIVITY_INTERVAL,
    )
    with alice_on_separate_proxy(proxy, hub, jh_workdir) as (token, server_path):
        yield Stack(proxy, hub, token, server_path)


@pytest.fixture(autouse=True)
def logs_on_failure(request: pytest.FixtureRequest, stack: Stack) -> Iterator[None]:
    yield
    print_logs_if_failed(request, stack.hub, stack.proxy)


def test_routes_carry_jupyterhub_data(stack: Stack) -> None:
    routes = stack.proxy.routes()
    alice = routes["/user/alice"]
    assert alice["jupyterhub"] is True and alice["user"] == "alice", alice
    assert alice["server_name"] == "" and "last_activity" in alice, alice
    # the hub replaced the proxy's --default-target route with its own (same target)
    assert routes["/"]["hub"] is True and routes["/"]["target"] == stack.hub.hub_url, routes

    resp = stack.alice()
    assert resp.status_code == 200, (resp.status_code, resp.text)
    assert run_one_plus_one(stack.proxy.public_url, stack.server_path, stack.token) == "2"


def test_large_upload_and_download(stack: Stack) -> None:
    """A file of several MiB through the proxy to jupyter_server's contents API and back."""
    content = "".join(f"{i:08d} hubproxy\n" for i in range(400_000))  # 7.2 MiB of text
    resp = requests.put(
        stack.proxy.public_url + stack.server_path + "api/contents/big.txt",
        json={"type": "file", "format": "text", "content": content},
        headers={"Authorization": f"token {stack.token}"},
        timeout=60,
    )
    assert resp.status_code in (200, 201), (resp.status_code, resp.text[:300])
    resp = stack.alice("files/big.txt", timeout=60)
    assert resp.status_code == 200, (resp.status_code, resp.text[:300])
    assert resp.text == content


def test_activity_through_proxy_reaches_hub(stack: Stack) -> None:
    """Requests through the proxy advance alice's last_activity in the hub (via GET /api/routes).

    alice's server checks her token with the hub once and caches the answer, and reports its own
    activity only every 5 minutes, so after a first request the only source of newer activity
    is the proxy's route, which the hub reads every `last_activity_interval` seconds.
    """
    assert stack.alice().status_code == 200  # the token check (cached by the server afterwards)
    before = parse_time(stack.hub.user_model("alice")["last_activity"])
    # a request that the proxy records as strictly later than the hub's current value
    wait_until(lambda: time.time() > before.timestamp() + 0.01, 5, "the clock", 0.005)
    sent_at = time.time()
    assert stack.alice().status_code == 200
    proxy_activity = wait_until(
        lambda: (
            parse_time(stack.proxy.routes()["/user/alice"]["last_activity"])
            if parse_time(stack.proxy.routes()["/user/alice"]["last_activity"]) > before
            else None
        ),
        10,
        "the proxy to record alice's activity",
    )
    assert proxy_activity.timestamp() >= sent_at - 1.0, (proxy_activity, sent_at)

    def hub_caught_up() -> dict | None:
        model = stack.hub.user_model("alice")
        user_seen = parse_time(model["last_activity"])
        server_seen = parse_time(model["servers"][""]["last_activity"])
        return model if user_seen >= proxy_activity and server_seen >= proxy_activity else None

    started = time.monotonic()
    model = wait_until(hub_caught_up, 5 * LAST_ACTIVITY_INTERVAL + 10, "the hub to see it", 0.2)
    MEASUREMENTS["activity: proxy -> hub delay (last_activity_interval=2s)"] = (
        f"{time.monotonic() - started:.2f}s; hub last_activity {model['last_activity']}, "
        f"proxy {proxy_activity.isoformat()}"
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_hub_restart_keeps_servers_reachable(stack: Stack, sig: signal.Signals) -> None:
    routes_before = stack.proxy.routes()
    with stack.prober() as probe:
        wait_until(lambda: len(probe.samples) >= 5, 10, "the first probes", 0.02)
        hub_stopped_at = time.monotonic()
        assert stack.hub.stop(sig) == (0 if sig == signal.SIGTERM else -sig), stack.hub.log()

        # with the hub down, /hub/ is answered at once with an error (the hub's route has no
        # upstream; the error target is the hub too), not left hanging
        started = time.monotonic()
        resp = requests.get(stack.proxy.public_url + "/hub/", timeout=10, allow_redirects=False)
        hub_down_answer = time.monotonic() - started
        assert resp.status_code == 503, (resp.status_code, resp.text[:300])
        assert hub_down_answer < 2.0, hub_down_answer

        # alice's server is still there, through the proxy
        assert stack.alice().status_code == 200

        down_for = time.monotonic() - hub_stopped_at
        stack.hub.start()
        hub_restarted_in = time.monotonic() - hub_stopped_at
        # the restarted hub reconciled the routes: it still knows alice's server ...
        model = stack.hub.user_model("alice")
        assert model["servers"][""]["ready"], model
        wait_until(lambda: len(probe.samples) >= 5 + 20, 10, "more probes", 0.02)
    routes_after = stack.proxy.routes()
    # ... and the routes are the same ones, with the same data
    for key in ("/", "/user/alice"):
        before = {k: v for k, v in routes_before[key].items() if k != "last_activity"}
        after = {k: v for k, v in routes_after[key].items() if k != "last_activity"}
        assert before == after, (key, routes_before, routes_after)
    assert sorted(routes_after) == sorted(routes_before), (routes_before, routes_after)

    MEASUREMENTS[f"hub restart ({sig.name}): alice unreachable"] = (
        f"{probe.unreachable_seconds():.3f}s ({probe.summary()}; hub down {down_for:.2f}s, "
        f"back after {hub_restarted_in:.2f}s; /hub/ with the hub down: "
        f"{resp.status_code} in {hub_down_answer * 1000:.0f} ms)"
    )
    assert not probe.failures, probe.summary()


def test_proxy_hand_over_keeps_servers_reachable(stack: Stack) -> None:
    """SIGUSR2 (an upgrade in place): the hub keeps running and notices nothing; alice's server
    stays reachable throughout, with the same routes, the proxy's pid unchanged."""
    assert stack.proxy.proc is not None
    pid = stack.proxy.proc.pid
    routes_before = stack.proxy.routes()
    with stack.prober() as probe:
        wait_until(lambda: len(probe.samples) >= 5, 10, "the first probes", 0.02)
        started = time.monotonic()
        stack.proxy.proc.send_signal(signal.SIGUSR2)
        wait_until(
            lambda: f"Pid {pid} serves again" in stack.proxy.log(),
            60,
            "the proxy's pid to serve again",
            0.05,
        )
        handed_over_in = time.monotonic() - started
        wait_until(lambda: len(probe.samples) >= 5 + 40, 10, "more probes", 0.02)
    assert stack.proxy.proc.poll() is None
    routes_after = stack.proxy.routes()
    assert sorted(routes_after) == sorted(routes_before)
    for key, before in routes_before.items():
        assert {k: v for k, v in routes_after[key].items() if k != "last_activity"} == {
            k: v for k, v in before.items() if k != "last_activity"
        }
    MEASUREMENTS["proxy hand-over (SIGUSR2): alice unreachable"] = (
        f"{probe.unreachable_seconds():.3f}s ({probe.summary()}; back in the same pid after "
        f"{handed_over_in:.2f}s)"
    )
    assert not probe.failures, probe.summary()
    assert run_one_plus_one(stack.proxy.public_url, stack.server_path, stack.token) == "2"


@pytest.mark.parametrize("restore", ["periodic check", "POST /hub/api/proxy"])
def test_proxy_restart_hub_restores_routes(stack: Stack, restore: str) -> None:
    assert stack.alice().status_code == 200
    with stack.prober() as probe:
        wait_until(lambda: len(probe.samples) >= 5, 10, "the first probes", 0.02)
        stopped_at = time.monotonic()
        assert stack.proxy.stop(signal.SIGTERM) == 0, stack.proxy.log()
        stack.proxy.start()
        listening_after = time.monotonic() - stopped_at
        routes = stack.proxy.routes()
        # a fresh memory store: only --default-target's route, unless the hub's periodic
        # check (every 2 s) has put alice's back through the API already
        this_start = stack.proxy.log_path.read_text().rpartition("=== start #")[2]
        assert "/user/alice" not in routes or "Adding route /user/alice" in this_start
        if restore == "POST /hub/api/proxy":
            # the hub is reached through the proxy's --default-target route
            resp = stack.hub.api("POST", "/proxy")
            assert resp.status_code == 200, (resp.status_code, resp.text)
        restored = wait_until(
            lambda: stack.alice().status_code == 200,
            5 * LAST_ACTIVITY_INTERVAL + 20,
            "the hub to restore alice's route",
            0.05,
        )
        assert restored
        restored_after = time.monotonic() - stopped_at
        wait_until(lambda: len(probe.samples) >= 5 + 40, 10, "more probes", 0.02)
    routes = stack.proxy.routes()
    assert routes["/user/alice"]["user"] == "alice" and routes["/user/alice"]["jupyterhub"]
    assert routes["/"].get("hub") is True, routes
    MEASUREMENTS[f"proxy restart ({restore}): alice unreachable"] = (
        f"{probe.unreachable_seconds():.3f}s ({probe.summary()}; proxy listening again after "
        f"{listening_after:.2f}s, route back after {restored_after:.2f}s)"
    )
    # afterwards everything works again, including WebSockets
    assert run_one_plus_one(stack.proxy.public_url, stack.server_path, stack.token) == "2"


def test_proxy_restart_under_systemd_keeps_servers_reachable(
    stack: Stack, jh_workdir: Path
) -> None:
    """The proxy as systemd runs it (socket units, `Type=notify`, `FileDescriptorStoreMax=1`):
    `systemctl restart` queues connections in the sockets systemd keeps, and the memory
    store's routes come back from its file descriptor store, so alice's server stays
    reachable without the hub doing anything."""
    proxy = stack.proxy
    assert proxy.stop(signal.SIGTERM) == 0, proxy.log()
    proxy.activation = Activation.on(proxy.port, proxy.api_port, jh_workdir)
    try:
        proxy.start()
        stack.hub.api("POST", "/proxy")  # the first start under systemd has a fresh table
        wait_until(lambda: stack.alice().status_code == 200, 30, "alice's route", 0.05)
        wait_until(
            lambda: "/user/alice" in decode(_kept(proxy.activation)), 30, "the kept table", 0.05
        )
        with stack.prober() as probe:
            wait_until(lambda: len(probe.samples) >= 5, 10, "the first probes", 0.02)
            stopped_at = time.monotonic()
            assert proxy.stop(signal.SIGTERM) == 0, proxy.log()
            proxy.start()
            serving_after = time.monotonic() - stopped_at
            assert "Restored" in proxy.log()
            wait_until(lambda: len(probe.samples) >= 5 + 40, 10, "more probes", 0.02)
        MEASUREMENTS["proxy restart under systemd (routes kept): alice unreachable"] = (
            f"{probe.unreachable_seconds():.3f}s ({probe.summary()}; serving again after "
            f"{serving_after:.2f}s)"
        )
        assert not probe.failures, probe.summary()
        assert run_one_plus_one(proxy.public_url, stack.server_path, stack.token) == "2"
    finally:  # the stack as the other tests know it
        proxy.stop(signal.SIGTERM)
        proxy.activation.close()
        proxy.activation = None
        proxy.start()


def _kept(activation: Activation | None) -> bytes:
    assert activation is not None
    activation.manager.take()
    return activation.manager.content() if activation.manager.stored else b""

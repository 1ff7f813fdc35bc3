"""JupyterHub starts hubproxy itself (the default mode, `ConfigurableHTTPProxy.should_start`).

Once through `c.ConfigurableHTTPProxy.command = [python, '-m', 'hubproxy']`, once through
JupyterHub's default command, `configurable-http-proxy`, found on PATH (hubproxy's script first,
Node's CHP nowhere before it), and once more through the first with `c.JupyterHub.internal_ssl`
(the API over TLS with client certificates, https to the servers and the error target).

Each run: log in through the proxy, start a user's server, reach it through the proxy (browser
session with the OAuth dance, and a token), run `1+1` on a kernel over its WebSocket, watch the
route appear in `GET /api/routes` with JupyterHub's data, upgrade the proxy in place (SIGUSR2;
the first way only: the hub sees the same pid and its routes), kill the server and get the hub's
"server appears to be down" page (hubproxy's `--error-target`), see the route disappear when the
hub stops the server, then stop the hub: the proxy process is gone.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

# without the `integration` extra, this module is skipped (as a whole, before its imports)
pytest.importorskip("jupyterhub", reason="needs jupyterhub: pip install -e '.[test,integration]'")
pytest.importorskip("requests", reason="needs requests: pip install -e '.[test,integration]'")

import requests
from jhub import (
    BIN_DIR,
    Hub,
    free_port,
    kill_leftovers,
    login,
    path_without_node_chp,
    pid_alive,
    process_cmdline,
    run_one_plus_one,
    singleuser_pids,
    wait_until,
)

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize(
    "how", ["python -m hubproxy", "configurable-http-proxy on PATH", "internal_ssl"]
)
def test_hub_starts_hubproxy(how: str, jh_workdir: Path) -> None:
    workdir = jh_workdir / how.split()[0].replace("-", "_")
    workdir.mkdir()
    if how == "configurable-http-proxy on PATH":
        hub = Hub(
            workdir, free_port(), free_port(), free_port(), env={"PATH": path_without_node_chp()}
        )
    else:
        # internal_ssl: the proxy's API over TLS with client certificates, and https (with the
        # proxy's client certificate) to the single-user servers and to the hub's error pages
        hub = Hub(
            workdir,
            free_port(),
            free_port(),
            free_port(),
            proxy_command=[sys.executable, "-m", "hubproxy"],
            internal_ssl=how == "internal_ssl",
        )
    try:
        hub.start()

        # --- the proxy JupyterHub started is hubproxy -----------------------------------------
        proxy_pid = hub.proxy_pid()
        cmdline = process_cmdline(proxy_pid)
        if how == "configurable-http-proxy on PATH":
            assert str(BIN_DIR / "configurable-http-proxy") in cmdline, cmdline
        else:
            assert cmdline[1:3] == ["-m", "hubproxy"], cmdline
        assert "--error-target" in cmdline and "node" not in Path(cmdline[0]).name, cmdline
        assert ("--api-ssl-key" in cmdline) == hub.internal_ssl, cmdline

        routes = hub.proxy_routes()
        assert routes["/"]["hub"] is True and routes["/"]["jupyterhub"] is True, routes
        assert routes["/"]["target"] == hub.hub_url, routes

        # --- a user logs in through the proxy -------------------------------------------------
        browser = login(hub.public_url, "alice")
        resp = browser.get(hub.public_url + "/hub/home", timeout=30)
        assert resp.status_code == 200 and "alice" in resp.text

        # --- start the server; its route appears with JupyterHub's data -----------------------
        server_path = hub.start_server("alice")
        assert server_path == "/user/alice/"
        route = wait_until(lambda: hub.proxy_routes().get("/user/alice"), 30, "alice's route")
        assert route["user"] == "alice" and route["server_name"] == "", route
        assert route["jupyterhub"] is True, route
        scheme = "https" if hub.internal_ssl else "http"
        assert route["target"].startswith(f"{scheme}://127.0.0.1:"), route
        assert "last_activity" in route, route

        # --- reach it through the proxy: the browser (OAuth through the proxy), then a token -
        resp = browser.get(hub.public_url + "/user/alice/files/hello.txt", timeout=30)
        assert resp.status_code == 200, (resp.status_code, resp.url, resp.text[:300])
        assert resp.text == "hello alice\n"
        assert any(r.status_code == 302 for r in resp.history), "expected the OAuth redirects"

        token = hub.user_token("alice")
        resp = requests.get(
            hub.public_url + "/user/alice/api/status",
            headers={"Authorization": f"token {token}"},
            timeout=30,
        )
        assert resp.status_code == 200, resp.text

        # --- a kernel over its WebSocket, through the proxy -----------------------------------
        assert run_one_plus_one(hub.public_url, server_path, token) == "2"

        # --- an upgrade in place (SIGUSR2): the pid the hub started stays, so does the route ---
        if how == "python -m hubproxy":
            os.kill(proxy_pid, signal.SIGUSR2)
            wait_until(
                lambda: f"Pid {proxy_pid} serves again" in hub.log_path.read_text(errors="replace"),
                60,
                "the proxy's pid to serve again",
                0.05,
            )
            assert hub.proxy_pid() == proxy_pid and pid_alive(proxy_pid)
            assert "/user/alice" in hub.proxy_routes()
            assert run_one_plus_one(hub.public_url, server_path, token) == "2"

        # --- the server dies: the proxy answers 503 with the hub's error page (--error-target)
        pids = singleuser_pids(hub.home("alice"))
        assert len(pids) == 1, pids
        os.kill(pids[0], signal.SIGKILL)
        wait_until(lambda: not pid_alive(pids[0]), 10, "alice's server to die", 0.05)
        resp = requests.get(
            hub.public_url + "/user/alice/api/status",
            headers={"Authorization": f"token {token}"},
            allow_redirects=False,
            timeout=30,
        )
        assert resp.status_code == 503, (resp.status_code, resp.text[:300])
        assert resp.headers["Content-Type"].startswith("text/html"), resp.headers
        assert "Your server appears to be down" in resp.text, resp.text[:1000]

        # --- stop the server; its route disappears --------------------------------------------
        hub.stop_server("alice")
        wait_until(lambda: "/user/alice" not in hub.proxy_routes(), 30, "alice's route to go")
        resp = requests.get(
            hub.public_url + "/user/alice/api/status",
            headers={"Authorization": f"token {token}"},
            allow_redirects=False,
            timeout=30,
        )
        assert resp.status_code != 200  # now answered by the hub (server not running)

        # --- hub shutdown stops the proxy -----------------------------------------------------
        assert pid_alive(proxy_pid)
        assert hub.stop(signal.SIGTERM) == 0, hub.log()
        wait_until(lambda: not pid_alive(proxy_pid), 15, "the proxy process to exit", 0.05)
        assert not hub.proxy_pid_file.exists()
    except BaseException:
        print(hub.log())  # the hub's log, with the proxy's lines (shown with the failure)
        raise
    finally:
        hub.stop(signal.SIGKILL)
        if hub.proxy_pid_file.exists():  # the hub died before cleaning up: stop its proxy
            pid = hub.proxy_pid()
            cmd = " ".join(process_cmdline(pid))
            if pid_alive(pid) and ("hubproxy" in cmd or "configurable-http-proxy" in cmd):
                os.kill(pid, signal.SIGKILL)
        kill_leftovers(workdir)

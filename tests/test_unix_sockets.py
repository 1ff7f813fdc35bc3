"""Unix-socket listeners and targets (spec §1.1, §3.11, §6.3 cases 25–27)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import urllib.parse

from aiohttp import web


def error_app() -> web.Application:
    """CHP's test error server: answers text/plain with the `url` query parameter."""

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=request.query.get("url", ""), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/{tail:.*}", page)
    return app


def test_error_target_on_unix_socket(start_proxy, start_backend, tmp_path):
    errors = start_backend(error_app(), unix_path=str(tmp_path / "errors.sock"))
    proxy = start_proxy("--error-target", errors.url)
    status, headers, body = proxy.request("GET", "/foo/bar")
    assert status == 404
    assert headers["Content-Type"].startswith("text/plain")
    assert body == b"/foo/bar"


def test_unix_target_both_spellings(start_proxy, start_backend, tmp_path):
    backend = start_backend(unix_path=str(tmp_path / "up.sock"))
    proxy = start_proxy()
    encoded = urllib.parse.quote(str(tmp_path / "up.sock"), safe="")
    proxy.add_route("/unix", f"http+unix://{encoded}")
    proxy.add_route("/old", f"unix+http://{encoded}/pre")
    status, _, body = proxy.request("GET", "/unix/x?q=1")
    assert status == 200 and b'"url": "/unix/x?q=1"' in body
    status, _, body = proxy.request("GET", "/old/u2/x?q=1")
    assert status == 200 and b'"url": "/pre/old/u2/x?q=1"' in body
    assert backend.url.startswith("http+unix://")


def test_socket_files_follow_umask_and_are_removed(start_proxy, tmp_path):
    public, api = str(tmp_path / "p.sock"), str(tmp_path / "a.sock")
    proxy = start_proxy("--socket", public, "--api-socket", api, umask=0o077)
    for path in (public, api):
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) & 0o077 == 0
    status, _, _ = proxy.api("GET")
    assert status == 200
    assert proxy.stop() == 0
    assert not os.path.exists(public) and not os.path.exists(api)


def test_stale_socket_file_is_replaced(start_proxy, tmp_path):
    public = str(tmp_path / "stale.sock")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(public)  # bound, never listening, then closed: a stale file stays behind
    assert os.path.exists(public)
    proxy = start_proxy("--socket", public)
    status, _, body = proxy.request("GET", "/_chp_healthz")
    assert (status, body) == (200, b'{"status":"OK"}')


def test_socket_in_use_is_refused(tmp_path):
    public = str(tmp_path / "busy.sock")
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(public)
        other.listen()
        result = subprocess.run(
            [sys.executable, "-m", "hubproxy", "--socket", public, "--api-port", "0"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode != 0
    assert "in use" in result.stdout + result.stderr
    assert os.path.exists(public)  # someone else's socket is left alone


def test_plain_file_in_the_way_is_refused(tmp_path):
    public = tmp_path / "not-a-socket"
    public.write_text("precious")
    result = subprocess.run(
        [sys.executable, "-m", "hubproxy", "--socket", str(public), "--api-port", "0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "not a socket" in result.stdout + result.stderr
    assert public.read_text() == "precious"

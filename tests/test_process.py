"""The process as JupyterHub and users run it: CHP's CLI tests (spec §6.4), startup lines,
signals, the pid file, listeners that cannot bind, and the log format on stdout.

Every proxy listens on loopback (or a Unix socket in a temporary directory) on OS-chosen ports;
readiness is the startup line announcing the listeners, never a sleep.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support import Backend, Proxy, ProxyProcess, has_ipv6_loopback, http_request

LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z \[ConfigProxy\] (error|warn|info|debug): (.*)$"
)


def messages(lines: list[str]) -> list[tuple[str, str]]:
    """(level, message) of each log line; fails on a line that is not in CHP's format."""
    out = []
    for line in lines:
        match = LINE.match(line)
        assert match, f"not a CHP log line: {line!r}"
        out.append((match.group(1), match.group(2)))
    return out


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIGPROXY_")}
    env.update(extra)
    return env


def run_to_exit(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a hubproxy that is expected to stop by itself (a startup failure)."""
    return subprocess.run(
        [sys.executable, "-m", "hubproxy", *argv],
        capture_output=True,
        text=True,
        env=clean_env(CONFIGPROXY_AUTH_TOKEN="secret"),
        timeout=timeout,
    )


@pytest.fixture
def spawn() -> Iterator[Callable[..., ProxyProcess]]:
    """Start hubproxy with exactly the given arguments (no loopback defaults added)."""
    started: list[ProxyProcess] = []

    def start(*argv: str, token: str | None = "secret") -> ProxyProcess:
        env = clean_env() if token is None else clean_env(CONFIGPROXY_AUTH_TOKEN=token)
        process = ProxyProcess(list(argv), env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory for Unix sockets (their paths are limited to about 100 bytes)."""
    with tempfile.TemporaryDirectory(prefix="hp-", dir="/tmp") as path:
        yield Path(path)


def connectable(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=5):
        return True
    return False


def unix_get(path: str, target: str = "/") -> tuple[int, bytes]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(
            f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


# --- spec §6.4: CHP's CLI tests ----------------------------------------------------------------


def test_cli_basic_http_request(start_proxy: Callable[..., Proxy], backend: Backend) -> None:
    """§6.4 case 1: the default target receives the request."""
    proxy = start_proxy("--default-target", backend.url)
    status, _, body = proxy.request("GET", "/", timeout=10)
    assert status == 200
    assert json.loads(body)["url"] == "/"


def test_cli_custom_header(start_proxy: Callable[..., Proxy], backend: Backend) -> None:
    """§6.4 case 5: both headers reach the upstream, trimmed, the second value keeping its colon."""
    proxy = start_proxy(
        "--default-target",
        backend.url,
        "--custom-header",
        "k1: v1",
        "--custom-header",
        " k2 : host:123 ",
    )
    status, _, body = proxy.request("GET", "/", timeout=10)
    assert status == 200
    headers = {k.lower(): v for k, v in json.loads(body)["headers"].items()}
    assert headers["k1"] == "v1"
    assert headers["k2"] == "host:123"


def test_cli_invalid_custom_header() -> None:
    """§6.4 case 6: the process exits and says a colon was expected."""
    result = run_to_exit("--custom-header", "invalid")
    assert result.returncode == 1
    assert "colon was expected" in result.stderr


# --- startup ----------------------------------------------------------------------------------


def test_startup_lines_in_chps_order(
    start_proxy: Callable[..., Proxy], backend: Backend, tmp_path: Path
) -> None:
    pid_file = tmp_path / "proxy.pid"
    proxy = start_proxy(
        "--default-target",
        backend.url,
        "--auto-rewrite",
        "--change-origin",
        "--protocol-rewrite",
        "https",
        "--pid-file",
        str(pid_file),
        token=None,
    )
    proxy.wait_for_line(r"info: Writing pid ")
    target = backend.url
    assert messages(proxy.lines) == [
        ("info", "AutoRewrite of Location headers enabled."),
        ("info", "Change Origin of host headers enabled."),
        ("info", "ProtocolRewrite enabled. Rewriting to https"),
        ("warn", "REST API is not authenticated."),
        ("info", f"Adding route / -> {target}"),
        ("info", f"Route added / -> {target}"),
        ("info", f"Proxying {proxy.public_url} to {target}"),
        ("info", f"Proxy API at {proxy.api_url}/api/routes"),
        ("info", f"Writing pid {proxy.proc.pid} to {pid_file}"),
    ]


def test_startup_lines_with_token_and_no_default(start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy()
    assert messages(proxy.lines) == [
        ("info", f"Proxying {proxy.public_url} to (no default)"),
        ("info", f"Proxy API at {proxy.api_url}/api/routes"),
    ]


@pytest.mark.parametrize("token", ["", None])
def test_empty_or_missing_token_is_unauthenticated(
    spawn: Callable[..., ProxyProcess], token: str | None
) -> None:
    process = spawn("--ip", "127.0.0.1", "--port", "0", "--api-port", "0", token=token)
    process.wait_for_line(r"info: Proxy API at ")
    assert ("warn", "REST API is not authenticated.") in messages(process.lines)


def test_os_assigned_ports_are_announced(start_proxy: Callable[..., Proxy]) -> None:
    """`--port 0 --api-port 0`: the startup lines carry the real ports, and both accept."""
    proxy = start_proxy()
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", proxy.public_url)
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", proxy.api_url)
    assert proxy.port != 0 and proxy.api_port != 0 and proxy.port != proxy.api_port
    assert connectable(proxy.host, proxy.port)
    assert connectable(proxy.api_host, proxy.api_port)


def test_ip_host_name_is_resolved(start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy("--ip", "localhost", "--api-ip", "localhost")  # the later --ip wins
    assert proxy.host in ("127.0.0.1", "::1")
    assert connectable(proxy.host, proxy.port)
    assert connectable(proxy.api_host, proxy.api_port)


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6_literal(start_proxy: Callable[..., Proxy], backend: Backend) -> None:
    proxy = start_proxy("--ip", "::1", "--api-ip", "::1", "--default-target", backend.url)
    assert proxy.public_url.startswith("http://[::1]:")
    assert proxy.api_url.startswith("http://[::1]:")
    status, _, _ = proxy.request("GET", "/x", timeout=10)
    assert status == 200


def test_unix_sockets(
    spawn: Callable[..., ProxyProcess], backend: Backend, short_tmp: Path
) -> None:
    public, api = short_tmp / "proxy.sock", short_tmp / "api.sock"
    process = spawn(
        "--socket", str(public), "--api-socket", str(api), "--default-target", backend.url
    )
    process.wait_for_line(r"info: Proxy API at ")
    quoted = urllib.parse.quote(str(public), safe="")
    assert ("info", f"Proxying http+unix://{quoted} to {backend.url}") in messages(process.lines)
    status, body = unix_get(str(public), "/via/socket")
    assert status == 200 and json.loads(body)["url"] == "/via/socket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(api))
    assert process.stop() == 0
    assert not public.exists() and not api.exists()  # CHP leaves them behind


def test_stale_unix_socket_is_replaced(spawn: Callable[..., ProxyProcess], short_tmp: Path) -> None:
    public = short_tmp / "proxy.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(public))
    stale.close()  # the file stays, nothing listens: what a killed proxy leaves
    assert public.exists()
    process = spawn("--socket", str(public), "--api-socket", str(short_tmp / "api.sock"))
    process.wait_for_line(r"info: Proxy API at ")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(public))


# --- signals and the pid file --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sig", "word"), [(signal.SIGTERM, "Terminated"), (signal.SIGINT, "Interrupted")]
)
def test_signal_stops_cleanly(
    start_proxy: Callable[..., Proxy], tmp_path: Path, sig: int, word: str
) -> None:
    pid_file = tmp_path / "proxy.pid"
    proxy = start_proxy("--pid-file", str(pid_file), "--log-level", "debug")
    proxy.wait_for_line(r"info: Writing pid ")
    assert proxy.stop(sig) == 0  # CHP exits 2
    proxy.wait_for_line(rf"warn: {word}$")
    assert ("debug", f"Removing {pid_file}") in messages(proxy.lines)
    assert not pid_file.exists()


def test_pid_file_is_decimal_pid_without_newline(
    start_proxy: Callable[..., Proxy], tmp_path: Path
) -> None:
    pid_file = tmp_path / "proxy.pid"
    proxy = start_proxy("--pid-file", str(pid_file))
    proxy.wait_for_line(r"info: Writing pid ")
    assert pid_file.read_bytes() == str(proxy.proc.pid).encode()


def test_unwritable_pid_file_exits_1(tmp_path: Path) -> None:
    pid_file = tmp_path / "missing-dir" / "proxy.pid"
    result = run_to_exit("--ip", "127.0.0.1", "--port", "0", "--api-port", "0",
                         "--pid-file", str(pid_file))  # fmt: skip
    assert result.returncode == 1
    assert (
        "error",
        f"Cannot write pid file {pid_file}: No such file or directory",
    ) in messages(result.stdout.splitlines())


# --- listeners that cannot bind ------------------------------------------------------------


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_public_port_in_use_exits(busy_port: int) -> None:
    result = run_to_exit("--ip", "127.0.0.1", "--port", str(busy_port), "--api-port", "0")
    assert result.returncode == 1
    assert messages(result.stdout.splitlines())[-1] == (
        "error",
        f"proxy: cannot listen on 127.0.0.1:{busy_port}: Address already in use",
    )


def test_api_port_in_use_exits(busy_port: int) -> None:
    result = run_to_exit("--ip", "127.0.0.1", "--port", "0",
                         "--api-ip", "127.0.0.1", "--api-port", str(busy_port))  # fmt: skip
    assert result.returncode == 1
    lines = messages(result.stdout.splitlines())
    assert lines[-1] == (
        "error",
        f"API: cannot listen on 127.0.0.1:{busy_port}: Address already in use",
    )
    assert not any(m.startswith("Proxying") for _, m in lines)


def _nonlocal_bind_allowed() -> bool:
    try:
        return Path("/proc/sys/net/ipv4/ip_nonlocal_bind").read_text().strip() != "0"
    except OSError:
        return False


@pytest.mark.skipif(_nonlocal_bind_allowed(), reason="this host binds any address")
def test_address_not_on_this_host_exits() -> None:
    result = run_to_exit("--ip", "192.0.2.1", "--port", "0", "--api-port", "0")  # TEST-NET-1
    assert result.returncode == 1
    assert messages(result.stdout.splitlines())[-1] == (
        "error",
        "proxy: cannot listen on 192.0.2.1:0: Cannot assign requested address",
    )


def test_unresolvable_host_exits() -> None:
    result = run_to_exit("--ip", "127.0.0.1", "--port", "0",
                         "--api-ip", "no-such-host.invalid", "--api-port", "0")  # fmt: skip
    assert result.returncode == 1
    level, message = messages(result.stdout.splitlines())[-1]
    assert level == "error"
    assert message.startswith("API: cannot resolve 'no-such-host.invalid': ")


def test_unix_socket_in_use_exits(spawn: Callable[..., ProxyProcess], short_tmp: Path) -> None:
    public = short_tmp / "proxy.sock"
    first = spawn("--socket", str(public), "--api-socket", str(short_tmp / "api1.sock"))
    first.wait_for_line(r"info: Proxy API at ")
    result = run_to_exit("--socket", str(public), "--api-socket", str(short_tmp / "api2.sock"))
    assert result.returncode == 1
    assert messages(result.stdout.splitlines())[-1] == (
        "error",
        f"proxy: {public} is in use by another process",
    )
    assert public.exists()  # the running proxy keeps its socket


def test_path_that_is_not_a_socket_exits(short_tmp: Path) -> None:
    public = short_tmp / "proxy.sock"
    public.write_text("not a socket")
    result = run_to_exit("--socket", str(public), "--api-socket", str(short_tmp / "api.sock"))
    assert result.returncode == 1
    assert messages(result.stdout.splitlines())[-1] == (
        "error",
        f"proxy: {public} exists and is not a socket",
    )
    assert public.read_text() == "not a socket"


# --- the log on stdout --------------------------------------------------------------------------


def test_every_stdout_line_is_a_plain_chp_log_line(
    start_proxy: Callable[..., Proxy], backend: Backend, tmp_path: Path
) -> None:
    proxy = start_proxy(
        "--default-target",
        backend.url,
        "--log-level",
        "debug",
        "--pid-file",
        str(tmp_path / "p.pid"),
    )
    http_request(proxy.host, proxy.port, "GET", "/some/path", timeout=10)
    proxy.stop()
    proxy.wait_for_line(r"warn: Terminated$")
    output = proxy.output()
    assert "\x1b" not in output  # stdout is a pipe: no colour
    messages(proxy.lines)  # every line parses
    assert proxy.stderr == ""

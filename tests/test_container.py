"""The container image, checked without a container engine (CI has the Docker client, no
engine; .github/workflows/publish.yml builds and runs the image itself).

- The entrypoint's rules (CHP's `chp-docker-entrypoint`): a table of command lines, and real
  runs of `python -m hubproxy.container`.
- What the Dockerfile promises (user, ports, entrypoint, no CMD, byte-compiling, curl).
- The image's conditions, recreated: the wheel (the one .ci/run builds, else one built here) is
  installed into a fresh prefix, which is then made read-only, and run as uid/gid 65534 with
  zero-to-jupyterhub's exact flags (tests/z2jh.py). Then the checks the chart's probes and the
  hub make: `/_chp_healthz` answers 200 within 1 s, also while wrk saturates the data plane and
  with `--workers`; the API answers on an address that is not 127.0.0.1; SIGTERM exits 0 well
  inside the chart's 60 s grace period; and nothing is written anywhere, although the process
  was given a writable home, working and temporary directory.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.util import cache_from_source
from pathlib import Path

import pytest
import trustme

import z2jh
from hubproxy import __version__
from hubproxy.container import container_args
from support import TOKEN, Proxy, ProxyProcess, http_request

REPO = Path(__file__).resolve().parent.parent
NOBODY = 65534
WRITABLE_BY_ANYONE = ("/tmp", "/var/tmp", "/dev/shm")
GRACE_SECONDS = 60  # the chart's terminationGracePeriodSeconds
STOP_WITHIN = 10.0  # "well inside" it


# --- the entrypoint's argument rules ---------------------------------------------------------

DEFAULT = "--api-ip=0.0.0.0"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], [DEFAULT]),
        (["--default-target=http://hub:8081"], [DEFAULT, "--default-target=http://hub:8081"]),
        (["--default-target", "http://hub:8081"], [DEFAULT, "--default-target", "http://hub:8081"]),
        # an API address given in any form is kept, the empty one (z2jh's) included
        (["--api-ip=127.0.0.1"], ["--api-ip=127.0.0.1"]),
        (["--api-ip", "127.0.0.1"], ["--api-ip", "127.0.0.1"]),
        (["--api-ip="], ["--api-ip="]),
        (["--api-ip", ""], ["--api-ip", ""]),
        (["--port=8000", "--api-ip=::"], ["--port=8000", "--api-ip=::"]),
        # a Unix socket for the API: no address to add
        (["--api-socket=/run/api.sock"], ["--api-socket=/run/api.sock"]),
        (["--api-socket", "/run/api.sock"], ["--api-socket", "/run/api.sock"]),
        # the API port alone still gets the default address
        (["--api-port=9001"], [DEFAULT, "--api-port=9001"]),
        # read as the command line is: a value that looks like the option is a value
        (["--ip", "--api-ip"], [DEFAULT, "--ip", "--api-ip"]),
        (
            ["--default-target=http://hub/--api-ip"],
            [DEFAULT, "--default-target=http://hub/--api-ip"],
        ),
        (["--", "--api-ip=1.2.3.4"], [DEFAULT, "--", "--api-ip=1.2.3.4"]),
        # other options that merely start alike are not the API address
        (["--api-ip-x=1"], [DEFAULT, "--api-ip-x=1"]),
        (
            ["--api-port", "9001", "--api-ssl-key=k"],
            [DEFAULT, "--api-port", "9001", "--api-ssl-key=k"],
        ),
        # a missing value: the default goes first, and hubproxy reports the missing one
        (["--api-ip"], [DEFAULT, "--api-ip"]),
        (["--version"], [DEFAULT, "--version"]),
    ],
)
def test_entrypoint_arguments(argv: list[str], expected: list[str]) -> None:
    assert container_args(argv) == expected


def entrypoint(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CONFIGPROXY_")}
    return subprocess.run(
        [sys.executable, "-P", "-m", "hubproxy.container", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def start_entrypoint(args: list[str], env: dict[str, str], token: str | None) -> Proxy:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CONFIGPROXY_")}
    command = [sys.executable, "-P", "-m", "hubproxy.container"]
    return Proxy(args, {**clean, **env}, token, command=command)


def test_entrypoint_api_on_all_ipv4_interfaces_by_default() -> None:
    proxy = start_entrypoint(["--ip=127.0.0.1", "--port=0", "--api-port=0"], {}, None)
    try:
        assert proxy.api_url.startswith("http://0.0.0.0:")
        assert z2jh.listen_addresses(proxy.api_port) == {f"0.0.0.0:{proxy.api_port}"}
        status, _, _ = http_request(z2jh.POD_ADDRESS, proxy.api_port, "GET", "/api/routes")
        assert status == 200
    finally:
        assert proxy.stop() == 0


def test_entrypoint_keeps_a_given_api_address() -> None:
    args = ["--ip=127.0.0.1", "--port=0", "--api-ip=127.0.0.1", "--api-port=0"]
    proxy = start_entrypoint(args, {}, None)
    try:
        assert z2jh.listen_addresses(proxy.api_port) == {f"127.0.0.1:{proxy.api_port}"}
    finally:
        assert proxy.stop() == 0


def test_entrypoint_reads_the_token_file(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-a-secret\n")  # a Secret's file often ends with a newline
    env = {"CONFIGPROXY_AUTH_TOKEN_FILE": str(token_file)}
    args = ["--ip=127.0.0.1", "--port=0", "--api-ip=127.0.0.1", "--api-port=0"]
    proxy = start_entrypoint(args, env, "from-a-secret")
    try:
        assert proxy.api("GET", token=False)[0] == 403
        assert proxy.api("GET")[0] == 200
    finally:
        assert proxy.stop() == 0


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"CONFIGPROXY_AUTH_TOKEN": "a", "CONFIGPROXY_AUTH_TOKEN_FILE": "{file}"},
            "error: both CONFIGPROXY_AUTH_TOKEN and CONFIGPROXY_AUTH_TOKEN_FILE are set "
            "(but are exclusive)",
        ),
        (
            {"CONFIGPROXY_AUTH_TOKEN_FILE": "{missing}"},
            "error: cannot read CONFIGPROXY_AUTH_TOKEN_FILE {missing}: No such file or directory",
        ),
        (
            {"CONFIGPROXY_AUTH_TOKEN_FILE": "{empty}"},
            "error: CONFIGPROXY_AUTH_TOKEN_FILE {empty} is empty",
        ),
    ],
)
def test_entrypoint_token_file_errors(tmp_path: Path, env: dict[str, str], message: str) -> None:
    paths = {"file": tmp_path / "token", "missing": tmp_path / "missing", "empty": tmp_path / "e"}
    paths["file"].write_text("t")
    paths["empty"].write_text("\n")
    env = {k: v.format(**paths) for k, v in env.items()}
    result = entrypoint(["--port=0", "--api-port=0"], env)
    assert result.returncode == 1
    assert result.stderr.strip() == message.format(**paths)


def test_entrypoint_version() -> None:
    result = entrypoint(["--version"], {})
    assert (result.returncode, result.stdout.strip()) == (0, __version__)


# --- the Dockerfile ---------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions (keyword, arguments), continuation lines joined, per stage."""
    stages: list[list[tuple[str, str]]] = []
    logical = ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        logical += line.rstrip("\\").strip() + " "
        if line.rstrip().endswith("\\"):
            continue
        keyword, _, args = logical.strip().partition(" ")
        logical = ""
        if keyword.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword.upper(), args.strip()))
    return stages


def test_dockerfile_is_the_image_the_issue_asks_for() -> None:
    final = dockerfile_stages()[-1]
    keywords = [k for k, _ in final]
    args = {k: a for k, a in final}
    assert re.fullmatch(r"docker\.io/library/python:\$\{PYTHON_VERSION\}-slim-\w+", args["FROM"])
    assert args["USER"] == "65534"  # numeric, for runAsNonRoot
    assert args["EXPOSE"].split() == ["8000", "8001"]
    assert args["ENTRYPOINT"] == '["python", "-P", "-m", "hubproxy.container"]'
    assert "CMD" not in keywords  # `docker run IMAGE --opt ...` passes options
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")
    runs = " ".join(a for k, a in final if k == "RUN")
    assert "install -y --no-install-recommends curl" in runs
    assert "[redis]" in runs  # the Redis store, for routes across restarts and replicas
    assert "compileall" in runs and "unchecked-hash" in runs  # read-only root file system
    assert "configurable-http-proxy --version" in runs  # both commands on PATH


# --- the wheel, read-only, as uid 65534, with z2jh's flags -------------------------------------


@dataclass
class Installed:
    prefix: Path  # the read-only venv
    scratch: Path  # writable by uid 65534: its home, working and temporary directory
    secrets: Path  # readable by uid 65534: the TLS files, as a mounted Secret

    @property
    def chp(self) -> str:
        return str(self.prefix / "bin" / "configurable-http-proxy")


def _python_for_nobody() -> str | None:
    """A Python 3.11+ that uid 65534 can run (the test runner's may sit under /root)."""
    for candidate in ("/usr/bin/python3.11", "/usr/bin/python3", "/usr/local/bin/python3"):
        if not os.access(candidate, os.X_OK):
            continue
        version = subprocess.run(
            [candidate, "-c", "import sys; print(sys.version_info >= (3, 11))"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if version.stdout.strip() == "True":
            return candidate
    return None


def _wheel(workdir: Path) -> Path:
    given = os.environ.get("HUBPROXY_WHEEL")
    if given:
        return Path(given)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(workdir), str(REPO)],
        check=True,
        timeout=600,
    )
    return next(workdir.glob("hubproxy-*.whl"))


def _read_only(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath, name)
            if not path.is_symlink():
                path.chmod(path.stat().st_mode & ~0o222)
        Path(dirpath).chmod(Path(dirpath).stat().st_mode & ~0o222)


def _writable_again(root: Path) -> None:
    for dirpath, _, _ in os.walk(root):
        Path(dirpath).chmod(Path(dirpath).stat().st_mode | 0o200)


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    if os.geteuid() != 0:
        z2jh.unavailable("switching to uid 65534 needs root")
    python = _python_for_nobody()
    if python is None:
        z2jh.unavailable("no Python 3.11 that uid 65534 can run (apt-get install python3)")
    assert python is not None
    top = Path(tempfile.mkdtemp(prefix="hubproxy-image-", dir="/tmp"))
    top.chmod(0o755)  # uid 65534 must reach the prefix
    try:
        wheel = _wheel(top / "wheel")
        prefix = top / "prefix"
        subprocess.run(
            [python, "-m", "venv", "--without-pip", str(prefix)], check=True, timeout=120
        )
        # as the image installs it: with the Redis extra, byte-compiled by pip
        subprocess.run(
            [sys.executable, "-m", "pip", "--python", str(prefix / "bin" / "python"),
             "install", "-q", "--disable-pip-version-check", f"{wheel}[redis]"],
            check=True,
            timeout=600,
        )  # fmt: skip
        _read_only(prefix)
        scratch = top / "scratch"
        scratch.mkdir(mode=0o700)
        os.chown(scratch, NOBODY, NOBODY)
        secrets = top / "secrets"
        secrets.mkdir(mode=0o755)
        yield Installed(prefix, scratch, secrets)
    finally:
        _writable_again(top)
        shutil.rmtree(top, ignore_errors=True)


def test_installed_packages_are_byte_compiled(installed: Installed) -> None:
    """A read-only prefix cannot take bytecode later: every module has it from the install."""
    site = next((installed.prefix / "lib").glob("python3.*/site-packages"))
    missing = [
        str(py.relative_to(site))
        for py in site.rglob("*.py")
        if not Path(cache_from_source(str(py))).is_file()
    ]
    assert missing == []
    assert (site / "hubproxy").stat().st_mode & 0o222 == 0  # and read-only


def become_nobody() -> None:
    """In the child, before exec: uid and gid 65534, no supplementary groups (the pod's)."""
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def owned_by_nobody() -> set[str]:
    """Every file and directory uid 65534 owns where anyone may write."""
    found = set()
    for root in WRITABLE_BY_ANYONE:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                try:
                    if os.lstat(path).st_uid == NOBODY:
                        found.add(path)
                except OSError:
                    continue
    return found


def tree_state(root: Path) -> dict[str, tuple[int, int, int]]:
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            state[os.path.join(dirpath, name)] = (st.st_mtime_ns, st.st_size, st.st_mode)
    return state


def start_as_nobody(installed: Installed, args: list[str]) -> Proxy:
    env = {
        "PATH": f"{installed.prefix / 'bin'}:/usr/bin:/bin",
        "HOME": str(installed.scratch),
        "TMPDIR": str(installed.scratch),
        "CONFIGPROXY_AUTH_TOKEN": TOKEN,
    }
    proxy = Proxy(args, env, TOKEN, command=[installed.chp], preexec=become_nobody)
    status = Path(f"/proc/{proxy.proc.pid}/status").read_text()
    uid = re.search(r"^Uid:\s+(\d+)\s+(\d+)", status, re.M)
    gid = re.search(r"^Gid:\s+(\d+)\s+(\d+)", status, re.M)
    assert uid and gid and uid.groups() == gid.groups() == (str(NOBODY), str(NOBODY))
    return proxy


class FastHub:
    """The benchmark's backend (bench/backend.py: never the bottleneck) as the hub, in a
    process of its own, so that its work does not slow the test's own probes."""

    def __init__(self) -> None:
        self.port = z2jh.free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.backend", "--port", str(self.port)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 30
        while True:  # readiness: it accepts a connection (paced by waiting on the process)
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "the backend did not start"
            try:
                self.proc.wait(0.05)
            except subprocess.TimeoutExpired:
                continue
            raise AssertionError(f"the backend exited: {self.proc.communicate()[1]!r}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def hub() -> Iterator[FastHub]:
    backend = FastHub()
    yield backend
    backend.stop()


def probe_healthz(port: int, tls: bool = False) -> None:
    """The kubelet's probe: GET /_chp_healthz on the pod's address, 200 within its 1 s."""
    context = z2jh.insecure_tls() if tls else None
    status, _, body, seconds = z2jh.get(
        z2jh.POD_ADDRESS, port, "/_chp_healthz", timeout=1.0, tls=context
    )
    assert status == 200 and seconds < 1.0, (status, body, seconds)


def check_api_from_the_pod_network(api_port: int) -> None:
    """The hub pod's view: the API listens on every interface and answers there."""
    wildcard = {f"*:{api_port}", f"0.0.0.0:{api_port}", f"[::]:{api_port}"}
    assert z2jh.listen_addresses(api_port) <= wildcard
    for address in z2jh.pod_addresses():
        status, _, body, _ = z2jh.get(
            address, api_port, "/api/routes", {"Authorization": f"token {TOKEN}"}
        )
        assert status == 200 and b'"/"' in body, (address, status, body)


def saturate_and_probe(port: int, seconds: int = 3) -> tuple[int, int]:
    """wrk saturates the data plane through the pod's address while the health check is
    probed; (requests wrk made, probes that answered within 1 s)."""
    wrk = subprocess.Popen(
        ["wrk", "-t1", "-c50", f"-d{seconds}s", f"http://{z2jh.POD_ADDRESS}:{port}/"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    probes = 0
    try:
        for _ in range(seconds * 20):  # bounded; paced by waiting on wrk itself
            try:
                wrk.wait(0.05)
                break
            except subprocess.TimeoutExpired:
                probe_healthz(port)
                probes += 1
        out, _ = wrk.communicate(timeout=seconds + 30)
    finally:
        if wrk.poll() is None:
            wrk.kill()
            wrk.wait()
    made = re.search(r"(\d+) requests in", out)
    assert made and "Non-2xx" not in out and "Socket errors" not in out, out
    return int(made.group(1)), probes


def stop_in_time(proxy: ProxyProcess) -> float:
    """SIGTERM, as the kubelet sends it; the exit code must be 0, well inside the grace."""
    started = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)
    code = proxy.proc.wait(GRACE_SECONDS)
    elapsed = time.monotonic() - started
    assert code == 0 and elapsed < STOP_WITHIN, (code, elapsed, proxy.output())
    proxy.stop()
    return elapsed


def run_checked(installed: Installed, body: Callable[[], None]) -> None:
    """`body` with the write checks around it: nothing new owned by 65534 where anyone may
    write, the prefix unchanged, the scratch directory (its home, cwd, TMPDIR) still empty."""
    before_owned = owned_by_nobody()
    before_prefix = tree_state(installed.prefix)
    body()
    assert owned_by_nobody() - before_owned == set()
    assert tree_state(installed.prefix) == before_prefix
    assert list(installed.scratch.iterdir()) == []


@pytest.mark.parametrize("workers", [1, 2])
def test_z2jh_http_read_only_as_nobody(installed: Installed, hub: FastHub, workers: int) -> None:
    if shutil.which("wrk") is None:
        z2jh.unavailable("wrk is not installed (apt-get install wrk)")
    extra = ["--workers", str(workers)] if workers > 1 else []

    def body() -> None:
        proxy = start_as_nobody(installed, [*z2jh.http_flags(hub.url, 0, 0), *extra])
        try:
            if workers > 1:
                proxy.wait_for_line(rf"info: Serving with {workers} worker processes")
            for _ in range(5):
                probe_healthz(proxy.port)
            check_api_from_the_pod_network(proxy.api_port)
            status, _, body, _ = z2jh.get(z2jh.POD_ADDRESS, proxy.port, "/hub/home")
            assert (status, body) == (200, b"Hello, World!")  # through to the hub
            requests, probes = saturate_and_probe(proxy.port)
            assert requests > 1000 and probes >= 3, (requests, probes)
            probe_healthz(proxy.port)
            stop_in_time(proxy)
        finally:
            proxy.stop()
        assert "Traceback" not in proxy.output() and proxy.stderr == ""

    run_checked(installed, body)


def test_z2jh_https_read_only_as_nobody(installed: Installed, hub: FastHub) -> None:
    """`proxy.https.type: secret`: TLS files from a read-only mount, the redirect port."""
    ca = trustme.CA()
    leaf = ca.issue_cert("hub.example.org", "localhost", "127.0.0.2")
    key, cert = installed.secrets / "tls.key", installed.secrets / "tls.crt"
    leaf.private_key_pem.write_to_path(str(key))
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    for path in (key, cert):
        path.chmod(0o644)  # a Secret's files: readable by the pod's user

    def body() -> None:
        flags = z2jh.https_flags(hub.url, 0, 0, 0, str(key), str(cert))
        proxy = start_as_nobody(installed, flags)
        try:
            match = proxy.wait_for_line(r"info: Added HTTP to HTTPS redirection from (\d+) to")
            redirect = int(match.group(1))
            for _ in range(5):
                probe_healthz(proxy.port, tls=True)
            check_api_from_the_pod_network(proxy.api_port)
            assert z2jh.listen_addresses(redirect) <= {f"*:{redirect}", f"[::]:{redirect}"}
            status, headers, _, _ = z2jh.get(
                z2jh.POD_ADDRESS, redirect, "/user/x?y=1", {"Host": "hub.example.org"}
            )
            assert (status, headers["Location"]) == (301, "https://hub.example.org/user/x?y=1")
            stop_in_time(proxy)
        finally:
            proxy.stop()
        assert "Traceback" not in proxy.output() and proxy.stderr == ""

    run_checked(installed, body)

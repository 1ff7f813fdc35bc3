"""Processes the harness starts, and what /proc says about them and the machine.

Only processes started here are ever signalled, by PID (and their own descendants, checked by
start time so a recycled PID is never hit).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
HOST = "127.0.0.1"


class StartError(RuntimeError):
    """A process did not become ready."""


def free_port() -> int:
    """A port the OS just handed out (bind to 0, read, close); racy but fine for a bench."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _stat_fields(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2 :].split()  # fields from 3 (state) on


def start_time(pid: int) -> int:
    return int(_stat_fields(pid)[19])


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads, living and dead), plus cutime + cstime:
    the CPU of its children that exited and were reaped (socat forks one per connection; a
    proxy's worker may be restarted). A child still alive (or a zombie) is not in cutime yet and
    is counted by ``tree`` instead, so nothing is counted twice."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) seconds of ``cpu_seconds``: utime + cutime, stime + cstime."""
    f = _stat_fields(pid)
    return (int(f[11]) + int(f[13])) / CLK_TCK, (int(f[12]) + int(f[14])) / CLK_TCK


def children(pid: int) -> list[int]:
    out: list[int] = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(_stat_fields(int(entry.name))[1]) == pid:
                    out.append(int(entry.name))
    return out


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants alive now."""
    out, todo = [], [pid]
    while todo:
        cur = todo.pop()
        out.append(cur)
        todo.extend(children(cur))
    return out


def tree_cpu_seconds(pid: int) -> float:
    return sum(tree_cpu_split(pid))


def tree_cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid``'s process tree, reaped children included."""
    user = system = 0.0
    for p in tree(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            u, s = cpu_split(p)
            user, system = user + u, system + s
    return user, system


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def tree_mib(pid: int, field: str = "VmRSS") -> float:
    """Sum of ``field`` (VmRSS or VmHWM) over the process tree, in MiB."""
    total = 0
    for p in tree(pid):
        with contextlib.suppress(OSError, ValueError):
            total += status_kib(p, field)
    return total / 1024


def _tcp_sockets() -> dict[int, tuple[int, int, str]]:
    """inode -> (local port, remote port, state) for every TCP socket, from /proc/net/tcp{,6}."""
    out: dict[int, tuple[int, int, str]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                inode = int(f[9])
                if inode:
                    local, remote = f[1].rsplit(":", 1)[1], f[2].rsplit(":", 1)[1]
                    out[inode] = (int(local, 16), int(remote, 16), f[3])
    return out


def tree_fds(pid: int, upstream_port: int) -> dict[str, int]:
    """Open fds of ``pid``'s process tree: ``total``, and of them TCP ``listen`` sockets,
    ``upstream`` connections (to ``upstream_port``: pooled keep-alive or WebSocket tunnels),
    ``client`` connections (any other TCP: clients and API callers), ``other`` (files, pipes,
    epoll, eventfd, unix sockets)."""
    sockets: list[int] = []
    total = 0
    for p in tree(pid):
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{p}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(fd.path)
                    total += 1
                    if link.startswith("socket:["):
                        sockets.append(int(link[8:-1]))
    counts = {"total": total, "listen": 0, "upstream": 0, "client": 0, "other": 0}
    tcp = _tcp_sockets() if sockets else {}
    for inode in sockets:
        _, remote, state = tcp.get(inode, (0, 0, ""))
        if not state:
            counts["other"] += 1
        elif state == "0A":
            counts["listen"] += 1
        elif remote == upstream_port:
            counts["upstream"] += 1
        else:
            counts["client"] += 1
    counts["other"] += total - len(sockets)
    return counts


@dataclass(frozen=True)
class CpuTimes:
    """One line of /proc/stat, in seconds."""

    work: float  # user + nice + system: what processes ran
    busy: float  # everything but idle and iowait (includes irq, softirq, steal)
    steal: float
    total: float


def machine_cpu() -> dict[str, CpuTimes]:
    """``cpu`` (all cores) and ``cpuN`` lines of /proc/stat."""
    out: dict[str, CpuTimes] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if not line.startswith("cpu"):
            break
        name, *vals = line.split()
        v = [int(x) / CLK_TCK for x in vals[:8]]
        out[name] = CpuTimes(
            work=v[0] + v[1] + v[2], busy=sum(v) - v[3] - v[4], steal=v[7], total=sum(v)
        )
    return out


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> float:
    """Poll-connect until ``port`` accepts; return seconds waited. Fails fast if proc exits."""
    start = time.perf_counter()
    deadline = start + timeout
    while True:
        if proc.poll() is not None:
            raise StartError(f"exited with code {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return time.perf_counter() - start
        except OSError:
            if time.perf_counter() > deadline:
                raise StartError(f"not listening on {port} after {timeout:.0f} s") from None
            time.sleep(0.02)


class Managed:
    """A child process pinned with ``taskset`` (one core, or a list such as "0,1"); output goes
    to a log file."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        core: int | str,
        log: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen(
            ["taskset", "-c", str(core), *argv],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # a Ctrl-C to the harness does not hit it before we stop it
        )
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM by PID, SIGKILL after ``grace``; then any leftover descendants by PID."""
        descendants: list[tuple[int, int]] = []
        if self.alive():
            for p in tree(self.pid)[1:]:
                with contextlib.suppress(OSError, ValueError, IndexError):
                    descendants.append((p, start_time(p)))
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(grace)
        for p, started in descendants:
            with contextlib.suppress(OSError, ValueError, IndexError):
                if start_time(p) == started:
                    os.kill(p, signal.SIGKILL)
        self._log_file.close()

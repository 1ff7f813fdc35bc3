"""Listening sockets for every listener, bound before any server starts.

Binding ourselves (rather than letting each server bind) gives one place for CHP's address rules
(`''`/`*` = all interfaces, `::` dual-stack, host names resolved to their first address), for
OS-assigned ports (`--port 0`, used by tests), and for a bind failure that stops the process
with a clear message instead of leaving it running without the listener, as CHP does.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import stat
import urllib.parse
from dataclasses import dataclass

BACKLOG = 511  # Node's default, which CHP inherits


class ListenError(Exception):
    """A listener could not be set up; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Bound:
    sock: socket.socket
    unix_path: str | None = None
    owns_path: bool = True  # the socket file is ours to remove when we stop for good

    @classmethod
    def inherited(cls, sock: socket.socket, owns_path: bool) -> Bound:
        """A listening socket opened by another process (systemd's, which keeps its socket
        files; or the hubproxy we take over from, whose files become ours)."""
        if sock.family == socket.AF_UNIX:
            path = sock.getsockname()
            path = path.decode() if isinstance(path, bytes) else path
            return cls(sock, unix_path=path or None, owns_path=owns_path)
        return cls(sock)

    def url(self, scheme: str = "http") -> str:
        """Where clients reach this listener (with the OS-assigned port filled in)."""
        if self.unix_path is not None:
            return f"{scheme}+unix://{urllib.parse.quote(self.unix_path, safe='')}"
        host, port = self.sock.getsockname()[:2]
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{port}"

    @property
    def port(self) -> int | None:
        if self.unix_path is not None:
            return None
        return int(self.sock.getsockname()[1])


def _has_ipv6() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def _resolve(host: str | None, port: int) -> tuple[socket.AddressFamily, str, bool]:
    """(family, address, dual_stack) for a CHP-style bind address."""
    if host in (None, "", "*"):
        return (socket.AF_INET6, "::", True) if _has_ipv6() else (socket.AF_INET, "0.0.0.0", False)
    assert host is not None
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address = ipaddress.ip_address(literal)
    except ValueError:
        pass
    else:
        if address.version == 6:
            return socket.AF_INET6, literal, literal == "::"
        return socket.AF_INET, literal, False
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ListenError(f"cannot resolve {host!r}: {e.strerror}") from e
    family, _, _, _, sockaddr = infos[0]
    return socket.AddressFamily(family), str(sockaddr[0]), False


def bind_tcp(host: str | None, port: int, what: str, reuse_port: bool = False) -> Bound:
    try:
        family, address, dual_stack = _resolve(host, port)
    except ListenError as e:
        raise ListenError(f"{what}: {e}") from e
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
        sock.bind((address, port))
        sock.listen(BACKLOG)
    except OSError as e:
        sock.close()
        shown = f"[{address}]" if ":" in address else address
        raise ListenError(f"{what}: cannot listen on {shown}:{port}: {e.strerror}") from e
    sock.setblocking(False)
    return Bound(sock)


def bind_tcp_group(host: str | None, port: int, what: str, count: int) -> list[Bound]:
    """`count` listening sockets on one address (SO_REUSEPORT): the kernel spreads incoming
    connections over their accept queues, one per worker process. Port 0: the OS picks the
    first socket's port, the others take the same."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ListenError(f"{what}: --workers needs SO_REUSEPORT, which this system lacks")
    if port:
        # Another process's SO_REUSEPORT listener would let us join its group and share its
        # connections without a word: a plain bind first fails on any listener, as CHP's does.
        bind_tcp(host, port, what).sock.close()
    group = [bind_tcp(host, port, what, reuse_port=True)]
    try:
        # the first socket's address, not the name again (a name may resolve differently)
        host, port = group[0].sock.getsockname()[:2]
        while len(group) < count:
            group.append(bind_tcp(host, port, what, reuse_port=True))
    except ListenError:
        for bound in group:
            bound.sock.close()
        raise
    return group


def bind_unix(path: str, what: str) -> Bound:
    """A Unix socket listener; a stale socket file (nothing listening) is replaced."""
    with contextlib.suppress(FileNotFoundError):
        mode = os.lstat(path).st_mode
        if not stat.S_ISSOCK(mode):
            raise ListenError(f"{what}: {path} exists and is not a socket")
        if _unix_socket_in_use(path):
            raise ListenError(f"{what}: {path} is in use by another process")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)  # permissions follow the process umask, as JupyterHub expects
        sock.listen(BACKLOG)
    except OSError as e:
        sock.close()
        raise ListenError(f"{what}: cannot listen on {path}: {e.strerror}") from e
    sock.setblocking(False)
    return Bound(sock, unix_path=path)


def _unix_socket_in_use(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError as e:
            if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return False
            raise ListenError(f"cannot check socket {path}: {e.strerror}") from e
    return True


def remove_unix_socket(bound: Bound) -> None:
    if bound.unix_path is not None and bound.owns_path:
        with contextlib.suppress(OSError):
            os.unlink(bound.unix_path)

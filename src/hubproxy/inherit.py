"""Listening sockets handed to us already open, instead of bound: by systemd (socket activation)
or by the hubproxy process we take over from (hubproxy.handover).

Listening sockets that outlive the process are what make a restart invisible: while no process
accepts, connection attempts wait in the socket's queue instead of being refused.

systemd's rules (sd_listen_fds(3)): the sockets are file descriptors 3, 4, ... (`LISTEN_FDS` of
them), meant for us only if `LISTEN_PID` is our pid; `LISTEN_FDNAMES` names them, colon-separated,
from each socket unit's `FileDescriptorName=`. We use the names `public`, `api`, `metrics` and
`redirect`; a single unnamed socket (systemd names it after its unit) is the public one. Besides
sockets, systemd passes back what we left in its file descriptor store: `routes` (hubproxy.fdstore).
The variables are removed once read, so that no process we start takes them for its own.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START
NAMES = ("public", "api", "metrics", "redirect")
FILE_NAMES = ("routes",)  # from the file descriptor store: not sockets


@dataclass
class Passed:
    """What systemd passed us: listening sockets, and other files, by name."""

    sockets: dict[str, socket.socket] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)


class InheritError(Exception):
    """The inherited sockets cannot be used; the message says which and why."""


def adopt(fd: int, name: str) -> socket.socket:
    """The listening stream socket on `fd` (made close-on-exec and non-blocking)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise InheritError(f"{name}: file descriptor {fd} is not a socket ({e.strerror})") from e
    try:
        if sock.type != socket.SOCK_STREAM:
            raise InheritError(f"{name}: file descriptor {fd} is not a stream socket")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise InheritError(f"{name}: file descriptor {fd} is not listening")
        if sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
            raise InheritError(f"{name}: file descriptor {fd} is no TCP or Unix socket")
    except BaseException:
        sock.detach()  # not ours to close: the caller reports it
        raise
    sock.set_inheritable(False)
    sock.setblocking(False)
    return sock


def from_systemd(environ: MutableMapping[str, str] | None = None) -> Passed:
    """The sockets and files systemd passed us, by name (none when it passed none, or passed
    them to another process); raises InheritError."""
    env = os.environ if environ is None else environ
    pid = env.pop("LISTEN_PID", None)
    count = env.pop("LISTEN_FDS", None)
    names = env.pop("LISTEN_FDNAMES", None)
    if pid is None or count is None:
        return Passed()
    if not pid.isdigit() or int(pid) != os.getpid():
        return Passed()  # meant for another process (our parent's, as systemd's rules say)
    if not count.isdigit() or int(count) < 1:
        raise InheritError(f"LISTEN_FDS={count!r}: expected a number of sockets")
    fds = range(LISTEN_FDS_START, LISTEN_FDS_START + int(count))
    return adopt_named(fds, names.split(":") if names is not None else None)


def adopt_named(fds: range | list[int], names: list[str] | None) -> Passed:
    if names is not None and len(names) != len(fds):
        raise InheritError(
            f"LISTEN_FDNAMES names {len(names)} sockets, LISTEN_FDS passes {len(fds)}"
        )
    if names is None or (len(fds) == 1 and names[0] not in (*NAMES, *FILE_NAMES)):
        names = ["public"] * len(fds)
    by_name: dict[str, int] = {}
    files: dict[str, int] = {}
    for fd, name in zip(fds, names, strict=True):
        if name in FILE_NAMES:
            if name in files:  # systemd passes the newest first (we store one only)
                os.close(fd)
            else:
                files[name] = fd
            continue
        if name not in NAMES:
            raise InheritError(
                f"socket named {name!r} (fd {fd}): name each with FileDescriptorName= "
                f"{', '.join(NAMES)}"
            )
        if name in by_name:
            raise InheritError(f"two sockets named {name!r} (fds {by_name[name]} and {fd})")
        by_name[name] = fd
    adopted: dict[str, socket.socket] = {}
    try:
        for name, fd in by_name.items():
            adopted[name] = adopt(fd, name)
    except InheritError:
        for sock in adopted.values():
            sock.detach()
        raise
    return Passed(adopted, files)


def describe(sockets: Mapping[str, socket.socket]) -> str:
    """`public on 127.0.0.1:8000, api on /run/hubproxy-api.sock`, for the log."""
    return ", ".join(f"{name} on {_address(sock)}" for name, sock in sockets.items())


def _address(sock: socket.socket) -> str:
    address = sock.getsockname()
    if isinstance(address, str | bytes):
        return address.decode() if isinstance(address, bytes) else address or "(unnamed)"
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

"""Plays systemd's part in socket activation, for tests: `python systemd_like.py NAMES FD... --
HUBPROXY-ARGS` puts the listening sockets FD... at descriptors 3, 4, ... (inheritable), sets
LISTEN_PID to its own pid, LISTEN_FDS and LISTEN_FDNAMES (NAMES, colon-separated; `-`: unset),
then executes `python -m hubproxy HUBPROXY-ARGS` in place: the same pid, as systemd's exec.

`ServiceManager` plays the rest of its part, in the test's process: the notify socket
(sd_notify(3)) and the file descriptor store, which keeps what the service stores and passes it
back at the next start, as systemd does."""

from __future__ import annotations

import array
import fcntl
import os
import select
import socket
import struct
import sys
import time
from dataclasses import dataclass, field

FIRST = 3  # SD_LISTEN_FDS_START


def main(argv: list[str]) -> None:
    end = argv.index("--")
    names, fds, args = argv[0], [int(fd) for fd in argv[1:end]], argv[end + 1 :]
    # out of the way of 3, 4, ... first: a passed descriptor may be one of them
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]
    for fd in fds:
        os.close(fd)
    for index, fd in enumerate(high):
        os.dup2(fd, FIRST + index)  # inheritable
        os.close(fd)
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.environ["LISTEN_FDS"] = str(len(fds))
    if names != "-":
        os.environ["LISTEN_FDNAMES"] = names
    os.execv(sys.executable, [sys.executable, "-m", "hubproxy", *args])


_UCRED = struct.Struct("iII")  # pid, uid, gid


@dataclass
class Message:
    pid: int
    fields: dict[str, str]
    fds: list[int] = field(default_factory=list)


class ServiceManager:
    """The notify socket and file descriptor store of one service. Messages are taken from the
    socket when asked for (`take`); as systemd with `NotifyAccess=main`, only those of the main
    process count, the others are kept in `refused`."""

    def __init__(self, path: str, store_max: int = 1) -> None:
        self.path = path
        self.store_max = store_max
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.setblocking(False)
        self.main_pid = 0
        self.stored: list[tuple[str, int]] = []  # (name, fd), in the order stored
        self.received: list[Message] = []
        self.refused: list[Message] = []

    def environment(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.path, "FDSTORE": str(self.store_max)}

    def take(self, timeout: float = 0.0) -> list[Message]:
        """The messages waiting (waiting up to `timeout` for a first one), applied."""
        taken: list[Message] = []
        deadline = time.monotonic() + timeout
        while True:
            wait = max(0.0, deadline - time.monotonic()) if not taken else 0.0
            if not select.select([self.sock], [], [], wait)[0]:
                return taken
            message = self._receive()
            taken.append(message)
            if message.pid != self.main_pid:
                self.refused.append(message)
                for fd in message.fds:
                    os.close(fd)
                continue
            self.received.append(message)
            self._apply(message)

    def wait_for(self, key: str, timeout: float = 30.0) -> Message:
        """The next message of the main process that sets `key`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.take(deadline - time.monotonic()):
                if message.pid == self.main_pid and key in message.fields:
                    return message
        raise TimeoutError(f"no {key} from pid {self.main_pid} in {timeout} s")

    def _receive(self) -> Message:
        fds = array.array("i")
        data, ancillary, _flags, _address = self.sock.recvmsg(
            65536, socket.CMSG_SPACE(16 * fds.itemsize) + socket.CMSG_SPACE(_UCRED.size)
        )
        pid = 0
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _UCRED.unpack(payload[: _UCRED.size])[0]
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        return Message(pid, fields, list(fds))

    def passed(self) -> list[tuple[str, int]]:
        """What the next start gets, in systemd's order: the newest first."""
        self.take()  # what the last process said before it ended
        return self.stored[::-1]

    def _apply(self, message: Message) -> None:
        name = message.fields.get("FDNAME", "stored")
        if message.fields.get("FDSTOREREMOVE") == "1":
            for stored_name, fd in [s for s in self.stored if s[0] == name]:
                os.close(fd)
                self.stored.remove((stored_name, fd))
        if message.fields.get("FDSTORE") == "1":
            for fd in message.fds:
                if len(self.stored) < self.store_max:
                    self.stored.append((name, fd))
                else:  # systemd refuses what does not fit
                    self.refused.append(message)
                    os.close(fd)
        elif message.fds:
            for fd in message.fds:
                os.close(fd)

    def content(self, name: str = "routes") -> bytes:
        """What the stored file named `name` holds now."""
        fds = [fd for stored_name, fd in self.stored if stored_name == name]
        assert len(fds) == 1, f"{len(fds)} files named {name!r} stored"
        return os.pread(fds[0], 64 << 20, 0)

    def close(self) -> None:
        for _name, fd in self.stored:
            os.close(fd)
        self.stored.clear()
        self.sock.close()


if __name__ == "__main__":
    main(sys.argv[1:])

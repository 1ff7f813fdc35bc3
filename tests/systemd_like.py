"""Plays systemd's part in socket activation, for tests: `python systemd_like.py NAMES FD... --
HUBPROXY-ARGS` puts the listening sockets FD... at descriptors 3, 4, ... (inheritable), sets
LISTEN_PID to its own pid, LISTEN_FDS and LISTEN_FDNAMES (NAMES, colon-separated; `-`: unset),
then executes `python -m hubproxy HUBPROXY-ARGS` in place: the same pid, as systemd's exec."""

from __future__ import annotations

import fcntl
import os
import sys

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


if __name__ == "__main__":
    main(sys.argv[1:])

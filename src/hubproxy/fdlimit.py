"""File descriptors: as many as the system allows, and a warning before they run out.

Every client connection, target connection and WebSocket half holds a descriptor. Past the
soft limit (`ulimit -n`; 1,024 under systemd and many shells), accepting fails with EMFILE, and
libuv then accepts each waiting connection and closes it at once: users see connections reset,
and nothing reaches the log. So the soft limit is raised to the hard one at start (as Go's
runtime does), and the sweeper warns, at most once a minute, when the connections it knows of
come near it.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("hubproxy")

# descriptors that are not connections: listeners, the event loop's, logs, a store's, the API's
OTHERS = 32
WARN_AT = 0.9  # of the soft limit
WARN_EVERY = 60.0  # seconds between two warnings
NR_OPEN = 1 << 20  # Linux's default ceiling (fs.nr_open) for a process's limit
LOW = 4096  # a limit below this is said at start: a few thousand connections, about half users


def raise_soft_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (at most NR_OPEN); the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = NR_OPEN if hard == resource.RLIM_INFINITY else min(hard, NR_OPEN)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as e:  # e.g. above fs.nr_open
            log.warning("Cannot raise the file descriptor limit from %d to %d: %s", soft, wanted, e)
    if soft != resource.RLIM_INFINITY and soft < LOW:
        log.warning(
            "Only %d file descriptors allowed (hard limit %d): each client connection and each "
            "target connection takes one. Raise the limit (ulimit -n, LimitNOFILE=)",
            soft,
            hard,
        )
    else:
        log.debug("File descriptors: up to %d", soft)
    return soft


class FdWatch:
    """Warns when the connections in use come near the descriptor limit (the sweeper's call)."""

    def __init__(self, limit: int | None = None) -> None:
        if limit is None:
            limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.limit = limit
        self.warned_at: float | None = None

    def check(self, connections: int, now: float) -> bool:
        """`connections`: client and target connections open now; True if it warned."""
        in_use = connections + OTHERS
        if self.limit == resource.RLIM_INFINITY or in_use < self.limit * WARN_AT:
            return False
        if self.warned_at is not None and now - self.warned_at < WARN_EVERY:
            return False
        self.warned_at = now
        log.warning(
            "About %d of %d file descriptors in use (%d connections): past the limit, new "
            "connections are closed as soon as they are accepted. Raise the limit (ulimit -n, "
            "LimitNOFILE= in a systemd unit)",
            in_use,
            self.limit,
            connections,
        )
        return True

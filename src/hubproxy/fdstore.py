"""What the service manager (systemd) keeps for us across a restart: the memory store's routes,
in its file descriptor store (https://systemd.io/FILE_DESCRIPTOR_STORE/); and the readiness
notice of `Type=notify`.

With `FileDescriptorStoreMax=` set, systemd gives the service a notify socket
(`NOTIFY_SOCKET`, sd_notify(3)) and says how many descriptors it keeps (`FDSTORE`, systemd 254+).
We then keep the route table, with each route's last activity, in a memory file (memfd) that
systemd holds a duplicate of. On the next start of the service (`systemctl restart`, or
`Restart=` after a crash) systemd passes it back among the listening sockets, named `routes`,
and the routes are there before the first request, where CHP would have none until the hub's
next route check.

The snapshot is rewritten after a change (at most once a second: a hub adding routes one by
one at its start costs one write a second), every ACTIVITY_SECONDS for the activity, and at a
stop. Its header carries the length and a CRC of the JSON, so that a snapshot cut short by a
crash in the middle of a write is refused (the routes are then lost, as without the store)
rather than read wrong. The other stores keep their routes themselves, so a snapshot passed to
a process with such a store is dropped from systemd's store.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import struct
import zlib
from collections.abc import Mapping, MutableMapping
from typing import Any

from hubproxy.store.base import RouteData, decode_row, encode_row
from hubproxy.store.memory import MemoryStore

log = logging.getLogger("hubproxy")

NAME = "routes"  # FDNAME=, and LISTEN_FDNAMES' name for it when systemd passes it back
MIN_INTERVAL = 1.0
# activity alone: a crash loses at most this much of it (the hub keeps the newer time it has)
ACTIVITY_SECONDS = 300.0
_MAGIC = b"hubproxy-routes1"
_HEADER = struct.Struct("!16sQI")  # magic, length of the JSON, its CRC-32


class SnapshotError(Exception):
    """The passed file holds no route table we wrote whole; the message says why."""


def encode(routes: Mapping[str, RouteData]) -> bytes:
    return Encoder().encode(routes)


class Encoder:
    """Snapshots of one table, each route's row encoded again only when its data or its last
    activity is another object: the memory store replaces a route's data on a change and its
    `last_activity` on activity, so a table of 10,000 routes with a few changed costs a few
    milliseconds on the event loop, not 50."""

    def __init__(self) -> None:
        self._rows: dict[str, tuple[RouteData, object, bytes]] = {}

    def encode(self, routes: Mapping[str, RouteData]) -> bytes:
        rows: dict[str, tuple[RouteData, object, bytes]] = {}
        for key, data in routes.items():
            activity = data.get("last_activity")
            row = self._rows.get(key)
            if row is None or row[0] is not data or row[1] is not activity:
                text = json.dumps([key, *encode_row(data)], separators=(",", ":"))
                row = (data, activity, text.encode())
            rows[key] = row
        self._rows = rows
        body = b"[" + b",".join(row[2] for row in rows.values()) + b"]"
        return _HEADER.pack(_MAGIC, len(body), zlib.crc32(body)) + body


def decode(blob: bytes) -> dict[str, RouteData]:
    if len(blob) < _HEADER.size:
        raise SnapshotError(f"{len(blob)} bytes, shorter than a header")
    magic, length, crc = _HEADER.unpack_from(blob)
    if magic != _MAGIC:
        raise SnapshotError("not a route table written by hubproxy")
    body = blob[_HEADER.size : _HEADER.size + length]
    if len(body) != length or zlib.crc32(body) != crc:
        raise SnapshotError("cut short or torn (the process ended while writing it?)")
    try:
        return {key: decode_row(text, micros) for key, text, micros in json.loads(body)}
    except (ValueError, TypeError) as e:
        raise SnapshotError(f"unreadable rows: {e}") from e


class Notifier:
    """The service manager's notify socket: one datagram a message, descriptors attached."""

    def __init__(self, address: str) -> None:
        # `@name` is a socket in the abstract namespace (sd_notify(3))
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # a manager that does not read must not stall the event loop: such a send fails
        self._sock.setblocking(False)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier | None:
        address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET")
        return cls(address) if address else None

    def send(self, text: str, fds: list[int] | None = None) -> None:
        """Raises OSError (the service manager is gone, or refuses the message)."""
        # (not socket.send_fds: it drops the address)
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self._sock.sendmsg([text.encode()], rights, 0, self._address)

    def close(self) -> None:
        self._sock.close()


def store_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether systemd keeps descriptors for us: `FDSTORE` (set by systemd 254 and later to
    FileDescriptorStoreMax=; older versions need `Environment=FDSTORE=1` in the unit)."""
    value = (os.environ if environ is None else environ).get("FDSTORE", "")
    return value.isdigit() and int(value) > 0


class RouteKeeper:
    """Keeps the memory store's routes in a memory file that systemd holds too. It follows the
    store's change feed (ChangeListener) to know when to write."""

    def __init__(self, fd: int, store: MemoryStore) -> None:
        self._fd = fd
        self._store = store
        self._encoder = Encoder()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self.writes = 0

    # ChangeListener: any change of the table calls for a new snapshot
    def route_set(self, key: str, data: Mapping[str, Any]) -> None:
        self._changed.set()

    def route_removed(self, key: str) -> None:
        self._changed.set()

    def routes_reset(self, routes: Mapping[str, Mapping[str, Any]]) -> None:
        self._changed.set()

    def start(self) -> None:
        self._store.watch(self)
        self._task = asyncio.get_running_loop().create_task(self._keep())

    async def stop(self, *, last_write: bool) -> None:
        """Stop following; `last_write`: write the table as it is now (a stop, after the last
        activity reached the store) rather than leave the last snapshot (a hand-over: the new
        process keeps it from now on)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if last_write:
            await self.write()
        os.close(self._fd)

    async def _keep(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), ACTIVITY_SECONDS)
            self._changed.clear()
            await self.write()
            await asyncio.sleep(MIN_INTERVAL)

    async def write(self) -> None:
        blob = self._encoder.encode(await self._store.get_all())
        try:
            # whole, then cut to length: a crash in between leaves a header that does not
            # match its body, which the next start refuses
            written = os.pwrite(self._fd, blob, 0)
            if written != len(blob):
                raise OSError(f"{written} of {len(blob)} bytes written")
            os.ftruncate(self._fd, len(blob))
        except OSError as e:
            if not self._failing:
                log.warning("Cannot keep the routes for a restart: %s", e)
            self._failing = True
            return
        if self._failing:
            log.info("Keeping the routes for a restart again")
        self._failing = False
        self.writes += 1


def _read_whole(fd: int) -> bytes:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise SnapshotError(f"file descriptor {fd} is no memory file")
    chunks = []
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


async def keep_routes(
    store: object,
    passed: int | None,
    notifier: Notifier | None,
    environ: MutableMapping[str, str] | None = None,
) -> RouteKeeper | None:
    """Restore the routes systemd kept (`passed`: the descriptor named `routes`, if any) into
    the memory store, then keep them from now on; None when there is nothing to keep (another
    store, or no descriptor store). Never raises: the proxy starts without the routes."""
    if notifier is None or not store_enabled(environ) or not isinstance(store, MemoryStore):
        if passed is not None:
            os.close(passed)
            if notifier is not None:
                # the other stores keep the routes themselves: no stale copy waits in systemd
                _send(notifier, f"FDSTOREREMOVE=1\nFDNAME={NAME}")
        return None
    fd = passed
    if fd is not None:
        os.set_inheritable(fd, False)
        try:
            routes = decode(_read_whole(fd))
        except (OSError, SnapshotError) as e:
            log.warning("Routes kept by the service manager unusable, starting without: %s", e)
        else:
            for key, data in routes.items():
                await store.add(key, data)
            log.info("Restored %d routes kept by the service manager", len(routes))
    if fd is None or not stat.S_ISREG(os.fstat(fd).st_mode):
        if fd is not None:
            os.close(fd)
        fd = os.memfd_create("hubproxy-routes", os.MFD_CLOEXEC)
        # any older one goes first (after an upgrade in place, we did not get it passed)
        sent = _send(notifier, f"FDSTOREREMOVE=1\nFDNAME={NAME}") and _send(
            notifier, f"FDSTORE=1\nFDNAME={NAME}", [fd]
        )
        if not sent:
            os.close(fd)
            return None
    keeper = RouteKeeper(fd, store)
    keeper.start()
    return keeper


def _send(notifier: Notifier, text: str, fds: list[int] | None = None) -> bool:
    try:
        notifier.send(text, fds)
    except OSError as e:
        log.warning("Cannot tell the service manager %r: %s", text.split("\n")[0], e)
        return False
    return True


def notify_ready(notifier: Notifier | None) -> None:
    """`READY=1`, for `Type=notify`: the proxy serves."""
    if notifier is not None:
        _send(notifier, "READY=1")

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
from datetime import datetime
from typing import Any

from hubproxy.store.base import RouteData, decode_row, encode_row, to_micros
from hubproxy.store.memory import MemoryStore

log = logging.getLogger("hubproxy")

NAME = "routes"  # FDNAME=, and LISTEN_FDNAMES' name for it when systemd passes it back
MIN_INTERVAL = 1.0
NOTIFY_SECONDS = 10.0  # how long a full notify socket is waited on
MAX_SNAPSHOT = 1 << 30
# activity alone: a crash loses at most this much of it (the hub keeps the newer time it has)
ACTIVITY_SECONDS = 300.0
_MAGIC = b"hubproxy-routes1"
_HEADER = struct.Struct("!16sQI")  # magic, length of the JSON, its CRC-32


class SnapshotError(Exception):
    """The passed file holds no route table we wrote whole; the message says why."""


def encode(routes: Mapping[str, RouteData]) -> bytes:
    return Encoder().encode(routes)


def decode(blob: bytes) -> dict[str, RouteData]:
    """The routes of a snapshot, each row checked: what we take back is a table we wrote."""
    if len(blob) < _HEADER.size:
        raise SnapshotError(f"{len(blob)} bytes, shorter than a header")
    magic, length, crc = _HEADER.unpack_from(blob)
    if magic != _MAGIC:
        raise SnapshotError("not a route table written by hubproxy")
    body = blob[_HEADER.size : _HEADER.size + length]
    if len(body) != length or zlib.crc32(body) != crc:
        raise SnapshotError("cut short or torn (the process ended while writing it?)")
    try:
        rows = json.loads(body)
        if not isinstance(rows, list):
            raise ValueError("no list of rows")
        routes = {}
        for key, text, micros in rows:
            data = decode_row(text, micros)
            if not (isinstance(key, str) and key.startswith("/")):
                raise ValueError(f"a route key {key!r}")
            if not isinstance(data.get("target"), str):
                raise ValueError(f"route {key}: no target")
            routes[key] = data
        return routes
    except (ValueError, TypeError, AttributeError, OverflowError, RecursionError) as e:
        raise SnapshotError(f"unreadable rows: {e}") from e


def _read(fd: int) -> bytes:
    """The snapshot in `fd`: the header, then as many bytes as it says (never the rest)."""
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        raise SnapshotError(f"file descriptor {fd} is no memory file")
    header = os.pread(fd, _HEADER.size, 0)
    if len(header) < _HEADER.size:
        raise SnapshotError(f"{len(header)} bytes, shorter than a header")
    magic, length, _crc = _HEADER.unpack(header)
    if magic != _MAGIC:
        raise SnapshotError("not a route table written by hubproxy")
    if length > MAX_SNAPSHOT:
        raise SnapshotError(f"a table of {length} bytes, more than {MAX_SNAPSHOT}")
    chunks = [header]
    offset = _HEADER.size
    while offset < _HEADER.size + length:
        chunk = os.pread(fd, min(1 << 20, _HEADER.size + length - offset), offset)
        if not chunk:
            break  # cut short: decode says so
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


class Encoder:
    """Snapshots of one table, each route's row made again only as far as it changed. The
    memory store replaces a route's data on a change but writes its `last_activity` in place,
    so a route with only new activity costs its time's digits, one whose data and activity are
    the same objects costs nothing: a write of 10,000 routes, all active, stays a few
    milliseconds on the event loop."""

    def __init__(self) -> None:
        # key -> (data, its last_activity then, the row up to the time, the whole row)
        self._rows: dict[str, tuple[RouteData, object, bytes, bytes]] = {}

    def encode(self, routes: Mapping[str, RouteData]) -> bytes:
        rows: dict[str, tuple[RouteData, object, bytes, bytes]] = {}
        for key, data in routes.items():
            activity = data.get("last_activity")
            row = self._rows.get(key)
            if row is None or row[0] is not data:
                row = self._row(key, data, activity)
            elif row[1] is not activity:
                if isinstance(activity, datetime) and isinstance(row[1], datetime):
                    head = row[2]
                    row = (data, activity, head, head + b"%d]" % to_micros(activity))
                else:  # a time where there was plain data, or the other way round
                    row = self._row(key, data, activity)
            rows[key] = row
        self._rows = rows
        body = b"[" + b",".join(row[3] for row in rows.values()) + b"]"
        return _HEADER.pack(_MAGIC, len(body), zlib.crc32(body)) + body

    @staticmethod
    def _row(key: str, data: RouteData, activity: object) -> tuple[RouteData, object, bytes, bytes]:
        text, micros = encode_row(data)
        head = json.dumps([key, text], separators=(",", ":")).encode()[:-1] + b","
        return (data, activity, head, head + (b"null]" if micros is None else b"%d]" % micros))


class Notifier:
    """The service manager's notify socket: one datagram a message, descriptors attached."""

    def __init__(self, address: str) -> None:
        # `@name` is a socket in the abstract namespace (sd_notify(3))
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # a manager slow to read must not stall the event loop: a full queue is waited on
        self._sock.setblocking(False)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier | None:
        address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET")
        return cls(address) if address else None

    async def send(self, text: str, fds: list[int] | None = None) -> None:
        """Raises OSError (the service manager is gone, refuses the message, or has not read
        for NOTIFY_SECONDS)."""
        # (not socket.send_fds: it drops the address)
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + NOTIFY_SECONDS
        while True:
            try:
                self._sock.sendmsg([text.encode()], rights, 0, self._address)
                return
            except BlockingIOError:
                if loop.time() > deadline:
                    raise
            await asyncio.sleep(0.05)

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
        activity reached the store) rather than leave the last snapshot (after a hand-over,
        the table as handed over: the new process keeps it from then on)."""
        try:
            if self._task is not None:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            if last_write:
                await self.write()
        finally:
            os.close(self._fd)

    async def _keep(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), ACTIVITY_SECONDS)
            self._changed.clear()
            await self.write()
            await asyncio.sleep(MIN_INTERVAL)

    async def write(self) -> None:
        """Write the table as it is now. Never raises: a table that cannot be written is
        emptied, so that no stale one is restored later."""
        try:
            blob = self._encoder.encode(await self._store.get_all())
            # whole, then cut to length: a crash in between leaves a header that does not
            # match its body, which the next start refuses
            written = os.pwrite(self._fd, blob, 0)
            if written != len(blob):
                raise OSError(f"{written} of {len(blob)} bytes written")
            os.ftruncate(self._fd, len(blob))
        except Exception as e:
            if not self._failing:
                log.warning("Cannot keep the routes for a restart: %s: %s", type(e).__name__, e)
            self._failing = True
            self._encoder = Encoder()  # nothing it remembers is known to be written
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            return
        if self._failing:
            log.info("Keeping the routes for a restart again")
        self._failing = False
        self.writes += 1


async def keep_routes(
    store: object,
    passed: int | None,
    notifier: Notifier | None,
    environ: MutableMapping[str, str] | None = None,
) -> RouteKeeper | None:
    """Restore the routes systemd kept (`passed`: the descriptor named `routes`, if any) into
    the memory store, then keep them from now on, the table written once before this returns
    (before the proxy serves); None when there is nothing to keep (another store, or no
    descriptor store). Never raises: the proxy starts without the routes."""
    if notifier is None or not store_enabled(environ) or not isinstance(store, MemoryStore):
        if passed is not None:
            os.close(passed)
            if notifier is not None:
                # the other stores keep the routes themselves: no stale copy waits in systemd
                await _send(notifier, f"FDSTOREREMOVE=1\nFDNAME={NAME}")
        return None
    fd = passed
    if fd is not None:
        try:
            os.set_inheritable(fd, False)
            routes = decode(_read(fd))
        except (OSError, SnapshotError) as e:
            log.warning("Routes kept by the service manager unusable, starting without: %s", e)
            with contextlib.suppress(OSError):
                os.close(fd)
            fd = None  # a new file, in its place
        else:
            for key, data in routes.items():
                await store.add(key, data)
            log.info("Restored %d routes kept by the service manager", len(routes))
    keeper: RouteKeeper
    if fd is not None:
        keeper = RouteKeeper(fd, store)
        await keeper.write()
    else:
        fd = os.memfd_create("hubproxy-routes", os.MFD_CLOEXEC)
        keeper = RouteKeeper(fd, store)
        await keeper.write()  # before systemd has it: it never holds an empty file
        # the older one goes (after an upgrade in place, or an unusable one)
        sent = await _send(notifier, f"FDSTOREREMOVE=1\nFDNAME={NAME}") and await _send(
            notifier, f"FDSTORE=1\nFDNAME={NAME}", [fd]
        )
        if not sent:
            os.close(fd)
            return None
    keeper.start()
    return keeper


async def _send(notifier: Notifier, text: str, fds: list[int] | None = None) -> bool:
    try:
        await notifier.send(text, fds)
    except OSError as e:
        log.warning("Cannot tell the service manager %r: %s", text.split("\n")[0], e)
        return False
    return True


async def notify_ready(notifier: Notifier | None) -> None:
    """`READY=1`, for `Type=notify`: the proxy serves."""
    if notifier is not None:
        await _send(notifier, "READY=1")

"""The route table kept in systemd's file descriptor store (hubproxy.fdstore), in process: the
snapshot's format and what is refused, the notify socket, and what is kept when. The restarts
themselves, with a process playing systemd, are in test_restarts.py."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from hubproxy import fdstore
from hubproxy.fdstore import Notifier, SnapshotError, decode, encode, keep_routes
from hubproxy.store.memory import MemoryStore
from hubproxy.store.sqlite import SQLiteStore
from systemd_like import ServiceManager

WHEN = datetime(2026, 12, 5, 9, 30, 1, 123456, tzinfo=UTC)
ROUTES = {
    "/": {"target": "http://127.0.0.1:8081", "last_activity": WHEN},
    "/user/alice": {"target": "http://10.0.0.2:8888", "user": "alice", "nested": {"a": [1]}},
    "/user/\u00e9": {"target": "http://h:1", "last_activity": "not a time: plain data"},
}


def test_a_snapshot_gives_back_every_route_exactly() -> None:
    assert decode(encode(ROUTES)) == ROUTES
    assert list(decode(encode(ROUTES))) == list(ROUTES), "in the same order"
    assert decode(encode({})) == {}


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda blob: b"", "shorter than a header"),
        (lambda blob: b"x" * 16 + blob[16:], "not a route table written by hubproxy"),
        (lambda blob: blob[:-1], "cut short or torn"),
        (lambda blob: blob[:60] + bytes([blob[60] ^ 1]) + blob[61:], "cut short or torn"),
        (lambda blob: blob[:40], "cut short or torn"),
    ],
)
def test_a_damaged_snapshot_is_refused(damage: object, message: str) -> None:
    blob = encode(ROUTES)
    with pytest.raises(SnapshotError, match=message):
        decode(damage(blob))  # type: ignore[operator]


def test_the_next_snapshot_has_every_change_the_store_makes() -> None:
    """The encoder reuses a route's row while the store keeps its data and activity objects;
    the memory store replaces them on every change (add, update, activity)."""

    async def scenario() -> None:
        store = MemoryStore()
        encoder = fdstore.Encoder()
        for key, data in ROUTES.items():
            await store.add(key, data)
        assert decode(encoder.encode(await store.get_all())) == ROUTES
        later = WHEN.replace(hour=10)
        await store.record_activity({"/": later})
        await store.update("/user/alice", {"user": "alicia"})
        await store.remove("/user/\u00e9")
        await store.add("/new", {"target": "http://n:1"})
        assert decode(encoder.encode(await store.get_all())) == {
            "/": {"target": "http://127.0.0.1:8081", "last_activity": later},
            "/user/alice": {**ROUTES["/user/alice"], "user": "alicia"},
            "/new": {"target": "http://n:1"},
        }

    asyncio.run(scenario())


def test_a_snapshot_longer_than_its_header_says_is_read_to_its_length() -> None:
    """A shorter table written over a longer one, the process gone before cutting the file."""
    assert decode(encode(ROUTES) + b"left from a longer one") == ROUTES


@pytest.mark.parametrize(
    "body",
    [
        b'[["/only-a-key"]]',
        b"{}",
        b'[[7, "{\\"target\\":\\"http://a:1\\"}", null]]',  # no path
        b'[["/a", "{\\"user\\":\\"a\\"}", null]]',  # no target
        b'[["/a", "[1]", null]]',  # data that is no object
        b'[["/a", "{\\"target\\":\\"http://a:1\\"}", 99999999999999999999]]',  # no time
        b'[["/a", "' + b"[" * 100_000 + b'", null]]',  # deeper than Python parses
    ],
)
def test_rows_that_are_no_rows_are_refused(body: bytes) -> None:
    """A file with a right CRC but rows we never write (a bug of another version, tampering)
    is refused rather than restored, so that it cannot fail the start or the writer later."""
    header = fdstore._HEADER.pack(fdstore._MAGIC, len(body), __import__("zlib").crc32(body))
    with pytest.raises(SnapshotError, match="unreadable rows"):
        decode(header + body)


def test_a_file_is_read_only_as_far_as_its_header_says() -> None:
    fd = os.memfd_create("long")
    try:
        os.write(fd, encode(ROUTES))
        os.ftruncate(fd, 1 << 40)  # a sparse terabyte after it
        assert decode(fdstore._read(fd)) == ROUTES
        os.pwrite(fd, fdstore._HEADER.pack(fdstore._MAGIC, 1 << 40, 0), 0)
        with pytest.raises(SnapshotError, match="more than"):
            fdstore._read(fd)
    finally:
        os.close(fd)


def test_the_notify_socket_may_be_abstract() -> None:
    name = f"hubproxy-test-{uuid.uuid4()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind("\0" + name)
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": "@" + name})
        assert notifier is not None
        asyncio.run(notifier.send("READY=1"))
        notifier.close()
        assert manager.recv(100) == b"READY=1"
    assert Notifier.from_environment({}) is None


@pytest.mark.parametrize(
    ("value", "enabled"), [("1", True), ("16", True), ("0", False), ("", False), ("x", False)]
)
def test_the_store_is_used_only_when_systemd_keeps_descriptors(value: str, enabled: bool) -> None:
    assert fdstore.store_enabled({"FDSTORE": value}) is enabled


@pytest.fixture
def manager(tmp_path: Path) -> ServiceManager:
    made = ServiceManager(str(tmp_path / "notify.sock"))
    made.main_pid = os.getpid()
    yield made  # type: ignore[misc]
    made.close()


def test_a_change_is_kept_at_once_and_a_burst_in_one_more_write(
    manager: ServiceManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        store = MemoryStore()
        notifier = Notifier(manager.path)
        keeper = await keep_routes(store, None, notifier, manager.environment())
        assert keeper is not None
        manager.take(5)
        assert [m.fields for m in manager.received] == [
            {"FDSTOREREMOVE": "1", "FDNAME": "routes"},
            {"FDSTORE": "1", "FDNAME": "routes"},
        ]
        assert keeper.writes == 1, "written once before the proxy serves"
        await _until(lambda: keeper.writes == 2)  # the table as it was when watched
        await store.add("/a", {"target": "http://a:1", "last_activity": WHEN})
        await _until(
            lambda: (
                decode(manager.content()) == {"/a": {"target": "http://a:1", "last_activity": WHEN}}
            )
        )
        for n in range(50):
            await store.add(f"/b{n}", {"target": "http://b:1"})
        await _until(lambda: len(decode(manager.content())) == 51)
        assert keeper.writes <= 5, "a burst is one write after the pause"
        await store.record_activity({"/a": WHEN.replace(year=2027)})
        await keeper.stop(last_write=True)
        assert decode(manager.content())["/a"]["last_activity"] == WHEN.replace(year=2027)
        notifier.close()

    monkeypatch.setattr(fdstore, "MIN_INTERVAL", 0.2)
    asyncio.run(scenario())


def test_a_hand_over_leaves_the_last_snapshot(manager: ServiceManager) -> None:
    async def scenario() -> None:
        store = MemoryStore()
        notifier = Notifier(manager.path)
        keeper = await keep_routes(store, None, notifier, manager.environment())
        assert keeper is not None
        await _until(lambda: keeper.writes == 2)
        manager.take(5)
        await store.add("/late", {"target": "http://a:1"})
        await keeper.stop(last_write=False)
        assert decode(manager.content()) == {}, "the process taken over keeps it from now on"
        notifier.close()

    asyncio.run(scenario())


def test_routes_passed_back_are_restored_and_the_same_file_kept(manager: ServiceManager) -> None:
    kept = os.memfd_create("kept")
    os.write(kept, encode(ROUTES))

    async def scenario() -> None:
        store = MemoryStore()
        notifier = Notifier(manager.path)
        keeper = await keep_routes(store, os.dup(kept), notifier, manager.environment())
        assert keeper is not None
        assert await store.get_all() == ROUTES
        await store.remove("/")
        await keeper.stop(last_write=True)
        assert manager.take() == [], "the file systemd passed is its own already"
        notifier.close()

    asyncio.run(scenario())
    assert "/" not in decode(os.pread(kept, 1 << 20, 0))
    os.close(kept)


def test_unusable_routes_start_empty_and_a_new_file_takes_their_place(
    manager: ServiceManager, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        store = MemoryStore()
        notifier = Notifier(manager.path)
        kept = os.memfd_create("kept")
        os.write(kept, fdstore._HEADER.pack(fdstore._MAGIC, 100, 0) + b"and then too little")
        keeper = await keep_routes(store, kept, notifier, manager.environment())
        assert keeper is not None
        assert await store.get_all() == {}
        await store.add("/new", {"target": "http://a:1"})
        await keeper.stop(last_write=True)
        notifier.close()

    asyncio.run(scenario())
    assert "Routes kept by the service manager unusable, starting without: cut short" in caplog.text
    assert [m.fields for m in manager.take(5)] == [
        {"FDSTOREREMOVE": "1", "FDNAME": "routes"},
        {"FDSTORE": "1", "FDNAME": "routes"},
    ]
    assert decode(manager.content()) == {"/new": {"target": "http://a:1"}}


def test_a_table_that_cannot_be_written_is_emptied_not_left_stale(
    manager: ServiceManager, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="hubproxy")

    async def scenario() -> None:
        store = MemoryStore()
        notifier = Notifier(manager.path)
        keeper = await keep_routes(store, None, notifier, manager.environment())
        assert keeper is not None
        await store.add("/a", {"target": "http://a:1"})
        await keeper.write()
        manager.take()
        assert decode(manager.content()) != {}

        def fails(self: object, routes: object) -> bytes:
            raise TypeError("Object of type X is not JSON serializable")

        with monkeypatch.context() as patched:
            patched.setattr(fdstore.Encoder, "encode", fails)
            await keeper.write()
            await keeper.write()
            assert manager.content() == b"", "no stale table for the next start"
        await keeper.write()
        assert decode(manager.content()) == {"/a": {"target": "http://a:1"}}
        await keeper.stop(last_write=False)
        notifier.close()

    asyncio.run(scenario())
    assert caplog.text.count("Cannot keep the routes for a restart: TypeError") == 1
    assert "Keeping the routes for a restart again" in caplog.text


def test_a_store_that_keeps_its_own_routes_drops_the_passed_file(
    manager: ServiceManager, tmp_path: Path
) -> None:
    async def scenario() -> None:
        store = SQLiteStore(str(tmp_path / "routes.db"))
        notifier = Notifier(manager.path)
        passed = os.memfd_create("kept")
        assert await keep_routes(store, passed, notifier, manager.environment()) is None
        with pytest.raises(OSError):
            os.fstat(passed)
        notifier.close()

    asyncio.run(scenario())
    assert [m.fields for m in manager.take(5)] == [{"FDSTOREREMOVE": "1", "FDNAME": "routes"}]


def test_without_a_descriptor_store_nothing_is_kept(manager: ServiceManager) -> None:
    async def scenario() -> None:
        notifier = Notifier(manager.path)
        assert (
            await keep_routes(MemoryStore(), None, notifier, {"NOTIFY_SOCKET": manager.path})
            is None
        )
        assert await keep_routes(MemoryStore(), None, None, manager.environment()) is None
        notifier.close()

    asyncio.run(scenario())
    assert manager.take() == []


async def _until(condition: object, timeout: float = 30.0) -> None:
    """Poll a readiness condition on the loop (the keeper writes from a task)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():  # type: ignore[operator]
        assert loop.time() < deadline, "condition never met"
        await asyncio.sleep(0.01)

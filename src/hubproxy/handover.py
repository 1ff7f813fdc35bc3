"""Handing the listening sockets and the route table from one hubproxy process to another, so
that an upgrade (SIGUSR2) fails no request.

Two processes take part: the *giver*, which serves now, and the *taker*, a new process (started
from the hubproxy installed now) which the giver started with one end of a socket pair in
`HUBPROXY_HANDOVER_FD`. Over that pair:

    taker -> giver   {"ask": version}                  once it has built everything it can alone
    giver            stops its API (requests wait in the listening socket's queue), writes the
                     last activity to its store
    giver -> taker   {"listeners": [names], "own_files": [bool], "routes": {...}, "pid": pid}
                     + the listening sockets (own_files: whether each one's socket file is the
                     giver's to remove, not systemd's)
    taker            serves them all
    taker -> giver   {"serving": pid}
    giver            stops accepting, drains (WebSockets too, up to --drain-timeout), leaves

If the taker exits, says nothing in time or closes the pair early, the giver serves on (its API
again) and logs why. The pid a hub or systemd tracks must stay valid, so an upgrade is two
hand-overs: the tracked process gives to an interim taker, drains, then executes the new
hubproxy in place (same pid), which takes everything back from the interim one, which leaves.
The routes travel in the message for the memory store only; the other stores hold them already.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from hubproxy.inherit import InheritError, adopt

ENV_FD = "HUBPROXY_HANDOVER_FD"
ENV_INTERIM = "HUBPROXY_HANDOVER_INTERIM"  # this taker gives everything back to the tracked pid
TAKER_START_SECONDS = 60.0  # a cold start on a loaded machine imports for a few seconds
MAX_MESSAGE = 256 * 1024 * 1024
_LENGTH = struct.Struct("!I")


class HandoverError(Exception):
    """The hand-over did not happen; the message says why."""


class Pair:
    """One end of the hand-over socket pair: length-prefixed JSON messages, the first chunk of
    a message carrying its file descriptors. Blocking I/O, run in a thread: a message may be
    megabytes of routes, and the other side reads it only when it gets to it."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        self.sock = sock

    @classmethod
    def from_environment(cls) -> Pair | None:
        """The taker's end, if this process was started to take over (the variable removed)."""
        fd = os.environ.pop(ENV_FD, None)
        if fd is None:
            return None
        try:
            sock = socket.socket(fileno=int(fd))
        except (ValueError, OSError) as e:
            raise HandoverError(f"{ENV_FD}={fd!r}: not a socket") from e
        sock.set_inheritable(False)
        return cls(sock)

    async def send(self, message: Mapping[str, Any], fds: list[int] | None = None) -> None:
        try:
            await asyncio.to_thread(self._send, message, fds or [])
        except OSError as e:  # the other process is gone (a broken pipe)
            raise HandoverError(f"the other process: {e}") from e

    def _send(self, message: Mapping[str, Any], fds: list[int]) -> None:
        data = json.dumps(message, default=_encode).encode()
        framed = _LENGTH.pack(len(data)) + data
        sent = socket.send_fds(self.sock, [framed], fds) if fds else self.sock.send(framed)
        if sent < len(framed):
            self.sock.sendall(framed[sent:])

    async def receive(self, timeout: float) -> tuple[dict[str, Any], list[int]]:
        """The next message and its file descriptors; HandoverError when the other side is
        gone or says nothing for `timeout` seconds."""
        try:
            return await asyncio.wait_for(asyncio.to_thread(self._receive), timeout)
        except TimeoutError:
            raise HandoverError(f"no word in {timeout:.0f} s") from None
        except OSError as e:
            raise HandoverError(f"the other process: {e}") from e

    def _receive(self) -> tuple[dict[str, Any], list[int]]:
        data, fds, _, _ = socket.recv_fds(self.sock, 1 << 16, 16)
        if not data:
            raise HandoverError("the other process closed the hand-over")
        while len(data) < _LENGTH.size:
            data += self._more()
        (length,) = _LENGTH.unpack_from(data)
        if length > MAX_MESSAGE:
            raise HandoverError(f"a hand-over message of {length} bytes")
        data = data[_LENGTH.size :]
        chunks = [data]
        received = len(data)
        while received < length:
            chunk = self._more()
            chunks.append(chunk)
            received += len(chunk)
        message = json.loads(b"".join(chunks))
        if not isinstance(message, dict):
            raise HandoverError("a hand-over message that is no JSON object")
        return message, fds

    def _more(self) -> bytes:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise HandoverError("the other process closed the hand-over mid-message")
        return chunk

    def close(self) -> None:
        # shutdown first: it wakes a thread blocked reading this end (close alone does not),
        # which would otherwise keep the process from exiting
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def _encode(value: object) -> object:
    # routes travel as rows (store.base.encode_row): a datetime here is a bug, loudly
    raise TypeError(f"{type(value).__name__} in a hand-over message")


def adopt_listeners(names: list[str], fds: list[int]) -> list[tuple[str, socket.socket]]:
    """The listening sockets a giver sent, in its order (several `public` ones with
    --workers N); a descriptor that is no listening socket is an error."""
    if len(names) != len(fds):
        for fd in fds:
            os.close(fd)
        raise HandoverError(f"{len(names)} listeners named, {len(fds)} passed")
    adopted: list[tuple[str, socket.socket]] = []
    try:
        for name, fd in zip(names, fds, strict=True):
            adopted.append((name, adopt(fd, name)))
    except InheritError as e:
        for _, sock in adopted:
            sock.close()
        raise HandoverError(str(e)) from e
    return adopted


class Giver:
    """The giving side of one hand-over, over `pair`: waits for the taker's question, pauses
    the API (`pause`), sends the listeners and the routes (`routes()`: None when the store
    keeps them), and waits for the taker to serve. Any failure resumes the API (`resume`)
    and raises HandoverError."""

    def __init__(
        self,
        pair: Pair,
        listeners: list[tuple[str, socket.socket, bool]],
        pause: Callable[[], Awaitable[None]],
        resume: Callable[[], Awaitable[None]],
        routes: Callable[[], Awaitable[Mapping[str, Any] | None]],
    ) -> None:
        self.pair = pair
        self.listeners = listeners
        self.pause = pause
        self.resume = resume
        self.routes = routes

    async def give(
        self, taker: asyncio.subprocess.Process | None = None, wait: float = TAKER_START_SECONDS
    ) -> int:
        """The taker's pid, once it serves. `taker`: the process, if we started it (its exit
        ends the wait at once); `wait`: how long it may take to ask."""
        await self._word(taker, wait)  # {"ask": version}
        await self.pause()
        try:
            await self.pair.send(
                {
                    "listeners": [name for name, _, _ in self.listeners],
                    "own_files": [owns for _, _, owns in self.listeners],
                    "routes": await self.routes(),
                    "pid": os.getpid(),
                },
                [sock.fileno() for _, sock, _ in self.listeners],
            )
            serving = await self._word(taker, TAKER_START_SECONDS)
        except BaseException:
            await self.resume()
            raise
        pid = serving.get("serving")
        return pid if isinstance(pid, int) else -1

    async def _word(self, taker: asyncio.subprocess.Process | None, wait: float) -> dict[str, Any]:
        receiving = asyncio.ensure_future(self.pair.receive(wait))
        if taker is None:
            message, _ = await receiving
            return message
        exited = asyncio.ensure_future(taker.wait())
        try:
            await asyncio.wait((receiving, exited), return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
        if receiving.done() and receiving.exception() is None:
            message, _ = receiving.result()
            return message
        receiving.cancel()  # its thread ends as the taker's end of the pair closes
        with contextlib.suppress(TimeoutError):  # its exit status says more than a closed pair
            await asyncio.wait_for(taker.wait(), 5.0)
        if taker.returncode is not None:
            raise HandoverError(f"the new process exited with status {taker.returncode}")
        message, _ = await receiving  # raises the HandoverError
        return message


async def start_taker(argv: list[str]) -> tuple[asyncio.subprocess.Process, Pair]:
    """A new hubproxy (the one installed now), with this one's options, as an interim taker."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = dict(os.environ)
    env[ENV_FD] = str(theirs.fileno())
    env[ENV_INTERIM] = "1"
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "hubproxy",
            *argv,
            pass_fds=(theirs.fileno(),),
            stdin=asyncio.subprocess.DEVNULL,
            env=env,
        )
    except OSError as e:
        ours.close()
        raise HandoverError(f"cannot start {sys.executable} -m hubproxy: {e}") from e
    finally:
        theirs.close()
    return proc, Pair(ours)


def execute_in_place(pair: Pair, argv: list[str]) -> None:
    """Become the hubproxy installed now (same pid), which takes everything back over `pair`.
    Returns only if the exec failed (OSError raised)."""
    fd = pair.sock.fileno()
    os.set_inheritable(fd, True)
    env = dict(os.environ)
    env[ENV_FD] = str(fd)
    env.pop(ENV_INTERIM, None)
    # ignored across the exec until the new image handles it: a second SIGUSR2 in between
    # would otherwise end the tracked pid
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "hubproxy", *argv], env)

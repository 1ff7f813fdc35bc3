"""The control channel between the primary process and one worker: framed messages on a
socketpair.

A frame is a 4-byte big-endian length and a pickle. Pickle is safe here because both ends are
processes of this same program and the socketpair is created by the primary and handed to the
worker it starts (nothing else can connect to it). Messages are tuples whose first item names
them; `hubproxy.workers` lists them.
"""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct
from typing import Any

_LENGTH = struct.Struct(">I")
MAX_FRAME = 256 * 1024 * 1024  # a reset of a few hundred thousand routes fits well within this


class ChannelClosed(Exception):
    """The other end has gone (its process exited or closed the channel)."""


class Channel:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, sock: socket.socket) -> Channel:
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        return cls(reader, writer)

    def send(self, *message: Any) -> None:
        """Queue a message; the transport writes it as soon as the socket takes it."""
        if self._writer.is_closing():
            return  # the worker is gone; its monitor in the primary deals with that
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self._writer.write(_LENGTH.pack(len(payload)) + payload)

    async def receive(self) -> tuple[Any, ...]:
        try:
            head = await self._reader.readexactly(_LENGTH.size)
            (length,) = _LENGTH.unpack(head)
            if length > MAX_FRAME:
                raise ChannelClosed(f"frame of {length} bytes refused")
            message = pickle.loads(await self._reader.readexactly(length))
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            raise ChannelClosed(str(e) or "closed") from None
        if not isinstance(message, tuple) or not message:
            raise ChannelClosed(f"not a message: {message!r:.80}")
        return message

    async def drain(self) -> None:
        try:
            await self._writer.drain()
        except ConnectionError as e:
            raise ChannelClosed(str(e)) from None

    def close(self) -> None:
        self._writer.close()

"""Flow control for one leg: whether it reads from its peer, and every reason it does not.

Each leg (a client connection, a target connection) owns one `ReadGate`. Reasons are bits, so
several can hold at once: reading pauses when the first is raised and resumes when the last is
cleared, and raising or clearing a reason twice changes nothing (as uvicorn's FlowControl). A
leg never pauses the other leg's transport itself; it asks the other leg, which raises a reason
on its own gate.
"""

from __future__ import annotations

import asyncio

# Why a client connection is not read (its gate):
PIPELINE = 1  # parsed requests wait to be answered (MAX_PIPELINED), or bytes wait unparsed
CONNECTING = 2  # a connection to the target is being made
UPSTREAM_FULL = 4  # the target connection's write buffer is full (the target reads slowly)
UPGRADE = 8  # an upgrade request waits for the target's 101
# Why either leg is not read: the client's write buffer is full (the client does not read
# our answers, so neither the target's response nor further requests are read meanwhile)
CLIENT_FULL = 16


class ReadGate:
    """Pause and resume reading on one transport, for named reasons (the bits above)."""

    __slots__ = ("reasons", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reasons = 0

    def attach(self, transport: asyncio.Transport) -> None:
        """The leg's transport exists now: reasons raised before apply from the start."""
        self.transport = transport
        if self.reasons:
            transport.pause_reading()

    def pause(self, why: int) -> None:
        if not self.reasons and self.transport is not None:
            self.transport.pause_reading()
        self.reasons |= why

    def resume(self, why: int) -> None:
        if not self.reasons & why:
            return
        self.reasons &= ~why
        transport = self.transport
        if not self.reasons and transport is not None and not transport.is_closing():
            transport.resume_reading()

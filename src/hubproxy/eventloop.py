"""The event loop every hubproxy process runs on, and what it does with stray exceptions."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger("hubproxy")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop where uvloop exists (not on Windows); None: asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def log_uncaught(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
    """Whatever escapes a callback is logged in CHP's words; the proxy carries on."""
    exc = context.get("exception")
    message = context.get("message", "")
    if isinstance(exc, BaseException):
        log.error("Uncaught Exception: %s", exc or message, exc_info=exc)
    else:
        log.error("Uncaught Exception: %s", message)

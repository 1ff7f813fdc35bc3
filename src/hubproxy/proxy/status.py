"""Status lines, from one table: every response head the proxy writes starts here."""

from __future__ import annotations

import http

# ours to answer with, and the commonest relayed ones, rendered once
_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in http.HTTPStatus}


def reason(status: int) -> bytes:
    """The standard reason phrase of `status` (`Unknown` for a code with none)."""
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


def status_line(status: int, phrase: bytes | None = None) -> bytes:
    """`HTTP/1.1 <status> <phrase>` and its CRLF; the standard phrase unless one is given (a
    target's own, relayed as it sent it)."""
    if phrase is None:
        line = _LINES.get(status)
        if line is not None:
            return line
        phrase = reason(status)
    return b"HTTP/1.1 %d %s\r\n" % (status, phrase)

"""pytest plugin: JupyterHub's tests need SIGINT to work in the processes they spawn.

A command started in the background by a non-interactive shell (`cmd &`, `bash -c 'cmd &'`,
many CI runners) starts with SIGINT ignored, Python keeps it ignored, and every child inherits
that. JupyterHub's spawners stop servers with SIGINT first and wait `interrupt_timeout` (10 s)
before SIGTERM, so with SIGINT ignored every stop is slow: `DELETE /users/:name/server` answers
202 instead of 204, and test_api's spawn tests fail, whatever the proxy. Installing Python's
default handler here means children start with SIGINT at its default again (handlers are reset
by exec, an ignored signal is not).
"""

from __future__ import annotations

import signal


def pytest_configure(config):
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)

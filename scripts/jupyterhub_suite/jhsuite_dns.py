"""pytest plugin: resolve JupyterHub's subdomain test hosts to 127.0.0.1 without public DNS.

JupyterHub's subdomain tests (JUPYTERHUB_TEST_SUBDOMAIN_HOST=http://localhost.jovyan.org:PORT)
need `localhost.jovyan.org` and every `*.localhost.jovyan.org` to resolve to 127.0.0.1, which
public DNS does. Offline, this plugin makes the test process resolve exactly those names (and no
others) to 127.0.0.1. Only the test process needs them: the proxy binds 127.0.0.1 (MockHub's
bind_url) and routes on the Host header; the hub and the single-user servers talk over 127.0.0.1.
Loaded by scripts/jupyterhub-suite.sh --subdomain (JHSUITE_FAKE_DNS=1), otherwise inert.
"""

from __future__ import annotations

import os
import re
import socket

_DOMAIN = re.compile(r"(^|\.)localhost\.jovyan\.org\.?$", re.IGNORECASE)


def pytest_configure(config):
    if os.environ.get("JHSUITE_FAKE_DNS") != "1" or getattr(socket, "_jhsuite_dns", False):
        return
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if isinstance(name, str) and _DOMAIN.search(name):
            host = "127.0.0.1"
        return real_getaddrinfo(host, *args, **kwargs)

    socket.getaddrinfo = getaddrinfo
    socket._jhsuite_dns = True

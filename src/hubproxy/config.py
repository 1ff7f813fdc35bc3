"""The proxy's configuration: one frozen dataclass whose defaults are CHP 5.3's.

`cli.py` builds it from the command line and the environment; every other module only reads it.
Times are kept in the unit CHP's options use (milliseconds) so that a value can be compared with
CHP's documentation at a glance; helpers convert to seconds where asyncio wants them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Config:
    # public listener
    ip: str | None = None  # None or "" = all interfaces
    port: int = 8000
    socket: str | None = None

    # public TLS
    ssl_key: str | None = None
    ssl_cert: str | None = None
    ssl_ca: str | None = None
    ssl_request_cert: bool = False
    ssl_reject_unauthorized: bool | None = None
    ssl_protocol: str | None = None
    ssl_ciphers: str | None = None
    ssl_allow_rc4: bool = False
    ssl_dhparam: str | None = None
    ssl_key_passphrase: str | None = None

    # API listener
    api_ip: str = "localhost"  # "" = all interfaces, as for `ip`
    api_port: int | None = None  # None = public port + 1 (8001 with --socket)
    api_socket: str | None = None
    api_ssl_key: str | None = None
    api_ssl_cert: str | None = None
    api_ssl_ca: str | None = None
    api_ssl_request_cert: bool = False
    api_ssl_reject_unauthorized: bool | None = None
    api_ssl_key_passphrase: str | None = None

    # TLS towards https targets
    client_ssl_key: str | None = None
    client_ssl_cert: str | None = None
    client_ssl_ca: str | None = None
    client_ssl_request_cert: bool = False
    client_ssl_reject_unauthorized: bool = False
    insecure: bool = False

    # routing and forwarding
    default_target: str | None = None
    error_target: str | None = None
    error_path: str | None = None
    host_routing: bool = False
    x_forward: bool = True
    prepend_path: bool = True
    include_prefix: bool = True
    auto_rewrite: bool = False
    change_origin: bool = False
    protocol_rewrite: str | None = None
    custom_headers: tuple[tuple[str, str], ...] = ()

    # redirect listener
    redirect_port: int | None = None
    redirect_to: int | None = None

    # metrics listener
    metrics_ip: str = ""
    metrics_port: int | None = None
    metrics_socket: str | None = None

    # timeouts, in milliseconds as on CHP's command line
    timeout: int | None = None
    proxy_timeout: int | None = None
    keep_alive_timeout: int = 5000
    headers_timeout: int = 60000  # hubproxy: a request head must arrive within this (Node's)
    # hubproxy: after SIGTERM, how long requests in flight may take before every connection is
    # closed; JupyterHub sends SIGKILL 1-2 s after SIGTERM, Kubernetes after its grace period
    drain_timeout: int = 1000

    # limits on what a peer can make us hold (docs/limits.md)
    max_header_size: int = 64 * 1024  # request line + headers, or a response's status + headers

    # process
    auth_token: str | None = None  # None or "" = the API is not authenticated
    pid_file: str | None = None
    log_level: str = "info"
    storage_backend: str | None = None

    # our own additions
    log_format: str = "text"  # "text" (CHP's lines) or "json"
    access_log: bool = False
    workers: int = 1  # data-plane processes; 1 = the data plane runs in the only process

    @property
    def drain_seconds(self) -> float:
        return self.drain_timeout / 1000

    @property
    def effective_api_port(self) -> int:
        if self.api_port is not None:
            return self.api_port
        if self.socket:
            return 8001
        if self.port == 0:  # an OS-assigned public port: let the OS choose the API's too
            return 0
        return self.port + 1

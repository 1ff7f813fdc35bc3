"""TLS for the proxy's three sides, built from CHP's options, and reloaded without a restart.

The sides (spec §1.2, §3.10):

- **proxy**: the public listener; on when `--ssl-key` or `--ssl-cert` is given. `--ssl-ca` is
  the CA that client certificates are verified against, and `--ssl-request-cert` requires one
  (as CHP behaves: Node's servers reject unauthorized clients by default).
- **API**: the REST API listener; the same with the `--api-ssl-*` options. JupyterHub's
  internal SSL makes it require a client certificate from its CA at the handshake.
- **client**: connections to `https://` targets and to an https error target. `--client-ssl-key`
  and `--client-ssl-cert` are presented; `--client-ssl-ca` verifies targets (the system's CAs
  when absent); host names are checked; `--insecure` turns verification off (CHP 4's meaning).
  `--client-ssl-request-cert` / `--client-ssl-reject-unauthorized` have no effect, as in CHP.

Shared by the sides, as in CHP: `--ssl-protocol` (`TLSv1_2` style names, read as the only
version allowed), `--ssl-ciphers` (CHP's default list when absent; TLS 1.3 suites are OpenSSL's)
and `--ssl-dhparam` (servers only). Servers prefer their own cipher order (CHP's
honorCipherOrder). Nothing older than TLS 1.2 is ever negotiated.

Reload. A listener's context carries an SNI callback, which OpenSSL calls on every handshake
(with or without SNI) before it picks the certificate; it moves the new connection onto the
side's *current* context. A reload builds a complete new context from the files and, only if
that works, makes it current: new handshakes get the new certificate (and CA), established
connections keep theirs, and a broken file is logged while the old context stays in use. The
client side is rebuilt the same way and handed to the data plane (new upstream connections use
it; pooled ones carry on). `CertificateWatcher` reloads on SIGHUP and when a file changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from hubproxy.config import Config

log = logging.getLogger("hubproxy")

ENV_SSL_KEY_PASSPHRASE = "CONFIGPROXY_SSL_KEY_PASSPHRASE"
ENV_API_SSL_KEY_PASSPHRASE = "CONFIGPROXY_API_SSL_KEY_PASSPHRASE"

# CHP's default cipher list (bin/configurable-http-proxy), used when --ssl-ciphers is absent
CHP_CIPHERS = ":".join(
    [
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "DHE-RSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-SHA256",
        "DHE-RSA-AES128-SHA256",
        "ECDHE-RSA-AES256-SHA384",
        "DHE-RSA-AES256-SHA384",
        "ECDHE-RSA-AES256-SHA256",
        "DHE-RSA-AES256-SHA256",
        "HIGH",
        "!RC4",  # `RC4` with --ssl-allow-rc4 in CHP, undone by the `!RC4` below: no effect
        "!aNULL",
        "!eNULL",
        "!EXPORT",
        "!DES",
        "!RC4",
        "!MD5",
        "!PSK",
        "!SRP",
        "!CAMELLIA",
    ]
)

_V12, _V13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3
# --ssl-protocol <name> (Node's secureProtocol without `_method`) -> (minimum, maximum) version
PROTOCOLS: dict[str, tuple[ssl.TLSVersion, ssl.TLSVersion]] = {
    "TLS": (_V12, ssl.TLSVersion.MAXIMUM_SUPPORTED),
    "SSLv23": (_V12, ssl.TLSVersion.MAXIMUM_SUPPORTED),  # Node's old alias of TLS_method
    "TLSv1_2": (_V12, _V12),
    "TLSv1_3": (_V13, _V13),
}
_REFUSED_PROTOCOLS = {"TLSv1": "TLS 1.0", "TLSv1_1": "TLS 1.1", "SSLv3": "SSL 3", "SSLv2": "SSL 2"}

WATCH_SECONDS = 2.0  # how often certificate files are looked at for changes

_CERT_PEM = b"-----BEGIN CERTIFICATE-----"
_KEY_PEM = b"PRIVATE KEY-----"


class TLSError(Exception):
    """A TLS option that cannot be used; the message is one line naming the option and file."""


# -- the options of each side --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerSide:
    """One TLS listener's options, with the names messages use for them."""

    name: str  # "proxy" or "API", as the startup lines name the listeners
    prefix: str  # "--ssl" or "--api-ssl"
    key: str | None
    cert: str | None
    ca: str | None
    request_cert: bool
    passphrase: str | None
    passphrase_env: str

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(f for f in (self.key, self.cert, self.ca) if f)


def public_side(config: Config) -> ServerSide | None:
    if not (config.ssl_key or config.ssl_cert):
        return None
    return ServerSide(
        "proxy",
        "--ssl",
        config.ssl_key,
        config.ssl_cert,
        config.ssl_ca,
        config.ssl_request_cert,
        config.ssl_key_passphrase,
        ENV_SSL_KEY_PASSPHRASE,
    )


def api_side(config: Config) -> ServerSide | None:
    if not (config.api_ssl_key or config.api_ssl_cert):
        return None
    return ServerSide(
        "API",
        "--api-ssl",
        config.api_ssl_key,
        config.api_ssl_cert,
        config.api_ssl_ca,
        config.api_ssl_request_cert,
        config.api_ssl_key_passphrase,
        ENV_API_SSL_KEY_PASSPHRASE,
    )


def client_configured(config: Config) -> bool:
    """True if the client context must be built (and checked) at startup.

    Otherwise it is built when the first https target is used: the system's CAs cost about
    2 MiB and 30 ms, which a proxy without https targets should not pay.
    """
    return bool(
        config.client_ssl_key
        or config.client_ssl_cert
        or config.client_ssl_ca
        or config.insecure
        or config.ssl_protocol
        or config.ssl_ciphers
        or (config.error_target or "").lower().startswith("https:")
    )


def ineffective_options(config: Config) -> list[str]:
    """Options accepted, as CHP accepts them, that change nothing (logged at debug level)."""
    ineffective = []
    if config.ssl_allow_rc4:
        ineffective.append("--ssl-allow-rc4")  # CHP's own list removes RC4 again
    if config.ssl_reject_unauthorized and not config.ssl_request_cert:
        ineffective.append("--ssl-reject-unauthorized without --ssl-request-cert")
    if config.api_ssl_reject_unauthorized and not config.api_ssl_request_cert:
        ineffective.append("--api-ssl-reject-unauthorized without --api-ssl-request-cert")
    if config.client_ssl_request_cert:
        ineffective.append("--client-ssl-request-cert")
    if config.client_ssl_reject_unauthorized:
        ineffective.append("--client-ssl-reject-unauthorized")
    return ineffective


# -- building contexts ---------------------------------------------------------------------------


def protocol_range(name: str | None) -> tuple[ssl.TLSVersion, ssl.TLSVersion]:
    """(minimum, maximum) TLS version for an `--ssl-protocol` value (None: 1.2 and newer)."""
    if name is None:
        return PROTOCOLS["TLS"]
    bare = name.removesuffix("_method")
    if bare in PROTOCOLS:
        return PROTOCOLS[bare]
    if bare in _REFUSED_PROTOCOLS:
        raise TLSError(
            f"--ssl-protocol {name}: {_REFUSED_PROTOCOLS[bare]} is insecure and not supported; "
            "use TLSv1_2, TLSv1_3 or TLS (1.2 and newer)"
        )
    raise TLSError(f"--ssl-protocol {name}: unknown protocol; use TLSv1_2, TLSv1_3 or TLS")


def _common(ctx: ssl.SSLContext, config: Config) -> None:
    ctx.minimum_version, ctx.maximum_version = protocol_range(config.ssl_protocol)
    ciphers = config.ssl_ciphers or CHP_CIPHERS
    try:
        ctx.set_ciphers(ciphers)
    except ssl.SSLError as e:
        raise TLSError(f"--ssl-ciphers {ciphers}: no cipher matches") from e


def _read(option: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSError(f"{option} {path}: cannot read the file: {e.strerror}") from e


class _NoPassphrase(Exception):
    pass


def _load_chain(
    ctx: ssl.SSLContext,
    prefix: str,
    key: str | None,
    cert: str | None,
    passphrase: str | None,
    passphrase_env: str | None,
) -> None:
    """Load a certificate chain and its key, explaining any failure in one line."""
    key_opt, cert_opt = f"{prefix}-key", f"{prefix}-cert"
    key_pem = _read(key_opt, key) if key else b""
    cert_pem = _read(cert_opt, cert) if cert else b""
    if cert and _CERT_PEM not in cert_pem:
        raise TLSError(f"{cert_opt} {cert}: no PEM certificate in the file")
    if key and _KEY_PEM not in key_pem:
        raise TLSError(f"{key_opt} {key}: no PEM private key in the file")
    if not key and _KEY_PEM not in cert_pem:  # one file may hold both, else the other is needed
        raise TLSError(f"{cert_opt} {cert}: no {key_opt} given and the file holds no private key")
    if not cert and _CERT_PEM not in key_pem:
        raise TLSError(f"{key_opt} {key}: no {cert_opt} given and the file holds no certificate")
    certfile = cert or key
    assert certfile is not None
    key_shown = f"{key_opt} {key}" if key else f"{cert_opt} {cert}"
    asked = False

    def password() -> str:
        nonlocal asked
        asked = True
        if passphrase is None:
            raise _NoPassphrase
        return passphrase

    try:
        ctx.load_cert_chain(certfile, key if cert else None, password)
    except _NoPassphrase:
        hint = (
            f"set {passphrase_env}"
            if passphrase_env
            else "CHP has no passphrase variable for this key; decrypt it"
        )
        raise TLSError(f"{key_shown}: the key is encrypted; {hint}") from None
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise TLSError(f"{key_shown}: the key does not match {cert_opt} {cert}") from None
        if asked:
            raise TLSError(f"{key_shown}: wrong passphrase in {passphrase_env}") from None
        # the certificate or the key did not parse: which one?
        try:
            probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            probe.load_verify_locations(cadata=(cert_pem or key_pem).decode("ascii", "replace"))
        except (ssl.SSLError, ValueError):
            raise TLSError(f"{cert_opt} {certfile}: invalid certificate ({e.reason})") from None
        raise TLSError(f"{key_shown}: invalid private key ({e.reason})") from None
    except OSError as e:  # the file went away between reading and loading
        raise TLSError(f"{key_shown}: cannot read the file: {e.strerror}") from e


def _load_ca(ctx: ssl.SSLContext, option: str, path: str) -> None:
    """All certificates of a CA file (CHP splits the API's and client's, reads the public one
    as one blob; every certificate in the file is trusted here)."""
    if _CERT_PEM not in _read(option, path):
        raise TLSError(f"{option} {path}: no PEM certificate in the file")
    try:
        ctx.load_verify_locations(cafile=path)
    except ssl.SSLError as e:
        raise TLSError(f"{option} {path}: invalid certificate ({e.reason})") from None
    except OSError as e:
        raise TLSError(f"{option} {path}: cannot read the file: {e.strerror}") from e


def server_context(config: Config, side: ServerSide) -> ssl.SSLContext:
    """The context of a TLS listener; raises `TLSError`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _common(ctx, config)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE  # CHP's honorCipherOrder
    _load_chain(ctx, side.prefix, side.key, side.cert, side.passphrase, side.passphrase_env)
    if side.ca:
        _load_ca(ctx, f"{side.prefix}-ca", side.ca)
    if side.request_cert:
        # CHP: requestCert with Node's default rejectUnauthorized=true -> a valid one is required
        ctx.verify_mode = ssl.CERT_REQUIRED
        if not side.ca:
            ctx.load_default_certs(ssl.Purpose.CLIENT_AUTH)
    if config.ssl_dhparam:
        _read("--ssl-dhparam", config.ssl_dhparam)
        try:
            ctx.load_dh_params(config.ssl_dhparam)
        except ssl.SSLError as e:
            raise TLSError(
                f"--ssl-dhparam {config.ssl_dhparam}: not PEM Diffie-Hellman parameters "
                f"({e.reason})"
            ) from None
        except OSError as e:
            raise TLSError(
                f"--ssl-dhparam {config.ssl_dhparam}: cannot read the file: {e.strerror}"
            ) from e
    return ctx


def client_context(config: Config) -> ssl.SSLContext:
    """The context for connections to https targets and an https error target."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
    _common(ctx, config)
    if config.client_ssl_ca:
        _load_ca(ctx, "--client-ssl-ca", config.client_ssl_ca)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if config.client_ssl_key or config.client_ssl_cert:
        _load_chain(ctx, "--client-ssl", config.client_ssl_key, config.client_ssl_cert, None, None)
    if config.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


# -- sides that reload ---------------------------------------------------------------------------

_Signature = tuple[tuple[int, int, int, int] | None, ...]


class ReloadableTLS:
    """One side's current context, rebuilt from its files by `reload`."""

    def __init__(self, what: str, build: Callable[[], ssl.SSLContext], files: Sequence[str]):
        self.what = what  # for log lines: "the proxy listener", "https targets"
        self.files = tuple(files)
        self._build = build
        self.signature = self.look()
        self.current = build()  # TLSError at startup propagates: the process exits 1
        self.on_reload: Callable[[ssl.SSLContext], None] | None = None
        self.seen = self.signature  # what the last poll saw
        self.failed: _Signature | None = None  # files that failed to load; not retried as is

    def look(self) -> _Signature:
        """The files' identity and age (a replaced, rewritten or re-linked file changes it)."""
        signature: list[tuple[int, int, int, int] | None] = []
        for path in self.files:
            try:
                st = os.stat(path)
            except OSError:
                signature.append(None)
            else:
                signature.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(signature)

    async def reload(self) -> bool:
        """Build a new context from the files; make it current if that works."""
        signature = self.look()
        try:
            ctx = await asyncio.to_thread(self._build)
        except Exception as e:  # TLSError, or anything unforeseen: the current context stays
            self.failed = signature
            why = e if isinstance(e, TLSError) else f"{type(e).__name__}: {e}"
            log.error(
                "TLS reload for %s failed, keeping the current certificate: %s", self.what, why
            )
            return False
        self.current = ctx
        self.signature = self.seen = signature
        self.failed = None
        if self.on_reload is not None:
            self.on_reload(ctx)
        log.info("Reloaded TLS certificate for %s", self.what)
        return True


class ServerTLS(ReloadableTLS):
    """A listener's TLS: `listening` goes to the server; handshakes use `current`."""

    def __init__(self, config: Config, side: ServerSide) -> None:
        files = [*side.files, *([config.ssl_dhparam] if config.ssl_dhparam else [])]
        super().__init__(f"the {side.name} listener", lambda: server_context(config, side), files)
        self.listening = self.current
        self.listening.sni_callback = self._switch

    def _switch(self, ssl_object: ssl.SSLObject, server_name: str | None, _: object) -> None:
        current = self.current
        if ssl_object.context is not current:
            ssl_object.context = current


@dataclass
class TLSContexts:
    """Every side's TLS; a side is None when it is plain (client: built on first use)."""

    public: ServerTLS | None
    api: ServerTLS | None
    client: ReloadableTLS | None

    @property
    def sides(self) -> list[ReloadableTLS]:
        return [s for s in (self.public, self.api, self.client) if s is not None]


def build(config: Config) -> TLSContexts:
    """Build every side's context from the configuration; raises `TLSError`."""
    protocol_range(config.ssl_protocol)  # a bad name is an error even without TLS listeners
    public = public_side(config)
    api = api_side(config)
    client = None
    if client_configured(config):
        files = [f for f in (config.client_ssl_key, config.client_ssl_cert) if f]
        files += [config.client_ssl_ca] if config.client_ssl_ca else []
        client = ReloadableTLS("https targets", lambda: client_context(config), files)
    return TLSContexts(
        ServerTLS(config, public) if public else None,
        ServerTLS(config, api) if api else None,
        client,
    )


class CertificateWatcher:
    """Reloads the sides on request (SIGHUP) and when their files change (polled).

    A change is acted on once the files have looked the same for one poll, so a certificate and
    key replaced one after the other are loaded together; files that failed to load are not
    tried again until they change.
    """

    def __init__(self, sides: Sequence[ReloadableTLS], interval: float = WATCH_SECONDS) -> None:
        self.sides = list(sides)
        self.interval = interval
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        if any(side.files for side in self.sides):
            self._spawn(self._poll())

    def reload_all(self) -> None:
        """SIGHUP: rebuild every side now, whether its files changed or not."""
        log.info("Reloading TLS certificates (SIGHUP)")
        self._spawn(self._reload(self.sides))

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload(self, sides: Sequence[ReloadableTLS]) -> None:
        async with self._lock:
            for side in sides:
                await side.reload()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            due = []
            for side in self.sides:
                now = side.look()
                settled = now == side.seen
                side.seen = now
                if settled and now not in (side.signature, side.failed):
                    due.append(side)
            if due:
                await self._reload(due)

"""The command line: CHP 5.3's options and environment variables turned into one `Config`.

Every option configurable-http-proxy accepts is accepted here, under the same name, with the same
argument and default (spec §1.2), in both the `--opt value` and the `--opt=value` form. Errors
read like commander's (CHP's parser) and exit 1:

    error: unknown option '--x'
    error: option '--port <n> (defaults to 8000)' argument missing
    error: option '--socket <path>' cannot be used with option '--port <n> (defaults to 8000)'
    error: option '--port <n> (defaults to 8000)' argument 'abc' is invalid. Expected ...
    A colon was expected in custom header: <value>

Two errors CHP reports through its log (stdout) after parsing are reported the same way here:
`--redirect-port` without a certificate and `--error-target` together with `--error-path`.

`main()` is what the `hubproxy` and `configurable-http-proxy` scripts and `python -m hubproxy`
run; it returns the process's exit code.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from hubproxy import __version__
from hubproxy.config import Config
from hubproxy.cpus import available_cpus
from hubproxy.logs import LEVELS, setup_logging
from hubproxy.proxy.target import TargetError, parse_target

log = logging.getLogger("hubproxy")

# winston's levels, most to least severe (CHP documents the first four)
LOG_LEVELS = ("error", "warn", "info", "http", "verbose", "debug", "silly")
LOG_FORMATS = ("text", "json")

MAX_PORT = 65535
MAX_MILLISECONDS = 2**31 - 1  # Node's (and so CHP's) largest timer
MAX_WORKERS = 256
MIN_HEADER_SIZE = 1024  # below this not even a JupyterHub login request fits
MAX_HEADER_SIZE = 1 << 24

ENV_TOKEN = "CONFIGPROXY_AUTH_TOKEN"
ENV_TOKEN_FILE = "CONFIGPROXY_AUTH_TOKEN_FILE"
ENV_SSL_KEY_PASSPHRASE = "CONFIGPROXY_SSL_KEY_PASSPHRASE"
ENV_API_SSL_KEY_PASSPHRASE = "CONFIGPROXY_API_SSL_KEY_PASSPHRASE"

# a header name is an RFC 9110 token
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_DIGITS = re.compile(r"[0-9]+")


class UsageError(Exception):
    """A command line or environment that cannot be used; the message is the whole stderr line."""


class ConfigError(Exception):
    """A combination of options CHP rejects after logging it at error level."""


class _Exit(Exception):
    """`--help` or `--version` was handled; the process ends with `status`."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """argparse, but errors and exits are raised to `main` instead of ending the process."""

    def error(self, message: str) -> NoReturn:  # unreachable after _normalise; kept as a net
        raise UsageError(f"error: {message}")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise _Exit(status)


# commander's display form of each option (`flags`), as its error messages quote it; filled by
# _build_parser from the same table that builds the parser
FLAGS: dict[str, str] = {}


def _build_parser(prog: str) -> _Parser:
    p = _Parser(
        prog=prog,
        usage="%(prog)s [options]",
        description="A drop-in replacement for configurable-http-proxy (CHP 5.3 options).",
        add_help=False,
        allow_abbrev=False,
        formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=44),
    )

    def value(name: str, metavar: str, help: str, **kw: Any) -> None:
        FLAGS[name] = f"{name} {metavar}"
        p.add_argument(name, metavar=metavar, help=help, **kw)

    def flag(name: str, help: str, **kw: Any) -> None:
        FLAGS[name] = name
        p.add_argument(name, action=kw.pop("action", "store_true"), help=help, **kw)

    p.add_argument(
        "-V", "--version", action="version", version=__version__, help=("output the version number")
    )
    FLAGS["-V"] = FLAGS["--version"] = "-V, --version"
    value("--ip", "<ip-address>", "Public-facing IP of the proxy")
    value("--port", "<n> (defaults to 8000)", "Public-facing port of the proxy")  # as CHP
    value("--socket", "<path>", "Path to a UNIX domain socket for proxy requests")
    value("--ssl-key", "<keyfile>", "SSL key to use, if any")
    value("--ssl-cert", "<certfile>", "SSL certificate to use, if any")
    value("--ssl-ca", "<ca-file>", "SSL certificate authority, if any")
    flag("--ssl-request-cert", "Request SSL certs to authenticate clients")
    flag(
        "--ssl-reject-unauthorized",
        "Reject unauthorized SSL connections (only meaningful if --ssl-request-cert is given)",
        action="store_const",
        const=True,
    )
    value("--ssl-protocol", "<ssl-protocol>", "Set specific SSL protocol, e.g. TLSv1_2, SSLv3")
    value("--ssl-ciphers", "<ciphers>", "`:`-separated ssl cipher list. Default excludes RC4")
    flag("--ssl-allow-rc4", "Allow RC4 cipher for SSL (disabled by default)")
    value("--ssl-dhparam", "<dhparam-file>", "SSL Diffie-Helman Parameters pem file, if any")
    value("--api-ip", "<ip>", "Inward-facing IP for API requests (defaults to localhost)")
    value("--api-port", "<n>", "Inward-facing port for API requests (defaults to --port=value+1)")
    value("--api-socket", "<path>", "Path to a UNIX domain socket for API requests")
    value("--api-ssl-key", "<keyfile>", "SSL key to use, if any, for API requests")
    value("--api-ssl-cert", "<certfile>", "SSL certificate to use, if any, for API requests")
    value("--api-ssl-ca", "<ca-file>", "SSL certificate authority, if any, for API requests")
    flag("--api-ssl-request-cert", "Request SSL certs to authenticate clients for API requests")
    flag(
        "--api-ssl-reject-unauthorized",
        "Reject unauthorized SSL connections (only meaningful if --api-ssl-request-cert is given)",
        action="store_const",
        const=True,
    )
    value("--client-ssl-key", "<keyfile>", "SSL key to use, if any, for proxy to client requests")
    value(
        "--client-ssl-cert",
        "<certfile>",
        "SSL certificate to use, if any, for proxy to client requests",
    )
    value(
        "--client-ssl-ca",
        "<ca-file>",
        "SSL certificate authority, if any, for proxy to client requests",
    )
    flag("--client-ssl-request-cert", "Request SSL certs to authenticate clients (no effect)")
    flag(
        "--client-ssl-reject-unauthorized",
        "Reject unauthorized SSL connections (no effect, as in CHP)",
    )
    value("--default-target", "<host>", "Default proxy target (proto://host[:port])")
    value(
        "--error-target",
        "<host>",
        "Alternate server for handling proxy errors (proto://host[:port])",
    )
    value("--error-path", "<path>", "Alternate server for handling proxy errors (a directory)")
    value(
        "--redirect-port",
        "<redirect-port>",
        "Redirect HTTP requests on this port to the server on HTTPS",
    )
    value("--redirect-to", "<port>", "Redirect HTTP requests from --redirect-port to this port")
    value("--pid-file", "<pid-file>", "Write our PID to a file")
    flag(
        "--no-x-forward",
        "Don't add 'X-forward-' headers to proxied requests",
        action="store_false",
        dest="x_forward",
    )
    flag(
        "--no-prepend-path",
        "Avoid prepending target paths to proxied requests",
        action="store_false",
        dest="prepend_path",
    )
    flag(
        "--no-include-prefix",
        "Don't include the routing prefix in proxied requests",
        action="store_false",
        dest="include_prefix",
    )
    flag("--auto-rewrite", "Rewrite the Location header host/port in redirect responses")
    flag("--change-origin", "Changes the origin of the host header to the target URL")
    value(
        "--protocol-rewrite",
        "<proto>",
        "Rewrite the Location header protocol in redirect responses to the specified protocol",
    )
    value(
        "--custom-header",
        "<header>",
        "Custom header to add to proxied requests. Use same option for multiple headers "
        "(--custom-header k1:v1 --custom-header k2:v2)",
        action="append",
        dest="custom_header",
    )
    flag("--insecure", "Disable SSL cert verification")
    flag("--host-routing", "Use host routing (host as first level of path)")
    value("--metrics-ip", "<metrics-ip>", "IP for metrics server (defaults to all interfaces)")
    value("--metrics-port", "<n>", "Port of metrics server. Defines if metrics server is started")
    value("--metrics-socket", "<path>", "Path to a UNIX domain socket for the metrics server")
    value(
        "--log-level",
        "<loglevel>",
        "Log level (debug, info, warn, error) (default: info)",
    )
    value(
        "--timeout",
        "<n>",
        "Timeout (in millis) when proxy drops connection for a request.",
    )
    value(
        "--proxy-timeout",
        "<n>",
        "Timeout (in millis) when proxy receives no response from target.",
    )
    value(
        "--storage-backend",
        "<storage-class>",
        "Define an external storage class. Defaults to in-MemoryStore (memory).",
    )
    value(
        "--keep-alive-timeout",
        "<timeout>",
        "Set timeout (in milliseconds) for Keep-Alive connections (default: 5000)",
    )
    value(
        "--headers-timeout",
        "<timeout>",
        "hubproxy: time (in milliseconds) a client has to send a request's whole head, "
        "from its first byte; 0 for none (default: 60000, as Node's)",
    )
    value(
        "--drain-timeout",
        "<timeout>",
        "hubproxy: after SIGTERM or SIGINT, time (in milliseconds) requests in flight get to "
        "finish before every connection is closed; 0 closes them at once; after SIGUSR2 (an "
        "upgrade), WebSockets get it too (default: 1000)",
    )
    value(
        "--max-header-size",
        "<bytes>",
        "hubproxy: the largest request or response head (request or status line and headers) "
        "and the largest trailer block (default: 65536)",
    )
    value(
        "--log-format",
        "<format>",
        "hubproxy: log line format, text (CHP's lines) or json (default: text)",
    )
    flag("--access-log", "hubproxy: log every proxied request at info level")
    value(
        "--workers",
        "<n>",
        "hubproxy: data-plane processes, or 'auto' for one per available CPU (the cores it may "
        "run on, capped by a cgroup CPU quota) (default: 1)",
    )
    p.add_argument("-h", "--help", action="help", help="display help for command")
    FLAGS["-h"] = FLAGS["--help"] = "-h, --help"

    for action in p._actions:  # argparse's defaults are ours to fill in, see _config
        if action.dest not in ("help", "version"):
            action.default = argparse.SUPPRESS
    return p


def _normalise(argv: Sequence[str], p: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    """Commander's reading of argv, as argparse arguments plus the errors it would report.

    An option that takes a value takes the next argument whatever it looks like (`--ip --x`
    sets the IP to `--x`), so each such pair is joined into `--opt=value` for argparse.
    """
    takes_value = {opt for a in p._actions if a.nargs is None for opt in a.option_strings}
    known = set(p._option_string_actions)
    out: list[str] = []
    errors: list[str] = []
    positional = 0
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":  # the end of options; everything after it is an operand
            positional += len(argv) - i
            break
        if arg.startswith("-") and arg != "-":
            name, eq, _ = arg.partition("=")
            if name in takes_value:
                if eq:
                    out.append(arg)
                elif i < len(argv):
                    out.append(f"{arg}={argv[i]}")
                    i += 1
                else:
                    errors.append(f"error: option '{FLAGS[name]}' argument missing")
            elif arg in known:
                out.append(arg)
            else:
                errors.append(f"error: unknown option '{arg}'")
        else:
            positional += 1
    if positional:
        errors.append(f"error: too many arguments. Expected 0 arguments but got {positional}.")
    return out, errors


def given_options(argv: Sequence[str]) -> set[str]:
    """The options `argv` names, read as the command line is read: `--ip --api-ip` gives --ip
    the value `--api-ip` and names only --ip; nothing after `--` is an option."""
    args, _ = _normalise(argv, _build_parser("hubproxy"))
    return {arg.partition("=")[0] for arg in args}


def _invalid(name: str, value: str, why: str) -> UsageError:
    return UsageError(f"error: option '{FLAGS[name]}' argument '{value}' is invalid. {why}")


def _integer(name: str, value: str, low: int, high: int, what: str) -> int:
    """A decimal integer in [low, high]; CHP's parseInt would take `8000abc` as 8000 and `abc`
    as "use the default": we reject both rather than guess."""
    if not _DIGITS.fullmatch(value) or not low <= int(value) <= high:
        raise _invalid(name, value, f"Expected {what}.")
    return int(value)


def _port(name: str, value: str | None, low: int = 0) -> int | None:
    if value is None:
        return None
    return _integer(name, value, low, MAX_PORT, f"a port number from {low} to {MAX_PORT}")


def _milliseconds(name: str, value: str | None) -> int | None:
    if value is None:
        return None
    return _integer(name, value, 0, MAX_MILLISECONDS, f"milliseconds from 0 to {MAX_MILLISECONDS}")


def _bytes(name: str, value: str | None) -> int | None:
    if value is None:
        return None
    what = f"a size in bytes from {MIN_HEADER_SIZE} to {MAX_HEADER_SIZE}"
    return _integer(name, value, MIN_HEADER_SIZE, MAX_HEADER_SIZE, what)


def _target(name: str, value: str | None) -> str | None:
    """A target URL must at least look like one (CHP would fail every request with a 500)."""
    if value is None:
        return None
    try:
        parse_target(value)
    except TargetError as e:
        why = "Expected a URL such as http://127.0.0.1:8081 or http+unix://%2Fpath%2Fto.sock."
        raise _invalid(name, value, why) from e
    return value


def _path(name: str, value: str | None) -> str | None:
    if value == "":
        raise _invalid(name, value, "Expected a path.")
    return value


def _workers(value: str | None) -> int:
    if value is None:
        return 1
    if value == "auto":  # the cores it may run on, capped by a container's CPU quota
        return available_cpus()
    return _integer("--workers", value, 1, MAX_WORKERS, f"'auto' or 1 to {MAX_WORKERS}")


def parse_custom_header(value: str) -> tuple[str, str]:
    """CHP's `--custom-header` parsing: trim, split at the first colon, trim both halves."""
    trimmed = value.strip()
    colon = trimmed.find(":")
    if colon < 1:
        raise UsageError(f"A colon was expected in custom header: {value}")
    name, header_value = trimmed[:colon].strip(), trimmed[colon + 1 :].strip()
    # CHP accepts these and then fails every request; we refuse them up front
    if not _TOKEN.fullmatch(name):
        raise UsageError(f"Invalid header name in custom header: {value!r}")
    if any(ch in header_value for ch in "\r\n\0"):
        raise UsageError(f"Invalid header value in custom header: {value!r}")
    return name, header_value


def _custom_headers(values: list[str]) -> tuple[tuple[str, str], ...]:
    headers: dict[str, str] = {}  # a repeated name keeps its first position and its last value
    for value in values:
        name, header_value = parse_custom_header(value)
        headers[name] = header_value
    return tuple(headers.items())


def auth_token_from_env(environ: Mapping[str, str]) -> str | None:
    """The API token: `CONFIGPROXY_AUTH_TOKEN`, or the contents of `CONFIGPROXY_AUTH_TOKEN_FILE`.

    Empty means unset (unauthenticated, as CHP). The file variable is what CHP's Docker entrypoint
    offers; we honour it everywhere, with the entrypoint's rules: setting both is an error, and
    trailing newlines of the file are dropped (like the shell's `$(< file)`).
    """
    token = environ.get(ENV_TOKEN) or None
    token_file = environ.get(ENV_TOKEN_FILE) or None
    if token_file is None:
        return token
    if token is not None:
        raise UsageError(
            f"error: both {ENV_TOKEN} and {ENV_TOKEN_FILE} are set (but are exclusive)"
        )
    try:
        with open(token_file, encoding="utf-8") as f:
            contents = f.read().rstrip("\n")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise UsageError(f"error: cannot read {ENV_TOKEN_FILE} {token_file}: {reason}") from e
    if not contents:  # an empty file is a mistake, not a request for an open API
        raise UsageError(f"error: {ENV_TOKEN_FILE} {token_file} is empty")
    return contents


def _conflicts(ns: dict[str, Any]) -> None:
    """commander's `.conflicts()`: a socket option given together with its TCP options."""
    for sock, tcp in (
        ("socket", ("ip", "port")),
        ("api_socket", ("api_ip", "api_port")),
        ("metrics_socket", ("metrics_ip", "metrics_port")),
    ):
        if sock not in ns:
            continue
        for other in tcp:
            if other in ns:
                a, b = "--" + sock.replace("_", "-"), "--" + other.replace("_", "-")
                raise UsageError(
                    f"error: option '{FLAGS[a]}' cannot be used with option '{FLAGS[b]}'"
                )


def parse(
    argv: Sequence[str],
    environ: Mapping[str, str] | None = None,
    warnings: list[str] | None = None,
    prog: str = "hubproxy",
) -> Config:
    """The `Config` for a command line and an environment.

    Raises `UsageError` (print it on stderr, exit 1), or `_Exit` after `--help`/`--version`.
    Warnings meant for the log (after logging is set up) are appended to `warnings`.
    """
    environ = os.environ if environ is None else environ
    warnings = [] if warnings is None else warnings
    parser = _build_parser(prog)
    args, errors = _normalise(argv, parser)
    ns = vars(parser.parse_args(args))  # --help and --version end here, as in commander
    if errors:
        raise UsageError(errors[0])
    _conflicts(ns)

    ip = ns.get("ip")
    if ip == "*":
        warnings.append(
            "Interpreting ip='*' as all-interfaces. "
            "Preferred usage is 0.0.0.0 for all IPv4 or '' for all-interfaces."
        )
        ip = ""
    log_level = ns.get("log_level", "info").lower()
    if log_level not in LOG_LEVELS and log_level not in LEVELS:
        raise _invalid(
            "--log-level", ns["log_level"], f"Allowed choices are {', '.join(LOG_LEVELS)}."
        )
    log_format = ns.get("log_format", "text")
    if log_format not in LOG_FORMATS:
        raise _invalid("--log-format", log_format, f"Allowed choices are {', '.join(LOG_FORMATS)}.")
    port = _port("--port", ns.get("port"))
    keep_alive = _milliseconds("--keep-alive-timeout", ns.get("keep_alive_timeout"))
    timeout = _milliseconds("--timeout", ns.get("timeout"))
    proxy_timeout = _milliseconds("--proxy-timeout", ns.get("proxy_timeout"))
    headers_timeout = _milliseconds("--headers-timeout", ns.get("headers_timeout"))
    drain_timeout = _milliseconds("--drain-timeout", ns.get("drain_timeout"))
    max_header_size = _bytes("--max-header-size", ns.get("max_header_size"))

    return Config(
        ip=ip,
        port=8000 if port is None else port,
        socket=_path("--socket", ns.get("socket")),
        ssl_key=ns.get("ssl_key"),
        ssl_cert=ns.get("ssl_cert"),
        ssl_ca=ns.get("ssl_ca"),
        ssl_request_cert=ns.get("ssl_request_cert", False),
        ssl_reject_unauthorized=ns.get("ssl_reject_unauthorized"),
        ssl_protocol=ns.get("ssl_protocol"),
        ssl_ciphers=ns.get("ssl_ciphers"),
        ssl_allow_rc4=ns.get("ssl_allow_rc4", False),
        ssl_dhparam=ns.get("ssl_dhparam"),
        ssl_key_passphrase=environ.get(ENV_SSL_KEY_PASSPHRASE) or None,
        # `--api-ip=` (as z2jh passes it) is all interfaces, as for --ip: Node listens on `::`
        api_ip=ns.get("api_ip", "localhost"),
        api_port=_port("--api-port", ns.get("api_port")),
        api_socket=_path("--api-socket", ns.get("api_socket")),
        api_ssl_key=ns.get("api_ssl_key"),
        api_ssl_cert=ns.get("api_ssl_cert"),
        api_ssl_ca=ns.get("api_ssl_ca"),
        api_ssl_request_cert=ns.get("api_ssl_request_cert", False),
        api_ssl_reject_unauthorized=ns.get("api_ssl_reject_unauthorized"),
        api_ssl_key_passphrase=environ.get(ENV_API_SSL_KEY_PASSPHRASE) or None,
        client_ssl_key=ns.get("client_ssl_key"),
        client_ssl_cert=ns.get("client_ssl_cert"),
        client_ssl_ca=ns.get("client_ssl_ca"),
        client_ssl_request_cert=ns.get("client_ssl_request_cert", False),
        client_ssl_reject_unauthorized=ns.get("client_ssl_reject_unauthorized", False),
        insecure=ns.get("insecure", False),
        default_target=_target("--default-target", ns.get("default_target")),
        error_target=_target("--error-target", ns.get("error_target")),
        error_path=_path("--error-path", ns.get("error_path")),
        host_routing=ns.get("host_routing", False),
        x_forward=ns.get("x_forward", True),
        prepend_path=ns.get("prepend_path", True),
        include_prefix=ns.get("include_prefix", True),
        auto_rewrite=ns.get("auto_rewrite", False),
        change_origin=ns.get("change_origin", False),
        protocol_rewrite=ns.get("protocol_rewrite"),
        custom_headers=_custom_headers(ns.get("custom_header", [])),
        redirect_port=_port("--redirect-port", ns.get("redirect_port")),
        redirect_to=_port("--redirect-to", ns.get("redirect_to"), low=1),
        metrics_ip=ns.get("metrics_ip", ""),
        metrics_port=_port("--metrics-port", ns.get("metrics_port")),
        metrics_socket=_path("--metrics-socket", ns.get("metrics_socket")),
        timeout=timeout or None,  # 0 = no timeout, as CHP
        proxy_timeout=proxy_timeout or None,
        keep_alive_timeout=keep_alive or 5000,  # CHP: missing or 0 means 5000
        headers_timeout=60000 if headers_timeout is None else headers_timeout,
        drain_timeout=1000 if drain_timeout is None else drain_timeout,
        max_header_size=64 * 1024 if max_header_size is None else max_header_size,
        auth_token=auth_token_from_env(environ),
        pid_file=_path("--pid-file", ns.get("pid_file")),
        log_level=log_level,
        storage_backend=ns.get("storage_backend"),
        log_format=log_format,
        access_log=ns.get("access_log", False),
        workers=_workers(ns.get("workers")),
    )


def check(config: Config) -> None:
    """The checks CHP makes after parsing, logging an error and exiting 1 (`ConfigError`)."""
    if config.redirect_port is not None and not (config.ssl_key or config.ssl_cert):
        raise ConfigError("HTTPS redirection specified but certificates not provided.")
    if config.error_target and config.error_path:
        raise ConfigError("Cannot specify both error-target and error-path. Pick one.")
    if config.error_path is not None and not os.path.isdir(config.error_path):
        raise ConfigError(f"--error-path {config.error_path} is not a directory.")


def _prog() -> str:
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name in ("hubproxy", "configurable-http-proxy") else "hubproxy"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, check, set up logging and run the proxy; the process's exit code."""
    argv = sys.argv[1:] if argv is None else argv
    warnings: list[str] = []
    try:
        config = parse(argv, os.environ, warnings, prog=_prog())
    except _Exit as e:
        return e.status
    except UsageError as e:
        print(e, file=sys.stderr)
        return 1

    setup_logging(config.log_level, config.log_format)
    for warning in warnings:
        log.warning("%s", warning)
    try:
        check(config)
    except ConfigError as e:
        log.error("%s", e)
        return 1

    from hubproxy.app import run  # the heavy imports, only once the command line is good

    return run(config)

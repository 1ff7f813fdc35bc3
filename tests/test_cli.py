"""The command line: every CHP option into Config, both syntaxes, and every error path.

Parsing is unit-tested through `cli.parse`; the error paths also run the real process
(`python -m hubproxy ...`) and check its exit code, stderr and stdout.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest

from hubproxy import __version__
from hubproxy.cli import (
    ConfigError,
    UsageError,
    _build_parser,
    _Exit,
    check,
    parse,
    parse_custom_header,
)
from hubproxy.config import Config
from hubproxy.cpus import available_cpus


def cfg(*argv: str, env: dict[str, str] | None = None) -> Config:
    return parse(list(argv), env or {})


def usage_error(*argv: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(UsageError) as info:
        cfg(*argv, env=env)
    return str(info.value)


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real process; the environment has no token unless `env` gives one."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIGPROXY_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "hubproxy", *argv],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
    )


# --- defaults ---------------------------------------------------------------------------------


def test_no_options_is_chps_defaults() -> None:
    config = cfg()
    assert config == Config()
    assert config.ip is None and config.port == 8000 and config.api_ip == "localhost"
    assert config.effective_api_port == 8001
    assert (config.x_forward, config.prepend_path, config.include_prefix) == (True, True, True)
    assert config.keep_alive_timeout == 5000 and config.log_level == "info"
    assert config.auth_token is None
    assert config.drain_timeout == 1000 and config.drain_seconds == 1.0  # hubproxy's own


# --- every option, in both syntaxes -------------------------------------------------------------

# option -> (argument, Config field, expected value)
VALUE_OPTIONS: dict[str, tuple[str, str, Any]] = {
    "--ip": ("10.1.2.3", "ip", "10.1.2.3"),
    "--port": ("8443", "port", 8443),
    "--socket": ("/run/proxy.sock", "socket", "/run/proxy.sock"),
    "--ssl-key": ("k.pem", "ssl_key", "k.pem"),
    "--ssl-cert": ("c.pem", "ssl_cert", "c.pem"),
    "--ssl-ca": ("ca.pem", "ssl_ca", "ca.pem"),
    "--ssl-protocol": ("TLSv1_2", "ssl_protocol", "TLSv1_2"),
    "--ssl-ciphers": ("HIGH:!aNULL", "ssl_ciphers", "HIGH:!aNULL"),
    "--ssl-dhparam": ("dh.pem", "ssl_dhparam", "dh.pem"),
    "--api-ip": ("0.0.0.0", "api_ip", "0.0.0.0"),
    "--api-port": ("9001", "api_port", 9001),
    "--api-socket": ("/run/api.sock", "api_socket", "/run/api.sock"),
    "--api-ssl-key": ("ak.pem", "api_ssl_key", "ak.pem"),
    "--api-ssl-cert": ("ac.pem", "api_ssl_cert", "ac.pem"),
    "--api-ssl-ca": ("aca.pem", "api_ssl_ca", "aca.pem"),
    "--client-ssl-key": ("ck.pem", "client_ssl_key", "ck.pem"),
    "--client-ssl-cert": ("cc.pem", "client_ssl_cert", "cc.pem"),
    "--client-ssl-ca": ("cca.pem", "client_ssl_ca", "cca.pem"),
    "--default-target": ("http://127.0.0.1:8081", "default_target", "http://127.0.0.1:8081"),
    "--error-target": ("http://hub:8081/hub/error", "error_target", "http://hub:8081/hub/error"),
    "--error-path": ("/srv/errors", "error_path", "/srv/errors"),
    "--redirect-port": ("8080", "redirect_port", 8080),
    "--redirect-to": ("443", "redirect_to", 443),
    "--pid-file": ("/run/proxy.pid", "pid_file", "/run/proxy.pid"),
    "--protocol-rewrite": ("https", "protocol_rewrite", "https"),
    "--custom-header": ("X-A: 1", "custom_headers", (("X-A", "1"),)),
    "--metrics-ip": ("127.0.0.1", "metrics_ip", "127.0.0.1"),
    "--metrics-port": ("9100", "metrics_port", 9100),
    "--metrics-socket": ("/run/metrics.sock", "metrics_socket", "/run/metrics.sock"),
    "--log-level": ("debug", "log_level", "debug"),
    "--timeout": ("1000", "timeout", 1000),
    "--proxy-timeout": ("2000", "proxy_timeout", 2000),
    "--storage-backend": ("memory", "storage_backend", "memory"),
    "--keep-alive-timeout": ("7000", "keep_alive_timeout", 7000),
    "--log-format": ("json", "log_format", "json"),
    "--workers": ("4", "workers", 4),
    "--headers-timeout": ("30000", "headers_timeout", 30000),
    "--drain-timeout": ("30000", "drain_timeout", 30000),
    "--max-header-size": ("16384", "max_header_size", 16384),
}

# flag -> (Config field, value it sets)
FLAG_OPTIONS: dict[str, tuple[str, Any]] = {
    "--ssl-request-cert": ("ssl_request_cert", True),
    "--ssl-reject-unauthorized": ("ssl_reject_unauthorized", True),
    "--ssl-allow-rc4": ("ssl_allow_rc4", True),
    "--api-ssl-request-cert": ("api_ssl_request_cert", True),
    "--api-ssl-reject-unauthorized": ("api_ssl_reject_unauthorized", True),
    "--client-ssl-request-cert": ("client_ssl_request_cert", True),
    "--client-ssl-reject-unauthorized": ("client_ssl_reject_unauthorized", True),
    "--no-x-forward": ("x_forward", False),
    "--no-prepend-path": ("prepend_path", False),
    "--no-include-prefix": ("include_prefix", False),
    "--auto-rewrite": ("auto_rewrite", True),
    "--change-origin": ("change_origin", True),
    "--insecure": ("insecure", True),
    "--host-routing": ("host_routing", True),
    "--access-log": ("access_log", True),
}


def test_tables_cover_every_option() -> None:
    parser = _build_parser("hubproxy")
    options = {o for a in parser._actions for o in a.option_strings}
    assert options - {"-h", "--help", "-V", "--version"} == set(VALUE_OPTIONS) | set(FLAG_OPTIONS)


def test_every_config_field_but_env_ones_has_an_option() -> None:
    from dataclasses import fields

    from_options = {f for _, f, _ in VALUE_OPTIONS.values()} | {f for f, _ in FLAG_OPTIONS.values()}
    from_env = {"auth_token", "ssl_key_passphrase", "api_ssl_key_passphrase"}
    assert {f.name for f in fields(Config)} == from_options | from_env


@pytest.mark.parametrize("option", sorted(VALUE_OPTIONS))
@pytest.mark.parametrize("syntax", ["space", "equals"])
def test_value_option(option: str, syntax: str) -> None:
    arg, field, expected = VALUE_OPTIONS[option]
    argv = [option, arg] if syntax == "space" else [f"{option}={arg}"]
    config = cfg(*argv)
    assert getattr(config, field) == expected
    # and nothing else moved
    changed = {f for f in Config.__dataclass_fields__ if getattr(config, f) != getattr(Config(), f)}
    assert changed == {field}


@pytest.mark.parametrize("option", sorted(FLAG_OPTIONS))
def test_flag_option(option: str) -> None:
    field, expected = FLAG_OPTIONS[option]
    config = cfg(option)
    assert getattr(config, field) == expected
    changed = {f for f in Config.__dataclass_fields__ if getattr(config, f) != getattr(Config(), f)}
    assert changed == {field}


def test_jupyterhub_command_line() -> None:
    """What JupyterHub 6 passes with internal SSL (spec §7.2), in its order."""
    config = cfg(
        "--ip", "hub-host", "--port", "8000",
        "--api-ip", "127.0.0.1", "--api-port", "8001",
        "--error-target", "http://127.0.0.1:8081/hub/error",
        "--log-level=debug",
        "--host-routing",
        "--ssl-key", "k", "--ssl-cert", "c",
        "--api-ssl-key", "ak", "--api-ssl-cert", "ac", "--api-ssl-ca", "aca",
        "--api-ssl-request-cert", "--api-ssl-reject-unauthorized",
        "--client-ssl-key", "ck", "--client-ssl-cert", "cc", "--client-ssl-ca", "cca",
        "--client-ssl-request-cert", "--client-ssl-reject-unauthorized",
    )  # fmt: skip
    assert (config.ip, config.port, config.api_ip, config.api_port) == (
        "hub-host", 8000, "127.0.0.1", 8001,
    )  # fmt: skip
    assert config.error_target == "http://127.0.0.1:8081/hub/error"
    assert config.log_level == "debug" and config.host_routing
    assert config.api_ssl_request_cert and config.api_ssl_reject_unauthorized
    assert config.client_ssl_request_cert and config.client_ssl_reject_unauthorized


def test_jupyterhub_unix_socket_command_line() -> None:
    config = cfg(
        "--socket", "/tmp/jh/proxy.sock", "--api-socket", "/tmp/jh/api.sock",
        "--error-target", "http+unix://%2Ftmp%2Fjh%2Fhub.sock/hub/error",
        "--log-level", "info",
    )  # fmt: skip
    assert config.socket == "/tmp/jh/proxy.sock" and config.api_socket == "/tmp/jh/api.sock"
    assert config.error_target == "http+unix://%2Ftmp%2Fjh%2Fhub.sock/hub/error"
    assert config.effective_api_port == 8001  # unused, but CHP's rule


# --- addresses -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("", ""),
        ("*", ""),
        ("::", "::"),
        ("0.0.0.0", "0.0.0.0"),
        ("127.0.0.1", "127.0.0.1"),
        ("::1", "::1"),
        ("fe80::1", "fe80::1"),
        ("localhost", "localhost"),
        ("jupyterhub.example.org", "jupyterhub.example.org"),
    ],
)
def test_ip_values(ip: str, expected: str) -> None:
    assert cfg("--ip", ip).ip == expected
    assert cfg(f"--ip={ip}").ip == expected


def test_ip_star_warns() -> None:
    warnings: list[str] = []
    assert parse(["--ip", "*"], {}, warnings).ip == ""
    assert warnings == [
        "Interpreting ip='*' as all-interfaces. "
        "Preferred usage is 0.0.0.0 for all IPv4 or '' for all-interfaces."
    ]
    warnings.clear()
    parse(["--ip", ""], {}, warnings)
    assert warnings == []


def test_empty_api_ip_is_all_interfaces_as_in_chp() -> None:
    """z2jh passes `--api-ip=`; Node CHP then listens on every interface (`*:8001`), and the hub
    pod reaches the API through its Service. Localhost here would keep the hub out."""
    assert cfg("--api-ip", "").api_ip == ""
    assert cfg("--api-ip=").api_ip == ""
    assert cfg().api_ip == "localhost"  # not given at all: CHP's default


@pytest.mark.parametrize(
    ("argv", "api_port"),
    [
        ([], 8001),
        (["--port", "9000"], 9001),
        (["--port", "9000", "--api-port", "7000"], 7000),
        (["--socket", "/tmp/p.sock"], 8001),
        (["--port", "0"], 0),
        (["--port", "0", "--api-port", "0"], 0),
    ],
)
def test_effective_api_port(argv: list[str], api_port: int) -> None:
    assert cfg(*argv).effective_api_port == api_port


# --- commander's reading of argv ---------------------------------------------------------------


def test_a_value_is_taken_whatever_it_looks_like() -> None:
    """As commander: an option that takes a value takes the next argument."""
    assert cfg("--pid-file", "-weird.pid").pid_file == "-weird.pid"
    assert cfg("--ip", "--port").ip == "--port"
    assert cfg("--protocol-rewrite", "--x").protocol_rewrite == "--x"


def test_equals_inside_value_is_kept() -> None:
    assert cfg("--custom-header=X-Q: a=b").custom_headers == (("X-Q", "a=b"),)
    assert cfg("--ssl-ciphers", "A=B").ssl_ciphers == "A=B"


def test_repeated_option_last_wins() -> None:
    assert cfg("--timeout", "1", "--timeout", "2").timeout == 2  # CHP: parseInt radix quirk
    assert cfg("--port", "1", "--port=2").port == 2


def test_double_dash_ends_options() -> None:
    assert cfg("--port", "1", "--") == cfg("--port", "1")
    assert usage_error("--", "--port", "1") == (
        "error: too many arguments. Expected 0 arguments but got 2."
    )


# --- values -----------------------------------------------------------------------------------


def test_keep_alive_timeout_zero_is_5000() -> None:
    assert cfg("--keep-alive-timeout", "0").keep_alive_timeout == 5000


def test_timeouts_zero_are_no_timeout() -> None:
    config = cfg("--timeout", "0", "--proxy-timeout=0")
    assert config.timeout is None and config.proxy_timeout is None


@pytest.mark.parametrize("port", ["0", "1", "65535"])
def test_port_range_accepted(port: str) -> None:
    assert cfg("--port", port).port == int(port)


@pytest.mark.parametrize("level", ["error", "warn", "info", "http", "verbose", "debug", "silly"])
def test_log_levels(level: str) -> None:
    assert cfg("--log-level", level).log_level == level
    assert cfg("--log-level", level.upper()).log_level == level  # CHP lower-cases it


def test_storage_backend_memory_is_the_default_store() -> None:
    assert cfg("--storage-backend", "memory").storage_backend == "memory"
    assert cfg().storage_backend is None  # open_store(None) is the memory store


@pytest.mark.parametrize(
    ("value", "header"),
    [
        ("k1: v1", ("k1", "v1")),
        (" k2 : host:123 ", ("k2", "host:123")),  # spec §6.4 case 5
        ("X-Empty:", ("X-Empty", "")),
        ("X-Spaces:   a  b  ", ("X-Spaces", "a  b")),
        ("  X-Lead:x", ("X-Lead", "x")),
    ],
)
def test_custom_header_parsing(value: str, header: tuple[str, str]) -> None:
    assert parse_custom_header(value) == header


def test_custom_headers_repeat_and_duplicates() -> None:
    config = cfg("--custom-header", "A: 1", "--custom-header", "B: 2", "--custom-header", "A: 3")
    assert config.custom_headers == (("A", "3"), ("B", "2"))  # first position, last value


# --- environment -------------------------------------------------------------------------------


def test_token_from_env() -> None:
    assert cfg(env={"CONFIGPROXY_AUTH_TOKEN": "s3cret"}).auth_token == "s3cret"
    assert cfg(env={"CONFIGPROXY_AUTH_TOKEN": ""}).auth_token is None


def test_token_from_file(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n\n")
    env = {"CONFIGPROXY_AUTH_TOKEN_FILE": str(token_file)}
    assert cfg(env=env).auth_token == "from-file"
    # an empty CONFIGPROXY_AUTH_TOKEN counts as unset, as in CHP's entrypoint
    assert cfg(env={**env, "CONFIGPROXY_AUTH_TOKEN": ""}).auth_token == "from-file"


def test_ssl_passphrases_from_env() -> None:
    config = cfg(
        env={
            "CONFIGPROXY_SSL_KEY_PASSPHRASE": "p1",
            "CONFIGPROXY_API_SSL_KEY_PASSPHRASE": "p2",
        }
    )
    assert (config.ssl_key_passphrase, config.api_ssl_key_passphrase) == ("p1", "p2")
    assert cfg(env={"CONFIGPROXY_SSL_KEY_PASSPHRASE": ""}).ssl_key_passphrase is None


# --- help and version ----------------------------------------------------------------------------


def test_help_unit(capsys: pytest.CaptureFixture[str]) -> None:
    for spelling in ("-h", "--help"):
        with pytest.raises(_Exit) as info:
            cfg(spelling)
        assert info.value.status == 0
        out = capsys.readouterr().out
        assert "(defaults to 8000)" in out
        for option in (*VALUE_OPTIONS, *FLAG_OPTIONS):
            assert option in out


def test_help_wins_over_other_errors() -> None:
    with pytest.raises(_Exit):
        cfg("--nope", "--port", "abc", "--help")


@pytest.mark.parametrize("spelling", ["-V", "--version"])
def test_version_process(spelling: str) -> None:
    result = run(spelling)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{__version__}\n", "")


def test_help_process() -> None:
    result = run("--help")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith("usage: hubproxy [options]")
    assert "--port <n>" in result.stdout and "(defaults to 8000)" in result.stdout


def _script(name: str) -> Path:
    path = Path(sysconfig.get_path("scripts")) / name
    if not path.exists():
        pytest.skip(f"console script {name} not installed")
    return path


@pytest.mark.parametrize("name", ["hubproxy", "configurable-http-proxy"])
def test_console_scripts(name: str) -> None:
    script = _script(name)
    version = subprocess.run([script, "-V"], capture_output=True, text=True, timeout=60)
    assert (version.returncode, version.stdout) == (0, f"{__version__}\n")
    usage = subprocess.run([script, "-h"], capture_output=True, text=True, timeout=60)
    assert usage.stdout.startswith(f"usage: {name} [options]")
    bad = subprocess.run([script, "--nope"], capture_output=True, text=True, timeout=60)
    assert (bad.returncode, bad.stderr) == (1, "error: unknown option '--nope'\n")


# --- errors, through the real process -------------------------------------------------------------

PORT_FLAGS = "--port <n> (defaults to 8000)"

# (argv, stderr line) for the errors commander (or CHP's CLI) prints on stderr, exit 1
STDERR_ERRORS: list[tuple[list[str], str]] = [
    (["--x"], "error: unknown option '--x'"),
    (["-x"], "error: unknown option '-x'"),
    (["--x-forward"], "error: unknown option '--x-forward'"),
    (["--prepend-path"], "error: unknown option '--prepend-path'"),
    (["--include-prefix"], "error: unknown option '--include-prefix'"),
    (["--custom-headers", "a:b"], "error: unknown option '--custom-headers'"),  # CHP 4.x
    (["--statsd-host", "h"], "error: unknown option '--statsd-host'"),  # removed in CHP 4.4
    (["--porta", "1"], "error: unknown option '--porta'"),
    (["--po", "1"], "error: unknown option '--po'"),  # no abbreviations
    (["--host-routing=yes"], "error: unknown option '--host-routing=yes'"),
    (["--port"], f"error: option '{PORT_FLAGS}' argument missing"),
    (["--ip", "1.2.3.4", "--api-ip"], "error: option '--api-ip <ip>' argument missing"),
    (["extra"], "error: too many arguments. Expected 0 arguments but got 1."),
    (
        ["--socket", "/tmp/p.sock", "--port", "8000"],
        f"error: option '--socket <path>' cannot be used with option '{PORT_FLAGS}'",
    ),
    (
        ["--port=9000", "--socket=/tmp/p.sock"],
        f"error: option '--socket <path>' cannot be used with option '{PORT_FLAGS}'",
    ),
    (
        ["--socket", "/tmp/p.sock", "--ip", ""],
        "error: option '--socket <path>' cannot be used with option '--ip <ip-address>'",
    ),
    (
        ["--api-socket", "/tmp/a.sock", "--api-port", "8001"],
        "error: option '--api-socket <path>' cannot be used with option '--api-port <n>'",
    ),
    (
        ["--api-socket", "/tmp/a.sock", "--api-ip", "127.0.0.1"],
        "error: option '--api-socket <path>' cannot be used with option '--api-ip <ip>'",
    ),
    (
        ["--metrics-socket", "/tmp/m.sock", "--metrics-port", "9100"],
        "error: option '--metrics-socket <path>' cannot be used with option '--metrics-port <n>'",
    ),
    (
        ["--metrics-socket", "/tmp/m.sock", "--metrics-ip", "127.0.0.1"],
        "error: option '--metrics-socket <path>' cannot be used with option "
        "'--metrics-ip <metrics-ip>'",
    ),
    (["--port", "abc"], f"error: option '{PORT_FLAGS}' argument 'abc' is invalid. Expected"),
    (["--port", "8000abc"], f"error: option '{PORT_FLAGS}' argument '8000abc' is invalid."),
    (["--port=-1"], f"error: option '{PORT_FLAGS}' argument '-1' is invalid."),
    (["--port", "65536"], f"error: option '{PORT_FLAGS}' argument '65536' is invalid."),
    (["--port="], f"error: option '{PORT_FLAGS}' argument '' is invalid."),
    (["--port", "+80"], f"error: option '{PORT_FLAGS}' argument '+80' is invalid."),
    (["--port", "8_000"], f"error: option '{PORT_FLAGS}' argument '8_000' is invalid."),
    (["--api-port", "x"], "error: option '--api-port <n>' argument 'x' is invalid."),
    (["--metrics-port", "x"], "error: option '--metrics-port <n>' argument 'x' is invalid."),
    (["--redirect-port", "x"], "error: option '--redirect-port <redirect-port>' argument 'x'"),
    (["--redirect-to", "0"], "error: option '--redirect-to <port>' argument '0' is invalid."),
    (["--timeout", "x"], "error: option '--timeout <n>' argument 'x' is invalid. Expected"),
    (["--timeout", "1.5"], "error: option '--timeout <n>' argument '1.5' is invalid."),
    (["--proxy-timeout", "-5"], "error: option '--proxy-timeout <n>' argument '-5' is invalid."),
    (
        ["--keep-alive-timeout", "2147483648"],
        "error: option '--keep-alive-timeout <timeout>' argument '2147483648' is invalid.",
    ),
    (
        ["--log-level", "loud"],
        "error: option '--log-level <loglevel>' argument 'loud' is invalid. "
        "Allowed choices are error, warn, info, http, verbose, debug, silly.",
    ),
    (
        ["--log-format", "xml"],
        "error: option '--log-format <format>' argument 'xml' is invalid. "
        "Allowed choices are text, json.",
    ),
    (["--default-target", "127.0.0.1:8081"], "error: option '--default-target <host>' argument"),
    (["--default-target", "ftp://h"], "error: option '--default-target <host>' argument"),
    (["--default-target", "http://h:port"], "error: option '--default-target <host>' argument"),
    (["--error-target", "hub/error"], "error: option '--error-target <host>' argument"),
    (["--socket="], "error: option '--socket <path>' argument '' is invalid. Expected a path."),
    (["--pid-file", ""], "error: option '--pid-file <pid-file>' argument '' is invalid."),
    (["--custom-header", "invalid"], "A colon was expected in custom header: invalid"),
    (["--custom-header", ":v"], "A colon was expected in custom header: :v"),
    (["--custom-header", "  : v"], "A colon was expected in custom header:   : v"),
    (["--custom-header", "a b: c"], "Invalid header name in custom header: 'a b: c'"),
    (
        ["--custom-header", "a: b\r\nc: d"],
        "Invalid header value in custom header: 'a: b\\r\\nc: d'",
    ),
]


@pytest.mark.parametrize(("argv", "message"), STDERR_ERRORS, ids=lambda v: repr(v)[:60])
def test_usage_errors_unit(argv: list[str], message: str) -> None:
    assert usage_error(*argv).startswith(message)


@pytest.mark.parametrize(("argv", "message"), STDERR_ERRORS, ids=lambda v: repr(v)[:60])
def test_usage_errors_process(argv: list[str], message: str) -> None:
    result = run(*argv)
    assert result.returncode == 1
    assert result.stderr.startswith(message)
    assert result.stderr.count("\n") == 1 + message.count("\n")  # one line
    assert result.stdout == ""  # nothing logged, nothing started


def test_custom_header_error_is_chps_case_6() -> None:
    """Spec §6.4 case 6: the process exits and stderr says `colon was expected`."""
    result = run("--custom-header", "invalid")
    assert result.returncode == 1 and "colon was expected" in result.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"CONFIGPROXY_AUTH_TOKEN": "a", "CONFIGPROXY_AUTH_TOKEN_FILE": "/dev/null"},
            "error: both CONFIGPROXY_AUTH_TOKEN and CONFIGPROXY_AUTH_TOKEN_FILE are set "
            "(but are exclusive)",
        ),
        (
            {"CONFIGPROXY_AUTH_TOKEN_FILE": "/nonexistent/token"},
            "error: cannot read CONFIGPROXY_AUTH_TOKEN_FILE /nonexistent/token: "
            "No such file or directory",
        ),
        (
            {"CONFIGPROXY_AUTH_TOKEN_FILE": "/dev/null"},
            "error: CONFIGPROXY_AUTH_TOKEN_FILE /dev/null is empty",
        ),
    ],
)
def test_token_env_errors(env: dict[str, str], message: str) -> None:
    assert usage_error(env=env) == message
    result = run(env=env)
    assert (result.returncode, result.stderr, result.stdout) == (1, message + "\n", "")


# (argv, log line) for the errors CHP logs at error level (stdout) before exiting 1
LOGGED_ERRORS: list[tuple[list[str], str]] = [
    (["--redirect-port", "8080"], "HTTPS redirection specified but certificates not provided."),
    (
        ["--redirect-port", "8080", "--redirect-to", "443"],
        "HTTPS redirection specified but certificates not provided.",
    ),
    (
        ["--error-target", "http://127.0.0.1:8081/hub/error", "--error-path", "/"],
        "Cannot specify both error-target and error-path. Pick one.",
    ),
    (["--error-path", "/nonexistent/pages"], "--error-path /nonexistent/pages is not a directory."),
]


@pytest.mark.parametrize(("argv", "message"), LOGGED_ERRORS)
def test_logged_errors_unit(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        check(cfg(*argv))
    assert str(info.value) == message


@pytest.mark.parametrize(("argv", "message"), LOGGED_ERRORS)
def test_logged_errors_process(argv: list[str], message: str) -> None:
    result = run(*argv)
    assert result.returncode == 1 and result.stderr == ""
    assert result.stdout.rstrip("\n").endswith(f" [ConfigProxy] error: {message}")


def test_ip_star_warning_is_logged_before_exiting() -> None:
    result = run("--ip", "*", "--redirect-port", "8080")  # exits before binding anything
    lines = result.stdout.splitlines()
    assert result.returncode == 1
    assert lines[0].endswith(
        " warn: Interpreting ip='*' as all-interfaces. "
        "Preferred usage is 0.0.0.0 for all IPv4 or '' for all-interfaces."
    )


# --- nothing silently ignored; the README tells the truth --------------------------------------

SRC = Path(__file__).resolve().parent.parent / "src" / "hubproxy"
README = Path(__file__).resolve().parent.parent / "README.md"

# fields used by cli.main itself
USED_BY_CLI = {"log_level", "log_format"}


def test_every_config_field_is_used() -> None:
    """A field nothing reads would be an option silently ignored."""
    from dataclasses import fields

    sources = "\n".join(
        p.read_text() for p in SRC.rglob("*.py") if p.name != "cli.py" or p.parent != SRC
    )
    unused = [
        field
        for field in (f.name for f in fields(Config))
        if not re.search(rf"\.{field}\b", sources) and field not in USED_BY_CLI
    ]
    assert unused == []


def _readme_rows() -> dict[str, list[str]]:
    rows = {}
    for line in README.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `-") and len(cells) == 4:
            for option in cells[0].split(", "):
                rows[option.strip("`")] = cells
    return rows


def test_readme_starts_with_the_two_commands() -> None:
    lines = README.read_text().splitlines()
    assert lines[0].startswith("# ")
    body = [line for line in lines[1:] if line.strip() and not line.startswith("```")]
    assert body[:2] == [
        "pip install . && hubproxy --default-target http://127.0.0.1:8081",
        "pip install -e '.[test,integration]' && python -m pytest",
    ]
    assert lines[1:3] == ["", "```sh"] and lines[5] == "```"


def test_readme_lists_every_option() -> None:
    parser = _build_parser("hubproxy")
    options = {o for a in parser._actions for o in a.option_strings}
    assert set(_readme_rows()) == options


def test_ci_script_runs_the_readme_test_command() -> None:
    script = (README.parent / ".ci" / "run").read_text()
    assert script.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in script
    assert os.access(README.parent / ".ci" / "run", os.X_OK)
    commands = [line for line in script.splitlines() if line and not line.startswith(("#", " "))]
    assert commands[-1] == 'python -m pytest "$@"'
    # the README's `.[test]` and more: JupyterHub for tests/integration, and the linters
    assert "python -m pip install -q -e '.[test,integration,lint]'" in commands
    assert {"ruff check .", "ruff format --check .", "python -m mypy"} <= set(commands)


def test_workers_auto_is_one_per_usable_cpu() -> None:
    """The cores this process may run on, capped by its cgroup's CPU quota (tests/test_cpus.py)."""
    workers = cfg("--workers", "auto").workers
    assert workers == available_cpus()
    assert 1 <= workers <= len(os.sched_getaffinity(0))
    assert cfg().workers == 1

"""Command line (placeholder: the full CHP option surface lands with the foundation issue)."""

from __future__ import annotations

import argparse
import os
import sys

from hubproxy import __version__
from hubproxy.config import Config
from hubproxy.logs import setup_logging


def parse(argv: list[str]) -> Config:
    p = argparse.ArgumentParser(prog="configurable-http-proxy")
    p.add_argument("-V", "--version", action="version", version=__version__)
    p.add_argument("--ip")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-ip", default="localhost")
    p.add_argument("--api-port", type=int)
    p.add_argument("--default-target")
    p.add_argument("--error-target")
    p.add_argument("--log-level", default="info")
    ns = p.parse_args(argv)
    return Config(
        ip=ns.ip,
        port=ns.port,
        api_ip=ns.api_ip,
        api_port=ns.api_port,
        default_target=ns.default_target,
        error_target=ns.error_target,
        log_level=ns.log_level,
        auth_token=os.environ.get("CONFIGPROXY_AUTH_TOKEN") or None,
    )


def main(argv: list[str] | None = None) -> int:
    config = parse(sys.argv[1:] if argv is None else argv)
    setup_logging(config.log_level, config.log_format)
    from hubproxy.app import run

    return run(config)

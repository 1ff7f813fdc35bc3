"""The container image's entrypoint, `python -m hubproxy.container [options]`: what CHP's
`chp-docker-entrypoint` does, for hubproxy.

CHP's image runs `configurable-http-proxy --api-ip=0.0.0.0 "$@"` unless the arguments already
name `--api-ip` or `--api-socket`: in a container the API must be reachable from other
containers and through port forwarding, not only from the container's own loopback. Its
`CONFIGPROXY_AUTH_TOKEN_FILE` needs nothing here: hubproxy reads that variable everywhere,
with the entrypoint's rules (`cli.auth_token_from_env`).

Options are recognised as the command line reads them (`cli.given_options`), not by a
substring search: CHP's shell pattern also matches `--api-ip` inside another option's value.

The proxy then runs in this very process. The container runtime starts the entrypoint as
PID 1, so PID 1 is hubproxy and gets the runtime's SIGTERM itself, which is what the shell
entrypoint's `exec` is for, without a second interpreter start. Kubernetes charts that set
`command:` (z2jh names `configurable-http-proxy`) bypass the entrypoint altogether.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from hubproxy.cli import given_options
from hubproxy.cli import main as cli_main

CONTAINER_API_IP = "0.0.0.0"  # CHP's image's choice: IPv4, all interfaces


def container_args(argv: Sequence[str]) -> list[str]:
    """The command line hubproxy runs with in the image."""
    if given_options(argv) & {"--api-ip", "--api-socket"}:
        return list(argv)
    return [f"--api-ip={CONTAINER_API_IP}", *argv]


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(container_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())

"""pytest plugin for JupyterHub's test suite when it runs as root (as CI does here).

jupyter_server refuses to start as root unless told `--allow-root`, so every test that spawns a
real single-user server (`jupyterhub-singleuser`, `python -m jupyterhub.singleuser`) would time
out waiting for it. The spawner passes only `Spawner.cmd` + `Spawner.get_args()` and a filtered
environment (config files in $HOME or $JUPYTER_CONFIG_DIR never reach it), so the least
invasive fix is to append `--allow-root` to the arguments of single-user commands, and only when
running as root. Nothing else in JupyterHub's tests or in the installed packages changes.
"""

from __future__ import annotations

import os


def _is_singleuser(cmd: list[str] | str) -> bool:
    text = cmd if isinstance(cmd, str) else " ".join(cmd)
    return "jupyterhub-singleuser" in text or "jupyterhub.singleuser" in text


def pytest_configure(config):
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return
    from jupyterhub.spawner import Spawner

    original = Spawner.get_args
    if getattr(original, "_hubproxy_allow_root", False):
        return

    def get_args(self):
        args = list(original(self))
        if _is_singleuser(self.cmd) and "--allow-root" not in args:
            args.append("--allow-root")
        return args

    get_args._hubproxy_allow_root = True
    Spawner.get_args = get_args

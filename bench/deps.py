"""Install what the bench needs when it is missing: wrk (apt), Node CHP 5 (npm, into
bench/.cache/chp), and the Python packages the backend and clients use (pip)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys

from bench.config import CHP_BIN, CHP_DIR

PY_MODULES = {"uvloop": "uvloop", "httptools": "httptools"}


def _run(argv: list[str], timeout: float = 600) -> bool:
    print("+", " ".join(argv), flush=True)
    try:
        done = subprocess.run(argv, timeout=timeout, capture_output=True, text=True)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"  failed: {exc}", flush=True)
        return False
    if done.returncode != 0:
        print("  failed:", (done.stdout + done.stderr).strip()[-600:], flush=True)
    return done.returncode == 0


def ensure_wrk() -> bool:
    if shutil.which("wrk"):
        return True
    if shutil.which("apt-get"):
        _run(["apt-get", "update"])
        _run(["apt-get", "install", "-y", "wrk"])
    return shutil.which("wrk") is not None


def ensure_chp() -> bool:
    if CHP_BIN.exists():
        return True
    if not shutil.which("npm"):
        print("npm not found: cannot install configurable-http-proxy", flush=True)
        return False
    CHP_DIR.mkdir(parents=True, exist_ok=True)
    _run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(CHP_DIR),
          "configurable-http-proxy@5"])  # fmt: skip
    return CHP_BIN.exists()


def ensure_python(modules: dict[str, str]) -> None:
    missing = [pkg for mod, pkg in modules.items() if importlib.util.find_spec(mod) is None]
    if missing:
        _run([sys.executable, "-m", "pip", "install", "--quiet", *missing])


def ensure_matplotlib() -> bool:
    ensure_python({"matplotlib": "matplotlib"})
    return importlib.util.find_spec("matplotlib") is not None

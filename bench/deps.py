"""Install what the bench needs when it is missing: wrk (apt), Node CHP 5 (npm, into
bench/.cache/chp), and the Python packages the backend and clients use (pip); for the byte-relay
floors, socat (apt) and bench/relay.c compiled with gcc into bench/.cache/relay."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys

from bench.config import CACHE, CHP_BIN, CHP_DIR, RELAY_BIN, RELAY_SRC

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


def _ensure_apt(tool: str, package: str) -> bool:
    if shutil.which(tool):
        return True
    if shutil.which("apt-get"):
        _run(["apt-get", "update"])
        _run(["apt-get", "install", "-y", package])
    return shutil.which(tool) is not None


def ensure_wrk() -> bool:
    return _ensure_apt("wrk", "wrk")


def ensure_floor(name: str) -> str | None:
    """None when the floor ``name`` can run, else why not."""
    if name == "socat":
        return None if _ensure_apt("socat", "socat") else "socat is not installed"
    if name == "c-relay":
        fresh = RELAY_BIN.exists() and RELAY_BIN.stat().st_mtime >= RELAY_SRC.stat().st_mtime
        if fresh:
            return None
        gcc = shutil.which("gcc") or shutil.which("cc")
        if not gcc:
            return "no C compiler (gcc) to build bench/relay.c"
        CACHE.mkdir(parents=True, exist_ok=True)
        _run([gcc, "-O2", "-Wall", "-o", str(RELAY_BIN), str(RELAY_SRC)], timeout=120)
        return None if RELAY_BIN.exists() else "bench/relay.c did not compile"
    return f"unknown floor {name!r}"


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

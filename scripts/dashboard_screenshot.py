"""Take docs/dashboard.png: hubproxy with JupyterHub-like routes and some traffic, its
`/dashboard` in headless Chromium (the same CDP driver as tests/test_dashboard.py).

    python scripts/dashboard_screenshot.py [--out docs/dashboard.png]

Everything runs on 127.0.0.1: four `bench.backend` processes stand in for the hub and three
single-user servers; threads send requests (none to bob, whose activity ages) and three
WebSockets stay open while the page refreshes twice.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import websockets  # noqa: E402

from browser import Browser, find_chromium  # noqa: E402

TOKEN = "screenshot-token"
USERS = {"/user/alice": "", "/user/bob": "", "/user/carol/gpu": "gpu"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def api(url: str, method: str, path: str, data: dict | None = None) -> None:
    body = json.dumps(data).encode() if data is not None else None
    request = urllib.request.Request(
        f"{url}/api/routes{path}",
        data=body,
        method=method,
        headers={"Authorization": f"token {TOKEN}"},
    )
    urllib.request.urlopen(request, timeout=5).read()


def traffic(public: str, stop: threading.Event) -> None:
    paths = [
        "/user/alice/api/status",
        "/user/alice/lab",
        "/user/carol/gpu/api/metrics/v1",
        "/hub/api/users",
        "/hub/home",
    ]
    while not stop.is_set():
        path = random.choice(paths)
        with contextlib.suppress(urllib.error.URLError, OSError):
            urllib.request.urlopen(public + path, timeout=5).read()
        stop.wait(random.uniform(0.005, 0.04))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "docs" / "dashboard.png"))
    args = ap.parse_args()
    chromium = find_chromium()
    if chromium is None:
        print("chromium is not installed", file=sys.stderr)
        return 1

    procs: list[subprocess.Popen[bytes]] = []
    ports = [free_port() for _ in range(4)]
    for port in ports:
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "bench.backend", "--port", str(port)],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    hub = f"http://127.0.0.1:{ports[0]}"
    env = {**os.environ, "CONFIGPROXY_AUTH_TOKEN": TOKEN}
    proxy = subprocess.Popen(
        [
            *(sys.executable, "-m", "hubproxy", "--ip", "127.0.0.1", "--port", "0"),
            *("--api-ip", "127.0.0.1", "--api-port", "0", "--default-target", hub),
        ],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    procs.append(proxy)
    stop = threading.Event()
    try:
        assert proxy.stdout is not None
        public = api_url = ""
        for line in proxy.stdout:
            if m := re.search(r"Proxying (\S+) to", line):
                public = m.group(1)
            if m := re.search(r"Proxy API at (\S+)/api/routes", line):
                api_url = m.group(1)
                break
        threading.Thread(target=lambda: [None for _ in proxy.stdout], daemon=True).start()
        api(api_url, "POST", "/", {"target": hub, "hub": True})
        for (prefix, server), port in zip(USERS.items(), ports[1:], strict=True):
            user = prefix.split("/")[2]
            api(
                api_url,
                "POST",
                prefix,
                {"target": f"http://127.0.0.1:{port}", "user": user, "server_name": server},
            )
            time.sleep(1.2)  # different last-activity ages
        for _ in range(4):
            threading.Thread(target=traffic, args=(public, stop), daemon=True).start()

        async def shoot() -> None:
            ws_url = public.replace("http://", "ws://") + "/user/alice/api/kernels/k1/channels"
            sockets = [await websockets.connect(ws_url) for _ in range(3)]
            async with Browser(chromium, width=1200, height=470) as page:
                await page.navigate(f"{api_url}/dashboard")
                await page.evaluate(
                    "(() => { document.getElementById('token').value = "
                    + json.dumps(TOKEN)
                    + "; document.getElementById('login').requestSubmit(); })()"
                )
                await page.wait_for("document.querySelectorAll('#routes tbody tr').length === 4")
                await asyncio.sleep(11)  # two refreshes: rates and response times
                await page.screenshot(Path(args.out))
            for ws in sockets:
                await ws.close()

        asyncio.run(shoot())
        print(f"wrote {args.out}")
    finally:
        stop.set()
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())

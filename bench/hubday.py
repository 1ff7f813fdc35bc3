"""A day at a busy hub (issue #17): both proxies side by side, each in front of its own hub and
its own users' servers, with the same simulated class, sampled every second.

Each proxy gets a world of its own: a backend process (``bench/hubday_backend.py``: the hub, with
a deliberately slow error page, and one port per user server) and the hub's calls to the REST
API. The users of both worlds follow one schedule, made from a fixed seed: servers start (the
hub adds the route, as JupyterHub does: ``POST /api/routes/user/NAME`` with ``{"target": ...,
"jupyterhub": true, "user": NAME, "server_name": ""}``, on a fresh connection per call) and stop
(route deleted, then the server) all day; some die with their route left in place until the hub
notices, and their users' JupyterLab keeps retrying, so those requests go to ``--error-target``.

An active user has a browser (a keep-alive connection pool, kept open longer than the proxy's
keep-alive timeout, as browsers do), a kernel WebSocket with a small message every few seconds,
JupyterLab's API polls, page and static loads, sometimes a large download and a slow upload
(longer than a minute in the full mode). The hub polls ``GET /api/routes`` every few seconds.

The proxies share core 0, the load side (this process, both backends, the sampler) core 1. What
a proxy's process tree uses is read from /proc once a second by ``bench/hubday_sample.py``;
latencies, errors and active users are counted here, per second. Every loop is bounded in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import statistics
import sys
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench import procs
from bench.config import REPO, ProxySpec
from bench.hubday_sample import ephemeral_range


@dataclass(frozen=True)
class DayMode:
    name: str
    users: int
    load_s: float  # the day: users come and go
    idle_s: float  # sampled before the first user: the idle baseline
    cooldown_s: float  # sampled after the last user left (TIME_WAIT lasts 60 s on Linux)
    session_s: tuple[float, float]  # how long a server runs
    gap_s: tuple[float, float]  # before the same user starts again
    notice_s: tuple[float, float]  # a dead server's route stays this long
    dead_share: float  # sessions that end with the server dying
    early_share: float  # users whose first server starts in the first tenth of the day
    ws_every: float  # a kernel message
    poll_every: float  # JupyterLab's API polls (kernels, sessions, contents)
    page_every: float  # a page load (page and its static files)
    statics: int
    retry_every: float  # JupyterLab's retries while its server is dead
    download_mib: int
    download_share: float  # sessions with a large download
    upload_s: float  # a slow upload lasts this long
    upload_share: float  # sessions with one
    api_poll_s: float  # the hub's GET /api/routes
    error_delay: float  # the hub's error page takes this long
    lat_window: int  # latency percentiles over this many seconds


DAY_MODES = {
    "smoke": DayMode(
        "smoke", users=12, load_s=15, idle_s=1, cooldown_s=3, session_s=(4, 9), gap_s=(1, 3),
        notice_s=(2, 4), dead_share=0.25, early_share=0.7, ws_every=1, poll_every=2,
        page_every=5, statics=3, retry_every=0.5, download_mib=2, download_share=0.5,
        upload_s=4, upload_share=0.3, api_poll_s=1, error_delay=0.3, lat_window=1,
    ),
    "quick": DayMode(
        "quick", users=100, load_s=180, idle_s=3, cooldown_s=20, session_s=(40, 110),
        gap_s=(5, 30), notice_s=(10, 25), dead_share=0.2, early_share=0.7, ws_every=3,
        poll_every=10, page_every=60, statics=5, retry_every=1, download_mib=8,
        download_share=0.4, upload_s=30, upload_share=0.2, api_poll_s=3, error_delay=1,
        lat_window=5,
    ),
    "full": DayMode(
        "full", users=300, load_s=1200, idle_s=5, cooldown_s=70, session_s=(150, 480),
        gap_s=(20, 120), notice_s=(30, 60), dead_share=0.2, early_share=0.7, ws_every=3,
        poll_every=10, page_every=120, statics=6, retry_every=1, download_mib=32,
        download_share=0.5, upload_s=75, upload_share=0.25, api_poll_s=5, error_delay=2,
        lat_window=10,
    ),
}  # fmt: skip

UPLOAD_CHUNK = 16 * 1024  # every UPLOAD_TICK: 64 KiB/s
UPLOAD_TICK = 0.25
KERNEL_MSG = json.dumps({"header": {"msg_type": "execute_request"}, "content": "x" * 120})
SEED = 17


# -- the schedule ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Session:
    start: float
    end: float  # the server stops (or dies)
    dead: bool
    notice: float  # the route is deleted (== end unless dead)
    download_at: float | None
    upload_at: float | None


def build_schedule(m: DayMode, seed: int = SEED) -> list[list[Session]]:
    """Each user's sessions, from a fixed seed: both proxies get the same day."""
    rng = random.Random(seed)
    margin = max(2.0, 0.1 * m.upload_s)
    out: list[list[Session]] = []
    for i in range(m.users):
        early = i < m.users * m.early_share
        t = rng.uniform(0, m.load_s * (0.1 if early else 0.6))
        sessions: list[Session] = []
        while t < m.load_s - m.session_s[0] / 2:
            length = rng.uniform(*m.session_s)
            if i == 0 and not sessions:  # one upload and one download at least, every day
                length = max(length, m.upload_s + margin + 3)
            end = min(t + length, m.load_s)
            dead = i > 0 and end < m.load_s and rng.random() < m.dead_share
            notice = min(end + rng.uniform(*m.notice_s), m.load_s) if dead else end
            download_at = None
            if rng.random() < m.download_share or (i == 0 and not sessions):
                download_at = t + rng.uniform(0.2, 0.6) * (end - t)
            upload_at = None
            latest = end - m.upload_s - margin
            if latest > t + 1 and (rng.random() < m.upload_share or (i == 0 and not sessions)):
                upload_at = rng.uniform(t + 1, latest)
            sessions.append(Session(t, end, dead, notice, download_at, upload_at))
            t = notice + rng.uniform(*m.gap_s)
        out.append(sessions)
    return out


def port_regions(worlds: int, span: int) -> list[int]:
    """A base port per world: ``span`` ports each, below the kernel's ephemeral range (so that a
    port tells whose end of a connection it is), at a random offset so that two days on one
    machine rarely meet (a port found taken is skipped by the backend)."""
    low, high = ephemeral_range()
    need = worlds * span
    if low - 10_000 >= need:
        start = random.randrange(10_000, low - need + 1)
    elif 65_535 - high > need:
        start = random.randrange(high + 1, 65_535 - need + 1)
    else:
        raise RuntimeError(f"no room for {need} ports outside the ephemeral range {low}-{high}")
    return [start + i * span for i in range(worlds)]


# -- counting ------------------------------------------------------------------------------------
def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * p // 100)))
    return ordered[int(rank) - 1]


def lat_summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50_ms": pct(values, 50) * 1e3,
        "p99_ms": pct(values, 99) * 1e3,
        "max_ms": max(values) * 1e3,
    }


class Tally:
    """What one world's users and hub saw, per second and in all."""

    def __init__(self) -> None:
        self.window: dict[str, list[float]] = defaultdict(list)
        self.all: dict[str, list[float]] = defaultdict(list)
        self.count: Counter[str] = Counter()  # this second
        self.errors: Counter[str] = Counter()  # this second, unexpected
        self.expected: Counter[str] = Counter()  # this second, the dead servers' users
        self.total_errors: Counter[str] = Counter()
        self.total_expected: Counter[str] = Counter()
        self.total_count: Counter[str] = Counter()
        self.first_errors: dict[str, str] = {}

    def add(self, kind: str, seconds: float) -> None:
        self.window[kind].append(seconds)
        self.all[kind].append(seconds)
        self.count[kind] += 1
        self.total_count[kind] += 1

    def note(self, kind: str) -> None:
        self.count[kind] += 1
        self.total_count[kind] += 1

    def fail(self, kind: str, expected: bool, detail: str = "") -> None:
        if expected:
            self.expected[kind] += 1
            self.total_expected[kind] += 1
        else:
            self.errors[kind] += 1
            self.total_errors[kind] += 1
            if detail and kind not in self.first_errors:
                self.first_errors[kind] = detail[:300]

    def second(self, with_latency: bool) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "n": dict(self.count),
            "errors": dict(self.errors),
            "expected": dict(self.expected),
        }
        self.count.clear()
        self.errors.clear()
        self.expected.clear()
        if with_latency:
            rec["lat"] = {k: lat_summary(v) for k, v in self.window.items() if v}
            self.window.clear()
        return rec

    def totals(self) -> dict[str, Any]:
        return {
            "errors": dict(self.total_errors),
            "expected": dict(self.total_expected),
            "counts": dict(self.total_count),
            "first_errors": self.first_errors,
            "latency": {k: lat_summary(v) for k, v in self.all.items()},
        }


def classify(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.WSServerHandshakeError):
        return f"ws_handshake_{exc.status}"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "disconnected"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "payload"
    if isinstance(exc, aiohttp.ClientOSError):
        return "oserror"
    return type(exc).__name__


# -- a world: one proxy, its backend, its users ----------------------------------------------------
@dataclass
class User:
    name: str
    dead: bool = False  # its server died; the route is still there


@dataclass
class World:
    spec: ProxySpec
    mode: DayMode
    base: int  # the hub's port; user servers above it
    span: int
    logs: Path
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    port: int = 0
    api_port: int = 0
    control_port: int = 0
    backend: procs.Managed | None = None
    proxy: procs.Managed | None = None
    tally: Tally = field(default_factory=Tally)
    active: int = 0
    dead: int = 0
    routes: int = 0
    error: str | None = None
    seconds: list[dict[str, Any]] = field(default_factory=list)
    polls: list[tuple[float, float, int]] = field(default_factory=list)  # (t, seconds, routes)
    backend_stats: dict[str, int] = field(default_factory=dict)
    ctl: aiohttp.ClientSession | None = None
    api_http: aiohttp.ClientSession | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def hub(self) -> str:
        return f"http://127.0.0.1:{self.base}"

    def start(self, proxy_core: int, load_core: int) -> None:
        self.control_port = procs.free_port()
        self.backend = procs.Managed(
            f"{self.name}-backend",
            [sys.executable, "-m", "bench.hubday_backend", "--control-port",
             str(self.control_port), "--port-base", str(self.base), "--port-span",
             str(self.span), "--error-delay", str(self.mode.error_delay)],
            load_core,
            self.logs / f"hubday-{self.name}-backend.log",
            env={"PYTHONPATH": str(REPO)},
        )  # fmt: skip
        procs.wait_port(self.control_port, self.backend.proc, 20)
        procs.wait_port(self.base, self.backend.proc, 20)
        self.port, self.api_port = procs.free_port(), procs.free_port()
        argv = self.spec.command(self.port, self.api_port, self.hub)
        argv += ["--error-target", self.hub + "/hub/error"]
        self.proxy = procs.Managed(
            self.name,
            argv,
            proxy_core,
            self.logs / f"hubday-{self.name}.log",
            env={"CONFIGPROXY_AUTH_TOKEN": self.token, **dict(self.spec.env)},
        )
        procs.wait_port(self.port, self.proxy.proc, 30)
        procs.wait_port(self.api_port, self.proxy.proc, 30)

    def stop(self) -> None:
        for proc in (self.proxy, self.backend):
            if proc is not None:
                proc.stop()

    def sampler_spec(self) -> dict[str, Any]:
        assert self.proxy is not None
        return {
            "name": self.name,
            "pid": self.proxy.pid,
            "port": self.port,
            "api_port": self.api_port,
            "lo": self.base,
            "hi": self.base + self.span,
        }

    # -- the hub's side ------------------------------------------------------------------------
    async def control(self, method: str, path: str) -> dict[str, Any]:
        assert self.ctl is not None
        url = f"http://127.0.0.1:{self.control_port}{path}"
        async with self.ctl.request(method, url) as resp:
            data: dict[str, Any] = await resp.json()
            return data

    async def api(self, method: str, path: str, body: object, kind: str) -> tuple[int, bytes]:
        """One REST API call on a fresh connection (``Connection: close``), as JupyterHub's
        HTTP client makes them. Returns (status, body); (0, b"") if it failed."""
        assert self.api_http is not None
        url = f"http://127.0.0.1:{self.api_port}/api/routes{path}"
        headers = {"Authorization": f"token {self.token}", "Connection": "close"}
        start = time.monotonic()
        try:
            async with self.api_http.request(
                method, url, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=30)
            ) as resp:
                data = await resp.read()
                status = resp.status
        except Exception as exc:
            self.tally.fail(f"api_{classify(exc)}", False, repr(exc))
            return 0, b""
        self.tally.add(kind, time.monotonic() - start)
        if status not in (200, 201, 204):
            self.tally.fail(f"api_{method.lower()}_{status}", False, data[:200].decode("latin-1"))
        return status, data

    async def poller(self, t0: float, until: float) -> None:
        """The hub's activity poll: GET /api/routes every api_poll_s, until ``until``."""
        while time.monotonic() < until:
            start = time.monotonic()
            status, data = await self.api("GET", "", None, "api_get")
            if status == 200:
                with contextlib.suppress(ValueError):
                    self.routes = len(json.loads(data))
                self.polls.append((start - t0, time.monotonic() - start, self.routes))
            await asyncio.sleep(max(0.0, start + self.mode.api_poll_s - time.monotonic()))

    async def ticker(self, t0: float, until: float) -> None:
        """Once a second: active users, counts and errors of the second before."""
        tick = 0
        while True:
            tick += 1
            at = t0 - self.mode.idle_s + tick
            if at > until:
                return
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            rec = self.tally.second(tick % self.mode.lat_window == 0)
            rec |= {"t": round(at - t0, 3), "active": self.active, "dead": self.dead}
            self.seconds.append(rec | {"routes": self.routes})

    async def user_life(self, index: int, sessions: list[Session], t0: float) -> None:
        user = User(f"u{index:03d}")
        for number, session in enumerate(sessions):
            await sleep_until(t0 + session.start)
            try:
                await self.session(user, session, number, t0)
            except Exception as exc:
                self.tally.fail("driver", False, "".join(traceback.format_exception(exc))[-600:])

    async def session(self, user: User, s: Session, number: int, t0: float) -> None:
        m = self.mode
        port = int((await self.control("POST", "/start"))["port"])
        route = {"target": f"http://127.0.0.1:{port}", "jupyterhub": True, "user": user.name,
                 "server_name": ""}  # fmt: skip
        status, _ = await self.api("POST", f"/user/{user.name}", route, "api_post")
        if status not in (200, 201):
            await self.control("POST", f"/stop?port={port}")
            return
        self.active += 1
        rng = random.Random(f"{SEED}-{user.name}-{number}")
        browser = Browser(self, user, rng)
        live = [
            asyncio.create_task(browser.page_load()),
            asyncio.create_task(browser.kernel()),
            asyncio.create_task(browser.polls()),
            asyncio.create_task(browser.pages()),
        ]
        if s.download_at is not None:
            live.append(asyncio.create_task(browser.download(t0 + s.download_at)))
        upload = None
        if s.upload_at is not None:
            upload = asyncio.create_task(browser.upload(t0 + s.upload_at))
        try:
            await sleep_until(t0 + s.end)
            if s.dead:
                user.dead = True  # from here on its failures are the expected kind
                self.active -= 1
                self.dead += 1
                await self.control("POST", f"/kill?port={port}")
                browser.closing = True
                await cancel([*live, *([upload] if upload else [])])
                browser.closing = False
                retry = [asyncio.create_task(browser.retry_api()),
                         asyncio.create_task(browser.retry_ws())]  # fmt: skip
                await sleep_until(t0 + s.notice)
                browser.closing = True
                await cancel(retry)
            else:
                if upload is not None and not upload.done():
                    await asyncio.wait([upload], timeout=m.upload_s + 30)
                    if not upload.done():
                        self.tally.fail("upload_unfinished", False, "still going at stop")
                browser.closing = True
                await cancel([*live, *([upload] if upload else [])])
                self.active -= 1
        finally:
            await browser.close()
        await self.api("DELETE", f"/user/{user.name}", None, "api_delete")
        if user.dead:
            user.dead = False
            self.dead -= 1
        else:
            await self.control("POST", f"/stop?port={port}")


def where(task: asyncio.Task[Any]) -> str:
    """The chain of awaits a task is suspended in: function:line, outermost first."""
    out: list[str] = []
    coro: Any = task.get_coro()
    while coro is not None and len(out) < 20:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
        if frame is not None:
            out.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
    return " > ".join(out)


async def sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def cancel(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel and wait, again if a task lived through it (a cancellation can be lost when
    what it awaited ended at the same moment); at most 10 s. The loops also stop on their
    own when their browser is closing."""
    for _ in range(20):
        pending = [t for t in tasks if not t.done()]
        if not pending:
            break
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=0.5)
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: a failure was counted where it happened


def jitter(rng: random.Random, every: float) -> float:
    return every * rng.uniform(0.7, 1.3)


class Browser:
    """One user's JupyterLab: a pool of up to 6 keep-alive connections, kept 30 s (longer than
    the proxy's 5 s, so the proxy closes them, as it does a browser's), and its kernel."""

    def __init__(self, world: World, user: User, rng: random.Random) -> None:
        self.world, self.user, self.rng = world, user, rng
        self.closing = False  # every loop ends when this is set (and on cancellation)
        self.base = f"http://127.0.0.1:{world.port}/user/{user.name}"
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=6, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(total=30),
            auto_decompress=False,
        )
        self.kernel_id = f"k{rng.randrange(1 << 32):08x}"

    async def close(self) -> None:
        await self.http.close()

    def fail(self, kind: str, detail: str = "") -> None:
        self.world.tally.fail(kind, self.user.dead, detail)

    async def fetch(self, path: str, kind: str = "req") -> None:
        """A small GET; a stale keep-alive connection (closed by the proxy as it was reused)
        is tried again once, as browsers do, and counted as ``stale_retry``."""
        tally = self.world.tally
        for attempt in (1, 2):
            start = time.monotonic()
            try:
                async with self.http.get(self.base + path) as resp:
                    await resp.read()
                    status = resp.status
            except aiohttp.ServerDisconnectedError as exc:
                if attempt == 1 and not self.user.dead:
                    tally.note("stale_retry")
                    continue
                self.fail(classify(exc), repr(exc))
                return
            except Exception as exc:
                self.fail(classify(exc), repr(exc))
                return
            if status == 200:
                tally.add(kind, time.monotonic() - start)
            else:
                self.fail(f"http_{status}", f"GET {path}")
                if self.user.dead:
                    tally.add("dead", time.monotonic() - start)
            return

    async def page_load(self) -> None:
        await self.fetch("/lab")
        n = self.world.mode.statics
        await asyncio.gather(*(self.fetch(f"/static/lab/{i}.js") for i in range(n)))

    async def pages(self) -> None:
        while not self.closing:
            await asyncio.sleep(jitter(self.rng, self.world.mode.page_every))
            await self.page_load()

    async def polls(self) -> None:
        while not self.closing:
            await asyncio.sleep(jitter(self.rng, self.world.mode.poll_every))
            for what in ("kernels", "sessions", "contents"):
                await self.fetch(f"/api/{what}")

    async def kernel(self) -> None:
        """The kernel's channels: a small message every ws_every s, its echo timed."""
        tally, every = self.world.tally, self.world.mode.ws_every
        while not self.closing:
            try:
                async with asyncio.timeout(30):
                    ws = await self.http.ws_connect(
                        f"{self.base}/api/kernels/{self.kernel_id}/channels", autoping=False
                    )
            except Exception as exc:
                self.fail(classify(exc), repr(exc))
                await asyncio.sleep(1)
                continue
            tally.note("ws_open")
            try:
                while not self.closing:
                    await asyncio.sleep(jitter(self.rng, every))
                    start = time.monotonic()
                    await ws.send_str(KERNEL_MSG)
                    async with asyncio.timeout(30):
                        msg = await ws.receive()
                    if msg.type != aiohttp.WSMsgType.TEXT or msg.data != KERNEL_MSG:
                        self.fail("ws_closed", f"{msg.type}")
                        break
                    tally.add("ws", time.monotonic() - start)
            except Exception as exc:
                self.fail(f"ws_{classify(exc)}", repr(exc))
            finally:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(2):
                        await ws.close()
            await asyncio.sleep(1)

    async def download(self, at: float) -> None:
        await sleep_until(at)
        size = self.world.mode.download_mib << 20
        start, got = time.monotonic(), 0
        try:
            async with self.http.get(
                f"{self.base}/files/big?size={size}", timeout=aiohttp.ClientTimeout(total=300)
            ) as resp:
                status = resp.status
                async for chunk in resp.content.iter_chunked(1 << 18):
                    got += len(chunk)
        except Exception as exc:
            self.fail(f"download_{classify(exc)}", repr(exc))
            return
        if status != 200 or got != size:
            self.fail("download_short", f"status {status}, {got} of {size} bytes")
        else:
            self.world.tally.add("download", time.monotonic() - start)

    async def upload(self, at: float) -> None:
        """A slow PUT: UPLOAD_CHUNK every UPLOAD_TICK for upload_s, Content-Length known (a
        browser's file): the server must get every byte."""
        await sleep_until(at)
        chunks = max(1, int(self.world.mode.upload_s / UPLOAD_TICK))
        size = chunks * UPLOAD_CHUNK
        piece = b"u" * UPLOAD_CHUNK

        async def body() -> Any:
            for i in range(chunks):
                if i:
                    await asyncio.sleep(UPLOAD_TICK)
                yield piece

        start = time.monotonic()
        try:
            async with self.http.put(
                f"{self.base}/api/contents/upload",
                data=body(),
                headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
                timeout=aiohttp.ClientTimeout(total=self.world.mode.upload_s * 3 + 60),
            ) as resp:
                status, answer = resp.status, await resp.read()
        except Exception as exc:
            self.fail(f"upload_{classify(exc)}", repr(exc))
            return
        received = -1
        with contextlib.suppress(ValueError, KeyError, TypeError):
            received = int(json.loads(answer)["received"])
        if status != 200 or received != size:
            self.fail("upload_cut", f"status {status}, server got {received} of {size} bytes")
        else:
            self.world.tally.add("upload", time.monotonic() - start)

    async def retry_api(self) -> None:
        """JupyterLab after its server died: its API calls fail and are tried again."""
        while not self.closing:
            await self.fetch("/api/kernels", "req")
            await asyncio.sleep(self.world.mode.retry_every)

    async def retry_ws(self) -> None:
        """... and its kernel's WebSocket reconnects."""
        url = f"{self.base}/api/kernels/{self.kernel_id}/channels"
        while not self.closing:
            start = time.monotonic()
            try:
                async with asyncio.timeout(30):
                    ws = await self.http.ws_connect(url, autoping=False)
            except Exception as exc:
                self.fail(classify(exc), repr(exc))
                self.world.tally.add("dead_ws", time.monotonic() - start)
            else:
                self.fail("ws_opened_to_dead_server")
                await ws.close()
            await asyncio.sleep(self.world.mode.retry_every)


# -- the day --------------------------------------------------------------------------------------
async def first_get(world: World) -> None:
    """JupyterHub's own route, then one GET through the proxy to the hub."""
    status, _ = await world.api("POST", "/", {"target": world.hub, "jupyterhub": True}, "api_post")
    if status not in (200, 201):
        raise RuntimeError(f"{world.name}: POST /api/routes/ answered {status}")
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{world.port}/hub/") as r,
    ):
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"{world.name}: GET /hub/ through the proxy answered {r.status}")


async def run_worlds(worlds: list[World], schedule: list[list[Session]], t0: float) -> float:
    """The day itself; returns when the last user left (seconds after t0)."""
    m = worlds[0].mode
    end = t0 + m.load_s + m.cooldown_s + 60  # a day that runs late is still cut here
    for world in worlds:
        world.ctl = aiohttp.ClientSession()
        world.api_http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
    background: list[asyncio.Task[None]] = []
    try:
        for world in worlds:
            await first_get(world)
        for world in worlds:
            background.append(asyncio.create_task(world.ticker(t0, end)))
            background.append(asyncio.create_task(world.poller(t0, end)))
        users = {
            asyncio.create_task(world.user_life(i, sessions, t0)): (world, i)
            for world in worlds
            for i, sessions in enumerate(schedule)
        }
        _, late = await asyncio.wait(users, timeout=max(1.0, end - time.monotonic()))
        if late:
            for task in late:
                world, i = users[task]
                world.tally.fail("user_stuck", False, f"u{i:03d} at {where(task)}")
            await cancel(list(late))
            raise TimeoutError(f"{len(late)} users still busy at the end of the day")
        drained = time.monotonic() - t0
        cool_until = time.monotonic() + m.cooldown_s
        for world in worlds:
            with contextlib.suppress(Exception):
                world.backend_stats = await world.control("GET", "/stats")
        await sleep_until(min(cool_until, end))
        return drained
    finally:
        await cancel(background)
        for world in worlds:
            for session in (world.ctl, world.api_http):
                if session is not None:
                    await session.close()


def run_async(coro: Coroutine[Any, Any, float]) -> float:
    factory: Callable[[], asyncio.AbstractEventLoop]
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def read_samples(path: Path) -> list[dict[str, Any]]:
    out = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def run(
    specs: list[ProxySpec],
    mode_name: str,
    out_dir: Path,
    logs: Path | None = None,
    mode: DayMode | None = None,
) -> dict[str, Any]:
    """Run the day for ``specs`` side by side; write its files under ``out_dir`` and return the
    results (``bench.hubday_report`` turns them into tables, CSV and charts)."""
    m = mode or DAY_MODES[mode_name]
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    day_dir = out_dir / f"hubday-{stamp}-{m.name}"
    logs = logs or day_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cores = sorted(os.sched_getaffinity(0))
    proxy_core, load_core = cores[0], cores[-1]
    os.sched_setaffinity(0, {load_core})
    schedule = build_schedule(m)
    span = sum(len(s) for s in schedule) + 32
    bases = port_regions(len(specs), span)
    worlds = [World(spec, m, base, span, logs) for spec, base in zip(specs, bases, strict=True)]
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    wall = time.monotonic()
    sampler = None
    drained = None
    error = None
    try:
        for world in worlds:
            try:
                world.start(proxy_core, load_core)
            except Exception as exc:
                world.error = f"failed to start: {exc}"
                if world.proxy is not None:
                    world.error += "\n" + world.proxy.log_tail()
                world.stop()
        running = [w for w in worlds if w.error is None]
        if not running:
            raise RuntimeError("no proxy started")
        t0 = time.monotonic() + m.idle_s + 1.0  # +1 s for the first GETs
        spec = {
            "t0": t0,
            "interval": 1.0,
            "limit_s": m.idle_s + m.load_s + m.cooldown_s + 180,
            "out": str(day_dir / "samples.jsonl"),
            "proxies": [w.sampler_spec() for w in running],
        }
        sampler = procs.Managed(
            "sampler",
            [sys.executable, "-m", "bench.hubday_sample", json.dumps(spec)],
            load_core,
            logs / "hubday-sampler.log",
            env={"PYTHONPATH": str(REPO)},
        )
        drained = run_async(run_worlds(running, schedule, t0))
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        with (logs / "errors.log").open("a") as f:
            f.write("hub day\n" + traceback.format_exc() + "\n")
    finally:
        if sampler is not None:
            sampler.stop()
        for world in worlds:
            if world.proxy is not None and not world.proxy.alive() and world.error is None:
                world.error = "proxy died during the day:\n" + world.proxy.log_tail()
            world.stop()
    samples = read_samples(day_dir / "samples.jsonl")
    result: dict[str, Any] = {
        "mode": asdict(m),
        "started": started,
        "wall_s": time.monotonic() - wall,
        "error": error,
        "drained_s": drained,
        "dir": str(day_dir),
        "logs": str(logs),
        "sessions": sum(len(s) for s in schedule),
        "dead_sessions": sum(x.dead for s in schedule for x in s),
        "uploads_planned": sum(x.upload_at is not None for s in schedule for x in s),
        "downloads_planned": sum(x.download_at is not None for s in schedule for x in s),
        "machine": [{"t": s["t"], **s["machine"]} for s in samples],
        "sampler_ms": statistics.median([s["took_ms"] for s in samples]) if samples else None,
        "proxies": {},
    }
    for world in worlds:
        result["proxies"][world.name] = {
            "command": [*world.spec.argv],
            "error": world.error,
            "seconds": world.seconds,
            "polls": world.polls,
            "totals": world.tally.totals(),
            "backend": world.backend_stats,
            "samples": [
                {"t": s["t"], **s["proxies"][world.name]}
                for s in samples
                if world.name in s["proxies"]
            ],
        }
    (day_dir / "day.json").write_text(json.dumps(result))
    return result

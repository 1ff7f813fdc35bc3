"""The Redis store: one route table shared by any number of hubproxy replicas (redis-py asyncio).

Theory of operation.

- **Redis is the truth.** Every write is one Lua script, so a route, its place in the order, its
  activity, the version counter and the change message move together, atomically. The API
  answers a write only after Redis has run the script.
- **Every replica follows a change feed.** Each script bumps `<prefix>:version` and publishes
  `<header JSON>\\n<data JSON>` on `<prefix>:changes`, where the header is `[version, "set",
  key, activity]`, `[version, "del", key]` or `[version, "reset"]`. A replica applies message
  `v` only if it holds version `v - 1`; an older one is a duplicate, anything else is a gap.
- **Full resynchronisation** (one MULTI/EXEC snapshot of version, routes, order and activity,
  then `routes_reset`) after: each (re)subscription (so after every reconnect, including the
  ones redis-py makes by itself), a gap, a `reset` message, or an idle check that finds the
  version counter ahead of ours for two checks in a row (a message lost without a reconnect).
- **Activity** is merged in Redis by a script that keeps the newer time (it never creates
  activity for a route that is gone), in batches from the ActivityFlusher.
- **Redis down.** The data plane routes from the replica's table as before. Writes raise
  `StoreUnavailable` (the API answers 503; JupyterHub retries). Reads answer from the replica's
  last synchronised view (what its data plane is routing by); before the first
  synchronisation they raise too. The follower reconnects with backoff (0.1 s doubling to
  2 s) and resynchronises.
- **Redis lost its data** (restarted without persistence, flushed): `<prefix>:epoch` holds a
  random token written once. A replica that finds it missing or changed since its last
  synchronisation writes back the routes of its own view that are missing (never overwriting),
  announces a `reset`, and every replica resynchronises. With AOF enabled this never happens.
- **Start.** `start()` waits up to `CONNECT_WAIT` seconds for the first synchronisation, so a
  replica that starts while Redis is up has the whole table before it listens. If Redis cannot
  be reached by then, the proxy starts anyway with an empty table (JupyterHub needs the
  listeners within about 10 s), logs it, and fills the table when Redis comes.

Schema, under a prefix (`hubproxy` unless `?prefix=` is given in the URL):

    <prefix>:routes    hash    key -> JSON object of the route data, without last_activity
    <prefix>:order     zset    key -> the version that first added it (GET's insertion order)
    <prefix>:activity  hash    key -> last_activity, integer microseconds since the epoch (UTC)
    <prefix>:version   string  counter, bumped by every route change
    <prefix>:epoch     string  random token, written once (detects a Redis that lost its data)
    <prefix>:changes   pub/sub channel of change messages
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from hubproxy.store.base import (
    ChangeListener,
    RouteData,
    StoreSpecError,
    StoreUnavailable,
    copy_data,
    decode_row,
    encode_row,
    from_micros,
    merge_newest,
    to_micros,
)

log = logging.getLogger("hubproxy")

T = TypeVar("T")

CONNECT_WAIT = 3.0  # start(): how long to wait for the first synchronisation
OP_TIMEOUT = 3.0  # an API operation that Redis has not answered by then is a 503
IDLE_CHECK = 1.0  # the follower compares version counters after this long without messages
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 2.0
STILL_DOWN_EVERY = 30.0  # while Redis stays unreachable, say so again this often
OWN_WRITE_WAIT = 1.0  # how long a write waits for its own change to reach this replica's table
ACTIVITY_CHUNK = 500  # marks per activity script call (keeps each script short)
RESTORE_CHUNK = 200
MAX_CONNECTIONS = 32  # to Redis, per replica (one of them follows the change feed)

_ADD = """
local v = redis.call('INCR', KEYS[4])
if redis.call('HSET', KEYS[1], ARGV[2], ARGV[3]) == 1 then
  redis.call('ZADD', KEYS[2], v, ARGV[2])
end
if ARGV[4] == '' then
  redis.call('HDEL', KEYS[3], ARGV[2])
else
  redis.call('HSET', KEYS[3], ARGV[2], ARGV[4])
end
redis.call('PUBLISH', ARGV[1], cjson.encode({v, 'set', ARGV[2], ARGV[4]}) .. '\\n' .. ARGV[3])
return v
"""

# a shallow merge computed by the client: written only if the data is still what it read
_UPDATE = """
local current = redis.call('HGET', KEYS[1], ARGV[2])
if not current then return 0 end
if current ~= ARGV[3] then return -1 end
local v = redis.call('INCR', KEYS[4])
redis.call('HSET', KEYS[1], ARGV[2], ARGV[4])
local activity = redis.call('HGET', KEYS[3], ARGV[2]) or ''
if ARGV[5] ~= '' then
  activity = ARGV[5]
  redis.call('HSET', KEYS[3], ARGV[2], activity)
end
redis.call('PUBLISH', ARGV[1], cjson.encode({v, 'set', ARGV[2], activity}) .. '\\n' .. ARGV[4])
return v
"""

_SET_ACTIVITY = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""

_REMOVE = """
if redis.call('HDEL', KEYS[1], ARGV[2]) == 0 then return 0 end
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[2])
local v = redis.call('INCR', KEYS[4])
redis.call('PUBLISH', ARGV[1], cjson.encode({v, 'del', ARGV[2]}))
return v
"""

# newest wins; no activity for routes that are gone
_RECORD_ACTIVITY = """
for i = 1, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then
    local current = tonumber(redis.call('HGET', KEYS[2], ARGV[i]) or '0')
    if current < tonumber(ARGV[i + 1]) then
      redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
    end
  end
end
return 0
"""

# add the routes that are missing (key, json, activity triples), then tell everyone to resync
_RESTORE = """
local added = 0
for i = 2, #ARGV, 3 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
    local v = redis.call('INCR', KEYS[4])
    redis.call('ZADD', KEYS[2], v, ARGV[i])
    if ARGV[i + 2] ~= '' then redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 2]) end
    added = added + 1
  end
end
if added > 0 then
  local v = redis.call('INCR', KEYS[4])
  redis.call('PUBLISH', ARGV[1], cjson.encode({v, 'reset'}))
end
return added
"""


# everything, atomically and in insertion order, as one JSON document (parsed in C, not as
# 30,000 RESP strings): {version, epoch or '', '[[key, data, activity or null], ...]'}
_SNAPSHOT = """
local order = redis.call('ZRANGE', KEYS[2], 0, -1)
local parts = {}
for first = 1, #order, 1000 do
  local chunk = {}
  for i = first, math.min(first + 999, #order) do chunk[#chunk + 1] = order[i] end
  local routes = redis.call('HMGET', KEYS[1], unpack(chunk))
  local activity = redis.call('HMGET', KEYS[3], unpack(chunk))
  for j = 1, #chunk do
    if routes[j] then
      parts[#parts + 1] = '[' .. cjson.encode(chunk[j]) .. ',' .. routes[j] .. ','
        .. (activity[j] or 'null') .. ']'
    end
  end
end
return {redis.call('GET', KEYS[4]) or '0', redis.call('GET', KEYS[5]) or '',
        '[' .. table.concat(parts, ',') .. ']'}
"""


def parse_redis_url(url: str) -> tuple[str, str]:
    """(the URL for redis-py, the key prefix): our own `prefix` query parameter taken out."""
    base, _, query_string = url.partition("?")
    query = parse_qsl(query_string, keep_blank_values=True)
    prefix = "hubproxy"
    rest = []
    for name, value in query:
        if name == "prefix":
            if not value:
                raise StoreSpecError(f"--storage-backend {redact(url)}: empty prefix")
            prefix = value
        else:
            rest.append((name, value))
    return (f"{base}?{urlencode(rest)}" if rest else base), prefix


def redact(url: str) -> str:
    """The URL without its password (for logs and error messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _activity_field(micros: int | None) -> str:
    """A route's activity as Redis keeps it: the microseconds as text, '' for none."""
    return "" if micros is None else str(micros)


def _micros(field: str | None) -> int | None:
    """`_activity_field` undone (None: a field that is missing)."""
    return int(field) if field else None


class RedisStore:
    def __init__(self, url: str, spec: str | None = None) -> None:
        self._url, self.prefix = parse_redis_url(url)
        self.where = redact(self._url)
        self._spec = redact(spec or url)
        p = self.prefix
        self._keys = [f"{p}:routes", f"{p}:order", f"{p}:activity", f"{p}:version"]
        self._epoch_key = f"{p}:epoch"
        self.channel = f"{p}:changes"
        self._redis: aioredis.Redis | None = None
        self._routes: dict[str, RouteData] = {}  # the last synchronised view, kept current
        self._listeners: list[ChangeListener] = []
        self._version = 0  # of the view
        self._epoch: str | None = None  # the epoch token of the last synchronisation
        self._synced = asyncio.Event()  # set once the view was ever synchronised
        self._connected = False
        self._suspect: int | None = None  # a remote version seen ahead of ours
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self._down_since: float | None = None
        self._down_logged = 0.0
        self._last_error = ""
        self._starting = False

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            # blocking: a burst of API writes waits for a connection instead of failing
            pool = aioredis.BlockingConnectionPool.from_url(
                self._url,
                max_connections=MAX_CONNECTIONS,
                timeout=OP_TIMEOUT,
                decode_responses=True,
                socket_connect_timeout=1.0,
                socket_timeout=OP_TIMEOUT,
                retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=1),
            )
        except (ValueError, TypeError) as e:
            raise StoreSpecError(f"--storage-backend {self._spec}: {e}") from None
        self._redis = aioredis.Redis(connection_pool=pool)
        r = self._redis
        self._add = r.register_script(_ADD)
        self._update = r.register_script(_UPDATE)
        self._set_activity = r.register_script(_SET_ACTIVITY)
        self._remove = r.register_script(_REMOVE)
        self._record = r.register_script(_RECORD_ACTIVITY)
        self._restore = r.register_script(_RESTORE)
        self._snap = r.register_script(_SNAPSHOT)
        self._task = asyncio.get_running_loop().create_task(self._follow())
        self._starting = True  # the first failures are start()'s to report
        try:
            await asyncio.wait_for(asyncio.shield(self._synced.wait()), CONNECT_WAIT)
        except TimeoutError:
            self._starting = False
            log.warning(
                "Redis at %s is unreachable (%s): starting with an empty route table; "
                "it fills when Redis answers",
                self.where,
                self._last_error or "no answer",
            )
        else:
            self._starting = False
            log.info("Loaded %d routes from Redis at %s", len(self._routes), self.where)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._redis is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._redis.aclose()
                await self._redis.connection_pool.disconnect()
            self._redis = None

    def watch(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)
        listener.routes_reset(self._routes)

    # -- reads: Redis, or this replica's view while Redis is away ---------------------------------

    async def get(self, key: str) -> RouteData | None:
        try:
            async with self._redis_pipeline() as pipe:
                pipe.hget(self._keys[0], key)
                pipe.hget(self._keys[2], key)
                text, activity = await self._call(pipe.execute)
        except StoreUnavailable:
            if not self._synced.is_set():
                raise
            data = self._routes.get(key)
            return dict(data) if data is not None else None
        return decode_row(text, _micros(activity)) if text is not None else None

    async def get_all(self) -> dict[str, RouteData]:
        try:
            _, _, routes = await self._call(self._snapshot)
        except StoreUnavailable:
            if not self._synced.is_set():
                raise
            return dict(self._routes)
        return routes

    # -- writes: one script each, acknowledged once Redis ran it -----------------------------------

    async def add(self, key: str, data: RouteData) -> None:
        text, micros = encode_row(data)
        activity = _activity_field(micros)
        version = await self._call(
            self._add, keys=self._keys, args=[self.channel, key, text, activity]
        )
        await self._settle_own(int(version), "set", key, text, activity)

    async def update(self, key: str, data: RouteData) -> None:
        changes = copy_data(dict(data))
        activity = changes.pop("last_activity", None)
        if not isinstance(activity, datetime):
            if activity is not None:
                changes["last_activity"] = activity  # not a time: plain data, as CHP keeps it
            activity = None
        micros = str(to_micros(activity)) if activity is not None else ""
        if not changes:
            if micros:
                keys = [self._keys[0], self._keys[2]]
                if await self._call(self._set_activity, keys=keys, args=[key, micros]):
                    route = self._routes.get(key)
                    if route is not None:
                        route["last_activity"] = activity
            return
        for _ in range(50):  # compare-and-set: retried while other writers change the route
            current = await self._call(self._redis_client().hget, self._keys[0], key)
            if current is None:
                return
            merged = json.loads(current)
            merged.update(changes)
            text = json.dumps(merged, separators=(",", ":"))
            version = int(
                await self._call(
                    self._update, keys=self._keys, args=[self.channel, key, current, text, micros]
                )
            )
            if version == 0:
                return
            if version > 0:
                await self._settle_own(version, "set", key, text, micros or None)
                return
        raise StoreUnavailable(f"route {key} kept changing while being updated")

    async def remove(self, key: str) -> bool:
        version = int(await self._call(self._remove, keys=self._keys, args=[self.channel, key]))
        if not version:
            return False
        await self._settle_own(version, "del", key, "", None)
        return True

    async def record_activity(self, activity: Mapping[str, datetime]) -> None:
        marks = [(key, to_micros(when)) for key, when in activity.items()]
        keys = [self._keys[0], self._keys[2]]
        for start in range(0, len(marks), ACTIVITY_CHUNK):
            args: list[str | int] = []
            for key, micros in marks[start : start + ACTIVITY_CHUNK]:
                args += [key, micros]
            await self._call(self._record, keys=keys, args=args)
        # this replica's view follows, for reads while Redis is away
        merge_newest(self._routes, {key: from_micros(micros) for key, micros in marks})

    # -- calling Redis -----------------------------------------------------------------------------

    def _redis_client(self) -> aioredis.Redis:
        if self._redis is None:
            raise StoreUnavailable("the Redis store is closed")
        return self._redis

    def _redis_pipeline(self) -> Any:
        return self._redis_client().pipeline(transaction=False)

    async def _call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Run one Redis call; any failure to get an answer is `StoreUnavailable` (-> 503)."""
        try:
            async with asyncio.timeout(OP_TIMEOUT):
                return await fn(*args, **kwargs)
        except (RedisError, OSError, TimeoutError) as e:
            raise StoreUnavailable(f"Redis at {self.where}: {_describe(e)}") from e

    async def _snapshot(self) -> tuple[int, str | None, dict[str, RouteData]]:
        """(version, epoch, routes in insertion order), read atomically by one script."""
        version, epoch, document = await self._snap(keys=[*self._keys, self._epoch_key])
        routes: dict[str, RouteData] = {}
        for key, data, activity in json.loads(document):
            if activity is not None:
                data["last_activity"] = from_micros(activity)
            routes[key] = data
        return int(version), epoch or None, routes

    # -- this replica's view and the change feed --------------------------------------------------

    async def _settle_own(
        self, version: int, op: str, key: str, text: str, activity: str | None
    ) -> None:
        """Our own write reached Redis as `version`: make this replica's table show it now."""
        if self._synced.is_set() and version == self._version + 1:
            self._apply(version, op, key, text, activity)
            return
        if version <= self._version:
            return
        # changes by other replicas come first: wait for the feed (bounded; Redis has it anyway)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((version, future))
        try:
            await asyncio.wait_for(future, OWN_WRITE_WAIT)
        except TimeoutError:
            self._waiters.remove((version, future))

    def _apply(self, version: int, op: str, key: str, text: str, activity: str | None) -> None:
        if op == "set":
            data = decode_row(text, _micros(activity))
            old = self._routes.get(key)
            if activity is None and old is not None and "last_activity" in old:
                data["last_activity"] = old["last_activity"]
            self._routes[key] = data
            for listener in self._listeners:
                listener.route_set(key, data)
        elif op == "del":
            self._routes.pop(key, None)
            for listener in self._listeners:
                listener.route_removed(key)
        self._set_version(version)

    def _set_version(self, version: int) -> None:
        self._version = version
        if self._waiters:
            ready = [w for w in self._waiters if w[0] <= version]
            self._waiters = [w for w in self._waiters if w[0] > version]
            for _, future in ready:
                if not future.done():
                    future.set_result(None)

    async def _on_message(self, message: str) -> None:
        header_text, _, body = message.partition("\n")
        header = json.loads(header_text)
        version = int(header[0])
        if version <= self._version:
            return  # already in the view (our own write, or a snapshot taken after it)
        if version != self._version + 1 or header[1] == "reset":
            await self._resync()
            return
        op, key = header[1], header[2]
        if op == "set":
            self._apply(version, op, key, body, header[3] if len(header) > 3 else "")
        elif op == "del":
            self._apply(version, op, key, "", None)
        else:
            await self._resync()

    async def _resync(self) -> None:
        """Replace the view with a snapshot of Redis (restoring Redis first if it lost it)."""
        for _ in range(3):
            version, epoch, view = await self._snapshot()
            if epoch is not None and (self._epoch is None or epoch == self._epoch):
                break
            if epoch is None:
                token = secrets.token_hex(8)
                await self._redis_client().set(self._epoch_key, token, nx=True)
            if self._epoch is not None and self._routes:
                # Redis lost what we synchronised with (restarted without persistence?)
                added = await self._restore_view()
                log.warning(
                    "Redis at %s lost its routes: restored %d of this replica's %d routes",
                    self.where,
                    added,
                    len(self._routes),
                )
            self._epoch = None  # adopt the epoch the next snapshot finds
        self._epoch = epoch
        self._routes = view
        for listener in self._listeners:
            listener.routes_reset(view)
        self._suspect = None
        self._set_version(version)
        # waiters for versions a reset skipped over (version counter restarted) are released
        for _, future in self._waiters:
            if not future.done():
                future.set_result(None)
        self._waiters.clear()
        self._synced.set()

    async def _restore_view(self) -> int:
        items = list(self._routes.items())
        added = 0
        for start in range(0, len(items), RESTORE_CHUNK):
            args: list[str] = [self.channel]
            for key, data in items[start : start + RESTORE_CHUNK]:
                text, micros = encode_row(data)
                args += [key, text, _activity_field(micros)]
            added += int(await self._restore(keys=self._keys, args=args))
        return added

    async def _check_version(self) -> None:
        """Between messages: is Redis ahead of us for longer than a message takes to arrive?"""
        remote = int(await self._redis_client().get(self._keys[3]) or 0)
        if remote < self._version:
            await self._resync()  # the counter went back: Redis lost data
        elif remote > self._version:
            if self._suspect is not None and self._version < self._suspect:
                log.warning("Missed a route change from Redis: resynchronising")
                await self._resync()
            else:
                self._suspect = remote
        else:
            self._suspect = None

    async def _follow(self) -> None:
        """Subscribe, synchronise, apply the feed; reconnect with backoff when Redis goes."""
        backoff = BACKOFF_FIRST
        while True:
            pubsub = self._redis_client().pubsub()
            try:
                await pubsub.subscribe(self.channel)
                while True:
                    message = await pubsub.get_message(timeout=IDLE_CHECK)
                    if message is None:
                        await self._check_version()
                    elif message["type"] == "subscribe":
                        # (re)subscribed: whatever was published before is not coming
                        await self._resync()
                        self._up()
                        backoff = BACKOFF_FIRST
                    elif message["type"] == "message":
                        await self._on_message(message["data"])
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError) as e:
                self._down(e)
            except Exception:  # a bug, or a message we cannot read: start over from a snapshot
                log.exception("Error following Redis at %s", self.where)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.shield(pubsub.aclose())
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _up(self) -> None:
        if self._down_since is not None:
            log.info(
                "Redis at %s is back after %.1f s: %d routes",
                self.where,
                time.monotonic() - self._down_since,
                len(self._routes),
            )
        self._down_since = None
        self._connected = True

    def _down(self, error: BaseException) -> None:
        self._last_error = _describe(error)
        self._connected = False
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = self._down_logged = now
            if self._starting:
                return
            log.warning(
                "Redis at %s is unreachable (%s): routing from this replica's table, "
                "API writes answer 503; retrying",
                self.where,
                self._last_error,
            )
        elif now - self._down_logged >= STILL_DOWN_EVERY:
            self._down_logged = now
            log.warning(
                "Redis at %s still unreachable after %.0f s (%s)",
                self.where,
                now - self._down_since,
                self._last_error,
            )


def _describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text.splitlines()[0] if text else type(error).__name__

"""The Redis Streams relay: the event stream copied into Redis, once, in order.

Every event goes to two streams: ``<prefix>:events`` (all swarms) and ``<prefix>:events:<swarm_id>``,
as an entry with the fields ``type`` and ``event`` (the whole event as JSON, with the cursor that
resumes right after it).
An entry's id is derived from the event's place in the log (``<tx_id>-<seq>``), so the ids only
grow, and a write that is replayed (after a crash, or a Redis answer that was lost) is refused by
Redis as "equal or smaller than the top item" instead of being stored twice. The relay's own place
is saved in PostgreSQL (``stream_cursors``) only after Redis has acknowledged the writes, so a relay
killed at any moment resumes from there without losing an event. Redis being down only pauses it:
PostgreSQL stays the source of truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import orjson

from dash_storage.core.database import Database
from dash_storage.core.errors import ConfigurationError, DashStorageError, ValidationError
from dash_storage.core.models import Event
from dash_storage.stream.cursors import load_cursor, save_cursor
from dash_storage.stream.follow import HORIZON_SQL, Follower, Page
from dash_storage.stream.position import encode

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = ["Relay", "RelayError", "RelayStats", "entry_document"]

log = logging.getLogger("dash_storage.relay")

_PREFIX = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_MAX_BACKOFF: Final = 5.0
#: How long ``run(once=True)`` waits for a Redis that is unavailable before it fails.
ONCE_PATIENCE: Final = 30.0


class RelayError(DashStorageError):
    """Redis refused a write for a reason other than "already written"."""


@dataclass
class RelayStats:
    relayed: int = 0  # events written to Redis by this run
    replayed: int = 0  # stream entries Redis already had (refused as duplicates)
    batches: int = 0
    redis_outages: int = 0
    cursor: str | None = None


@dataclass(frozen=True, slots=True)
class _Keys:
    prefix: str
    all: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "all", f"{self.prefix}:events")

    def swarm(self, swarm_id: object) -> str:
        return f"{self.prefix}:events:{swarm_id}"


def entry_document(event: Event, cursor: str) -> bytes:
    """The event as one JSON document (its fields, and the cursor that resumes right after it)."""
    # default=str: asyncpg's own UUID class, which orjson does not know.
    return orjson.dumps({**event._asdict(), "cursor": cursor}, default=str)


# One script call writes a whole page: both XADDs of every event, server-side, atomically. A
# pipeline of single XADDs costs the client far more per event than Redis spends on it. An id that
# is not above the stream's top item is refused by XADD; that is a replay of an entry Redis already
# has, and is counted, not written. Any other refusal stops the script with its error.
# KEYS: the all-swarms stream, then the page's swarm streams. ARGV: maxlen (0 = none), the page's
# mark (as decimal text), then one argument per event: "<swarm key index> <entry id> <length of
# the type in bytes> <type><JSON>" (one argument rather than four: the client pays per argument).
_WRITE_PAGE = """
local maxlen = tonumber(ARGV[1])
local mark = ARGV[2]
local written, replayed = 0, 0
for at = 3, #ARGV do
  local packed = ARGV[at]
  local a = string.find(packed, ' ', 1, true)
  local b = string.find(packed, ' ', a + 1, true)
  local c = string.find(packed, ' ', b + 1, true)
  local k = tonumber(string.sub(packed, 1, a - 1))
  local id = string.sub(packed, a + 1, b - 1)
  local n = tonumber(string.sub(packed, b + 1, c - 1))
  local kind, doc = string.sub(packed, c + 1, c + n), string.sub(packed, c + n + 1)
  local fresh = false
  for _, key in ipairs({KEYS[1], KEYS[k]}) do
    local r
    if maxlen > 0 then
      r = redis.pcall('XADD', key, 'MAXLEN', '~', maxlen, id, 'type', kind, 'event', doc)
    else
      r = redis.pcall('XADD', key, id, 'type', kind, 'event', doc)
    end
    if type(r) == 'table' and r.err then
      if not string.find(r.err, 'equal or smaller', 1, true) then
        return redis.error_reply(r.err)
      end
      -- A replay: Redis already has this entry or a later one this relay wrote before. Every
      -- entry this relay can write has a transaction id below the mark (ARGV[2]); a top entry
      -- at or above it was written by someone else (another writer, or a database restored
      -- from an older point), and skipping past it would lose events silently.
      local top = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
      local tx = string.match(top[1][1], '^(%d+)-')
      if #tx > #mark or (#tx == #mark and tx >= mark) then
        return redis.error_reply('DASHRELAY stream ' .. key .. ' holds entry ' .. top[1][1] ..
          ', which this relay did not write; use another --prefix or clear the stream')
      end
    else
      fresh = true
    end
  end
  if fresh then written = written + 1 else replayed = replayed + 1 end
end
return {written, replayed}
"""


class Relay:
    """Copies the event stream into Redis Streams. ``await Relay(db).run()`` until stopped.

    ``name`` names its saved place (``relay:<name>`` in stream_cursors), so several relays with
    different names can feed different Redis servers. ``maxlen`` trims each stream to about that
    many entries (approximate trimming, cheap; 0 keeps everything).
    """

    def __init__(
        self,
        db: Database,
        redis_url: str | None = None,
        *,
        name: str = "redis",
        prefix: str = "dash",
        maxlen: int = 1_000_000,
        batch_size: int = 1000,
        poll_interval: float = 0.5,
    ) -> None:
        if not isinstance(prefix, str) or not _PREFIX.match(prefix):
            raise ValidationError("prefix", f"must be 1-64 letters, digits or _.:-, got {prefix!r:.80}")
        if isinstance(maxlen, bool) or not isinstance(maxlen, int) or maxlen < 0:
            raise ValidationError("maxlen", f"must be a whole number >= 0, got {maxlen!r}")
        if not isinstance(name, str) or not 1 <= len(name) <= 100:
            raise ValidationError("name", f"must be 1-100 characters, got {name!r:.80}")
        self.db = db
        self.redis_url = redis_url or db.settings.redis_url.get_secret_value()
        self.name = name
        self.keys = _Keys(prefix)
        self.maxlen = maxlen
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.stats = RelayStats()
        self._redis: aioredis.Redis | None = None
        self._script: Any = None
        self._give_up_after: float | None = None

    @property
    def cursor_name(self) -> str:
        return f"relay:{self.name}"

    async def _client(self) -> aioredis.Redis:
        if self._redis is None:
            try:
                import redis.asyncio as aioredis
            except ImportError as exc:  # pragma: no cover - a declared dependency
                raise ConfigurationError("the relay needs the 'redis' package", variable="REDIS_URL") from exc
            try:
                self._redis = aioredis.from_url(self.redis_url, socket_timeout=10, socket_connect_timeout=5)
            except ValueError as exc:
                raise ConfigurationError(f"REDIS_URL: {exc}", variable="REDIS_URL") from exc
        return self._redis

    async def close(self) -> None:
        client, self._redis = self._redis, None
        self._script = None
        if client is not None:
            await client.aclose()

    async def run(self, *, once: bool = False, stop: asyncio.Event | None = None) -> RelayStats:
        """Relay until ``stop`` is set (or, with ``once``, until everything committed before the
        call is in Redis). Returns what this run did.

        The next page is read from PostgreSQL while the current one is written to Redis, so a relay
        that catches up runs at the speed of the slower side, not of both added up.
        """
        after = await load_cursor(self.db, self.cursor_name)
        self.stats.cursor = after
        follower = Follower(
            self.db,
            after=after,
            from_start=after is None,
            batch_size=self.batch_size,
            poll_interval=self.poll_interval,
            listen=not once,
        )
        # A one-off run gives up on a Redis that stays away; a running relay waits for it.
        self._give_up_after = ONCE_PATIENCE if once else None
        ahead: asyncio.Queue[Page | None] = asyncio.Queue(maxsize=2)
        try:
            async with follower:
                reader = asyncio.create_task(self._read(follower, ahead, once))
                try:
                    while stop is None or not stop.is_set():
                        page = await _get_or_stop(ahead, reader, stop)
                        if page is None:
                            break
                        if not await self._deliver(page, stop):
                            break
                finally:
                    reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await reader
        finally:
            await self.close()
        return self.stats

    async def _read(self, follower: Follower, ahead: asyncio.Queue[Page | None], once: bool) -> None:
        """Pages for the writer; with ``once``, None after the last one committed before now."""
        if not once:
            async for page in follower.pages():
                await ahead.put(page)
            return
        # Everything committed before this call: read until the mark passes the next transaction
        # id as of now (an older transaction still open is waited for).
        horizon = int(await self.db.fetchval(HORIZON_SQL, retry=True))
        wait = 0.002
        while True:
            page, full, _held = await follower.read_page()
            if page:
                await ahead.put(page)
            if full:
                continue
            if page.mark >= horizon:
                await ahead.put(None)
                return
            await asyncio.sleep(wait)
            wait = min(wait * 2, self.poll_interval)

    async def _deliver(self, page: Page, stop: asyncio.Event | None) -> bool:
        """Write ``page`` to Redis (retrying while Redis is away), then save the cursor. False when
        ``stop`` was set while Redis was away (nothing saved: the page is relayed next time)."""
        backoff = 0.1
        away_since: float | None = None
        while True:
            try:
                await self._write(page)
                break
            except RelayError:
                raise
            except Exception as exc:  # redis-py's connection and timeout errors
                if not _redis_unavailable(exc):
                    raise
                self.stats.redis_outages += 1
                now = time.monotonic()
                away_since = now if away_since is None else away_since
                if self._give_up_after is not None and now - away_since > self._give_up_after:
                    raise RelayError(
                        f"Redis at REDIS_URL was unavailable for {self._give_up_after:.0f} s: {exc}"
                    ) from exc
                log.warning("redis unavailable (%s); relay waits %.1fs", type(exc).__name__, backoff)
                if stop is not None and stop.is_set():
                    return False
                if stop is None:
                    await asyncio.sleep(backoff)
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
                if self._redis is not None:
                    await self.close()
        await save_cursor(self.db, self.cursor_name, page.cursor)
        self.stats.cursor = page.cursor
        self.stats.batches += 1
        if page and self.db.telemetry is not None:
            self.db.telemetry.relay_page(page[-1].timestamp, self.name)
        return True

    async def _write(self, page: Page) -> None:
        client = await self._client()
        if self._script is None:
            self._script = client.register_script(_WRITE_PAGE)
        keys = [self.keys.all]
        index: dict[Any, bytes] = {}
        args: list[Any] = [self.maxlen, str(page.mark)]
        for event, pos in zip(page, page.positions, strict=True):
            k = index.get(event.swarm_id)
            if k is None:
                keys.append(self.keys.swarm(event.swarm_id))
                k = index[event.swarm_id] = str(len(keys)).encode()
            kind = event.type.encode()
            head = b" ".join((k, pos.redis_id().encode(), str(len(kind)).encode()))
            args.append(head + b" " + kind + entry_document(event, encode(pos)))
        try:
            written, replayed = await self._script(keys=keys, args=args)
        except Exception as exc:
            if _redis_unavailable(exc):
                raise
            if "AuthenticationError" in type(exc).__name__:
                raise ConfigurationError(
                    f"REDIS_URL: Redis refused the login: {exc}", variable="REDIS_URL"
                ) from exc
            raise RelayError(f"redis refused a stream write: {exc}") from exc
        self.stats.relayed += int(written)
        self.stats.replayed += int(replayed)


async def _get_or_stop(
    ahead: asyncio.Queue[Page | None], reader: asyncio.Task[None], stop: asyncio.Event | None
) -> Page | None:
    """The next page, or None when the reader is done or ``stop`` is set (a reader's error is
    raised here)."""
    getting = asyncio.ensure_future(ahead.get())
    waiters: set[asyncio.Future[Any]] = {getting, reader}
    stopping = asyncio.ensure_future(stop.wait()) if stop is not None else None
    if stopping is not None:
        waiters.add(stopping)
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if stopping is not None:
            stopping.cancel()
    if getting.done():
        return getting.result()
    if reader.done() and not reader.cancelled() and reader.exception() is None and not ahead.empty():
        return await getting  # the reader finished with pages still queued
    getting.cancel()
    if reader.done() and not reader.cancelled() and reader.exception() is not None:
        raise reader.exception()  # type: ignore[misc]
    return None


def _redis_unavailable(exc: BaseException) -> bool:
    """Redis cannot take writes right now but may soon: down, loading, read-only after a failover,
    busy with a script, out of memory. A bad password or an unknown command is not such a case."""
    try:
        from redis import exceptions as rx
    except ImportError:  # pragma: no cover
        return False
    if isinstance(exc, rx.AuthenticationError | rx.AuthorizationError):
        return False
    if isinstance(
        exc, rx.ConnectionError | rx.TimeoutError | rx.BusyLoadingError | rx.ReadOnlyError | OSError
    ):
        return True
    text = str(exc)
    return isinstance(exc, rx.ResponseError) and text.startswith(("OOM", "BUSY", "TRYAGAIN", "CLUSTERDOWN"))

"""Read replicas: where the reads marked read-only go (DATABASE_READ_URL), and when they may not.

A read reaches a replica only when it asks (``db.fetch(..., replica=True)``, which the repositories'
read-only methods pass) and only outside any transaction of the caller (those run on the caller's
connection and never come here). Everything else (writes, reads not marked, ``run``, ``acquire``,
``transaction``, dedicated ``connect()`` connections) goes to the primary.

Read-your-writes. Every call through this Database that reached the primary counts as a write,
since any of them may have written. The first replica read after one or more writes asks the primary
where its WAL ends (``pg_current_wal_lsn()``, one round trip per burst of writes, not per read): that
position covers every commit made before it. A replica serves the read only once it has replayed
that far: its replayed position is cached, and when the cache is behind, the read asks the replica
(``pg_last_wal_replay_lsn()``, on the connection that then runs the read), waiting at most
DATABASE_READ_WAIT ms in short steps; a replica still behind after that leaves the read to the
primary. Reads with no write of this Database since the replica last caught up cost nothing extra.
Writes made by other processes are seen as soon as the replica replays them (at most
DATABASE_READ_MAX_LAG seconds late).

Health. A background check (every ``check_interval`` seconds, 1 by default, started with the first
replica read) asks each replica whether it is in recovery, how far it has replayed and how far its
replay lags (seconds since the last replayed commit while WAL waits to be replayed, else 0). A replica
that cannot be reached, lost a connection during a read, is not in recovery, or lags more than
DATABASE_READ_MAX_LAG on two checks in a row is left aside: reads go to the primary (no call fails
because a replica is down) until a later check finds it well again. Replicas that are up share the
reads in turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import asyncpg

from dash_storage import sql
from dash_storage.core import driver, sockets
from dash_storage.core.connections import Connection, discard, keep_session, release
from dash_storage.core.errors import (
    CommandTimeoutError,
    DashStorageError,
    is_driver_error,
    is_transient,
    map_error,
)

if TYPE_CHECKING:
    from dash_storage.core.database import Database

__all__ = ["CHECK_INTERVAL", "Replica", "ReplicaStatus", "Replicas"]

log = logging.getLogger("dash_storage")
_Q = sql.load("replicas")
PRIMARY_LSN = _Q["primary_lsn"]
REPLAYED_LSN = _Q["replayed_lsn"]
REPLICA_STATE = _Q["replica_state"]

#: Seconds between two health checks of every replica.
CHECK_INTERVAL = 1.0
#: Checks in a row that must find a replica lagging past DATABASE_READ_MAX_LAG before it is left aside:
#: one check can catch the instant new WAL arrived after a long quiet spell, when the age of the last
#: replayed commit is large although the replica is about to replay it.
LAGGING_CHECKS = 2
#: First and largest pause between two looks at a replica's replayed position during a wait.
_FIRST_STEP, _LAST_STEP = 0.0005, 0.01


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """One replica as the last check (or read) saw it, for ``dash-db doctor`` and monitoring."""

    name: str  # host:port
    state: str  # "unchecked", "up", "lagging", "down"
    lag_s: float | None  # replay lag at the last check
    replayed_lsn: int | None
    reads: int  # reads it served
    error: str | None  # why it is left aside


class Replica:
    """One DATABASE_READ_URL entry: its pool (opened by the first check) and what is known of it."""

    __slots__ = ("error", "kwargs", "lag_s", "lagging_checks", "name", "pool", "reads", "replayed", "state")

    def __init__(self, url: str, kwargs: dict[str, Any]) -> None:
        parts = urlsplit(url)
        self.name = f"{parts.hostname or 'localhost'}:{parts.port or 5432}"
        self.kwargs = kwargs
        self.pool: asyncpg.Pool | None = None
        self.state = "unchecked"
        self.lag_s: float | None = None
        self.replayed = 0
        self.reads = 0
        self.lagging_checks = 0
        self.error: str | None = None

    def status(self) -> ReplicaStatus:
        return ReplicaStatus(self.name, self.state, self.lag_s, self.replayed or None, self.reads, self.error)

    async def set_down(self, why: str) -> None:
        if self.state != "down":
            log.warning("read replica %s left aside: %s", self.name, why)
        self.state, self.error = "down", why
        if self.pool is not None:
            # Connections opened before the failure are not reused; new ones are opened on demand.
            await self.pool.expire_connections()


class _Behind(Exception):
    """The replica did not replay this Database's own writes in time: the read goes to the primary."""


class Replicas:
    """The replicas of one Database (``db.replicas``), None on a Database without DATABASE_READ_URL."""

    def __init__(self, db: Database) -> None:
        s = db.settings
        self.db = db
        self.replicas = [Replica(url, s.read_connect_kwargs(url)) for url in s.read_urls]
        self.max_lag = s.database_read_max_lag
        self.wait_s = s.database_read_wait / 1000.0
        self.check_interval = CHECK_INTERVAL
        #: Calls that reached the primary (each may have written), and that count when ``target`` was
        #: last learned: while they differ, a replica read first asks the primary where its WAL ends.
        self.writes = 0
        self._synced = 0
        #: A primary WAL position at or past every write of this Database seen so far.
        self.target = 0
        #: Reads marked read-only that the primary served (no replica up, or none caught up in time).
        self.primary_reads = 0
        #: Reads that waited for a replica to replay this Database's own writes.
        self.waits = 0
        self._turn = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._closed = False

    # -- the read path ----------------------------------------------------------------------

    async def call(
        self, method: str, query: str, args: Sequence[Any], retry: bool, timeout: float | None, replica: bool
    ) -> Any:
        """One statement of ``Database.fetch``/``fetchrow``/``fetchval``/``execute``: to a replica when
        ``replica`` is set and one is fit to serve it, else to the primary (counted as a write)."""
        if replica:
            return await self.read(method, query, args, retry, timeout)
        try:
            return await self.db._call(method, query, args, retry, timeout)
        finally:
            self.writes += 1

    async def read(
        self, method: str, query: str, args: Sequence[Any], retry: bool, timeout: float | None
    ) -> Any:
        if self._loop is not asyncio.get_running_loop():
            if self.db._closed:  # refused by the primary path, with its own message
                return await self.db._call(method, query, args, retry, timeout)
            self._start()
        replica = self._pick()
        if replica is not None:
            try:
                if self.writes != self._synced:
                    await self._learn_target()
                return await self._on_replica(replica, method, query, args, timeout)
            except _Behind:
                pass
        self.primary_reads += 1
        return await self.db._call(method, query, args, retry, timeout)

    def _pick(self) -> Replica | None:
        """The next replica that is up, in turn; None when none is."""
        count = len(self.replicas)
        for step in range(count):
            replica = self.replicas[(self._turn + step) % count]
            if replica.state == "up" and replica.pool is not None:
                self._turn = (self._turn + step + 1) % count
                return replica
        return None

    async def _learn_target(self) -> None:
        """Where the primary's WAL ends now, which covers every write of this Database so far."""
        writes = self.writes
        try:
            lsn = await self.db._call("fetchval", PRIMARY_LSN, (), False, None)
        except DashStorageError as exc:
            # The primary cannot say (down, or not a primary): the read goes there and fails or
            # succeeds as any read of the primary would.
            log.debug("primary WAL position unknown (%s); reading from the primary", exc)
            raise _Behind from exc
        if lsn is not None and lsn > self.target:
            self.target = lsn
        if writes > self._synced:
            self._synced = writes

    async def _on_replica(
        self, replica: Replica, method: str, query: str, args: Sequence[Any], timeout: float | None
    ) -> Any:
        """Run the read on ``replica`` once it has replayed ``target``; _Behind when it cannot."""
        pool = replica.pool
        assert pool is not None
        target = self.target
        try:
            con = await self._checkout(pool)
        except Exception as exc:
            if not (is_transient(exc) or isinstance(exc, TimeoutError)):
                raise
            await replica.set_down(f"cannot connect: {_describe(exc)}")
            raise _Behind from exc
        try:
            raw = driver.connection_of(con)
            if replica.replayed < target:
                await self._catch_up(replica, raw, target)
            result = await getattr(raw, method)(query, *args, timeout=timeout)
        except _Behind:
            await release(pool, con)
            raise
        except Exception as exc:
            if not is_transient(exc):
                await release(pool, con)
                raise map_error(exc) from exc
            # The replica failed the read (connection lost, stalled, a conflict with its recovery):
            # a read can always run again, so the primary serves it.
            discard(con)
            await release(pool, con)
            mapped = map_error(exc)
            if driver.is_closed(con) or isinstance(mapped, CommandTimeoutError):
                await replica.set_down(f"a read failed: {mapped}")
            raise _Behind from exc
        await release(pool, con)
        replica.reads += 1
        return result

    async def _catch_up(self, replica: Replica, raw: Any, target: int) -> None:
        """Wait (at most DATABASE_READ_WAIT) until ``replica`` has replayed ``target``."""
        self.waits += 1
        deadline = time.monotonic() + self.wait_s
        step = _FIRST_STEP
        while True:
            replayed = await raw.fetchval(REPLAYED_LSN)
            if replayed is not None and replayed > replica.replayed:
                replica.replayed = replayed
            if replica.replayed >= target:
                return
            if time.monotonic() + step > deadline:
                raise _Behind
            await asyncio.sleep(step)
            step = min(step * 2, _LAST_STEP)

    async def _checkout(self, pool: asyncpg.Pool) -> Connection:
        con: Connection | None = await driver.acquire_idle(pool)
        if con is None:
            async with asyncio.timeout(self.db.settings.connection_timeout_s):
                con = await pool.acquire()
        if driver.gone_while_idle(con):
            # The replica closed it while it sat idle (it restarted, or stopped).
            discard(con)
            await release(pool, con)
            raise asyncpg.ConnectionDoesNotExistError("the replica closed the connection while it was idle")
        return con

    # -- health checks ----------------------------------------------------------------------

    def _start(self) -> None:
        """Start the checks on the running loop (again after the loop changed, with new pools)."""
        loop = asyncio.get_running_loop()
        if self._loop is not None:
            for replica in self.replicas:
                if replica.pool is not None:
                    replica.pool.terminate()
                    replica.pool = None
                replica.state = "unchecked"
        self._loop = loop
        self._closed = False
        self._monitor = loop.create_task(self._watch(), name="dash-storage replica checks")

    async def _watch(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self.check_interval)

    async def check(self) -> list[ReplicaStatus]:
        """Check every replica now (what the background check does every ``check_interval``)."""
        await asyncio.gather(*(self._check(replica) for replica in self.replicas))
        return self.status()

    async def _check(self, replica: Replica) -> None:
        try:
            if replica.pool is None:
                replica.pool = await self._open(replica)
            pool = replica.pool
            con = await self._checkout(pool)
            try:
                row = await driver.connection_of(con).fetchrow(
                    REPLICA_STATE, timeout=self.db.settings.connection_timeout_s
                )
            except BaseException:
                discard(con)
                raise
            finally:
                await release(pool, con)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            replica.lag_s = None
            await replica.set_down(f"check failed: {_describe(exc)}")
            return
        assert row is not None
        if not row["in_recovery"]:
            await replica.set_down("not in recovery: it is a primary (promoted?), not a replica")
            return
        replica.lag_s = float(row["lag"])
        if row["replayed"] is not None and row["replayed"] > replica.replayed:
            replica.replayed = row["replayed"]
        replica.lagging_checks = replica.lagging_checks + 1 if replica.lag_s > self.max_lag else 0
        if replica.lagging_checks >= LAGGING_CHECKS:
            if replica.state != "lagging":
                log.warning("read replica %s left aside: replay lags %.1f s", replica.name, replica.lag_s)
            replica.state = "lagging"
            replica.error = f"replay lags {replica.lag_s:.1f} s (DATABASE_READ_MAX_LAG is {self.max_lag:g} s)"
        elif replica.state != "lagging" or replica.lagging_checks == 0:
            if replica.state in ("down", "lagging"):
                log.info("read replica %s is back", replica.name)
            replica.state, replica.error = "up", None

    async def _open(self, replica: Replica) -> asyncpg.Pool:
        s = self.db.settings
        pool = await asyncpg.create_pool(
            min_size=0,
            max_size=s.postgres_max_pool_size,
            max_inactive_connection_lifetime=s.idle_timeout_s,
            init=sockets.connection_init(s),
            reset=keep_session,
            server_settings={"application_name": "dash-storage"},
            command_timeout=s.command_timeout_s,
            **replica.kwargs,
        )
        assert pool is not None
        return pool

    def status(self) -> list[ReplicaStatus]:
        return [replica.status() for replica in self.replicas]

    async def close(self) -> None:
        self._closed = True
        monitor, self._monitor = self._monitor, None
        if monitor is not None and not monitor.done():
            monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await monitor
        self._loop = None
        for replica in self.replicas:
            pool, replica.pool = replica.pool, None
            replica.state = "unchecked"
            if pool is not None:
                try:
                    await asyncio.wait_for(pool.close(), timeout=5.0)
                except (TimeoutError, Exception):
                    pool.terminate()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, DashStorageError):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "timed out (POSTGRES_CONNECTION_TIMEOUT)"
    if is_driver_error(exc):
        return str(map_error(exc))
    return f"{type(exc).__name__}: {exc}"

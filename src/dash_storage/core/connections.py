"""Pooled connections handed out by ``Database``: setup, hand-back, and the two context managers.

``acquire()`` and ``transaction()`` return these. After an error they tell whether the connection
was found dead before the block sent anything on it, so ``Database.run`` can replay the block on
another connection without it counting as a retry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy

from dash_storage.core import driver
from dash_storage.core.errors import (
    ConnectionLostError,
    DashStorageError,
    DatabaseUnavailableError,
    ended_while_idle,
    is_driver_error,
    is_transient,
    map_error,
    never_sent,
)

if TYPE_CHECKING:
    from dash_storage.core.database import Database

__all__ = [
    "Acquired",
    "Connection",
    "Record",
    "Transaction",
    "discard",
    "init_connection",
    "keep_session",
    "release",
    "transaction_on",
    "untouched",
]

Record = asyncpg.Record
#: A pooled connection, as handed out by ``acquire``/``transaction``/``run``.
Connection: TypeAlias = "PoolConnectionProxy[Record]"
log = logging.getLogger("dash_storage")


def json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


async def init_connection(con: asyncpg.Connection[Record]) -> None:
    # JSON/JSONB in and out as Python objects, once per connection.
    for typename in ("json", "jsonb"):
        await con.set_type_codec(
            typename, schema="pg_catalog", encoder=json_dumps, decoder=orjson.loads, format="text"
        )


async def keep_session(con: asyncpg.Connection[Record]) -> None:
    """Pool reset hook: do nothing.

    asyncpg's default reset sends ``RESET ALL; UNLISTEN *; ...`` on every release, one extra round
    trip per call. The repositories never change session state (advisory locks are taken on
    dedicated connections), and asyncpg still rolls back any transaction left open before this hook.
    """


def discard(con: Connection) -> None:
    """Close a connection that failed transiently, so a dying connection never goes back to the pool."""
    try:
        con.terminate()
    except asyncpg.InterfaceError:
        pass  # already closed and handed back by asyncpg's own cleanup


async def release(pool: asyncpg.Pool, con: Connection, waiting: int = 0) -> None:
    """Give ``con`` back. A failure here (the reset of a broken connection) is not the caller's:
    asyncpg has then terminated the connection, and the pool replaces it.

    A connection that can go back without waiting for the server (the usual case: the pool's reset
    is ``keep_session``) goes back at once, without the task ``pool.release`` starts to guard a
    release that could wait (see ``driver.release_now``). ``waiting``: callers of this Database
    queued for a connection; the one this release woke takes it before this caller goes on (else a
    caller looping over statements would take its own connection back, again and again, while
    the queued ones wait until they time out).
    """
    try:
        now = driver.release_now(pool, con, keep_session)
        if now is not None:
            await now
            if waiting:
                await asyncio.sleep(0)
            return
        await pool.release(con)
    except Exception as exc:
        if not is_driver_error(exc):
            raise
        log.debug("connection dropped on release: %s", type(exc).__name__)


def untouched(con: Connection, mark: driver.Mark, exc: BaseException, *, single: bool) -> bool:
    """True when ``exc`` is ``con`` found dead before it sent anything since ``mark``.

    Then nothing was applied and the same work can go to another connection, whatever it is.
    ``single``: the work is one statement, so the driver's "never sent" signals suffice when the
    count is unavailable.
    """
    if isinstance(exc, DashStorageError) or not is_transient(exc):
        return False
    if not (never_sent(exc) or driver.is_closed(con)):
        return False  # e.g. a timeout: the connection is alive, the statement went out
    if isinstance(exc, asyncpg.ConnectionDoesNotExistError) and not ended_while_idle(exc):
        # "Closed in the middle of operation": something was in flight. asyncpg's statement count
        # does not include COPY, so the count alone cannot prove that nothing was sent.
        return False
    if mark is None:
        return single and never_sent(exc)
    sent = driver.statements_since(mark)
    # Or one statement sent, and answered "idle session ended": the server quit before reading it.
    return sent == 0 or (sent == 1 and ended_while_idle(exc))


class Acquired:
    """``async with db.acquire() as con``; a class, not a generator, to keep the hot path short.

    After an error, ``untouched`` tells whether the connection was found dead before the block
    sent anything on it (``run`` then re-runs the block on another connection).
    """

    __slots__ = ("_con", "_db", "_mark", "_pool", "untouched")

    def __init__(self, db: Database) -> None:
        self._db = db
        self._con: Connection | None = None
        self._pool: asyncpg.Pool | None = None
        self._mark: driver.Mark = None
        self.untouched = False

    async def __aenter__(self) -> Connection:
        db = self._db
        pool = db._pool
        if pool is None or db._loop is not asyncio.get_running_loop():
            pool = await db.ready()
        self._pool = pool
        self._con = con = await db._acquire(pool)
        self._mark = driver.mark(con)
        return con

    def remark(self) -> None:
        """Count "sent" from here on (after BEGIN, which applies nothing)."""
        assert self._con is not None
        self._mark = driver.mark(self._con)

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._pool is not None and self._con is not None
        if self._db.replicas is not None:
            self._db.replicas.writes += 1  # the block may have written: replica reads must see it
        if e is not None and is_transient(e):
            self.untouched = untouched(self._con, self._mark, e, single=False)
            discard(self._con)
        await release(self._pool, self._con, self._db._waiting)
        if e is not None and is_driver_error(e):
            if driver.message_is_released_proxy(e):
                # We never release inside the block: asyncpg detached the proxy because the
                # server closed the connection between two statements of the block.
                raise ConnectionLostError(
                    "the server ended the connection between two statements of this block; "
                    "what the block sent before may or may not have taken effect"
                ) from e
            raise map_error(e) from e


class Transaction:
    """``async with db.transaction() as con``: commit on success, roll back on any exception.

    A connection found dead at BEGIN is replaced (BEGIN applies nothing, and the block has not run).
    """

    __slots__ = ("_acq", "_db", "_isolation", "_tx")

    def __init__(self, db: Database, isolation: str | None) -> None:
        self._db = db
        self._acq = Acquired(db)
        self._isolation = isolation
        self._tx: Any = None

    @property
    def untouched(self) -> bool:
        return self._acq.untouched

    async def __aenter__(self) -> Connection:
        for _ in range(self._db._replay_limit + 1):
            con = await self._acq.__aenter__()
            try:
                self._tx = con.transaction(isolation=self._isolation)  # type: ignore[arg-type]
                await self._tx.start()
            except BaseException as exc:
                dead = isinstance(exc, Exception) and is_transient(exc) and driver.is_closed(con)
                try:
                    await self._acq.__aexit__(type(exc), exc, None)
                except DashStorageError:
                    if not dead:
                        raise
                    if self._db.telemetry is not None:
                        self._db.telemetry.replayed("begin")
                    self._acq = Acquired(self._db)
                    continue
                raise
            self._acq.remark()
            return con
        raise DatabaseUnavailableError("every connection was closed by the server at BEGIN")

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if e is None:
                await self._tx.commit()
            else:
                await self._tx.rollback()
        except BaseException as exc:
            # Also on cancellation during ROLLBACK: the connection must go back to the pool.
            if e is not None and isinstance(exc, Exception):
                # The ROLLBACK failed because the block's own error broke the connection (e.g. it
                # was lost mid-COPY): report the block's error, which says what really happened
                # and may be retryable, not the rollback's "another operation is in progress".
                if self._acq._con is not None:
                    discard(self._acq._con)
                await self._acq.__aexit__(et, e, tb)
                return  # not a driver error: the caller's own exception propagates unchanged
            await self._acq.__aexit__(type(exc), exc, None)
            raise
        await self._acq.__aexit__(et, e, tb)


@asynccontextmanager
async def transaction_on(con: Connection) -> AsyncIterator[Connection]:
    """A transaction on a connection the caller already holds: commit on success; on any error,
    roll back without letting the rollback's own failure hide the first error.

    Not ``async with con.transaction()``: when the connection dies in the middle (say mid-COPY),
    the rollback fails too ("another operation is in progress"), and that must not replace the
    lost-connection error that makes the attempt worth retrying. A connection left in a
    transaction is rolled back by the pool on release, or discarded if broken.
    """
    tx = con.transaction()
    await tx.start()
    try:
        yield con
    except BaseException:
        with suppress(Exception):
            await tx.rollback()
        raise
    await tx.commit()

"""``Database``: the one object that owns the asyncpg pool.

It starts the embedded server when no server is configured, retries the first connect, maps every
driver error to a DashStorageError, and offers the few primitives the repositories need:
``fetch``/``fetchrow``/``fetchval``/``execute`` (one statement, optionally retried), ``run``
(a function on one connection), ``acquire`` and ``transaction``.

Retries are opt-in per call (``retry=True``): reads and idempotent writes ask for them; a write that
could apply twice never does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeAlias, TypeVar

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy

from dash_storage import embedded
from dash_storage.config import Settings, load_settings
from dash_storage.errors import (
    ConfigurationError,
    DashStorageError,
    DatabaseUnavailableError,
    PoolExhaustedError,
    is_driver_error,
    is_transient,
    map_error,
)
from dash_storage.retry import RetryPolicy, retry_call

__all__ = ["Database", "HealthReport", "PoolStats", "get_database", "reset_database"]

T = TypeVar("T")
Record = asyncpg.Record
#: A pooled connection, as handed out by ``acquire``/``transaction``/``run``.
Connection: TypeAlias = "PoolConnectionProxy[Record]"
log = logging.getLogger("dash_storage")


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


async def _init_connection(con: asyncpg.Connection[Record]) -> None:
    # JSON/JSONB in and out as Python objects, once per connection.
    for typename in ("json", "jsonb"):
        await con.set_type_codec(
            typename, schema="pg_catalog", encoder=_json_dumps, decoder=orjson.loads, format="text"
        )


async def _keep_session(con: asyncpg.Connection[Record]) -> None:
    """Pool reset hook: do nothing.

    asyncpg's default reset sends ``RESET ALL; UNLISTEN *; ...`` on every release, one extra round
    trip per call. The repositories never change session state (advisory locks are taken on
    dedicated connections), and asyncpg still rolls back any transaction left open before this hook.
    """


@dataclass(frozen=True, slots=True)
class PoolStats:
    size: int
    idle: int
    in_use: int
    waiting: int
    min: int
    max: int


@dataclass(frozen=True, slots=True)
class HealthReport:
    ok: bool
    latency_ms: float | None
    server_version: str | None
    database: str | None
    error: str | None = None


def _discard(con: Connection) -> None:
    """Close a connection that failed transiently, so a dying connection never goes back to the pool."""
    try:
        con.terminate()
    except asyncpg.InterfaceError:
        pass  # already closed and handed back by asyncpg's own cleanup


class _Acquired:
    """``async with db.acquire() as con``; a class, not a generator, to keep the hot path short."""

    __slots__ = ("_con", "_db", "_pool")

    def __init__(self, db: Database) -> None:
        self._db = db
        self._con: Connection | None = None
        self._pool: asyncpg.Pool | None = None

    async def __aenter__(self) -> Connection:
        self._pool = await self._db.ready()
        self._con = await self._db._acquire(self._pool)
        return self._con

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._pool is not None and self._con is not None
        if e is not None and is_transient(e):
            _discard(self._con)
        await self._pool.release(self._con)
        if e is not None and is_driver_error(e):
            raise map_error(e) from e


class _Transaction:
    """``async with db.transaction() as con``: commit on success, roll back on any exception."""

    __slots__ = ("_acq", "_isolation", "_tx")

    def __init__(self, db: Database, isolation: str | None) -> None:
        self._acq = _Acquired(db)
        self._isolation = isolation
        self._tx: Any = None

    async def __aenter__(self) -> Connection:
        con = await self._acq.__aenter__()
        try:
            self._tx = con.transaction(isolation=self._isolation)  # type: ignore[arg-type]
            await self._tx.start()
        except BaseException as exc:
            await self._acq.__aexit__(type(exc), exc, None)
            raise
        return con

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if e is None:
                await self._tx.commit()
            else:
                await self._tx.rollback()
        except Exception as exc:
            await self._acq.__aexit__(type(exc), exc, None)
            raise  # unreachable: __aexit__ raised the mapped error
        await self._acq.__aexit__(et, e, tb)


class Database:
    """Owns one asyncpg pool. Create it, ``await initialize()``, use it, ``await close()``.

    ``Database()`` reads the settings from the environment; pass ``settings`` (or keyword
    overrides such as ``postgres_db="other"``) to choose. A Database given to a repository
    belongs to the caller: the library never closes it.
    """

    def __init__(self, settings: Settings | None = None, **overrides: Any) -> None:
        if settings is not None and overrides:
            settings = load_settings(**{**dict(settings), **overrides})
        self.settings = settings if settings is not None else load_settings(**overrides)
        self._pool: asyncpg.Pool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._waiting = 0
        self._acquire_timeout = self.settings.connection_timeout_s
        self.policy = RetryPolicy(
            attempts=self.settings.postgres_retry_attempts, delay=self.settings.retry_delay_s
        )
        self.embedded_server: embedded.EmbeddedServer | None = None

    def __repr__(self) -> str:
        state = "open" if self._pool is not None else "closed"
        return (
            f"<Database {self.settings.target} db={self.settings.database_name()!r} {state} "
            f"pool={self.settings.postgres_min_pool_size}..{self.settings.postgres_max_pool_size}>"
        )

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def is_initialized(self) -> bool:
        return self._pool is not None

    async def initialize(self) -> None:
        """Open the pool (starting the embedded server first if that is the target).

        The first connect is retried per POSTGRES_RETRY_ATTEMPTS / POSTGRES_RETRY_DELAY. Calling it
        again is a no-op.
        """
        await self.ready()

    async def ready(self) -> asyncpg.Pool:
        """The open pool, opening it on first use (also after the event loop changed)."""
        pool = self._pool
        if pool is not None and self._loop is asyncio.get_running_loop():
            return pool
        if self._lock is None or self._loop is not asyncio.get_running_loop():
            if pool is not None:
                # The pool belongs to a loop that is gone (e.g. a second asyncio.run()).
                pool.terminate()
                self._pool = None
            self._lock = asyncio.Lock()
            self._loop = asyncio.get_running_loop()
        async with self._lock:
            if self._pool is None:
                self._pool = await self._open()
            return self._pool

    async def _open(self) -> asyncpg.Pool:
        s = self.settings
        kwargs = await self.connect_kwargs()

        async def attempt(_: int) -> asyncpg.Pool:
            pool = await asyncpg.create_pool(
                min_size=s.postgres_min_pool_size,
                max_size=s.postgres_max_pool_size,
                max_inactive_connection_lifetime=s.idle_timeout_s,
                init=_init_connection,
                reset=_keep_session,
                server_settings={"application_name": "dash-storage"},
                **kwargs,
            )
            assert pool is not None
            return pool

        try:
            return await retry_call(attempt, self.policy, what="connect")
        except DashStorageError as exc:
            cause = exc.__cause__
            if getattr(cause, "sqlstate", None) == "3D000":
                raise ConfigurationError(
                    f"POSTGRES_DB: database {s.database_name()!r} does not exist on the server "
                    "(create it, or point POSTGRES_DB / DATABASE_URL at an existing one)",
                    variable="POSTGRES_DB",
                ) from cause
            if getattr(cause, "sqlstate", None) in ("28P01", "28000"):
                raise ConfigurationError(
                    f"POSTGRES_USER/POSTGRES_PASSWORD: the server rejected the login: {cause}",
                    variable="POSTGRES_PASSWORD",
                ) from cause
            raise

    async def connect_kwargs(self, database: str | None = None) -> dict[str, Any]:
        """How to reach the target server (starting the embedded one if needed)."""
        s = self.settings
        if s.target == "server":
            return s.connect_kwargs(database=database)
        server = await self.start_embedded()
        name = database or s.postgres_db
        await _ensure_database(server, name, s.connection_timeout_s)
        return {**server.connect_kwargs(name), "timeout": s.connection_timeout_s}

    async def start_embedded(self) -> embedded.EmbeddedServer:
        if self.embedded_server is None:
            self.embedded_server = await asyncio.to_thread(embedded.start, self.settings.dash_data_dir)
        return self.embedded_server

    async def connect(self, database: str | None = None) -> asyncpg.Connection[Record]:
        """A dedicated connection outside the pool (for advisory locks, admin work). Caller closes it."""
        kwargs = await self.connect_kwargs(database)

        async def attempt(_: int) -> asyncpg.Connection[Record]:
            con: asyncpg.Connection[Record] = await asyncpg.connect(**kwargs)
            await _init_connection(con)
            return con

        return await retry_call(attempt, self.policy, what="connect")

    async def close(self) -> None:
        """Close the pool gracefully (waits for connections in use to be released)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), timeout=max(self.settings.connection_timeout_s, 5.0))
            except (TimeoutError, Exception):
                pool.terminate()

    async def __aenter__(self) -> Database:
        await self.initialize()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- connections --------------------------------------------------------------------------

    async def _acquire(self, pool: asyncpg.Pool) -> Connection:
        if pool.get_idle_size():
            # A connection is free: skip the timeout, whose wait_for() costs a task per call.
            try:
                return await pool.acquire()
            except Exception as exc:
                if not is_driver_error(exc):
                    raise
                raise map_error(exc) from exc
        self._waiting += 1
        try:
            return await pool.acquire(timeout=self._acquire_timeout)
        except TimeoutError as exc:
            size, idle = pool.get_size(), pool.get_idle_size()
            if size - idle >= self.settings.postgres_max_pool_size:
                raise PoolExhaustedError(
                    max_size=self.settings.postgres_max_pool_size,
                    timeout_ms=self.settings.postgres_connection_timeout,
                    in_use=size - idle,
                    waiting=self._waiting - 1,
                ) from exc
            raise DatabaseUnavailableError(
                f"timed out after {self.settings.postgres_connection_timeout} ms connecting to the "
                "database (POSTGRES_CONNECTION_TIMEOUT)"
            ) from exc
        except Exception as exc:
            if not is_driver_error(exc):
                raise
            raise map_error(exc) from exc
        finally:
            self._waiting -= 1

    def acquire(self) -> _Acquired:
        """``async with db.acquire() as con``: one pooled connection, released on exit.

        Raises PoolExhaustedError if none frees up within POSTGRES_CONNECTION_TIMEOUT.
        """
        return _Acquired(self)

    def transaction(self, *, isolation: str | None = None) -> _Transaction:
        """``async with db.transaction() as con``: a pooled connection inside one transaction."""
        return _Transaction(self, isolation)

    # -- one-statement helpers ----------------------------------------------------------------

    async def _once(self, method: str, query: str, args: Sequence[Any], timeout: float | None) -> Any:
        pool = self._pool
        if pool is None or self._loop is not asyncio.get_running_loop():
            pool = await self.ready()
        con = await self._acquire(pool)
        try:
            return await getattr(con, method)(query, *args, timeout=timeout)
        except Exception as exc:
            if is_transient(exc):
                _discard(con)
            raise map_error(exc) from exc
        finally:
            await pool.release(con)

    async def _call(
        self, method: str, query: str, args: Sequence[Any], retry: bool, timeout: float | None
    ) -> Any:
        if not retry:
            return await self._once(method, query, args, timeout)
        return await retry_call(
            lambda _a: self._once(method, query, args, timeout), self.policy, what="query"
        )

    async def fetch(
        self, query: str, *args: Any, retry: bool = False, timeout: float | None = None
    ) -> list[Record]:
        """Rows of one statement. ``retry=True`` only for reads and idempotent writes."""
        return await self._call("fetch", query, args, retry, timeout)  # type: ignore[no-any-return]

    async def fetchrow(
        self, query: str, *args: Any, retry: bool = False, timeout: float | None = None
    ) -> Record | None:
        return await self._call("fetchrow", query, args, retry, timeout)  # type: ignore[no-any-return]

    async def fetchval(
        self, query: str, *args: Any, retry: bool = False, timeout: float | None = None
    ) -> Any:
        return await self._call("fetchval", query, args, retry, timeout)

    async def execute(self, query: str, *args: Any, retry: bool = False, timeout: float | None = None) -> str:
        return await self._call("execute", query, args, retry, timeout)  # type: ignore[no-any-return]

    async def run(
        self, fn: Callable[[Connection, int], Awaitable[T]], *, retry: bool = False, transaction: bool = False
    ) -> T:
        """Run ``fn(con, attempt)`` on one pooled connection (inside a transaction if asked).

        With ``retry=True`` the whole function is re-run on a transient failure, so it must be
        idempotent; ``attempt`` (1 on the first try) lets it tell a retry apart.
        """

        async def once(attempt: int) -> T:
            if transaction:
                async with self.transaction() as con:
                    return await fn(con, attempt)
            async with self.acquire() as con:
                return await fn(con, attempt)

        if not retry:
            return await once(1)
        return await retry_call(once, self.policy, what="operation")

    # -- observability ------------------------------------------------------------------------

    def stats(self) -> PoolStats:
        """Pool occupancy: size, idle, in use, callers waiting, configured min and max."""
        s = self.settings
        pool = self._pool
        size = pool.get_size() if pool is not None else 0
        idle = pool.get_idle_size() if pool is not None else 0
        return PoolStats(
            size=size,
            idle=idle,
            in_use=size - idle,
            waiting=self._waiting,
            min=s.postgres_min_pool_size,
            max=s.postgres_max_pool_size,
        )

    async def health_check(self) -> HealthReport:
        """Round-trip to the server; never raises."""
        started = time.perf_counter()
        try:
            row = await self.fetchrow(
                "SELECT current_setting('server_version') AS v, current_database() AS d", retry=False
            )
        except DashStorageError as exc:
            return HealthReport(ok=False, latency_ms=None, server_version=None, database=None, error=str(exc))
        assert row is not None
        return HealthReport(
            ok=True,
            latency_ms=(time.perf_counter() - started) * 1000.0,
            server_version=row["v"],
            database=row["d"],
        )


async def _ensure_database(server: embedded.EmbeddedServer, name: str, timeout: float) -> None:
    """On the embedded server, create the configured database on first use."""
    con: asyncpg.Connection[Record] = await asyncpg.connect(
        **server.connect_kwargs("postgres"), timeout=timeout
    )
    try:
        exists = await con.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            try:
                # Identifiers cannot be parameters; quote_ident on the server makes the name safe.
                ident = await con.fetchval("SELECT quote_ident($1)", name)
                await con.execute(f"CREATE DATABASE {ident}")
            except asyncpg.DuplicateDatabaseError:
                pass  # created by a concurrent process
    finally:
        await con.close()


_default: Database | None = None


def get_database() -> Database:
    """The shared default Database, built from the environment on first use (not yet opened)."""
    global _default
    if _default is None:
        _default = Database()
    return _default


async def reset_database() -> None:
    """Close and forget the shared default (the next ``get_database()`` re-reads the settings)."""
    global _default
    db, _default = _default, None
    if db is not None:
        await db.close()

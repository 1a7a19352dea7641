"""``Database``: the one object that owns the asyncpg pool.

It starts the embedded server when no server is configured, retries the first connect, maps every
driver error to a DashStorageError, and offers the few primitives the repositories need:
``fetch``/``fetchrow``/``fetchval``/``execute`` (one statement, optionally retried), ``run``
(a function on one connection), ``acquire`` and ``transaction``.

Retries are opt-in per call (``retry=True``): reads and idempotent writes ask for them; a write that
could apply twice never does.

Dead connections: a pooled connection that the server closed while it sat idle (restart,
idle_session_timeout, pg_terminate_backend, a proxy that dropped it) is replaced without the caller
seeing an error, also for writes that are never retried, as long as it failed before anything was
sent on it (asyncpg's own count of statements sent tells). A statement that gets no answer within
POSTGRES_COMMAND_TIMEOUT (a stalled or half-open connection) fails with CommandTimeoutError and its
connection is discarded, never returned to the pool.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg

from dash_storage.core import driver
from dash_storage.core.config import Settings, load_settings
from dash_storage.core.connections import (
    Acquired,
    Connection,
    Record,
    Transaction,
    discard,
    keep_session,
    release,
    untouched,
)
from dash_storage.core.errors import (
    ConfigurationError,
    ConnectionLostError,
    DashStorageError,
    DatabaseUnavailableError,
    PoolExhaustedError,
    is_driver_error,
    is_transient,
    map_error,
)
from dash_storage.core.pooler import PoolerCheck, check_pooler
from dash_storage.core.replicas import Replicas
from dash_storage.core.retry import RetryPolicy, retry_call
from dash_storage.core.sockets import connection_init
from dash_storage.server import embedded, provision

if TYPE_CHECKING:
    from dash_storage.core.otel import DatabaseTelemetry
    from dash_storage.core.telemetry import Telemetry

__all__ = ["Connection", "Database", "HealthReport", "PoolStats", "Record", "get_database", "reset_database"]

T = TypeVar("T")
log = logging.getLogger("dash_storage")


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


class Database:
    """Owns one asyncpg pool. Create it, ``await initialize()``, use it, ``await close()``.

    ``Database()`` reads the settings from the environment; pass ``settings`` (or keyword
    overrides such as ``postgres_db="other"``) to choose. A Database given to a repository
    belongs to the caller: the library never closes it. ``telemetry=Telemetry(...)`` (see
    ``core.telemetry``) sends OpenTelemetry spans and metrics; DASH_OTEL=1 does so by default.
    """

    def __init__(
        self, settings: Settings | None = None, *, telemetry: Telemetry | None = None, **overrides: Any
    ) -> None:
        if settings is not None and overrides:
            settings = load_settings(**{**dict(settings), **overrides})
        self.settings = settings if settings is not None else load_settings(**overrides)
        self._pool: asyncpg.Pool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._waiting = 0
        self._closed = False
        self._acquire_timeout = self.settings.connection_timeout_s
        # How many dead connections one call may step over: the whole pool, plus one.
        self._replay_limit = self.settings.postgres_max_pool_size + 1
        self.policy = RetryPolicy(
            attempts=self.settings.postgres_retry_attempts, delay=self.settings.retry_delay_s
        )
        self.embedded_server: embedded.EmbeddedServer | None = None
        #: What the start-up check saw in front of the server (None: not checked yet, or embedded).
        self.pooler: PoolerCheck | None = None
        #: Spans and metrics (``telemetry=``, or DASH_OTEL=1 with the global providers); None: off.
        self.telemetry: DatabaseTelemetry | None = None
        #: The read replicas of DATABASE_READ_URL (``core.replicas``); None: every read goes to the primary.
        self.replicas: Replicas | None = Replicas(self) if self.settings.read_urls else None
        if telemetry is None and self.settings.dash_otel:
            from dash_storage.core.telemetry import Telemetry

            telemetry = Telemetry(query_text=self.settings.dash_otel_query_text)
        if telemetry is not None:
            self.telemetry = telemetry.bind(self)
            self.policy = replace(self.policy, observer=self.telemetry.retried)

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
        self._closed = False
        await self.ready()

    async def ready(self) -> asyncpg.Pool:
        """The open pool, opening it on first use (also after the event loop changed).

        After ``close()`` it refuses (until ``initialize()`` is called again), so background work
        that outlives a close (a retry, a combined batch) cannot silently reopen a pool nobody closes.
        """
        pool = self._pool
        if pool is not None and self._loop is asyncio.get_running_loop():
            return pool
        if self._closed:
            raise DatabaseUnavailableError("this Database was closed; call initialize() to open it again")
        if self._lock is None or self._loop is not asyncio.get_running_loop():
            if pool is not None:
                # The pool belongs to a loop that is gone (e.g. a second asyncio.run()).
                pool.terminate()
                self._pool = None
            self._lock = asyncio.Lock()
            self._loop = asyncio.get_running_loop()
        async with self._lock:
            if self._pool is None:
                pool = await self._open()
                if self._closed:  # close() ran while the pool was being opened
                    pool.terminate()
                    raise DatabaseUnavailableError("this Database was closed while it was opening")
                self._pool = pool
            return self._pool

    async def _open(self) -> asyncpg.Pool:
        s = self.settings
        kwargs = await self.connect_kwargs()

        async def attempt(_: int) -> asyncpg.Pool:
            try:
                pool = await asyncpg.create_pool(
                    min_size=s.postgres_min_pool_size,
                    max_size=s.postgres_max_pool_size,
                    max_inactive_connection_lifetime=s.idle_timeout_s,
                    init=connection_init(s),
                    reset=keep_session,
                    server_settings={"application_name": "dash-storage"},
                    # Bounds every statement on a pooled connection, and asyncpg's cancel request
                    # and reset on release, so a stalled connection cannot hold a caller forever.
                    command_timeout=s.command_timeout_s,
                    **kwargs,
                )
            except TimeoutError as exc:
                raise self._connect_timeout() from exc
            assert pool is not None
            return pool

        try:
            pool = await retry_call(attempt, self.policy, what="connect")
        except DashStorageError as exc:
            raise _with_flags(self._explain_connect_failure(exc), exc) from exc.__cause__
        if s.target == "server":
            try:
                await self._check_pooler(pool, kwargs)
            except BaseException:
                pool.terminate()
                raise
        return pool

    async def _check_pooler(self, pool: asyncpg.Pool, kwargs: dict[str, Any]) -> None:
        """Refuse (ConfigurationError) to open a pool whose POSTGRES_POOLER does not match what is
        in front of the server, so that a wrong setting fails here, not later under load."""

        async def open_other() -> asyncpg.Connection[Record]:
            other: asyncpg.Connection[Record] = await asyncpg.connect(**kwargs)
            return other

        try:
            async with pool.acquire() as con:
                self.pooler = await check_pooler(con, self.settings, open_other)
        except Exception as exc:
            if isinstance(exc, DashStorageError) or not is_driver_error(exc):
                raise
            raise map_error(exc, context="checking POSTGRES_POOLER") from exc

    def _explain_connect_failure(self, exc: DashStorageError, *, direct: bool = False) -> DashStorageError:
        """``exc`` from a connect (``direct``: to DATABASE_DIRECT_URL), said so that the user knows
        what to change."""
        s = self.settings
        state = getattr(exc.__cause__, "sqlstate", None)
        # A pooler (PgBouncer) says the same two refusals with a code of its own.
        if driver.message_is_pooler_unknown_database(exc.__cause__):
            state = "3D000"
        elif driver.message_is_pooler_login_rejected(exc.__cause__):
            state = "28P01"
        if direct and state in ("3D000", "28P01", "28000"):
            return ConfigurationError(
                f"DATABASE_DIRECT_URL: the server refused it: {exc.__cause__}",
                variable="DATABASE_DIRECT_URL",
            )
        if state == "3D000":
            return ConfigurationError(
                f"POSTGRES_DB: database {s.database_name()!r} does not exist on the server "
                "(create it, or point POSTGRES_DB / DATABASE_URL at an existing one)",
                variable="POSTGRES_DB",
            )
        if state in ("28P01", "28000"):
            return ConfigurationError(
                f"POSTGRES_USER/POSTGRES_PASSWORD: the server rejected the login: {exc.__cause__}",
                variable="POSTGRES_PASSWORD",
            )
        if isinstance(exc, DatabaseUnavailableError) and not isinstance(exc, ConnectionLostError):
            # Say which server was tried, so "connection refused" is actionable.
            where = self.describe_target(direct=direct)
            return DatabaseUnavailableError(f"cannot reach PostgreSQL at {where}: {exc}")
        return exc

    def describe_target(self, *, direct: bool = False) -> str:
        """Where this Database connects (``direct``: where ``connect()`` goes), for messages (never
        includes a password)."""
        s = self.settings
        if direct and s.database_direct_url is not None:
            from urllib.parse import urlsplit

            parts = urlsplit(s.database_direct_url.get_secret_value())
            return f"{parts.hostname or 'localhost'}:{parts.port or 5432} (DATABASE_DIRECT_URL)"
        if s.target == "embedded":
            where = self.embedded_server.socket_dir if self.embedded_server else s.dash_data_dir
            return f"the embedded server ({where})"
        if s.database_url is not None:
            from urllib.parse import urlsplit

            parts = urlsplit(s.database_url.get_secret_value())
            return f"{parts.hostname or 'localhost'}:{parts.port or 5432} (DATABASE_URL)"
        return f"{s.postgres_host}:{s.postgres_port} (POSTGRES_HOST / POSTGRES_PORT)"

    async def connect_kwargs(self, database: str | None = None) -> dict[str, Any]:
        """How to reach the target server (starting the embedded one if needed)."""
        s = self.settings
        if s.target == "server":
            return s.connect_kwargs(database=database)
        server = await self.start_embedded()
        name = database or s.postgres_db
        await provision.ensure_database(server, name, s.connection_timeout_s)
        return {**server.connect_kwargs(name), "timeout": s.connection_timeout_s}

    async def start_embedded(self) -> embedded.EmbeddedServer:
        if self.embedded_server is None:
            self.embedded_server = await provision.start_embedded(self.settings.dash_data_dir)
        return self.embedded_server

    @property
    def can_hold_session(self) -> bool:
        """Whether ``connect()`` can give a connection that keeps session state: not behind a
        transaction-mode pooler (POSTGRES_POOLER=transaction) unless DATABASE_DIRECT_URL is set."""
        s = self.settings
        return s.database_direct_url is not None or not s.session_state_needs_direct

    async def connect(self, database: str | None = None) -> asyncpg.Connection[Record]:
        """A dedicated connection outside the pool, for session state (advisory locks, LISTEN) and
        admin work. Caller closes it.

        It goes to DATABASE_DIRECT_URL when that is set (around any pooler), else where the pool
        goes. Behind a transaction-mode pooler (POSTGRES_POOLER=transaction) session state would
        not survive a transaction, so there it needs DATABASE_DIRECT_URL: ConfigurationError without.
        """
        s = self.settings
        direct = s.direct_connect_kwargs(database=database)
        if direct is None and not self.can_hold_session:
            raise ConfigurationError(
                "DATABASE_DIRECT_URL is not set, and this needs a connection that keeps session "
                "state (migrations, advisory locks, LISTEN): behind a transaction-mode pooler "
                "(POSTGRES_POOLER=transaction) that state would be lost between transactions. Set "
                "DATABASE_DIRECT_URL to the URL of the PostgreSQL server itself, not the pooler's",
                variable="DATABASE_DIRECT_URL",
            )
        kwargs = direct if direct is not None else await self.connect_kwargs(database)

        async def attempt(_: int) -> asyncpg.Connection[Record]:
            try:
                con: asyncpg.Connection[Record] = await asyncpg.connect(**kwargs)
            except TimeoutError as exc:
                raise self._connect_timeout() from exc
            await connection_init(self.settings)(con)
            return con

        try:
            return await retry_call(attempt, self.policy, what="connect")
        except DashStorageError as exc:
            explained = self._explain_connect_failure(exc, direct=direct is not None)
            raise _with_flags(explained, exc) from exc.__cause__

    async def close(self) -> None:
        """Close the pool gracefully (waits for connections in use to be released)."""
        self._closed = True
        if self.replicas is not None:
            await self.replicas.close()
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

    def _connect_timeout(self) -> DatabaseUnavailableError:
        return DatabaseUnavailableError(
            f"timed out after {self.settings.postgres_connection_timeout} ms connecting to the "
            "database (POSTGRES_CONNECTION_TIMEOUT)"
        )

    async def _acquire(self, pool: asyncpg.Pool) -> Connection:
        """A pooled connection that is not already known to be dead.

        A connection whose server hung up while it sat idle is never handed out: it is closed
        (the pool opens a fresh one in its place) and the next one is taken.
        """
        con = await self._checkout(pool)
        if not driver.gone_while_idle(con):
            return con
        for _ in range(self._replay_limit):
            log.debug("pooled connection was closed by the server while idle; replacing it")
            if self.telemetry is not None:
                self.telemetry.replayed("idle")
            discard(con)
            await release(pool, con)
            con = await self._checkout(pool)
            if not driver.gone_while_idle(con):
                return con
        discard(con)
        await release(pool, con)
        raise ConnectionLostError(
            f"every pooled connection tried ({self._replay_limit + 1}) had been closed by the server; "
            "nothing was sent"
        )

    async def _checkout(self, pool: asyncpg.Pool) -> Connection:
        # A connection is free: take it at once, no timeout needed.
        try:
            con: Connection | None = await driver.acquire_idle(pool)
        except TimeoutError as exc:  # replacing a closed connection timed out
            raise self._connect_timeout() from exc
        except Exception as exc:
            if not is_driver_error(exc):
                raise
            raise map_error(exc) from exc
        if con is not None:
            return con
        self._waiting += 1
        try:
            # Not acquire(timeout=...): its wait_for() starts a task per call (Python 3.11).
            async with asyncio.timeout(self._acquire_timeout):
                return await pool.acquire()
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

    def acquire(self) -> Acquired:
        """``async with db.acquire() as con``: one pooled connection, released on exit.

        Raises PoolExhaustedError if none frees up within POSTGRES_CONNECTION_TIMEOUT.
        """
        return Acquired(self)

    def transaction(self, *, isolation: str | None = None) -> Transaction:
        """``async with db.transaction() as con``: a pooled connection inside one transaction."""
        return Transaction(self, isolation)

    # -- one-statement helpers ----------------------------------------------------------------

    async def _once(self, method: str, query: str, args: Sequence[Any], timeout: float | None) -> Any:
        """One statement on one pooled connection.

        A connection found dead before the statement was sent is replaced and the statement sent on
        another (at most ``_replay_limit`` times). That is not a retry: nothing reached the server,
        so it holds for writes that are never retried too.
        """
        pool = self._pool
        if pool is None or self._loop is not asyncio.get_running_loop():
            pool = await self.ready()
        replays = 0
        while True:
            con = await self._acquire(pool)
            mark = driver.mark(con)
            try:
                return await getattr(driver.connection_of(con), method)(query, *args, timeout=timeout)
            except Exception as exc:
                if not is_transient(exc):
                    raise map_error(exc) from exc
                unsent = untouched(con, mark, exc, single=True)
                discard(con)
                if not unsent or replays >= self._replay_limit:
                    raise map_error(exc) from exc
                log.debug("pooled connection was dead (%s); using another", type(exc).__name__)
                if self.telemetry is not None:
                    self.telemetry.replayed("unsent")
            finally:
                await release(pool, con, self._waiting)
            replays += 1

    async def _call(
        self, method: str, query: str, args: Sequence[Any], retry: bool, timeout: float | None
    ) -> Any:
        if not retry:
            return await self._once(method, query, args, timeout)
        return await self._retried(method, query, args, timeout)

    async def _retried(self, method: str, query: str, args: Sequence[Any], timeout: float | None) -> Any:
        # The first try runs outside the retry loop, which only a failure needs.
        try:
            return await self._once(method, query, args, timeout)
        except Exception as exc:
            failed = exc
        return await retry_call(
            lambda _a: self._once(method, query, args, timeout), self.policy, what="query", failed=failed
        )

    async def fetch(
        self, query: str, *args: Any, retry: bool = False, timeout: float | None = None, replica: bool = False
    ) -> list[Record]:
        """Rows of one statement. ``retry=True`` only for reads and idempotent writes. ``replica=True``
        only for a read-only statement: it may then go to a read replica (DATABASE_READ_URL), which
        has every earlier write of this Database (see ``core.replicas``)."""
        if self.replicas is not None:
            return await self.replicas.call("fetch", query, args, retry, timeout, replica)  # type: ignore[no-any-return]
        if retry:
            return await self._retried("fetch", query, args, timeout)  # type: ignore[no-any-return]
        return await self._once("fetch", query, args, timeout)  # type: ignore[no-any-return]

    async def fetchrow(
        self, query: str, *args: Any, retry: bool = False, timeout: float | None = None, replica: bool = False
    ) -> Record | None:
        if self.replicas is not None:
            return await self.replicas.call("fetchrow", query, args, retry, timeout, replica)  # type: ignore[no-any-return]
        if retry:
            return await self._retried("fetchrow", query, args, timeout)  # type: ignore[no-any-return]
        return await self._once("fetchrow", query, args, timeout)  # type: ignore[no-any-return]

    async def fetchval(
        self, query: str, *args: Any, retry: bool = False, timeout: float | None = None, replica: bool = False
    ) -> Any:
        if self.replicas is not None:
            return await self.replicas.call("fetchval", query, args, retry, timeout, replica)
        return await self._call("fetchval", query, args, retry, timeout)

    async def execute(self, query: str, *args: Any, retry: bool = False, timeout: float | None = None) -> str:
        if self.replicas is not None:
            return await self.replicas.call("execute", query, args, retry, timeout, False)  # type: ignore[no-any-return]
        return await self._call("execute", query, args, retry, timeout)  # type: ignore[no-any-return]

    async def run(
        self, fn: Callable[[Connection, int], Awaitable[T]], *, retry: bool = False, transaction: bool = False
    ) -> T:
        """Run ``fn(con, attempt)`` on one pooled connection (inside a transaction if asked).

        With ``retry=True`` the whole function is re-run on a transient failure, so it must be
        idempotent; ``attempt`` (1 on the first try) lets it tell a retry apart. Either way, if the
        connection turns out to be dead before ``fn`` sent anything on it, ``fn`` is called again
        (same ``attempt``) on another connection: nothing reached the server, so this is safe for
        any ``fn`` whose work before its first statement can happen twice.
        """

        if not retry:
            return await self._run(fn, 1, transaction)
        # The first try runs outside the retry loop, which only a failure needs.
        try:
            return await self._run(fn, 1, transaction)
        except Exception as exc:
            failed = exc
        return await retry_call(
            lambda attempt: self._run(fn, attempt, transaction), self.policy, what="operation", failed=failed
        )

    async def _run(self, fn: Callable[[Connection, int], Awaitable[T]], attempt: int, transaction: bool) -> T:
        """One try of ``run``. A connection found dead before ``fn`` sent anything on it is
        replaced: nothing was applied, so this is not a retry and holds for any ``fn``."""
        for replay in range(self._replay_limit + 1):
            ctx = Transaction(self, None) if transaction else Acquired(self)
            try:
                async with ctx as con:
                    return await fn(con, attempt)
            except DashStorageError:
                if not ctx.untouched or replay == self._replay_limit:
                    raise
                log.debug("pooled connection was dead before use; using another")
                if self.telemetry is not None:
                    self.telemetry.replayed("block")
        raise AssertionError("unreachable")

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


def _with_flags(new: DashStorageError, old: DashStorageError) -> DashStorageError:
    if new is not old:
        new.retries_exhausted = old.retries_exhausted
    return new


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

"""The migration runner: applies ``YYYYMMDDHHMMSS_name.sql`` files in name order, exactly once.

Files come from two folders: the built-in ones shipped in ``dash_storage/migrations/versions/``
(package data, found with :mod:`importlib.resources`) and the user's own folder
(``DASH_MIGRATIONS_DIR``). Every applied file is recorded in ``_migrations`` with the hex SHA-256
of its bytes, so an applied file that was edited afterwards is detected ("modified") and ``migrate``
refuses to run until it is resolved.

``migrate`` works on a dedicated connection (never a pooled one: the pool does not reset session
state, and the advisory lock is session state), to DATABASE_DIRECT_URL when that is set (around a
pooler; behind a transaction-mode pooler it must be), and holds ``pg_advisory_lock`` for the whole run,
so two runners started at once apply every file exactly once. Each file runs in its own
transaction together with its ``_migrations`` row; a file whose header has the line
``-- dash:no-transaction`` runs statement by statement outside a transaction instead (for
``CREATE INDEX CONCURRENTLY`` and the like).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from dash_storage.core import driver
from dash_storage.core.database import Database
from dash_storage.core.errors import (
    DashStorageError,
    DatabaseUnavailableError,
    MigrationError,
    is_driver_error,
    map_error,
)

__all__ = [
    "ADVISORY_LOCK_KEY",
    "FILENAME_PATTERN",
    "NAME_PATTERN",
    "NO_TRANSACTION_MARKER",
    "MigrationFile",
    "MigrationRunError",
    "MigrationRunner",
    "MigrationState",
    "MigrationStatus",
    "builtin_migrations",
    "check_migration_name",
    "create_migration",
    "discover_migrations",
    "folder_migrations",
    "split_statements",
]

from dash_storage.migrations.files import (
    FILENAME_PATTERN,
    NAME_PATTERN,
    NO_TRANSACTION_MARKER,
    MigrationFile,
    builtin_migrations,
    check_migration_name,
    create_migration,
    discover_migrations,
    folder_migrations,
    has_code,
    split_statements,
)

log = logging.getLogger("dash_storage.migrations")

# pg_advisory_lock key shared by every dash-storage migration runner: b"dashmigr" as a bigint.
ADVISORY_LOCK_KEY = int.from_bytes(b"dashmigr", "big")

DirectConnection: TypeAlias = "asyncpg.Connection[asyncpg.Record]"
AnyConnection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"

MigrationState = Literal["applied", "pending", "modified", "missing"]

# Must stay identical to the table in schema.sql (the schema-equality test compares them).
_CREATE_TABLE = """
CREATE TABLE _migrations (
    id         SERIAL      PRIMARY KEY,
    name       TEXT        NOT NULL UNIQUE,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    checksum   TEXT        NOT NULL
)
"""
# SQLSTATE 25001 active_sql_transaction: e.g. CREATE INDEX CONCURRENTLY inside a transaction block.
_ACTIVE_SQL_TRANSACTION = "25001"
_TABLE_EXISTS = "SELECT to_regclass('_migrations') IS NOT NULL"
_READ_APPLIED = "SELECT name, applied_at, checksum FROM _migrations ORDER BY name"
_RECORD = "INSERT INTO _migrations (name, checksum) VALUES ($1, $2)"


class MigrationRunError(MigrationError):
    """``migrate`` failed after it had applied some files; ``applied`` names them (they stay).

    ``error`` is the failure itself; ``migration`` is the file that failed, when one did.
    """

    def __init__(self, error: DashStorageError, applied: list[str]) -> None:
        super().__init__(
            f"{error}. Applied before the failure (these stay applied): {', '.join(applied)}",
            migration=getattr(error, "migration", None),
        )
        self.error = error
        self.applied = tuple(applied)


@dataclass(frozen=True, slots=True)
class MigrationStatus:
    """One migration as ``status()`` sees it.

    ``checksum`` is the file's checksum when there is a file, else the recorded one (missing);
    ``applied_at`` is set for applied, modified and missing; ``path`` is None for missing.
    """

    name: str
    state: MigrationState
    applied_at: dt.datetime | None
    checksum: str
    path: Path | None


class MigrationRunner:
    """Applies and reports the migrations of one database.

    ``extra_dir`` is the user's own folder; it defaults to DASH_MIGRATIONS_DIR from the
    database's settings.
    """

    def __init__(self, db: Database, *, extra_dir: Path | None = None) -> None:
        self.db = db
        self.extra_dir = extra_dir if extra_dir is not None else db.settings.dash_migrations_dir

    def files(self) -> list[MigrationFile]:
        """Every migration file (built-in and user), in name order."""
        return discover_migrations(self.extra_dir)

    async def status(self) -> list[MigrationStatus]:
        """Every migration known from files or from ``_migrations``, in name order.

        Works on a database that has never been migrated (everything is pending).
        """
        files = self.files()
        con = await self._connect()
        try:
            applied = await _read_applied(con)
        except Exception as exc:
            if isinstance(exc, DashStorageError) or not is_driver_error(exc):
                raise
            raise map_error(exc, context="reading migration state") from exc
        finally:
            await _close(con)
        return _combine(files, applied)

    async def migrate(self) -> list[str]:
        """Apply every pending migration in name order; return the names applied.

        Holds the advisory lock for the whole run. Refuses (MigrationError) while an applied
        file has been modified. A file that fails is rolled back (unless it is a no-transaction
        file) and reported with the server's message; files before it stay applied.
        """
        files = self.files()  # bad file names fail before we touch the database
        con = await self._connect()
        done: list[str] = []
        try:
            await con.execute("SELECT pg_advisory_lock($1)", ADVISORY_LOCK_KEY)
            try:
                await self._migrate_locked(con, files, done)
            finally:
                await _unlock(con)
        except Exception as exc:
            error = map_error(exc, context="migrate") if is_driver_error(exc) else exc
            if not isinstance(error, DashStorageError):
                raise
            cause = exc.__cause__ if error is exc else exc
            if done:  # the files before the failure stay applied: say which
                raise MigrationRunError(error, done) from cause
            raise error from cause
        finally:
            await _close(con)
        return done

    async def _connect(self) -> DirectConnection:
        """A dedicated connection; failing, the error names the server that was tried."""
        try:
            return await self.db.connect()
        except DashStorageError as exc:
            named = _connect_error(self.db, exc)
            if named is exc:
                raise
            raise named from exc.__cause__

    async def create(self, name: str, directory: Path | None = None) -> Path:
        """Write a new, empty migration file into ``directory`` (default: the user folder)."""
        return create_migration(name, directory if directory is not None else self.extra_dir)

    async def _migrate_locked(
        self, con: DirectConnection, files: list[MigrationFile], done: list[str]
    ) -> None:
        if not await con.fetchval(_TABLE_EXISTS):
            await con.execute(_CREATE_TABLE)
        statuses = _combine(files, await _read_applied(con))
        modified = [s.name for s in statuses if s.state == "modified"]
        if modified:
            raise MigrationError(
                f"applied migration(s) changed since they were applied: {', '.join(modified)} "
                "(checksum differs from _migrations). Restore the original file(s), or put the "
                "change in a new migration; migrate will not run until this is resolved",
                migration=modified[0],
            )
        pending = {s.name for s in statuses if s.state == "pending"}
        for file in files:
            if file.name not in pending:
                continue
            await _apply(con, file)
            log.info("applied migration %s", file.name)
            done.append(file.name)


def _connect_error(db: Database, exc: DashStorageError) -> DashStorageError:
    """A failed connect, said with the server that was tried (as the pooled connects say it)."""
    target = db.describe_target(direct=True)
    if isinstance(exc, DatabaseUnavailableError) and target not in str(exc):
        return DatabaseUnavailableError(f"cannot reach PostgreSQL at {target}: {exc}")
    return exc


async def _read_applied(con: AnyConnection) -> dict[str, asyncpg.Record]:
    if not await con.fetchval(_TABLE_EXISTS):
        return {}
    return {row["name"]: row for row in await con.fetch(_READ_APPLIED)}


def _combine(files: list[MigrationFile], applied: dict[str, asyncpg.Record]) -> list[MigrationStatus]:
    by_name = {f.name: f for f in files}
    out: list[MigrationStatus] = []
    for name in sorted(by_name.keys() | applied.keys()):
        file = by_name.get(name)
        row = applied.get(name)
        if file is None:
            assert row is not None
            out.append(MigrationStatus(name, "missing", row["applied_at"], row["checksum"], None))
        elif row is None:
            out.append(MigrationStatus(name, "pending", None, file.checksum, file.path))
        else:
            state: MigrationState = "applied" if row["checksum"] == file.checksum else "modified"
            out.append(MigrationStatus(name, state, row["applied_at"], file.checksum, file.path))
    return out


async def _apply(con: DirectConnection, file: MigrationFile) -> None:
    text = file.text
    if not file.no_transaction:
        try:
            async with con.transaction():
                if has_code(text):  # asyncpg fails on a query that is only comments
                    await con.execute(text)
                await con.execute(_RECORD, file.name, file.checksum)
        except Exception as exc:
            raise _failure(file, exc, text, 0, "rolled back; nothing of it was applied") from exc
        return
    statements = split_statements(text)
    for number, (offset, statement) in enumerate(statements, start=1):
        try:
            await con.execute(statement)
        except Exception as exc:
            note = (
                f"statement {number} of {len(statements)} failed; it runs outside a transaction "
                "(dash:no-transaction), so the statements before it stay applied and the file is "
                "not recorded"
            )
            raise _failure(file, exc, text, offset, note) from exc
    try:
        await con.execute(_RECORD, file.name, file.checksum)
    except Exception as exc:
        raise _failure(file, exc, text, 0, "its statements ran but it could not be recorded") from exc


def _failure(file: MigrationFile, exc: Exception, text: str, offset: int, note: str) -> MigrationError:
    if isinstance(exc, asyncpg.PostgresError):
        message = driver.message_with_detail(exc)
        hint = getattr(exc, "hint", None)
        if hint:
            message += f" (hint: {hint})"
        position = _position(exc)
        if position is not None:
            index = offset + position - 1
            line = text.count("\n", 0, index) + 1
            message += f" at line {line} (character {index + 1})"
        where = getattr(exc, "context", None)
        if where:
            message += f" [context: {where}]"
        if exc.sqlstate == _ACTIVE_SQL_TRANSACTION and not file.no_transaction:
            message += (
                f". This statement cannot run inside a transaction: add the line {NO_TRANSACTION_MARKER} "
                "to the file's header (the comment lines at its top) so it runs statement by statement"
            )
    else:
        message = str(map_error(exc)) if is_driver_error(exc) else f"{type(exc).__name__}: {exc}"
    return MigrationError(f"migration {file.name} failed: {message}; {note}", migration=file.name)


def _position(exc: asyncpg.PostgresError) -> int | None:
    raw = getattr(exc, "position", None)
    try:
        value = int(raw) if raw is not None else None
    except (TypeError, ValueError):
        return None
    return value if value is not None and value > 0 else None


async def _unlock(con: DirectConnection) -> None:
    if con.is_closed():
        return
    try:
        await con.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_KEY)
    except Exception:  # the session is unusable: ending it releases the lock anyway
        con.terminate()


async def _close(con: DirectConnection) -> None:
    if con.is_closed():
        return
    try:
        await con.close(timeout=5)
    except Exception:
        con.terminate()

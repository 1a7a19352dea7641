"""The migration runner: applies ``YYYYMMDDHHMMSS_name.sql`` files in name order, exactly once.

Files come from two folders: the built-in ones shipped in ``dash_storage/migrations/versions/``
(package data, found with :mod:`importlib.resources`) and the user's own folder
(``DASH_MIGRATIONS_DIR``). Every applied file is recorded in ``_migrations`` with the hex SHA-256
of its bytes, so an applied file that was edited afterwards is detected ("modified") and ``migrate``
refuses to run until it is resolved.

``migrate`` works on a dedicated connection (never a pooled one: the pool does not reset session
state, and the advisory lock is session state) and holds ``pg_advisory_lock`` for the whole run,
so two runners started at once apply every file exactly once. Each file runs in its own
transaction together with its ``_migrations`` row; a file whose header has the line
``-- dash:no-transaction`` runs statement by statement outside a transaction instead (for
``CREATE INDEX CONCURRENTLY`` and the like).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.resources
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.resources.abc import Traversable
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
    ValidationError,
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

log = logging.getLogger("dash_storage.migrations")

FILENAME_PATTERN = re.compile(r"^\d{14}_[a-z0-9_]+\.sql$")
NAME_PATTERN = re.compile(r"^[a-z0-9_]+$")
NO_TRANSACTION_MARKER = "-- dash:no-transaction"
_MAX_NAME_LENGTH = 100

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


@dataclass(frozen=True, slots=True)
class MigrationFile:
    """A migration file read from disk (or from the installed package)."""

    name: str
    data: bytes
    path: Path | None
    source: Literal["builtin", "user"]

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def text(self) -> str:
        try:
            return self.data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MigrationError(
                f"migration {self.name} is not valid UTF-8: {exc}", migration=self.name
            ) from None

    @property
    def header(self) -> list[str]:
        """The leading comment lines (blank lines allowed), up to the first line of SQL."""
        lines: list[str] = []
        for line in self.text.splitlines():
            stripped = line.strip()
            if stripped and not stripped.startswith("--"):
                break
            if stripped:
                lines.append(stripped)
        return lines

    @property
    def no_transaction(self) -> bool:
        return any(" ".join(line.split()) == NO_TRANSACTION_MARKER for line in self.header)


# -- finding files ----------------------------------------------------------------------------


def _ignored(name: str) -> bool:
    # Hidden files (.gitkeep, editor swap files) and anything that is not SQL (a README.txt, notes)
    # are not migrations and not errors. A .sql file with a bad name is an error: it is meant to run.
    return name.startswith(".") or not name.lower().endswith(".sql")


def _check_name(name: str, where: str) -> None:
    if not FILENAME_PATTERN.match(name):
        raise MigrationError(
            f"{where}: {name!r} is not a migration file name (expected YYYYMMDDHHMMSS_name.sql with "
            "name in [a-z0-9_]); rename or remove it",
            migration=name,
        )


def _from_traversables(
    entries: Iterable[Traversable], where: str, source: Literal["builtin", "user"]
) -> list[MigrationFile]:
    files: list[MigrationFile] = []
    for entry in entries:
        if not entry.is_file() or _ignored(entry.name):
            continue
        _check_name(entry.name, where)
        path = Path(str(entry)) if isinstance(entry, Path) else None
        files.append(MigrationFile(name=entry.name, data=entry.read_bytes(), path=path, source=source))
    return sorted(files, key=lambda f: f.name)


def builtin_migrations() -> list[MigrationFile]:
    """The migrations shipped inside the package, in name order."""
    root = importlib.resources.files("dash_storage.migrations") / "versions"
    return _from_traversables(root.iterdir(), "built-in migrations", "builtin")


def folder_migrations(directory: Path) -> list[MigrationFile]:
    """The migrations in a user folder, in name order."""
    if not directory.is_dir():
        raise MigrationError(f"migrations folder {directory} does not exist or is not a directory")
    return _from_traversables(directory.iterdir(), str(directory), "user")


def discover_migrations(extra_dir: Path | None) -> list[MigrationFile]:
    """Built-in plus user migrations, in name order; a name in both folders is an error."""
    files = builtin_migrations()
    if extra_dir is not None:
        builtin_names = {f.name for f in files}
        user = folder_migrations(extra_dir)
        clashes = sorted(f.name for f in user if f.name in builtin_names)
        if clashes:
            raise MigrationError(
                f"{', '.join(clashes)} exists both in the built-in migrations and in {extra_dir}; "
                "rename the user migration",
                migration=clashes[0],
            )
        files = sorted([*files, *user], key=lambda f: f.name)
    return files


# -- splitting a no-transaction file -----------------------------------------------------------

_DOLLAR_TAG = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")


def split_statements(sql: str) -> list[tuple[int, str]]:
    """Split SQL text into statements on top-level ``;``, as ``(offset, statement)`` pairs.

    Quotes ('...', E'...', "..."), dollar quotes ($tag$...$tag$) and comments (-- and nested
    /* */) are honoured, so a ``;`` inside them does not split. Statements that are only comments
    or whitespace are dropped. ``offset`` is where the statement starts in ``sql``.
    """
    out: list[tuple[int, str]] = []
    start = 0
    i = 0
    n = len(sql)

    def flush(end: int) -> None:
        chunk = sql[start:end]
        if _has_code(chunk):
            lead = len(chunk) - len(chunk.lstrip())
            out.append((start + lead, chunk.strip()))

    while i < n:
        c = sql[i]
        if c == "-" and sql.startswith("--", i):
            nl = sql.find("\n", i)
            i = n if nl < 0 else nl + 1
        elif c == "/" and sql.startswith("/*", i):
            i = _skip_block_comment(sql, i)
        elif c == "'":
            escapes = (
                i > 0 and sql[i - 1] in "eE" and (i < 2 or not (sql[i - 2].isalnum() or sql[i - 2] == "_"))
            )
            i = _skip_quoted(sql, i, "'", backslash=escapes)
        elif c == '"':
            i = _skip_quoted(sql, i, '"', backslash=False)
        elif (
            c == "$"
            and (m := _DOLLAR_TAG.match(sql, i))
            and not (i > 0 and (sql[i - 1].isalnum() or sql[i - 1] == "_"))
        ):
            tag = m.group(0)
            end = sql.find(tag, m.end())
            i = n if end < 0 else end + len(tag)
        elif c == ";":
            flush(i + 1)
            i += 1
            start = i
        else:
            i += 1
    flush(n)
    return out


def _skip_block_comment(sql: str, i: int) -> int:
    depth = 0
    n = len(sql)
    while i < n:
        if sql.startswith("/*", i):
            depth += 1
            i += 2
        elif sql.startswith("*/", i):
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    return n


def _skip_quoted(sql: str, i: int, quote: str, *, backslash: bool) -> int:
    i += 1
    n = len(sql)
    while i < n:
        c = sql[i]
        if backslash and c == "\\":
            i += 2
            continue
        if c == quote:
            if i + 1 < n and sql[i + 1] == quote:  # doubled quote inside the literal
                i += 2
                continue
            return i + 1
        i += 1
    return n


def _has_code(chunk: str) -> bool:
    """True when ``chunk`` holds something besides comments, whitespace and ``;``."""
    i, n = 0, len(chunk)
    while i < n:
        c = chunk[i]
        if c.isspace() or c == ";":
            i += 1
        elif chunk.startswith("--", i):
            nl = chunk.find("\n", i)
            i = n if nl < 0 else nl + 1
        elif chunk.startswith("/*", i):
            i = _skip_block_comment(chunk, i)
        else:
            return True
    return False


# -- creating a file --------------------------------------------------------------------------


def check_migration_name(name: object) -> str:
    """``name`` if it can name a migration (``[a-z0-9_]+``, at most 100 characters), else ValidationError."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ValidationError(
            "name", f"{name!r} must be lowercase letters, digits and underscores ([a-z0-9_]+)"
        )
    if len(name) > _MAX_NAME_LENGTH:
        raise ValidationError("name", f"at most {_MAX_NAME_LENGTH} characters")
    return name


def create_migration(name: str, directory: Path | None, *, now: dt.datetime | None = None) -> Path:
    """Write ``<UTC YYYYMMDDHHMMSS>_<name>.sql`` with the standard header into ``directory``.

    Refuses a name outside ``[a-z0-9_]+`` (ValidationError on ``name``), a missing folder
    (ValidationError on ``directory``) and an existing file (MigrationError): never overwrites.
    """
    check_migration_name(name)
    if directory is None:
        raise ValidationError(
            "directory", "no folder for the new migration: pass one (--dir) or set DASH_MIGRATIONS_DIR"
        )
    if not directory.is_dir():
        raise ValidationError("directory", f"{directory} does not exist or is not a directory")
    moment = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).replace(microsecond=0)
    filename = f"{moment:%Y%m%d%H%M%S}_{name}.sql"
    path = directory / filename
    content = f"-- Migration: {name}\n-- Created: {moment:%Y-%m-%dT%H:%M:%SZ}\n\n-- Add your SQL here\n"
    try:
        with path.open("x", encoding="utf-8", newline="\n") as fh:  # "x": never overwrite
            fh.write(content)
    except FileExistsError:
        raise MigrationError(
            f"{path} already exists; not overwriting it (wait a second and retry, or choose another name)",
            migration=filename,
        ) from None
    except OSError as exc:
        raise MigrationError(f"cannot write {path}: {exc.strerror}", migration=filename) from exc
    return path


# -- the runner -------------------------------------------------------------------------------


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
    target = db.describe_target()
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
                if _has_code(text):  # asyncpg fails on a query that is only comments
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

"""Migration files: their names, where they come from, their statements, and creating new ones.

Files are ``YYYYMMDDHHMMSS_name.sql``, from the built-in folder shipped in the package and the
user's own folder (``DASH_MIGRATIONS_DIR``); other files in a folder (a README.txt) are ignored.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.resources
import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Literal

from dash_storage.core.errors import MigrationError, ValidationError

__all__ = [
    "FILENAME_PATTERN",
    "NAME_PATTERN",
    "NO_TRANSACTION_MARKER",
    "MigrationFile",
    "builtin_migrations",
    "check_migration_name",
    "create_migration",
    "discover_migrations",
    "folder_migrations",
    "has_code",
    "split_statements",
]

FILENAME_PATTERN = re.compile(r"^\d{14}_[a-z0-9_]+\.sql$")
NAME_PATTERN = re.compile(r"^[a-z0-9_]+$")
NO_TRANSACTION_MARKER = "-- dash:no-transaction"
_MAX_NAME_LENGTH = 100


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
        if has_code(chunk):
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


def has_code(chunk: str) -> bool:
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

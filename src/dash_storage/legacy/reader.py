"""The SQLite side of the import: the legacy file, read-only, in rowid order, as one snapshot.

The file is opened with ``file:...?mode=ro`` inside one read transaction (a consistent snapshot
even if the old app is still writing) and read ``limit`` rows at a time by rowid, so a million
events never sit in memory at once. Columns an older file lacks are read as NULL; text that is not
valid UTF-8 is read with U+FFFD in place of the bad bytes, and those rows are remembered.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, cast

import aiosqlite

from dash_storage.core import driver
from dash_storage.core.errors import DashStorageError, ValidationError
from dash_storage.legacy.sqlite import AGENT_COLUMNS, EVENT_COLUMNS, SWARM_COLUMNS

__all__ = [
    "LEGACY_COLUMNS",
    "LEGACY_COUNT_SQL",
    "LEGACY_EVENT_AGENTS_SQL",
    "LEGACY_EVENT_SWARMS_SQL",
    "LEGACY_TABLE_INFO_SQL",
    "LegacyReader",
]

# The columns read, in the old store's order (absent columns are read as NULL); a swarm's
# budget_remaining is derived data and is not read.
LEGACY_COLUMNS: Final[Mapping[str, tuple[str, ...]]] = {
    "swarms": tuple(c for c in SWARM_COLUMNS if c != "budget_remaining"),
    "agents": AGENT_COLUMNS,
    "events": EVENT_COLUMNS,
}
# The only names that go into a statement as identifiers: the tables and columns above.
_IDENTIFIERS: Final = frozenset(LEGACY_COLUMNS).union(*LEGACY_COLUMNS.values())
# Columns of a legacy table (the table name comes from LEGACY_COLUMNS, never from input).
LEGACY_TABLE_INFO_SQL: Final = "SELECT name FROM pragma_table_info(?)"
# The distinct swarms the legacy events refer to (resolved once, before the events are read).
LEGACY_EVENT_SWARMS_SQL: Final = "SELECT DISTINCT swarm_id FROM events WHERE swarm_id IS NOT NULL"
# The distinct agents the legacy events refer to.
LEGACY_EVENT_AGENTS_SQL: Final = "SELECT DISTINCT agent_id FROM events WHERE agent_id IS NOT NULL"
# Rows in a legacy table (for the progress bar).
LEGACY_COUNT_SQL: Final[Mapping[str, str]] = {
    "swarms": "SELECT count(*) FROM swarms",
    "agents": "SELECT count(*) FROM agents",
    "events": "SELECT count(*) FROM events",
}


def _lossy_text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _cannot_open(exc: sqlite3.Error) -> bool:
    """SQLite could not open the file: its error code SQLITE_CANTOPEN, whatever the extended code
    (errors raised by Python's sqlite3 itself carry no code)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF == sqlite3.SQLITE_CANTOPEN


def _quoted(name: str) -> str:
    """A table or column of :data:`LEGACY_COLUMNS` as a quoted identifier; any other name is refused."""
    if name not in _IDENTIFIERS:
        raise DashStorageError(f"{name!r} is not a table or column of the legacy store")
    return '"' + name + '"'


def _select_sql(table: str, present: set[str]) -> str:
    """The statement that reads a batch of ``table``: rowid, then its :data:`LEGACY_COLUMNS` in order,
    NULL for those not ``present`` in the file; parameters: the last rowid read, the batch size."""
    columns = ", ".join(
        _quoted(c) if c in present else "NULL AS " + _quoted(c) for c in LEGACY_COLUMNS[table]
    )
    return " ".join(
        ("SELECT rowid,", columns, "FROM", _quoted(table), "WHERE rowid > ? ORDER BY rowid LIMIT ?")
    )


class LegacyReader:
    """Reads the legacy file read-only, in rowid order, inside one read transaction (a snapshot)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._con: aiosqlite.Connection | None = None
        self._select: dict[str, str] = {}
        self._present: dict[str, set[str]] = {}
        # rowids (per table) of rows read with invalid UTF-8 replaced by U+FFFD
        self.lossy: dict[str, set[int]] = {t: set() for t in LEGACY_COLUMNS}

    async def open(self) -> None:
        """Open the file read-only and learn its columns; ValidationError('path') if it is not one."""
        uri = self.path.resolve().as_uri()
        try:
            try:
                await self._open(uri + "?mode=ro")
            except sqlite3.OperationalError as exc:
                if not _cannot_open(exc):
                    raise
                # A WAL-mode file in a folder we may not write (SQLite cannot create its -shm file
                # there): read it as immutable instead.
                await self._open(uri + "?mode=ro&immutable=1")
        except sqlite3.Error as exc:
            raise ValidationError("path", f"cannot read {str(self.path)!r} as SQLite: {exc}") from exc

    async def _open(self, uri: str) -> None:
        con = await aiosqlite.connect(uri, uri=True, isolation_level=None)
        self._con = con
        try:
            await con.execute("BEGIN")  # one read transaction: a consistent snapshot of the file
            for table in LEGACY_COLUMNS:
                rows = await con.execute_fetchall(LEGACY_TABLE_INFO_SQL, (table,))
                present = {r[0] for r in rows}
                if not present:
                    raise ValidationError(
                        "path", f"{str(self.path)!r} is not a legacy Dash database (no table {table!r})"
                    )
                if "id" not in present:
                    raise ValidationError("path", f"legacy table {table!r} has no id column")
                self._present[table] = present
                self._select[table] = _select_sql(table, present)
        except BaseException:
            await self.close()
            raise

    async def count(self, table: str) -> int:
        assert self._con is not None
        rows = await self._con.execute_fetchall(LEGACY_COUNT_SQL[table])
        return int(next(iter(rows))[0])

    async def distinct_event_refs(self) -> tuple[list[Any], list[Any]]:
        """Every distinct swarm_id and agent_id the events refer to (the old indexes serve both)."""
        con = self._con
        assert con is not None
        present = self._present["events"]
        # Bad UTF-8 is replaced exactly as fetch() does, so the keys match the rows read later.
        con.text_factory = _lossy_text
        try:
            swarms = await con.execute_fetchall(LEGACY_EVENT_SWARMS_SQL) if "swarm_id" in present else []
            agents = await con.execute_fetchall(LEGACY_EVENT_AGENTS_SQL) if "agent_id" in present else []
        except sqlite3.Error as exc:
            raise ValidationError("path", f"reading legacy table 'events': {exc}") from exc
        finally:
            con.text_factory = str
        return [r[0] for r in swarms], [r[0] for r in agents]

    async def fetch(self, table: str, after: int, limit: int) -> list[tuple[Any, ...]]:
        """Up to ``limit`` rows with rowid > ``after`` (rowid first)."""
        assert self._con is not None
        con = self._con
        try:
            return cast(
                list[tuple[Any, ...]], list(await con.execute_fetchall(self._select[table], (after, limit)))
            )
        except sqlite3.OperationalError as exc:
            if not driver.sqlite_text_not_utf8(exc):
                raise ValidationError("path", f"reading legacy table {table!r}: {exc}") from exc
        # Text that is not valid UTF-8: read this batch again, replacing the bad bytes (U+FFFD),
        # and remember which rows may have lost bytes (the converters report them as repaired).
        con.text_factory = _lossy_text
        try:
            rows = cast(
                list[tuple[Any, ...]], list(await con.execute_fetchall(self._select[table], (after, limit)))
            )
        finally:
            con.text_factory = str
        lossy = self.lossy[table]
        for row in rows:
            if any(isinstance(v, str) and "\ufffd" in v for v in row):
                lossy.add(row[0])
        return rows

    async def close(self) -> None:
        con, self._con = self._con, None
        if con is not None:
            with contextlib.suppress(sqlite3.Error):
                await con.execute("ROLLBACK")
            await con.close()

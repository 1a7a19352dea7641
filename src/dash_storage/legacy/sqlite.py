"""``SQLiteStorage``: the store of earlier Dash versions (``dash.db``), in its exact old format.

Kept so that code which still reads or writes the old file keeps working, and so that the importer
and its tests can build realistic legacy files. The tables, column types and constraints are those
the TypeScript ``SQLiteStorage`` of earlier Dash versions created: TEXT ids, JSON as TEXT, ISO-8601
timestamps as TEXT, money as REAL. The method names are the TypeScript ones in snake_case. The
column lists here are the one home of the old schema's columns: the importer's reader takes them
from this module.

It is asynchronous through aiosqlite, which runs every SQLite call on its own thread, so a slow
disk never blocks the event loop. Every value is bound as a parameter.

Rows come back as plain dicts keyed by column name. The JSON columns are decoded; a column holding
text that is not JSON (old files have some) comes back as that raw text instead of raising.
Timestamps come back as the stored text (old files hold formats ``datetime`` cannot read).
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import aiosqlite
import orjson

from dash_storage.core.errors import ConflictError, DashStorageError, DatabaseError, ValidationError
from dash_storage.legacy.values import loads

__all__ = [
    "AGENT_COLUMNS",
    "AGENT_JSON_COLUMNS",
    "EVENT_COLUMNS",
    "EVENT_JSON_COLUMNS",
    "SCHEMA_STATEMENTS",
    "SWARM_COLUMNS",
    "SWARM_JSON_COLUMNS",
    "SQLiteStorage",
    "decode_json_column",
    "iso_now",
]

# -- the old schema, statement for statement ------------------------------------------------------

# Agents table of the old store (NOT NULL where the old code had it; ids may be NULL: SQLite allows it).
CREATE_AGENTS_SQL: Final = """
CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY,
    label TEXT,
    status TEXT NOT NULL,
    model TEXT NOT NULL,
    task TEXT NOT NULL,
    spawned_at TEXT NOT NULL,
    completed_at TEXT,
    runtime INTEGER DEFAULT 0,
    pause_time TEXT,
    paused_by TEXT,
    swarm_id TEXT,
    parent_id TEXT,
    child_ids TEXT, -- JSON array
    context TEXT, -- JSON
    code TEXT, -- JSON
    reasoning TEXT, -- JSON
    retry_count INTEGER DEFAULT 0,
    max_retries INTEGER DEFAULT 3,
    last_error TEXT,
    budget_limit REAL,
    safety_boundaries TEXT, -- JSON
    metadata TEXT -- JSON
)
"""
# Swarms table of the old store.
CREATE_SWARMS_SQL: Final = """
CREATE TABLE IF NOT EXISTS swarms (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    config TEXT NOT NULL, -- JSON
    agents TEXT NOT NULL, -- JSON array
    created_at TEXT NOT NULL,
    completed_at TEXT,
    budget_allocated REAL,
    budget_consumed REAL,
    budget_remaining REAL,
    metrics TEXT -- JSON
)
"""
# Events table of the old store.
CREATE_EVENTS_SQL: Final = """
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY,
    timestamp TEXT NOT NULL,
    event_type TEXT NOT NULL,
    source TEXT, -- JSON
    payload TEXT, -- JSON
    agent_id TEXT,
    swarm_id TEXT
)
"""
# The old store's indexes.
CREATE_INDEXES_SQL: Final = (
    "CREATE INDEX IF NOT EXISTS idx_agents_status ON agents(status)",
    "CREATE INDEX IF NOT EXISTS idx_agents_swarm ON agents(swarm_id)",
    "CREATE INDEX IF NOT EXISTS idx_agents_status_id ON agents(status, id)",
    "CREATE INDEX IF NOT EXISTS idx_agents_spawned ON agents(spawned_at DESC)",
    "CREATE INDEX IF NOT EXISTS idx_agents_lightweight ON agents(status, model, swarm_id, spawned_at)",
    "CREATE INDEX IF NOT EXISTS idx_events_agent ON events(agent_id)",
    "CREATE INDEX IF NOT EXISTS idx_events_swarm ON events(swarm_id)",
    "CREATE INDEX IF NOT EXISTS idx_events_type ON events(event_type)",
    "CREATE INDEX IF NOT EXISTS idx_events_time ON events(timestamp)",
)
SCHEMA_STATEMENTS: Final = (CREATE_AGENTS_SQL, CREATE_SWARMS_SQL, CREATE_EVENTS_SQL, *CREATE_INDEXES_SQL)

SWARM_COLUMNS: Final = tuple(
    "id name status config agents created_at completed_at budget_allocated budget_consumed "
    "budget_remaining metrics".split()
)
AGENT_COLUMNS: Final = tuple(
    "id label status model task spawned_at completed_at runtime pause_time paused_by swarm_id parent_id "
    "child_ids context code reasoning retry_count max_retries last_error budget_limit safety_boundaries "
    "metadata".split()
)
EVENT_COLUMNS: Final = ("id", "timestamp", "event_type", "source", "payload", "agent_id", "swarm_id")

SWARM_JSON_COLUMNS: Final = frozenset({"config", "agents", "metrics"})
AGENT_JSON_COLUMNS: Final = frozenset(
    {"child_ids", "context", "code", "reasoning", "safety_boundaries", "metadata"}
)
EVENT_JSON_COLUMNS: Final = frozenset({"source", "payload"})
_TIME_COLUMNS: Final = frozenset({"created_at", "completed_at", "spawned_at", "pause_time", "timestamp"})
_REAL_COLUMNS: Final = frozenset({"budget_allocated", "budget_consumed", "budget_remaining", "budget_limit"})
_INT_COLUMNS: Final = frozenset({"runtime", "retry_count", "max_retries"})
# The error names (Python 3.11+ sqlite3) of a write that repeats a key the table already has.
_DUPLICATE_KEY: Final = frozenset({"SQLITE_CONSTRAINT_PRIMARYKEY", "SQLITE_CONSTRAINT_UNIQUE"})

# -- statements (every value a parameter) ---------------------------------------------------------

# Insert one swarm row (all columns, in SWARM_COLUMNS order).
INSERT_SWARM_SQL: Final = """
INSERT INTO swarms (id, name, status, config, agents, created_at, completed_at, budget_allocated,
                    budget_consumed, budget_remaining, metrics)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
# Insert one agent row (all columns, in AGENT_COLUMNS order).
INSERT_AGENT_SQL: Final = """
INSERT INTO agents (id, label, status, model, task, spawned_at, completed_at, runtime, pause_time,
                    paused_by, swarm_id, parent_id, child_ids, context, code, reasoning, retry_count,
                    max_retries, last_error, budget_limit, safety_boundaries, metadata)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
# Insert one event row (all columns, in EVENT_COLUMNS order).
INSERT_EVENT_SQL: Final = """
INSERT INTO events (id, timestamp, event_type, source, payload, agent_id, swarm_id)
VALUES (?, ?, ?, ?, ?, ?, ?)
"""
# One swarm by id.
GET_SWARM_SQL: Final = "SELECT * FROM swarms WHERE id = ?"
# Every swarm, newest first (as the old getAllSwarms).
GET_ALL_SWARMS_SQL: Final = "SELECT * FROM swarms ORDER BY created_at DESC, id"
# One agent by id.
GET_AGENT_SQL: Final = "SELECT * FROM agents WHERE id = ?"
# The agents of a swarm, oldest spawn first.
GET_AGENTS_BY_SWARM_SQL: Final = "SELECT * FROM agents WHERE swarm_id = ? ORDER BY spawned_at, id"
# One event by id.
GET_EVENT_SQL: Final = "SELECT * FROM events WHERE id = ?"
# The newest events of a swarm (as the old getEventsBySwarm).
GET_EVENTS_BY_SWARM_SQL: Final = (
    "SELECT * FROM events WHERE swarm_id = ? ORDER BY timestamp DESC, id DESC LIMIT ?"
)
# The newest events of an agent (as the old getEventsByAgent).
GET_EVENTS_BY_AGENT_SQL: Final = (
    "SELECT * FROM events WHERE agent_id = ? ORDER BY timestamp DESC, id DESC LIMIT ?"
)

DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 100_000


@dataclass(frozen=True, slots=True)
class _Table:
    """One table of the old store: its columns, and the statements that write a row and read it."""

    row: str  # what one row is called in messages
    columns: tuple[str, ...]
    json_columns: frozenset[str]
    insert_sql: str
    get_sql: str


_SWARMS: Final = _Table("swarm", SWARM_COLUMNS, SWARM_JSON_COLUMNS, INSERT_SWARM_SQL, GET_SWARM_SQL)
_AGENTS: Final = _Table("agent", AGENT_COLUMNS, AGENT_JSON_COLUMNS, INSERT_AGENT_SQL, GET_AGENT_SQL)
_EVENTS: Final = _Table("event", EVENT_COLUMNS, EVENT_JSON_COLUMNS, INSERT_EVENT_SQL, GET_EVENT_SQL)


def iso_now() -> str:
    """The current UTC time as JavaScript's ``Date.toISOString()`` writes it (``...T12:00:00.000Z``)."""
    return _iso(dt.datetime.now(dt.UTC))


def _iso(value: dt.datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    value = value.astimezone(dt.UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def _new_legacy_id(prefix: str) -> str:
    """An id in the old style: ``<prefix>-<epoch ms>-<6 hex>``."""
    return f"{prefix}-{time.time_ns() // 1_000_000}-{secrets.token_hex(3)}"


def decode_json_column(value: Any) -> Any:
    """A JSON column's value decoded; NULL is None; text that is not JSON is returned unchanged."""
    return loads(value)[0]


def _row_to_dict(row: sqlite3.Row, json_columns: frozenset[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in row.keys():
        value = row[key]
        out[key] = decode_json_column(value) if key in json_columns else value
    return out


def _check_limit(limit: Any) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise ValidationError("limit", f"must be an integer, got {type(limit).__name__}")
    if limit < 1 or limit > MAX_LIMIT:
        raise ValidationError("limit", f"must be between 1 and {MAX_LIMIT}, got {limit}")
    return limit


def _check_id(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValidationError(field, "must be a non-empty string")
    return value


def _encode(column: str, value: Any, json_columns: frozenset[str]) -> Any:
    """A Python value as the old store wrote it into ``column``."""
    if column in json_columns:
        if value is None:
            return None
        try:
            return orjson.dumps(value, default=_json_default).decode()
        except TypeError as exc:
            raise ValidationError(column, f"is not JSON-serialisable: {exc}") from None
    if value is None:
        return None
    if column in _TIME_COLUMNS:
        if isinstance(value, dt.datetime):
            return _iso(value)
        if isinstance(value, str):
            return value
        raise ValidationError(column, f"must be a datetime or ISO-8601 text, got {type(value).__name__}")
    if column in _REAL_COLUMNS:
        if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
            raise ValidationError(column, f"must be a number, got {type(value).__name__}")
        return float(value)
    if column in _INT_COLUMNS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValidationError(column, f"must be an integer, got {type(value).__name__}")
        return value
    if not isinstance(value, str):
        raise ValidationError(column, f"must be a string, got {type(value).__name__}")
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, dt.datetime):
        return _iso(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _merge_fields(given: Mapping[str, Any] | None, extra: Mapping[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = dict(given or {})
    for key, value in extra.items():
        fields[key] = value
    return fields


def _reject_unknown(fields: Iterable[str], allowed: Iterable[str]) -> None:
    allowed_set = set(allowed)
    for key in fields:
        if key not in allowed_set:
            raise ValidationError(key, "is not a field of the legacy store")


class SQLiteStorage:
    """The old Dash store in a SQLite file. ``await initialize()``, use it, ``await close()``.

    ``db_path`` is the file (created on first use, with the old tables); ``enable_wal`` and
    ``busy_timeout`` (milliseconds) are the old options of the same names.
    """

    def __init__(
        self,
        db_path: str | os.PathLike[str] = "dash.db",
        *,
        enable_wal: bool = True,
        busy_timeout: int = 5000,
    ) -> None:
        self.db_path = Path(db_path)
        self.enable_wal = enable_wal
        self.busy_timeout = busy_timeout
        self._con: aiosqlite.Connection | None = None

    def __repr__(self) -> str:
        state = "open" if self._con is not None else "closed"
        return f"<SQLiteStorage {str(self.db_path)!r} {state}>"

    # -- lifecycle --------------------------------------------------------------------------------

    async def initialize(self) -> None:
        """Open the file (creating it and the old tables if absent), in WAL mode. Idempotent."""
        if self._con is not None:
            return
        try:
            con = await aiosqlite.connect(self.db_path, isolation_level=None)
        except sqlite3.Error as exc:
            raise DatabaseError(f"cannot open SQLite file {str(self.db_path)!r}: {exc}") from exc
        try:
            con.row_factory = sqlite3.Row
            await con.execute("PRAGMA busy_timeout = " + str(int(self.busy_timeout)))
            if self.enable_wal:
                await con.execute("PRAGMA journal_mode = WAL")
            for statement in SCHEMA_STATEMENTS:
                await con.execute(statement)
        except sqlite3.Error as exc:
            await con.close()
            raise DatabaseError(f"cannot initialise SQLite file {str(self.db_path)!r}: {exc}") from exc
        self._con = con

    async def close(self) -> None:
        """Close the file. Calling it twice is harmless."""
        con, self._con = self._con, None
        if con is not None:
            await con.close()

    async def __aenter__(self) -> SQLiteStorage:
        await self.initialize()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _connection(self) -> aiosqlite.Connection:
        if self._con is None:
            raise DashStorageError("SQLiteStorage is not initialised: call `await initialize()` first")
        return self._con

    async def _fetchall(self, sql: str, params: tuple[Any, ...]) -> list[sqlite3.Row]:
        con = self._connection()
        try:
            async with con.execute(sql, params) as cur:
                return list(await cur.fetchall())
        except sqlite3.Error as exc:
            raise DatabaseError(f"SQLite: {exc}") from exc

    async def _store(self, table: _Table, data: Mapping[str, Any], key: str) -> dict[str, Any]:
        """Insert a row (every column, as the old store wrote it) and return it as read back."""
        params = tuple(_encode(c, data.get(c), table.json_columns) for c in table.columns)
        con = self._connection()
        try:
            await con.execute(table.insert_sql, params)
        except sqlite3.IntegrityError as exc:
            if getattr(exc, "sqlite_errorname", None) in _DUPLICATE_KEY:
                raise ConflictError(f"{table.row} {key!r} already exists") from exc
            raise ValidationError(table.row, str(exc)) from exc
        except sqlite3.Error as exc:
            raise DatabaseError(f"SQLite: {exc}") from exc
        found = await self._get(table, key)
        assert found is not None
        return found

    async def _get(self, table: _Table, key: str) -> dict[str, Any] | None:
        rows = await self._fetchall(table.get_sql, (key,))
        return _row_to_dict(rows[0], table.json_columns) if rows else None

    async def _list(self, table: _Table, sql: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
        return [_row_to_dict(r, table.json_columns) for r in await self._fetchall(sql, params)]

    # -- swarms -----------------------------------------------------------------------------------

    async def create_swarm(self, swarm: Mapping[str, Any] | None = None, /, **fields: Any) -> dict[str, Any]:
        """Store a new swarm (a dict and/or keyword fields named like the columns) and return it.

        ``budget={"allocated": .., "consumed": .., "remaining": ..}`` is accepted as in the old API.
        Defaults: an old-style id, status ``creating``, empty config/agents/metrics, created now.
        """
        data = _merge_fields(swarm, fields)
        budget = data.pop("budget", None)
        if budget is not None:
            if not isinstance(budget, Mapping):
                raise ValidationError("budget", "must be a mapping with allocated/consumed/remaining")
            _reject_unknown(
                (f"budget.{k}" for k in budget), ("budget.allocated", "budget.consumed", "budget.remaining")
            )
            for part in ("allocated", "consumed", "remaining"):
                if part in budget:
                    data.setdefault(f"budget_{part}", budget[part])
        _reject_unknown(data, SWARM_COLUMNS)
        data.setdefault("id", _new_legacy_id("swarm"))
        data.setdefault("status", "creating")
        data.setdefault("config", {})
        data.setdefault("agents", [])
        data.setdefault("metrics", {})
        data.setdefault("created_at", iso_now())
        swarm_id = _check_id(data["id"], "id")
        if not isinstance(data.get("name"), str):
            raise ValidationError("name", "is required (a string)")
        if not isinstance(data["status"], str):
            raise ValidationError("status", "must be a string")
        return await self._store(_SWARMS, data, swarm_id)

    async def get_swarm(self, swarm_id: str) -> dict[str, Any] | None:
        """The swarm with this id, or None."""
        return await self._get(_SWARMS, _check_id(swarm_id, "swarm_id"))

    async def get_all_swarms(self) -> list[dict[str, Any]]:
        """Every swarm, newest first."""
        return await self._list(_SWARMS, GET_ALL_SWARMS_SQL, ())

    # -- agents -----------------------------------------------------------------------------------

    async def create_agent(self, agent: Mapping[str, Any] | None = None, /, **fields: Any) -> dict[str, Any]:
        """Store a new agent (a dict and/or keyword fields named like the columns) and return it.

        ``model`` and ``task`` are required (the old table has them NOT NULL). Defaults: an
        old-style id, status ``idle``, spawned now, runtime/retry_count 0, max_retries 3,
        child_ids ``[]``, metadata ``{}``.
        """
        data = _merge_fields(agent, fields)
        _reject_unknown(data, AGENT_COLUMNS)
        data.setdefault("id", _new_legacy_id("agent"))
        data.setdefault("status", "idle")
        data.setdefault("spawned_at", iso_now())
        data.setdefault("runtime", 0)
        data.setdefault("retry_count", 0)
        data.setdefault("max_retries", 3)
        data.setdefault("child_ids", [])
        data.setdefault("metadata", {})
        agent_id = _check_id(data["id"], "id")
        for required in ("model", "task", "status"):
            if not isinstance(data.get(required), str):
                raise ValidationError(required, "is required (a string)")
        return await self._store(_AGENTS, data, agent_id)

    async def get_agent(self, agent_id: str) -> dict[str, Any] | None:
        """The agent with this id, or None."""
        return await self._get(_AGENTS, _check_id(agent_id, "agent_id"))

    async def get_agents_by_swarm(self, swarm_id: str) -> list[dict[str, Any]]:
        """The agents of a swarm, oldest spawn first."""
        return await self._list(_AGENTS, GET_AGENTS_BY_SWARM_SQL, (_check_id(swarm_id, "swarm_id"),))

    # -- events -----------------------------------------------------------------------------------

    async def store_event(self, event: Mapping[str, Any] | None = None, /, **fields: Any) -> dict[str, Any]:
        """Append an event (``event_type`` required; ``source``/``payload`` any JSON) and return it."""
        data = _merge_fields(event, fields)
        _reject_unknown(data, EVENT_COLUMNS)
        data.setdefault("id", _new_legacy_id("evt"))
        data.setdefault("timestamp", iso_now())
        event_id = _check_id(data["id"], "id")
        if not isinstance(data.get("event_type"), str) or not data["event_type"]:
            raise ValidationError("event_type", "is required (a non-empty string)")
        return await self._store(_EVENTS, data, event_id)

    async def get_events_by_swarm(self, swarm_id: str, limit: int = DEFAULT_LIMIT) -> list[dict[str, Any]]:
        """The newest ``limit`` events of a swarm, newest first."""
        params = (_check_id(swarm_id, "swarm_id"), _check_limit(limit))
        return await self._list(_EVENTS, GET_EVENTS_BY_SWARM_SQL, params)

    async def get_events_by_agent(self, agent_id: str, limit: int = DEFAULT_LIMIT) -> list[dict[str, Any]]:
        """The newest ``limit`` events of an agent, newest first."""
        params = (_check_id(agent_id, "agent_id"), _check_limit(limit))
        return await self._list(_EVENTS, GET_EVENTS_BY_AGENT_SQL, params)

"""Import a legacy Dash SQLite file (``dash.db``) into PostgreSQL.

``await import_sqlite(db, "dash.db")`` copies every swarm (with its budget as a swarm-scope budget),
agent and event, and returns an :class:`ImportReport`. What it does, and why:

* **Read-only, streamed.** The file is opened with ``file:...?mode=ro`` inside one read
  transaction (a consistent snapshot even if the old app is still writing), and read in
  ``batch_size`` rows by rowid, so a million events never sit in memory at once.
* **Deterministic ids.** A legacy id that already parses as a UUID is kept; any other string
  becomes ``uuid5(LEGACY_NAMESPACE, "<table>:<id>")`` (see :func:`legacy_uuid`); references are
  mapped the same way. The budget of a swarm gets ``uuid5(LEGACY_NAMESPACE, "budget:<swarm id>")``.
  The legacy string id is kept in ``swarms.config["legacy_id"]`` / ``agents.metadata["legacy_id"]``.
* **Idempotent.** Every insert is ``ON CONFLICT DO NOTHING``: a second run writes nothing and
  counts those rows as already present.
* **Fast path for events.** Each batch is COPYed (binary) into a session TEMP table and moved
  with one ``INSERT INTO events SELECT ... ON CONFLICT (id) DO NOTHING``, one transaction per
  batch. PostgreSQL's side (index and foreign-key maintenance) is the bottleneck, so two writer
  connections take turns while Python reads and converts the next batch; a writer that loses
  its connection reconnects and re-writes its batch. A pool of one connection works too (one
  writer). References to rows outside the file are looked up once, before the events.
* **Nothing dropped silently.** Every rejected row and every repair is written to a JSON-lines
  report file (next to the input unless ``report_path`` is given), with a reason.
* **Dry run** (``dry_run=True``) reads and converts everything and asks PostgreSQL which rows
  already exist, but writes nothing to the database; the counts are those a real run would give.

Mapping rules (the report counts every one of them):

* swarms: legacy ``agents`` and ``metrics`` go to ``config["legacy_agents"]`` /
  ``config["legacy_metrics"]``; ``budget_allocated``/``budget_consumed`` (REAL) become a budget row
  (``Decimal(str(x))``, at most 10 decimal places; NULL → 0; negative → 0; consumed above
  allocated → allocated raised to consumed); a swarm with both budget columns NULL has no budget.
  ``budget_remaining`` is derived data and is not copied.
* agents: ``parent_id``/``child_ids`` go to ``metadata["legacy_parent_id"]`` /
  ``metadata["legacy_child_ids"]``; an agent whose swarm is missing is rejected
  (``agents.swarm_id`` is NOT NULL). ``lifecycle_state`` is derived from the legacy status.
* events: the legacy ``source`` is kept whole in ``payload["_legacy_source"]`` and its ``type``
  (agent/task/system) becomes ``entity_type`` (else ``agent`` when the event has an agent, else
  ``system``); ``severity`` is taken from a valid ``payload.severity``/``payload.level``, else
  ``info``. An event whose agent is missing is kept with ``agent_id`` NULL and the old id in
  ``payload["_legacy_agent_id"]``; an event without ``swarm_id`` takes its agent's swarm; an event
  whose swarm is missing (or that has neither) is rejected.
* JSON that does not parse is kept as ``{"_legacy_raw": "<text>"}``; valid JSON that must be an
  object but is not is kept as ``{"_legacy_value": <value>}``. Timestamps are read as ISO-8601
  (no offset = UTC) or epoch seconds/milliseconds; unparsable ones become NULL, or now() where the
  column is NOT NULL. NUL characters (PostgreSQL text cannot hold them) are removed; text that is
  not valid UTF-8 is read with U+FFFD in place of the bad bytes. Rows without an id are rejected.
* statuses: see :data:`SWARM_STATUS_MAP` and :data:`AGENT_STATUS_MAP`; values in neither map go to
  the conservative defaults (swarms ``paused``, agents ``blocked``): not running, not final, so a
  person decides what becomes of them.

References to rows that are not in the file but already exist in PostgreSQL (e.g. a swarm with a
UUID id created by the new code) are accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import math
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from pathlib import Path
from typing import IO, Any, Final, TypeAlias, cast

import aiosqlite
import orjson
from asyncpg.pgproto.pgproto import UUID as _FastUUID

from dash_storage.database import Connection, Database
from dash_storage.errors import DashStorageError, ValidationError
from dash_storage.models import AgentStatus, EntityType, LifecycleState, Severity, SwarmStatus

__all__ = [
    "AGENT_STATUS_DEFAULT",
    "AGENT_STATUS_MAP",
    "LEGACY_NAMESPACE",
    "SWARM_STATUS_DEFAULT",
    "SWARM_STATUS_MAP",
    "ImportReport",
    "ProgressCallback",
    "Reject",
    "Repair",
    "TableCounts",
    "default_report_path",
    "import_sqlite",
    "legacy_uuid",
    "map_agent_status",
    "map_swarm_status",
]

#: The namespace of every legacy UUIDv5. NEVER change it: a second import would duplicate everything.
LEGACY_NAMESPACE: Final = uuid.UUID("b2970b88-b228-4032-b6d6-06af2462ec82")

# Legacy status spellings, grouped by where they go (compared lower-cased and trimmed).
_SWARM_ALIASES: Final[Mapping[str, tuple[str, ...]]] = {
    "creating": ("starting", "initializing", "pending", "created", "new"),
    "active": ("running",),
    "scaling": ("scaling_up", "scaling_down"),
    "paused": ("idle", "stopped", "suspended"),
    "completed": ("complete", "done", "finished", "success", "succeeded"),
    "failed": ("error", "errored", "crashed", "aborted"),
    "destroyed": ("killed", "terminated", "cancelled", "canceled", "deleted"),
}
_AGENT_ALIASES: Final[Mapping[tuple[str, str], tuple[str, ...]]] = {
    ("pending", "initializing"): ("pending", "idle", "created", "new", "queued", "initializing", "starting"),
    ("pending", "spawning"): ("spawning", "spawned"),
    ("running", "running"): ("running", "active", "working", "busy"),
    ("running", "resuming"): ("resuming",),
    ("running", "completing"): ("completing",),
    ("paused", "paused"): ("paused",),
    ("paused", "pausing"): ("pausing",),
    ("blocked", "paused"): ("blocked", "waiting"),
    ("completed", "destroyed"): ("completed", "complete", "done", "finished", "success", "succeeded"),
    ("failed", "failed"): ("failed", "error", "errored", "crashed", "timeout", "timed_out"),
    ("killed", "destroyed"): ("killed", "terminated", "stopped", "cancelled", "canceled", "aborted"),
    ("killed", "cleaning_up"): ("killing",),
}

#: Legacy swarm status (lower-cased, trimmed) → new status.
SWARM_STATUS_MAP: Final[Mapping[str, str]] = {
    **{s.value: s.value for s in SwarmStatus},
    **{old: new for new, olds in _SWARM_ALIASES.items() for old in olds},
}
#: Where a swarm status in neither set goes: not running, not final; a person decides.
SWARM_STATUS_DEFAULT: Final = "paused"

#: Legacy agent status (lower-cased, trimmed) → (new status, lifecycle_state).
AGENT_STATUS_MAP: Final[Mapping[str, tuple[str, str]]] = {
    old: new for new, olds in _AGENT_ALIASES.items() for old in olds
}
#: Where an agent status in neither set goes: not runnable, not final; a person decides.
AGENT_STATUS_DEFAULT: Final = ("blocked", "paused")

TABLES: Final = ("swarms", "budgets", "agents", "events")
_EVENT_WRITERS: Final = 2  # concurrent event writers (connections); PostgreSQL is the bottleneck
_CONVERT_SLICE: Final = 500
_LOOKUP_CHUNK: Final = (
    10_000  # ids per reference look-up in PostgreSQL  # events converted between two yields to the event loop
)
MAX_KEPT: Final = 1000  # rejects/repairs kept in memory (all of them go to the report file)
NULL_LABEL: Final = "(null)"
EVENT_TYPE_DEFAULT: Final = "legacy.unknown"
_MONEY_QUANTUM: Final = Decimal(1).scaleb(-10)
_MONEY_MAX: Final = Decimal("1e14")
_INT_MAX: Final = 2**31 - 1
_BIGINT_MAX: Final = 2**63 - 1
_ENTITY_TYPES: Final = frozenset(e.value for e in EntityType)
_SEVERITIES: Final[Mapping[str, str]] = {
    **{s.value: s.value for s in Severity},
    "warn": "warning",
    "fatal": "critical",
    "err": "error",
    "trace": "debug",
}
assert {s.value for s in AgentStatus} <= set(AGENT_STATUS_MAP)
assert all(
    s in {a.value for a in AgentStatus} and ls in {lc.value for lc in LifecycleState}
    for s, ls in AGENT_STATUS_MAP.values()
)
assert set(SWARM_STATUS_MAP.values()) <= {s.value for s in SwarmStatus}

# -- PostgreSQL statements (every value a parameter) ------------------------------------------------

# Are the target tables there (the schema is migrated)?
CHECK_SCHEMA_SQL: Final = """
SELECT to_regclass('public.swarms') IS NOT NULL AND to_regclass('public.agents') IS NOT NULL
   AND to_regclass('public.events') IS NOT NULL AND to_regclass('public.budgets') IS NOT NULL
"""
# Which of these swarm ids exist (reference checks for swarms not in the legacy file).
FIND_SWARMS_SQL: Final = "SELECT id FROM swarms WHERE id = ANY($1::uuid[])"
# Which of these agent ids exist, with their swarm (reference checks for agents not in the file).
FIND_AGENTS_SQL: Final = "SELECT id, swarm_id FROM agents WHERE id = ANY($1::uuid[])"
# Dry run: how many of these (distinct) swarm ids exist.
COUNT_SWARMS_SQL: Final = "SELECT count(*) FROM swarms WHERE id = ANY($1::uuid[])"
# Dry run: how many of these (distinct) agent ids exist.
COUNT_AGENTS_SQL: Final = "SELECT count(*) FROM agents WHERE id = ANY($1::uuid[])"
# Dry run: how many of these (distinct) event ids exist.
COUNT_EVENTS_SQL: Final = "SELECT count(*) FROM events WHERE id = ANY($1::uuid[])"
# Dry run: how many of these budgets would conflict (same id, or the swarm already has its budget).
COUNT_BUDGETS_SQL: Final = """
SELECT count(*) FROM unnest($1::uuid[], $2::uuid[]) AS t(id, swarm_id)
WHERE EXISTS (SELECT 1 FROM budgets b WHERE b.id = t.id)
   OR EXISTS (SELECT 1 FROM budgets b WHERE b.scope_type = 'swarm' AND b.scope_id = t.swarm_id)
"""
# Insert a batch of swarms; existing ids are left alone.
INSERT_SWARMS_SQL: Final = """
INSERT INTO swarms (id, name, config, status, created_at, completed_at)
SELECT t.id, t.name, t.config::jsonb, t.status, COALESCE(t.created_at, now()), t.completed_at
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::timestamptz[])
    AS t(id, name, config, status, created_at, completed_at)
ON CONFLICT (id) DO NOTHING
"""
# Insert a batch of swarm-scope budgets; a budget whose id or scope already exists is left alone.
INSERT_BUDGETS_SQL: Final = """
INSERT INTO budgets (id, swarm_id, scope_type, scope_id, allocated, consumed)
SELECT t.id, t.swarm_id, 'swarm', t.swarm_id, t.allocated, t.consumed
FROM unnest($1::uuid[], $2::uuid[], $3::numeric[], $4::numeric[]) AS t(id, swarm_id, allocated, consumed)
ON CONFLICT DO NOTHING
"""
# Insert a batch of agents; existing ids are left alone.
INSERT_AGENTS_SQL: Final = """
INSERT INTO agents (id, swarm_id, label, status, lifecycle_state, model, task, config, context, code,
                    reasoning, safety_boundaries, spawned_at, completed_at, pause_time, paused_by,
                    runtime, retry_count, max_retries, last_error, budget_limit, metadata)
SELECT t.id, t.swarm_id, t.label, t.status, t.lifecycle_state, t.model, t.task, '{}'::jsonb,
       t.context::jsonb, t.code::jsonb, t.reasoning::jsonb, t.safety_boundaries::jsonb,
       COALESCE(t.spawned_at, now()), t.completed_at, t.pause_time, t.paused_by, t.runtime,
       t.retry_count, t.max_retries, t.last_error, t.budget_limit, t.metadata::jsonb
FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
            $8::text[], $9::text[], $10::text[], $11::text[], $12::timestamptz[],
            $13::timestamptz[], $14::timestamptz[], $15::text[], $16::bigint[], $17::int[],
            $18::int[], $19::text[], $20::numeric[], $21::text[])
    AS t(id, swarm_id, label, status, lifecycle_state, model, task, context, code, reasoning,
         safety_boundaries, spawned_at, completed_at, pause_time, paused_by, runtime, retry_count,
         max_retries, last_error, budget_limit, metadata)
ON CONFLICT (id) DO NOTHING
"""
# The per-session staging table for events; ON COMMIT DELETE ROWS empties it after every batch.
CREATE_EVENTS_STAGE_SQL: Final = """
CREATE TEMP TABLE IF NOT EXISTS dash_import_events (
    id uuid, swarm_id uuid, agent_id uuid, type text, payload text, "timestamp" timestamptz,
    entity_type text, severity text
) ON COMMIT DELETE ROWS
"""
# Move one staged batch into events; existing ids are left alone.
INSERT_EVENTS_FROM_STAGE_SQL: Final = """
INSERT INTO events (id, swarm_id, agent_id, type, payload, "timestamp", entity_type, severity)
SELECT id, swarm_id, agent_id, type, payload::jsonb, COALESCE("timestamp", now()), entity_type, severity
FROM pg_temp.dash_import_events
ON CONFLICT (id) DO NOTHING
"""
# Drop the staging table when the import is done (pooled connections must not keep it).
DROP_EVENTS_STAGE_SQL: Final = "DROP TABLE IF EXISTS pg_temp.dash_import_events"
EVENTS_STAGE_TABLE: Final = "dash_import_events"
EVENTS_STAGE_SCHEMA: Final = "pg_temp"
EVENTS_STAGE_COLUMNS: Final = tuple(
    "id swarm_id agent_id type payload timestamp entity_type severity".split()
)

# -- the legacy file: the columns read, in order (absent columns are read as NULL) ------------------

LEGACY_COLUMNS: Final[Mapping[str, tuple[str, ...]]] = {
    "swarms": tuple(
        "id name status config agents created_at completed_at budget_allocated budget_consumed "
        "metrics".split()
    ),
    "agents": tuple(
        "id label status model task spawned_at completed_at runtime pause_time paused_by swarm_id parent_id "
        "child_ids context code reasoning retry_count max_retries last_error budget_limit safety_boundaries "
        "metadata".split()
    ),
    "events": ("id", "timestamp", "event_type", "source", "payload", "agent_id", "swarm_id"),
}
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

ProgressCallback: TypeAlias = Callable[[str, int, int], None]
"""``progress(table, rows_done, rows_total)``, called after every batch."""

_Ref: TypeAlias = "uuid.UUID | None"


# -- the report -------------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class TableCounts:
    """What happened to the rows of one table."""

    read: int = 0
    written: int = 0
    already_present: int = 0
    repaired: int = 0
    rejected: int = 0

    @property
    def skipped(self) -> int:
        """Rows not written: already present or rejected."""
        return self.already_present + self.rejected

    def as_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "skipped": self.skipped}


@dataclasses.dataclass(frozen=True, slots=True)
class Reject:
    """A legacy row that was not imported, and why."""

    table: str
    legacy_id: str | None
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class Repair:
    """A value that was changed so the row could be imported."""

    table: str
    legacy_id: str | None
    field: str
    action: str


@dataclasses.dataclass(slots=True)
class ImportReport:
    """The outcome of one import (or dry run). ``rejects``/``repairs`` hold the first
    :data:`MAX_KEPT` of each; the report file has all of them."""

    source: str
    dry_run: bool
    report_path: str | None
    tables: dict[str, TableCounts] = dataclasses.field(
        default_factory=lambda: {t: TableCounts() for t in TABLES}
    )
    status_mappings: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    rejects: list[Reject] = dataclasses.field(default_factory=list)
    repairs: list[Repair] = dataclasses.field(default_factory=list)
    elapsed_seconds: float = 0.0

    @property
    def events_per_second(self) -> float:
        """Legacy events processed per second over the whole run."""
        read = self.tables["events"].read
        return read / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON output."""
        return {
            "source": self.source,
            "dry_run": self.dry_run,
            "report_path": self.report_path,
            "tables": {name: counts.as_dict() for name, counts in self.tables.items()},
            "status_mappings": self.status_mappings,
            "rejects": [dataclasses.asdict(r) for r in self.rejects],
            "rejects_total": sum(c.rejected for c in self.tables.values()),
            "repairs": [dataclasses.asdict(r) for r in self.repairs],
            "elapsed_seconds": round(self.elapsed_seconds, 3),
            "events_per_second": round(self.events_per_second, 1),
        }


# -- pure helpers -----------------------------------------------------------------------------------

_NS_SHA1: Final = hashlib.sha1(LEGACY_NAMESPACE.bytes, usedforsecurity=False)


def legacy_uuid(table: str, legacy_id: str) -> uuid.UUID:
    """The PostgreSQL id of a legacy row: the id itself if it parses as a UUID, else
    ``uuid5(LEGACY_NAMESPACE, f"{table}:{legacy_id}")``. ``table``: swarms, agents or events."""
    if 32 <= len(legacy_id) <= 45:
        try:
            return _FastUUID(uuid.UUID(legacy_id).bytes)
        except ValueError:
            pass
    return _uuid5(f"{table}:{legacy_id}")


def _uuid5(name: str) -> uuid.UUID:
    # Equal to uuid.uuid5(LEGACY_NAMESPACE, name); the namespace is hashed once, and the value is
    # asyncpg's own uuid.UUID subclass (built in C, and encoded by asyncpg without a detour).
    h = _NS_SHA1.copy()
    h.update(name.encode("utf-8", "surrogatepass"))
    raw = bytearray(h.digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x50  # version 5
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    return _FastUUID(bytes(raw))


def budget_uuid(swarm_legacy_id: str) -> uuid.UUID:
    """The id of the budget made from a legacy swarm's budget columns."""
    return _uuid5(f"budget:{swarm_legacy_id}")


def map_swarm_status(value: Any) -> str:
    """The new swarm status for a legacy one (see SWARM_STATUS_MAP)."""
    if isinstance(value, str):
        return SWARM_STATUS_MAP.get(value.strip().lower(), SWARM_STATUS_DEFAULT)
    return SWARM_STATUS_DEFAULT


def map_agent_status(value: Any) -> tuple[str, str]:
    """The new (status, lifecycle_state) for a legacy agent status (see AGENT_STATUS_MAP)."""
    if isinstance(value, str):
        return AGENT_STATUS_MAP.get(value.strip().lower(), AGENT_STATUS_DEFAULT)
    return AGENT_STATUS_DEFAULT


def default_report_path(source: Path, *, dry_run: bool = False) -> Path:
    """Where the report goes unless told: next to the input (``dash.db.import-report.jsonl``)."""
    suffix = ".dry-run-report.jsonl" if dry_run else ".import-report.jsonl"
    return source.with_name(source.name + suffix)


def _status_label(value: Any) -> str:
    return NULL_LABEL if value is None else str(value)


def _parse_time(value: Any) -> dt.datetime | None:
    """An aware datetime from ISO-8601 text or epoch seconds/milliseconds; None if unreadable."""
    try:
        if isinstance(value, str):
            try:
                parsed = dt.datetime.fromisoformat(value)
            except ValueError:
                text = value.strip()
                if not text or not text.replace(".", "", 1).isdigit():
                    return None
                return _from_epoch(float(text))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            return _from_epoch(float(value))
        else:
            return None
    except (ValueError, OverflowError, OSError):
        return None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=dt.UTC)
    return parsed


def _from_epoch(seconds: float) -> dt.datetime | None:
    if not math.isfinite(seconds):
        return None
    if seconds > 1e11:  # milliseconds (JavaScript's Date.now())
        seconds /= 1000.0
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


def _loads(value: Any) -> tuple[Any, bool]:
    """(decoded JSON, True) or (the raw value, False) when it is not JSON text."""
    if isinstance(value, str | bytes):
        try:
            return orjson.loads(value), True
        except orjson.JSONDecodeError:
            return value, False
    return value, False


def _raw(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _strip_nul(value: Any) -> Any:
    """``value`` (decoded JSON) with NUL characters removed from every string (jsonb rejects them)."""
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, list):
        return [_strip_nul(v) for v in value]
    if isinstance(value, dict):
        return {_strip_nul(k): _strip_nul(v) for k, v in value.items()}
    return value


def _dumps(value: Any) -> tuple[str, bool]:
    """JSON text PostgreSQL's jsonb accepts, and whether NULs had to be removed."""
    text = orjson.dumps(value).decode()
    if "\\u0000" in text:
        return orjson.dumps(_strip_nul(value)).decode(), True
    return text, False


class _Money:
    """Legacy REAL money → Decimal with at most 10 decimal places (or why it cannot be)."""

    @staticmethod
    def convert(value: Any) -> tuple[Decimal | None, str | None, str | None]:
        """(amount, repair note, reject reason); amount None for NULL."""
        if value is None:
            return None, None, None
        if isinstance(value, bool):
            return None, None, f"is not a number ({value!r})"
        try:
            if isinstance(value, float):
                if not math.isfinite(value):
                    return None, None, f"is not a finite number ({value!r})"
                amount = Decimal(str(value))
            elif isinstance(value, int):
                amount = Decimal(value)
            else:
                amount = Decimal(_raw(value).strip())
        except (InvalidOperation, ValueError):
            return None, None, f"is not a number ({_raw(value)[:40]!r})"
        if not amount.is_finite():
            return None, None, f"is not a finite number ({_raw(value)[:40]!r})"
        note = None
        if amount.as_tuple().exponent < -10:  # type: ignore[operator]
            rounded = amount.quantize(_MONEY_QUANTUM, rounding=ROUND_HALF_EVEN)
            note = f"{amount} rounded to 10 decimal places ({rounded})"
            amount = rounded
        if amount < 0:
            note = f"negative amount {amount} set to 0"
            amount = Decimal(0)
        if amount >= _MONEY_MAX:
            return None, None, f"{amount} is too large (at most 10^14)"
        return amount, note, None


def _to_int(value: Any, default: int, maximum: int) -> tuple[int, str | None]:
    """(integer, repair note) for a legacy INTEGER column."""
    if value is None:
        return default, None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            return default, f"{_raw(value)[:40]!r} is not a number; set to {default}"
        if not math.isfinite(as_float):
            return default, f"{value!r} is not finite; set to {default}"
        number = round(as_float)
        if number != as_float:
            return max(0, min(number, maximum)), f"{value!r} rounded to {max(0, min(number, maximum))}"
    if number < 0:
        return 0, f"negative value {number} set to 0"
    if number > maximum:
        return maximum, f"{number} above {maximum}; capped"
    return number, None


# -- per-batch bookkeeping --------------------------------------------------------------------------


class _Batch:
    """One converted batch; its counts are added to the report only after it was written."""

    __slots__ = (
        "budget_read",
        "budget_rejects",
        "budget_repaired",
        "budgets",
        "ids",
        "last_rowid",
        "mappings",
        "new_refs",
        "read",
        "records",
        "rejects",
        "repaired",
        "repairs",
        "table",
    )

    def __init__(self, table: str) -> None:
        self.table = table
        self.read = 0
        self.last_rowid = 0
        self.records: list[tuple[Any, ...]] = []
        self.ids: list[uuid.UUID] = []
        self.repaired = 0
        self.rejects: list[Reject] = []
        self.repairs: list[Repair] = []
        self.mappings: Counter[tuple[str, str]] = Counter()
        # Accepted legacy ids of this batch → their reference value (added to the lookups after commit).
        self.new_refs: dict[str, Any] = {}
        # Swarm batches also carry their budgets.
        self.budgets: list[tuple[uuid.UUID, uuid.UUID, Decimal, Decimal]] = []
        self.budget_read = 0
        self.budget_repaired = 0
        self.budget_rejects: list[Reject] = []


class _RowRepairs:
    """Collects the repairs of one row."""

    __slots__ = ("batch", "count", "legacy_id", "table")

    def __init__(self, batch: _Batch, table: str, legacy_id: str | None) -> None:
        self.batch = batch
        self.table = table
        self.legacy_id = legacy_id
        self.count = 0

    def add(self, field: str, action: str) -> None:
        self.count += 1
        self.batch.repairs.append(Repair(self.table, self.legacy_id, field, action))


# -- the legacy reader ------------------------------------------------------------------------------


class _LegacyReader:
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
                if "unable to open" not in str(exc):
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
            for table, columns in LEGACY_COLUMNS.items():
                rows = await con.execute_fetchall(LEGACY_TABLE_INFO_SQL, (table,))
                present = {r[0] for r in rows}
                if not present:
                    raise ValidationError(
                        "path", f"{str(self.path)!r} is not a legacy Dash database (no table {table!r})"
                    )
                if "id" not in present:
                    raise ValidationError("path", f"legacy table {table!r} has no id column")
                self._present[table] = present
                # Identifiers from LEGACY_COLUMNS only; columns an older file lacks read as NULL.
                select = ", ".join(c if c in present else f"NULL AS {c}" for c in columns)
                self._select[table] = (
                    f"SELECT rowid, {select} FROM {table} WHERE rowid > ? ORDER BY rowid LIMIT ?"  # noqa: S608
                )
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
            if "decode" not in str(exc).lower():
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


# -- the importer -----------------------------------------------------------------------------------


def _lossy_text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _rowcount(status: str) -> int:
    # "INSERT 0 <n>"
    return int(status.rsplit(" ", 1)[-1])


class _Importer:
    def __init__(
        self,
        db: Database,
        source: Path,
        *,
        dry_run: bool,
        batch_size: int,
        progress: ProgressCallback | None,
        report_path: Path,
    ) -> None:
        self.db = db
        self.source = source
        self.dry_run = dry_run
        self.batch_size = batch_size
        self.progress = progress
        self.report = ImportReport(source=str(source), dry_run=dry_run, report_path=str(report_path))
        self.report_path = report_path
        self.reader = _LegacyReader(source)
        self._out: IO[bytes] | None = None
        self.totals: dict[str, int] = {}
        # legacy swarm id → swarm uuid (or None: known to be missing)
        self.swarms: dict[str, _Ref] = {}
        # legacy agent id → (agent uuid, swarm uuid), or None: known to be missing
        self.agents: dict[str, tuple[uuid.UUID, uuid.UUID] | None] = {}
        self._mappings: Counter[tuple[str, str]] = Counter()

    # -- driver ----------------------------------------------------------------------------------

    async def run(self) -> ImportReport:
        started = time.perf_counter()
        await self.reader.open()
        try:
            if not await self.db.fetchval(CHECK_SCHEMA_SQL, retry=True):
                raise ValidationError(
                    "database",
                    "the dash-storage tables are missing: run `dash-db migrate` first",
                )
            for table in LEGACY_COLUMNS:
                self.totals[table] = await self.reader.count(table)
            self.report_path.parent.mkdir(parents=True, exist_ok=True)
            with self.report_path.open("wb") as out:
                self._out = out
                self._line({"kind": "start", "source": str(self.source), "dry_run": self.dry_run})
                await self._phase("swarms", self._convert_swarms, self._write_swarms)
                await self._phase("agents", self._convert_agents, self._write_agents)
                await self._events_phase()
                self.report.elapsed_seconds = time.perf_counter() - started
                self._finish()
        finally:
            self._out = None
            await self.reader.close()
        return self.report

    def _line(self, data: Mapping[str, Any]) -> None:
        assert self._out is not None
        self._out.write(orjson.dumps(data) + b"\n")

    def _finish(self) -> None:
        mappings: dict[str, dict[str, int]] = {}
        for (table, key), count in sorted(self._mappings.items()):
            mappings.setdefault(table, {})[key] = count
        self.report.status_mappings = mappings
        for table, entries in mappings.items():
            for key, count in entries.items():
                self._line({"kind": "mapping", "table": table, "mapping": key, "count": count})
        summary = self.report.to_dict()
        summary.pop("rejects")
        summary.pop("repairs")
        self._line({"kind": "summary", **summary})

    def _commit(self, batch: _Batch, written: int, budgets_written: int = 0) -> None:
        """Add a batch that was written (or, in a dry run, checked) to the report."""
        counts = self.report.tables[batch.table]
        counts.read += batch.read
        accepted = batch.read - len(batch.rejects)
        counts.written += written
        counts.already_present += accepted - written
        counts.repaired += batch.repaired
        counts.rejected += len(batch.rejects)
        if batch.table == "swarms":
            b = self.report.tables["budgets"]
            b.read += batch.budget_read
            b.written += budgets_written
            b.already_present += len(batch.budgets) - budgets_written
            b.repaired += batch.budget_repaired
            b.rejected += len(batch.budget_rejects)
        for reject in (*batch.rejects, *batch.budget_rejects):
            self._line({"kind": "reject", **dataclasses.asdict(reject)})
            if len(self.report.rejects) < MAX_KEPT:
                self.report.rejects.append(reject)
        for repair in batch.repairs:
            self._line({"kind": "repair", **dataclasses.asdict(repair)})
            if len(self.report.repairs) < MAX_KEPT:
                self.report.repairs.append(repair)
        self._mappings.update(batch.mappings)
        if batch.table == "swarms":
            self.swarms.update(batch.new_refs)
        elif batch.table == "agents":
            self.agents.update(batch.new_refs)
        if self.progress is not None:
            self.progress(batch.table, counts.read, max(self.totals.get(batch.table, 0), counts.read))

    async def _phase(
        self,
        table: str,
        convert: Callable[[list[tuple[Any, ...]]], _Batch],
        write: Callable[[Connection, _Batch], Any],
    ) -> None:
        """Swarms or agents: read a batch, resolve references, convert, write it in one transaction."""
        after = 0
        while True:
            rows = await self.reader.fetch(table, after, self.batch_size)
            if not rows:
                return
            if table == "agents":
                await self._resolve(swarm_keys={r[11] for r in rows})
            batch = convert(rows)
            batch.last_rowid = rows[-1][0]

            async def once(con: Connection, _attempt: int, batch: _Batch = batch) -> tuple[int, int]:
                result: tuple[int, int] = await write(con, batch)
                return result

            written, budgets_written = await self.db.run(once, retry=True, transaction=not self.dry_run)
            self._commit(batch, written, budgets_written)
            after = batch.last_rowid

    # -- references ------------------------------------------------------------------------------

    async def _resolve(self, *, swarm_keys: Iterable[Any] = (), agent_keys: Iterable[Any] = ()) -> None:
        """Look up, in PostgreSQL, referenced swarms/agents that are not in the legacy file."""
        swarms = self.swarms
        unknown = [k for k in set(swarm_keys) if isinstance(k, str) and k and k not in swarms]
        for i in range(0, len(unknown), _LOOKUP_CHUNK):
            by_uuid = {legacy_uuid("swarms", k): k for k in unknown[i : i + _LOOKUP_CHUNK]}
            found = {r[0] for r in await self.db.fetch(FIND_SWARMS_SQL, list(by_uuid), retry=True)}
            for u, k in by_uuid.items():
                swarms[k] = u if u in found else None
        agents = self.agents
        unknown = [k for k in set(agent_keys) if isinstance(k, str) and k and k not in agents]
        for i in range(0, len(unknown), _LOOKUP_CHUNK):
            by_uuid = {legacy_uuid("agents", k): k for k in unknown[i : i + _LOOKUP_CHUNK]}
            rows = await self.db.fetch(FIND_AGENTS_SQL, list(by_uuid), retry=True)
            found_agents = {r[0]: r[1] for r in rows}
            for u, k in by_uuid.items():
                swarm = found_agents.get(u)
                agents[k] = (u, swarm) if swarm is not None else None

    # -- swarms ----------------------------------------------------------------------------------

    def _convert_swarms(self, rows: list[tuple[Any, ...]]) -> _Batch:
        batch = _Batch("swarms")
        lossy = self.reader.lossy["swarms"]
        for (
            rowid,
            lid,
            name,
            status,
            config,
            agents,
            created_at,
            completed_at,
            allocated,
            consumed,
            metrics,
        ) in rows:
            batch.read += 1
            if not isinstance(lid, str) or not lid:
                batch.rejects.append(Reject("swarms", _id_label(lid), _id_problem(lid)))
                continue
            fix = _RowRepairs(batch, "swarms", lid)
            if lossy and rowid in lossy:
                fix.add("*", "text that was not valid UTF-8: bad bytes replaced with U+FFFD")
            sid = legacy_uuid("swarms", lid)
            name_text = _text(name, "name", fix)
            if not name_text:
                name_text = lid
                fix.add("name", "missing name; the legacy id is used")
            new_status = map_swarm_status(status)
            batch.mappings[("swarms", f"{_status_label(status)}→{new_status}")] += 1
            cfg = _json_object(config, "config", fix, null={})
            cfg["legacy_id"] = lid
            if agents is not None:
                cfg["legacy_agents"] = _json_value(agents, "agents", fix)
            if metrics is not None:
                cfg["legacy_metrics"] = _json_value(metrics, "metrics", fix)
            cfg_text, nul = _dumps(cfg)
            if nul:
                fix.add("config", "NUL characters removed")
            created = _parse_time(created_at)
            if created is None:
                fix.add("created_at", f"unreadable timestamp {_show(created_at)}; set to now()")
            completed = None
            if completed_at is not None and completed_at != "":
                completed = _parse_time(completed_at)
                if completed is None:
                    fix.add("completed_at", f"unreadable timestamp {_show(completed_at)}; set to NULL")
            batch.records.append((sid, name_text, cfg_text, new_status, created, completed))
            batch.ids.append(sid)
            batch.new_refs[lid] = sid
            if fix.count:
                batch.repaired += 1
            self._convert_budget(batch, lid, sid, allocated, consumed)
        return batch

    def _convert_budget(self, batch: _Batch, lid: str, sid: uuid.UUID, allocated: Any, consumed: Any) -> None:
        if allocated is None and consumed is None:
            return  # the legacy swarm had no budget
        batch.budget_read += 1
        fix = _RowRepairs(batch, "budgets", lid)
        alloc, alloc_note, alloc_err = _Money.convert(allocated)
        cons, cons_note, cons_err = _Money.convert(consumed)
        if alloc_err or cons_err:
            reason = f"budget_allocated {alloc_err}" if alloc_err else f"budget_consumed {cons_err}"
            batch.budget_rejects.append(Reject("budgets", lid, reason))
            return
        if alloc_note:
            fix.add("allocated", alloc_note)
        if cons_note:
            fix.add("consumed", cons_note)
        if alloc is None:
            alloc = Decimal(0)
        if cons is None:
            cons = Decimal(0)
        if cons > alloc:
            fix.add("allocated", f"consumed {cons} exceeded allocated {alloc}; allocated raised to {cons}")
            alloc = cons
        batch.budgets.append((budget_uuid(lid), sid, alloc, cons))
        if fix.count:
            batch.budget_repaired += 1

    async def _write_swarms(self, con: Connection, batch: _Batch) -> tuple[int, int]:
        budgets = batch.budgets
        if self.dry_run:
            distinct = list(dict.fromkeys(batch.ids))
            present = await con.fetchval(COUNT_SWARMS_SQL, distinct) if distinct else 0
            budget_present = (
                await con.fetchval(COUNT_BUDGETS_SQL, [b[0] for b in budgets], [b[1] for b in budgets])
                if budgets
                else 0
            )
            return len(distinct) - int(present), len(budgets) - int(budget_present)
        written = 0
        if batch.records:
            cols = list(zip(*batch.records, strict=True))
            written = _rowcount(await con.execute(INSERT_SWARMS_SQL, *cols))
        budgets_written = 0
        if budgets:
            cols = list(zip(*budgets, strict=True))
            budgets_written = _rowcount(await con.execute(INSERT_BUDGETS_SQL, *cols))
        return written, budgets_written

    # -- agents ----------------------------------------------------------------------------------

    def _convert_agents(self, rows: list[tuple[Any, ...]]) -> _Batch:
        batch = _Batch("agents")
        lossy = self.reader.lossy["agents"]
        swarms = self.swarms
        for row in rows:
            (
                rowid,
                lid,
                label,
                status,
                model,
                task,
                spawned_at,
                completed_at,
                runtime,
                pause_time,
                paused_by,
                swarm_key,
                parent_id,
                child_ids,
                context,
                code,
                reasoning,
                retry_count,
                max_retries,
                last_error,
                budget_limit,
                safety_boundaries,
                metadata,
            ) = row
            batch.read += 1
            if not isinstance(lid, str) or not lid:
                batch.rejects.append(Reject("agents", _id_label(lid), _id_problem(lid)))
                continue
            if not isinstance(swarm_key, str) or not swarm_key:
                batch.rejects.append(
                    Reject("agents", lid, "agent has no swarm_id (agents.swarm_id is NOT NULL)")
                )
                continue
            swarm_uuid = swarms.get(swarm_key)
            if swarm_uuid is None:
                batch.rejects.append(Reject("agents", lid, f"swarm {swarm_key!r} not found"))
                continue
            fix = _RowRepairs(batch, "agents", lid)
            if lossy and rowid in lossy:
                fix.add("*", "text that was not valid UTF-8: bad bytes replaced with U+FFFD")
            aid = legacy_uuid("agents", lid)
            new_status, lifecycle = map_agent_status(status)
            batch.mappings[("agents", f"{_status_label(status)}→{new_status}")] += 1
            batch.mappings[("agents.lifecycle_state", f"{_status_label(status)}→{lifecycle}")] += 1
            meta = _json_object(metadata, "metadata", fix, null={})
            meta["legacy_id"] = lid
            if parent_id is not None and parent_id != "":
                meta["legacy_parent_id"] = _raw(parent_id)
            if child_ids is not None:
                children = _json_value(child_ids, "child_ids", fix)
                if children != []:
                    meta["legacy_child_ids"] = children
            meta_text, nul = _dumps(meta)
            if nul:
                fix.add("metadata", "NUL characters removed")
            spawned = _parse_time(spawned_at)
            if spawned is None:
                fix.add("spawned_at", f"unreadable timestamp {_show(spawned_at)}; set to now()")
            runtime_value, note = _to_int(runtime, 0, _BIGINT_MAX)
            if note:
                fix.add("runtime", note)
            retries, note = _to_int(retry_count, 0, _INT_MAX)
            if note:
                fix.add("retry_count", note)
            max_retry, note = _to_int(max_retries, 3, _INT_MAX)
            if note:
                fix.add("max_retries", note)
            limit, limit_note, limit_err = _Money.convert(budget_limit)
            if limit_err:
                fix.add("budget_limit", f"{limit_err}; set to NULL")
                limit = None
            elif limit_note:
                fix.add("budget_limit", limit_note)
            batch.records.append(
                (
                    aid,
                    swarm_uuid,
                    _text(label, "label", fix),
                    new_status,
                    lifecycle,
                    _text(model, "model", fix),
                    _text(task, "task", fix),
                    _json_column(context, "context", fix),
                    _json_column(code, "code", fix),
                    _json_column(reasoning, "reasoning", fix),
                    _json_column(safety_boundaries, "safety_boundaries", fix),
                    spawned,
                    _optional_time(completed_at, "completed_at", fix),
                    _optional_time(pause_time, "pause_time", fix),
                    _text(paused_by, "paused_by", fix),
                    runtime_value,
                    retries,
                    max_retry,
                    _text(last_error, "last_error", fix),
                    limit,
                    meta_text,
                )
            )
            batch.ids.append(aid)
            batch.new_refs[lid] = (aid, swarm_uuid)
            if fix.count:
                batch.repaired += 1
        return batch

    async def _write_agents(self, con: Connection, batch: _Batch) -> tuple[int, int]:
        if not batch.records:
            return 0, 0
        if self.dry_run:
            distinct = list(dict.fromkeys(batch.ids))
            present = await con.fetchval(COUNT_AGENTS_SQL, distinct)
            return len(distinct) - int(present), 0
        cols = list(zip(*batch.records, strict=True))
        return _rowcount(await con.execute(INSERT_AGENTS_SQL, *cols)), 0

    # -- events ----------------------------------------------------------------------------------

    async def _events_phase(self) -> None:
        """Events: COPY each batch into a staging table, then INSERT ... SELECT into ``events``.

        One producer reads batches from SQLite (aiosqlite's thread) and converts them, in slices
        that yield to the event loop; up to :data:`_EVENT_WRITERS` writers, each on its own
        connection with its own session TEMP table, write them (one transaction per batch), so
        PostgreSQL inserts while Python converts. A writer hit by a transient failure reconnects
        and re-writes the batch it held (idempotent), then carries on.
        """
        # References to swarms/agents that are not in the file are looked up once, up front, so
        # the writers never wait for a look-up (and a pool of one connection still works).
        swarm_keys, agent_keys = await self.reader.distinct_event_refs()
        await self._resolve(swarm_keys=swarm_keys, agent_keys=agent_keys)
        writers = max(1, min(_EVENT_WRITERS, self.db.settings.postgres_max_pool_size))
        queue: asyncio.Queue[_Batch | None] = asyncio.Queue(maxsize=writers)
        tasks = [asyncio.ensure_future(self._produce_events(queue, writers))]
        tasks += [asyncio.ensure_future(self._event_writer(queue)) for _ in range(writers)]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                error = task.exception()
                if error is not None:
                    raise error
        finally:
            for task in tasks:
                task.cancel()
            # Bounded: a writer cancelled in the middle of a query on a dead connection can make
            # asyncpg wait a long time for the cancellation; the error at hand matters more.
            await asyncio.wait(tasks, timeout=self.db.settings.connection_timeout_s + 5.0)

    async def _event_writer(self, queue: asyncio.Queue[_Batch | None]) -> None:
        """Write batches from ``queue`` until it yields None."""
        held: list[_Batch] = []  # the batch being written (kept across a reconnect)

        async def loop(con: Connection, _attempt: int) -> None:
            if not self.dry_run:
                await con.execute(CREATE_EVENTS_STAGE_SQL)
            try:
                while True:
                    if not held:
                        item = await queue.get()
                        if item is None:
                            return
                        held.append(item)
                    written = await self._write_events(con, held[0])
                    self._commit(held.pop(), written)
            finally:
                if not self.dry_run:
                    with contextlib.suppress(Exception):
                        await con.execute(DROP_EVENTS_STAGE_SQL)

        await self.db.run(loop, retry=True)

    async def _produce_events(self, queue: asyncio.Queue[_Batch | None], writers: int) -> None:
        """Read and convert event batches into ``queue``; then one None per writer.

        No read-ahead: reading on aiosqlite's thread while this thread converts only makes the
        two fight over the GIL (measured slower).
        """
        after = 0
        while True:
            rows = await self.reader.fetch("events", after, self.batch_size)
            if not rows:
                for _ in range(writers):
                    await queue.put(None)
                return
            after = rows[-1][0]
            batch = _Batch("events")
            for start in range(0, len(rows), _CONVERT_SLICE):
                self._convert_events(rows[start : start + _CONVERT_SLICE], batch)
                await asyncio.sleep(0)  # let the writers' round trips through
            batch.last_rowid = after
            await queue.put(batch)

    async def _write_events(self, con: Connection, batch: _Batch) -> int:
        if not batch.records:
            return 0
        if self.dry_run:
            distinct = list(dict.fromkeys(batch.ids))
            present = await con.fetchval(COUNT_EVENTS_SQL, distinct)
            return len(distinct) - int(present)
        # Not `async with con.transaction()`: when the connection dies mid-COPY, its rollback fails
        # with "another operation is in progress" and that error would hide the original one
        # (a lost connection, which is retried).
        tx = con.transaction()
        await tx.start()
        try:
            await con.copy_records_to_table(
                EVENTS_STAGE_TABLE,
                records=batch.records,
                columns=EVENTS_STAGE_COLUMNS,
                schema_name=EVENTS_STAGE_SCHEMA,
            )
            status = await con.execute(INSERT_EVENTS_FROM_STAGE_SQL)
        except BaseException:
            with contextlib.suppress(Exception):
                await tx.rollback()
            raise
        await tx.commit()
        return _rowcount(status)

    def _convert_events(self, rows: list[tuple[Any, ...]], batch: _Batch) -> None:
        swarms = self.swarms
        agents = self.agents
        records = batch.records
        ids = batch.ids
        rejects = batch.rejects
        loads = orjson.loads
        dumps = orjson.dumps
        decode_error = orjson.JSONDecodeError
        parse_time = dt.datetime.fromisoformat
        utc = dt.UTC
        severities = _SEVERITIES
        entity_types = _ENTITY_TYPES
        repaired = 0
        lossy = self.reader.lossy["events"]
        for rowid, lid, ts, event_type, source, payload, agent_key, swarm_key in rows:
            if lid.__class__ is not str or not lid:
                rejects.append(Reject("events", _id_label(lid), _id_problem(lid)))
                continue
            fix: _RowRepairs | None = None
            if lossy and rowid in lossy:
                fix = _RowRepairs(batch, "events", lid)
                fix.add("*", "text that was not valid UTF-8: bad bytes replaced with U+FFFD")
            # swarm and agent
            swarm_uuid: uuid.UUID | None = None
            if swarm_key is not None and swarm_key != "":
                swarm_uuid = swarms.get(swarm_key)
                if swarm_uuid is None:
                    rejects.append(Reject("events", lid, f"swarm {swarm_key!r} not found"))
                    continue
            agent_uuid: uuid.UUID | None = None
            missing_agent: str | None = None
            if agent_key is not None and agent_key != "":
                agent = agents.get(agent_key)
                if agent is None:
                    missing_agent = _raw(agent_key)
                    fix = fix or _RowRepairs(batch, "events", lid)
                    fix.add("agent_id", f"agent {missing_agent!r} not found; agent_id set to NULL")
                else:
                    agent_uuid = agent[0]
                    if swarm_uuid is None:
                        swarm_uuid = agent[1]
                        fix = fix or _RowRepairs(batch, "events", lid)
                        fix.add("swarm_id", "missing swarm_id; taken from the event's agent")
            if swarm_uuid is None:
                rejects.append(
                    Reject("events", lid, "event has no swarm_id and no known agent to take it from")
                )
                continue
            # payload (always an object), source → entity_type
            if payload is None:
                body: dict[str, Any] = {}
            else:
                try:
                    value = loads(payload)
                except decode_error:
                    value = {"_legacy_raw": _raw(payload)}
                    fix = fix or _RowRepairs(batch, "events", lid)
                    fix.add("payload", "not JSON; kept as {'_legacy_raw': text}")
                if value.__class__ is dict:
                    body = value
                else:
                    body = {"_legacy_value": value}
                    fix = fix or _RowRepairs(batch, "events", lid)
                    fix.add("payload", "not a JSON object; kept as {'_legacy_value': value}")
            entity_type = "agent" if agent_key else "system"
            if source is not None:
                try:
                    src = loads(source)
                except decode_error:
                    src = {"_legacy_raw": _raw(source)}
                    fix = fix or _RowRepairs(batch, "events", lid)
                    fix.add("source", "not JSON; kept as {'_legacy_raw': text}")
                else:
                    if src.__class__ is dict:
                        kind = src.get("type")
                        if kind.__class__ is str:
                            kind = kind.lower()
                            if kind in entity_types:
                                entity_type = kind
                body["_legacy_source"] = src
            if missing_agent is not None:
                body["_legacy_agent_id"] = missing_agent
            severity = "info"
            level = body.get("severity") or body.get("level")
            if level.__class__ is str:
                severity = severities.get(level.lower(), "info")
            # Cannot fail: everything in body came from orjson.loads or is a str from SQLite.
            body_text = dumps(body).decode()
            if "\\u0000" in body_text:
                body_text = dumps(_strip_nul(body)).decode()
                fix = fix or _RowRepairs(batch, "events", lid)
                fix.add("payload", "NUL characters removed")
            # type
            if event_type.__class__ is not str or not event_type:
                fix = fix or _RowRepairs(batch, "events", lid)
                fix.add("event_type", f"missing event type; set to {EVENT_TYPE_DEFAULT!r}")
                event_type = EVENT_TYPE_DEFAULT
            elif "\x00" in event_type:
                event_type = event_type.replace("\x00", "")
                fix = fix or _RowRepairs(batch, "events", lid)
                fix.add("event_type", "NUL characters removed")
            # timestamp
            when: dt.datetime | None
            try:
                when = parse_time(ts)
                if when.tzinfo is None:
                    when = when.replace(tzinfo=utc)
            except (TypeError, ValueError):
                when = _parse_time(ts)
                if when is None:
                    fix = fix or _RowRepairs(batch, "events", lid)
                    fix.add("timestamp", f"unreadable timestamp {_show(ts)}; set to now()")
            event_uuid = legacy_uuid("events", lid)
            records.append(
                (event_uuid, swarm_uuid, agent_uuid, event_type, body_text, when, entity_type, severity)
            )
            ids.append(event_uuid)
            if fix is not None:
                repaired += 1
        batch.read += len(rows)
        batch.repaired += repaired


# -- column converters that record their repairs ----------------------------------------------------


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _id_label(value: Any) -> str | None:
    return None if value is None else _raw(value)


def _id_problem(value: Any) -> str:
    if value is None or value == "":
        return "missing id"
    return f"id is not text ({type(value).__name__})"


def _text(value: Any, field: str, fix: _RowRepairs) -> str | None:
    if value is None:
        return None
    text: str
    if isinstance(value, str):
        text = value
    else:
        fix.add(field, f"{type(value).__name__} value converted to text")
        text = _raw(value)
    if "\x00" in text:
        fix.add(field, "NUL characters removed")
        text = text.replace("\x00", "")
    return text


def _json_value(value: Any, field: str, fix: _RowRepairs) -> Any:
    decoded, ok = _loads(value)
    if not ok:
        fix.add(field, "not JSON; kept as {'_legacy_raw': text}")
        return {"_legacy_raw": _raw(value)}
    return decoded


def _json_object(value: Any, field: str, fix: _RowRepairs, *, null: dict[str, Any]) -> dict[str, Any]:
    if value is None:
        return dict(null)
    decoded = _json_value(value, field, fix)
    if isinstance(decoded, dict):
        return decoded
    fix.add(field, "not a JSON object; kept as {'_legacy_value': value}")
    return {"_legacy_value": decoded}


def _json_column(value: Any, field: str, fix: _RowRepairs) -> str | None:
    """A nullable JSONB column: NULL stays NULL, any JSON value is kept, bad JSON is wrapped."""
    if value is None:
        return None
    text, nul = _dumps(_json_value(value, field, fix))
    if nul:
        fix.add(field, "NUL characters removed")
    return text


def _optional_time(value: Any, field: str, fix: _RowRepairs) -> dt.datetime | None:
    if value is None or value == "":
        return None
    parsed = _parse_time(value)
    if parsed is None:
        fix.add(field, f"unreadable timestamp {_show(value)}; set to NULL")
    return parsed


# -- entry point ------------------------------------------------------------------------------------


async def import_sqlite(
    db: Database,
    path: str | Path,
    *,
    dry_run: bool = False,
    batch_size: int = 5000,
    progress: ProgressCallback | None = None,
    report_path: str | Path | None = None,
) -> ImportReport:
    """Import the legacy SQLite file at ``path`` into the database of ``db`` (see the module doc).

    Writes a JSON-lines report (every reject and repair, the status mappings and a summary) to
    ``report_path``, default :func:`default_report_path`. ``dry_run`` writes nothing to the database.
    """
    source = Path(path)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= 100_000:
        raise ValidationError("batch_size", f"must be an integer between 1 and 100000, got {batch_size!r}")
    if not await asyncio.to_thread(source.is_file):
        raise ValidationError("path", f"no such file: {str(source)!r}")
    target = Path(report_path) if report_path is not None else default_report_path(source, dry_run=dry_run)
    importer = _Importer(
        db, source, dry_run=dry_run, batch_size=batch_size, progress=progress, report_path=target
    )
    try:
        return await importer.run()
    except OSError as exc:
        raise DashStorageError(f"import of {str(source)!r} failed: {exc}") from exc

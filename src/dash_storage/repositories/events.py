"""EventRepository: the append-only event log.

Writes are idempotent by client-generated id (UUIDv7), so creates are retried safely after a lost
connection. ``create_many`` writes a batch all or nothing: a small batch as one INSERT over arrays
(``unnest``, one round trip), a batch of ``COPY_MIN_BATCH`` events or more as binary COPY in one
transaction (see ``insert_prepared``; ``EventWriter`` batches concurrent creates through it). Reads
page with an opaque keyset cursor over ``("timestamp", id)`` (``EventRepository.cursor(event)``),
so paging through a log that is being appended to never skips or repeats a row, also when many
events share one timestamp.

Time windows (``since``/``until``) are half-open: ``since <= timestamp < until``.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import datetime as dt
import functools
import re
import struct
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields
from decimal import Decimal
from typing import Any, Required, TypedDict

import asyncpg
import orjson

from dash_storage.core import validation as v
from dash_storage.core.connections import transaction_on
from dash_storage.core.database import Connection, Database
from dash_storage.core.errors import (
    ConflictError,
    DashStorageError,
    DatabaseError,
    NotFoundError,
    SerializationConflictError,
    ValidationError,
)
from dash_storage.core.ids import new_id
from dash_storage.core.models import (
    EVENT_COLUMNS,
    EntityType,
    Event,
    EventStats,
    EventTypeStats,
    Severity,
)
from dash_storage.repositories.base import Repository, missing_parent

__all__ = ["COPY_MIN_BATCH", "MAX_BATCH", "EventInput", "EventRepository", "insert_prepared", "prepare_event"]

ENTITY_TYPES = frozenset(e.value for e in EntityType)
SEVERITIES = frozenset(s.value for s in Severity)
# entity_type and severity as binary COPY fields (length, then UTF-8), encoded once.
_CHOICE_FIELDS = {c: struct.pack(">i", len(c.encode())) + c.encode() for c in ENTITY_TYPES | SEVERITIES}
#: Most events ``create_many`` accepts in one call (one statement; split bigger batches).
MAX_BATCH = 10_000
#: Batches of at least this many events are written with binary COPY, smaller ones with one INSERT
#: over arrays. COPY costs four round trips (BEGIN, now(), COPY, COMMIT) against the INSERT's one,
#: but less per row on both sides; they break even between 32 and 64 events (bench/ingest.py).
COPY_MIN_BATCH = 64
#: Largest ``hours`` window accepted by get_stats / delete_older_than (100 years).
MAX_HOURS = 24 * 366 * 100
#: Largest ``batch_size`` of delete_older_than.
MAX_DELETE_BATCH = 100_000
STATS_24H_COLUMNS = ", ".join(f.name for f in fields(EventTypeStats))
_EVENT_KEYS = frozenset(
    {
        "swarm_id",
        "type",
        "agent_id",
        "payload",
        "timestamp",
        "correlation_id",
        "parent_event_id",
        "entity_type",
        "severity",
        "id",
    }
)

# Idempotent create of one event; the timestamp defaults to the database clock.
INSERT_EVENT = f"""
INSERT INTO events (id, swarm_id, agent_id, type, payload, "timestamp", correlation_id,
                    parent_event_id, entity_type, severity)
VALUES ($1, $2, $3, $4, $5, COALESCE($6, now()), $7, $8, $9, $10)
ON CONFLICT (id) DO NOTHING
RETURNING {EVENT_COLUMNS}
"""  # noqa: S608
# Template of the batch insert (one statement over parallel arrays); {on_conflict} is "" on the
# first attempt (an existing id fails the whole batch: all or nothing) and DO NOTHING on a retry.
# Every array is text[] (cast per column in SQL): asyncpg knows text[] natively, while uuid[] or
# timestamptz[] parameters cost each new connection a type-introspection round trip on first use.
INSERT_EVENTS_TEMPLATE = f"""
INSERT INTO events (id, swarm_id, agent_id, type, payload, "timestamp", correlation_id,
                    parent_event_id, entity_type, severity)
SELECT u.id::uuid, u.swarm_id::uuid, u.agent_id::uuid, u.type, u.payload::jsonb,
       COALESCE(u.ts::timestamptz, now()), u.correlation_id, u.parent_event_id::uuid,
       u.entity_type, u.severity
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
            $7::text[], $8::text[], $9::text[], $10::text[])
     AS u(id, swarm_id, agent_id, type, payload, ts, correlation_id, parent_event_id,
          entity_type, severity)
{{on_conflict}}
RETURNING {EVENT_COLUMNS}
"""  # noqa: S608
# Batch insert, first attempt: any existing id aborts the whole statement.
INSERT_EVENTS = INSERT_EVENTS_TEMPLATE.format(on_conflict="")
# Batch insert, retry attempt: rows written by the lost attempt are skipped (and fetched after).
INSERT_EVENTS_RETRY = INSERT_EVENTS_TEMPLATE.format(on_conflict="ON CONFLICT (id) DO NOTHING")
# Binary COPY of a batch: the target table and its columns, in the order _copy_data encodes them.
# (asyncpg's copy_records_to_table would need binary codecs for every column; the pool's JSONB codec
# is text-format, so the rows are encoded here, which is as fast and needs no per-connection
# introspection query.)
COPY_TABLE = "events"
COPY_COLUMNS = Event._fields
# After a batch failed on a missing parent: the first of these ids (text, in batch order) that has
# no row, so that the error names it. One statement per parent table; the table is never input.
SELECT_MISSING_PARENT = {
    entity: f"""
SELECT u.id::uuid FROM unnest($1::text[]) WITH ORDINALITY AS u(id, n)
WHERE NOT EXISTS (SELECT 1 FROM {table} p WHERE p.id = u.id::uuid)
ORDER BY u.n LIMIT 1
"""  # noqa: S608
    for entity, table in (("swarm", "swarms"), ("agent", "agents"))
}
# The database clock of the COPY's transaction: the value every defaulted timestamp gets.
SELECT_NOW = "SELECT now()"
# One event by primary key.
SELECT_EVENT_BY_ID = f"SELECT {EVENT_COLUMNS} FROM events WHERE id = $1"  # noqa: S608
# Events by primary keys given as text (the retry path of create_many).
SELECT_EVENTS_BY_IDS = f"""
SELECT {EVENT_COLUMNS} FROM events WHERE id = ANY($1::text[]::uuid[])
"""  # noqa: S608
# Template of the filtered reads; {where}/{direction} come only from fixed fragments in code.
SELECT_EVENTS_TEMPLATE = f"""
SELECT {EVENT_COLUMNS} FROM events{{where}}
ORDER BY "timestamp" {{direction}}, id {{direction}} LIMIT $1
"""  # noqa: S608
# Template of count(); {where} comes only from fixed fragments in code.
COUNT_EVENTS_TEMPLATE = "SELECT count(*) FROM events{where}"
# Totals over a window judged by the database clock: by type, by severity and overall, one scan.
SELECT_STATS = """
SELECT GROUPING(type) AS g_type, GROUPING(severity) AS g_severity, type, severity, count(*)
FROM events
WHERE "timestamp" >= now() - make_interval(secs => $1::float8)
GROUP BY GROUPING SETS ((type), (severity), ())
"""
# The event_stats_24h view, busiest type first.
SELECT_STATS_24H = f"""
SELECT {STATS_24H_COLUMNS} FROM event_stats_24h ORDER BY event_count DESC, event_type
"""  # noqa: S608
# The cutoff "now minus hours" on the database clock (delete_older_than(hours)).
SELECT_CUTOFF = "SELECT now() - make_interval(secs => $1::float8)"
# One delete batch: the oldest rows before the cutoff, found by the (timestamp, id) index and
# deleted by primary key (= ANY(ARRAY(...)) uses the PK; IN (SELECT ...) would hash-join).
DELETE_EVENTS_BATCH = """
DELETE FROM events WHERE id = ANY(ARRAY(
    SELECT id FROM events WHERE "timestamp" < $1 ORDER BY "timestamp", id LIMIT $2
))
"""

_CURSOR_VERSION = b"\x01"
_CURSOR_STRUCT = struct.Struct(">q16s")  # microseconds since the Unix epoch (UTC), event id
_CURSOR_LENGTH = 34  # base64url (no padding) of 1 + 8 + 16 bytes
_CURSOR_RE = re.compile(r"[A-Za-z0-9_-]{34}")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

# PostgreSQL's binary COPY format: signature, flags (0), header extension length (0); each row is
# a field count, then per field its length (-1 for NULL) and bytes; the file ends with -1.
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_COPY_TRAILER = b"\xff\xff"
_COPY_NULL = b"\xff\xff\xff\xff"
_COPY_ROW_START = struct.Struct(">hi16si16s")  # field count; id and swarm_id (length, 16 bytes)
_COPY_LENGTH = struct.Struct(">i")
_COPY_UUID = struct.Struct(">i16s")
_COPY_TIMESTAMP = struct.Struct(">iq")  # length 8, microseconds since 2000-01-01 UTC
_COPY_JSONB_VERSION = b"\x01"
_PG_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
_MICROSECOND = dt.timedelta(microseconds=1)


class EventInput(TypedDict, total=False):
    """One item of ``create_many``: the keyword arguments of ``create``."""

    swarm_id: Required[uuid.UUID | str]
    type: Required[str]
    agent_id: uuid.UUID | str | None
    payload: Any
    timestamp: dt.datetime | None
    correlation_id: str | None
    parent_event_id: uuid.UUID | str | None
    entity_type: str
    severity: str
    id: uuid.UUID | str | None


# A validated event, in INSERT_EVENT parameter order (payload still a Python value, timestamp in
# UTC).
_Row = tuple[
    uuid.UUID,
    uuid.UUID,
    uuid.UUID | None,
    str,
    Any,
    dt.datetime | None,
    str | None,
    uuid.UUID | None,
    str,
    str,
]


def _check_event(
    prefix: str,
    swarm_id: Any,
    type: Any,
    agent_id: Any = None,
    payload: Any = None,
    timestamp: Any = None,
    correlation_id: Any = None,
    parent_event_id: Any = None,
    entity_type: Any = "system",
    severity: Any = "info",
    id: Any = None,
) -> _Row:
    """Validate one event; field names in errors are ``prefix + name`` (e.g. ``events[3].type``)."""
    sid = v.check_uuid(swarm_id, prefix + "swarm_id")
    typ = v.check_text(type, prefix + "type", allow_empty=False)
    assert sid is not None and typ is not None
    data = {} if payload is None else v.check_json(payload, prefix + "payload")
    ts = v.check_timestamp(timestamp, prefix + "timestamp", optional=True)
    if ts is not None:
        try:
            ts = ts.astimezone(dt.UTC)  # what the database stores and hands back
        except OverflowError:
            raise ValidationError(prefix + "timestamp", "is out of range once converted to UTC") from None
    return (
        v.check_uuid(id, prefix + "id", optional=True) or new_id(),
        sid,
        v.check_uuid(agent_id, prefix + "agent_id", optional=True),
        typ,
        data,
        ts,
        v.check_text(correlation_id, prefix + "correlation_id", optional=True),
        v.check_uuid(parent_event_id, prefix + "parent_event_id", optional=True),
        _choice(entity_type, ENTITY_TYPES, prefix + "entity_type"),
        _choice(severity, SEVERITIES, prefix + "severity"),
    )


def _is_ours(stored: Any, row: _Row, payload: bytes) -> bool:
    """On a retry, is the stored event with our id the one we sent (written by the attempt whose
    answer was lost), or another event that already had that id (a conflict to report, never a
    success to adopt)? ``stored`` is a row in EVENT_COLUMNS order; ``row`` is in _Row order."""
    return bool(
        stored[1] == row[1]
        and stored[2] == row[2]
        and stored[3] == row[3]
        and stored[6] == row[6]
        and stored[7] == row[7]
        and stored[8] == row[8]
        and stored[9] == row[9]
        and (row[5] is None or stored[5] == row[5])
        and stored[4] == orjson.loads(payload)
    )


def _not_ours(event_id: Any) -> ConflictError:
    return ConflictError(f"event {event_id} already exists (with other content)", constraint="events_pkey")


def _dump_payload(value: Any, field: str) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError as exc:
        raise ValidationError(field, f"is not JSON-serialisable: {exc}") from None


def prepare_event(
    swarm_id: Any,
    type: Any,
    agent_id: Any = None,
    payload: Any = None,
    timestamp: Any = None,
    correlation_id: Any = None,
    parent_event_id: Any = None,
    entity_type: Any = "system",
    severity: Any = "info",
    id: Any = None,
) -> tuple[_Row, bytes]:
    """Validate one event as ``create`` does and serialise its payload (for ``insert_prepared``).

    The id is generated here if not given, so every retry of the write carries the same id.
    """
    row = _check_event(
        "",
        swarm_id,
        type,
        agent_id,
        payload,
        timestamp,
        correlation_id,
        parent_event_id,
        entity_type,
        severity,
        id,
    )
    return row, _dump_payload(row[4], "payload")


def _choice(value: Any, allowed: frozenset[str], field: str) -> str:
    result = v.check_choice(value, allowed, field)
    assert result is not None
    return result


def _id(value: Any, field: str = "id") -> uuid.UUID:
    result = v.check_uuid(value, field)
    assert result is not None
    return result


def _hours(value: Any, field: str = "hours") -> float:
    """A window length in hours: a finite, non-negative number (int, float or Decimal)."""
    return v.check_duration(value, field, maximum=MAX_HOURS, allow_zero=True)


def _direction(value: Any) -> str:
    if isinstance(value, str) and value.lower() in ("asc", "desc"):
        return value.upper()
    raise ValidationError("order", f"must be 'asc' or 'desc', got {value!r}")


def _encode_cursor(timestamp: dt.datetime, event_id: uuid.UUID) -> str:
    delta = timestamp - _EPOCH
    micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    raw = _CURSOR_VERSION + _CURSOR_STRUCT.pack(micros, event_id.bytes)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _decode_cursor(value: Any, field: str = "after") -> tuple[dt.datetime, uuid.UUID]:
    """Strictly decode a cursor made by ``EventRepository.cursor``; anything else is a ValidationError."""
    if not isinstance(value, str) or len(value) != _CURSOR_LENGTH or not _CURSOR_RE.fullmatch(value):
        raise ValidationError(field, "is not a cursor returned by EventRepository.cursor()")
    try:
        raw = base64.urlsafe_b64decode(value + "==")
    except (binascii.Error, ValueError):
        raise ValidationError(field, "is not a cursor returned by EventRepository.cursor()") from None
    if len(raw) != 1 + _CURSOR_STRUCT.size or raw[:1] != _CURSOR_VERSION:
        raise ValidationError(field, "is not a cursor returned by EventRepository.cursor()")
    micros, id_bytes = _CURSOR_STRUCT.unpack(raw[1:])
    try:
        timestamp = _EPOCH + dt.timedelta(microseconds=micros)
    except OverflowError:
        raise ValidationError(field, "holds a timestamp out of range") from None
    event_id = uuid.UUID(bytes=id_bytes)
    if _encode_cursor(timestamp, event_id) != value:  # non-canonical spelling (stray low bits)
        raise ValidationError(field, "is not a cursor returned by EventRepository.cursor()")
    return timestamp, event_id


@functools.lru_cache(maxsize=256)
def _where(
    swarm: bool,
    agent: bool,
    types: bool,
    entity_type: bool,
    severity: bool,
    since: bool,
    until: bool,
    after: str | None,
    first_param: int,
) -> str:
    """The WHERE clause for the given set of filters, from fixed fragments only.

    Parameters are numbered from ``first_param`` in the order of the arguments above; ``after``
    is None (no cursor), ">" (ascending) or "<" (descending) and takes two parameters.
    """
    parts: list[str] = []
    n = first_param
    for present, fragment in (
        (swarm, "swarm_id = ${}"),
        (agent, "agent_id = ${}"),
        (types, "type = ANY(${}::text[])"),
        (entity_type, "entity_type = ${}"),
        (severity, "severity = ${}"),
        (since, '"timestamp" >= ${}'),
        (until, '"timestamp" < ${}'),
    ):
        if present:
            parts.append(fragment.format(n))
            n += 1
    if after is not None:
        assert after in (">", "<")
        parts.append(f'("timestamp", id) {after} (${n}, ${n + 1})')
    return (" WHERE " + " AND ".join(parts)) if parts else ""


@functools.lru_cache(maxsize=256)
def _select_sql(where: str, direction: str) -> str:
    return SELECT_EVENTS_TEMPLATE.format(where=where, direction=direction)


class EventRepository(Repository):
    """The event log: append (one or a batch), query with filters and cursor paging, stats, pruning."""

    __slots__ = ()

    @staticmethod
    def cursor(event: Event) -> str:
        """An opaque cursor positioned at ``event``, for ``find_by_filter(after=...)``."""
        return _encode_cursor(event.timestamp, event.id)

    async def create(
        self,
        swarm_id: uuid.UUID | str,
        type: str,
        *,
        agent_id: uuid.UUID | str | None = None,
        payload: Any = None,
        timestamp: dt.datetime | None = None,
        correlation_id: str | None = None,
        parent_event_id: uuid.UUID | str | None = None,
        entity_type: str = "system",
        severity: str = "info",
        id: uuid.UUID | str | None = None,
    ) -> Event:
        """Append one event (payload defaults to ``{}``, timestamp to the database clock).

        Raises NotFoundError naming the swarm or agent if it does not exist, ConflictError if the
        id exists.
        """
        args = _check_event(
            "",
            swarm_id,
            type,
            agent_id,
            payload,
            timestamp,
            correlation_id,
            parent_event_id,
            entity_type,
            severity,
            id,
        )

        async def insert(con: Connection, attempt: int) -> Event:
            try:
                row = await con.fetchrow(INSERT_EVENT, *args)
            except asyncpg.ForeignKeyViolationError as exc:
                entity = missing_parent(exc)
                if entity is None:
                    raise
                raise NotFoundError(entity, args[1] if entity == "swarm" else args[2]) from exc
            if row is None:
                if attempt > 1:  # our own row if an attempt whose answer was lost wrote it
                    row = await con.fetchrow(SELECT_EVENT_BY_ID, args[0])
                    if row is not None and not _is_ours(row, args, orjson.dumps(args[4])):
                        raise _not_ours(args[0])
                if row is None:
                    raise ConflictError(f"event {args[0]} already exists", constraint="events_pkey")
            return Event(*row)

        return await self.db.run(insert, retry=True)

    async def create_many(self, events: Iterable[EventInput | Mapping[str, Any]]) -> builtins.list[Event]:
        """Append a batch, all or nothing; returns the events in input order, as stored.

        Each item is a mapping with the keyword arguments of ``create`` (see ``EventInput``). Every
        item is validated before any SQL (errors name e.g. ``events[3].type``). Ids are generated up
        front, so a retry after a lost connection returns each event exactly once. A batch of
        ``COPY_MIN_BATCH`` or more goes through binary COPY, a smaller one is one INSERT statement.
        Timestamps not given are the database's ``now()`` of the writing transaction. At most
        ``MAX_BATCH`` items. A missing swarm or agent fails the batch with NotFoundError naming the
        first missing one (in input order); an existing id with ConflictError.
        """
        rows = _check_batch(events)
        if not rows:
            return []
        payloads = [_dump_payload(r[4], f"events[{i}].payload") for i, r in enumerate(rows)]
        return await insert_prepared(self.db, rows, payloads)

    async def find_by_id(self, id: uuid.UUID | str) -> Event | None:
        """The event with this id, or None."""
        row = await self.db.fetchrow(SELECT_EVENT_BY_ID, _id(id), retry=True)
        return Event(*row) if row is not None else None

    async def find_by_agent_id(
        self, agent_id: uuid.UUID | str, limit: int | None = None, since: dt.datetime | None = None
    ) -> builtins.list[Event]:
        """An agent's events, newest first (optionally only those at or after ``since``)."""
        return await self.find_by_filter(
            agent_id=_id(agent_id, "agent_id"), since=since, limit=limit, order="desc"
        )

    async def find_by_swarm_id(
        self, swarm_id: uuid.UUID | str, limit: int | None = None, since: dt.datetime | None = None
    ) -> builtins.list[Event]:
        """A swarm's events, newest first (optionally only those at or after ``since``)."""
        return await self.find_by_filter(
            swarm_id=_id(swarm_id, "swarm_id"), since=since, limit=limit, order="desc"
        )

    async def find_by_filter(
        self,
        swarm_id: uuid.UUID | str | None = None,
        agent_id: uuid.UUID | str | None = None,
        types: Sequence[str] | None = None,
        entity_type: str | None = None,
        severity: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        limit: int | None = None,
        after: str | None = None,
        order: str = "asc",
    ) -> builtins.list[Event]:
        """Events matching every given filter, ordered by (timestamp, id) ``order`` ("asc"/"desc").

        Page with ``after=EventRepository.cursor(last_event_of_previous_page)``: stable and
        complete even while events are appended. ``types=[]`` matches nothing.
        """
        args = _filter_args(swarm_id, agent_id, types, entity_type, severity, since, until)
        lim = v.check_limit(limit)
        direction = _direction(order)
        cursor = _decode_cursor(after) if after is not None else None
        if args is None:
            return []
        flags, values = args
        where = _where(
            *flags,
            after=None if cursor is None else (">" if direction == "ASC" else "<"),
            first_param=2,
        )
        params: list[Any] = [lim, *values]
        if cursor is not None:
            params.extend(cursor)
        rows = await self.db.fetch(_select_sql(where, direction), *params, retry=True)
        return [Event(*r) for r in rows]

    async def count(
        self,
        swarm_id: uuid.UUID | str | None = None,
        agent_id: uuid.UUID | str | None = None,
        types: Sequence[str] | None = None,
        entity_type: str | None = None,
        severity: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
    ) -> int:
        """Number of events matching every given filter (the filters of ``find_by_filter``)."""
        args = _filter_args(swarm_id, agent_id, types, entity_type, severity, since, until)
        if args is None:
            return 0
        flags, values = args
        sql = COUNT_EVENTS_TEMPLATE.format(where=_where(*flags, after=None, first_param=1))
        return int(await self.db.fetchval(sql, *values, retry=True))

    async def get_stats(self, hours: float | Decimal = 24) -> EventStats:
        """Events of the last ``hours`` (database clock): total, by type, by severity (every severity,
        zero-filled), from one query, so the three always agree."""
        h = _hours(hours)
        rows = await self.db.fetch(SELECT_STATS, h * 3600.0, retry=True)
        total = 0
        by_type: dict[str, int] = {}
        by_severity = {s.value: 0 for s in Severity}
        for g_type, g_severity, typ, sev, n in rows:
            if g_type and g_severity:
                total = int(n)
            elif not g_type:
                by_type[typ] = int(n)
            else:
                by_severity[sev] = int(n)
        return EventStats(hours=h, total=total, by_type=by_type, by_severity=by_severity)

    async def get_stats_24h(self) -> builtins.list[EventTypeStats]:
        """Rows of the ``event_stats_24h`` view, busiest type first."""
        rows = await self.db.fetch(SELECT_STATS_24H, retry=True)
        return [EventTypeStats(*r) for r in rows]

    async def get_timeline(
        self,
        swarm_id: uuid.UUID | str,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        limit: int | None = None,
    ) -> builtins.list[Event]:
        """A swarm's events in time order (oldest first), optionally within [since, until)."""
        return await self.find_by_filter(
            swarm_id=_id(swarm_id, "swarm_id"), since=since, until=until, limit=limit, order="asc"
        )

    async def delete_older_than(self, cutoff: dt.datetime | float | Decimal, batch_size: int = 10_000) -> int:
        """Delete events with timestamp before ``cutoff`` (a datetime, or a number of hours before
        the database's now()), in batches of ``batch_size``, each its own statement. Returns the
        number deleted (a batch whose answer was lost to a dropped connection is not counted)."""
        if isinstance(cutoff, dt.datetime):
            when = v.check_timestamp(cutoff, "cutoff")
        else:
            hours = _hours(cutoff, "cutoff")
            when = await self.db.fetchval(SELECT_CUTOFF, hours * 3600.0, retry=True)
        size = v.check_int(batch_size, "batch_size", minimum=1, maximum=MAX_DELETE_BATCH)
        assert size is not None
        total = 0
        while True:
            status = await self.db.execute(DELETE_EVENTS_BATCH, when, size, retry=True)
            deleted = int(status.rsplit(" ", 1)[-1])
            total += deleted
            if deleted < size:
                return total


async def insert_prepared(db: Database, rows: Sequence[_Row], payloads: Sequence[bytes]) -> list[Event]:
    """Write validated events (see ``prepare_event``) all or nothing; the stored events, in order.

    Retried on transient failures: ids are fixed, and a retry attempt writes only the events the
    lost attempt did not, so every event is stored once. Rows must have distinct ids. A missing
    swarm or agent is a NotFoundError naming it.
    """
    attempt = _copy_attempt if len(rows) >= COPY_MIN_BATCH else _insert_attempt
    try:
        return await db.run(functools.partial(attempt, rows, payloads), retry=True)
    except DashStorageError as exc:
        entity = missing_parent(exc.__cause__)
        if entity is None:
            raise
        raise await _missing_parent_error(db, rows, entity) from exc.__cause__


async def _missing_parent_error(db: Database, rows: Sequence[_Row], entity: str) -> NotFoundError:
    """NotFoundError naming the first swarm/agent of ``rows`` (input order) that does not exist.

    The failed statement only says that one is missing; when the batch references several, one
    more query finds which. Should that query fail, or find them all present (created meanwhile),
    the error still says what kind of parent was missing.
    """
    column = 1 if entity == "swarm" else 2
    ids = list(dict.fromkeys(str(r[column]) for r in rows if r[column] is not None))
    if len(ids) == 1:
        return NotFoundError(entity, uuid.UUID(ids[0]))
    try:
        found = await db.fetchval(SELECT_MISSING_PARENT[entity], ids, retry=True)
    except DashStorageError:
        found = None
    if found is None:
        return NotFoundError(entity, f"(one of the {len(ids)} {entity} ids of the batch)")
    return NotFoundError(entity, found)


async def _insert_attempt(
    rows: Sequence[_Row], payloads: Sequence[bytes], con: Connection, attempt: int
) -> list[Event]:
    """One INSERT over parallel text arrays (see INSERT_EVENTS_TEMPLATE)."""
    columns: list[list[str | None]] = [
        [str(r[0]) for r in rows],
        [str(r[1]) for r in rows],
        [None if r[2] is None else str(r[2]) for r in rows],
        [r[3] for r in rows],
        [p.decode() for p in payloads],
        [None if r[5] is None else r[5].isoformat() for r in rows],
        [r[6] for r in rows],
        [None if r[7] is None else str(r[7]) for r in rows],
        [r[8] for r in rows],
        [r[9] for r in rows],
    ]
    if attempt == 1:
        by_id = {r[0]: r for r in await con.fetch(INSERT_EVENTS, *columns)}
    else:
        # One transaction, so that finding another event's id rolls the whole batch back.
        async with con.transaction():
            by_id = {r[0]: r for r in await con.fetch(INSERT_EVENTS_RETRY, *columns)}
            missing = {r[0]: (r, p) for r, p in zip(rows, payloads, strict=True) if r[0] not in by_id}
            if missing:  # written by the attempt whose answer was lost, or another event's id
                for r in await con.fetch(SELECT_EVENTS_BY_IDS, [str(i) for i in missing]):
                    if not _is_ours(r, *missing[r[0]]):
                        raise _not_ours(r[0])
                    by_id[r[0]] = r
    try:
        return [Event(*by_id[r[0]]) for r in rows]
    except KeyError as exc:
        # Only possible on a retry, if an id already belonged to a different event that was then
        # deleted, or an explicit id collided; never silently return a short list.
        raise DatabaseError(f"event {exc.args[0]} of the batch could not be read back") from None


async def _copy_attempt(
    rows: Sequence[_Row], payloads: Sequence[bytes], con: Connection, attempt: int
) -> list[Event]:
    """One transaction: read now(), binary COPY, commit."""
    async with transaction_on(con):
        return await _copy_in_transaction(rows, payloads, con, attempt)


async def _copy_in_transaction(
    rows: Sequence[_Row], payloads: Sequence[bytes], con: Connection, attempt: int
) -> list[Event]:
    """Binary COPY; defaulted timestamps get the transaction's now(). A retry attempt first reads
    the events the lost attempt committed and copies only the rest."""
    stored: dict[uuid.UUID, Event] = {}
    todo, todo_payloads = rows, payloads
    if attempt > 1:
        sent = {r[0]: (r, p) for r, p in zip(rows, payloads, strict=True)}
        for r in await con.fetch(SELECT_EVENTS_BY_IDS, [str(r[0]) for r in rows]):
            if not _is_ours(r, *sent[r[0]]):
                raise _not_ours(r[0])  # an id that belonged to another event: a real conflict
            stored[r[0]] = Event(*r)
        if stored:
            kept = [i for i, r in enumerate(rows) if r[0] not in stored]
            todo, todo_payloads = [rows[i] for i in kept], [payloads[i] for i in kept]
    if not todo:
        return [stored[r[0]] for r in rows]
    now: dt.datetime | None = None
    if any(r[5] is None for r in todo):
        now = await con.fetchval(SELECT_NOW)
    data = _copy_data(todo, todo_payloads, now)
    try:
        # A memoryview: asyncpg sends any buffer as is (bytes would be taken for a file path).
        await con.copy_to_table(
            COPY_TABLE,
            source=memoryview(data),  # type: ignore[arg-type]  # buffers are documented, not in the stubs
            columns=COPY_COLUMNS,
            format="binary",
        )
    except asyncpg.UniqueViolationError as exc:
        if attempt == 1:
            raise
        # The lost attempt's transaction committed only now (its backend outlived the connection):
        # not a real conflict. Retry; the next attempt reads those rows.
        raise SerializationConflictError(f"events of the batch were committed concurrently: {exc}") from exc
    # The events as stored: every value is what was sent (timestamps in UTC, as the database hands
    # them back); the payload is decoded from the very JSON text sent. JSONB keeps its values; what
    # a read may spell differently is key order (dict equality ignores it) and a float written with
    # an exponent that is a whole number (1e+16 reads back as the equal int 10000000000000000).
    written = [
        Event(r[0], r[1], r[2], r[3], orjson.loads(p), r[5] or now, r[6], r[7], r[8], r[9])  # type: ignore[arg-type]
        for r, p in zip(todo, todo_payloads, strict=True)
    ]
    if not stored:
        return written
    stored.update((e.id, e) for e in written)
    return [stored[r[0]] for r in rows]


def _copy_data(rows: Sequence[_Row], payloads: Sequence[bytes], now: dt.datetime | None) -> bytes:
    """The rows in PostgreSQL's binary COPY format, columns in COPY_COLUMNS order."""
    default_ts = b"" if now is None else _COPY_TIMESTAMP.pack(8, (now - _PG_EPOCH) // _MICROSECOND)
    length, uuid_field, null = _COPY_LENGTH.pack, _COPY_UUID.pack, _COPY_NULL
    out = [_COPY_HEADER]
    for r, p in zip(rows, payloads, strict=True):
        typ = r[3].encode()
        corr = None if r[6] is None else r[6].encode()
        out.append(
            b"".join(
                (
                    _COPY_ROW_START.pack(len(COPY_COLUMNS), 16, r[0].bytes, 16, r[1].bytes),
                    null if r[2] is None else uuid_field(16, r[2].bytes),
                    length(len(typ)),
                    typ,
                    length(len(p) + 1),
                    _COPY_JSONB_VERSION,
                    p,
                    default_ts
                    if r[5] is None
                    else _COPY_TIMESTAMP.pack(8, (r[5] - _PG_EPOCH) // _MICROSECOND),
                    null if corr is None else length(len(corr)) + corr,
                    null if r[7] is None else uuid_field(16, r[7].bytes),
                    _CHOICE_FIELDS[r[8]],
                    _CHOICE_FIELDS[r[9]],
                )
            )
        )
    out.append(_COPY_TRAILER)
    return b"".join(out)


def _check_batch(events: Any) -> list[_Row]:
    if isinstance(events, str | bytes | Mapping) or not isinstance(events, Iterable):
        raise ValidationError("events", "must be a list of events (mappings)")
    rows: list[_Row] = []
    seen: dict[uuid.UUID, int] = {}
    for i, item in enumerate(events):
        if i >= MAX_BATCH:
            raise ValidationError("events", f"holds more than {MAX_BATCH} events; split the batch")
        prefix = f"events[{i}]."
        if not isinstance(item, Mapping):
            raise ValidationError(f"events[{i}]", f"must be a mapping, got {type(item).__name__}")
        unknown = [k for k in item if k not in _EVENT_KEYS]
        if unknown:
            raise ValidationError(f"events[{i}]", f"has unknown key {unknown[0]!r}")
        for key in ("swarm_id", "type"):
            if key not in item:
                raise ValidationError(prefix + key, "is required")
        row = _check_event(prefix, **item)
        first = seen.setdefault(row[0], i)
        if first != i:
            raise ValidationError(prefix + "id", f"repeats the id of events[{first}]")
        rows.append(row)
    return rows


def _filter_args(
    swarm_id: Any,
    agent_id: Any,
    types: Any,
    entity_type: Any,
    severity: Any,
    since: Any,
    until: Any,
) -> tuple[tuple[bool, bool, bool, bool, bool, bool, bool], list[Any]] | None:
    """Validate the filters; returns (which are present, their values) or None if nothing can match."""
    sid = v.check_uuid(swarm_id, "swarm_id", optional=True)
    aid = v.check_uuid(agent_id, "agent_id", optional=True)
    type_list: list[str] | None = None
    if types is not None:
        if isinstance(types, str | bytes) or not isinstance(types, Iterable):
            raise ValidationError("types", "must be a list of event types")
        type_list = []
        for t in types:
            checked = v.check_text(t, "types", allow_empty=False)
            assert checked is not None
            type_list.append(checked)
        if len(type_list) > v.MAX_LIMIT:
            raise ValidationError("types", f"holds more than {v.MAX_LIMIT} types")
    et = v.check_choice(entity_type, ENTITY_TYPES, "entity_type", optional=True)
    sev = v.check_choice(severity, SEVERITIES, "severity", optional=True)
    lo = v.check_timestamp(since, "since", optional=True)
    hi = v.check_timestamp(until, "until", optional=True)
    if type_list is not None and not type_list:
        return None
    present: tuple[Any, ...] = (sid, aid, type_list, et, sev, lo, hi)
    flags = (
        sid is not None,
        aid is not None,
        type_list is not None,
        et is not None,
        sev is not None,
        lo is not None,
        hi is not None,
    )
    return flags, [p for p in present if p is not None]

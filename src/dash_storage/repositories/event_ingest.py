"""Writing validated events: one (``insert_one``) or a batch, all or nothing (``insert_prepared``).

Writes are idempotent by client-generated id (UUIDv7, fixed before the event is first sent), so
they are retried safely after a lost connection: a retry attempt finds the rows the lost attempt
wrote, checks that they are the events sent (an id that belonged to another event is a
ConflictError, never a success to adopt), and writes only the rest. A batch of fewer than
``COPY_MIN_BATCH`` events is one INSERT over arrays (one round trip), a bigger one binary COPY
(one statement on a first attempt; a retry reads back and copies in one transaction), streamed:
the client encodes the data piece by piece while the server inserts what it was sent. Ids are
fixed at validation, and timestamps left out before the first attempt (the database clock, see
``event_partitions.now``), so that every attempt sends the same key (id, timestamp) into the same
partition; the partitions they need are made first (``event_partitions.cover_rows``). A first
attempt returns the events as validation made them (the events as stored); a retry attempt reads
back what the lost attempt stored.
"""

from __future__ import annotations

import datetime as dt
import functools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

import orjson

from dash_storage import sql
from dash_storage.core.connections import transaction_on
from dash_storage.core.database import Connection, Database
from dash_storage.core.errors import (
    ConflictError,
    DashStorageError,
    DatabaseError,
    NotFoundError,
    SerializationConflictError,
    map_error,
)
from dash_storage.core.models import Event
from dash_storage.repositories import event_partitions as partitions
from dash_storage.repositories.base import missing_parent
from dash_storage.repositories.event_copy import COPY_COLUMNS, COPY_TABLE, chunk_ranges, copy_chunk
from dash_storage.repositories.event_input import EventRow, dump_payload, make_event, payload_json

__all__ = ["COPY_MIN_BATCH", "insert_one", "insert_prepared"]

#: Batches of at least this many events are written with binary COPY, smaller ones with one INSERT
#: over arrays. A COPY costs a little more per statement and less per row on both sides: with
#: durable commits the two are level up to 8 events and COPY is 10-25% ahead from 16 on
#: (bench/ingest.py).
COPY_MIN_BATCH = 8

_Q = sql.load("events")
INSERT_EVENT = _Q["insert_event"]
INSERT_EVENT_CHECKED = _Q["insert_event_checked"]
INSERT_EVENTS = _Q["insert_events"]
INSERT_EVENTS_RETRY = _Q["insert_events_retry"]
SELECT_EVENT_BY_ID = _Q["select_event_by_id"]
SELECT_EVENT_BY_ID_FLAGGED = _Q["select_event_by_id_flagged"]
SELECT_EVENTS_BY_IDS = _Q["select_events_by_ids"]
SELECT_MISSING_PARENT = {"swarm": _Q["select_missing_swarm"], "agent": _Q["select_missing_agent"]}
_PRIMARY_KEY = "events_pkey"
T = TypeVar("T")
# The columns of a batch that are often NULL throughout: agent_id, timestamp, correlation_id and
# parent_event_id (positions in EventRow).
_OPTIONAL_COLUMNS = (2, 5, 6, 7)


async def insert_one(db: Database, row: EventRow, *, id_given: bool = True) -> Event:
    """Write one validated event (see ``check_event``); the event as stored.

    Raises NotFoundError naming the swarm or agent if it does not exist, ConflictError if the id
    exists. ``id_given=False`` says the id was generated (a UUIDv7, which no stored event has), so
    a first attempt need not look it up.
    """

    async def insert(con: Connection, attempt: int) -> Event:
        if attempt == 1 and not id_given:
            stored = await con.fetchrow(INSERT_EVENT, *row)
            if stored is None:
                raise _exists(row[0])
            return make_event(Event, stored[:])
        # An id that may be stored already, with this or another timestamp (the key is (id,
        # timestamp)); on a retry it may be our own row, written by the attempt whose answer was
        # lost. Found and written in one statement.
        found = await con.fetchrow(INSERT_EVENT_CHECKED, *row)
        if found is None:  # a concurrent insert of the same key committed first
            found = await con.fetchrow(SELECT_EVENT_BY_ID_FLAGGED, row[0])
            if found is None:
                raise _exists(row[0])
        if found[0]:
            return make_event(Event, found[1:])
        if attempt > 1 and _is_ours(found[1:], row, dump_payload(row[4], "payload")):
            return make_event(Event, found[1:])
        raise _not_ours(row[0]) if attempt > 1 else _exists(row[0])

    stamp = partitions.ready(db, row[5])  # usually: the partitions known hold it, nothing to await
    if stamp is None:
        if row[5] is None:
            row = (*row[:5], await partitions.now(db), *row[6:])
        await partitions.cover_rows(db, (row,))
    elif row[5] is None:
        row = (*row[:5], stamp, *row[6:])
    try:
        return await _with_partitions(db, (row,), insert)
    except ConflictError as exc:
        entity = missing_parent(exc)
        if entity is None:
            raise
        raise NotFoundError(entity, row[1] if entity == "swarm" else row[2]) from exc.__cause__


async def _with_partitions(
    db: Database, rows: Sequence[Sequence[Any]], write: Callable[[Connection, int], Awaitable[T]]
) -> T:
    """Run ``write(con, attempt)`` of ``rows`` (each with its timestamp), retried; if no partition
    held one of them (another process pruned it since this one last looked), create it and write
    again.

    ``write`` must make its first attempt one statement, which either stores everything or
    nothing, and must recognise, on any later attempt, rows an attempt whose answer was lost
    stored. So when the write that failed had been retried, the write again goes on as a retry
    (its attempts numbered after the last one): such rows are its own, not a conflict. A first
    attempt that failed stored nothing, and the write starts afresh."""
    tries = 0

    def counted(con: Connection, n: int) -> Awaitable[T]:
        nonlocal tries
        tries = n
        return write(con, n)

    try:
        return await db.run(counted, retry=True)
    except DashStorageError as exc:
        if not partitions.missing_partition(exc):
            raise
    await partitions.forget(db)
    await partitions.cover_rows(db, rows)
    after = tries if tries > 1 else 0
    return await db.run(lambda con, n: write(con, after + n), retry=True)


async def insert_prepared(
    db: Database,
    rows: Sequence[EventRow],
    payloads: Sequence[bytes],
    *,
    given_ids: Sequence[uuid.UUID],
) -> list[Event]:
    """Write validated events all or nothing; the stored events, in order. ``rows`` are as
    ``prepare_event`` / ``prepare_batch`` make them: ``Event`` objects, each the event as stored
    but for a timestamp left None (those get the database clock, one value for all).

    ``given_ids`` are the ids that callers gave: only those are looked up before the write (the
    others are new UUIDv7s that no stored event has, and the look-up reads every partition).

    Retried on transient failures: ids are fixed, and a retry attempt writes only the events the
    lost attempt did not, so every event is stored once. Rows must have distinct ids. A missing
    swarm or agent is a NotFoundError naming the first missing one (in input order).
    """
    if not rows:
        return []
    attempt = _copy_attempt if len(rows) >= COPY_MIN_BATCH else _insert_attempt
    # The timestamp of the rows that have none is fixed here, before the first attempt, so that
    # every attempt sends the same.
    now = await partitions.now(db) if any(r[5] is None for r in rows) else None
    stamped = _stamped(rows, now) if now is not None else cast(list[Event], list(rows))
    await partitions.cover_rows(db, stamped)
    if given_ids:
        # The key is (id, timestamp): an id stored with another timestamp is found only by a look-up.
        found = await db.fetch(SELECT_EVENTS_BY_IDS, [str(i) for i in given_ids], retry=True)
        if found:
            raise _exists(found[0][0])
    try:
        return await _with_partitions(db, stamped, functools.partial(attempt, stamped, payloads))
    except ConflictError as exc:
        entity = missing_parent(exc)
        if entity is None:
            raise
        raise await _missing_parent_error(db, rows, entity) from exc.__cause__


async def _missing_parent_error(db: Database, rows: Sequence[EventRow], entity: str) -> NotFoundError:
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


def _is_ours(stored: Any, row: EventRow, payload: bytes) -> bool:
    """On a retry, is the stored event with our id the one we sent (written by the attempt whose
    answer was lost), or another event that already had that id (a conflict to report, never a
    success to adopt)? ``stored`` and ``row`` are both in Event field order; a timestamp left to
    the database clock matches any."""
    return bool(
        stored[1] == row[1]
        and stored[2] == row[2]
        and stored[3] == row[3]
        and stored[6] == row[6]
        and stored[7] == row[7]
        and stored[8] == row[8]
        and stored[9] == row[9]
        and (row[5] is None or stored[5] == row[5])
        and stored[4] == orjson.loads(payload_json(payload))
    )


def _exists(event_id: Any) -> ConflictError:
    return ConflictError(f"event {event_id} already exists", constraint=_PRIMARY_KEY)


def _not_ours(event_id: Any) -> ConflictError:
    return ConflictError(f"event {event_id} already exists (with other content)", constraint=_PRIMARY_KEY)


async def _insert_attempt(
    rows: list[Event], payloads: Sequence[bytes], con: Connection, attempt: int
) -> list[Event]:
    """One INSERT over parallel arrays (see insert_events in sql/events.sql); a retry hands back
    the rows it wrote."""
    # The rows' fields column by column; one that is NULL throughout goes as NULL, which unnest()
    # pads with NULLs, sparing asyncpg an array to encode (it inspects every element).
    columns: list[Sequence[Any] | None] = [
        None if i in _OPTIONAL_COLUMNS and all(v is None for v in column) else column
        for i, column in enumerate(zip(*rows, strict=True))
    ]
    columns[4] = [payload_json(p).decode() for p in payloads]
    if attempt == 1:
        await con.fetchval(INSERT_EVENTS, *columns)
        return rows
    # A retry. One transaction, so that finding another event's id rolls the whole batch back.
    # The ids are looked up first (written by the attempt whose answer was lost, or another
    # event's id, possibly with another timestamp, which the key (id, timestamp) would not catch).
    async with transaction_on(con):
        sent = {r[0]: (r, p) for r, p in zip(rows, payloads, strict=True)}
        by_id: dict[Any, Any] = {}
        for r in await con.fetch(SELECT_EVENTS_BY_IDS, [str(i) for i in sent]):
            if not _is_ours(r, *sent[r[0]]):
                raise _not_ours(r[0])
            by_id[r[0]] = r
        by_id.update((r[0], r) for r in await con.fetch(INSERT_EVENTS_RETRY, *columns))
    try:
        return [Event(*by_id[r[0]]) for r in rows]
    except KeyError as exc:
        # Only possible on a retry, if an id already belonged to a different event that was then
        # deleted, or an explicit id collided; never silently return a short list.
        raise DatabaseError(f"event {exc.args[0]} of the batch could not be read back") from None


async def _copy_attempt(
    rows: list[Event], payloads: Sequence[bytes], con: Connection, attempt: int
) -> list[Event]:
    """A first attempt is the COPY alone, one statement and so atomic by itself (no BEGIN and
    COMMIT round trips); a retry attempt reads back and copies in one transaction."""
    if attempt == 1:
        return await _copy_rows(rows, payloads, con, attempt)
    async with transaction_on(con):
        return await _copy_rows(rows, payloads, con, attempt)


async def _copy_rows(
    rows: list[Event], payloads: Sequence[bytes], con: Connection, attempt: int
) -> list[Event]:
    """Binary COPY of ``rows``, sent piece by piece (``chunk_ranges``): each piece is encoded when
    asyncpg asks for it, while the server inserts the pieces already sent. A retry attempt (inside
    a transaction) reads the events the lost attempt committed and copies only the rest."""
    todo, todo_payloads = rows, payloads
    stored: dict[uuid.UUID, Event] = {}
    if attempt > 1:
        sent = {r[0]: (r, p) for r, p in zip(rows, payloads, strict=True)}
        for r in await con.fetch(SELECT_EVENTS_BY_IDS, [str(r[0]) for r in rows]):
            if not _is_ours(r, *sent[r[0]]):
                raise _not_ours(r[0])  # an id that belonged to another event: a real conflict
            stored[r[0]] = Event(*r)
        if stored:
            kept = [i for i, r in enumerate(rows) if r[0] not in stored]
            if not kept:
                return [stored[r[0]] for r in rows]
            todo, todo_payloads = [rows[i] for i in kept], [payloads[i] for i in kept]
    try:
        await con.copy_to_table(
            COPY_TABLE, source=_pieces(todo, todo_payloads), columns=COPY_COLUMNS, format="binary"
        )
    except Exception as exc:
        if attempt == 1 or not _duplicate_id(exc):
            raise
        # The lost attempt's transaction committed only now (its backend outlived the connection):
        # not a real conflict. Retry; the next attempt reads those rows.
        raise SerializationConflictError(f"events of the batch were committed concurrently: {exc}") from exc
    if not stored:
        return rows
    stored.update((e.id, e) for e in todo)
    return [stored[r[0]] for r in rows]


async def _pieces(rows: Sequence[EventRow], payloads: Sequence[bytes]) -> AsyncIterator[bytes]:
    """The COPY data of ``rows``, a piece at a time: a first small piece, so that the server
    starts inserting at once, then bigger ones, each encoded when asyncpg asks for it."""
    for start, end in chunk_ranges(len(rows)):
        yield copy_chunk(rows, payloads, start, end)


def _stamped(rows: Sequence[EventRow], now: dt.datetime) -> list[Event]:
    """``rows`` (Events but for a missing timestamp) with ``now`` as the timestamp of those that
    have none."""
    make = make_event
    stamped = [
        r if r[5] is not None else make(Event, (r[0], r[1], r[2], r[3], r[4], now, r[6], r[7], r[8], r[9]))
        for r in rows
    ]
    return cast(list[Event], stamped)


def _duplicate_id(exc: Exception) -> bool:
    """Is ``exc`` (as the driver raised it) an event key that already exists? Judged on the error
    as core.errors maps it, the one place that reads driver errors. The server names the primary
    key of the partition that holds the row (events_p<start>_pkey)."""
    error = map_error(exc)
    name = error.constraint if isinstance(error, ConflictError) else None
    return name is not None and (
        name == _PRIMARY_KEY or (name.startswith("events_p") and name.endswith("_pkey"))
    )

"""Writing validated events: one (``insert_one``) or a batch, all or nothing (``insert_prepared``).

Writes are idempotent by client-generated id (UUIDv7, fixed before the event is first sent), so
they are retried safely after a lost connection: a retry attempt finds the rows the lost attempt
wrote, checks that they are the events sent (an id that belonged to another event is a
ConflictError, never a success to adopt), and writes only the rest. A batch of fewer than
``COPY_MIN_BATCH`` events is one INSERT over arrays (one round trip), a bigger one binary COPY
(one statement on a first attempt; a retry reads back and copies in one transaction), streamed:
the client encodes the data piece by piece (generating the ids not given) and builds the events it
returns while the server inserts what it was sent. Timestamps left
out are fixed before the first attempt (the database clock, see ``event_partitions.now``), so that
every attempt sends the same key (id, timestamp) into the same partition, and the partitions they
need are made first (``event_partitions.cover_rows``). A first attempt returns the events as sent;
a retry attempt reads back what the lost attempt stored.
"""

from __future__ import annotations

import datetime as dt
import functools
import uuid
from collections.abc import Awaitable, Callable, Sequence
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
from dash_storage.core.ids import new_ids
from dash_storage.core.models import Event
from dash_storage.repositories import event_partitions as partitions
from dash_storage.repositories.base import missing_parent
from dash_storage.repositories.event_copy import COPY_COLUMNS, COPY_TABLE, chunk_ranges, copy_chunk
from dash_storage.repositories.event_input import EventRow, PendingRow, dump_payload, payload_json

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
            return Event(*stored)
        # An id that may be stored already, with this or another timestamp (the key is (id,
        # timestamp)); on a retry it may be our own row, written by the attempt whose answer was
        # lost. Found and written in one statement.
        found = await con.fetchrow(INSERT_EVENT_CHECKED, *row)
        if found is None:  # a concurrent insert of the same key committed first
            found = await con.fetchrow(SELECT_EVENT_BY_ID_FLAGGED, row[0])
            if found is None:
                raise _exists(row[0])
        if found[0]:
            return Event(*found[1:])
        if attempt > 1 and _is_ours(found[1:], row, dump_payload(row[4], "payload")):
            return Event(*found[1:])
        raise _not_ours(row[0]) if attempt > 1 else _exists(row[0])

    stamp = partitions.ready(db, row[5])  # usually: the partitions known hold it, nothing to await
    if stamp is None:
        if row[5] is None:
            row = (*row[:5], await partitions.now(db), *row[6:])
        await partitions.cover_rows(db, (row,))
    elif row[5] is None:
        row = (*row[:5], stamp, *row[6:])
    try:
        return await _with_partitions(db, (row,), lambda: db.run(insert, retry=True))
    except ConflictError as exc:
        entity = missing_parent(exc)
        if entity is None:
            raise
        raise NotFoundError(entity, row[1] if entity == "swarm" else row[2]) from exc.__cause__


async def _with_partitions(
    db: Database,
    rows: Sequence[Sequence[Any]],
    write: Callable[[], Awaitable[T]],
    now: dt.datetime | None = None,
) -> T:
    """Run ``write``; if no partition held one of its rows (another process pruned it since this
    one last looked), create it and run ``write`` once more. ``now``: the timestamp of the rows
    that have none yet."""
    try:
        return await write()
    except DashStorageError as exc:
        if not partitions.missing_partition(exc):
            raise
    await partitions.forget(db)
    await partitions.cover_rows(db, rows, now)
    return await write()


async def insert_prepared(
    db: Database,
    rows: Sequence[PendingRow],
    payloads: Sequence[bytes],
    *,
    given: Sequence[bool] | None = None,
) -> list[Event]:
    """Write validated events (see ``prepare_event`` / ``prepare_batch``) all or nothing; the
    stored events, in order.

    ``given`` says, row by row, whether the id came from the caller (default: every id set in
    ``rows``). Only those ids are looked up before the write: an id generated by ``prepare_event``
    is a new UUIDv7 that no stored event has, and the look-up reads every partition.

    Retried on transient failures: ids are fixed, and a retry attempt writes only the events the
    lost attempt did not, so every event is stored once. A row without an id gets a new one just
    before it is first sent (every later attempt sends that one). Rows must have distinct ids. A
    missing swarm or agent is a NotFoundError naming the first missing one (in input order).
    """
    if not rows:
        return []
    attempt = _copy_attempt if len(rows) >= COPY_MIN_BATCH else _insert_attempt
    # One list that every attempt shares: the ids fixed by one are those of the next. The
    # timestamp of the rows that have none is fixed here, before the first attempt, for the same
    # reason; each row gets it (and its id) as it is first sent (``_complete``).
    pending = list(rows)
    now = await partitions.now(db) if any(r[5] is None for r in pending) else None
    await partitions.cover_rows(db, pending, now)
    if given is None:
        check = [str(r[0]) for r in rows if r[0] is not None]
    else:
        check = [str(r[0]) for r, g in zip(rows, given, strict=True) if g]
    if check:
        # The key is (id, timestamp): an id stored with another timestamp is found only by a look-up.
        found = await db.fetch(SELECT_EVENTS_BY_IDS, check, retry=True)
        if found:
            raise _exists(found[0][0])
    try:
        return await _with_partitions(
            db, pending, lambda: db.run(functools.partial(attempt, pending, payloads, now), retry=True), now
        )
    except ConflictError as exc:
        entity = missing_parent(exc)
        if entity is None:
            raise
        raise await _missing_parent_error(db, rows, entity) from exc.__cause__


async def _missing_parent_error(db: Database, rows: Sequence[PendingRow], entity: str) -> NotFoundError:
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
    pending: list[PendingRow],
    payloads: Sequence[bytes],
    now: dt.datetime | None,
    con: Connection,
    attempt: int,
) -> list[Event]:
    """One INSERT over parallel arrays (see insert_events in sql/events.sql); a retry hands back
    the rows it wrote."""
    rows = _complete(pending, 0, len(pending), now)
    # The rows' fields column by column; one that is NULL throughout goes as NULL, which unnest()
    # pads with NULLs, sparing asyncpg an array to encode (it inspects every element).
    columns: list[Sequence[Any] | None] = [
        None if i in _OPTIONAL_COLUMNS and all(v is None for v in column) else column
        for i, column in enumerate(zip(*rows, strict=True))
    ]
    columns[4] = [payload_json(p).decode() for p in payloads]
    if attempt == 1:
        await con.fetchval(INSERT_EVENTS, *columns)
        return _as_stored(rows, payloads)
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
    pending: list[PendingRow],
    payloads: Sequence[bytes],
    now: dt.datetime | None,
    con: Connection,
    attempt: int,
) -> list[Event]:
    """A first attempt is the COPY alone, one statement and so atomic by itself (no BEGIN and
    COMMIT round trips); a retry attempt reads back and copies in one transaction."""
    if attempt == 1:
        return await _copy_rows(pending, payloads, now, con, attempt)
    async with transaction_on(con):
        return await _copy_rows(pending, payloads, now, con, attempt)


async def _copy_rows(
    pending: list[PendingRow],
    payloads: Sequence[bytes],
    now: dt.datetime | None,
    con: Connection,
    attempt: int,
) -> list[Event]:
    """Binary COPY (every timestamp already fixed by ``insert_prepared``). The first attempt gives the
    rows without an id theirs as it encodes them; a retry attempt (inside a transaction) gives
    every row its id, reads the events the lost attempt committed and copies only the rest."""
    todo, todo_payloads = pending, payloads
    stored: dict[uuid.UUID, Event] = {}
    if attempt > 1:
        rows = _complete(pending, 0, len(pending), now)
        sent = {r[0]: (r, p) for r, p in zip(rows, payloads, strict=True)}
        for r in await con.fetch(SELECT_EVENTS_BY_IDS, [str(r[0]) for r in rows]):
            if not _is_ours(r, *sent[r[0]]):
                raise _not_ours(r[0])  # an id that belonged to another event: a real conflict
            stored[r[0]] = Event(*r)
        if stored:
            kept = [i for i, r in enumerate(rows) if r[0] not in stored]
            if not kept:
                return [stored[r[0]] for r in rows]
            todo, todo_payloads = [pending[i] for i in kept], [payloads[i] for i in kept]
    source = _CopySource(todo, todo_payloads, now)
    try:
        await con.copy_to_table(COPY_TABLE, source=source, columns=COPY_COLUMNS, format="binary")
    except Exception as exc:
        if attempt == 1 or not _duplicate_id(exc):
            raise
        # The lost attempt's transaction committed only now (its backend outlived the connection):
        # not a real conflict. Retry; the next attempt reads those rows.
        raise SerializationConflictError(f"events of the batch were committed concurrently: {exc}") from exc
    written = source.written()
    if not stored:
        return written
    stored.update((e.id, e) for e in written)
    return [stored[r[0]] for r in _sent(pending)]


class _CopySource:
    """The data of one COPY, for asyncpg to send piece by piece (``chunk_ranges``): each piece is
    encoded when asked for, its rows without an id getting theirs first, while the server inserts
    the pieces already sent. The events as stored are built a piece behind, on the next request
    (the server is still inserting that piece), so only the last piece's are left to build once
    everything is sent."""

    __slots__ = ("_built", "_now", "_payloads", "_ranges", "_rows", "_sent_to", "_written")

    def __init__(self, rows: list[PendingRow], payloads: Sequence[bytes], now: dt.datetime | None) -> None:
        self._rows, self._payloads, self._now = rows, payloads, now
        self._ranges = chunk_ranges(len(rows))
        self._built: list[Event] = []
        self._sent_to = 0  # the rows before this one were sent (and have their ids)
        self._written: list[Event] | None = None

    def __aiter__(self) -> _CopySource:
        return self

    async def __anext__(self) -> bytes:
        piece = next(self._ranges, None)
        if piece is None:
            self.written()
            raise StopAsyncIteration
        start, end = piece
        data = copy_chunk(_complete(self._rows, start, end, self._now), self._payloads, start, end)
        self._build_to(start)
        self._sent_to = end
        return data

    def _build_to(self, end: int) -> None:
        """Build the events of the rows sent, up to ``end``, not built yet."""
        done = len(self._built)
        if end > done:
            rows = _sent(self._rows)
            self._built += _as_stored(rows[done:end], self._payloads[done:end])

    def written(self) -> list[Event]:
        """The events as stored, once the COPY succeeded (see ``_as_stored``)."""
        if self._written is None:
            self._build_to(self._sent_to)
            self._written = self._built
        return self._written


def _complete(rows: list[PendingRow], start: int, end: int, now: dt.datetime | None) -> list[EventRow]:
    """Give the rows ``start`` to ``end`` that have no id a new one and those without a timestamp
    ``now``, in place (one new tuple per row at the most): before they are first sent, so that
    every attempt sends the same. Returns ``rows``, typed as the EventRows that the rows up to
    ``end`` now are."""
    todo = [i for i in range(start, end) if rows[i][0] is None or rows[i][5] is None]
    if todo:
        ids = iter(new_ids(sum(1 for i in todo if rows[i][0] is None)))
        for i in todo:
            r = rows[i]
            rows[i] = (
                next(ids) if r[0] is None else r[0],
                r[1], r[2], r[3], r[4],
                now if r[5] is None else r[5],
                r[6], r[7], r[8], r[9],
            )  # fmt: skip
    return cast(list[EventRow], rows)


def _sent(rows: list[PendingRow]) -> list[EventRow]:
    """``rows`` once all of them were sent, each with its id."""
    return cast(list[EventRow], rows)


def _as_stored(rows: Sequence[EventRow], payloads: Sequence[bytes]) -> list[Event]:
    """Events just written, as stored (rows completed by ``_complete``): every value is what was
    sent (timestamps in UTC, as the database hands them back); the payload is decoded from the
    very JSON text sent (``p[1:]``, what follows jsonb's version byte: ``payload_json`` inlined).
    JSONB keeps its values; what a read may spell differently is key order (dict equality ignores
    it) and a float written with an exponent that is a whole number (1e+16 reads back as the equal
    int 10000000000000000)."""
    # tuple.__new__ builds each Event from its fields in order, without the Python-level __new__
    # of a NamedTuple, which binds ten arguments by name.
    loads, make = orjson.loads, tuple.__new__
    return [
        make(Event, (r[0], r[1], r[2], r[3], loads(p[1:]), r[5], r[6], r[7], r[8], r[9]))
        for r, p in zip(rows, payloads, strict=True)
    ]


def _duplicate_id(exc: Exception) -> bool:
    """Is ``exc`` (as the driver raised it) an event key that already exists? Judged on the error
    as core.errors maps it, the one place that reads driver errors. The server names the primary
    key of the partition that holds the row (events_p<start>_pkey)."""
    error = map_error(exc)
    name = error.constraint if isinstance(error, ConflictError) else None
    return name is not None and (
        name == _PRIMARY_KEY or (name.startswith("events_p") and name.endswith("_pkey"))
    )

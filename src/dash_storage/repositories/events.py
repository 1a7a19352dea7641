"""EventRepository: the append-only event log.

Writes are idempotent by client-generated id (UUIDv7), so creates are retried safely after a lost
connection. ``create_many`` writes a batch all or nothing: a small batch as one INSERT over arrays
(``unnest``, one round trip), a batch of ``COPY_MIN_BATCH`` events or more as one binary COPY
statement (see ``event_ingest.insert_prepared``; ``EventWriter`` batches concurrent creates
through it). Reads page with an opaque keyset cursor over ``("timestamp", id)``
(``EventRepository.cursor(event)``): a page never repeats a row, and never skips one that was
committed before the page was read, also when many events share one timestamp. It is not a feed:
a row that commits later with an earlier timestamp lies behind a reader already past it. To see
every event as it commits, exactly once, use ``follow()`` (``dash_storage.stream``).

Time windows (``since``/``until``) are half-open: ``since <= timestamp < until``.

The pieces: the fields of an event and their validation (``event_input``), the writes
(``event_ingest``, ``event_copy``), the filters of the reads (``event_filters``), the cursor
(``event_cursor``); the SQL is in ``sql/events.sql``.
"""

from __future__ import annotations

import builtins
import datetime as dt
import time
import uuid
import weakref
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any, Unpack

from dash_storage import sql
from dash_storage.core import validation as v
from dash_storage.core.errors import ValidationError
from dash_storage.core.models import Event, EventStats, EventTypeStats, Severity
from dash_storage.repositories import event_partitions as partitions
from dash_storage.repositories import event_rollups as rollups
from dash_storage.repositories.base import Repository
from dash_storage.repositories.event_cursor import decode_cursor, encode_cursor
from dash_storage.repositories.event_filters import EventFilters, check_filters, count_sql, select_sql
from dash_storage.repositories.event_ingest import SELECT_EVENT_BY_ID, insert_one, insert_prepared
from dash_storage.repositories.event_input import (
    EventFields,
    EventInput,
    check_event,
    events_of,
    make_event,
    prepare_batch,
)
from dash_storage.stream import cursors
from dash_storage.stream.follow import Follower, FollowOptions

__all__ = ["EventFields", "EventInput", "EventRepository"]

_last_rollup_check: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()

#: Largest ``hours`` window accepted by get_stats / delete_older_than (100 years).
MAX_HOURS = 24 * 366 * 100
#: Largest ``batch_size`` of delete_older_than.
MAX_DELETE_BATCH = 100_000

_Q = sql.load("events")
SELECT_STATS_24H = _Q["select_stats_24h"]
#: How often (seconds) get_stats checks, at most, whether the rollups lag far behind.
ROLLUP_CHECK_INTERVAL = 10.0


class EventRepository(Repository):
    """The event log: append (one or a batch), query with filters and cursor paging, stats, pruning."""

    __slots__ = ()

    @staticmethod
    def cursor(event: Event) -> str:
        """An opaque cursor positioned at ``event``, for ``find_by_filter(after=...)``."""
        return encode_cursor(event.timestamp, event.id)

    async def create(self, swarm_id: uuid.UUID | str, type: str, **fields: Unpack[EventFields]) -> Event:
        """Append one event; ``fields`` are any of ``EventFields`` (payload defaults to ``{}``,
        timestamp to the database clock, entity_type to "system", severity to "info").

        Raises NotFoundError naming the swarm or agent if it does not exist, ConflictError if the
        id exists.
        """
        row = check_event({"swarm_id": swarm_id, "type": type, **fields})
        return await insert_one(self.db, row, id_given=fields.get("id") is not None)

    async def create_many(self, events: Iterable[EventInput | Mapping[str, Any]]) -> builtins.list[Event]:
        """Append a batch, all or nothing; returns the events in input order, as stored.

        Each item is a mapping with the keyword arguments of ``create`` (see ``EventInput``). Every
        item is validated before any SQL (errors name e.g. ``events[3].type``). An id not given is
        generated before the event is first sent, and every retry after a lost connection sends
        that one, so each event is stored exactly once. A batch of
        ``event_ingest.COPY_MIN_BATCH`` or more goes through binary COPY, a smaller one is one
        INSERT statement. Timestamps not given are the database clock when the call is made, one
        value for the whole batch. At most ``event_input.MAX_BATCH`` items. A missing swarm or
        agent fails the batch with NotFoundError naming the first missing one (in input order);
        an existing id with ConflictError. A call that ends in CommandTimeoutError (or is
        cancelled) mid-write may or may not have stored its batch, whole or not at all: give ids
        yourself to find out (a repeated call then answers ConflictError for a stored batch).
        """
        # The database clock as this process knows it, if it needs no round trip (usually): each
        # event is then stamped as it is validated. Otherwise the write stamps them.
        rows, payloads, given = prepare_batch(events, partitions.ready(self.db, None))
        if not rows:
            return []
        return await insert_prepared(self.db, rows, payloads, given_ids=given)

    async def find_by_id(self, id: uuid.UUID | str) -> Event | None:
        """The event with this id, or None."""
        row = await self.db.fetchrow(SELECT_EVENT_BY_ID, _id(id), retry=True, replica=True)
        return make_event(Event, row[:]) if row is not None else None

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

        Page with ``after=EventRepository.cursor(last_event_of_previous_page)``: no row is repeated,
        and none that committed before a page was read is skipped. A row that commits later with an
        earlier (timestamp, id) than the cursor is not returned: timestamps are taken before commit,
        so this is a paging cursor, not a feed. To watch new events, use :meth:`follow`.
        ``types=[]`` matches nothing.
        """
        given = check_filters(swarm_id, agent_id, types, entity_type, severity, since, until)
        lim = v.check_limit(limit)
        direction = _direction(order)
        cursor = decode_cursor(after) if after is not None else None
        if given is None:
            return []
        filters, values = given
        params: list[Any] = [lim, *values]
        if cursor is not None:
            params.extend(cursor)
        statement = select_sql(filters, direction, cursor is not None)
        rows = await self.db.fetch(statement, *params, retry=True, replica=True)
        return events_of(rows)

    async def count(self, **filters: Unpack[EventFilters]) -> int:
        """Number of events matching every given filter (the filters of ``find_by_filter``)."""
        given = check_filters(**filters)
        if given is None:
            return 0
        names, values = given
        return int(await self.db.fetchval(count_sql(names), *values, retry=True, replica=True))

    async def get_stats(self, hours: float | Decimal = 24) -> EventStats:
        """Events of the last ``hours`` (database clock): total, by type, by severity (every severity,
        zero-filled), from one query, so the three always agree.

        Exact: equal to counting the raw events this call's snapshot sees. It reads the hourly and
        per-minute rollups plus at most a minute of raw events and those the rollups have not
        reached yet (``dash-db maintain`` keeps that part small; should it grow large, a call
        refreshes the rollups itself, at most every ``ROLLUP_CHECK_INTERVAL`` seconds)."""
        h = _hours(hours)
        rows = await rollups.counts(self.db, h * 3600.0)
        total = 0
        by_type: dict[str, int] = {}
        by_severity = {s.value: 0 for s in Severity}
        for g_type, g_severity, typ, sev, n in rows:
            if g_type and g_severity:
                total = int(n or 0)
            elif not g_type:
                by_type[typ] = int(n)  # type: ignore[index]
            else:
                by_severity[sev] = int(n)  # type: ignore[index]
        now = time.monotonic()
        if now - _last_rollup_check.get(self.db, -ROLLUP_CHECK_INTERVAL) >= ROLLUP_CHECK_INTERVAL:
            _last_rollup_check[self.db] = now
            await rollups.refresh_if_behind(self.db)
        return EventStats(hours=h, total=total, by_type=by_type, by_severity=by_severity)

    async def get_stats_24h(self) -> builtins.list[EventTypeStats]:
        """Rows of the ``event_stats_24h`` view, busiest type first."""
        rows = await self.db.fetch(SELECT_STATS_24H, retry=True, replica=True)
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

    def follow(self, **options: Unpack[FollowOptions]) -> Follower:
        """Every committed event exactly once, in commit-consistent order, as it commits.

        ``async with events.follow(...) as stream: async for event in stream: ...``; the stream's
        ``cursor`` (an opaque string) resumes right after the last event yielded. Starts from now,
        from the beginning (``from_start=True``), or after a cursor. See :class:`Follower`.
        """
        return Follower(self.db, **options)

    async def save_cursor(self, name: str, cursor: str) -> None:
        """Keep ``cursor`` in PostgreSQL under ``name`` (dash-db doctor shows how far behind it is)."""
        await cursors.save_cursor(self.db, name, cursor)

    async def load_cursor(self, name: str) -> str | None:
        """The cursor saved under ``name``, or None."""
        return await cursors.load_cursor(self.db, name)

    async def delete_older_than(self, cutoff: dt.datetime | float | Decimal, batch_size: int = 10_000) -> int:
        """Delete the events before ``cutoff`` (a datetime, or a number of hours before the
        database's now()) by dropping the partitions that lie wholly before it, with their rollups:
        never row by row, so nothing is left to vacuum. A partition only partly before the cutoff
        is kept until it lies wholly before it (``dash-db prune`` does the same). Returns the
        number of events deleted. ``batch_size`` is checked but no longer used."""
        if isinstance(cutoff, dt.datetime):
            when: dt.datetime | dt.timedelta = v.check_timestamp(cutoff, "cutoff")
        else:
            when = dt.timedelta(hours=_hours(cutoff, "cutoff"))
        v.check_int(batch_size, "batch_size", minimum=1, maximum=MAX_DELETE_BATCH)
        report = await partitions.prune(self.db, when)
        return report.events


def _id(value: Any, field: str = "id") -> uuid.UUID:
    result = v.check_uuid(value, field)
    assert result is not None
    return result


def _hours(value: Any, field: str = "hours") -> float:
    """A window length in hours: a finite, non-negative number (int, float or Decimal)."""
    return v.check_duration(value, field, maximum=MAX_HOURS, allow_zero=True)


_ORDERS = {"asc": "ASC", "desc": "DESC"}


def _direction(value: Any) -> str:
    direction = _ORDERS.get(value) if type(value) is str else None
    if direction is not None:
        return direction
    if isinstance(value, str) and value.lower() in ("asc", "desc"):
        return value.upper()
    raise ValidationError("order", f"must be 'asc' or 'desc', got {value!r}")

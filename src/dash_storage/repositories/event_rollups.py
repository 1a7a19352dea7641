"""Hourly and per-minute rollups of the event log: exact counts without reading every event.

The rollups are filled from the gap-free event stream (``dash_event_rollups_refresh``, see the
event_rollups migration): they hold exactly the events up to their position, and every read adds
the raw events after it that its snapshot sees, so answers are exact whenever they are read. The
refresh is what keeps that raw part small: ``dash-db maintain`` runs it, and a read that had to
count many raw events runs one itself, bounded and skipped when another session is already at it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from dash_storage import sql
from dash_storage.core.database import Database

__all__ = ["REFRESH_BATCH", "RollupState", "counts", "refresh", "state"]

_Q = sql.load("partitions")
REFRESH_ROLLUPS = _Q["refresh_rollups"]
SELECT_EVENT_COUNTS = _Q["select_event_counts"]
SELECT_ROLLUP_LAG = _Q["select_rollup_lag"]
SELECT_ROLLUP_POSITION = _Q["select_rollup_position"]

#: Events one refresh transaction adds at most.
REFRESH_BATCH = 50_000
#: A read that finds more events than this not rolled up yet refreshes the rollups.
REFRESH_THRESHOLD = 20_000


@dataclass(frozen=True, slots=True)
class RollupState:
    """How far the rollups have got: events not in them yet (counted up to ``limit``) and when
    their position last moved (None: never)."""

    behind: int
    limit: int
    updated_at: dt.datetime | None


async def refresh(db: Database, *, wait: bool = True, max_events: int | None = None) -> int | None:
    """Add the events past the rollups' position to them, in transactions of ``REFRESH_BATCH``,
    until none is left below the stream's mark (or ``max_events`` were added). Returns how many
    were added, or None if another session was refreshing and ``wait`` is false."""
    total = 0
    while max_events is None or total < max_events:
        size = REFRESH_BATCH if max_events is None else min(REFRESH_BATCH, max_events - total)
        added = await db.fetchval(REFRESH_ROLLUPS, size, wait, retry=True)
        if added is None:
            return None if total == 0 else total
        total += int(added)
        if added < size:
            break
    return total


async def counts(db: Database, seconds: float) -> list[tuple[int, int, str | None, str | None, int]]:
    """Events of the last ``seconds`` by type, by severity and in all (GROUPING flags first)."""
    rows = await db.fetch(SELECT_EVENT_COUNTS, seconds, retry=True)
    return [tuple(r) for r in rows]


async def state(db: Database, limit: int = 1_000_000) -> RollupState:
    behind = int(await db.fetchval(SELECT_ROLLUP_LAG, limit, retry=True))
    row = await db.fetchrow(SELECT_ROLLUP_POSITION, retry=True)
    return RollupState(behind=behind, limit=limit, updated_at=row[2] if row is not None else None)


async def refresh_if_behind(db: Database) -> None:
    """Refresh the rollups if more than ``REFRESH_THRESHOLD`` events wait (without waiting for
    another session that is refreshing them)."""
    behind = int(await db.fetchval(SELECT_ROLLUP_LAG, REFRESH_THRESHOLD + 1, retry=True))
    if behind > REFRESH_THRESHOLD:
        await refresh(db, wait=False)

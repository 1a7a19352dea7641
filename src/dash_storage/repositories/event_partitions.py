"""The time partitions of the event log: created before the events that need them, dropped whole.

``events`` is range-partitioned by ``timestamp`` with no default partition, so a partition must
exist before an event of its range is written. Each ``Database`` keeps the partitions' bounds in
memory (``PartitionMap``); before a write, ``cover`` checks every timestamp against them (a bisect,
no round trip) and creates whatever is missing first (``dash_event_partitions_ensure``, on its own
connection and transaction, so a caller's transaction never holds the DDL). It also keeps a week of
partitions ahead of the clock, so routine writing creates them before they are needed. A write
that still finds no partition (another process pruned it meanwhile) refreshes the map and is
retried once.

Timestamps left out are filled in before the first attempt: a retried create then repeats the
same key (id, timestamp) and finds the row its lost attempt wrote, in the same partition. The
value is the database clock, estimated from the client's clock and an offset measured against the
server, so it agrees with ``now()`` on the server without a round trip per write (never behind it,
at most one round trip ahead; measured again every ``CLOCK_MAX_AGE`` seconds).

Pruning drops whole partitions wholly older than the cutoff: marked, detached with DETACH ...
CONCURRENTLY (writers and readers go on), then, with the rollups of the same range, dropped.
"""

from __future__ import annotations

import bisect
import datetime as dt
import math
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from dash_storage import sql
from dash_storage.core.database import Database
from dash_storage.core.driver import message_is_missing_partition
from dash_storage.core.errors import DashStorageError

__all__ = [
    "AHEAD",
    "PartitionInfo",
    "PruneReport",
    "cover",
    "ensure_ahead",
    "list_partitions",
    "missing_partition",
    "now",
    "prune",
    "ready",
]

_Q = sql.load("partitions")
SELECT_PARTITIONS = _Q["select_partitions"]
ENSURE_PARTITIONS = _Q["ensure_partitions"]
SELECT_CLOCK = _Q["select_clock"]
SELECT_PARTITIONS_TO_PRUNE = _Q["select_partitions_to_prune"]
SELECT_CUTOFF = _Q["select_cutoff"]
SELECT_LEFTOVERS = _Q["select_leftovers"]
SELECT_DETACH_PENDING = _Q["select_detach_pending"]
COUNT_PARTITION_ROWS = _Q["count_partition_rows"]
LOCK_ROLLUPS = _Q["lock_rollups"]
DELETE_ROLLUPS_IN_RANGE = _Q["delete_rollups_in_range"]
STATEMENT = {k: _Q["statement_" + k] for k in ("comment", "detach", "finalize", "drop")}

#: How far ahead of the clock partitions are kept.
AHEAD = dt.timedelta(days=7)
#: Seconds after which the offset of the database clock is measured again (clocks drift).
CLOCK_MAX_AGE = 600.0
# Seconds a clock reading may take to count as precise (see _read_clock).
_CLOCK_PRECISION = 0.05
# Partitions are created again once fewer than this are left ahead of the clock.
_HALF_AHEAD = AHEAD / 2
#: The comment a prune puts on a partition before detaching it: a table left with it (the prune
#: was interrupted between detaching and dropping) is dropped by the next prune.
PRUNED_MARK = "dash: pruned event partition"


@dataclass(frozen=True, slots=True)
class PartitionInfo:
    """One partition of ``events``: its name, its range [lower, upper) and its size."""

    name: str
    lower: dt.datetime
    upper: dt.datetime
    total_bytes: int
    estimated_rows: int


@dataclass(frozen=True, slots=True)
class PruneReport:
    """What a prune dropped (or, with ``dry_run``, would drop)."""

    cutoff: dt.datetime
    dry_run: bool
    partitions: list[PartitionInfo]
    events: int
    bytes: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "cutoff": self.cutoff.isoformat(),
            "dry_run": self.dry_run,
            "events": self.events,
            "bytes": self.bytes,
            "partitions": [
                {
                    "name": p.name,
                    "from": p.lower.isoformat(),
                    "to": p.upper.isoformat(),
                    "bytes": p.total_bytes,
                }
                for p in self.partitions
            ],
        }


class PartitionMap:
    """What one Database knows of the partitions (their bounds, sorted) and of the server clock."""

    __slots__ = ("_clock_offset", "_clock_read", "_lowers", "_uppers", "width")

    def __init__(self, width: dt.timedelta) -> None:
        self.width = width
        self._lowers: list[dt.datetime] = []
        self._uppers: list[dt.datetime] = []
        self._clock_offset: float | None = None
        self._clock_read = -math.inf  # time.monotonic() of the offset's reading

    def clock_stale(self) -> bool:
        """Is the offset older than CLOCK_MAX_AGE (the two clocks may have drifted apart)?"""
        return time.monotonic() - self._clock_read > CLOCK_MAX_AGE

    def covered(self, ts: dt.datetime) -> bool:
        i = bisect.bisect_right(self._lowers, ts) - 1
        return i >= 0 and ts < self._uppers[i]

    def load(self, rows: Iterable[Any]) -> None:
        lowers, uppers = [], []
        for r in rows:
            lowers.append(r[1])
            uppers.append(r[2])
        self._lowers, self._uppers = lowers, uppers

    def now(self) -> dt.datetime:
        """The database clock, estimated (see the module's docstring)."""
        return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self._clock_offset or 0.0)


_maps: weakref.WeakKeyDictionary[Database, PartitionMap] = weakref.WeakKeyDictionary()


async def _map(db: Database) -> PartitionMap:
    found = _maps.get(db)
    if found is None:
        found = PartitionMap(db.settings.event_partition_size)
        await _refresh(db, found)
        _maps[db] = found
    return found


async def _refresh(db: Database, pmap: PartitionMap, points: Sequence[dt.datetime] = ()) -> None:
    """Create partitions for ``points`` (if any), then re-read every bound and the clock offset.
    Retried like any read: creating a partition that exists is a no-op."""
    if points:
        await db.fetchval(ENSURE_PARTITIONS, list(points), pmap.width, retry=True)
    await _read_clock(db, pmap)
    pmap.load(await db.fetch(SELECT_PARTITIONS, retry=True))


async def _read_clock(db: Database, pmap: PartitionMap) -> None:
    """Measure the offset of the database clock from this host's.

    The server reads its clock after the question was sent: matched with that moment, the
    estimate is never behind the server's clock (ahead by at most the time the answer took), so
    an event stamped after a statement ran is never stamped earlier than that statement's
    clock. A slow answer (a retry, a stall) is asked again, up to three times, and the quickest
    answer is kept."""
    best: tuple[float, float] | None = None  # (time the answer took, offset)
    for _ in range(3):
        sent = time.time()
        server = await db.fetchval(SELECT_CLOCK, retry=True)
        took = time.time() - sent
        if best is None or took < best[0]:
            best = (took, server.timestamp() - sent)
        if took < _CLOCK_PRECISION:
            break
    assert best is not None
    pmap._clock_offset = best[1]
    pmap._clock_read = time.monotonic()


async def now(db: Database) -> dt.datetime:
    """The database clock as the library stamps events with it (no round trip once known; read
    again when older than CLOCK_MAX_AGE)."""
    pmap = await _map(db)
    if pmap.clock_stale():
        await _read_clock(db, pmap)
    return pmap.now()


def ready(db: Database, ts: dt.datetime | None) -> dt.datetime | None:
    """The fast path of one event's ``now`` and ``cover``, with no await: the timestamp to write
    (``ts``, or the database clock if None) when the partitions this Database knows already hold
    it and the clock's half week ahead; None when ``cover`` must run first."""
    pmap = _maps.get(db)
    if pmap is None or pmap.clock_stale():
        return None
    clock = pmap.now()
    stamp = clock if ts is None else ts
    if pmap.covered(stamp) and pmap.covered(clock + _HALF_AHEAD):
        return stamp
    return None


async def cover(db: Database, timestamps: Iterable[dt.datetime]) -> None:
    """Make sure a partition holds each of ``timestamps`` (and a week ahead of the clock)."""
    pmap = await _map(db)
    missing = [ts for ts in timestamps if not pmap.covered(ts)]
    clock = pmap.now()
    if not (pmap.covered(clock) and pmap.covered(clock + _HALF_AHEAD)):
        missing.extend(_ahead(clock, pmap.width))
    if missing:
        await _refresh(db, pmap, missing)


async def cover_rows(db: Database, rows: Sequence[Sequence[Any]]) -> None:
    """``cover`` for the timestamps of validated event rows (field 5, set in every row)."""
    # A batch stamped by the library shares one datetime object: compared by identity first.
    common = rows[0][5]
    stamps: list[dt.datetime] = [common, *(ts for r in rows if (ts := r[5]) is not common)]
    low, high = min(stamps), max(stamps)
    pmap = await _map(db)
    if pmap.covered(low) and pmap.covered(high) and _same_partition(pmap, low, high):
        await cover(db, ())
    else:
        await cover(db, stamps)


def _same_partition(pmap: PartitionMap, low: dt.datetime, high: dt.datetime) -> bool:
    return bisect.bisect_right(pmap._lowers, low) == bisect.bisect_right(pmap._lowers, high)


async def forget(db: Database) -> None:
    """Re-read the partitions (after a write found none for its row)."""
    pmap = _maps.get(db)
    if pmap is not None:
        await _refresh(db, pmap)


def missing_partition(exc: BaseException) -> bool:
    """Did a write fail because no partition holds one of its rows (pruned by another process)?"""
    cause = exc.__cause__ if isinstance(exc, DashStorageError) else exc
    return cause is not None and message_is_missing_partition(cause)


def _ahead(clock: dt.datetime, width: dt.timedelta) -> list[dt.datetime]:
    points, at = [], clock - width
    while at <= clock + AHEAD:
        points.append(at)
        at += width
    return points


async def ensure_ahead(db: Database) -> int:
    """Create the partitions from the one before the clock to a week ahead; returns how many."""
    pmap = await _map(db)
    before = len(pmap._lowers)
    await _refresh(db, pmap, _ahead(pmap.now(), pmap.width))
    return len(pmap._lowers) - before


async def list_partitions(db: Database) -> list[PartitionInfo]:
    """Every partition of events, oldest first."""
    return [PartitionInfo(*r) for r in await db.fetch(SELECT_PARTITIONS, retry=True)]


async def cutoff_for(db: Database, older_than: dt.timedelta | dt.datetime) -> dt.datetime:
    """A cutoff: a datetime as given, or "now minus this long" on the database clock."""
    if isinstance(older_than, dt.datetime):
        return older_than
    value: dt.datetime = await db.fetchval(SELECT_CUTOFF, older_than.total_seconds(), retry=True)
    return value


async def prune(
    db: Database, older_than: dt.timedelta | dt.datetime, *, dry_run: bool = False
) -> PruneReport:
    """Drop every partition wholly older than the cutoff, with the rollups of its range.

    A partition that is only partly older than the cutoff stays until it is wholly older. Each
    partition goes on its own: the exact count of its events is read, it is marked and detached
    CONCURRENTLY (no lock that stops writers or readers), then dropped in one transaction with
    its rollups. Leftovers of an interrupted prune are finished first.
    """
    cutoff = await cutoff_for(db, older_than)
    if not dry_run:
        await _finish_interrupted(db)
    parts = [PartitionInfo(*r) for r in await db.fetch(SELECT_PARTITIONS_TO_PRUNE, cutoff, retry=True)]
    counts = [await db.fetchval(COUNT_PARTITION_ROWS, p.lower, p.upper, retry=True) for p in parts]
    if not dry_run:
        for p in parts:
            await _drop(db, p)
        pmap = _maps.get(db)
        if pmap is not None and parts:
            await _refresh(db, pmap)
    return PruneReport(
        cutoff=cutoff,
        dry_run=dry_run,
        partitions=parts,
        events=sum(int(c) for c in counts),
        bytes=sum(p.total_bytes for p in parts),
    )


async def _ddl(db: Database, kind: str, *args: Any) -> str:
    """The text of one DDL statement of a prune, its identifiers quoted by the server."""
    text: str = await db.fetchval(STATEMENT[kind], *args, retry=True)
    return text


async def _drop(db: Database, part: PartitionInfo) -> None:
    mark = f"{PRUNED_MARK} {part.lower.isoformat()} {part.upper.isoformat()}"
    await db.execute(await _ddl(db, "comment", part.name, mark))
    await _outside_transaction(db, await _ddl(db, "detach", part.name))
    await _drop_detached(db, part.name, part.lower, part.upper)


async def _outside_transaction(db: Database, statement: str) -> None:
    """Run ``statement`` on a dedicated connection: DETACH ... CONCURRENTLY refuses to run inside
    a transaction block, and must not go through a transaction-mode pooler."""
    con = await db.connect()
    try:
        await con.execute(statement)
    finally:
        await con.close()


async def _drop_detached(db: Database, name: str, lower: dt.datetime, upper: dt.datetime) -> None:
    drop = await _ddl(db, "drop", name)
    async with db.transaction() as con:
        await con.execute(LOCK_ROLLUPS)
        await con.execute(DELETE_ROLLUPS_IN_RANGE, lower, upper)
        await con.execute(drop)


async def _finish_interrupted(db: Database) -> None:
    """Finish the detaches and drops that an interrupted prune left behind."""
    for (name,) in await db.fetch(SELECT_DETACH_PENDING, retry=True):
        await _outside_transaction(db, await _ddl(db, "finalize", name))
    for name, mark in await db.fetch(SELECT_LEFTOVERS, retry=True):
        lower, upper = (dt.datetime.fromisoformat(s) for s in mark[len(PRUNED_MARK) + 1 :].split(" "))
        await _drop_detached(db, name, lower, upper)

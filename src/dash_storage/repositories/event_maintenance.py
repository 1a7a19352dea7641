"""The periodic upkeep of the event log, as ``dash-db maintain`` runs it from cron or a timer.

One run creates the partitions a week ahead, drops the partitions older than the retention (if one
is set) and brings the rollups up to date. Runs on several hosts at once are safe: each takes a
session advisory lock on a connection of its own, and a run that finds it taken does nothing and
says so. Nothing here blocks writers for longer than a moment (see ``event_partitions.prune``).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from dash_storage import sql
from dash_storage.core.database import Database
from dash_storage.repositories import event_partitions as partitions
from dash_storage.repositories import event_rollups as rollups

__all__ = ["MaintenanceReport", "maintain", "partitions_report"]

_Q = sql.load("partitions")
TRY_LOCK = _Q["try_lock_maintenance"]
UNLOCK = _Q["unlock_maintenance"]


@dataclass(frozen=True, slots=True)
class MaintenanceReport:
    """What one run did; ``skipped`` if another run held the lock."""

    skipped: bool
    partitions_created: int = 0
    pruned: partitions.PruneReport | None = None
    rolled_up: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "skipped": self.skipped,
            "partitions_created": self.partitions_created,
            "pruned": self.pruned.as_dict() if self.pruned is not None else None,
            "rolled_up": self.rolled_up,
        }


async def maintain(db: Database, *, retention: dt.timedelta | None = None) -> MaintenanceReport:
    """Create partitions ahead, prune past ``retention`` (None: keep everything), refresh rollups."""
    con = await db.connect()
    try:
        if not await con.fetchval(TRY_LOCK):
            return MaintenanceReport(skipped=True)
        try:
            created = await partitions.ensure_ahead(db)
            pruned = await partitions.prune(db, retention) if retention is not None else None
            rolled = await rollups.refresh(db) or 0
        finally:
            await con.fetchval(UNLOCK)
    finally:
        await con.close()
    return MaintenanceReport(skipped=False, partitions_created=created, pruned=pruned, rolled_up=rolled)


async def partitions_report(db: Database, retention: dt.timedelta | None) -> dict[str, Any]:
    """For dash-db doctor: the partitions (count, oldest, newest, size), the retention setting and
    how far the rollups lag behind."""
    parts = await partitions.list_partitions(db)
    lag = await rollups.state(db)
    return {
        "count": len(parts),
        "oldest": parts[0].lower.isoformat() if parts else None,
        "newest": parts[-1].upper.isoformat() if parts else None,
        "total_bytes": sum(p.total_bytes for p in parts),
        "estimated_rows": sum(p.estimated_rows for p in parts),
        "retention": _describe(retention),
        "rollups_behind": lag.behind,
        "rollups_behind_limit": lag.limit,
        "rollups_updated_at": lag.updated_at.isoformat() if lag.updated_at is not None else None,
    }


def _describe(retention: dt.timedelta | None) -> str:
    if retention is None:
        return "keep everything"
    hours = int(retention.total_seconds() // 3600)
    return f"{hours // 24} days" if hours % 24 == 0 else f"{hours} hours"

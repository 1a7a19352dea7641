"""Named places in the stream, kept in PostgreSQL (table ``stream_cursors``).

The Redis relay stores its place here after Redis has acknowledged a write; any follower may do
the same under a name of its own, and ``dash-db doctor`` shows how far behind each one is.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Final

from dash_storage import sql
from dash_storage.core import validation as v
from dash_storage.core.database import Database
from dash_storage.stream.position import decode

__all__ = ["CursorLag", "list_cursors", "load_cursor", "save_cursor", "stream_report"]

_Q = sql.load("stream")
SAVE_SQL: Final = _Q["save_cursor"]
LOAD_SQL: Final = _Q["load_cursor"]
LIST_SQL: Final = _Q["list_cursors"]
BACKLOG_SQL: Final = _Q["backlog"]
MARK_SQL: Final = _Q["mark"]
OLDEST_SQL: Final = _Q["oldest_open_transaction"]
NOW_SQL: Final = _Q["now"]
BACKLOG_CAP: Final = 1_000_000


@dataclass(frozen=True, slots=True)
class CursorLag:
    name: str
    cursor: str
    updated_at: dt.datetime
    behind: int  # events not yet received (at most BACKLOG_CAP)
    oldest_behind: dt.datetime | None  # time of the oldest of them


def _name(name: object) -> str:
    return v.check_text(name, "name", max_length=200, allow_empty=False)


async def save_cursor(db: Database, name: str, cursor: str) -> None:
    """Remember ``cursor`` under ``name`` (an upsert; retried safely)."""
    decode(cursor, field="cursor")
    await db.execute(SAVE_SQL, _name(name), cursor, retry=True)


async def load_cursor(db: Database, name: str) -> str | None:
    """The cursor saved under ``name``, or None."""
    value = await db.fetchval(LOAD_SQL, _name(name), retry=True)
    return str(value) if value is not None else None


async def list_cursors(db: Database) -> list[CursorLag]:
    """Every saved cursor with how far behind the log it is."""
    out = []
    for row in await db.fetch(LIST_SQL, retry=True):
        pos = decode(row["position"], field="cursor")
        lag = await db.fetchrow(BACKLOG_SQL, str(pos.tx_id), pos.seq, BACKLOG_CAP, retry=True)
        assert lag is not None
        out.append(CursorLag(row["name"], row["position"], row["updated_at"], lag["events"], lag["oldest"]))
    return out


async def stream_report(db: Database) -> dict[str, Any]:
    """What holds the stream back and how far behind the saved readers are (for dash-db doctor).

    ``oldest_open_transaction``: the open transaction with an id that started first, anywhere on
    the server; while it stays open no follower gets past it.
    """
    report: dict[str, Any] = {"mark": int(await db.fetchval(MARK_SQL, retry=True))}
    oldest = await db.fetchrow(OLDEST_SQL, retry=True)
    report["oldest_open_transaction"] = (
        None
        if oldest is None
        else {
            "age_s": round(oldest["age"].total_seconds(), 3),
            "pid": oldest["pid"],
            "database": oldest["datname"],
            "application": oldest["application_name"],
            "state": oldest["state"],
            "query": oldest["query"],
        }
    )
    report["cursors"] = [
        {
            "name": c.name,
            "behind": c.behind,
            "oldest_behind_s": None
            if c.oldest_behind is None
            else round((now - c.oldest_behind).total_seconds(), 3),
            "updated_at": c.updated_at,
        }
        for now in [await db.fetchval(NOW_SQL, retry=True)]
        for c in await list_cursors(db)
    ]
    return report

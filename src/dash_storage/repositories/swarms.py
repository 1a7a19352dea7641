"""SwarmRepository: swarms and the ``swarm_summary`` view.

Swarm statuses are not a guarded state machine (unlike agents): any valid status may follow any
other. ``update_status`` keeps ``completed_at`` consistent with the status: it is stamped with the
database clock the first time the swarm reaches completed / failed / destroyed and cleared when the
swarm moves back to a non-final status (it is running again, so it has not completed).
"""

from __future__ import annotations

import builtins
import datetime as dt
import functools
import uuid
from dataclasses import fields
from typing import Any

from dash_storage.core import validation as v
from dash_storage.core.database import Connection
from dash_storage.core.errors import ConflictError, ValidationError
from dash_storage.core.ids import new_id
from dash_storage.core.models import SWARM_COLUMNS, UNSET, Swarm, SwarmStatus, SwarmSummary, Unset
from dash_storage.repositories.base import Repository, written_by_us

__all__ = ["FINAL_SWARM_STATUSES", "SWARM_ORDER_COLUMNS", "SwarmRepository"]

SWARM_STATUSES = frozenset(s.value for s in SwarmStatus)
#: Statuses that stamp ``completed_at`` in ``update_status``.
FINAL_SWARM_STATUSES = frozenset({"completed", "failed", "destroyed"})
#: Public ``order_by`` names of ``list`` -> SQL column (a fixed allow-list, never input).
SWARM_ORDER_COLUMNS = {
    "created_at": "created_at",
    "updated_at": "updated_at",
    "name": "name",
    "status": "status",
}
SUMMARY_COLUMNS = ", ".join(f.name for f in fields(SwarmSummary))

# Idempotent create: a retried attempt finds its own row instead of inserting a second one.
INSERT_SWARM = f"""
INSERT INTO swarms (id, name, config, status) VALUES ($1, $2, $3, $4)
ON CONFLICT (id) DO NOTHING
RETURNING {SWARM_COLUMNS}
"""  # noqa: S608
# One swarm by primary key.
SELECT_SWARM_BY_ID = f"SELECT {SWARM_COLUMNS} FROM swarms WHERE id = $1"  # noqa: S608
# The most recently created swarm with a name (names are not unique; newest wins, ties by id).
SELECT_SWARM_BY_NAME = f"""
SELECT {SWARM_COLUMNS} FROM swarms WHERE name = $1 ORDER BY created_at DESC, id DESC LIMIT 1
"""  # noqa: S608
# Template of list(): {where}, {order}, {direction} are filled only from fixed fragments in code.
LIST_SWARMS_TEMPLATE = f"""
SELECT {SWARM_COLUMNS} FROM swarms{{where}}
ORDER BY {{order}} {{direction}}, id {{direction}} LIMIT $1 OFFSET $2
"""  # noqa: S608
# Number of swarms.
COUNT_SWARMS = "SELECT count(*) FROM swarms"
# Number of swarms with one status.
COUNT_SWARMS_BY_STATUS = "SELECT count(*) FROM swarms WHERE status = $1"
# Whether a swarm exists.
SWARM_EXISTS = "SELECT EXISTS (SELECT 1 FROM swarms WHERE id = $1)"
# Template of update(): {assignments} is built from the fixed column list UPDATABLE_COLUMNS.
UPDATE_SWARM_TEMPLATE = f"""
UPDATE swarms SET {{assignments}} WHERE id = $1 RETURNING {SWARM_COLUMNS}
"""  # noqa: S608
# Status change; completed_at is stamped once on reaching a final status, cleared when leaving it.
UPDATE_SWARM_STATUS = f"""
UPDATE swarms SET
    status = $2,
    completed_at = CASE WHEN $2 = ANY($3::text[]) THEN COALESCE(completed_at, now()) ELSE NULL END
WHERE id = $1
RETURNING {SWARM_COLUMNS}
"""  # noqa: S608
# Delete one swarm (agents, events and budgets cascade).
DELETE_SWARM = "DELETE FROM swarms WHERE id = $1 RETURNING 1"
# One row of the swarm_summary view.
SELECT_SUMMARY = f"SELECT {SUMMARY_COLUMNS} FROM swarm_summary WHERE id = $1"  # noqa: S608
# Rows of the swarm_summary view, newest swarm first.
LIST_SUMMARIES = f"""
SELECT {SUMMARY_COLUMNS} FROM swarm_summary ORDER BY created_at DESC, id DESC LIMIT $1 OFFSET $2
"""  # noqa: S608
# Rows of the swarm_summary view with one status, newest swarm first.
LIST_SUMMARIES_BY_STATUS = f"""
SELECT {SUMMARY_COLUMNS} FROM swarm_summary WHERE status = $3
ORDER BY created_at DESC, id DESC LIMIT $1 OFFSET $2
"""  # noqa: S608

#: Columns ``update`` may set, in the order their parameters are numbered.
UPDATABLE_COLUMNS = ("name", "config", "status", "completed_at")
_FINAL = sorted(FINAL_SWARM_STATUSES)


@functools.lru_cache(maxsize=64)
def _list_sql(with_status: bool, order: str, direction: str) -> str:
    where = " WHERE status = $3" if with_status else ""
    return LIST_SWARMS_TEMPLATE.format(where=where, order=order, direction=direction)


@functools.lru_cache(maxsize=64)
def _update_sql(columns: tuple[str, ...]) -> str:
    assert all(c in UPDATABLE_COLUMNS for c in columns)
    assignments = ", ".join(f"{c} = ${i}" for i, c in enumerate(columns, start=2))
    return UPDATE_SWARM_TEMPLATE.format(assignments=assignments)


def _id(value: Any, field: str = "id") -> uuid.UUID:
    result = v.check_uuid(value, field)
    assert result is not None
    return result


def _name(value: Any) -> str:
    result = v.check_text(value, "name", allow_empty=False)
    assert result is not None
    return result


def _status(value: Any, field: str = "status") -> str:
    result = v.check_choice(value, SWARM_STATUSES, field)
    assert result is not None
    return result


class SwarmRepository(Repository):
    """Swarms: create, read, list, update, delete, and the per-swarm summary view."""

    __slots__ = ()

    async def create(
        self,
        name: str,
        config: dict[str, Any] | None = None,
        status: str = "creating",
        *,
        id: uuid.UUID | str | None = None,
    ) -> Swarm:
        """Insert a swarm (with ``id`` if given, else a new UUIDv7). Raises ConflictError if the id exists."""
        swarm_id = v.check_uuid(id, "id", optional=True) or new_id()
        name = _name(name)
        cfg = v.check_json_object(config, "config", optional=True)
        status = _status(status)
        args = (swarm_id, name, cfg if cfg is not None else {}, status)

        async def insert(con: Connection, attempt: int) -> Swarm:
            row = await con.fetchrow(INSERT_SWARM, *args)
            if row is None:
                if attempt > 1:  # our own row, written by an attempt whose answer was lost
                    row = await con.fetchrow(SELECT_SWARM_BY_ID, swarm_id)
                    if row is not None and not written_by_us(row, {"name": args[1], "config": args[2]}):
                        row = None  # another swarm already had this id
                if row is None:
                    raise ConflictError(f"swarm {swarm_id} already exists", constraint="swarms_pkey")
            return Swarm(*row)

        return await self.db.run(insert, retry=True)

    async def find_by_id(self, id: uuid.UUID | str) -> Swarm | None:
        """The swarm with this id, or None."""
        row = await self.db.fetchrow(SELECT_SWARM_BY_ID, _id(id), retry=True)
        return Swarm(*row) if row is not None else None

    async def find_by_name(self, name: str) -> Swarm | None:
        """The most recently created swarm with this exact name, or None.

        Names are not unique; ties on ``created_at`` are broken by the (time-ordered) id, newest first.
        """
        row = await self.db.fetchrow(SELECT_SWARM_BY_NAME, _name(name), retry=True)
        return Swarm(*row) if row is not None else None

    async def list(
        self,
        status: str | None = None,
        limit: int | None = None,
        offset: int | None = None,
        order_by: str = "created_at",
        order_direction: str = "desc",
    ) -> builtins.list[Swarm]:
        """Swarms, optionally of one status, ordered by created_at, updated_at, name or status, then id."""
        st = v.check_choice(status, SWARM_STATUSES, "status", optional=True)
        lim = v.check_limit(limit)
        off = v.check_offset(offset)
        order = v.check_order(order_by, SWARM_ORDER_COLUMNS, default="created_at")
        direction = v.check_direction(order_direction)
        sql = _list_sql(st is not None, order, direction)
        args: tuple[Any, ...] = (lim, off) if st is None else (lim, off, st)
        rows = await self.db.fetch(sql, *args, retry=True)
        return [Swarm(*r) for r in rows]

    async def count(self, status: str | None = None) -> int:
        """Number of swarms, optionally of one status."""
        st = v.check_choice(status, SWARM_STATUSES, "status", optional=True)
        if st is None:
            return int(await self.db.fetchval(COUNT_SWARMS, retry=True))
        return int(await self.db.fetchval(COUNT_SWARMS_BY_STATUS, st, retry=True))

    async def exists(self, id: uuid.UUID | str) -> bool:
        """Whether a swarm with this id exists."""
        return bool(await self.db.fetchval(SWARM_EXISTS, _id(id), retry=True))

    async def update(
        self,
        id: uuid.UUID | str,
        *,
        name: str | Unset = UNSET,
        config: dict[str, Any] | Unset = UNSET,
        status: str | Unset = UNSET,
        completed_at: dt.datetime | Unset | None = UNSET,
    ) -> Swarm | None:
        """Set the given fields (``completed_at=None`` clears it); None if the swarm does not exist.

        Sets exactly what is given: use ``update_status`` to have ``completed_at`` follow the status.
        """
        swarm_id = _id(id)
        columns: list[str] = []
        values: list[Any] = []
        if name is not UNSET:
            columns.append("name")
            values.append(_name(name))
        if config is not UNSET:
            if config is None:
                raise ValidationError("config", "must be a JSON object (dict), got NoneType")
            columns.append("config")
            values.append(v.check_json_object(config, "config"))
        if status is not UNSET:
            columns.append("status")
            values.append(_status(status))
        if completed_at is not UNSET:
            columns.append("completed_at")
            values.append(v.check_timestamp(completed_at, "completed_at", optional=True))
        if not columns:
            return await self.find_by_id(swarm_id)
        row = await self.db.fetchrow(_update_sql(tuple(columns)), swarm_id, *values, retry=True)
        return Swarm(*row) if row is not None else None

    async def update_status(self, id: uuid.UUID | str, status: str) -> Swarm | None:
        """Change the status; completed / failed / destroyed stamp ``completed_at`` (once, DB clock).

        Moving back to any other status clears ``completed_at``. None if the swarm does not exist.
        """
        swarm_id = _id(id)
        st = _status(status)
        row = await self.db.fetchrow(UPDATE_SWARM_STATUS, swarm_id, st, _FINAL, retry=True)
        return Swarm(*row) if row is not None else None

    async def delete(self, id: uuid.UUID | str) -> bool:
        """Delete a swarm and (by cascade) its agents, events and budgets. True if it existed."""
        return await self.db.fetchval(DELETE_SWARM, _id(id), retry=True) is not None

    async def get_summary(self, id: uuid.UUID | str) -> SwarmSummary | None:
        """The swarm_summary row of one swarm (agent counts, swarm budget), or None."""
        row = await self.db.fetchrow(SELECT_SUMMARY, _id(id), retry=True)
        return SwarmSummary(*row) if row is not None else None

    async def list_summaries(
        self, status: str | None = None, limit: int | None = None, offset: int | None = None
    ) -> builtins.list[SwarmSummary]:
        """swarm_summary rows (one per swarm), newest swarm first, optionally of one status."""
        st = v.check_choice(status, SWARM_STATUSES, "status", optional=True)
        lim = v.check_limit(limit)
        off = v.check_offset(offset)
        if st is None:
            rows = await self.db.fetch(LIST_SUMMARIES, lim, off, retry=True)
        else:
            rows = await self.db.fetch(LIST_SUMMARIES_BY_STATUS, lim, off, st, retry=True)
        return [SwarmSummary(*r) for r in rows]

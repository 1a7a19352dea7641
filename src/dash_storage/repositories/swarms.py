"""SwarmRepository: swarms and the ``swarm_summary`` view.

Swarm statuses are not a guarded state machine (unlike agents): any valid status may follow any
other. ``update_status`` keeps ``completed_at`` consistent with the status: it is stamped with the
database clock the first time the swarm reaches completed / failed / destroyed and cleared when the
swarm moves back to a non-final status (it is running again, so it has not completed).
"""

from __future__ import annotations

import builtins
import datetime as dt
import uuid
from typing import Any

from dash_storage import sql
from dash_storage.core import validation as v
from dash_storage.core.ids import new_id
from dash_storage.core.models import UNSET, Swarm, SwarmStatus, SwarmSummary, Unset
from dash_storage.repositories.base import ListReads, Repository, given, values_of

__all__ = ["FINAL_SWARM_STATUSES", "SWARM_ORDER_COLUMNS", "SwarmRepository", "statements"]

SWARM_STATUSES = values_of(SwarmStatus)
#: Statuses that stamp ``completed_at`` in ``update_status``.
FINAL_SWARM_STATUSES = frozenset({"completed", "failed", "destroyed"})
#: Public ``order_by`` names of ``list`` -> SQL column, the same name (a fixed allow-list, never input).
SWARM_ORDER_COLUMNS = {column: column for column in ("created_at", "updated_at", "name", "status")}

# The statements, in the order of the methods that send them.
_Q = sql.load("swarms")
INSERT_SWARM = _Q["insert"]
SELECT_SWARM_BY_ID = _Q["find_by_id"]
SELECT_SWARM_BY_NAME = _Q["find_by_name"]
_LISTS = ListReads(_Q, "part_list", SWARM_ORDER_COLUMNS)
#: The reads of list() per (order column, direction): of every swarm, and of one status.
LIST_SWARMS = _LISTS.form("list_by")
LIST_SWARMS_OF_STATUS = _LISTS.form("list_of_status_by", "part_of_status")
#: Every statement composed here, by name: ``statements()`` (the statement registry PREPAREs each).
statements = _LISTS.statements
COUNT_SWARMS = _Q["count"]
COUNT_SWARMS_BY_STATUS = _Q["count_by_status"]
SWARM_EXISTS = _Q["exists"]
UPDATE_SWARM = _Q["update"]
#: The final statuses, as the parameter of UPDATE_SWARM_STATUS.
_FINAL = sorted(FINAL_SWARM_STATUSES)
UPDATE_SWARM_STATUS = _Q["update_status"]
DELETE_SWARM = _Q["delete"]
SELECT_SUMMARY = _Q["summary"]
LIST_SUMMARIES = _Q["list_summaries"]
LIST_SUMMARIES_BY_STATUS = _Q["list_summaries_by_status"]


def _name(value: Any) -> str:
    return v.check_text(value, "name", allow_empty=False)


def _status(value: Any, field: str = "status") -> str:
    return v.check_choice(value, SWARM_STATUSES, field)


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
        cfg = cfg if cfg is not None else {}
        args = (swarm_id, name, cfg, status)
        return await self._create(
            Swarm, INSERT_SWARM, SELECT_SWARM_BY_ID, args, {"name": name, "config": cfg}, "swarm"
        )

    async def find_by_id(self, id: uuid.UUID | str) -> Swarm | None:
        """The swarm with this id, or None."""
        return await self._one(Swarm, SELECT_SWARM_BY_ID, v.check_uuid(id, "id"), replica=True)

    async def find_by_name(self, name: str) -> Swarm | None:
        """The most recently created swarm with this exact name, or None.

        Names are not unique; ties on ``created_at`` are broken by the (time-ordered) id, newest first.
        """
        return await self._one(Swarm, SELECT_SWARM_BY_NAME, _name(name), replica=True)

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
        if st is None:
            return await self._many(Swarm, LIST_SWARMS[order, direction], lim, off)
        return await self._many(Swarm, LIST_SWARMS_OF_STATUS[order, direction], lim, off, st)

    async def count(self, status: str | None = None) -> int:
        """Number of swarms, optionally of one status."""
        st = v.check_choice(status, SWARM_STATUSES, "status", optional=True)
        if st is None:
            return int(await self.db.fetchval(COUNT_SWARMS, retry=True, replica=True))
        return int(await self.db.fetchval(COUNT_SWARMS_BY_STATUS, st, retry=True, replica=True))

    async def exists(self, id: uuid.UUID | str) -> bool:
        """Whether a swarm with this id exists."""
        return bool(await self.db.fetchval(SWARM_EXISTS, v.check_uuid(id, "id"), retry=True, replica=True))

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
        swarm_id = v.check_uuid(id, "id")
        fields = (
            given(name, _name),
            given(config, lambda x: v.check_json_object(x, "config")),
            given(status, _status),
            given(completed_at, lambda x: v.check_timestamp(x, "completed_at", optional=True)),
        )
        return await self._update(Swarm, UPDATE_SWARM, SELECT_SWARM_BY_ID, swarm_id, *fields)

    async def update_status(self, id: uuid.UUID | str, status: str) -> Swarm | None:
        """Change the status; completed / failed / destroyed stamp ``completed_at`` (once, DB clock).

        Moving back to any other status clears ``completed_at``. None if the swarm does not exist.
        """
        swarm_id = v.check_uuid(id, "id")
        st = _status(status)
        return await self._one(Swarm, UPDATE_SWARM_STATUS, swarm_id, st, _FINAL)

    async def delete(self, id: uuid.UUID | str) -> bool:
        """Delete a swarm and (by cascade) its agents, events and budgets. True if it existed."""
        return await self.db.fetchval(DELETE_SWARM, v.check_uuid(id, "id"), retry=True) is not None

    async def get_summary(self, id: uuid.UUID | str) -> SwarmSummary | None:
        """The swarm_summary row of one swarm (agent counts, swarm budget), or None."""
        return await self._one(SwarmSummary, SELECT_SUMMARY, v.check_uuid(id, "id"), replica=True)

    async def list_summaries(
        self, status: str | None = None, limit: int | None = None, offset: int | None = None
    ) -> builtins.list[SwarmSummary]:
        """swarm_summary rows (one per swarm), newest swarm first, optionally of one status."""
        st = v.check_choice(status, SWARM_STATUSES, "status", optional=True)
        lim = v.check_limit(limit)
        off = v.check_offset(offset)
        if st is None:
            return await self._many(SwarmSummary, LIST_SUMMARIES, lim, off)
        return await self._many(SwarmSummary, LIST_SUMMARIES_BY_STATUS, lim, off, st)

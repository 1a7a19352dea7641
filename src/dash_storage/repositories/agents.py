"""AgentRepository: agents, their state transitions and the ``agent_activity`` view.

State changes (``update_status``, ``update_lifecycle_state``, ``pause``, ``resume``) are guarded
by the agent's state machine: see ``agent_transitions``, which runs them.

``increment_retry(id)`` adds one, relative to whatever is stored: it is never retried on a lost
connection, since it could apply twice. ``increment_retry(id, expected=n)`` is a compare-and-set
(n -> n + 1, ConflictError if the count is no longer n) and is retried: it runs in a transaction
whose id it learns before COMMIT, so that a retry after a lost COMMIT answer asks the server whether
that transaction committed (``pg_xact_status``) instead of guessing from the count, which another
caller may have moved.
"""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from dash_storage import sql
from dash_storage.core import validation as v
from dash_storage.core.database import Connection
from dash_storage.core.errors import ConflictError, ValidationError
from dash_storage.core.ids import new_id
from dash_storage.core.models import UNSET, Agent, AgentActivity, AgentStatus, Unset
from dash_storage.repositories import agent_transitions as transitions
from dash_storage.repositories.agent_transitions import (
    AGENT_LIFECYCLE_TRANSITIONS,
    AGENT_STATUS_TRANSITIONS,
    AGENT_STATUSES,
    FINAL_AGENT_STATUSES,
    LIFECYCLE_STATES,
    PAUSABLE_STATUSES,
    RESUMABLE_STATUSES,
    SELECT_AGENT_BY_ID,
)
from dash_storage.repositories.base import ListReads, Repository, given

__all__ = [
    "AGENT_LIFECYCLE_TRANSITIONS",
    "AGENT_ORDER_COLUMNS",
    "AGENT_STATUS_TRANSITIONS",
    "FINAL_AGENT_STATUSES",
    "PAUSABLE_STATUSES",
    "RESUMABLE_STATUSES",
    "AgentRepository",
    "statements",
]

#: Public ``order_by`` names of ``list`` -> SQL column, the same name (a fixed allow-list, never input).
AGENT_ORDER_COLUMNS = {column: column for column in ("spawned_at", "updated_at", "status", "label")}
#: The final statuses, as the parameter of INSERT_AGENT (a final initial status stamps completed_at).
_FINAL = sorted(FINAL_AGENT_STATUSES)
#: The filters of list() and count() other than the swarm, when none is given.
_NO_FILTER = (None, None, None)

# The statements, in the order of the methods that send them.
_Q = sql.load("agents")
INSERT_AGENT = _Q["insert"]
SELECT_AGENTS_BY_SWARM = _Q["find_by_swarm"]
_LISTS = ListReads(_Q, "part_list", AGENT_ORDER_COLUMNS)
#: The reads of list() per (order column, direction): of every agent, of those matching filters,
#: and of one swarm.
LIST_AGENTS = _LISTS.form("list_by")
LIST_AGENTS_WHERE = _LISTS.form("list_where_by", "part_filters")
LIST_AGENTS_IN_SWARM = _LISTS.form("list_in_swarm_by", "part_in_swarm", "part_filters")
COUNT_ALL = _Q["count_all"]
#: The counts of the same filters, and within one swarm.
COUNT_WHERE = _LISTS.count("count_where", "part_count", "part_filters")
COUNT_OF_SWARM = _Q["count_of_swarm"]
COUNT_IN_SWARM_WHERE = _LISTS.count("count_in_swarm_where", "part_count", "part_in_swarm", "part_filters")
#: Every statement composed here, by name: ``statements()`` (the statement registry PREPAREs each).
statements = _LISTS.statements
COUNT_BY_STATUS = _Q["count_by_status"]
COUNT_BY_STATUS_IN_SWARM = _Q["count_by_status_in_swarm"]
UPDATE_AGENT = _Q["update"]
INCREMENT_RETRY = _Q["increment_retry"]
INCREMENT_RETRY_IF = _Q["increment_retry_if"]
LOCK_AGENT = _Q["lock"]
XACT_STATUS = _Q["xact_status"]
SELECT_ACTIVITY = _Q["activity"]
SELECT_ACTIVITY_OF_SWARM = _Q["activity_of_swarm"]
SELECT_ACTIVITY_OF_AGENT = _Q["activity_of_agent"]
DELETE_AGENT = _Q["delete"]
DELETE_AGENTS_BY_SWARM = _Q["delete_by_swarm"]


def _required(value: Any, field: str) -> Any:
    if value is None:
        raise ValidationError(field, "must not be None (the column is not nullable)")
    return value


# Per-column validators for create/update; each returns the value the driver wants. In the order
# of the fields of the statement "update".
_VALIDATORS: dict[str, Callable[[Any], Any]] = {
    "label": lambda x: v.check_text(x, "label", optional=True),
    "model": lambda x: v.check_text(x, "model", optional=True),
    "task": lambda x: v.check_text(x, "task", max_length=v.LONG_TEXT, optional=True),
    "config": lambda x: v.check_json_object(_required(x, "config"), "config"),
    "context": lambda x: v.check_json(x, "context", optional=True),
    "code": lambda x: v.check_json(x, "code", optional=True),
    "reasoning": lambda x: v.check_json(x, "reasoning", optional=True),
    "safety_boundaries": lambda x: v.check_json(x, "safety_boundaries", optional=True),
    "max_retries": lambda x: v.check_int(x, "max_retries", maximum=v.INT_MAX),
    "budget_limit": lambda x: v.check_money(x, "budget_limit", optional=True),
    "metadata": lambda x: v.check_json_object(_required(x, "metadata"), "metadata"),
    "last_error": lambda x: v.check_text(x, "last_error", max_length=v.LONG_TEXT, optional=True),
    "runtime": lambda x: v.check_int(x, "runtime"),
}


class AgentRepository(Repository):
    """Agents: create, read, list, counts, updates, guarded state transitions, activity view."""

    __slots__ = ()

    async def create(
        self,
        swarm_id: uuid.UUID | str,
        *,
        model: str | None = None,
        task: str | None = None,
        label: str | None = None,
        config: dict[str, Any] | None = None,
        context: Any = None,
        code: Any = None,
        reasoning: Any = None,
        safety_boundaries: Any = None,
        max_retries: int = 3,
        budget_limit: Decimal | int | float | str | None = None,
        metadata: dict[str, Any] | None = None,
        status: str = "pending",
        lifecycle_state: str = "initializing",
        id: uuid.UUID | str | None = None,
    ) -> Agent:
        """Insert an agent. NotFoundError if the swarm is missing, ConflictError if the id exists.

        Zero is a value: ``max_retries=0`` and ``budget_limit=0`` are stored as given.
        """
        agent_id = v.check_uuid(id, "id", optional=True) or new_id()
        swarm = v.check_uuid(swarm_id, "swarm_id")
        st = v.check_choice(status, AGENT_STATUSES, "status")
        ls = v.check_choice(lifecycle_state, LIFECYCLE_STATES, "lifecycle_state")
        cfg = v.check_json_object(config, "config", optional=True)
        meta = v.check_json_object(metadata, "metadata", optional=True)
        args = (
            agent_id,
            swarm,
            _VALIDATORS["label"](label),
            st,
            ls,
            _VALIDATORS["model"](model),
            _VALIDATORS["task"](task),
            cfg if cfg is not None else {},
            _VALIDATORS["context"](context),
            _VALIDATORS["code"](code),
            _VALIDATORS["reasoning"](reasoning),
            _VALIDATORS["safety_boundaries"](safety_boundaries),
            _VALIDATORS["max_retries"](max_retries),
            _VALIDATORS["budget_limit"](budget_limit),
            meta if meta is not None else {},
            _FINAL,
        )
        ours = {"swarm_id": swarm, "label": args[2], "model": args[5], "task": args[6]}
        return await self._create(
            Agent, INSERT_AGENT, SELECT_AGENT_BY_ID, args, ours, "agent", {"swarm": swarm}
        )

    async def find_by_id(self, id: uuid.UUID | str) -> Agent | None:
        """The agent with this id, or None."""
        return await self._one(Agent, SELECT_AGENT_BY_ID, v.check_uuid(id, "id"), replica=True)

    async def find_by_swarm_id(
        self, swarm_id: uuid.UUID | str, limit: int | None = None, offset: int | None = None
    ) -> builtins.list[Agent]:
        """Agents of one swarm in spawn order (oldest first, ties by id)."""
        swarm = v.check_uuid(swarm_id, "swarm_id")
        lim = v.check_limit(limit)
        off = v.check_offset(offset)
        return await self._many(Agent, SELECT_AGENTS_BY_SWARM, swarm, lim, off)

    @staticmethod
    def _filters(
        swarm_id: Any, status: Any, lifecycle_state: Any, model: Any
    ) -> tuple[uuid.UUID | None, tuple[str | None, str | None, str | None]]:
        """The swarm (None = every swarm), and status, lifecycle state and model (None = any)."""
        swarm = v.check_uuid(swarm_id, "swarm_id", optional=True)
        st = v.check_choice(status, AGENT_STATUSES, "status", optional=True)
        ls = v.check_choice(lifecycle_state, LIFECYCLE_STATES, "lifecycle_state", optional=True)
        return swarm, (st, ls, v.check_text(model, "model", optional=True))

    async def list(
        self,
        swarm_id: uuid.UUID | str | None = None,
        status: str | None = None,
        lifecycle_state: str | None = None,
        model: str | None = None,
        limit: int | None = None,
        offset: int | None = None,
        order_by: str = "spawned_at",
        order_direction: str = "desc",
    ) -> builtins.list[Agent]:
        """Agents matching every given filter, by spawned_at, updated_at, status or label, then id."""
        swarm, values = self._filters(swarm_id, status, lifecycle_state, model)
        lim = v.check_limit(limit)
        off = v.check_offset(offset)
        order = v.check_order(order_by, AGENT_ORDER_COLUMNS, default="spawned_at")
        direction = v.check_direction(order_direction)
        if swarm is None and values == _NO_FILTER:
            return await self._many(Agent, LIST_AGENTS[order, direction], lim, off)
        if swarm is None:
            return await self._many(Agent, LIST_AGENTS_WHERE[order, direction], lim, off, *values)
        return await self._many(Agent, LIST_AGENTS_IN_SWARM[order, direction], lim, off, *values, swarm)

    async def count(
        self,
        swarm_id: uuid.UUID | str | None = None,
        status: str | None = None,
        lifecycle_state: str | None = None,
        model: str | None = None,
    ) -> int:
        """Number of agents matching every given filter."""
        swarm, values = self._filters(swarm_id, status, lifecycle_state, model)
        if swarm is None and values == _NO_FILTER:
            count = await self.db.fetchval(COUNT_ALL, retry=True, replica=True)
        elif swarm is None:
            count = await self.db.fetchval(COUNT_WHERE, *values, retry=True, replica=True)
        elif values == _NO_FILTER:
            count = await self.db.fetchval(COUNT_OF_SWARM, swarm, retry=True, replica=True)
        else:
            count = await self.db.fetchval(COUNT_IN_SWARM_WHERE, *values, swarm, retry=True, replica=True)
        return int(count)

    async def get_counts_by_status(self, swarm_id: uuid.UUID | str | None = None) -> dict[str, int]:
        """Agents per status (every status present, zero-filled), for one swarm or all."""
        swarm = v.check_uuid(swarm_id, "swarm_id", optional=True)
        if swarm is None:
            rows = await self.db.fetch(COUNT_BY_STATUS, retry=True, replica=True)
        else:
            rows = await self.db.fetch(COUNT_BY_STATUS_IN_SWARM, swarm, retry=True, replica=True)
        counts = dict.fromkeys((s.value for s in AgentStatus), 0)
        for status, n in rows:
            counts[status] = int(n)
        return counts

    async def update(
        self,
        id: uuid.UUID | str,
        *,
        label: str | Unset | None = UNSET,
        model: str | Unset | None = UNSET,
        task: str | Unset | None = UNSET,
        config: dict[str, Any] | Unset = UNSET,
        context: Any = UNSET,
        code: Any = UNSET,
        reasoning: Any = UNSET,
        safety_boundaries: Any = UNSET,
        max_retries: int | Unset = UNSET,
        budget_limit: Decimal | int | float | str | Unset | None = UNSET,
        metadata: dict[str, Any] | Unset = UNSET,
        last_error: str | Unset | None = UNSET,
        runtime: int | Unset = UNSET,
    ) -> Agent | None:
        """Set the given fields (None sets NULL where the column allows it); None if the agent is missing.

        Status and lifecycle changes go through ``update_status`` / ``update_lifecycle_state``.
        """
        agent_id = v.check_uuid(id, "id")
        values = {
            "label": label,
            "model": model,
            "task": task,
            "config": config,
            "context": context,
            "code": code,
            "reasoning": reasoning,
            "safety_boundaries": safety_boundaries,
            "max_retries": max_retries,
            "budget_limit": budget_limit,
            "metadata": metadata,
            "last_error": last_error,
            "runtime": runtime,
        }
        fields = (given(values[column], check) for column, check in _VALIDATORS.items())
        return await self._update(Agent, UPDATE_AGENT, SELECT_AGENT_BY_ID, agent_id, *fields)

    async def update_status(
        self, id: uuid.UUID | str, status: str, *, last_error: str | Unset | None = UNSET
    ) -> Agent | None:
        """Change the status if AGENT_STATUS_TRANSITIONS allows it (else InvalidTransitionError).

        completed / failed / killed stamp ``completed_at``; ``last_error`` is set too when given.
        "paused" is refused (ValidationError): use ``pause``, which records who and when; a paused
        agent only goes on through ``resume``, or stops (completed / failed / killed, which clears
        ``pause_time`` and ``paused_by``). None if the agent does not exist.
        """
        return await transitions.update_status(self.db, id, status, last_error)

    async def update_lifecycle_state(self, id: uuid.UUID | str, state: str) -> Agent | None:
        """Change the lifecycle state (destroyed is final: InvalidTransitionError). None if missing."""
        return await transitions.update_lifecycle_state(self.db, id, state)

    async def pause(self, agent_id: uuid.UUID | str, paused_by: str) -> Agent | None:
        """Pause a pending / running / blocked agent (status and lifecycle paused, pause_time now()).

        InvalidTransitionError from any other status; None if the agent does not exist.
        """
        return await transitions.pause(self.db, agent_id, paused_by)

    async def resume(self, agent_id: uuid.UUID | str) -> Agent | None:
        """Resume a paused agent (status and lifecycle running; pause_time and paused_by cleared).

        InvalidTransitionError from any other status; None if the agent does not exist.
        """
        return await transitions.resume(self.db, agent_id)

    async def increment_retry(self, id: uuid.UUID | str, *, expected: int | None = None) -> Agent | None:
        """Add one to ``retry_count``; None if the agent does not exist.

        Without ``expected`` the increment is relative and never retried after a lost connection
        (it could apply twice): the caller cannot tell whether it applied.

        With ``expected`` (the ``retry_count`` the caller read) it is a compare-and-set: the count
        goes from ``expected`` to ``expected + 1``, or nothing changes and ConflictError says what
        the count is now. Of many callers with the same ``expected``, exactly one succeeds. This
        form IS retried after a lost connection, safely: a retry learns from the server whether the
        earlier attempt committed (then it answers success without adding again, returning the
        agent as it is now) or not (then it tries again, and meets ConflictError if someone else
        moved the count meanwhile). It costs three round trips (BEGIN, the update, COMMIT).
        """
        agent_id = v.check_uuid(id, "id")
        if expected is None:
            return await self._one(Agent, INCREMENT_RETRY, agent_id, retry=False)
        count = v.check_int(expected, "expected", maximum=v.INT_MAX - 1)
        applied_in: str | None = None  # transaction id of an attempt whose update went through

        async def cas(con: Connection, attempt: int) -> Agent | None:
            nonlocal applied_in
            if applied_in is not None:
                # That attempt's COMMIT may or may not have happened; ask the server, after taking
                # the row lock, which that transaction held until it ended.
                locked = await con.fetchrow(LOCK_AGENT, agent_id)
                if locked is None:
                    return None  # deleted since
                if await con.fetchval(XACT_STATUS, applied_in) == "committed":
                    return Agent(*locked)
                applied_in = None  # rolled back: nothing was applied, try again
            row = await con.fetchrow(INCREMENT_RETRY_IF, agent_id, count)
            if row is None:
                return None
            if row[2] is None:
                raise ConflictError(
                    f"agent {agent_id}: retry_count is {row[0]}, not the expected {count} (it changed "
                    "since it was read); nothing was changed"
                )
            applied_in = row[1]
            return Agent(*row[2:])

        return await self.db.run(cas, retry=True, transaction=True)

    async def get_activity(
        self,
        swarm_id: uuid.UUID | str | None = None,
        agent_id: uuid.UUID | str | None = None,
        limit: int | None = None,
        offset: int | None = None,
    ) -> builtins.list[AgentActivity]:
        """agent_activity rows (agent, swarm name, duration, retries, runtime), newest spawn first."""
        swarm = v.check_uuid(swarm_id, "swarm_id", optional=True)
        agent = v.check_uuid(agent_id, "agent_id", optional=True)
        lim = v.check_limit(limit)
        off = v.check_offset(offset)
        if agent is not None:
            return await self._many(AgentActivity, SELECT_ACTIVITY_OF_AGENT, lim, off, agent, swarm)
        elif swarm is not None:
            return await self._many(AgentActivity, SELECT_ACTIVITY_OF_SWARM, lim, off, swarm)
        else:
            return await self._many(AgentActivity, SELECT_ACTIVITY, lim, off)

    async def delete(self, id: uuid.UUID | str) -> bool:
        """Delete one agent. True if it existed."""
        return await self.db.fetchval(DELETE_AGENT, v.check_uuid(id, "id"), retry=True) is not None

    async def delete_by_swarm_id(self, swarm_id: uuid.UUID | str) -> int:
        """Delete every agent of a swarm; the number deleted."""
        status = await self.db.execute(DELETE_AGENTS_BY_SWARM, v.check_uuid(swarm_id, "swarm_id"), retry=True)
        return int(status.rsplit(" ", 1)[-1])

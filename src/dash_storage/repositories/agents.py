"""AgentRepository: agents, their state transitions and the ``agent_activity`` view.

State changes (``update_status``, ``update_lifecycle_state``, ``pause``, ``resume``) check the
current state in the same statement as the write: a CTE locks the row and reads its state, and the
UPDATE only applies when that state is an allowed source. One round trip therefore tells
"not found" (None) from "not allowed" (InvalidTransitionError with the current state).

Status transitions (``AGENT_STATUS_TRANSITIONS``, current -> allowed new statuses):

================================  ===========================================================
current status                    may change to (``update_status``)
================================  ===========================================================
pending, running, blocked         any status but paused
paused                            completed, failed, killed (stopping a paused agent)
completed                         completed (no-op)
failed                            failed (no-op), pending (a retry of the agent)
killed                            killed (no-op)
================================  ===========================================================

Pausing and resuming have their own methods, because they keep more than the status: ``pause``
(from pending / running / blocked) sets status and lifecycle_state to paused and records
``pause_time`` (database clock) and ``paused_by``; ``resume`` (from paused only) sets status and
lifecycle_state to running and clears both marks. ``update_status`` refuses "paused" (a
ValidationError naming ``status``: it cannot say who paused) and refuses to take a paused agent back
to pending / running / blocked (an InvalidTransitionError naming ``resume()``), so that
``pause_time`` / ``paused_by`` are set exactly while an agent is paused: stopping a paused agent
(completed / failed / killed) clears them, and ``create(status="paused")`` stamps ``pause_time``.
Lifecycle states: destroyed is final (only destroyed -> destroyed); every other change is allowed.
Setting the state a row already has always succeeds (it rewrites nothing but ``updated_at`` and,
if given, ``last_error``), which also makes a retried status change safe.

``completed_at`` follows the status: stamped (database clock, once) when the status becomes
completed / failed / killed, cleared when it becomes anything else (failed -> pending re-runs it).
``resume`` does not touch ``runtime``: the paused time is not run time, and ``runtime`` is owned by
the caller (``update(runtime=...)``).

``increment_retry(id)`` adds one, relative to whatever is stored: it is never retried on a lost
connection, since it could apply twice. ``increment_retry(id, expected=n)`` is a compare-and-set
(n -> n + 1, ConflictError if the count is no longer n) and is retried: it runs in a transaction
whose id it learns before COMMIT, so that a retry after a lost COMMIT answer asks the server whether
that transaction committed (``pg_xact_status``) instead of guessing from the count, which another
caller may have moved.
"""

from __future__ import annotations

import builtins
import functools
import uuid
from collections.abc import Callable
from dataclasses import fields
from decimal import Decimal
from typing import Any

import asyncpg

from dash_storage.core import validation as v
from dash_storage.core.database import Connection
from dash_storage.core.errors import ConflictError, InvalidTransitionError, NotFoundError, ValidationError
from dash_storage.core.ids import new_id
from dash_storage.core.models import (
    AGENT_COLUMNS,
    UNSET,
    Agent,
    AgentActivity,
    AgentStatus,
    LifecycleState,
    Unset,
)
from dash_storage.repositories.base import Repository, written_by_us

__all__ = [
    "AGENT_LIFECYCLE_TRANSITIONS",
    "AGENT_ORDER_COLUMNS",
    "AGENT_STATUS_TRANSITIONS",
    "FINAL_AGENT_STATUSES",
    "PAUSABLE_STATUSES",
    "RESUMABLE_STATUSES",
    "AgentRepository",
]

AGENT_STATUSES = frozenset(s.value for s in AgentStatus)
LIFECYCLE_STATES = frozenset(s.value for s in LifecycleState)
#: Statuses that stamp ``completed_at``.
FINAL_AGENT_STATUSES = frozenset({"completed", "failed", "killed"})
#: ``update_status``: current status -> the statuses it may change to. Never "paused" (that is
#: ``pause``), and from paused only the final statuses (going on is ``resume``).
AGENT_STATUS_TRANSITIONS: dict[str, frozenset[str]] = {
    "pending": AGENT_STATUSES - {"paused"},
    "running": AGENT_STATUSES - {"paused"},
    "paused": FINAL_AGENT_STATUSES,
    "blocked": AGENT_STATUSES - {"paused"},
    "completed": frozenset({"completed"}),
    "failed": frozenset({"failed", "pending"}),
    "killed": frozenset({"killed"}),
}
#: ``update_lifecycle_state``: current state -> the states it may change to (destroyed is final).
AGENT_LIFECYCLE_TRANSITIONS: dict[str, frozenset[str]] = {
    s: (frozenset({"destroyed"}) if s == "destroyed" else LIFECYCLE_STATES) for s in LIFECYCLE_STATES
}
#: Statuses ``pause`` accepts.
PAUSABLE_STATUSES = frozenset({"pending", "running", "blocked"})
#: Statuses ``resume`` accepts.
RESUMABLE_STATUSES = frozenset({"paused"})
#: Public ``order_by`` names of ``list`` -> SQL column (a fixed allow-list, never input).
AGENT_ORDER_COLUMNS = {
    "spawned_at": "spawned_at",
    "updated_at": "updated_at",
    "status": "status",
    "label": "label",
}
ACTIVITY_COLUMNS = ", ".join(f.name for f in fields(AgentActivity))


def _sources(transitions: dict[str, frozenset[str]]) -> dict[str, builtins.list[str]]:
    """Invert current -> targets into target -> allowed current states (what the SQL checks)."""
    return {
        target: sorted(cur for cur, targets in transitions.items() if target in targets)
        for target in {t for targets in transitions.values() for t in targets}
    }


_STATUS_SOURCES = _sources(AGENT_STATUS_TRANSITIONS)
_LIFECYCLE_SOURCES = _sources(AGENT_LIFECYCLE_TRANSITIONS)
_FINAL = sorted(FINAL_AGENT_STATUSES)
_PAUSABLE = sorted(PAUSABLE_STATUSES)
_RESUMABLE = sorted(RESUMABLE_STATUSES)

# Idempotent create; a final initial status stamps completed_at, a paused one pause_time. FK
# violation = missing swarm.
INSERT_AGENT = f"""
INSERT INTO agents (id, swarm_id, label, status, lifecycle_state, model, task, config, context, code,
                    reasoning, safety_boundaries, max_retries, budget_limit, metadata, completed_at,
                    pause_time)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,
        CASE WHEN $4 = ANY($16::text[]) THEN now() END, CASE WHEN $4 = 'paused' THEN now() END)
ON CONFLICT (id) DO NOTHING
RETURNING {AGENT_COLUMNS}
"""  # noqa: S608
# One agent by primary key.
SELECT_AGENT_BY_ID = f"SELECT {AGENT_COLUMNS} FROM agents WHERE id = $1"  # noqa: S608
# Agents of one swarm in spawn order (oldest first, ties by id).
SELECT_AGENTS_BY_SWARM = f"""
SELECT {AGENT_COLUMNS} FROM agents WHERE swarm_id = $1
ORDER BY spawned_at ASC, id ASC LIMIT $2 OFFSET $3
"""  # noqa: S608
# Template of list(): {where}, {order}, {direction} come only from fixed fragments in code.
LIST_AGENTS_TEMPLATE = f"""
SELECT {AGENT_COLUMNS} FROM agents{{where}}
ORDER BY {{order}} {{direction}}, id {{direction}} LIMIT $1 OFFSET $2
"""  # noqa: S608
# Template of count(): {where} comes only from fixed fragments in code.
COUNT_AGENTS_TEMPLATE = "SELECT count(*) FROM agents{where}"
# Agents per status, all swarms.
COUNT_BY_STATUS = "SELECT status, count(*) FROM agents GROUP BY status"
# Agents per status in one swarm.
COUNT_BY_STATUS_IN_SWARM = "SELECT status, count(*) FROM agents WHERE swarm_id = $1 GROUP BY status"
# Template of update(): {assignments} is built from the fixed column list UPDATABLE_COLUMNS.
UPDATE_AGENT_TEMPLATE = f"""
UPDATE agents SET {{assignments}} WHERE id = $1 RETURNING {AGENT_COLUMNS}
"""  # noqa: S608
# Guarded status change: $4 = allowed current statuses, $5 = whether to set last_error to $6.
# The CTE locks and reads the row, so one round trip tells "missing" from "not allowed". The
# target is never paused, so the pause marks go (they belong to a pause that is over).
UPDATE_AGENT_STATUS = f"""
WITH cur AS (
    SELECT id AS cur_id, status AS cur_state FROM agents WHERE id = $1 FOR UPDATE
), upd AS (
    UPDATE agents SET
        status = $2,
        completed_at = CASE WHEN $2 = ANY($3::text[]) THEN COALESCE(completed_at, now()) ELSE NULL END,
        last_error = CASE WHEN $5::boolean THEN $6::text ELSE last_error END,
        pause_time = NULL,
        paused_by = NULL
    FROM cur
    WHERE id = cur_id AND status = ANY($4::text[])
    RETURNING {AGENT_COLUMNS}
)
SELECT cur_state, upd.* FROM cur LEFT JOIN upd ON true
"""  # noqa: S608
# Guarded lifecycle change: $3 = allowed current states.
UPDATE_AGENT_LIFECYCLE = f"""
WITH cur AS (
    SELECT id AS cur_id, lifecycle_state AS cur_state FROM agents WHERE id = $1 FOR UPDATE
), upd AS (
    UPDATE agents SET lifecycle_state = $2
    FROM cur
    WHERE id = cur_id AND lifecycle_state = ANY($3::text[])
    RETURNING {AGENT_COLUMNS}
)
SELECT cur_state, upd.* FROM cur LEFT JOIN upd ON true
"""  # noqa: S608
# Guarded pause: $3 = statuses that may be paused.
PAUSE_AGENT = f"""
WITH cur AS (
    SELECT id AS cur_id, status AS cur_state FROM agents WHERE id = $1 FOR UPDATE
), upd AS (
    UPDATE agents SET status = 'paused', lifecycle_state = 'paused', pause_time = now(), paused_by = $2
    FROM cur
    WHERE id = cur_id AND status = ANY($3::text[])
    RETURNING {AGENT_COLUMNS}
)
SELECT cur_state, upd.* FROM cur LEFT JOIN upd ON true
"""  # noqa: S608
# Guarded resume: $2 = statuses that may be resumed; clears the pause marks.
RESUME_AGENT = f"""
WITH cur AS (
    SELECT id AS cur_id, status AS cur_state FROM agents WHERE id = $1 FOR UPDATE
), upd AS (
    UPDATE agents SET status = 'running', lifecycle_state = 'running', pause_time = NULL, paused_by = NULL
    FROM cur
    WHERE id = cur_id AND status = ANY($2::text[])
    RETURNING {AGENT_COLUMNS}
)
SELECT cur_state, upd.* FROM cur LEFT JOIN upd ON true
"""  # noqa: S608
# Relative write (never retried): one more retry.
INCREMENT_RETRY = f"""
UPDATE agents SET retry_count = retry_count + 1 WHERE id = $1 RETURNING {AGENT_COLUMNS}
"""  # noqa: S608
# Compare-and-set of the retry count, run inside a transaction: $2 = the count the caller read.
# The CTE locks and reads the row, so one round trip tells "missing" (no row) from "changed
# meanwhile" (cur_count <> $2, upd columns NULL). It also returns the transaction's id, known
# before COMMIT is sent, so that a retry after a lost COMMIT answer can ask whether it committed.
INCREMENT_RETRY_IF = f"""
WITH cur AS (
    SELECT id AS cur_id, retry_count AS cur_count FROM agents WHERE id = $1 FOR UPDATE
), upd AS (
    UPDATE agents SET retry_count = retry_count + 1
    FROM cur
    WHERE id = cur_id AND retry_count = $2
    RETURNING {AGENT_COLUMNS}
)
SELECT cur_count, pg_current_xact_id()::text AS xact, upd.* FROM cur LEFT JOIN upd ON true
"""  # noqa: S608
# A retry of the compare-and-set, step 1: lock the agent. The earlier attempt's transaction held
# this lock from its UPDATE to its end, so once it is ours that transaction has ended.
LOCK_AGENT = f"SELECT {AGENT_COLUMNS} FROM agents WHERE id = $1 FOR UPDATE"  # noqa: S608
# Step 2: did the earlier attempt's transaction commit ('committed' / 'aborted')?
XACT_STATUS = "SELECT pg_xact_status($1::text::xid8)"
# Template of get_activity(): {where} comes only from fixed fragments in code.
ACTIVITY_TEMPLATE = f"""
SELECT {ACTIVITY_COLUMNS} FROM agent_activity{{where}}
ORDER BY spawned_at DESC, id DESC LIMIT $1 OFFSET $2
"""  # noqa: S608
# Delete one agent (its events keep agent_id NULL).
DELETE_AGENT = "DELETE FROM agents WHERE id = $1 RETURNING 1"
# Delete every agent of a swarm.
DELETE_AGENTS_BY_SWARM = "DELETE FROM agents WHERE swarm_id = $1"

#: Filters of list()/count(), in the order their parameters are numbered (after limit/offset).
FILTER_COLUMNS = ("swarm_id", "status", "lifecycle_state", "model")
#: Columns ``update`` may set, in a fixed order.
UPDATABLE_COLUMNS = (
    "label",
    "model",
    "task",
    "config",
    "context",
    "code",
    "reasoning",
    "safety_boundaries",
    "max_retries",
    "budget_limit",
    "metadata",
    "last_error",
    "runtime",
)


def _where(columns: tuple[str, ...], first: int) -> str:
    assert all(c in FILTER_COLUMNS or c in ("id",) for c in columns)
    if not columns:
        return ""
    return " WHERE " + " AND ".join(f"{c} = ${i}" for i, c in enumerate(columns, start=first))


@functools.lru_cache(maxsize=256)
def _list_sql(filters: tuple[str, ...], order: str, direction: str) -> str:
    return LIST_AGENTS_TEMPLATE.format(where=_where(filters, 3), order=order, direction=direction)


@functools.lru_cache(maxsize=32)
def _count_sql(filters: tuple[str, ...]) -> str:
    return COUNT_AGENTS_TEMPLATE.format(where=_where(filters, 1))


@functools.lru_cache(maxsize=8)
def _activity_sql(filters: tuple[str, ...]) -> str:
    # agent_activity names the agent's id "id".
    return ACTIVITY_TEMPLATE.format(where=_where(filters, 3))


@functools.lru_cache(maxsize=256)
def _update_sql(columns: tuple[str, ...]) -> str:
    assert all(c in UPDATABLE_COLUMNS for c in columns)
    assignments = ", ".join(f"{c} = ${i}" for i, c in enumerate(columns, start=2))
    return UPDATE_AGENT_TEMPLATE.format(assignments=assignments)


def _id(value: Any, field: str = "id") -> uuid.UUID:
    result = v.check_uuid(value, field)
    assert result is not None
    return result


def _required(value: Any, field: str) -> Any:
    if value is None:
        raise ValidationError(field, "must not be None (the column is not nullable)")
    return value


# Per-column validators for create/update; each returns the value the driver wants.
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
        swarm = _id(swarm_id, "swarm_id")
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

        async def insert(con: Connection, attempt: int) -> Agent:
            try:
                row = await con.fetchrow(INSERT_AGENT, *args)
            except asyncpg.ForeignKeyViolationError as exc:
                raise NotFoundError("swarm", swarm) from exc
            if row is None:
                if attempt > 1:  # our own row, written by an attempt whose answer was lost
                    row = await con.fetchrow(SELECT_AGENT_BY_ID, agent_id)
                    ours = {"swarm_id": args[1], "label": args[2], "model": args[5], "task": args[6]}
                    if row is not None and not written_by_us(row, ours):
                        row = None  # another agent already had this id
                if row is None:
                    raise ConflictError(f"agent {agent_id} already exists", constraint="agents_pkey")
            return Agent(*row)

        return await self.db.run(insert, retry=True)

    async def find_by_id(self, id: uuid.UUID | str) -> Agent | None:
        """The agent with this id, or None."""
        row = await self.db.fetchrow(SELECT_AGENT_BY_ID, _id(id), retry=True)
        return Agent(*row) if row is not None else None

    async def find_by_swarm_id(
        self, swarm_id: uuid.UUID | str, limit: int | None = None, offset: int | None = None
    ) -> builtins.list[Agent]:
        """Agents of one swarm in spawn order (oldest first, ties by id)."""
        swarm = _id(swarm_id, "swarm_id")
        lim = v.check_limit(limit)
        off = v.check_offset(offset)
        rows = await self.db.fetch(SELECT_AGENTS_BY_SWARM, swarm, lim, off, retry=True)
        return [Agent(*r) for r in rows]

    @staticmethod
    def _filters(
        swarm_id: Any, status: Any, lifecycle_state: Any, model: Any
    ) -> tuple[tuple[str, ...], builtins.list[Any]]:
        given: builtins.list[tuple[str, Any]] = [
            ("swarm_id", v.check_uuid(swarm_id, "swarm_id", optional=True)),
            ("status", v.check_choice(status, AGENT_STATUSES, "status", optional=True)),
            (
                "lifecycle_state",
                v.check_choice(lifecycle_state, LIFECYCLE_STATES, "lifecycle_state", optional=True),
            ),
            ("model", v.check_text(model, "model", optional=True)),
        ]
        present = [(c, x) for c, x in given if x is not None]
        return tuple(c for c, _ in present), [x for _, x in present]

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
        columns, values = self._filters(swarm_id, status, lifecycle_state, model)
        lim = v.check_limit(limit)
        off = v.check_offset(offset)
        order = v.check_order(order_by, AGENT_ORDER_COLUMNS, default="spawned_at")
        direction = v.check_direction(order_direction)
        rows = await self.db.fetch(_list_sql(columns, order, direction), lim, off, *values, retry=True)
        return [Agent(*r) for r in rows]

    async def count(
        self,
        swarm_id: uuid.UUID | str | None = None,
        status: str | None = None,
        lifecycle_state: str | None = None,
        model: str | None = None,
    ) -> int:
        """Number of agents matching every given filter."""
        columns, values = self._filters(swarm_id, status, lifecycle_state, model)
        return int(await self.db.fetchval(_count_sql(columns), *values, retry=True))

    async def get_counts_by_status(self, swarm_id: uuid.UUID | str | None = None) -> dict[str, int]:
        """Agents per status (every status present, zero-filled), for one swarm or all."""
        swarm = v.check_uuid(swarm_id, "swarm_id", optional=True)
        if swarm is None:
            rows = await self.db.fetch(COUNT_BY_STATUS, retry=True)
        else:
            rows = await self.db.fetch(COUNT_BY_STATUS_IN_SWARM, swarm, retry=True)
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
        agent_id = _id(id)
        given = {
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
        columns: builtins.list[str] = []
        values: builtins.list[Any] = []
        for column in UPDATABLE_COLUMNS:
            value = given[column]
            if value is not UNSET:
                columns.append(column)
                values.append(_VALIDATORS[column](value))
        if not columns:
            return await self.find_by_id(agent_id)
        row = await self.db.fetchrow(_update_sql(tuple(columns)), agent_id, *values, retry=True)
        return Agent(*row) if row is not None else None

    async def _transition(
        self, sql: str, args: tuple[Any, ...], agent_id: uuid.UUID, requested: str, target: str
    ) -> Agent | None:
        """Run a guarded transition; ``target`` is the state a lost first attempt would have left."""

        async def op(con: Connection, attempt: int) -> Agent | None:
            row = await con.fetchrow(sql, *args)
            if row is None:
                return None  # no such agent
            if row[1] is not None:
                return Agent(*row[1:])
            current = row[0]
            if attempt > 1 and current == target:
                # The first attempt applied the change but its answer was lost: that is success.
                again = await con.fetchrow(SELECT_AGENT_BY_ID, agent_id)
                return Agent(*again) if again is not None else None
            raise InvalidTransitionError("agent", agent_id, current, requested)

        return await self.db.run(op, retry=True)

    async def update_status(
        self, id: uuid.UUID | str, status: str, *, last_error: str | Unset | None = UNSET
    ) -> Agent | None:
        """Change the status if AGENT_STATUS_TRANSITIONS allows it (else InvalidTransitionError).

        completed / failed / killed stamp ``completed_at``; ``last_error`` is set too when given.
        "paused" is refused (ValidationError): use ``pause``, which records who and when; a paused
        agent only goes on through ``resume``, or stops (completed / failed / killed, which clears
        ``pause_time`` and ``paused_by``). None if the agent does not exist.
        """
        agent_id = _id(id)
        st = v.check_choice(status, AGENT_STATUSES, "status")
        assert st is not None
        if st == "paused":
            raise ValidationError(
                "status",
                "'paused' is set by pause(agent_id, paused_by), which also records pause_time, "
                "paused_by and the lifecycle state; update_status cannot",
            )
        set_error = last_error is not UNSET
        error = (
            v.check_text(last_error, "last_error", max_length=v.LONG_TEXT, optional=True)
            if set_error
            else None
        )
        args = (agent_id, st, _FINAL, _STATUS_SOURCES[st], set_error, error)
        try:
            return await self._transition(UPDATE_AGENT_STATUS, args, agent_id, f"set status to {st}", st)
        except InvalidTransitionError as exc:
            if exc.current != "paused":
                raise
            raise InvalidTransitionError(
                "agent", agent_id, exc.current, f"set status to {st} (a paused agent goes on with resume())"
            ) from None

    async def update_lifecycle_state(self, id: uuid.UUID | str, state: str) -> Agent | None:
        """Change the lifecycle state (destroyed is final: InvalidTransitionError). None if missing."""
        agent_id = _id(id)
        ls = v.check_choice(state, LIFECYCLE_STATES, "state")
        assert ls is not None
        args = (agent_id, ls, _LIFECYCLE_SOURCES[ls])
        return await self._transition(
            UPDATE_AGENT_LIFECYCLE, args, agent_id, f"set lifecycle_state to {ls}", ls
        )

    async def pause(self, agent_id: uuid.UUID | str, paused_by: str) -> Agent | None:
        """Pause a pending / running / blocked agent (status and lifecycle paused, pause_time now()).

        InvalidTransitionError from any other status; None if the agent does not exist.
        """
        aid = _id(agent_id, "agent_id")
        by = v.check_text(paused_by, "paused_by", allow_empty=False)
        return await self._transition(PAUSE_AGENT, (aid, by, _PAUSABLE), aid, "pause", "paused")

    async def resume(self, agent_id: uuid.UUID | str) -> Agent | None:
        """Resume a paused agent (status and lifecycle running; pause_time and paused_by cleared).

        InvalidTransitionError from any other status; None if the agent does not exist.
        """
        aid = _id(agent_id, "agent_id")
        return await self._transition(RESUME_AGENT, (aid, _RESUMABLE), aid, "resume", "running")

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
        agent_id = _id(id)
        if expected is None:
            row = await self.db.fetchrow(INCREMENT_RETRY, agent_id, retry=False)
            return Agent(*row) if row is not None else None
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
        columns: tuple[str, ...] = ()
        values: builtins.list[Any] = []
        if swarm is not None:
            columns += ("swarm_id",)
            values.append(swarm)
        if agent is not None:
            columns += ("id",)
            values.append(agent)
        rows = await self.db.fetch(_activity_sql(columns), lim, off, *values, retry=True)
        return [AgentActivity(*r) for r in rows]

    async def delete(self, id: uuid.UUID | str) -> bool:
        """Delete one agent. True if it existed."""
        return await self.db.fetchval(DELETE_AGENT, _id(id), retry=True) is not None

    async def delete_by_swarm_id(self, swarm_id: uuid.UUID | str) -> int:
        """Delete every agent of a swarm; the number deleted."""
        status = await self.db.execute(DELETE_AGENTS_BY_SWARM, _id(swarm_id, "swarm_id"), retry=True)
        return int(status.rsplit(" ", 1)[-1])

"""The guarded state changes of agents: ``update_status``, ``update_lifecycle_state``, ``pause`` and
``resume`` of AgentRepository, which delegates them here.

Each change checks the current state in the same statement as the write (``TRANSITION``): one
UPDATE whose WHERE is the guard (the current state is an allowed source), with the row's state
read back when it does not apply. One round trip therefore tells "not found" (None) from "not
allowed" (InvalidTransitionError with the current state), and a refused change locks nothing.

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
"""

from __future__ import annotations

import uuid
from typing import Any

from dash_storage import sql
from dash_storage.core import validation as v
from dash_storage.core.database import Connection, Database
from dash_storage.core.errors import InvalidTransitionError, ValidationError
from dash_storage.core.models import Agent, AgentStatus, LifecycleState
from dash_storage.repositories.base import given, values_of

__all__ = [
    "AGENT_LIFECYCLE_TRANSITIONS",
    "AGENT_STATUSES",
    "AGENT_STATUS_TRANSITIONS",
    "FINAL_AGENT_STATUSES",
    "LIFECYCLE_STATES",
    "PAUSABLE_STATUSES",
    "RESUMABLE_STATUSES",
    "RESUME_ARGS",
    "lifecycle_args",
    "pause",
    "pause_args",
    "resume",
    "status_args",
    "update_lifecycle_state",
    "update_status",
]

AGENT_STATUSES = values_of(AgentStatus)
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
LIFECYCLE_STATES = values_of(LifecycleState)
#: ``update_lifecycle_state``: current state -> the states it may change to (destroyed is final).
AGENT_LIFECYCLE_TRANSITIONS: dict[str, frozenset[str]] = {
    s: (frozenset({"destroyed"}) if s == "destroyed" else LIFECYCLE_STATES) for s in LIFECYCLE_STATES
}
#: Statuses ``pause`` accepts.
PAUSABLE_STATUSES = frozenset({"pending", "running", "blocked"})
#: Statuses ``resume`` accepts.
RESUMABLE_STATUSES = frozenset({"paused"})


def _sources(transitions: dict[str, frozenset[str]]) -> dict[str, list[str]]:
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

_Q = sql.load("agents")
TRANSITION = _Q["transition"]
#: One agent by id: what a retried change that finds its own result answers (also AgentRepository's).
SELECT_AGENT_BY_ID = _Q["find_by_id"]


#: How many times a change refused on a stale view of the row is sent again (see _transition).
_ASK_AGAIN = 3


def status_args(status: str, last_error: tuple[bool, str | None] = (False, None)) -> tuple[Any, ...]:
    """TRANSITION's parameters after the agent id, for ``update_status`` to ``status``. The target
    is never paused, so the pause marks go (they belong to a pause that is over)."""
    return (False, _STATUS_SOURCES[status], status, _FINAL, None, *last_error, True, None)


def lifecycle_args(state: str) -> tuple[Any, ...]:
    """TRANSITION's parameters after the agent id, for ``update_lifecycle_state``."""
    return (True, _LIFECYCLE_SOURCES[state], None, None, state, False, None, False, None)


def pause_args(paused_by: str) -> tuple[Any, ...]:
    """TRANSITION's parameters after the agent id, for ``pause``."""
    return (False, _PAUSABLE, "paused", None, "paused", False, None, True, paused_by)


#: TRANSITION's parameters after the agent id, for ``resume``.
RESUME_ARGS: tuple[Any, ...] = (False, _RESUMABLE, "running", None, "running", False, None, True, None)


async def _transition(
    db: Database, agent_id: uuid.UUID, requested: str, target: str, args: tuple[Any, ...]
) -> Agent | None:
    """Run the guarded statement TRANSITION with ``args`` (from the ``*_args`` helpers): ``target``
    is the state the change sets (the status, or the lifecycle state when only that changes).

    Retried: a retry that finds the row already in the requested state answers success (the
    first attempt applied the change, but its answer was lost). A refusal that names an allowed
    current state was judged on a newer row version than the statement's snapshot shows (a
    concurrent change got there first): the change is sent again, to be judged on the newest.
    """
    sources = args[1]

    async def op(con: Connection, attempt: int) -> Agent | None:
        for ask in range(_ASK_AGAIN + 1):
            row = await con.fetchrow(TRANSITION, agent_id, *args)
            assert row is not None
            if row[1] is not None:
                return Agent(*row[1:])
            current = row[0]
            if current is None:
                return None  # no such agent
            if current in sources and ask < _ASK_AGAIN:
                continue
            if attempt > 1 and current == target:
                again = await con.fetchrow(SELECT_AGENT_BY_ID, agent_id)
                return Agent(*again) if again is not None else None
            raise InvalidTransitionError("agent", agent_id, current, requested)
        raise AssertionError("unreachable")

    return await db.run(op, retry=True)


async def update_status(db: Database, id: Any, status: Any, last_error: Any) -> Agent | None:
    """``AgentRepository.update_status``."""
    agent_id = v.check_uuid(id, "id")
    st = v.check_choice(status, AGENT_STATUSES, "status")
    if st == "paused":
        raise ValidationError(
            "status",
            "'paused' is set by pause(agent_id, paused_by), which also records pause_time, "
            "paused_by and the lifecycle state; update_status cannot",
        )
    error = given(last_error, lambda x: v.check_text(x, "last_error", max_length=v.LONG_TEXT, optional=True))
    try:
        return await _transition(db, agent_id, f"set status to {st}", st, status_args(st, error))
    except InvalidTransitionError as exc:
        if exc.current != "paused":
            raise
        raise InvalidTransitionError(
            "agent", agent_id, exc.current, f"set status to {st} (a paused agent goes on with resume())"
        ) from None


async def update_lifecycle_state(db: Database, id: Any, state: Any) -> Agent | None:
    """``AgentRepository.update_lifecycle_state``."""
    agent_id = v.check_uuid(id, "id")
    ls = v.check_choice(state, LIFECYCLE_STATES, "state")
    return await _transition(db, agent_id, f"set lifecycle_state to {ls}", ls, lifecycle_args(ls))


async def pause(db: Database, agent_id: Any, paused_by: Any) -> Agent | None:
    """``AgentRepository.pause``."""
    aid = v.check_uuid(agent_id, "agent_id")
    by = v.check_text(paused_by, "paused_by", allow_empty=False)
    return await _transition(db, aid, "pause", "paused", pause_args(by))


async def resume(db: Database, agent_id: Any) -> Agent | None:
    """``AgentRepository.resume``."""
    aid = v.check_uuid(agent_id, "agent_id")
    return await _transition(db, aid, "resume", "running", RESUME_ARGS)

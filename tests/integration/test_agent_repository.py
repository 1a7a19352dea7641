"""AgentRepository against a real PostgreSQL: effects, zero values, guarded transitions, bad input."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import pytest

from dash_storage import (
    ConflictError,
    DashStorageError,
    Database,
    InvalidTransitionError,
    NotFoundError,
    ValidationError,
)
from dash_storage.core.ids import new_id
from dash_storage.core.models import Agent, AgentActivity, AgentStatus
from dash_storage.repositories.agents import (
    AGENT_LIFECYCLE_TRANSITIONS,
    AGENT_STATUS_TRANSITIONS,
    AgentRepository,
)
from tests.conftest import MakeDatabase
from tests.factories import make_swarm, snapshot
from tests.faults.chaos import capped, sized, terminating_connections
from tests.faults.databases import RetryAttemptDatabase


async def test_create_with_every_field(db: Database) -> None:
    swarm_id = await make_swarm(db)
    repo = AgentRepository(db)
    agent = await repo.create(
        swarm_id,
        model="claude",
        task="write tests",
        label="a1",
        config={"temperature": 0.5},
        context={"files": ["a.py"]},
        code=["print(1)"],
        reasoning="because",
        safety_boundaries={"no_network": True},
        max_retries=5,
        budget_limit=Decimal("12.3456789012"),
        metadata={"team": "x"},
        status="running",
        lifecycle_state="running",
    )
    assert isinstance(agent, Agent)
    assert agent.swarm_id == swarm_id
    assert (agent.model, agent.task, agent.label) == ("claude", "write tests", "a1")
    assert agent.config == {"temperature": 0.5}
    assert (agent.context, agent.code, agent.reasoning) == ({"files": ["a.py"]}, ["print(1)"], "because")
    assert agent.safety_boundaries == {"no_network": True}
    assert (agent.max_retries, agent.budget_limit) == (5, Decimal("12.3456789012"))
    assert agent.metadata == {"team": "x"}
    assert (agent.status, agent.lifecycle_state) == ("running", "running")
    assert (agent.retry_count, agent.runtime, agent.completed_at, agent.pause_time) == (0, 0, None, None)
    assert await repo.find_by_id(agent.id) == agent
    stored = await db.fetchrow("SELECT max_retries, budget_limit, task FROM agents WHERE id = $1", agent.id)
    assert tuple(stored) == (5, Decimal("12.3456789012"), "write tests")


async def test_create_defaults(db: Database) -> None:
    swarm_id = await make_swarm(db)
    agent = await AgentRepository(db).create(str(swarm_id))
    assert (agent.status, agent.lifecycle_state, agent.max_retries) == ("pending", "initializing", 3)
    assert (agent.budget_limit, agent.config, agent.metadata) == (None, {}, {})
    assert (agent.context, agent.code, agent.reasoning, agent.safety_boundaries) == (None, None, None, None)
    assert agent.id.version == 7


async def test_zero_is_a_value(db: Database) -> None:
    swarm_id = await make_swarm(db)
    repo = AgentRepository(db)
    agent = await repo.create(swarm_id, max_retries=0, budget_limit=0)
    assert agent.max_retries == 0 and agent.budget_limit == Decimal(0)
    row = await db.fetchrow("SELECT max_retries, budget_limit FROM agents WHERE id = $1", agent.id)
    assert tuple(row) == (0, Decimal(0))
    other = await repo.create(swarm_id, budget_limit=0.0)
    assert other.budget_limit == Decimal(0)
    updated = await repo.update(other.id, max_retries=0, budget_limit=Decimal("0"), runtime=0)
    assert updated is not None and (updated.max_retries, updated.budget_limit, updated.runtime) == (0, 0, 0)


async def test_create_in_missing_swarm_is_not_found(db: Database) -> None:
    missing = uuid.uuid4()
    with pytest.raises(NotFoundError) as err:
        await AgentRepository(db).create(missing)
    assert err.value.entity == "swarm" and err.value.key == missing
    assert str(err.value) == f"swarm {missing} not found"
    assert await db.fetchval("SELECT count(*) FROM agents") == 0


async def test_create_honours_id_and_rejects_duplicate(db: Database, settings: Any) -> None:
    swarm_id = await make_swarm(db)
    repo = AgentRepository(db)
    given = uuid.uuid4()
    agent = await repo.create(swarm_id, id=given, label="one")
    assert agent.id == given
    with pytest.raises(ConflictError):
        await repo.create(swarm_id, id=given, label="two")
    # A retried attempt whose first answer was lost gets its own row back.
    retry_db = RetryAttemptDatabase(settings)
    try:
        again = await AgentRepository(retry_db).create(swarm_id, id=given, label="one")
    finally:
        await retry_db.close()
    assert again == agent
    assert await repo.count() == 1


async def test_create_in_final_status_stamps_completed_at(db: Database) -> None:
    swarm_id = await make_swarm(db)
    repo = AgentRepository(db)
    for status in ("completed", "failed", "killed"):
        assert (await repo.create(swarm_id, status=status)).completed_at is not None
    assert (await repo.create(swarm_id, status="running")).completed_at is None


async def test_find_missing_returns_none(db: Database) -> None:
    repo = AgentRepository(db)
    missing = uuid.uuid4()
    assert await repo.find_by_id(missing) is None
    assert await repo.find_by_swarm_id(missing) == []
    assert await repo.update(missing, label="x") is None
    assert await repo.update(missing) is None
    assert await repo.update_status(missing, "running") is None
    assert await repo.update_lifecycle_state(missing, "running") is None
    assert await repo.pause(missing, "me") is None
    assert await repo.resume(missing) is None
    assert await repo.increment_retry(missing) is None
    assert await repo.delete(missing) is False
    assert await repo.delete_by_swarm_id(missing) == 0
    assert await repo.get_activity(agent_id=missing) == []


async def _agents_with_tied_spawn(
    db: Database, swarm_id: uuid.UUID, spec: list[dict[str, Any]]
) -> list[uuid.UUID]:
    """Insert agents with one spawned_at (so only id breaks ties); ids ascending."""
    ids = sorted(new_id() for _ in spec)
    for agent_id, fields in zip(ids, spec, strict=True):
        await db.execute(
            "INSERT INTO agents (id, swarm_id, status, lifecycle_state, model, label, spawned_at) "
            "VALUES ($1, $2, $3, $4, $5, $6, '2024-01-01Z')",
            agent_id,
            swarm_id,
            fields.get("status", "pending"),
            fields.get("lifecycle_state", "initializing"),
            fields.get("model"),
            fields.get("label"),
        )
    return ids


async def test_find_by_swarm_id_in_spawn_order(db: Database) -> None:
    s1, s2 = await make_swarm(db, "one"), await make_swarm(db, "two")
    repo = AgentRepository(db)
    first = await repo.create(s1)
    second = await repo.create(s1)
    await repo.create(s2)
    await db.execute("UPDATE agents SET spawned_at = now() + interval '1 minute' WHERE id = $1", first.id)
    assert [a.id for a in await repo.find_by_swarm_id(s1)] == [second.id, first.id]
    tied = await _agents_with_tied_spawn(db, s2, [{}, {}, {}])
    found = await repo.find_by_swarm_id(str(s2))
    assert [a.id for a in found[:3]] == tied
    assert [a.id for a in await repo.find_by_swarm_id(s2, limit=2, offset=1)] == tied[1:3]


async def test_list_filters_order_and_ties(db: Database) -> None:
    s1, s2 = await make_swarm(db, "one"), await make_swarm(db, "two")
    spec = [
        {"status": "running", "model": "m1", "label": "b", "lifecycle_state": "running"},
        {"status": "running", "model": "m2", "label": "a", "lifecycle_state": "running"},
        {"status": "pending", "model": "m1", "label": "b"},
        {"status": "failed", "model": "m1", "label": None, "lifecycle_state": "failed"},
    ]
    ids = await _agents_with_tied_spawn(db, s1, spec)
    other = await _agents_with_tied_spawn(db, s2, [{"status": "running", "model": "m1"}])
    repo = AgentRepository(db)
    assert [a.id for a in await repo.list()] == sorted([*ids, *other], reverse=True)
    assert [a.id for a in await repo.list(swarm_id=s1, order_direction="asc")] == ids
    assert [a.id for a in await repo.list(status="running", order_direction="asc")] == sorted(
        [ids[0], ids[1], other[0]]
    )
    assert [a.id for a in await repo.list(swarm_id=s1, status="running", model="m1")] == [ids[0]]
    assert [a.id for a in await repo.list(lifecycle_state="failed")] == [ids[3]]
    assert [a.id for a in await repo.list(model="m1", swarm_id=str(s1), order_direction="asc")] == [
        ids[0],
        ids[2],
        ids[3],
    ]
    by_label = await repo.list(swarm_id=s1, order_by="label", order_direction="asc")
    assert [a.id for a in by_label] == [ids[1], ids[0], ids[2], ids[3]]  # a, b, b (by id), NULL last
    by_status = await repo.list(swarm_id=s1, order_by="status", order_direction="desc")
    assert [a.id for a in by_status] == [ids[1], ids[0], ids[2], ids[3]]
    await db.execute("UPDATE agents SET task = 't' WHERE id = $1", ids[2])
    assert (await repo.list(order_by="updated_at"))[0].id == ids[2]
    page1 = await repo.list(limit=3)
    page2 = await repo.list(limit=3, offset=3)
    assert [a.id for a in page1 + page2] == sorted([*ids, *other], reverse=True)

    assert await repo.count() == 5
    assert await repo.count(swarm_id=s1) == 4
    assert await repo.count(status="running") == 3
    assert await repo.count(swarm_id=s1, status="running", lifecycle_state="running", model="m2") == 1
    assert await repo.count(status="killed") == 0


async def test_get_counts_by_status_is_zero_filled(db: Database) -> None:
    repo = AgentRepository(db)
    empty = await repo.get_counts_by_status()
    assert empty == {s.value: 0 for s in AgentStatus}
    assert list(empty) == [s.value for s in AgentStatus]
    s1, s2 = await make_swarm(db, "one"), await make_swarm(db, "two")
    for status in ("running", "running", "paused"):
        await repo.create(s1, status=status)
    await repo.create(s2, status="killed")
    per_swarm = await repo.get_counts_by_status(s1)
    assert per_swarm == {**{s.value: 0 for s in AgentStatus}, "running": 2, "paused": 1}
    total = await repo.get_counts_by_status()
    assert total["killed"] == 1 and total["running"] == 2 and sum(total.values()) == 4
    assert await repo.get_counts_by_status(uuid.uuid4()) == {s.value: 0 for s in AgentStatus}


async def test_update_partial_and_nulls(db: Database) -> None:
    swarm_id = await make_swarm(db)
    repo = AgentRepository(db)
    agent = await repo.create(swarm_id, label="l", model="m", task="t", context={"c": 1}, budget_limit=5)
    updated = await repo.update(
        agent.id,
        label=None,
        task="new task",
        config={"x": 1},
        context=None,
        code={"lang": "py"},
        reasoning=["step"],
        safety_boundaries={"s": 1},
        max_retries=7,
        budget_limit=None,
        metadata={"m": True},
        last_error="boom",
        runtime=1234,
    )
    assert updated is not None
    assert (updated.label, updated.model, updated.task) == (None, "m", "new task")
    assert (updated.config, updated.context, updated.code, updated.reasoning) == (
        {"x": 1},
        None,
        {"lang": "py"},
        ["step"],
    )
    assert (updated.safety_boundaries, updated.max_retries, updated.budget_limit) == ({"s": 1}, 7, None)
    assert (updated.metadata, updated.last_error, updated.runtime) == ({"m": True}, "boom", 1234)
    assert (updated.status, updated.lifecycle_state) == (agent.status, agent.lifecycle_state)
    assert await repo.find_by_id(agent.id) == updated
    assert await repo.update(agent.id) == updated


def test_transition_table_shape() -> None:
    statuses = {s.value for s in AgentStatus}
    assert set(AGENT_STATUS_TRANSITIONS) == statuses
    for current, targets in AGENT_STATUS_TRANSITIONS.items():
        if current != "paused":  # paused is pause()'s, never update_status's
            assert current in targets  # same status is always a no-op success
    assert AGENT_STATUS_TRANSITIONS["completed"] == {"completed"}
    assert AGENT_STATUS_TRANSITIONS["failed"] == {"failed", "pending"}
    assert AGENT_LIFECYCLE_TRANSITIONS["destroyed"] == {"destroyed"}


async def test_update_status_rules(db: Database) -> None:
    swarm_id = await make_swarm(db)
    repo = AgentRepository(db)
    agent = await repo.create(swarm_id)
    running = await repo.update_status(agent.id, "running")
    assert running is not None and running.status == "running" and running.completed_at is None
    blocked = await repo.update_status(agent.id, "blocked", last_error="waiting on a lock")
    assert blocked is not None and blocked.last_error == "waiting on a lock"
    done = await repo.update_status(str(agent.id), "completed")
    assert done is not None and done.completed_at is not None
    assert done.last_error == "waiting on a lock"  # not given: kept
    # completed -> completed is a no-op success; completed_at stays.
    same = await repo.update_status(agent.id, "completed")
    assert same is not None and same.completed_at == done.completed_at
    before = await snapshot(db)
    for target in ("running", "pending", "failed", "killed", "blocked"):
        with pytest.raises(InvalidTransitionError) as err:
            await repo.update_status(agent.id, target)
        assert (err.value.entity, err.value.key, err.value.current) == ("agent", agent.id, "completed")
        assert target in err.value.requested
    assert await snapshot(db) == before

    other = await repo.create(swarm_id, status="running")
    failed = await repo.update_status(other.id, "failed", last_error="crash")
    assert failed is not None and failed.completed_at is not None and failed.last_error == "crash"
    with pytest.raises(InvalidTransitionError):
        await repo.update_status(other.id, "running")
    retried = await repo.update_status(other.id, "pending", last_error=None)
    assert retried is not None and retried.status == "pending"
    assert retried.completed_at is None and retried.last_error is None

    killed = await repo.create(swarm_id, status="running")
    assert (await repo.update_status(killed.id, "killed")).completed_at is not None  # type: ignore[union-attr]
    with pytest.raises(InvalidTransitionError) as err:
        await repo.update_status(killed.id, "failed")
    assert err.value.current == "killed"


async def test_lifecycle_destroyed_is_final(db: Database) -> None:
    swarm_id = await make_swarm(db)
    repo = AgentRepository(db)
    agent = await repo.create(swarm_id)
    for state in ("spawning", "running", "pausing", "paused", "resuming", "completing", "cleaning_up"):
        moved = await repo.update_lifecycle_state(agent.id, state)
        assert moved is not None and moved.lifecycle_state == state
    assert (await repo.update_lifecycle_state(agent.id, "initializing")).lifecycle_state == "initializing"  # type: ignore[union-attr]
    destroyed = await repo.update_lifecycle_state(agent.id, "destroyed")
    assert destroyed is not None and destroyed.lifecycle_state == "destroyed"
    assert destroyed.status == agent.status  # the lifecycle does not drive the status
    again = await repo.update_lifecycle_state(agent.id, "destroyed")
    assert again is not None and again.lifecycle_state == "destroyed"
    with pytest.raises(InvalidTransitionError) as err:
        await repo.update_lifecycle_state(agent.id, "running")
    assert err.value.current == "destroyed"
    assert (await repo.find_by_id(agent.id)).lifecycle_state == "destroyed"  # type: ignore[union-attr]


async def test_pause_and_resume(db: Database) -> None:
    swarm_id = await make_swarm(db)
    repo = AgentRepository(db)
    agent = await repo.create(swarm_id, status="running", lifecycle_state="running")
    paused = await repo.pause(agent.id, "operator")
    assert paused is not None
    assert (paused.status, paused.lifecycle_state, paused.paused_by) == ("paused", "paused", "operator")
    assert paused.pause_time is not None and paused.pause_time <= await db.fetchval("SELECT now()")
    with pytest.raises(InvalidTransitionError) as err:
        await repo.pause(agent.id, "again")
    assert (err.value.current, err.value.requested) == ("paused", "pause")
    assert (await repo.find_by_id(agent.id)).paused_by == "operator"  # type: ignore[union-attr]

    resumed = await repo.resume(str(agent.id))
    assert resumed is not None
    assert (resumed.status, resumed.lifecycle_state) == ("running", "running")
    assert (resumed.pause_time, resumed.paused_by, resumed.runtime) == (None, None, 0)

    for status in ("pending", "blocked"):
        other = await repo.create(swarm_id, status=status)
        assert (await repo.pause(other.id, "x")).status == "paused"  # type: ignore[union-attr]


async def test_pause_completed_and_resume_running_are_invalid(db: Database) -> None:
    swarm_id = await make_swarm(db)
    repo = AgentRepository(db)
    done = await repo.create(swarm_id, status="completed")
    running = await repo.create(swarm_id, status="running")
    before = await snapshot(db)
    with pytest.raises(InvalidTransitionError) as err:
        await repo.pause(done.id, "operator")
    assert (err.value.entity, err.value.key, err.value.current, err.value.requested) == (
        "agent",
        done.id,
        "completed",
        "pause",
    )
    with pytest.raises(InvalidTransitionError) as err:
        await repo.resume(running.id)
    assert (err.value.current, err.value.requested) == ("running", "resume")
    for status in ("failed", "killed"):
        other = await repo.create(swarm_id, status=status)
        with pytest.raises(InvalidTransitionError):
            await repo.pause(other.id, "operator")
        with pytest.raises(InvalidTransitionError):
            await repo.resume(other.id)
    await db.execute("DELETE FROM agents WHERE status IN ('failed', 'killed')")
    assert await snapshot(db) == before


async def test_retried_pause_and_resume_accept_the_lost_first_attempt(db: Database, settings: Any) -> None:
    swarm_id = await make_swarm(db)
    agent = await AgentRepository(db).create(swarm_id, status="running")
    await AgentRepository(db).pause(agent.id, "operator")  # the "lost" first attempt
    retry_db = RetryAttemptDatabase(settings)
    try:
        repo = AgentRepository(retry_db)
        again = await repo.pause(agent.id, "operator")
        assert again is not None and again.status == "paused" and again.paused_by == "operator"
        await AgentRepository(db).resume(agent.id)
        resumed = await repo.resume(agent.id)
        assert resumed is not None and resumed.status == "running"
        # A retry still refuses a state that is not the target.
        done = await AgentRepository(db).create(swarm_id, status="completed")
        with pytest.raises(InvalidTransitionError):
            await repo.pause(done.id, "operator")
    finally:
        await retry_db.close()


async def test_concurrent_pauses_one_wins_and_errors_see_the_new_state(db: Database) -> None:
    swarm_id = await make_swarm(db)
    repo = AgentRepository(db)
    agent = await repo.create(swarm_id, status="running")
    results = await asyncio.gather(
        *(repo.pause(agent.id, f"p{i}") for i in range(10)), return_exceptions=True
    )
    wins = [r for r in results if isinstance(r, Agent)]
    losses = [r for r in results if isinstance(r, InvalidTransitionError)]
    assert len(wins) == 1 and len(losses) == 9
    assert all(e.current == "paused" for e in losses)
    assert (await repo.find_by_id(agent.id)).paused_by == wins[0].paused_by  # type: ignore[union-attr]


async def test_increment_retry(db: Database) -> None:
    swarm_id = await make_swarm(db)
    repo = AgentRepository(db)
    agent = await repo.create(swarm_id, max_retries=0)
    one = await repo.increment_retry(agent.id)
    two = await repo.increment_retry(str(agent.id))
    assert one is not None and two is not None
    assert (one.retry_count, two.retry_count, two.max_retries) == (1, 2, 0)
    assert await db.fetchval("SELECT retry_count FROM agents WHERE id = $1", agent.id) == 2


async def test_update_status_refuses_paused_and_points_to_pause(db: Database) -> None:
    """Pausing records when, by whom and the lifecycle state; update_status cannot, so it refuses."""
    swarm_id = await make_swarm(db)
    repo = AgentRepository(db)
    agent = await repo.create(swarm_id, status="running", lifecycle_state="running")
    before = await snapshot(db)
    with pytest.raises(ValidationError) as err:
        await repo.update_status(agent.id, "paused")
    assert err.value.field == "status" and "pause(" in str(err.value)
    assert await snapshot(db) == before
    paused = await repo.pause(agent.id, "operator")
    assert paused is not None
    with pytest.raises(ValidationError):
        await repo.update_status(agent.id, "paused")  # also when it already is paused
    assert await repo.find_by_id(agent.id) == paused


async def test_update_status_does_not_resume_a_paused_agent(db: Database) -> None:
    """Leaving paused for pending / running / blocked is resume()'s job (it clears the pause marks
    and sets the lifecycle state); update_status refuses it, naming resume()."""
    swarm_id = await make_swarm(db)
    repo = AgentRepository(db)
    agent = await repo.create(swarm_id, status="running", lifecycle_state="running")
    paused = await repo.pause(agent.id, "operator")
    before = await snapshot(db)
    for target in ("running", "pending", "blocked"):
        with pytest.raises(InvalidTransitionError) as err:
            await repo.update_status(agent.id, target)
        assert err.value.current == "paused" and "resume()" in str(err.value)
    assert await snapshot(db) == before
    assert await repo.find_by_id(agent.id) == paused
    assert AGENT_STATUS_TRANSITIONS["paused"] == {"completed", "failed", "killed"}
    assert not any("paused" in targets for targets in AGENT_STATUS_TRANSITIONS.values())


async def test_stopping_a_paused_agent_clears_the_pause_marks(db: Database) -> None:
    """pause_time / paused_by describe the current pause: set exactly while the status is paused."""
    swarm_id = await make_swarm(db)
    repo = AgentRepository(db)
    for final in ("completed", "killed", "failed"):
        agent = await repo.create(swarm_id, status="running")
        await repo.pause(agent.id, "operator")
        stopped = await repo.update_status(agent.id, final, last_error="stopped while paused")
        assert stopped is not None and stopped.status == final and stopped.completed_at is not None
        assert (stopped.pause_time, stopped.paused_by) == (None, None)
    rerun = await repo.update_status(agent.id, "pending")  # failed -> pending: a re-run
    assert rerun is not None and (rerun.pause_time, rerun.paused_by) == (None, None)


async def test_create_paused_stamps_pause_time(db: Database) -> None:
    swarm_id = await make_swarm(db)
    repo = AgentRepository(db)
    before = await db.fetchval("SELECT now()")
    paused = await repo.create(swarm_id, status="paused")
    assert paused.pause_time is not None and paused.pause_time >= before and paused.paused_by is None
    assert (await repo.create(swarm_id, status="running")).pause_time is None


async def test_increment_retry_with_expected_is_a_compare_and_set(db: Database) -> None:
    swarm_id = await make_swarm(db)
    repo = AgentRepository(db)
    agent = await repo.create(swarm_id)
    one = await repo.increment_retry(agent.id, expected=0)
    assert one is not None and one.retry_count == 1
    before = await snapshot(db)
    with pytest.raises(ConflictError) as err:
        await repo.increment_retry(agent.id, expected=0)  # stale: it is 1 now
    assert "retry_count is 1" in str(err.value) and "expected 0" in str(err.value)
    assert await snapshot(db) == before
    two = await repo.increment_retry(str(agent.id), expected=1)
    assert two is not None and two.retry_count == 2
    assert await repo.increment_retry(uuid.uuid4(), expected=0) is None
    assert (await repo.increment_retry(agent.id, expected=None)).retry_count == 3  # type: ignore[union-attr]


async def test_concurrent_compare_and_set_increments_one_wins(db: Database) -> None:
    swarm_id = await make_swarm(db)
    repo = AgentRepository(db)
    agent = await repo.create(swarm_id)
    results = await asyncio.gather(
        *(repo.increment_retry(agent.id, expected=0) for _ in range(10)), return_exceptions=True
    )
    assert sum(isinstance(r, Agent) for r in results) == 1
    assert sum(isinstance(r, ConflictError) for r in results) == 9
    assert await db.fetchval("SELECT retry_count FROM agents WHERE id = $1", agent.id) == 1


class CommitAnswerLost(Database):
    """``run(transaction=True, retry=True)`` whose first attempt COMMITs (``commit=True``) or is
    rolled back (``commit=False``) and whose answer is lost; ``between`` runs before the retry
    (another caller's work); the retry is attempt 2 of the same function."""

    def __init__(self, settings: Any, *, commit: bool, between: Callable[[], Awaitable[Any]]) -> None:
        super().__init__(settings)
        self.commit = commit
        self.between = between
        self.retried: list[bool] = []

    async def run(self, fn: Any, *, retry: bool = False, transaction: bool = False) -> Any:
        self.retried.append(retry)
        if not retry:
            return await super().run(fn, transaction=transaction)

        class Lost(Exception):
            pass

        async def first(con: Any, _: int) -> Any:
            await fn(con, 1)
            if not self.commit:
                raise Lost  # rolled back, as when the connection breaks before COMMIT is answered

        try:
            await super().run(first, transaction=transaction)
        except Lost:
            pass
        await self.between()
        return await super().run(lambda con, _a: fn(con, 2), transaction=transaction)


async def test_increment_retry_with_expected_is_retried_and_applies_once(db: Database, settings: Any) -> None:
    """The compare-and-set variant is retried by the library: a retry after a lost COMMIT answer
    finds its own committed increment (and answers success), never adds a second one, and never
    takes another caller's increment for its own."""
    swarm_id = await make_swarm(db)
    repo = AgentRepository(db)

    async def nothing() -> None:
        return None

    async def scenario(commit: bool, between: Callable[[uuid.UUID], Awaitable[Any]]) -> tuple[Any, int]:
        agent = await repo.create(swarm_id)
        lossy = CommitAnswerLost(settings, commit=commit, between=lambda: between(agent.id))
        try:
            try:
                outcome: Any = await AgentRepository(lossy).increment_retry(agent.id, expected=0)
            except ConflictError as exc:
                outcome = exc
            assert lossy.retried == [True]  # asked for retries
        finally:
            await lossy.close()
        count = await db.fetchval("SELECT retry_count FROM agents WHERE id = $1", agent.id)
        return outcome, count

    # Committed, answer lost: the retry recognises its own increment.
    outcome, count = await scenario(True, lambda a: nothing())
    assert isinstance(outcome, Agent) and outcome.retry_count == 1 and count == 1
    # Committed, answer lost, then another caller went on from 1 to 2: still our success.
    outcome, count = await scenario(True, lambda a: repo.increment_retry(a, expected=1))
    assert isinstance(outcome, Agent) and outcome.retry_count == 2 and count == 2
    # Rolled back: the retry applies it (once).
    outcome, count = await scenario(False, lambda a: nothing())
    assert isinstance(outcome, Agent) and outcome.retry_count == 1 and count == 1
    # Rolled back while another caller with the same expectation won: that is not our success.
    outcome, count = await scenario(False, lambda a: repo.increment_retry(a, expected=0))
    assert isinstance(outcome, ConflictError) and count == 1
    # Without ``expected`` the increment stays relative and is never retried.
    plain = await repo.create(swarm_id)
    lossy = CommitAnswerLost(settings, commit=True, between=nothing)
    try:
        assert (await AgentRepository(lossy).increment_retry(plain.id)).retry_count == 1  # type: ignore[union-attr]
    finally:
        await lossy.close()


@pytest.mark.soak
@pytest.mark.direct_server("it kills the pooled connections' server processes mid-work")
async def test_compare_and_set_increments_while_connections_are_terminated(
    db: Database, settings: Any, make_database: MakeDatabase
) -> None:
    """Workers race to move one agent's retry_count by compare-and-set while the server terminates
    every connection in a loop: no step is ever claimed by two callers, and every claimed step is
    stored (the count exceeds the claims only by calls that failed with an unknown outcome)."""
    agent = await AgentRepository(db).create(await make_swarm(db))
    repo = AgentRepository(capped(await make_database(postgres_retry_attempts=6, postgres_retry_delay=10)))
    claimed: list[int] = []
    unknown = 0

    async def worker() -> None:
        nonlocal unknown
        for _ in range(sized(8, 40)):  # rounds per worker
            try:
                current = await repo.find_by_id(agent.id)
            except DashStorageError:
                continue
            assert current is not None
            try:
                moved = await repo.increment_retry(agent.id, expected=current.retry_count)
            except ConflictError:
                continue
            except DashStorageError:
                unknown += 1
                continue
            assert moved is not None and moved.retry_count > current.retry_count
            claimed.append(current.retry_count)

    async with terminating_connections(settings, interval=0.01) as killed:
        await asyncio.gather(*(worker() for _ in range(8)))
    assert killed[0] > 0 and claimed
    final = await db.fetchval("SELECT retry_count FROM agents WHERE id = $1", agent.id, retry=True)
    assert len(claimed) == len(set(claimed)), "one step claimed by two callers"
    assert len(claimed) <= final <= len(claimed) + unknown


async def test_get_activity(db: Database) -> None:
    s1, s2 = await make_swarm(db, "alpha"), await make_swarm(db, "beta")
    repo = AgentRepository(db)
    a = await repo.create(s1, label="a", model="m", status="running")
    b = await repo.create(s1, label="b")
    c = await repo.create(s2, label="c")
    await db.execute(
        "UPDATE agents SET spawned_at = now() - interval '10 seconds', completed_at = now() - interval "
        "'4 seconds', status = 'completed', runtime = 5000, retry_count = 2 WHERE id = $1",
        b.id,
    )
    rows = await repo.get_activity()
    assert all(isinstance(r, AgentActivity) for r in rows)
    assert [r.id for r in rows] == [c.id, a.id, b.id]  # newest spawn first
    assert [r.id for r in await repo.get_activity(swarm_id=s1)] == [a.id, b.id]
    only_b = await repo.get_activity(agent_id=b.id)
    assert len(only_b) == 1
    row = only_b[0]
    assert (row.swarm_id, row.swarm_name, row.label, row.status) == (s1, "alpha", "b", "completed")
    assert (row.duration_seconds, row.retry_count, row.runtime) == (Decimal(6), 2, 5000)
    assert await repo.get_activity(swarm_id=s2, agent_id=a.id) == []
    assert [r.id for r in await repo.get_activity(limit=1, offset=1)] == [a.id]
    assert (await repo.get_activity(agent_id=a.id))[0].duration_seconds >= 0


async def test_delete_and_delete_by_swarm(db: Database) -> None:
    s1, s2 = await make_swarm(db, "one"), await make_swarm(db, "two")
    repo = AgentRepository(db)
    a = await repo.create(s1)
    await repo.create(s1)
    await repo.create(s1)
    keep = await repo.create(s2)
    await db.execute("INSERT INTO events (swarm_id, agent_id, type) VALUES ($1, $2, 'x')", s1, a.id)
    assert await repo.delete(a.id) is True
    assert await repo.delete(a.id) is False
    assert await db.fetchval("SELECT agent_id FROM events") is None  # ON DELETE SET NULL
    assert await repo.delete_by_swarm_id(str(s1)) == 2
    assert await repo.delete_by_swarm_id(s1) == 0
    assert [x.id for x in await repo.list()] == [keep.id]


Call = Callable[[AgentRepository, uuid.UUID, uuid.UUID], Awaitable[Any]]

BAD_INPUT: list[tuple[str, Call, str]] = [
    ("create swarm_id", lambda r, s, a: r.create("swarm-1"), "swarm_id"),
    ("create swarm_id None", lambda r, s, a: r.create(None), "swarm_id"),  # type: ignore[arg-type]
    ("create id", lambda r, s, a: r.create(s, id="agent-1"), "id"),
    ("create status", lambda r, s, a: r.create(s, status="idle"), "status"),
    ("create lifecycle", lambda r, s, a: r.create(s, lifecycle_state="spawned"), "lifecycle_state"),
    ("create max_retries negative", lambda r, s, a: r.create(s, max_retries=-1), "max_retries"),
    ("create max_retries float", lambda r, s, a: r.create(s, max_retries=1.5), "max_retries"),  # type: ignore[arg-type]
    ("create max_retries None", lambda r, s, a: r.create(s, max_retries=None), "max_retries"),  # type: ignore[arg-type]
    ("create max_retries huge", lambda r, s, a: r.create(s, max_retries=2**31), "max_retries"),
    ("create budget NaN", lambda r, s, a: r.create(s, budget_limit=float("nan")), "budget_limit"),
    ("create budget Decimal NaN", lambda r, s, a: r.create(s, budget_limit=Decimal("NaN")), "budget_limit"),
    ("create budget negative", lambda r, s, a: r.create(s, budget_limit=-1), "budget_limit"),
    ("create budget too fine", lambda r, s, a: r.create(s, budget_limit="0.00000000001"), "budget_limit"),
    ("create budget bool", lambda r, s, a: r.create(s, budget_limit=True), "budget_limit"),
    ("create label long", lambda r, s, a: r.create(s, label="x" * 256), "label"),
    ("create model type", lambda r, s, a: r.create(s, model=42), "model"),  # type: ignore[arg-type]
    ("create task NUL", lambda r, s, a: r.create(s, task="a\x00b"), "task"),
    ("create config list", lambda r, s, a: r.create(s, config=[1]), "config"),  # type: ignore[arg-type]
    ("create metadata str", lambda r, s, a: r.create(s, metadata="{}"), "metadata"),  # type: ignore[arg-type]
    ("create context set", lambda r, s, a: r.create(s, context={1, 2}), "context"),
    ("create code inf", lambda r, s, a: r.create(s, code=[float("inf")]), "code"),
    ("create reasoning key", lambda r, s, a: r.create(s, reasoning={1: "x"}), "reasoning"),
    ("create safety object", lambda r, s, a: r.create(s, safety_boundaries=object()), "safety_boundaries"),
    ("find_by_id", lambda r, s, a: r.find_by_id("nope"), "id"),
    ("find_by_swarm_id", lambda r, s, a: r.find_by_swarm_id(1), "swarm_id"),  # type: ignore[arg-type]
    ("find_by_swarm_id limit", lambda r, s, a: r.find_by_swarm_id(s, limit=0), "limit"),
    ("find_by_swarm_id offset", lambda r, s, a: r.find_by_swarm_id(s, offset=-5), "offset"),
    ("list swarm_id", lambda r, s, a: r.list(swarm_id="x"), "swarm_id"),
    ("list status", lambda r, s, a: r.list(status="idle"), "status"),
    ("list lifecycle", lambda r, s, a: r.list(lifecycle_state="zombie"), "lifecycle_state"),
    ("list model long", lambda r, s, a: r.list(model="m" * 300), "model"),
    ("list order_by", lambda r, s, a: r.list(order_by="id"), "order_by"),
    ("list direction", lambda r, s, a: r.list(order_direction="up"), "order_direction"),
    ("list limit", lambda r, s, a: r.list(limit=10_001), "limit"),
    ("count status", lambda r, s, a: r.count(status="RUNNING"), "status"),
    ("count swarm_id", lambda r, s, a: r.count(swarm_id="nope"), "swarm_id"),
    ("counts swarm_id", lambda r, s, a: r.get_counts_by_status("nope"), "swarm_id"),
    ("update id", lambda r, s, a: r.update("nope", label="x"), "id"),
    ("update max_retries", lambda r, s, a: r.update(a, max_retries=-2), "max_retries"),
    ("update max_retries None", lambda r, s, a: r.update(a, max_retries=None), "max_retries"),  # type: ignore[arg-type]
    ("update budget NaN", lambda r, s, a: r.update(a, budget_limit=float("nan")), "budget_limit"),
    ("update runtime negative", lambda r, s, a: r.update(a, runtime=-1), "runtime"),
    ("update runtime None", lambda r, s, a: r.update(a, runtime=None), "runtime"),  # type: ignore[arg-type]
    ("update config None", lambda r, s, a: r.update(a, config=None), "config"),  # type: ignore[arg-type]
    ("update metadata list", lambda r, s, a: r.update(a, label="ok", metadata=[1]), "metadata"),  # type: ignore[arg-type]
    ("update label long", lambda r, s, a: r.update(a, label="l" * 256), "label"),
    ("update last_error type", lambda r, s, a: r.update(a, last_error=1), "last_error"),  # type: ignore[arg-type]
    ("update_status unknown", lambda r, s, a: r.update_status(a, "idle"), "status"),
    ("update_status id", lambda r, s, a: r.update_status("x", "running"), "id"),
    ("update_status last_error", lambda r, s, a: r.update_status(a, "failed", last_error=5), "last_error"),  # type: ignore[arg-type]
    ("update_lifecycle unknown", lambda r, s, a: r.update_lifecycle_state(a, "dead"), "state"),
    ("update_lifecycle id", lambda r, s, a: r.update_lifecycle_state(None, "running"), "id"),  # type: ignore[arg-type]
    ("pause id", lambda r, s, a: r.pause("x", "me"), "agent_id"),
    ("pause paused_by None", lambda r, s, a: r.pause(a, None), "paused_by"),  # type: ignore[arg-type]
    ("pause paused_by empty", lambda r, s, a: r.pause(a, ""), "paused_by"),
    ("pause paused_by long", lambda r, s, a: r.pause(a, "p" * 256), "paused_by"),
    ("resume id", lambda r, s, a: r.resume(123), "agent_id"),  # type: ignore[arg-type]
    ("increment_retry id", lambda r, s, a: r.increment_retry("x"), "id"),
    ("increment_retry id with expected", lambda r, s, a: r.increment_retry("x", expected=0), "id"),
    ("increment_retry expected negative", lambda r, s, a: r.increment_retry(a, expected=-1), "expected"),
    ("increment_retry expected float", lambda r, s, a: r.increment_retry(a, expected=0.0), "expected"),  # type: ignore[arg-type]
    ("increment_retry expected str", lambda r, s, a: r.increment_retry(a, expected="0"), "expected"),  # type: ignore[arg-type]
    ("increment_retry expected max", lambda r, s, a: r.increment_retry(a, expected=2**31 - 1), "expected"),
    ("update_status paused", lambda r, s, a: r.update_status(a, "paused"), "status"),
    ("activity swarm_id", lambda r, s, a: r.get_activity(swarm_id="x"), "swarm_id"),
    ("activity agent_id", lambda r, s, a: r.get_activity(agent_id="x"), "agent_id"),
    ("activity limit", lambda r, s, a: r.get_activity(limit=0), "limit"),
    ("delete id", lambda r, s, a: r.delete("x"), "id"),
    ("delete_by_swarm_id", lambda r, s, a: r.delete_by_swarm_id("x"), "swarm_id"),
]


@pytest.mark.parametrize(("call", "field"), [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
async def test_bad_input_is_rejected_and_changes_nothing(db: Database, call: Call, field: str) -> None:
    swarm_id = await make_swarm(db)
    repo = AgentRepository(db)
    agent = await repo.create(swarm_id, status="running", label="existing", max_retries=2)
    before = await snapshot(db)
    with pytest.raises(ValidationError) as err:
        await call(repo, swarm_id, agent.id)
    assert err.value.field == field
    assert field in str(err.value)
    assert await snapshot(db) == before

"""SwarmRepository against a real PostgreSQL: effects, ordering, summaries, bad input."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import pytest

from dash_storage import ConflictError, Database, ValidationError
from dash_storage.core.ids import new_id
from dash_storage.core.models import Swarm, SwarmSummary
from dash_storage.repositories.agents import AgentRepository
from dash_storage.repositories.swarms import SwarmRepository
from tests.factories import snapshot
from tests.faults.databases import RetryAttemptDatabase

UTC = dt.UTC


async def test_create_and_find(db: Database) -> None:
    repo = SwarmRepository(db)
    swarm = await repo.create(name="My Swarm", config={"max_agents": 10, "nested": {"a": [1, 2]}})
    assert isinstance(swarm, Swarm)
    assert swarm.name == "My Swarm"
    assert swarm.config == {"max_agents": 10, "nested": {"a": [1, 2]}}
    assert swarm.status == "creating"
    assert swarm.completed_at is None
    assert swarm.id.version == 7
    assert await repo.find_by_id(swarm.id) == swarm
    assert await repo.find_by_id(str(swarm.id)) == swarm
    row = await db.fetchrow("SELECT name, config, status FROM swarms WHERE id = $1", swarm.id)
    assert tuple(row) == ("My Swarm", {"max_agents": 10, "nested": {"a": [1, 2]}}, "creating")


async def test_create_defaults_and_status(db: Database) -> None:
    repo = SwarmRepository(db)
    swarm = await repo.create("s", None, "active")
    assert swarm.config == {} and swarm.status == "active"


async def test_create_honours_id_and_rejects_duplicate(db: Database) -> None:
    repo = SwarmRepository(db)
    given = uuid.uuid4()
    swarm = await repo.create("first", id=given)
    assert swarm.id == given
    with pytest.raises(ConflictError) as err:
        await repo.create("second", id=str(given))
    assert str(given) in str(err.value)
    assert (await repo.find_by_id(given)).name == "first"  # type: ignore[union-attr]
    assert await repo.count() == 1


async def test_retried_create_returns_the_row_of_the_lost_attempt(db: Database, settings: Any) -> None:
    first = await SwarmRepository(db).create("lost answer")
    retry_db = RetryAttemptDatabase(settings)  # the create's retry, as after a lost answer
    try:
        again = await SwarmRepository(retry_db).create("lost answer", id=first.id)
    finally:
        await retry_db.close()
    assert again == first
    assert await SwarmRepository(db).count() == 1


async def test_find_missing_returns_none(db: Database) -> None:
    repo = SwarmRepository(db)
    assert await repo.find_by_id(uuid.uuid4()) is None
    assert await repo.find_by_name("nobody") is None
    assert await repo.exists(uuid.uuid4()) is False
    assert await repo.get_summary(uuid.uuid4()) is None


async def test_find_by_name_returns_newest_with_ties_by_id(db: Database) -> None:
    repo = SwarmRepository(db)
    old = await repo.create("dup")
    mid = await repo.create("dup")
    await repo.create("other")
    await db.execute("UPDATE swarms SET created_at = now() - interval '1 hour' WHERE id = $1", mid.id)
    found = await repo.find_by_name("dup")
    assert found is not None and found.id == old.id  # mid is older now
    # Same created_at: the larger id wins.
    ids = sorted([uuid.uuid4(), uuid.uuid4()])
    await db.execute(
        "INSERT INTO swarms (id, name, created_at) "
        "VALUES ($1, 'tie', '2020-01-01Z'), ($2, 'tie', '2020-01-01Z')",
        *ids,
    )
    found = await repo.find_by_name("tie")
    assert found is not None and found.id == ids[1]


async def test_list_filters_orders_and_pages(db: Database) -> None:
    repo = SwarmRepository(db)
    # Six swarms with the same created_at: ordering must fall back to id.
    ids = sorted(new_id() for _ in range(6))
    statuses = ["active", "active", "creating", "paused", "active", "failed"]
    names = ["c", "a", "b", "a", "d", "a"]
    for i, sid in enumerate(ids):
        await db.execute(
            "INSERT INTO swarms (id, name, status, created_at) VALUES ($1, $2, $3, '2024-01-01Z')",
            sid,
            names[i],
            statuses[i],
        )
    listed = await repo.list()
    assert [s.id for s in listed] == ids[::-1]  # created_at DESC, id DESC
    asc = await repo.list(order_direction="asc")
    assert [s.id for s in asc] == ids
    active = await repo.list(status="active", order_direction="ASC")
    assert [s.id for s in active] == [ids[0], ids[1], ids[4]]
    by_name = await repo.list(order_by="name", order_direction="asc")
    assert [s.name for s in by_name] == ["a", "a", "a", "b", "c", "d"]
    assert [s.id for s in by_name[:3]] == [ids[1], ids[3], ids[5]]
    by_status = await repo.list(order_by="status", order_direction="desc")
    assert [s.status for s in by_status] == ["paused", "failed", "creating", "active", "active", "active"]
    assert [s.id for s in by_status[3:]] == [ids[4], ids[1], ids[0]]
    # Paging walks the same order without gaps or repeats.
    pages = [await repo.list(limit=4, offset=0), await repo.list(limit=4, offset=4)]
    assert [s.id for p in pages for s in p] == ids[::-1]
    assert await repo.list(limit=2, offset=10) == []
    await db.execute("UPDATE swarms SET name = 'zz' WHERE id = $1", ids[2])
    by_updated = await repo.list(order_by="updated_at")
    assert by_updated[0].id == ids[2]


async def test_list_default_limit_is_100(db: Database) -> None:
    await db.execute("INSERT INTO swarms (name) SELECT 's' || g FROM generate_series(1, 105) g")
    repo = SwarmRepository(db)
    assert len(await repo.list()) == 100
    assert len(await repo.list(limit=105)) == 105


async def test_count_and_exists(db: Database) -> None:
    repo = SwarmRepository(db)
    assert await repo.count() == 0
    a = await repo.create("a", status="active")
    await repo.create("b")
    await repo.create("c", status="active")
    assert await repo.count() == 3
    assert await repo.count(status="active") == 2
    assert await repo.count(status="destroyed") == 0
    assert await repo.exists(a.id) is True
    assert await repo.exists(str(a.id)) is True


async def test_update_partial(db: Database) -> None:
    repo = SwarmRepository(db)
    swarm = await repo.create("old", config={"a": 1})
    updated = await repo.update(swarm.id, name="new")
    assert updated is not None
    assert (updated.name, updated.config, updated.status) == ("new", {"a": 1}, "creating")
    assert updated.updated_at >= swarm.updated_at
    when = dt.datetime(2025, 5, 1, 12, 0, tzinfo=UTC)
    updated = await repo.update(swarm.id, config={}, status="completed", completed_at=when)
    assert updated is not None
    assert (updated.config, updated.status, updated.completed_at) == ({}, "completed", when)
    updated = await repo.update(swarm.id, completed_at=None)
    assert updated is not None and updated.completed_at is None and updated.status == "completed"
    # Nothing to set: the current row.
    assert await repo.update(swarm.id) == await repo.find_by_id(swarm.id)
    assert await repo.update(uuid.uuid4(), name="x") is None
    assert await repo.update(uuid.uuid4()) is None


async def test_update_status_stamps_completed_at_once(db: Database) -> None:
    repo = SwarmRepository(db)
    swarm = await repo.create("s")
    active = await repo.update_status(swarm.id, "active")
    assert active is not None and active.status == "active" and active.completed_at is None
    done = await repo.update_status(swarm.id, "completed")
    assert done is not None and done.completed_at is not None
    db_now = await db.fetchval("SELECT now()")
    assert done.completed_at <= db_now
    again = await repo.update_status(swarm.id, "destroyed")
    assert again is not None and again.status == "destroyed" and again.completed_at == done.completed_at
    back = await repo.update_status(swarm.id, "active")
    assert back is not None and back.completed_at is None
    failed = await repo.update_status(swarm.id, "failed")
    assert failed is not None and failed.completed_at is not None
    assert await repo.update_status(uuid.uuid4(), "failed") is None


async def test_delete_cascades(db: Database) -> None:
    repo = SwarmRepository(db)
    swarm = await repo.create("s")
    keep = await repo.create("keep")
    agents = AgentRepository(db)
    await agents.create(swarm.id)
    await agents.create(keep.id)
    assert await repo.delete(swarm.id) is True
    assert await repo.delete(swarm.id) is False
    assert await repo.find_by_id(swarm.id) is None
    assert await db.fetchval("SELECT count(*) FROM agents") == 1
    assert await repo.exists(keep.id)


async def _budget(db: Database, swarm_id: uuid.UUID, allocated: str, consumed: str) -> None:
    await db.execute(
        "INSERT INTO budgets (swarm_id, scope_type, scope_id, allocated, consumed) "
        "VALUES ($1, 'swarm', $1, $2::numeric, $3::numeric)",
        swarm_id,
        allocated,
        consumed,
    )


async def test_summary_one_row_per_swarm(db: Database) -> None:
    repo = SwarmRepository(db)
    agents = AgentRepository(db)
    swarm = await repo.create("with everything", status="active")
    for status in ("running", "running", "pending", "completed"):
        await agents.create(swarm.id, status=status)
    await _budget(db, swarm.id, "10", "2.5")
    # Agent- and project-scope budgets of the same swarm must not multiply the row.
    for scope in ("agent", "project"):
        await db.execute(
            "INSERT INTO budgets (swarm_id, scope_type, scope_id, allocated) VALUES ($1, $2, $3, 99)",
            swarm.id,
            scope,
            uuid.uuid4(),
        )
    empty = await repo.create("empty")

    summary = await repo.get_summary(swarm.id)
    assert summary == SwarmSummary(
        id=swarm.id,
        name="with everything",
        status="active",
        created_at=swarm.created_at,
        running_agents=2,
        total_agents=4,
        budget_allocated=Decimal("10"),
        budget_consumed=Decimal("2.5"),
        budget_percentage=Decimal("25.00"),
    )
    bare = await repo.get_summary(str(empty.id))
    assert bare is not None
    assert (bare.running_agents, bare.total_agents, bare.budget_allocated, bare.budget_percentage) == (
        0,
        0,
        0,
        None,  # no swarm budget: no percentage
    )

    summaries = await repo.list_summaries()
    assert [s.id for s in summaries] == [empty.id, swarm.id]  # newest first, one row each
    assert [s.id for s in await repo.list_summaries(status="active")] == [swarm.id]
    assert [s.id for s in await repo.list_summaries(limit=1, offset=1)] == [swarm.id]
    assert await repo.list_summaries(status="failed") == []


Call = Callable[[SwarmRepository, uuid.UUID], Awaitable[Any]]

BAD_INPUT: list[tuple[str, Call, str]] = [
    ("create name missing", lambda r, i: r.create(None), "name"),  # type: ignore[arg-type]
    ("create name empty", lambda r, i: r.create("  "), "name"),
    ("create name too long", lambda r, i: r.create("x" * 256), "name"),
    ("create name not str", lambda r, i: r.create(5), "name"),  # type: ignore[arg-type]
    ("create config list", lambda r, i: r.create("n", [1]), "config"),  # type: ignore[arg-type]
    ("create config NaN", lambda r, i: r.create("n", {"a": float("nan")}), "config"),
    ("create config bad value", lambda r, i: r.create("n", {"a": object()}), "config"),
    ("create status unknown", lambda r, i: r.create("n", status="running"), "status"),
    ("create id not uuid", lambda r, i: r.create("n", id="swarm-1"), "id"),
    ("find_by_id not uuid", lambda r, i: r.find_by_id("nope"), "id"),
    ("find_by_id int", lambda r, i: r.find_by_id(5), "id"),  # type: ignore[arg-type]
    ("find_by_name long", lambda r, i: r.find_by_name("x" * 300), "name"),
    ("find_by_name none", lambda r, i: r.find_by_name(None), "name"),  # type: ignore[arg-type]
    ("list status", lambda r, i: r.list(status="nope"), "status"),
    ("list limit 0", lambda r, i: r.list(limit=0), "limit"),
    ("list limit huge", lambda r, i: r.list(limit=10**9), "limit"),
    ("list limit str", lambda r, i: r.list(limit="5"), "limit"),  # type: ignore[arg-type]
    ("list offset negative", lambda r, i: r.list(offset=-1), "offset"),
    ("list order_by", lambda r, i: r.list(order_by="id; DROP TABLE swarms"), "order_by"),
    ("list direction", lambda r, i: r.list(order_direction="sideways"), "order_direction"),
    ("count status", lambda r, i: r.count(status="bogus"), "status"),
    ("exists not uuid", lambda r, i: r.exists("x"), "id"),
    ("update id", lambda r, i: r.update("x", name="n"), "id"),
    ("update name None", lambda r, i: r.update(i, name=None), "name"),  # type: ignore[arg-type]
    ("update name long", lambda r, i: r.update(i, name="n" * 256), "name"),
    ("update config None", lambda r, i: r.update(i, config=None), "config"),  # type: ignore[arg-type]
    ("update config str", lambda r, i: r.update(i, config="{}"), "config"),  # type: ignore[arg-type]
    ("update status", lambda r, i: r.update(i, status="gone"), "status"),
    ("update status None", lambda r, i: r.update(i, status=None), "status"),  # type: ignore[arg-type]
    (
        "update completed_at naive",
        lambda r, i: r.update(i, name="ok", completed_at=dt.datetime(2025, 1, 1)),
        "completed_at",
    ),
    (
        "update completed_at str",
        lambda r, i: r.update(i, completed_at="2025-01-01"),  # type: ignore[arg-type]
        "completed_at",
    ),
    ("update_status unknown", lambda r, i: r.update_status(i, "done"), "status"),
    ("update_status id", lambda r, i: r.update_status("1", "active"), "id"),
    ("delete id", lambda r, i: r.delete("nope"), "id"),
    ("get_summary id", lambda r, i: r.get_summary(3.5), "id"),  # type: ignore[arg-type]
    ("list_summaries status", lambda r, i: r.list_summaries(status="x"), "status"),
    ("list_summaries limit", lambda r, i: r.list_summaries(limit=-1), "limit"),
    ("list_summaries offset", lambda r, i: r.list_summaries(offset=True), "offset"),
]


@pytest.mark.parametrize(("call", "field"), [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
async def test_bad_input_is_rejected_and_changes_nothing(db: Database, call: Call, field: str) -> None:
    repo = SwarmRepository(db)
    swarm = await repo.create("existing", config={"k": "v"})
    before = await snapshot(db)
    with pytest.raises(ValidationError) as err:
        await call(repo, swarm.id)
    assert err.value.field == field
    assert field in str(err.value)
    assert await snapshot(db) == before

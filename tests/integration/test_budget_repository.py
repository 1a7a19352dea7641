"""BudgetRepository against a real PostgreSQL: CRUD, the one-statement consume under concurrency,
idempotency, bad amounts, limits reached exactly, usage reports and reset."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from decimal import Decimal
from typing import Any

import pytest

from dash_storage.core.database import Database
from dash_storage.core.errors import ConflictError, NotFoundError, ValidationError
from dash_storage.core.models import Budget, ConsumeStatus
from dash_storage.repositories.budgets import BudgetRepository
from tests.conftest import MakeDatabase
from tests.factories import make_agent, make_budget, make_swarm


async def ledger(db: Database, budget_id: uuid.UUID) -> tuple[int, int, Decimal]:
    """(rows, sum of tokens, sum of cost) of a budget's ledger."""
    row = await db.fetchrow(
        "SELECT count(*), COALESCE(sum(tokens), 0), COALESCE(sum(cost), 0) FROM budget_ledger "
        "WHERE budget_id = $1",
        budget_id,
    )
    assert row is not None
    return int(row[0]), int(row[1]), row[2]


async def snapshot(db: Database) -> list[Any]:
    """Everything a consume could change, for 'nothing changed' checks."""
    budgets = await db.fetch("SELECT * FROM budgets ORDER BY id")
    entries = await db.fetch("SELECT * FROM budget_ledger ORDER BY id")
    return [tuple(r) for r in budgets] + [tuple(r) for r in entries]


@pytest.fixture
def repo(db: Database) -> BudgetRepository:
    return BudgetRepository(db)


async def swarm_budget(db: Database, repo: BudgetRepository, **kwargs: Any) -> Budget:
    swarm = await make_swarm(db)
    return await repo.create("swarm", swarm, **kwargs)


# -- create / read ----------------------------------------------------------------------------------


async def test_create_swarm_scope_defaults(db: Database, repo: BudgetRepository) -> None:
    swarm = await make_swarm(db)
    budget = await repo.create("swarm", swarm)
    assert budget.swarm_id == swarm and budget.scope_id == swarm and budget.scope_type == "swarm"
    assert (budget.allocated, budget.consumed, budget.currency) == (0, 0, "USD")
    assert (budget.max_tokens, budget.used_tokens) == (None, 0)
    assert budget.id.version == 7
    assert await repo.find_by_id(budget.id) == budget
    assert await repo.find_by_scope("swarm", swarm) == budget


async def test_create_with_every_field(db: Database, repo: BudgetRepository) -> None:
    swarm = await make_swarm(db)
    agent = await make_agent(db, swarm)
    given = uuid.uuid4()
    budget = await repo.create(
        "agent",
        str(agent),
        swarm_id=str(swarm),
        allocated="12.3456789012",
        currency="EUR",
        max_tokens=0,
        id=given,
    )
    assert budget.id == given
    assert (budget.scope_type, budget.scope_id, budget.swarm_id) == ("agent", agent, swarm)
    assert budget.allocated == Decimal("12.3456789012")
    assert (budget.currency, budget.max_tokens) == ("EUR", 0)
    project = await repo.create("project", uuid.uuid4(), allocated=5.5)
    assert project.swarm_id is None and project.allocated == Decimal("5.5")


async def test_create_conflicts(db: Database, repo: BudgetRepository) -> None:
    swarm = await make_swarm(db)
    first = await repo.create("swarm", swarm, allocated=1)
    with pytest.raises(ConflictError):
        await repo.create("swarm", swarm, allocated=2)  # one budget per scope
    with pytest.raises(ConflictError):
        await repo.create("project", uuid.uuid4(), id=first.id)
    assert [b.id for b in await repo.list()] == [first.id]


async def test_create_for_a_missing_swarm_is_not_found(db: Database, repo: BudgetRepository) -> None:
    missing = uuid.uuid4()
    with pytest.raises(NotFoundError) as err:
        await repo.create("swarm", missing)
    assert (err.value.entity, err.value.key) == ("swarm", missing)
    assert str(err.value) == f"swarm {missing} not found"
    with pytest.raises(NotFoundError) as err:
        await repo.create("agent", uuid.uuid4(), swarm_id=missing, allocated=1)
    assert (err.value.entity, err.value.key) == ("swarm", missing)
    assert await repo.list() == []


@pytest.mark.parametrize(
    ("args", "kwargs", "field"),
    [
        (("team", None), {}, "scope_type"),
        (("swarm", "not-a-uuid"), {}, "scope_id"),
        (("swarm", None), {"swarm_id": uuid.uuid4()}, "swarm_id"),
        (("project", None), {"swarm_id": "x"}, "swarm_id"),
        (("project", None), {"allocated": -1}, "allocated"),
        (("project", None), {"allocated": "NaN"}, "allocated"),
        (("project", None), {"allocated": Decimal("1e-11")}, "allocated"),
        (("project", None), {"allocated": None}, "allocated"),
        (("project", None), {"currency": "JPY"}, "currency"),
        (("project", None), {"max_tokens": -1}, "max_tokens"),
        (("project", None), {"max_tokens": 1.5}, "max_tokens"),
        (("project", None), {"id": "nope"}, "id"),
    ],
)
async def test_create_rejects_bad_input(
    db: Database, repo: BudgetRepository, args: tuple[str, Any], kwargs: dict[str, Any], field: str
) -> None:
    scope_id = args[1] if args[1] is not None else await make_swarm(db)
    with pytest.raises(ValidationError) as info:
        await repo.create(args[0], scope_id, **kwargs)
    assert info.value.field == field
    assert await db.fetchval("SELECT count(*) FROM budgets") == 0


async def test_find_missing_is_none(repo: BudgetRepository) -> None:
    assert await repo.find_by_id(uuid.uuid4()) is None
    assert await repo.find_by_scope("agent", uuid.uuid4()) is None
    assert await repo.find_by_swarm_id(uuid.uuid4()) == []
    assert await repo.get_usage(uuid.uuid4()) is None
    assert await repo.get_usage_by_scope("swarm", uuid.uuid4()) is None
    assert await repo.is_exceeded(uuid.uuid4()) is None
    assert await repo.update(uuid.uuid4(), allocated=1) is None
    assert await repo.reset_consumption(uuid.uuid4()) is None
    assert await repo.delete(uuid.uuid4()) is False


async def test_find_by_swarm_id_and_list(db: Database, repo: BudgetRepository) -> None:
    swarm, other = await make_swarm(db), await make_swarm(db)
    agents = [await make_agent(db, swarm) for _ in range(3)]
    agent_budgets = [
        await repo.create("agent", a, swarm_id=swarm, allocated=10 - i) for i, a in enumerate(agents)
    ]
    swarm_b = await repo.create("swarm", swarm, allocated=100)
    other_b = await repo.create("swarm", other, allocated=7)
    project_b = await repo.create("project", uuid.uuid4(), allocated=3)
    assert [b.id for b in await repo.find_by_swarm_id(swarm)] == [swarm_b.id] + [b.id for b in agent_budgets]
    assert await repo.find_by_swarm_id(swarm, limit=2) == [swarm_b, agent_budgets[0]]

    everything = [*agent_budgets, swarm_b, other_b, project_b]
    by_created = sorted(everything, key=lambda b: (b.created_at, b.id), reverse=True)
    assert await repo.list() == by_created
    assert await repo.list(limit=2, offset=1) == by_created[1:3]
    assert await repo.list(scope_type="swarm", order_by="allocated", order_direction="asc") == [
        other_b,
        swarm_b,
    ]
    assert await repo.list(
        swarm_id=swarm, scope_type="agent", order_by="allocated", order_direction="asc"
    ) == [
        agent_budgets[2],
        agent_budgets[1],
        agent_budgets[0],
    ]
    assert await repo.list(scope_type="project") == [project_b]
    await repo.consume_budget(project_b.id, 0, 1)
    assert (await repo.list(order_by="consumed"))[0].id == project_b.id
    with pytest.raises(ValidationError) as info:
        await repo.list(order_by="currency; DROP TABLE budgets")
    assert info.value.field == "order_by"
    with pytest.raises(ValidationError) as info:
        await repo.list(order_direction="up")
    assert info.value.field == "order_direction"
    with pytest.raises(ValidationError) as info:
        await repo.list(limit=0)
    assert info.value.field == "limit"
    with pytest.raises(ValidationError) as info:
        await repo.list(offset=-1)
    assert info.value.field == "offset"
    with pytest.raises(ValidationError) as info:
        await repo.list(scope_type="team")
    assert info.value.field == "scope_type"


# -- update / delete --------------------------------------------------------------------------------


async def test_update(db: Database, repo: BudgetRepository) -> None:
    budget = await swarm_budget(db, repo, allocated=10, max_tokens=100)
    assert await repo.consume_budget(budget.id, 40, Decimal("4"))
    updated = await repo.update(budget.id, allocated="4.0000", currency="GBP", max_tokens=None)
    assert updated is not None
    assert (updated.allocated, updated.currency, updated.max_tokens) == (4, "GBP", None)
    assert updated.updated_at >= budget.updated_at
    assert await repo.update(budget.id) == updated  # nothing to change: the current row
    again = await repo.update(budget.id, max_tokens=40)
    assert again is not None and again.max_tokens == 40 and again.currency == "GBP"


async def test_update_below_consumption_is_rejected(db: Database, repo: BudgetRepository) -> None:
    budget = await swarm_budget(db, repo, allocated=10, max_tokens=100)
    assert await repo.consume_budget(budget.id, 40, Decimal("4"))
    before = await snapshot(db)
    with pytest.raises(ValidationError) as info:
        await repo.update(budget.id, allocated="3.9999999999")
    assert info.value.field == "allocated"
    with pytest.raises(ValidationError) as info:
        await repo.update(budget.id, max_tokens=39)
    assert info.value.field == "max_tokens"
    for kwargs, field in (
        ({"allocated": -1}, "allocated"),
        ({"allocated": None}, "allocated"),
        ({"allocated": 1e-12}, "allocated"),
        ({"currency": None}, "currency"),
        ({"currency": "usd"}, "currency"),
        ({"max_tokens": -5}, "max_tokens"),
    ):
        with pytest.raises(ValidationError) as info:
            await repo.update(budget.id, **kwargs)
        assert info.value.field == field
    with pytest.raises(ValidationError) as info:
        await repo.update("nope", allocated=1)
    assert info.value.field == "id"
    assert await snapshot(db) == before


async def test_delete_cascades_to_ledger(db: Database, repo: BudgetRepository) -> None:
    budget = await swarm_budget(db, repo, allocated=1)
    assert await repo.consume_budget(budget.id, 1, "0.5")
    assert await repo.delete(budget.id) is True
    assert await repo.find_by_id(budget.id) is None
    assert await db.fetchval("SELECT count(*) FROM budget_ledger") == 0
    assert await repo.delete(budget.id) is False


# -- consume: concurrency ---------------------------------------------------------------------------


async def test_1000_concurrent_consumes_never_overspend_cost(
    db: Database, make_database: MakeDatabase
) -> None:
    budget = await swarm_budget(db, BudgetRepository(db), allocated=Decimal("1.00"))
    big = await make_database(postgres_max_pool_size=20)
    repo = BudgetRepository(big)
    results = await asyncio.gather(*(repo.try_consume(budget.id, 1, Decimal("0.01")) for _ in range(1000)))
    statuses = Counter(r.status for r in results)
    assert statuses == {ConsumeStatus.GRANTED: 100, ConsumeStatus.INSUFFICIENT: 900}
    after = await repo.find_by_id(budget.id)
    assert after is not None
    assert after.consumed == Decimal("1.00")
    assert after.used_tokens == 100
    assert await ledger(db, budget.id) == (100, 100, Decimal("1.00"))
    assert await repo.is_exceeded(budget.id) is True
    # Every granted answer carries the budget right after its own charge: 100 distinct states.
    granted = sorted(r.budget.consumed for r in results if r.status is ConsumeStatus.GRANTED and r.budget)
    assert granted == [Decimal("0.01") * i for i in range(1, 101)]


async def test_1000_concurrent_consumes_never_overspend_tokens(
    db: Database, make_database: MakeDatabase
) -> None:
    budget = await swarm_budget(db, BudgetRepository(db), allocated=1000, max_tokens=1000)
    repo = BudgetRepository(await make_database(postgres_max_pool_size=20))
    granted = await asyncio.gather(*(repo.consume_budget(budget.id, 10, Decimal("0.5")) for _ in range(1000)))
    assert granted.count(True) == 100
    after = await repo.find_by_id(budget.id)
    assert after is not None
    assert (after.used_tokens, after.consumed) == (1000, Decimal("50"))
    assert await ledger(db, budget.id) == (100, 1000, Decimal("50"))
    assert await repo.is_exceeded(budget.id) is True


async def test_concurrent_consumes_across_budgets_are_independent(
    db: Database, make_database: MakeDatabase
) -> None:
    repo = BudgetRepository(await make_database(postgres_max_pool_size=20))
    budgets = [await swarm_budget(db, repo, allocated=Decimal("0.10")) for _ in range(5)]
    calls = [repo.consume_budget(b.id, 0, Decimal("0.01")) for b in budgets for _ in range(30)]
    assert (await asyncio.gather(*calls)).count(True) == 50
    for b in budgets:
        assert await ledger(db, b.id) == (10, 0, Decimal("0.10"))


# -- consume: idempotency ---------------------------------------------------------------------------


async def test_same_idempotency_key_charges_once(db: Database, repo: BudgetRepository) -> None:
    budget = await swarm_budget(db, repo, allocated=1, max_tokens=100)
    first = await repo.try_consume(budget.id, 10, "0.25", idempotency_key="call-1")
    second = await repo.try_consume(budget.id, 10, Decimal("0.250"), idempotency_key="call-1")
    assert first.status is ConsumeStatus.GRANTED and first.granted
    assert second.status is ConsumeStatus.DUPLICATE and second.granted
    assert first.idempotency_key == second.idempotency_key == "call-1"
    assert second.budget == first.budget  # nothing changed in between
    assert await repo.consume_budget(budget.id, 10, "0.25", idempotency_key="call-1") is True
    assert await ledger(db, budget.id) == (1, 10, Decimal("0.25"))
    after = await repo.find_by_id(budget.id)
    assert after is not None and (after.consumed, after.used_tokens) == (Decimal("0.25"), 10)
    # The same key on another budget is another charge.
    other = await swarm_budget(db, repo, allocated=1)
    assert (
        await repo.try_consume(other.id, 10, "0.25", idempotency_key="call-1")
    ).status is ConsumeStatus.GRANTED


async def test_same_key_with_different_amounts_is_conflict(db: Database, repo: BudgetRepository) -> None:
    budget = await swarm_budget(db, repo, allocated=1)
    assert await repo.consume_budget(budget.id, 10, "0.25", idempotency_key="k")
    before = await snapshot(db)
    with pytest.raises(ConflictError):
        await repo.consume_budget(budget.id, 10, "0.26", idempotency_key="k")
    with pytest.raises(ConflictError):
        await repo.consume_budget(budget.id, 11, "0.25", idempotency_key="k")
    assert await snapshot(db) == before


async def test_without_key_every_call_is_a_new_charge(db: Database, repo: BudgetRepository) -> None:
    budget = await swarm_budget(db, repo, allocated=1)
    a = await repo.try_consume(budget.id, 0, "0.1")
    b = await repo.try_consume(budget.id, 0, "0.1")
    assert a.status is b.status is ConsumeStatus.GRANTED
    assert a.idempotency_key != b.idempotency_key
    assert await ledger(db, budget.id) == (2, 0, Decimal("0.2"))


async def test_20_concurrent_calls_with_one_key_charge_once(
    db: Database, make_database: MakeDatabase
) -> None:
    repo = BudgetRepository(await make_database(postgres_max_pool_size=20))
    for allocated in (Decimal("10"), Decimal("0.01")):  # plenty of room; room for exactly one charge
        budget = await swarm_budget(db, repo, allocated=allocated)
        results = await asyncio.gather(
            *(repo.try_consume(budget.id, 5, Decimal("0.01"), idempotency_key="same") for _ in range(20))
        )
        assert all(r.granted for r in results), Counter(r.status for r in results)
        assert Counter(r.status for r in results) == {ConsumeStatus.GRANTED: 1, ConsumeStatus.DUPLICATE: 19}
        assert await ledger(db, budget.id) == (1, 5, Decimal("0.01"))
        after = await repo.find_by_id(budget.id)
        assert after is not None and (after.consumed, after.used_tokens) == (Decimal("0.01"), 5)


async def test_insufficient_is_not_recorded(db: Database, repo: BudgetRepository) -> None:
    budget = await swarm_budget(db, repo, allocated="0.5")
    result = await repo.try_consume(budget.id, 0, 1, idempotency_key="k")
    assert result.status is ConsumeStatus.INSUFFICIENT and not result.granted
    assert result.budget == budget
    assert await ledger(db, budget.id) == (0, 0, 0)
    await repo.update(budget.id, allocated=2)
    assert (await repo.try_consume(budget.id, 0, 1, idempotency_key="k")).status is ConsumeStatus.GRANTED


# -- consume: bad input, missing budget, limits -----------------------------------------------------


@pytest.mark.parametrize(
    "cost",
    [
        -1,
        Decimal("-0.01"),
        float("nan"),
        Decimal("NaN"),
        "NaN",
        float("inf"),
        Decimal("-Infinity"),
        "Infinity",
        Decimal("1e-11"),
        1e-11,
        "0.00000000001",
        Decimal("1e14"),
        None,
        True,
        "ten",
        [1],
    ],
)
async def test_bad_cost_is_rejected_and_changes_nothing(
    db: Database, repo: BudgetRepository, cost: Any
) -> None:
    budget = await swarm_budget(db, repo, allocated=100)
    before = await snapshot(db)
    with pytest.raises(ValidationError) as info:
        await repo.consume_budget(budget.id, 1, cost)
    assert info.value.field == "cost"
    with pytest.raises(ValidationError):
        await repo.try_consume(budget.id, 1, cost)
    assert await snapshot(db) == before


async def test_smallest_allowed_cost_is_charged_exactly(db: Database, repo: BudgetRepository) -> None:
    budget = await swarm_budget(db, repo, allocated="0.0000000002")
    assert await repo.consume_budget(budget.id, 0, Decimal("1e-10"))
    assert await repo.consume_budget(budget.id, 0, "0.0000000001")
    assert not await repo.consume_budget(budget.id, 0, Decimal("1e-10"))
    after = await repo.find_by_id(budget.id)
    assert after is not None and after.consumed == Decimal("0.0000000002")


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("x", 1, 1), "budget_id"),
        ((None, 1, 1), "budget_id"),
        ((..., -1, 1), "tokens"),
        ((..., 1.5, 1), "tokens"),
        ((..., True, 1), "tokens"),
        ((..., 2**63, 1), "tokens"),
        ((..., None, 1), "tokens"),
        ((..., 1, 1, ""), "idempotency_key"),
        ((..., 1, 1, 5), "idempotency_key"),
        ((..., 1, 1, "k" * 256), "idempotency_key"),
    ],
)
async def test_bad_consume_arguments(
    db: Database, repo: BudgetRepository, args: tuple[Any, ...], field: str
) -> None:
    budget = await swarm_budget(db, repo, allocated=100)
    call = tuple(budget.id if a is ... else a for a in args)
    before = await snapshot(db)
    with pytest.raises(ValidationError) as info:
        await repo.try_consume(*call)
    assert info.value.field == field
    assert await snapshot(db) == before


async def test_missing_budget(repo: BudgetRepository) -> None:
    missing = uuid.uuid4()
    result = await repo.try_consume(missing, 1, "0.01")
    assert result.status is ConsumeStatus.NOT_FOUND and not result.granted
    assert result.budget is None and result.budget_id == missing
    assert await repo.consume_budget(missing, 1, "0.01") is False
    with pytest.raises(NotFoundError):
        await repo.add_usage(missing, 1, "0.01")


async def test_reaching_the_limit_exactly_is_allowed(db: Database, repo: BudgetRepository) -> None:
    budget = await swarm_budget(db, repo, allocated="0.05", max_tokens=50)
    for _ in range(5):
        assert await repo.is_exceeded(budget.id) is False
        assert await repo.consume_budget(budget.id, 10, "0.01")
    assert await repo.is_exceeded(budget.id) is True
    assert await repo.consume_budget(budget.id, 0, "0.01") is False
    assert await repo.consume_budget(budget.id, 1, 0) is False
    # A charge of nothing still fits an exhausted budget (reaching the limit is allowed).
    assert (await repo.try_consume(budget.id, 0, 0)).status is ConsumeStatus.GRANTED
    usage = await repo.get_usage(budget.id)
    assert usage is not None
    assert (usage.percentage_cost, usage.percentage_tokens) == (Decimal("100.00"), Decimal("100.00"))
    assert (usage.remaining_cost, usage.remaining_tokens, usage.is_exceeded) == (0, 0, True)


async def test_tokens_limit_alone_exhausts(db: Database, repo: BudgetRepository) -> None:
    budget = await swarm_budget(db, repo, allocated=100, max_tokens=10)
    assert await repo.consume_budget(budget.id, 10, 1)
    assert await repo.is_exceeded(budget.id) is True
    assert (await repo.try_consume(budget.id, 1, 0)).status is ConsumeStatus.INSUFFICIENT


async def test_max_tokens_zero_allows_only_tokenless_charges(db: Database, repo: BudgetRepository) -> None:
    budget = await swarm_budget(db, repo, allocated=1, max_tokens=0)
    assert await repo.is_exceeded(budget.id) is True  # no token headroom at all
    assert (await repo.try_consume(budget.id, 1, "0.1")).status is ConsumeStatus.INSUFFICIENT
    assert (await repo.try_consume(budget.id, 0, "0.1")).status is ConsumeStatus.GRANTED
    usage = await repo.get_usage(budget.id)
    assert usage is not None
    assert (usage.percentage_tokens, usage.remaining_tokens) == (Decimal("100"), 0)
    assert await ledger(db, budget.id) == (1, 0, Decimal("0.1"))


async def test_zero_allocation_has_no_headroom(db: Database, repo: BudgetRepository) -> None:
    budget = await swarm_budget(db, repo)  # allocated defaults to 0
    usage = await repo.get_usage(budget.id)
    assert usage is not None
    assert (usage.percentage_cost, usage.remaining_cost, usage.is_exceeded) == (Decimal("100"), 0, True)
    assert usage.percentage_tokens is None and usage.remaining_tokens is None
    assert await repo.consume_budget(budget.id, 5, "0.01") is False
    assert await repo.consume_budget(budget.id, 5, 0) is True  # free charges still count tokens
    assert (await repo.find_by_id(budget.id)).used_tokens == 5  # type: ignore[union-attr]


# -- usage reports ----------------------------------------------------------------------------------


async def test_get_usage_fields(db: Database, repo: BudgetRepository) -> None:
    swarm = await make_swarm(db)
    agent = await make_agent(db, swarm)
    budget = await repo.create("agent", agent, swarm_id=swarm, allocated=10, max_tokens=1000)
    assert await repo.consume_budget(budget.id, 333, "2.5")
    usage = await repo.get_usage(budget.id)
    assert usage is not None
    assert usage.budget_id == budget.id
    assert (usage.tokens, usage.cost) == (333, Decimal("2.5"))
    assert usage.percentage_cost == Decimal("25.00")
    assert usage.percentage_tokens == Decimal("33.30")
    assert (usage.remaining_cost, usage.remaining_tokens) == (Decimal("7.5"), 667)
    assert usage.is_exceeded is False
    assert await repo.get_usage_by_scope("agent", agent) == usage
    assert await repo.get_usage_by_scope("swarm", agent) is None
    thirds = await repo.create("project", uuid.uuid4(), allocated=3)
    assert await repo.consume_budget(thirds.id, 0, 1)
    got = await repo.get_usage(thirds.id)
    assert got is not None and got.percentage_cost == Decimal("33.33")
    assert got.percentage_tokens is None and got.remaining_tokens is None


async def test_add_usage(db: Database, repo: BudgetRepository) -> None:
    budget = await swarm_budget(db, repo, allocated=1, max_tokens=100)
    updated = await repo.add_usage(budget.id, 60, "0.5")
    assert (updated.consumed, updated.used_tokens) == (Decimal("0.5"), 60)
    assert (await repo.add_usage(budget.id, 10, "0.1", idempotency_key="u")).consumed == Decimal("0.6")
    assert (await repo.add_usage(budget.id, 10, "0.1", idempotency_key="u")).consumed == Decimal("0.6")
    before = await snapshot(db)
    with pytest.raises(ConflictError) as info:
        await repo.add_usage(budget.id, 1, "0.5")
    assert info.value.constraint == "budgets_consumed_within_allocated_check"
    with pytest.raises(ConflictError) as info:
        await repo.add_usage(budget.id, 31, 0)
    assert info.value.constraint == "budgets_used_tokens_within_max_check"
    with pytest.raises(ValidationError) as vinfo:
        await repo.add_usage(budget.id, 1, -1)
    assert vinfo.value.field == "cost"
    assert await snapshot(db) == before


async def test_swarm_budget_summary(db: Database, repo: BudgetRepository) -> None:
    swarm = await make_swarm(db)
    a1, a2 = await make_agent(db, swarm), await make_agent(db, swarm)
    empty = await repo.get_swarm_budget_summary(swarm)
    assert (empty.swarm_id, empty.budgets, empty.allocated, empty.consumed, empty.remaining) == (
        swarm,
        0,
        0,
        0,
        0,
    )
    # No budget limits nothing: unlimited tokens (None), as for a budget whose max_tokens is NULL;
    # 0 would mean "no tokens allowed".
    assert (empty.max_tokens, empty.used_tokens) == (None, 0)
    main = await repo.create("swarm", swarm, allocated=100, max_tokens=5000)
    sub = await repo.create("agent", a1, swarm_id=swarm, allocated="10.5", max_tokens=1000)
    await repo.consume_budget(main.id, 100, 20)
    await repo.consume_budget(sub.id, 50, "0.25")
    summary = await repo.get_swarm_budget_summary(swarm)
    assert summary.budgets == 2
    assert (summary.allocated, summary.consumed, summary.remaining) == (
        Decimal("110.5"),
        Decimal("20.25"),
        Decimal("90.25"),
    )
    assert (summary.max_tokens, summary.used_tokens) == (6000, 150)
    await repo.create("agent", a2, swarm_id=swarm, allocated=1)  # unlimited tokens
    unlimited = await repo.get_swarm_budget_summary(swarm)
    assert unlimited.budgets == 3 and unlimited.max_tokens is None
    with pytest.raises(ValidationError):
        await repo.get_swarm_budget_summary("nope")


async def test_reset_consumption(db: Database, repo: BudgetRepository) -> None:
    budget = await swarm_budget(db, repo, allocated=1, max_tokens=10)
    other = await swarm_budget(db, repo, allocated=1)
    assert await repo.consume_budget(budget.id, 10, 1, idempotency_key="k")
    assert await repo.consume_budget(other.id, 1, "0.5")
    reset = await repo.reset_consumption(budget.id)
    assert reset is not None
    assert (reset.consumed, reset.used_tokens, reset.allocated, reset.max_tokens) == (0, 0, 1, 10)
    assert await ledger(db, budget.id) == (0, 0, 0)
    assert await ledger(db, other.id) == (1, 1, Decimal("0.5"))  # other budgets untouched
    assert await repo.is_exceeded(budget.id) is False
    # The key was forgotten with the ledger: it charges again.
    assert (await repo.try_consume(budget.id, 10, 1, idempotency_key="k")).status is ConsumeStatus.GRANTED


async def test_reset_concurrent_with_consumes_keeps_ledger_equal_to_counters(
    db: Database, make_database: MakeDatabase
) -> None:
    repo = BudgetRepository(await make_database(postgres_max_pool_size=20))
    budget = await swarm_budget(db, repo, allocated=1000)

    async def consume() -> None:
        for _ in range(20):
            await repo.consume_budget(budget.id, 1, "0.01")

    async def reset() -> None:
        for _ in range(10):
            await repo.reset_consumption(budget.id)
            await asyncio.sleep(0)

    await asyncio.gather(*(consume() for _ in range(10)), reset())
    after = await repo.find_by_id(budget.id)
    assert after is not None
    assert await ledger(db, budget.id) == (after.used_tokens, after.used_tokens, after.consumed)


# -- one definition of "percent used" and "exceeded", in Python and in the views ---------------------

PERCENT_CASES = [
    ("0", "0"),  # a zero allocation: nothing can be spent, so it is all used
    ("10", "0"),
    ("10", "2.5"),
    ("10", "10"),
    ("3", "1"),
    ("3", "2"),
    ("8", "1"),  # 12.5 exactly
    ("1", "0.00125"),  # 0.125 -> 0.12: rounded down
    ("1", "0.0012499999"),
    ("99999999999999.9999999999", "0.0000000001"),
    ("99999999999999.9999999999", "99999999999999.9999999998"),
    ("0.0000000003", "0.0000000001"),
    ("7", "6.99995"),  # 99.99929 -> 99.99
    ("1", "0.99999"),  # 99.999 -> 99.99: 100.00 only once nothing is left
]


async def test_view_and_get_usage_agree_on_percentage(db: Database, repo: BudgetRepository) -> None:
    """swarm_summary.budget_percentage and get_usage().percentage_cost are one definition."""
    from dash_storage.repositories.swarms import SwarmRepository

    swarms = SwarmRepository(db)
    for allocated, consumed in PERCENT_CASES:
        budget = await swarm_budget(db, repo, allocated=allocated)
        if Decimal(consumed):
            assert await repo.consume_budget(budget.id, 0, consumed)
        usage = await repo.get_usage(budget.id)
        summary = await swarms.get_summary(budget.scope_id)
        assert usage is not None and summary is not None
        assert summary.budget_percentage == usage.percentage_cost, (allocated, consumed)
        assert usage.percentage_cost.as_tuple().exponent == -2  # always two decimals
        assert (usage.percentage_cost == 100) == usage.is_exceeded, (allocated, consumed)
    zero = await repo.get_usage((await swarm_budget(db, repo)).id)
    assert zero is not None
    assert (zero.percentage_cost, zero.is_exceeded, zero.remaining_cost) == (Decimal("100.00"), True, 0)


async def test_percentage_function_matches_python(db: Database) -> None:
    from dash_storage.repositories.budgets import percent_used

    cases = [*PERCENT_CASES, ("1", "0.004999"), ("1", "0.005"), ("6", "1"), ("3", "2")]
    for whole, part in cases:
        got = await db.fetchval("SELECT dash_budget_percentage($1::numeric, $2::numeric)", part, whole)
        assert str(got) == str(percent_used(Decimal(part), Decimal(whole))), (part, whole)
    assert str(percent_used(Decimal(2), Decimal(3))) == "66.66"
    assert str(percent_used(Decimal(0), Decimal(0))) == "100.00"
    assert await db.fetchval("SELECT dash_budget_percentage(NULL, 1)") is None


async def test_swarm_without_budget_has_no_percentage(db: Database) -> None:
    """A swarm without a swarm-scope budget is not "0 % used" nor "100 % used": it has no budget."""
    from dash_storage.repositories.swarms import SwarmRepository

    swarm = await make_swarm(db)
    summary = await SwarmRepository(db).get_summary(swarm)
    assert summary is not None
    assert (summary.budget_allocated, summary.budget_consumed, summary.budget_percentage) == (0, 0, None)


async def test_refused_consume_takes_no_lock_and_writes_nothing(db: Database) -> None:
    """combine=False: a consume that cannot be granted (no headroom, with a generated key or a new
    one of the caller's; or a repeated key) neither waits for nor takes the budget's row lock, and
    writes nothing: no new row version (xmin), no row lock (a lock, even one taken and released,
    leaves its transaction in xmax), no ledger row, the counters as they were."""
    repo = BudgetRepository(db, combine=False)
    budget = await make_budget(db, Decimal("0.02"))
    first = await repo.try_consume(budget, 1, Decimal("0.02"), idempotency_key="spent")
    assert first.status is ConsumeStatus.GRANTED
    state = "SELECT xmin::text, xmax::text, consumed, used_tokens FROM budgets WHERE id = $1"
    before = await db.fetchrow(state, budget)

    async def refused() -> list[ConsumeStatus]:
        return [
            (await repo.try_consume(budget, 1, Decimal("0.01"))).status,
            (await repo.try_consume(budget, 1, Decimal("0.01"), idempotency_key="new")).status,
            (await repo.try_consume(budget, 0, Decimal("0.001"), idempotency_key="new")).status,
            (await repo.try_consume(budget, 1, Decimal("0.02"), idempotency_key="spent")).status,
        ]

    expected = [ConsumeStatus.INSUFFICIENT] * 3 + [ConsumeStatus.DUPLICATE]
    assert await refused() == expected
    assert await db.fetchrow(state, budget) == before
    async with db.transaction() as holder:  # another transaction holds the row lock meanwhile
        await holder.execute("SELECT 1 FROM budgets WHERE id = $1 FOR UPDATE", budget)
        assert await asyncio.wait_for(refused(), 5) == expected
    assert await ledger(db, budget) == (1, 1, Decimal("0.02"))

"""Retries never write twice: creates (by client-generated id) and consumes (by idempotency key)
stay exactly-once while the server terminates every connection of the pool in a loop, and when an
answer is lost after the write committed."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any

import pytest

from dash_storage.core.config import Settings
from dash_storage.core.database import Database
from dash_storage.core.errors import ConflictError, DashStorageError
from dash_storage.core.ids import new_id
from dash_storage.core.models import ConsumeStatus
from dash_storage.repositories import event_partitions
from dash_storage.repositories.budgets import BudgetRepository
from dash_storage.repositories.events import EventRepository
from tests.conftest import TEST_DB, MakeDatabase, admin_connect
from tests.factories import make_budget, make_swarm
from tests.faults.chaos import capped, gather_outcomes, sized, terminating_connections
from tests.faults.databases import LostAnswerDatabase, RetryAttemptDatabase

#: Creates under fire (a multiple of 11: ten single creates, then a batch of ten).
CREATES = sized(55, 330)  # 100 events in make test, 600 in make soak
#: Consumes under fire, with room in the budget for two thirds of them.
CONSUMES = sized(90, 600)


@pytest.mark.soak
@pytest.mark.direct_server("it kills the pooled connections' server processes mid-work")
async def test_events_created_while_connections_are_terminated_are_stored_exactly_once(
    db: Database, settings: Settings, make_database: MakeDatabase
) -> None:
    swarm = await make_swarm(db, "chaos")
    chaos = capped(await make_database(postgres_retry_attempts=10, postgres_retry_delay=20))
    repo = EventRepository(chaos)

    # Single creates and, every eleventh call, a batch of 10, interleaved; ids chosen up front.
    jobs: list[Callable[[], Awaitable[list[uuid.UUID]]]] = []
    planned: list[list[uuid.UUID]] = []
    for n in range(CREATES):
        if n % 11 == 10:
            ids = [new_id() for _ in range(10)]

            async def many(ids: list[uuid.UUID] = ids, n: int = n) -> list[uuid.UUID]:
                items = [{"swarm_id": swarm, "type": f"batch-{n}", "id": i} for i in ids]
                return [e.id for e in await repo.create_many(items)]

            jobs.append(many)
        else:
            ids = [new_id()]

            async def one(event_id: uuid.UUID = ids[0], n: int = n) -> list[uuid.UUID]:
                return [(await repo.create(swarm, f"single-{n}", id=event_id)).id]

            jobs.append(one)
        planned.append(ids)
    assert sum(len(p) for p in planned) == CREATES // 11 * 20  # each 11 calls: 10 singles, 1 batch of 10

    async with terminating_connections(settings) as killed:
        outcomes = await gather_outcomes(jobs, workers=16)

    returned: set[uuid.UUID] = set()
    raised: set[uuid.UUID] = set()
    for i, outcome in outcomes:
        if isinstance(outcome, BaseException):
            assert isinstance(outcome, DashStorageError), repr(outcome)
            raised.update(planned[i])
        else:
            assert outcome == planned[i]  # every event back, in input order
            returned.update(outcome)

    admin = await admin_connect(settings, TEST_DB)
    try:
        total, distinct = await admin.fetchrow("SELECT count(*), count(DISTINCT id) FROM events")
        stored = {r[0] for r in await admin.fetch("SELECT id FROM events")}
        batches_split = await admin.fetchval(
            "SELECT count(*) FROM (SELECT type FROM events WHERE type LIKE 'batch-%' "
            "GROUP BY type HAVING count(*) <> 10) AS partial"
        )
    finally:
        await admin.close()
    assert total == distinct == len(stored)
    assert returned <= stored  # every success is stored
    assert stored - returned <= raised  # nothing stored that nobody asked for
    assert batches_split == 0  # a batch is all or nothing, also across retries
    assert killed[0] > 0
    assert returned  # the library got work done through the chaos
    errors = Counter(
        f"{type(o).__name__} (from {type(o.__cause__).__name__}): {str(o)[:80]}"
        for _, o in outcomes
        if isinstance(o, BaseException)
    )
    print(f"\nterminated {killed[0]} connections; {len(returned)} events returned, {len(raised)} raised")
    for text, n in errors.most_common(8):
        print(n, text)


@pytest.mark.soak
@pytest.mark.direct_server("it kills the pooled connections' server processes mid-work")
async def test_consumes_while_connections_are_terminated_charge_once_per_key(
    db: Database, settings: Settings, make_database: MakeDatabase
) -> None:
    room = CONSUMES * 2 // 3
    budget = await make_budget(db, Decimal("0.01") * room, name="chaos")
    chaos = capped(await make_database(postgres_retry_attempts=10, postgres_retry_delay=20))
    repo = BudgetRepository(chaos)
    keys = [f"call-{i}" for i in range(CONSUMES)]
    jobs = [
        lambda key=key: repo.try_consume(budget, 1, Decimal("0.01"), idempotency_key=key)  # type: ignore[misc]
        for key in keys
    ]

    async with terminating_connections(settings) as killed:
        outcomes = await gather_outcomes(jobs, workers=16)

    granted: set[str] = set()
    raised: set[str] = set()
    for i, outcome in outcomes:
        if isinstance(outcome, BaseException):
            assert isinstance(outcome, DashStorageError), repr(outcome)
            raised.add(keys[i])
        else:
            assert outcome.status in (ConsumeStatus.GRANTED, ConsumeStatus.INSUFFICIENT), outcome
            if outcome.granted:
                granted.add(keys[i])

    async def charged() -> tuple[set[str], Decimal, int, Decimal, int]:
        admin = await admin_connect(settings, TEST_DB)
        try:
            entries = await admin.fetch("SELECT idempotency_key, cost, tokens FROM budget_ledger")
            row = await admin.fetchrow("SELECT consumed, used_tokens FROM budgets WHERE id = $1", budget)
        finally:
            await admin.close()
        assert row is not None
        cost = sum((e["cost"] for e in entries), Decimal(0))
        tokens = sum(e["tokens"] for e in entries)
        return {e["idempotency_key"] for e in entries}, cost, tokens, row["consumed"], row["used_tokens"]

    ledger_keys, ledger_cost, ledger_tokens, consumed, used = await charged()
    assert (consumed, used) == (ledger_cost, ledger_tokens)  # counters == ledger, always
    assert consumed <= Decimal("0.01") * room
    assert granted <= ledger_keys <= granted | raised  # charged: every grant, plus maybe lost answers
    assert killed[0] > 0

    # Asking again with the same keys (calm now) settles every call that raised, without a
    # second charge for the ones whose answer was lost.
    calm = BudgetRepository(db)
    for key in sorted(raised):
        result = await calm.try_consume(budget, 1, "0.01", idempotency_key=key)
        # DUPLICATE = the lost attempt had charged; GRANTED = it had not; INSUFFICIENT = full.
        assert result.status is not ConsumeStatus.NOT_FOUND, key
        if result.granted:
            granted.add(key)
    ledger_keys, ledger_cost, ledger_tokens, consumed, used = await charged()
    assert ledger_keys == granted
    assert consumed == ledger_cost == Decimal("0.01") * len(granted) == Decimal("0.01") * room
    assert used == ledger_tokens == len(granted) == room
    print(f"\nterminated {killed[0]} connections; {len(raised)} consumes raised, settled by asking again")


# -- an answer lost after the write committed -------------------------------------------------------


@pytest.fixture
async def lossy(db: Database, settings: Settings) -> AsyncIterator[LostAnswerDatabase]:
    d = LostAnswerDatabase(settings)
    await d.initialize()
    yield d
    await d.close()


async def test_lost_answer_create_returns_the_stored_event(db: Database, lossy: LostAnswerDatabase) -> None:
    swarm = await make_swarm(db)
    repo = EventRepository(lossy)
    await event_partitions.now(lossy)  # what the library reads once: the partitions, the clock
    base = lossy.replays
    event = await repo.create(swarm, "once", payload={"a": 1})
    assert lossy.replays == base + 1
    assert await EventRepository(db).find_by_id(event.id) == event
    batch = await repo.create_many(
        [{"swarm_id": swarm, "type": f"b{i}", "id": uuid.uuid4()} for i in range(25)]
    )
    assert [e.type for e in batch] == [f"b{i}" for i in range(25)]
    assert await db.fetchval("SELECT count(*) FROM events") == 26
    assert await EventRepository(db).find_by_filter(types=[f"b{i}" for i in range(25)], limit=1000) == sorted(
        batch, key=lambda e: (e.timestamp, e.id)
    )
    # The batch gives its ids: they are looked up first (a read, replayed), then written.
    assert lossy.replays == base + 3


async def test_lost_answer_consume_is_granted_and_charged_once(
    db: Database, lossy: LostAnswerDatabase
) -> None:
    budget = await BudgetRepository(db).create("swarm", await make_swarm(db), allocated="0.03", max_tokens=3)
    repo = BudgetRepository(lossy)
    for _ in range(3):  # without a key too: the generated key is kept across the retry
        result = await repo.try_consume(budget.id, 1, "0.01")
        assert result.status is ConsumeStatus.GRANTED  # our own lost charge, not a "duplicate"
    assert (await repo.try_consume(budget.id, 1, "0.01")).status is ConsumeStatus.INSUFFICIENT
    after = await BudgetRepository(db).find_by_id(budget.id)
    assert after is not None and (after.consumed, after.used_tokens) == (Decimal("0.03"), 3)
    assert await db.fetchval("SELECT count(*) FROM budget_ledger") == 3
    created = await repo.create("project", uuid.uuid4(), allocated=1)
    assert await BudgetRepository(db).find_by_id(created.id) == created
    assert lossy.replays == 5


@pytest.mark.parametrize("size", [1, 5, 200], ids=["create", "insert-batch", "copy-batch"])
async def test_a_retry_never_adopts_another_events_id(db: Database, settings: Any, size: int) -> None:
    """Found in review: a retry that met an existing id took that row as its own lost write and
    reported success, although it was another event. It must be a ConflictError, and the batch
    must stay all or nothing."""
    swarm_id = await db.fetchval("INSERT INTO swarms (id, name) VALUES ($1, 'owner') RETURNING id", new_id())
    theirs = await EventRepository(db).create(swarm_id, "theirs", payload={"who": "first"})
    retrying = RetryAttemptDatabase(settings)
    await retrying.initialize()
    try:
        repo = EventRepository(retrying)
        mine = [{"swarm_id": swarm_id, "type": "mine", "payload": {"n": i}} for i in range(size - 1)]
        with pytest.raises(ConflictError):
            if size == 1:
                await repo.create(swarm_id, "mine", payload={"who": "second"}, id=theirs.id)
            else:
                await repo.create_many([*mine, {"swarm_id": swarm_id, "type": "mine", "id": theirs.id}])
        # A retry that finds its OWN earlier write still succeeds (the lost-answer case).
        again = await repo.create(
            swarm_id, "theirs", payload={"who": "first"}, id=theirs.id, timestamp=theirs.timestamp
        )
        assert again == theirs
    finally:
        await retrying.close()
    rows = await db.fetch("SELECT type, payload FROM events ORDER BY type")
    assert [(r["type"], r["payload"]) for r in rows] == [("theirs", {"who": "first"})]


async def test_retried_creates_of_other_entities_never_adopt_a_taken_id(db: Database, settings: Any) -> None:
    """The same rule for swarms, agents, sessions and budgets: on a retry, an existing row is ours
    only if it holds what we sent; otherwise the create is a ConflictError."""
    from dash_storage.repositories import AgentRepository, SessionRepository, SwarmRepository

    swarm = await SwarmRepository(db).create(name="first")
    agent = await AgentRepository(db).create(swarm.id, model="m1")
    session = await SessionRepository(db).create(tree_data={"root": "a"})
    budget = await BudgetRepository(db).create("swarm", swarm.id, allocated=1)
    retrying = RetryAttemptDatabase(settings)
    await retrying.initialize()
    try:
        with pytest.raises(ConflictError):
            await SwarmRepository(retrying).create(name="second", id=swarm.id)
        with pytest.raises(ConflictError):
            await AgentRepository(retrying).create(swarm.id, model="m2", id=agent.id)
        with pytest.raises(ConflictError):
            await SessionRepository(retrying).create(tree_data={"root": "b"}, id=session.id)
        other = await SwarmRepository(db).create(name="other")
        with pytest.raises(ConflictError):
            await BudgetRepository(retrying).create("swarm", other.id, allocated=1, id=budget.id)
        # Finding its own earlier write is still a success.
        assert (await SwarmRepository(retrying).create(name="first", id=swarm.id)).id == swarm.id
    finally:
        await retrying.close()
    assert await db.fetchval("SELECT count(*) FROM swarms") == 2

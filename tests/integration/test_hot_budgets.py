"""Hot budgets: concurrent consumes of one budget combined into one statement per batch.

Checked against a real PostgreSQL: exact grants at the limit, the greedy arrival-order semantics
against a Python model, idempotency keys inside and across batches, two Databases and a real
second process on one budget, a missing budget in the mix, cancelled callers, lost answers and
connections killed mid-batch. The ledger always sums to the counters.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import sys
import textwrap
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from bench import queries as bench_queries
from bench.common import scratch_database
from dash_storage.core.config import Settings
from dash_storage.core.database import Database
from dash_storage.core.errors import ConflictError, DashStorageError, DatabaseUnavailableError
from dash_storage.core.ids import new_id
from dash_storage.core.models import ConsumeResult, ConsumeStatus
from dash_storage.repositories import budget_batcher as bb
from dash_storage.repositories.budget_batcher import CONSUME_BATCH, MAX_BATCH, combiner_for
from dash_storage.repositories.budget_turns import IN_FLIGHT
from dash_storage.repositories.budgets import BudgetRepository
from tests.conftest import TEST_DB, MakeDatabase, admin_connect
from tests.factories import make_budget, wait_until
from tests.faults.chaos import capped, gather_outcomes, sized, terminating_connections
from tests.faults.databases import StatementHook

G, D, NO, NF = (
    ConsumeStatus.GRANTED,
    ConsumeStatus.DUPLICATE,
    ConsumeStatus.INSUFFICIENT,
    ConsumeStatus.NOT_FOUND,
)


class CountingDatabase(StatementHook):
    """A real Database that counts the statements it sends."""

    statements = 0

    async def statement(
        self, method: str, query: str, args: Sequence[Any], retry: bool, timeout: float | None
    ) -> Any:
        self.statements += 1
        return await super().statement(method, query, args, retry, timeout)


async def lock_waiters(other: asyncpg.Connection) -> int:
    """Statements of the library on the test database waiting for a lock (held by ``other``)."""
    return int(
        await other.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'dash-storage' AND wait_event_type = 'Lock'"
        )
    )


@dataclass(frozen=True)
class Books:
    consumed: Decimal
    used_tokens: int
    allocated: Decimal
    ledger_rows: int
    ledger_tokens: int
    ledger_cost: Decimal
    keys: frozenset[str]


async def books(settings: Settings, budget_id: uuid.UUID) -> Books:
    """The budget's counters and ledger, read on a connection of its own."""
    admin = await admin_connect(settings, TEST_DB)
    try:
        row = await admin.fetchrow(
            "SELECT consumed, used_tokens, allocated FROM budgets WHERE id = $1", budget_id
        )
        entries = await admin.fetch(
            "SELECT idempotency_key, tokens, cost FROM budget_ledger WHERE budget_id = $1", budget_id
        )
    finally:
        await admin.close()
    assert row is not None
    return Books(
        consumed=row["consumed"],
        used_tokens=row["used_tokens"],
        allocated=row["allocated"],
        ledger_rows=len(entries),
        ledger_tokens=sum(e["tokens"] for e in entries),
        ledger_cost=sum((e["cost"] for e in entries), Decimal(0)),
        keys=frozenset(e["idempotency_key"] for e in entries),
    )


def assert_balanced(b: Books) -> None:
    assert (b.consumed, b.used_tokens) == (b.ledger_cost, b.ledger_tokens)  # ledger == counters
    assert b.consumed <= b.allocated


def greedy_model(
    consumed: Decimal, used: int, allocated: Decimal, max_tokens: int | None, calls: list[tuple[int, Decimal]]
) -> list[tuple[ConsumeStatus, Decimal, int]]:
    """The documented semantics, one call at a time in arrival order: a call is granted if it fits
    what the grants before it left; one that does not fit charges nothing. (status, consumed,
    used_tokens) as each answer must report them."""
    out = []
    for tokens, cost in calls:
        fits = consumed + cost <= allocated and (max_tokens is None or used + tokens <= max_tokens)
        if fits:
            consumed, used = consumed + cost, used + tokens
        out.append((G if fits else NO, consumed, used))
    return out


# -- exact grants, greedy order ----------------------------------------------------------------------


async def test_1000_concurrent_consumes_with_room_for_100_grant_exactly_100(
    settings: Settings, db: Database
) -> None:
    budget = await make_budget(db, Decimal("1.00"))
    counting = CountingDatabase(settings, postgres_max_pool_size=20)
    await counting.initialize()
    try:
        repo = BudgetRepository(counting)
        results = await asyncio.gather(*(repo.try_consume(budget, 1, Decimal("0.01")) for _ in range(1000)))
    finally:
        await counting.close()
    assert Counter(r.status for r in results) == {G: 100, NO: 900}
    granted = sorted(r.budget.consumed for r in results if r.status is G and r.budget)
    assert granted == [Decimal("0.01") * i for i in range(1, 101)]  # each grant's own state
    b = await books(settings, budget)
    assert_balanced(b)
    assert (b.consumed, b.used_tokens, b.ledger_rows) == (Decimal("1.00"), 100, 100)
    assert b.keys == {r.idempotency_key for r in results if r.status is G}
    # Combined: the leader alone, then the rest in batches of at most MAX_BATCH.
    assert counting.statements <= 1 + -(-999 // MAX_BATCH)


async def test_mixed_sizes_are_granted_greedily_in_arrival_order(settings: Settings, db: Database) -> None:
    rng = random.Random(6)
    allocated, max_tokens = Decimal("5.00"), 6000
    budget = await make_budget(db, allocated, max_tokens)
    costs = [Decimal(c) for c in ("0", "0.001", "0.01", "0.05", "0.1", "0.25", "0.5", "1")]
    calls = [(rng.choice((0, 1, 10, 50, 100, 400)), rng.choice(costs)) for _ in range(400)]
    repo = BudgetRepository(db)
    combiner = combiner_for(db)
    batches = combiner.batches
    # gather starts the calls in list order: that is their arrival order.
    results = await asyncio.gather(*(repo.try_consume(budget, t, c) for t, c in calls))
    assert combiner.batches - batches <= 3  # the leader alone, then everyone else together
    model = greedy_model(Decimal(0), 0, allocated, max_tokens, calls)
    assert [r.status for r in results] == [m[0] for m in model]
    assert [(r.budget.consumed, r.budget.used_tokens) for r in results if r.budget] == [
        (m[1], m[2]) for m in model
    ]
    statuses = Counter(r.status for r in results)
    assert statuses[G] > 0 and statuses[NO] > 0  # the budget ran out in the middle
    # Smaller calls after a refused one were still granted.
    first_refused = next(i for i, r in enumerate(results) if r.status is NO)
    assert any(r.status is G for r in results[first_refused:])
    b = await books(settings, budget)
    assert_balanced(b)
    assert (b.consumed, b.used_tokens) == model[-1][1:]


async def test_unlimited_tokens_stop_at_bigint_range_instead_of_failing(
    settings: Settings, db: Database, make_database: MakeDatabase
) -> None:
    budget = await make_budget(db, 100)
    big = 2**63 - 1
    single = BudgetRepository(await make_database(), combine=False)
    assert (await single.try_consume(budget, big - 5, 1)).status is G
    assert (await single.try_consume(budget, 6, 1)).status is NO  # would overflow: refused, not an error
    batch = await asyncio.gather(*(BudgetRepository(db).try_consume(budget, t, 1) for t in (1, 6, 4, 1, 0)))
    assert [r.status for r in batch] == [G, NO, G, NO, G]
    b = await books(settings, budget)
    assert_balanced(b)
    assert b.used_tokens == big


# -- idempotency --------------------------------------------------------------------------------------


async def test_duplicate_keys_inside_one_batch_and_from_earlier_batches(
    settings: Settings, db: Database
) -> None:
    budget = await make_budget(db, Decimal("1.00"))
    repo = BudgetRepository(db)
    assert (await repo.try_consume(budget, 1, "0.1", idempotency_key="old")).status is G
    calls: list[tuple[str, str]] = [
        ("first", "0.1"),  # the leader, alone in its batch; everything below lands in the next one
        ("a", "0.2"),
        ("a", "0.2"),  # the same call again: a repeat of the one before
        ("old", "0.1"),  # granted in an earlier batch
        ("old", "0.3"),  # a different charge under a used key
        ("a", "0.5"),  # a different charge under a key granted in this batch
        ("b", "0.9"),  # does not fit (0.4 spent)
        ("b", "0.9"),
        ("c", "0.6"),  # fits exactly
        ("c", "0.6"),
        ("d", "0"),  # a free charge still fits a full budget
    ]
    combiner = combiner_for(db)
    batches = combiner.batches
    results = await asyncio.gather(
        *(repo.try_consume(budget, 1, cost, idempotency_key=key) for key, cost in calls),
        return_exceptions=True,
    )
    statuses = [r.status if isinstance(r, ConsumeResult) else type(r) for r in results]
    assert statuses == [G, G, D, D, ConflictError, ConflictError, NO, NO, G, D, G]
    # Leader; the batch (each key once, repeats riding along); the two re-used keys after it.
    assert combiner.batches - batches == 3
    b = await books(settings, budget)
    assert_balanced(b)
    assert b.keys == {"old", "first", "a", "c", "d"}
    assert (b.consumed, b.used_tokens) == (Decimal("1.0"), 5)
    # A repeat answers with the budget as the original call saw it.
    assert isinstance(results[1], ConsumeResult) and isinstance(results[2], ConsumeResult)
    assert results[2].budget == results[1].budget


async def test_20_concurrent_copies_of_one_call_charge_once(settings: Settings, db: Database) -> None:
    for allocated in (Decimal("10"), Decimal("0.01")):
        budget = await make_budget(db, allocated)
        repo = BudgetRepository(db)
        results = await asyncio.gather(
            *(repo.try_consume(budget, 5, Decimal("0.01"), idempotency_key="same") for _ in range(20))
        )
        assert Counter(r.status for r in results) == {G: 1, D: 19}
        b = await books(settings, budget)
        assert_balanced(b)
        assert (b.ledger_rows, b.consumed) == (1, Decimal("0.01"))


class FlakyBatches(StatementHook):
    """A real Database whose batch statements fail as scripted: ``lose`` runs the statement (it
    commits) and then raises a lost-connection error, as if the answer was lost after COMMIT;
    ``fail`` raises it without running anything. Then every statement runs normally."""

    def __init__(self, settings: Settings, script: list[str]) -> None:
        super().__init__(settings, postgres_retry_delay=20)
        self.script = list(script)

    async def statement(
        self, method: str, query: str, args: Sequence[Any], retry: bool, timeout: float | None
    ) -> Any:
        if query == CONSUME_BATCH and self.script:
            step = self.script.pop(0)
            if step == "lose":
                await super().statement(method, query, args, retry, timeout)
            raise DatabaseUnavailableError(f"connection lost ({step}, test)")
        return await super().statement(method, query, args, retry, timeout)


@pytest.mark.parametrize(
    "script",
    [
        ["lose"],  # the whole batch is re-sent and recognises its own ledger rows
        ["lose", "fail"],  # then it breaks up: each call retries alone and finds its own row
        ["fail", "fail"],  # nothing was charged: each call retries alone and competes
    ],
)
async def test_transient_failures_of_a_batch_charge_every_call_once(
    settings: Settings, db: Database, script: list[str]
) -> None:
    budget = await make_budget(db, Decimal("0.30"), max_tokens=1000)
    flaky = FlakyBatches(settings, script)
    await flaky.initialize()
    try:
        repo = BudgetRepository(flaky)
        results = await asyncio.gather(
            *(repo.try_consume(budget, 1, "0.01", idempotency_key=f"k{i}") for i in range(50))
        )
    finally:
        await flaky.close()
    assert flaky.script == []
    # Our own rows written by a lost attempt count as this call's grant, never as a repeat.
    assert Counter(r.status for r in results) == {G: 30, NO: 20}
    b = await books(settings, budget)
    assert_balanced(b)
    assert (b.ledger_rows, b.consumed) == (30, Decimal("0.30"))
    assert b.keys == {r.idempotency_key for r in results if r.status is G}
    if script == ["lose"]:  # still one batch: arrival order kept
        assert [r.status for r in results] == [G] * 30 + [NO] * 20


# -- many budgets, missing budgets, the plain path --------------------------------------------------


async def test_a_missing_budget_in_the_mix_does_not_affect_other_budgets(
    settings: Settings, db: Database
) -> None:
    budget = await make_budget(db, Decimal("0.50"))
    other = await make_budget(db, Decimal("0.05"))
    missing = uuid.uuid4()
    repo = BudgetRepository(db)
    targets = [(budget, missing, other)[i % 3] for i in range(300)]
    results = await asyncio.gather(*(repo.try_consume(t, 1, Decimal("0.01")) for t in targets))
    by_budget: dict[uuid.UUID, Counter[ConsumeStatus]] = {}
    for t, r in zip(targets, results, strict=True):
        assert r.budget_id == t
        by_budget.setdefault(t, Counter())[r.status] += 1
    assert by_budget[missing] == {NF: 100}
    assert by_budget[budget] == {G: 50, NO: 50}
    assert by_budget[other] == {G: 5, NO: 95}
    assert all(r.budget is None for r in results if r.status is NF)
    for b in (await books(settings, budget), await books(settings, other)):
        assert_balanced(b)
        assert b.consumed == b.allocated


async def test_combine_false_sends_one_statement_per_call(
    settings: Settings, db: Database, make_database: MakeDatabase
) -> None:
    budget = await make_budget(db, Decimal("1.00"))
    plain_db = await make_database(postgres_max_pool_size=20)
    repo = BudgetRepository(plain_db, combine=False)
    results = await asyncio.gather(*(repo.try_consume(budget, 1, Decimal("0.01")) for _ in range(300)))
    assert Counter(r.status for r in results) == {G: 100, NO: 200}
    assert combiner_for(plain_db).batches == 0
    b = await books(settings, budget)
    assert_balanced(b)
    assert b.consumed == Decimal("1.00")


async def locked_row(settings: Settings, budget: uuid.UUID) -> tuple[asyncpg.Connection, Any]:
    """Another session holding the budget's row lock (in an open transaction); roll it back to free it."""
    other = await admin_connect(settings, TEST_DB)
    lock = other.transaction()
    await lock.start()
    await other.execute("SELECT 1 FROM budgets WHERE id = $1 FOR UPDATE", budget)
    return other, lock


async def test_combine_false_consumes_of_one_budget_take_turns(
    settings: Settings, db: Database, make_database: MakeDatabase
) -> None:
    """Of many concurrent consumes of one budget, IN_FLIGHT are sent (and wait at the row lock); the
    others wait in the process without a connection, and all are granted once the lock is free."""
    budget = await make_budget(db, Decimal("1.00"))
    plain_db = await make_database(postgres_max_pool_size=20)
    repo = BudgetRepository(plain_db, combine=False)
    other, lock = await locked_row(settings, budget)
    try:
        calls = [
            asyncio.create_task(repo.try_consume(budget, 1, Decimal("0.01"))) for _ in range(IN_FLIGHT + 8)
        ]
        await wait_until(lambda: _waiting_at_lock(other, IN_FLIGHT), "the first consumes wait for the lock")
        await wait_until(lambda: _settled(calls, IN_FLIGHT), "every other caller waits for its turn")
        assert plain_db.stats().in_use == IN_FLIGHT
        assert await lock_waiters(other) == IN_FLIGHT
        await lock.rollback()
        results = await asyncio.gather(*calls)
    finally:
        await other.close()
    assert [r.status for r in results] == [G] * (IN_FLIGHT + 8)
    assert sorted(r.budget.consumed for r in results if r.budget) == [
        Decimal("0.01") * i for i in range(1, IN_FLIGHT + 9)
    ]
    assert_balanced(await books(settings, budget))


async def _settled(calls: list[asyncio.Task[ConsumeResult]], in_flight: int) -> bool:
    """True once the callers without a turn are parked (give the loop a few turns to get there)."""
    for _ in range(5):
        await asyncio.sleep(0)
    return not any(c.done() for c in calls) and len(calls) > in_flight


async def test_combine_false_a_consume_that_cannot_fit_goes_without_a_turn_and_takes_no_lock(
    settings: Settings, db: Database, make_database: MakeDatabase
) -> None:
    """Every turn is taken by a consume waiting for the row lock; a consume that does not fit the
    budget as the latest answer showed it is sent anyway, and is refused without waiting."""
    budget = await make_budget(db, Decimal("1.00"))
    plain_db = await make_database(postgres_max_pool_size=20)
    repo = BudgetRepository(plain_db, combine=False)
    assert (await repo.try_consume(budget, 1, Decimal("0.95"))).status is G  # 0.05 left, as seen
    other, lock = await locked_row(settings, budget)
    try:
        small = [
            asyncio.create_task(repo.try_consume(budget, 1, Decimal("0.01"))) for _ in range(IN_FLIGHT + 2)
        ]
        await wait_until(lambda: _waiting_at_lock(other, IN_FLIGHT), "every turn waits for the row lock")
        big = await asyncio.wait_for(repo.try_consume(budget, 1, Decimal("0.10")), 10)
        assert big.status is NO and big.budget is not None and big.budget.consumed == Decimal("0.95")
        assert not any(s.done() for s in small)
        await lock.rollback()
        results = await asyncio.gather(*small)
    finally:
        await other.close()
    granted = min(IN_FLIGHT + 2, 5)  # 0.05 left: room for five
    assert Counter(r.status for r in results) == Counter({G: granted, NO: IN_FLIGHT + 2 - granted})
    assert_balanced(await books(settings, budget))


async def test_combine_false_a_budget_grown_since_the_latest_answer_is_charged_all_the_same(
    settings: Settings, db: Database, make_database: MakeDatabase
) -> None:
    """The latest answer said "no room" (so a consume without a key is refused by a plain read);
    once the budget grew elsewhere, the next one is charged, and its answer says so."""
    budget = await make_budget(db, Decimal("1.00"))
    plain_db = await make_database()
    repo = BudgetRepository(plain_db, combine=False)
    assert (await repo.try_consume(budget, 1, Decimal("1.00"))).status is G
    refused = await repo.try_consume(budget, 1, Decimal("0.50"))
    assert refused.status is NO and refused.budget is not None and refused.budget.consumed == Decimal("1.00")
    await BudgetRepository(db).update(budget, allocated=Decimal("2.00"))
    grown = await repo.try_consume(budget, 1, Decimal("0.50"))
    assert grown.status is G and grown.budget is not None
    assert (grown.budget.consumed, grown.budget.allocated) == (Decimal("1.50"), Decimal("2.00"))
    b = await books(settings, budget)
    assert_balanced(b)
    assert b.ledger_rows == 2


async def _waiting_at_lock(other: asyncpg.Connection, n: int) -> bool:
    return await lock_waiters(other) == n


# -- across Databases and processes -----------------------------------------------------------------


async def test_two_databases_hammering_one_budget_never_overspend(
    settings: Settings, db: Database, make_database: MakeDatabase
) -> None:
    allocated = Decimal("20.00")
    budget = await make_budget(db, allocated, max_tokens=100_000)
    one, two = await make_database(postgres_max_pool_size=10), await make_database(postgres_max_pool_size=10)
    rng = random.Random(2)
    # The same 500 calls (same keys, same amounts) made through both Databases at once by 25 agents
    # each, agent j making calls j, j+25, ... in turn: each key must be charged once in all,
    # whichever side gets there first.
    calls = [(f"k{i}", rng.choice((1, 10, 100)), rng.choice(("0.01", "0.05", "0.1"))) for i in range(500)]

    async def hammer(d: Database) -> dict[str, ConsumeResult]:
        repo = BudgetRepository(d)
        answers: dict[str, ConsumeResult] = {}

        async def agent(j: int) -> None:
            for key, tokens, cost in calls[j::25]:
                answers[key] = await repo.try_consume(budget, tokens, cost, idempotency_key=key)

        await asyncio.gather(*(agent(j) for j in range(25)))
        return answers

    first, second = await asyncio.gather(hammer(one), hammer(two))
    for key, _, _ in calls:
        assert {first[key].status, second[key].status} in ({G, D}, {NO}), (first[key], second[key])
    granted = {r.idempotency_key for r in (*first.values(), *second.values()) if r.status is G}
    # Then fresh keys from both sides: plain competition for what is left.
    rest = await asyncio.gather(
        *(BudgetRepository(d).try_consume(budget, 1, "0.01") for d in (one, two) for _ in range(300))
    )
    granted |= {r.idempotency_key for r in rest if r.status is G}
    b = await books(settings, budget)
    assert_balanced(b)
    assert b.keys == granted
    refused = [Decimal(c) for key, _, c in calls if first[key].status is NO]
    refused += [Decimal("0.01") for r in rest if r.status is NO]
    assert refused and b.allocated - b.consumed < min(refused)  # nothing refused would still fit


CHILD = """
import asyncio, json, sys
from decimal import Decimal
from dash_storage.core.database import Database
from dash_storage.repositories.budgets import BudgetRepository

async def main(budget_id, agents, calls):
    answers = []
    async with Database(postgres_max_pool_size=10) as db:
        repo = BudgetRepository(db)
        assert await repo.find_by_id(budget_id) is not None
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

        async def agent(j):
            for i in range(j, calls, agents):
                cost = Decimal(("0.01", "0.02", "0.05")[i % 3])
                r = await repo.try_consume(budget_id, 1, cost, idempotency_key=f"child-{i}")
                answers.append([r.idempotency_key, r.status.value])

        await asyncio.gather(*(agent(j) for j in range(agents)))
    print(json.dumps(answers), flush=True)

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""


async def test_a_second_process_consuming_at_the_same_time_never_overspends(
    settings: Settings, db: Database, make_database: MakeDatabase, tmp_path: Path
) -> None:
    allocated = Decimal("10.00")
    budget = await make_budget(db, allocated)
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    agents, calls = 25, 500  # per process: 25 agents making 20 calls each, one after another
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        str(budget),
        str(agents),
        str(calls),
        env={**os.environ, "POSTGRES_DB": TEST_DB},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        ready = await asyncio.wait_for(proc.stdout.readline(), timeout=60)
        if ready.strip() != b"ready":
            proc.kill()
            _, err = await proc.communicate()
            pytest.fail(f"the second process did not start: {ready!r}\n{err.decode()}")
        repo = BudgetRepository(await make_database(postgres_max_pool_size=10))
        mine: list[ConsumeResult] = []

        async def agent(j: int) -> None:
            for i in range(j, calls, agents):
                cost = ("0.05", "0.01", "0.02")[i % 3]
                mine.append(await repo.try_consume(budget, 1, cost, idempotency_key=f"parent-{i}"))

        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
        await asyncio.gather(*(agent(j) for j in range(agents)))
        out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    theirs = json.loads(out)
    assert len(theirs) == len(mine) == calls
    granted = {r.idempotency_key for r in mine if r.status is G}
    granted |= {key for key, status in theirs if status == "granted"}
    b = await books(settings, budget)
    assert_balanced(b)
    assert b.keys == granted
    assert b.allocated - b.consumed < Decimal("0.01")  # ~27 of demand for 10 of room: all spent
    print(
        f"\nparent granted {sum(r.status is G for r in mine)}, "
        f"child granted {sum(s == 'granted' for _, s in theirs)} of {calls} each"
    )


@pytest.mark.parametrize(
    ("costs", "batches", "consumed"),
    [
        # x no longer fits (0.6 of 1.00 spent): refused in the walk, then found in the ledger.
        (("0.6", "0.4", "0.5"), 1, Decimal("1.0")),
        # x still fits: the walk counts it again (the index refuses the row), so y and z look
        # too big; they are judged again in a second batch, where y fits.
        (("0.3", "0.5", "0.45"), 2, Decimal("0.8")),
    ],
)
async def test_a_same_key_charge_committed_elsewhere_while_the_batch_waits_is_a_duplicate(
    settings: Settings,
    db: Database,
    make_database: MakeDatabase,
    costs: tuple[str, str, str],
    batches: int,
    consumed: Decimal,
) -> None:
    """Another process charges key x and holds the row lock; our batch [x, y, z] takes its snapshot
    (x not yet visible), waits for the lock, and only then can meet x: x must answer DUPLICATE."""
    budget = await make_budget(db, Decimal("1.00"))
    other = await admin_connect(settings, TEST_DB)
    mine = await make_database()
    repo = BudgetRepository(mine)
    combiner = combiner_for(mine)
    try:
        tx = other.transaction()
        await tx.start()
        await other.execute("SELECT 1 FROM budgets WHERE id = $1 FOR UPDATE", budget)
        await other.execute(
            "INSERT INTO budget_ledger (budget_id, tokens, cost, idempotency_key) VALUES ($1, 1, $2, 'x')",
            budget,
            Decimal(costs[0]),
        )
        await other.execute(
            "UPDATE budgets SET consumed = $2, used_tokens = 1 WHERE id = $1", budget, Decimal(costs[0])
        )
        # Make the leader wait one turn so that x, y and z go in one batch.
        combiner._hot.add(budget)
        keyed = zip("xyz", costs, strict=True)
        calls = asyncio.gather(*(repo.try_consume(budget, 1, cost, idempotency_key=k) for k, cost in keyed))
        await wait_until(lambda: lock_waiters(other), "our batch waits for the row lock")
        assert await lock_waiters(other) == 1
        await tx.commit()
        x, y, z = await calls
    finally:
        await other.close()
    assert (x.status, y.status, z.status) == (D, G, NO)
    assert combiner.batches == batches
    assert y.budget is not None and y.budget.consumed == consumed
    b = await books(settings, budget)
    assert_balanced(b)
    assert b.keys == {"x", "y"} and b.consumed == consumed


# -- failures: cancelled callers, killed connections -------------------------------------------------


async def test_cancelled_callers_leave_the_others_answered_and_the_books_balanced(
    settings: Settings, db: Database, make_database: MakeDatabase
) -> None:
    budget = await make_budget(db, Decimal("10"))
    repo = BudgetRepository(await make_database(postgres_max_pool_size=5))
    other = await admin_connect(settings, TEST_DB)
    try:
        # Another session holds the budget's row lock, so the leader's statement stays in flight.
        lock = other.transaction()
        await lock.start()
        await other.execute("SELECT 1 FROM budgets WHERE id = $1 FOR UPDATE", budget)
        tasks = [
            asyncio.create_task(repo.try_consume(budget, 1, "0.01", idempotency_key=f"k{i}"))
            for i in range(200)
        ]
        # k0 leads (its statement waits for the lock at the server), the rest wait in the queue.
        await wait_until(lambda: lock_waiters(other), "the leader's statement waits for the row lock")
        for i in (0, 5, 50):
            tasks[i].cancel()
        await lock.rollback()
    finally:
        await other.close()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for i, r in enumerate(results):
        if i in (0, 5, 50):
            assert isinstance(r, asyncio.CancelledError), r
        else:
            assert isinstance(r, ConsumeResult) and r.status is G, r
    # The leader's batch was finished for it (sent again: same key, same ledger id, charged once);
    # the two callers cancelled while queued were never sent.
    b = await books(settings, budget)
    assert_balanced(b)
    assert b.keys == {f"k{i}" for i in range(200)} - {"k5", "k50"}
    # Nothing is left stuck: the next call goes straight through.
    assert (await repo.try_consume(budget, 1, "0.01")).status is G


@pytest.mark.soak
@pytest.mark.direct_server("it kills the pooled connections' server processes mid-work")
async def test_connection_kills_during_combined_batches_keep_ledger_counters_and_answers_equal(
    settings: Settings, db: Database, make_database: MakeDatabase
) -> None:
    room = sized(100, 600)
    budget = await make_budget(db, Decimal("0.01") * room)
    # Six retries from 20 ms, each wait capped: a batch gives up within a second of back-off.
    chaos = capped(await make_database(postgres_retry_attempts=6, postgres_retry_delay=20))
    repo = BudgetRepository(chaos)
    keys = [f"call-{i}" for i in range(3 * room)]
    jobs = [
        lambda key=key: repo.try_consume(budget, 1, Decimal("0.01"), idempotency_key=key)  # type: ignore[misc]
        for key in keys
    ]
    combiner = combiner_for(chaos)

    # A kill every 20 ms: often enough to hit most batches, rarely enough for some to get through.
    async with terminating_connections(settings, interval=0.02) as killed:
        outcomes = await gather_outcomes(jobs, workers=30)

    granted: set[str] = set()
    raised: set[str] = set()
    for i, outcome in outcomes:
        if isinstance(outcome, BaseException):
            assert isinstance(outcome, DashStorageError), repr(outcome)
            raised.add(keys[i])
        else:
            assert outcome.status in (G, NO), outcome
            if outcome.granted:
                granted.add(keys[i])
    b = await books(settings, budget)
    assert_balanced(b)
    assert granted <= b.keys <= granted | raised  # every grant charged; the rest only if its answer was lost
    assert killed[0] > 0
    assert combiner.requests > combiner.batches  # the consumes were combined

    # Asking again with the same keys settles every call that raised, charging none twice.
    calm = BudgetRepository(db)
    for key in sorted(raised):
        result = await calm.try_consume(budget, 1, "0.01", idempotency_key=key)
        assert result.status is not NF, key
        if result.granted:
            granted.add(key)
    b = await books(settings, budget)
    assert_balanced(b)
    assert b.keys == granted
    assert b.consumed == Decimal("0.01") * len(granted) == Decimal("0.01") * room
    print(
        f"\nterminated {killed[0]} connections; {len(raised)} consumes raised; "
        f"{combiner.requests} consumes in {combiner.batches} batches"
    )


# -- the plan ----------------------------------------------------------------------------------------


def _ledger_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """The nodes of an EXPLAIN (FORMAT JSON) plan that read budget_ledger or call a function."""
    stack, found = [plan["Plan"]], []
    while stack:
        node = stack.pop()
        stack.extend(node.get("Plans", []))
        if node.get("Relation Name") == "budget_ledger" or node["Node Type"] == "Function Scan":
            found.append(node)
    return found


async def _ledger_scans(con: Any) -> tuple[int, int, int]:
    """(sequential scans, index scans, rows read) of budget_ledger by this connection's open
    transaction."""
    row = await con.fetchrow(
        "SELECT seq_scan, COALESCE(idx_scan, 0), seq_tup_read + COALESCE(idx_tup_fetch, 0) "
        "FROM pg_stat_xact_user_tables WHERE relname = 'budget_ledger'"
    )
    return int(row[0]), int(row[1]), int(row[2])


async def _lookup_plan(con: Any) -> dict[str, Any]:
    """The generic plan of dash_ledger_entries' query, planned with the function's own settings."""
    body, config = await con.fetchrow(
        "SELECT prosrc, proconfig FROM pg_proc WHERE proname = 'dash_ledger_entries'"
    )
    query = body.split("RETURN QUERY", 1)[1].rsplit(";", 1)[0]
    query = re.sub(r"\bbudget\b", "$1::uuid", re.sub(r"\bkeys\b", "$2::text[]", query))
    for setting in config:
        name, value = setting.split("=", 1)
        await con.execute(f"SET {name} = {value}")
    try:
        plans, generic, _ = await bench_queries.prepared_plans(con, query, (uuid.uuid4(), ["a", "b"]), 2)
    finally:
        await con.execute("RESET ALL")
    assert generic
    return plans[-1]


async def test_ledger_lookups_use_the_index_from_an_empty_analysed_ledger() -> None:
    """On a fresh database whose ledger is empty and analysed, the generic plans of the consume
    statements (what a pooled connection keeps while the ledger grows) never scan the ledger
    sequentially: the idempotency look-up goes through the unique index by construction."""
    async with scratch_database(f"{TEST_DB}_ledger_plan") as sdb:
        budget = await make_budget(sdb, Decimal("1e9"))
        await sdb.execute("ANALYZE budget_ledger")
        keys = ["bulk-7", "new-1", "new-2"]
        statements: list[tuple[str, tuple[Any, ...]]] = [
            (bb.CONSUME, (budget, 1, Decimal("0.01"), "new-3", new_id())),
            (CONSUME_BATCH, (str(budget), ["1"] * 3, ["0.01"] * 3, keys, [str(new_id()) for _ in keys])),
            (bb.SELECT_LEDGER_BY_KEY, (budget, "bulk-9")),
            (bb.SELECT_LEDGER_BY_KEYS, (budget, keys)),
        ]
        async with sdb.acquire() as con:
            await con.execute("SET plan_cache_mode = force_generic_plan")
            for sql, args in statements:
                plans, generic, _ = await bench_queries.prepared_plans(con, sql, args, 2)
                assert generic, "not planned generically"
                nodes = _ledger_nodes(plans[-1])
                assert any(n.get("Function Name") == "dash_ledger_entries" for n in nodes), sql
                for node in nodes:  # nothing else reads the ledger but its INSERT
                    assert node["Node Type"] in ("Function Scan", "ModifyTable"), node
            tx = con.transaction()
            await tx.start()
            try:
                for sql, args in statements:  # plans cached on this connection while it is empty
                    for _ in range(6):
                        await con.fetch(sql, *args)
                await con.execute(
                    "INSERT INTO budget_ledger (budget_id, tokens, cost, idempotency_key) "
                    "SELECT $1, 1, 0.01, 'bulk-' || g FROM generate_series(1, 50000) AS g "
                    "ON CONFLICT DO NOTHING",
                    budget,
                )
                seq, idx, read = await _ledger_scans(con)
                for sql, args in statements:
                    for _ in range(3):
                        await con.fetch(sql, *args)
                seq_after, idx_after, read_after = await _ledger_scans(con)
            finally:
                await tx.rollback()
            # The look-up itself, generically planned: one descent per key, both columns bound.
            stack, scans = [(await _lookup_plan(con))["Plan"]], []
            while stack:
                node = stack.pop()
                stack.extend(node.get("Plans", []))
                if node.get("Relation Name") == "budget_ledger":
                    scans.append(node)
        assert seq_after == seq, "a consume statement scanned the ledger sequentially"
        assert idx_after > idx
        assert read_after - read < 100, "a consume statement read many ledger rows"
        assert scans
        for node in scans:
            assert node["Node Type"] in ("Index Scan", "Index Only Scan", "Bitmap Heap Scan"), node
            cond = node.get("Index Cond") or node.get("Recheck Cond") or ""
            assert "budget_id" in cond and "idempotency_key" in cond, node


@pytest.mark.parametrize("size", [2, 50, MAX_BATCH])
async def test_batch_statement_answers_a_direct_batch(settings: Settings, db: Database, size: int) -> None:
    """The statement on its own (no combiner): room for half of the batch."""
    budget = await make_budget(db, Decimal("0.01") * (size // 2))
    keys = [f"k{i}" for i in range(size)]
    row = await db.fetchrow(
        CONSUME_BATCH, budget, ["1"] * size, ["0.01"] * size, keys, [str(new_id()) for _ in keys]
    )
    assert row is not None
    marks = row[-4]
    assert marks == "c" * (size // 2) + "i" * (size - size // 2)
    b = await books(settings, budget)
    assert_balanced(b)
    assert b.ledger_rows == size // 2

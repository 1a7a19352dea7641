"""Hot budgets: many agents consuming from ONE budget, with and without combining, against raw asyncpg.

Sides, in interleaved rounds (the repository's two sides share one Database, raw asyncpg has a pool
of the same size that, like the library's, does not reset connections on release):

- ``combined``: ``BudgetRepository.try_consume`` (the default): concurrent consumes of the budget
  are combined into one statement and one commit per batch, each with its idempotency key and
  ledger row;
- ``single``: ``BudgetRepository(db, combine=False)``: the one-statement consume per call (ledger
  row and idempotency key included); the consumes of the budget take turns in the process
  (``budget_turns``: at most two sent at once);
- ``raw UPDATE``: raw asyncpg, one conditional UPDATE per call (no ledger, no idempotency):
  ``UPDATE budgets SET consumed = consumed + $2 ... WHERE id = $1 AND consumed + $2 <= allocated``.

Figures are grants per second (every call is granted: the budget is far from exhausted), at 50
concurrent agents (the hot case) and at 1 (a caller alone, to show combining costs it nothing).
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal

import asyncpg

from bench.common import machine, run_ops, scratch_database, server_version, today
from bench.repositories import plain_pool
from dash_storage.core.database import Database
from dash_storage.repositories.budget_batcher import combiner_for
from dash_storage.repositories.budgets import BudgetRepository
from dash_storage.repositories.swarms import SwarmRepository

RAW_CONSUME = """
UPDATE budgets SET consumed = consumed + $2, used_tokens = used_tokens + $3
WHERE id = $1 AND consumed + $2 <= allocated
RETURNING consumed, used_tokens
"""
COST = Decimal("0.0001")


async def _rates(
    sides: dict[str, Callable[[int], Awaitable[object]]], total: int, concurrency: int, rounds: int
) -> dict[str, tuple[float, float]]:
    """Per side, over interleaved rounds (after a warm-up of each): median calls per second, and
    median client CPU time per call in microseconds (steadier than wall time on a shared machine)."""
    for op in sides.values():
        await run_ops(op, max(total // 10, concurrency), concurrency)
    seen: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    names = list(sides)
    for n in range(rounds):
        for name in names[n % len(names) :] + names[: n % len(names)]:  # rotate who goes first
            op = sides[name]
            cpu = time.process_time()
            rate = await run_ops(op, total, concurrency)
            seen[name].append((rate, (time.process_time() - cpu) / total * 1e6))
    return {
        name: (statistics.median(r for r, _ in runs), statistics.median(c for _, c in runs))
        for name, runs in seen.items()
    }


async def run(total: int = 10_000, agents: int = 50, pool_size: int = 20, rounds: int = 3) -> str:
    started = time.perf_counter()
    async with scratch_database(
        "dash_bench_hot", postgres_min_pool_size=pool_size, postgres_max_pool_size=pool_size
    ) as db:
        version = await server_version(db)
        swarm = await SwarmRepository(db).create(name="hot")
        combined = BudgetRepository(db)
        budget = await combined.create("swarm", swarm.id, allocated=Decimal("1e12"))
        single = BudgetRepository(db, combine=False)  # same pool: the sides take turns
        pool: asyncpg.Pool = await plain_pool(db, pool_size)

        raw_calls = [0]

        async def raw(_: int) -> object:
            row = await pool.fetchrow(RAW_CONSUME, budget.id, COST, 10)
            assert row is not None
            raw_calls[0] += 1
            return row

        async def ours(_: int) -> object:
            result = await combined.try_consume(budget.id, 10, COST)
            assert result.granted
            return result

        async def plain(_: int) -> object:
            result = await single.try_consume(budget.id, 10, COST)
            assert result.granted
            return result

        sides = {"combined": ours, "single": plain, "raw UPDATE": raw}
        combiner = combiner_for(db)
        hot = await _rates(sides, total, agents, rounds)
        batches, requests = combiner.batches, combiner.requests
        alone = await _rates(sides, max(total // 10, 200), 1, rounds)
        after = await combined.find_by_id(budget.id)
        ledger = await db.fetchrow(
            "SELECT count(*), COALESCE(sum(tokens), 0) FROM budget_ledger WHERE budget_id = $1", budget.id
        )
        await pool.close()
    assert after is not None and ledger is not None
    assert after.used_tokens == ledger[1] + 10 * raw_calls[0]  # the repository's ledger = its charges
    print(f"  hot budget: {hot}; alone: {alone}; {time.perf_counter() - started:.0f}s", flush=True)
    raw_hot, raw_alone = hot["raw UPDATE"][0], alone["raw UPDATE"][0]
    rows = [
        f"| side | {agents} agents: grants/s | vs raw UPDATE | 1 caller: grants/s | vs raw UPDATE "
        "| 1 caller: client CPU per call |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, label in (
        ("combined", "BudgetRepository.try_consume (combined, default)"),
        ("single", "BudgetRepository(combine=False).try_consume"),
        ("raw UPDATE", "raw asyncpg, one conditional UPDATE per call"),
    ):
        (h, _), (a, cpu) = hot[name], alone[name]
        rows.append(
            f"| {label} | {h:,.0f} | {h / raw_hot:.2f}x | {a:,.0f} | {a / raw_alone:.2f}x | {cpu:.0f} µs |"
        )
    return "\n".join(
        [
            "## Hot budgets: one budget, many agents",
            "",
            f"Measured {today()} on {machine()}, PostgreSQL {version}, uvloop. "
            "Command: `python -m bench hot-budget`.",
            f"{agents} concurrent agents (and then 1 caller) consume from ONE budget; pools of "
            f"{pool_size} connections (the library's, and raw asyncpg's, neither resetting connections on "
            f"release); median of {rounds} interleaved rounds of {total:,} calls (1 caller: a tenth of "
            "that). Every call is granted. The repository writes a ledger row per grant and honours "
            "idempotency keys; the raw UPDATE does neither. With combine=False the consumes of the budget "
            "take turns in the process (at most two sent at once, `budget_turns`); raw asyncpg sends all "
            "of them at once. Higher is better (CPU: lower).",
            "",
            "\n".join(rows),
            "",
            f"At {agents} agents the combined repository grants {hot['combined'][0] / raw_hot:.1f}x as many "
            "charges per second as raw asyncpg's one conditional UPDATE per call (target: at least 5x): "
            "one commit (one WAL flush) serves a whole batch. A caller alone sends the same one statement "
            "either way.",
            "",
            f"Combining sent {requests:,} consumes in {batches:,} statements at {agents} agents "
            f"({requests / max(batches, 1):.1f} per commit on average). Afterwards the ledger holds "
            f"{ledger[0]:,} rows summing to {ledger[1]:,} tokens, exactly the repository's grants "
            f"(the budget counts {after.used_tokens:,} tokens: those plus the raw UPDATEs' "
            f"{raw_calls[0]:,} x 10).",
            "",
        ]
    )


# -- refusals: consumes until the budget is exhausted --------------------------------------------


async def _until_exhausted(
    sides: dict[str, Callable[[asyncpg.Pool | None, uuid.UUID], Callable[[int], Awaitable[object]]]],
    make_budget: Callable[[], Awaitable[uuid.UUID]],
    total: int,
    concurrency: int,
    rounds: int,
) -> dict[str, tuple[float, float]]:
    """Each round, each side spends a fresh budget with room for a quarter of ``total`` calls: the
    rest are refused. Medians of calls per second and client CPU µs per call."""
    seen: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    names = list(sides)
    for n in range(rounds + 1):
        for name in names[n % len(names) :] + names[: n % len(names)]:
            op = sides[name](None, await make_budget())
            cpu = time.process_time()
            rate = await run_ops(op, total, concurrency)
            if n:  # the first round warms up
                seen[name].append((rate, (time.process_time() - cpu) / total * 1e6))
    return {
        name: (statistics.median(r for r, _ in runs), statistics.median(c for _, c in runs))
        for name, runs in seen.items()
    }


async def run_exhausted(total: int = 4000, pool_size: int = 20, rounds: int = 5) -> str:
    """``BudgetRepository(combine=False)`` against raw asyncpg's conditional UPDATE when most calls
    are refused (the budget runs out a quarter of the way in), at 50 agents and at 1."""
    async with scratch_database(
        "dash_bench_exhaust", postgres_min_pool_size=pool_size, postgres_max_pool_size=pool_size
    ) as db:
        swarm = await SwarmRepository(db).create(name="exhaust")
        repo = BudgetRepository(db, combine=False)
        pool: asyncpg.Pool = await plain_pool(db, pool_size)
        room = COST * (total // 4)

        async def make_budget() -> uuid.UUID:
            b = await repo.create("agent", uuid.uuid4(), allocated=room, swarm_id=swarm.id)
            return b.id

        def single(_: object, bid: uuid.UUID) -> Callable[[int], Awaitable[object]]:
            async def op(_: int) -> object:
                return await repo.try_consume(bid, 10, COST)

            return op

        def raw(_: object, bid: uuid.UUID) -> Callable[[int], Awaitable[object]]:
            async def op(_: int) -> object:
                return await pool.fetchrow(RAW_CONSUME, bid, COST, 10)

            return op

        sides = {"single": single, "raw UPDATE": raw}
        rows = [
            "| side | concurrency | calls/s | vs raw UPDATE | client CPU per call | CPU vs raw |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for concurrency in (50, 1):
            n = total if concurrency > 1 else total // 4
            got = await _until_exhausted(sides, make_budget, n, concurrency, rounds)
            (rate, cpu), (raw_rate, raw_cpu) = got["single"], got["raw UPDATE"]
            rows.append(
                f"| BudgetRepository(combine=False).try_consume | {concurrency} | {rate:,.0f} "
                f"| {rate / raw_rate:.2f}x | {cpu:.0f} µs | {cpu / raw_cpu:.2f}x |"
            )
            rows.append(
                f"| raw asyncpg conditional UPDATE | {concurrency} | {raw_rate:,.0f} | 1.00x "
                f"| {raw_cpu:.0f} µs | 1.00x |"
            )
        refused = await db.fetchval(
            "SELECT count(*) FROM budget_ledger l JOIN budgets b ON b.id = l.budget_id "
            "WHERE b.consumed > b.allocated"
        )
        assert refused == 0
        await pool.close()
    return "\n".join(
        [
            "## Hot budgets until exhausted (most calls refused)",
            "",
            f"Each round each side spends a fresh budget with room for a quarter of its calls; median of "
            f"{rounds} interleaved rounds (after a warm-up round). Pools of {pool_size} connections, "
            "neither resetting connections on release. The repository's consumes take turns while the "
            "budget has room (at most two sent at once, `budget_turns`) and go all at once when the "
            "latest answer showed no room for them: a consume without a key is then refused by a plain "
            "read of the budget (no lock, no write; charged as usual if the budget grew).",
            "",
            "\n".join(rows),
            "",
        ]
    )


# -- a growing ledger: plans cached on an empty, analysed ledger ---------------------------------


async def _ledger_reads(db: Database) -> tuple[int, int]:
    """Rows of budget_ledger read so far by sequential scans, and fetched through indexes."""
    await asyncio.sleep(1.2)  # backends report their counters at most about once a second
    async with db.acquire() as con:
        await con.execute("SELECT pg_stat_clear_snapshot()")
        value = await con.fetchval(
            "SELECT ARRAY[COALESCE(seq_tup_read, 0), COALESCE(idx_tup_fetch, 0)] "
            "FROM pg_stat_user_tables WHERE relname = 'budget_ledger'"
        )
    return int(value[0]), int(value[1])


async def run_growth(
    sizes: tuple[int, ...] = (0, 10_000, 100_000, 1_000_000),
    calls: int = 5000,
    agents: int = 50,
    pool_size: int = 20,
) -> str:
    """From a freshly migrated database whose ledger is empty and ANALYZEd, the hot budget's rate as
    the ledger grows (bulk rows of other keys added between measurements, nothing re-analysed
    afterwards), and how many ledger rows were read by sequential scans meanwhile."""
    async with scratch_database(
        "dash_bench_growth", postgres_min_pool_size=pool_size, postgres_max_pool_size=pool_size
    ) as db:
        swarm = await SwarmRepository(db).create(name="growth")
        combined = BudgetRepository(db)
        single = BudgetRepository(db, combine=False)
        budget = await combined.create("swarm", swarm.id, allocated=Decimal("1e12"))
        await db.execute("ANALYZE budget_ledger")
        rows = [
            "| ledger rows | combined, 50 agents: grants/s | combine=False, 8 callers: grants/s "
            "| ledger rows read by sequential scans meanwhile | ledger rows fetched by index scans |",
            "|---:|---:|---:|---:|---:|",
        ]
        have = 0
        for size in sizes:
            if size > have:
                await db.execute(
                    "INSERT INTO budget_ledger (budget_id, tokens, cost, idempotency_key) "
                    "SELECT $1, 0, 0, 'bulk-' || g FROM generate_series($2::int, $3::int) AS g",
                    budget.id,
                    have + 1,
                    size,
                )
                have = size
            seq_before, idx_before = await _ledger_reads(db)

            async def hot(_: int) -> object:
                return await combined.try_consume(budget.id, 0, COST)

            async def alone(_: int) -> object:
                return await single.try_consume(budget.id, 0, COST)

            rate = await run_ops(hot, calls, agents)
            rate_single = await run_ops(alone, calls // 4, 8)
            seq_after, idx_after = await _ledger_reads(db)
            have += calls + calls // 4
            line = (
                f"| {size:,} | {rate:,.0f} | {rate_single:,.0f} | {seq_after - seq_before:,} "
                f"| {idx_after - idx_before:,} |"
            )
            print(line, flush=True)
            rows.append(line)
    return "\n".join(
        [
            "## Hot budget as the ledger grows",
            "",
            "Fresh database, `ANALYZE budget_ledger` while it is empty, then the hot budget is used; "
            "between measurements the ledger gets bulk rows (not re-analysed).",
            "",
            "\n".join(rows),
            "",
        ]
    )


if __name__ == "__main__":
    import argparse

    from dash_storage.cli.common import run as run_loop

    parser = argparse.ArgumentParser(description="hot budgets (prints the tables)")
    parser.add_argument("which", choices=["granted", "exhausted", "growth"], nargs="?", default="granted")
    parser.add_argument("--rounds", type=int, default=3)
    opts = parser.parse_args()
    if opts.which == "granted":
        print(run_loop(run(rounds=opts.rounds)))
    elif opts.which == "exhausted":
        print(run_loop(run_exhausted(rounds=opts.rounds)))
    else:
        print(run_loop(run_growth()))

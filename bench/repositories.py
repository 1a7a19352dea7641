"""Per-call cost of the repositories against raw asyncpg running the same SQL, in the same run.

Operations: EventRepository.create / find_by_id / find_by_filter / create_many(100) and
BudgetRepository.consume_budget. Each is run at concurrency 1 (pure per-call overhead) and 16 (a
busy swarm), interleaving rounds of the library and raw asyncpg so that drift hits both alike.
Raw asyncpg gets the same statements, the same arguments, the same JSON codecs and a default pool.

``run_single_row`` compares the single-row workloads (swarm create + find by id, the agent
lifecycle create / running / pause / resume, budget consume, event create, and find_by_filter on
a log of ``DASH_BENCH_SINGLE_ROW_EVENTS`` events, default 1,000,000) with raw asyncpg running the
same SQL on a pool that does NOT reset connections on release (as the library's does not), alone
and concurrently (8 callers; event create 16), and reports client CPU per operation
(``time.process_time()`` around each round) too.
"""

from __future__ import annotations

import datetime as dt
import gc
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import asyncpg
import orjson

from bench import partitions as log_loader  # its server-side generator of a log
from bench.common import (
    Comparison,
    checkpoint,
    compare,
    machine,
    raw_pool,
    run_ops,
    scratch_database,
    server_version,
    table,
    today,
)
from dash_storage.core.connections import init_connection, keep_session
from dash_storage.core.database import Database
from dash_storage.core.ids import new_id
from dash_storage.repositories import agent_transitions as transition_sql
from dash_storage.repositories import agents as agent_sql
from dash_storage.repositories import budgets as budget_sql
from dash_storage.repositories import event_filters, event_ingest
from dash_storage.repositories import swarms as swarm_sql
from dash_storage.repositories.agents import AgentRepository
from dash_storage.repositories.budgets import BudgetRepository
from dash_storage.repositories.events import EventRepository
from dash_storage.repositories.swarms import SwarmRepository

TYPES = ["agent.spawned", "agent.step", "llm.call", "agent.completed"]


def consume_new(pool: asyncpg.Pool, budget_id: Any) -> Awaitable[object]:
    """What ``try_consume`` without a key sends: ``CONSUME_NEW``, its key the text of its ledger id."""
    ledger_id = new_id()
    return pool.fetchrow(budget_sql.CONSUME_NEW, budget_id, 10, Decimal("0.0001"), str(ledger_id), ledger_id)


async def run(total: int = 2000, pool_size: int = 16) -> str:
    async with scratch_database(
        "dash_bench_repos", postgres_min_pool_size=pool_size, postgres_max_pool_size=pool_size
    ) as db:
        version = await server_version(db)
        swarm = await SwarmRepository(db).create(name="bench")
        events = EventRepository(db)
        budgets = BudgetRepository(db)
        budget = await budgets.create("swarm", swarm.id, allocated=Decimal("1e12"))
        seeded = await events.create_many(
            [{"swarm_id": swarm.id, "type": TYPES[i % 4], "payload": {"i": i}} for i in range(5000)]
        )
        ids = [e.id for e in seeded]
        since = seeded[0].timestamp - dt.timedelta(seconds=1)
        pool = await raw_pool(db, min_size=pool_size, max_size=pool_size)
        filter_sql = event_filters.select_sql(("swarm_id", "types", "since"), "ASC", after=False)
        batch = [{"swarm_id": swarm.id, "type": "llm.call", "payload": {"tokens": 10}} for _ in range(100)]

        def batch_columns() -> list[list[Any]]:
            # The same parallel text arrays the repository sends (uuid/timestamptz cast in SQL).
            payload = orjson.dumps({"tokens": 10}).decode()
            n = len(batch)
            return [
                [str(new_id()) for _ in range(n)],
                [str(swarm.id)] * n,
                [None] * n,
                ["llm.call"] * n,
                [payload] * n,
                [None] * n,
                [None] * n,
                [None] * n,
                ["system"] * n,
                ["info"] * n,
            ]

        cases: list[tuple[str, Any, Any, int]] = [
            (
                "events.create",
                lambda i: events.create(swarm.id, "agent.step", payload={"i": i}),
                lambda i: pool.fetchrow(
                    event_ingest.INSERT_EVENT,
                    new_id(),
                    swarm.id,
                    None,
                    "agent.step",
                    {"i": i},
                    None,
                    None,
                    None,
                    "system",
                    "info",
                ),
                total,
            ),
            (
                "events.find_by_id",
                lambda i: events.find_by_id(ids[i % len(ids)]),
                lambda i: pool.fetchrow(event_ingest.SELECT_EVENT_BY_ID, ids[i % len(ids)]),
                total,
            ),
            (
                "events.find_by_filter (swarm, 2 types, since, limit 100)",
                lambda i: events.find_by_filter(swarm_id=swarm.id, types=TYPES[:2], since=since, limit=100),
                lambda i: pool.fetch(filter_sql, 100, swarm.id, TYPES[:2], since),
                total // 4,
            ),
            (
                "budgets.consume_budget",
                lambda i: budgets.consume_budget(budget.id, 10, Decimal("0.0001")),
                lambda i: consume_new(pool, budget.id),
                total,
            ),
            (
                "events.create_many (100 events)",
                lambda i: events.create_many(batch),
                lambda i: pool.fetch(event_ingest.INSERT_EVENTS, *batch_columns()),
                total // 10,
            ),
        ]
        results: list[Comparison] = []
        for name, ours, raw, n in cases:
            for concurrency in (1, pool_size):
                results.append(await compare(name, ours, raw, total=n, concurrency=concurrency))
                print(f"  {name} @ {concurrency}: {results[-1].cost_ratio:.2f}x", flush=True)
        await pool.close()
    return "\n".join(
        [
            "## Repositories versus raw asyncpg",
            "",
            f"Measured {today()} on {machine()}, PostgreSQL {version}, uvloop. Command: `make bench`.",
            "Median of 5 interleaved rounds; the cost ratio is raw throughput / library throughput,",
            "so 1.00x means the repository adds nothing and 1.20x means a call takes 20% longer than",
            "hand-written asyncpg. Raw asyncpg runs the repositories' own SQL with a default asyncpg",
            "pool (which resets each connection on release) and returns bare Records; the library",
            "validates input and builds records.",
            "",
            table(results),
            "",
        ]
    )


# -- single-row workloads against raw asyncpg without a pool reset -----------------------------

Op = Callable[[int], Awaitable[object]]


def swarm_ops(swarms: SwarmRepository, pool: asyncpg.Pool) -> tuple[Op, Op]:
    """Swarm create + find by id: (through the repository, raw asyncpg with the same SQL)."""

    async def ours(i: int) -> object:
        s = await swarms.create(name="s", config={"i": i})
        return await swarms.find_by_id(s.id)

    async def raw(i: int) -> object:
        row = await pool.fetchrow(swarm_sql.INSERT_SWARM, new_id(), "s", {"i": i}, "creating")
        assert row is not None
        return await pool.fetchrow(swarm_sql.SELECT_SWARM_BY_ID, row[0])

    return ours, raw


def event_ops(events: EventRepository, pool: asyncpg.Pool, swarm_id: Any) -> tuple[Op, Op]:
    """One event created: (through the repository, raw asyncpg with the same SQL: what create
    sends for an event without id or timestamp, a new UUIDv7 and the clock taken before the
    statement, so that a retry repeats the same key)."""

    async def ours(i: int) -> object:
        return await events.create(swarm_id, "agent.step", payload={"i": i})

    async def raw(i: int) -> object:
        return await pool.fetchrow(
            event_ingest.INSERT_EVENT,
            new_id(), swarm_id, None, "agent.step", {"i": i}, dt.datetime.now(dt.UTC), None, None,
            "system", "info",
        )  # fmt: skip

    return ours, raw


async def plain_pool(db: Database, size: int) -> asyncpg.Pool:
    """Raw asyncpg as the library runs it: the same codecs, no reset on release."""
    kwargs = await db.connect_kwargs()
    pool = await asyncpg.create_pool(
        min_size=size, max_size=size, init=init_connection, reset=keep_session, **kwargs
    )
    assert pool is not None
    return pool


async def _side(op: Op, total: int, concurrency: int) -> tuple[float, float]:
    # Each side starts from the same collector state: a full collection left pending by the other
    # side's garbage would otherwise land in this round (tens of ms, in rounds of 0.2 to 1.5 s).
    gc.collect()
    cpu = time.process_time()
    rate = await run_ops(op, total, concurrency)
    return rate, (time.process_time() - cpu) / total * 1e6


async def compare_cpu(
    ours: Op, raw: Op, total: int, concurrency: int, rounds: int
) -> tuple[float, float, float, float, float]:
    """Interleaved rounds (who goes first alternates); medians of (ops/s, client CPU µs per op)
    of ours, then of raw, and the median of the rounds' own ratios (ours / raw ops/s, each
    round's two sides run back to back, so that drift over the run cancels)."""
    await run_ops(ours, max(total // 10, 10), concurrency)
    await run_ops(raw, max(total // 10, 10), concurrency)
    a: list[tuple[float, float]] = []
    b: list[tuple[float, float]] = []
    for n in range(rounds):
        if n % 2:
            b.append(await _side(raw, total, concurrency))
            a.append(await _side(ours, total, concurrency))
        else:
            a.append(await _side(ours, total, concurrency))
            b.append(await _side(raw, total, concurrency))
    med = statistics.median
    paired = med(x[0] / y[0] for x, y in zip(a, b, strict=True))
    return med(r for r, _ in a), med(c for _, c in a), med(r for r, _ in b), med(c for _, c in b), paired


def _log_events() -> int:
    raw = os.environ.get("DASH_BENCH_SINGLE_ROW_EVENTS", "1000000").replace("_", "").strip()
    try:
        n = int(raw)
    except ValueError:
        raise SystemExit(f"DASH_BENCH_SINGLE_ROW_EVENTS must be a number of events, not {raw!r}") from None
    if n < 10_000:
        raise SystemExit(f"DASH_BENCH_SINGLE_ROW_EVENTS must be at least 10000, not {n}")
    return n


async def run_single_row(total: int = 1200, pool_size: int = 16, rounds: int = 21) -> str:
    log_size = _log_events()
    async with scratch_database(
        "dash_bench_rows", postgres_min_pool_size=pool_size, postgres_max_pool_size=pool_size
    ) as db:
        version = await server_version(db)
        swarms = SwarmRepository(db)
        agents = AgentRepository(db)
        budgets = BudgetRepository(db, combine=False)
        events = EventRepository(db)
        swarm = await swarms.create(name="bench")
        budget = await budgets.create("swarm", swarm.id, allocated=Decimal("1e12"))
        pool = await plain_pool(db, pool_size)
        final = sorted(transition_sql.FINAL_AGENT_STATUSES)
        log_swarms: list[Any] = []  # the swarms of the log, once it is loaded
        filter_sql = event_filters.select_sql(("swarm_id", "types", "since"), "DESC", after=False)
        common = ["llm.call", "tool.call"]

        swarm_ours, swarm_raw = swarm_ops(swarms, pool)
        event_ours, event_raw = event_ops(events, pool, swarm.id)

        async def agent_ours(i: int) -> object:
            a = await agents.create(swarm.id, model="m", task="t")
            await agents.update_status(a.id, "running")
            await agents.pause(a.id, "bench")
            return await agents.resume(a.id)

        def step(aid: Any, *args: Any) -> Awaitable[object]:
            return pool.fetchrow(transition_sql.TRANSITION, aid, *args)

        async def agent_raw(i: int) -> object:
            row = await pool.fetchrow(
                agent_sql.INSERT_AGENT,
                new_id(), swarm.id, None, "pending", "initializing", "m", "t", {}, None, None, None,
                None, 3, None, {}, final,
            )  # fmt: skip
            assert row is not None
            aid = row[0]
            await step(aid, *transition_sql.status_args("running"))
            await step(aid, *transition_sql.pause_args("bench"))
            return await step(aid, *transition_sql.RESUME_ARGS)

        async def consume_ours(i: int) -> object:
            return await budgets.try_consume(budget.id, 10, Decimal("0.0001"))

        async def consume_raw(i: int) -> object:
            return await consume_new(pool, budget.id)

        since: Any = None

        async def filter_ours(i: int) -> object:
            swarm_id = log_swarms[i % len(log_swarms)]
            return await events.find_by_filter(
                swarm_id=swarm_id, types=common, since=since, limit=100, order="desc"
            )

        async def filter_raw(i: int) -> object:
            return await pool.fetch(filter_sql, 100, log_swarms[i % len(log_swarms)], common, since)

        # The workloads that do not read the event log run before it is loaded: after the load, the
        # commit-bound agent lifecycle came out twice as slow on one side for a whole run (ours in
        # some runs, raw asyncpg's in others, with the same code), which measures the server's state
        # rather than either client. None marks where the log is loaded.
        cases = [
            ("swarms.create + find_by_id", swarm_ours, swarm_raw, total, (1, 8)),
            ("agents: create, running, pause, resume", agent_ours, agent_raw, total // 2, (1, 8)),
            ("budgets.try_consume (combine=False)", consume_ours, consume_raw, total, (1, 8)),
            None,
            # Before event create, whose rows (another swarm's, the newest) would sit on top of the
            # read swarms' in the timestamp index.
            (
                f"events.find_by_filter (swarm, 2 types, since 24h, limit 100) on {log_size:,} events",
                filter_ours,
                filter_raw,
                total,
                (1, 8),
            ),
            ("events.create", event_ours, event_raw, total, (1, 16)),
        ]
        rows = [
            "| workload | concurrency | dash-storage ops/s | raw ops/s | vs raw (higher is better) "
            "| vs raw, paired rounds | CPU µs/op ours | CPU µs/op raw | CPU ratio |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for case in cases:
            if case is None:
                start = await db.fetchval(
                    "SELECT date_trunc('hour', now()) - make_interval(days => $1)", log_loader.DAYS
                )
                await log_loader.load(db, log_size, start, partitioned=True)
                log_swarms += [  # the log's swarms (their ids are derived from their numbers)
                    r[0]
                    for r in await db.fetch(
                        "SELECT md5('dash-bench-swarm-' || s)::uuid AS id "
                        "FROM generate_series(0, $1::int - 1) s ORDER BY id",
                        log_loader.SWARMS,
                    )
                ]
                since = await db.fetchval("SELECT now() - interval '24 hours'")
                continue
            name, ours, raw, n, concurrencies = case
            for concurrency in concurrencies:
                await checkpoint(db)
                r_ours, c_ours, r_raw, c_raw, paired = await compare_cpu(ours, raw, n, concurrency, rounds)
                line = (
                    f"| {name} | {concurrency} | {r_ours:,.0f} | {r_raw:,.0f} | {r_ours / r_raw:.2f}x "
                    f"| {paired:.2f}x | {c_ours:.0f} | {c_raw:.0f} | {c_ours / c_raw:.2f}x |"
                )
                print(line, flush=True)
                rows.append(line)
        await pool.close()
    return "\n".join(
        [
            "## Single-row repository workloads versus raw asyncpg (no pool reset)",
            "",
            f"Measured {today()} on {machine()}, PostgreSQL {version}, uvloop.",
            f"Median of {rounds} interleaved rounds of {total:,} operations a side (the agent lifecycle: "
            f'{total // 2:,}); "paired rounds": the median of each round\'s own '
            "ratio, its two sides run back to back; each side starts after a full garbage collection; "
            f"pools of {pool_size} connections; raw asyncpg runs "
            "the same SQL on a pool that does not reset connections on release; CPU is the client's "
            "process time per op; each comparison starts after a CHECKPOINT. The consumes (one "
            "budget, no key: `CONSUME_NEW` on both sides) take "
            "turns in the library, at most two sent at once (`budget_turns`); raw asyncpg sends all of "
            f"them at once. Before the event workloads the events table gets {log_size:,} events (30 days, "
            "5 swarms, the type mix of the queries benchmark, generated server-side); find_by_filter "
            "reads those swarms, newest first, and event create appends to the same partitioned "
            "table. The other workloads run before that load.",
            "",
            "\n".join(rows),
            "",
        ]
    )


if __name__ == "__main__":
    import argparse

    from dash_storage.cli.common import run as run_loop

    parser = argparse.ArgumentParser(description="repositories versus raw asyncpg (prints the tables)")
    parser.add_argument("--single-row", action="store_true", help="only the single-row workloads")
    parser.add_argument("--total", type=int, default=1200)
    parser.add_argument("--rounds", type=int, default=21)
    opts = parser.parse_args()
    if opts.single_row:
        print(run_loop(run_single_row(opts.total, rounds=opts.rounds)))
    else:
        print(run_loop(run(opts.total)))

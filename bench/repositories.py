"""Per-call cost of the repositories against raw asyncpg running the same SQL, in the same run.

Operations: EventRepository.create / find_by_id / find_by_filter / create_many(100) and
BudgetRepository.consume_budget. Each is run at concurrency 1 (pure per-call overhead) and 16 (a
busy swarm), interleaving rounds of the library and raw asyncpg so that drift hits both alike.
Raw asyncpg gets the same statements, the same arguments, the same JSON codecs and a default pool.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import orjson

from bench.common import (
    Comparison,
    compare,
    machine,
    raw_pool,
    scratch_database,
    server_version,
    table,
    today,
)
from dash_storage.core.ids import new_id
from dash_storage.repositories import budgets as budget_sql
from dash_storage.repositories import event_filters, event_ingest
from dash_storage.repositories.budgets import BudgetRepository
from dash_storage.repositories.events import EventRepository
from dash_storage.repositories.swarms import SwarmRepository

TYPES = ["agent.spawned", "agent.step", "llm.call", "agent.completed"]


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
                lambda i: pool.fetchrow(
                    budget_sql.CONSUME, budget.id, 10, Decimal("0.0001"), str(new_id()), new_id()
                ),
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

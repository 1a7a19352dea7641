"""What a PgBouncer in front of PostgreSQL costs: direct versus session mode versus transaction mode.

Starts two PgBouncers (Debian's ``pgbouncer`` package, ``bench/pgbouncer.py``) in front of the
configured server, one per pool mode, and runs the same single-row workloads over the three paths
in the same run: swarm create + find by id (two statements), event create, budget try_consume
(combine=False: one statement per call). Each path is measured through the library (with the
matching POSTGRES_POOLER) and through raw asyncpg running the same SQL on a pool of the same size
set up the same way (codecs, no reset on release, and the statement cache off in transaction mode,
as anything behind PgBouncer 1.18 in transaction mode must). Rounds of all six sides are
interleaved, so drift hits them alike; each side keeps its median.
"""

from __future__ import annotations

import statistics
from collections.abc import Awaitable
from decimal import Decimal
from typing import Any

import asyncpg

from bench.common import machine, run_ops, scratch_database, server_version, today
from bench.pgbouncer import PgBouncer, ensure_installed, pgbouncer_version
from bench.repositories import Op, consume_new, event_ops, plain_pool, swarm_ops
from dash_storage.core.database import Database
from dash_storage.repositories.budgets import BudgetRepository
from dash_storage.repositories.events import EventRepository
from dash_storage.repositories.swarms import SwarmRepository

PATHS = ("direct", "session", "transaction")


def _workloads(db: Database, pool: asyncpg.Pool, swarm_id: Any, budget_id: Any) -> dict[str, tuple[Op, Op]]:
    """Per workload: (through the library, raw asyncpg with the same SQL and arguments)."""
    swarms, events = SwarmRepository(db), EventRepository(db)
    budgets = BudgetRepository(db, combine=False)

    swarm_ours, swarm_raw = swarm_ops(swarms, pool)
    event_ours, event_raw = event_ops(events, pool, swarm_id)

    def consume_ours(i: int) -> Awaitable[object]:
        return budgets.try_consume(budget_id, 10, Decimal("0.0001"))

    def consume_raw(i: int) -> Awaitable[object]:
        return consume_new(pool, budget_id)

    return {
        "swarms.create + find_by_id": (swarm_ours, swarm_raw),
        "events.create": (event_ours, event_raw),
        "budgets.try_consume (combine=False)": (consume_ours, consume_raw),
    }


async def _measure(sides: dict[str, Op], total: int, concurrency: int, rounds: int) -> dict[str, float]:
    """Median ops/s of each side; rounds interleave every side, in a rotating order."""
    names = list(sides)
    for name in names:  # warm-up: connections, statement caches
        await run_ops(sides[name], max(total // 10, 10), concurrency)
    got: dict[str, list[float]] = {name: [] for name in names}
    for n in range(rounds):
        for name in names[n % len(names) :] + names[: n % len(names)]:
            got[name].append(await run_ops(sides[name], total, concurrency))
    return {name: statistics.median(rates) for name, rates in got.items()}


async def run(total: int = 1500, pool_size: int = 8, rounds: int = 7) -> str:
    binary = ensure_installed()
    bouncer_version = pgbouncer_version(binary)
    bouncers = {mode: PgBouncer(mode, pool_size=pool_size * 2) for mode in ("session", "transaction")}
    try:
        for b in bouncers.values():
            b.start()
        async with scratch_database(
            "dash_bench_pooler", postgres_min_pool_size=pool_size, postgres_max_pool_size=pool_size
        ) as direct:
            if direct.settings.target != "server":
                raise SystemExit("the pooler bench needs a PostgreSQL server on TCP: set POSTGRES_HOST")
            version = await server_version(direct)
            dbs = {"direct": direct}
            for mode, b in bouncers.items():
                dbs[mode] = Database(
                    direct.settings,
                    postgres_host="127.0.0.1",
                    postgres_port=b.port,
                    postgres_pooler=mode,
                    database_direct_url=b.direct_url(),
                )
                await dbs[mode].initialize()
            swarm = await SwarmRepository(direct).create(name="bench")
            budget = await BudgetRepository(direct).create("swarm", swarm.id, allocated=Decimal("1e12"))
            pools = {path: await plain_pool(dbs[path], pool_size) for path in PATHS}
            per_path = {path: _workloads(dbs[path], pools[path], swarm.id, budget.id) for path in PATHS}
            rows = [
                "| workload | concurrency | path | dash-storage ops/s | raw asyncpg ops/s | dash-storage "
                "vs raw | vs direct (dash-storage) |",
                "|---|---:|---|---:|---:|---:|---:|",
            ]
            for workload in per_path["direct"]:
                for concurrency in (1, pool_size):
                    sides: dict[str, Op] = {}
                    for path in PATHS:
                        ours, raw = per_path[path][workload]
                        sides[f"{path}/ours"], sides[f"{path}/raw"] = ours, raw
                    rates = await _measure(sides, total, concurrency, rounds)
                    base = rates["direct/ours"]
                    for path in PATHS:
                        ours_rate, raw_rate = rates[f"{path}/ours"], rates[f"{path}/raw"]
                        line = (
                            f"| {workload} | {concurrency} | {path} | {ours_rate:,.0f} | {raw_rate:,.0f} | "
                            f"{ours_rate / raw_rate:.2f}x | {ours_rate / base:.2f}x |"
                        )
                        print(line, flush=True)
                        rows.append(line)
            for pool in pools.values():
                await pool.close()
            for path in ("session", "transaction"):
                await dbs[path].close()
    finally:
        for b in bouncers.values():
            b.stop()
    return "\n".join(
        [
            "## Behind PgBouncer: direct, session mode, transaction mode",
            "",
            f"Measured {today()} on {machine()}, PostgreSQL {version}, {bouncer_version} (Debian package, "
            f"on the same machine), uvloop. Command: `python -m bench pooler`.",
            f"Median of {rounds} rounds interleaving all six sides; pools of {pool_size} client "
            f"connections, PgBouncer default_pool_size {pool_size * 2}. Each path runs the library with "
            "the matching POSTGRES_POOLER (none / session / transaction) and raw asyncpg on the same path "
            "with the same SQL, codecs and pool (no reset on release; statement cache off in transaction "
            "mode, as PgBouncer before 1.21 requires). Higher is better in both ratio columns: "
            '"vs raw" is the library\'s own overhead on that path, "vs direct" what the path costs '
            "the library.",
            "",
            "\n".join(rows),
            "",
        ]
    )


if __name__ == "__main__":
    from dash_storage.cli.common import run as run_loop

    print(run_loop(run()))

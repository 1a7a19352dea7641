"""Read replicas and failover: what a replica adds to reads, what read-your-writes costs, and how long
a primary restart stalls the callers.

Starts its own primary and streaming replica (``tests/replica_server.py``, the embedded PostgreSQL 18
binaries) on this machine, migrates the primary, and measures in one run:

- read throughput of ``swarms.find_by_id``: the library on the primary only, the library with
  DATABASE_READ_URL (every read on the replica), and raw asyncpg on the replica with the same SQL;
- write-then-read latency (``swarms.update_status`` then ``find_by_id`` of the same row): primary only,
  with the replica (read-your-writes: one ``pg_current_wal_lsn()`` on the primary and one replayed
  position check on the replica before the read), and raw asyncpg on the primary;
- a primary restart (``pg_ctl restart -m fast``, then ``-m immediate``: a crash) under a load of
  retried reads and writes: the stall (from the restart command to the first call that succeeded
  after it), the recovery time (from the server accepting connections again to that call), and the
  calls that failed.

Rounds interleave the sides; each keeps its median. Both servers share this machine's cores, so the
replica here adds no CPU: the figure is the routing's cost, not a scale-out.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from bench.common import machine, run_ops, today
from dash_storage.core.connections import init_connection, keep_session
from dash_storage.core.database import Database
from dash_storage.core.errors import DashStorageError
from dash_storage.migrations.runner import MigrationRunner
from dash_storage.repositories import swarms as swarm_sql
from dash_storage.repositories.swarms import SwarmRepository
from tests.replica_server import ReplicaPair

Op = Callable[[int], Awaitable[object]]


async def _rates(sides: dict[str, Op], total: int, concurrency: int, rounds: int) -> dict[str, float]:
    for op in sides.values():
        await run_ops(op, max(total // 10, 10), concurrency)
    got: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for n in range(rounds):
        for name in names[n % len(names) :] + names[: n % len(names)]:
            got[name].append(await run_ops(sides[name], total, concurrency))
    return {name: statistics.median(v) for name, v in got.items()}


async def _restart_under_load(pair: ReplicaPair, db: Database, mode: str, workers: int = 8) -> dict[str, Any]:
    """Restart the primary (``pg_ctl restart -m mode``) while ``workers`` callers loop over retried
    reads and retried idempotent writes; time the stall and count the failed calls."""
    swarms = SwarmRepository(db)
    swarm = await swarms.create(name="failover-" + uuid.uuid4().hex[:8])
    stop = asyncio.Event()
    successes: list[float] = []  # completion times
    failures: list[str] = []
    calls = [0]

    async def worker(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            calls[0] += 1
            try:
                if i % 2:
                    await swarms.find_by_id(swarm.id)
                else:
                    await swarms.update_status(swarm.id, ("paused", "active")[i % 4 // 2])
            except DashStorageError as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                continue
            successes.append(time.perf_counter())

    tasks = [asyncio.create_task(worker(n)) for n in range(workers)]
    await asyncio.sleep(1.0)
    issued = time.perf_counter()
    await asyncio.to_thread(pair.restart_primary, mode)
    back = time.perf_counter()  # pg_ctl -w returned: the server accepts connections
    while not any(t > back for t in successes):  # noqa: ASYNC110 - polling a list the workers fill
        await asyncio.sleep(0.005)
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*tasks)
    first = min(t for t in successes if t > back)
    # The longest gap between two successful calls around the restart: how long callers stalled.
    around = sorted(t for t in successes if t > issued - 1.0)
    gap = max(b - a for a, b in itertools.pairwise(around))
    return {
        "mode": mode,
        "restart_s": back - issued,
        "recovery_s": first - back,
        "stall_s": gap,
        "calls": calls[0],
        "failed": len(failures),
        "why": sorted(set(failures))[:3],
    }


async def run(total: int = 2000, rounds: int = 5) -> str:
    pair = ReplicaPair().start()
    try:
        setup = Database(database_url=pair.primary_url)
        await MigrationRunner(setup).migrate()
        await setup.close()
        common: dict[str, Any] = {"postgres_min_pool_size": 8, "postgres_max_pool_size": 8}
        primary = Database(database_url=pair.primary_url, **common)
        replica = Database(database_url=pair.primary_url, database_read_url=pair.replica_url, **common)
        for db in (primary, replica):
            await db.initialize()
        assert replica.replicas is not None
        await replica.replicas.check()
        # Raw asyncpg as the library runs it: the same codecs, no reset on release.
        raw = {"min_size": 8, "max_size": 8, "init": init_connection, "reset": keep_session}
        raw_replica = await asyncpg.create_pool(pair.replica_url, **raw)
        raw_primary = await asyncpg.create_pool(pair.primary_url, **raw)
        assert raw_replica is not None and raw_primary is not None
        swarm = await SwarmRepository(primary).create(name="bench-replicas")
        await asyncio.sleep(0.2)  # replayed by then

        def find(db: Database) -> Op:
            repo = SwarmRepository(db)
            return lambda _i: repo.find_by_id(swarm.id)

        def raw_find(pool: asyncpg.Pool) -> Op:
            return lambda _i: pool.fetchrow(swarm_sql.SELECT_SWARM_BY_ID, swarm.id)

        read_rows = []
        for concurrency in (1, 8):
            r = await _rates(
                {
                    "primary only": find(primary),
                    "with replica": find(replica),
                    "raw asyncpg, replica": raw_find(raw_replica),
                },
                total,
                concurrency,
                rounds,
            )
            read_rows.append(
                f"| {concurrency} | {r['primary only']:,.0f} | {r['with replica']:,.0f} | "
                f"{r['raw asyncpg, replica']:,.0f} | {r['with replica'] / r['primary only']:.2f}x | "
                f"{r['with replica'] / r['raw asyncpg, replica']:.2f}x |"
            )
            print(read_rows[-1], flush=True)

        served_before = replica.replicas.replicas[0].reads
        waits_before = replica.replicas.waits

        def write_read(db: Database) -> Op:
            repo = SwarmRepository(db)

            async def op(i: int) -> object:
                status = ("paused", "active")[i % 2]
                await repo.update_status(swarm.id, status)
                found = await repo.find_by_id(swarm.id)
                assert found is not None and found.status == status
                return found

            return op

        async def raw_write_read(i: int) -> object:
            status = ("paused", "active")[i % 2]
            await raw_primary.fetchrow(swarm_sql.UPDATE_SWARM_STATUS, swarm.id, status, swarm_sql._FINAL)
            return await raw_primary.fetchrow(swarm_sql.SELECT_SWARM_BY_ID, swarm.id)

        pairs = total // 4
        w = await _rates(
            {"primary only": write_read(primary), "with replica": write_read(replica), "raw": raw_write_read},
            pairs,
            1,
            rounds,
        )
        served = replica.replicas.replicas[0].reads - served_before
        waited = replica.replicas.waits - waits_before
        ms = {name: 1000.0 / rate for name, rate in w.items()}
        print(ms, served, waited, flush=True)
        await raw_replica.close()
        await raw_primary.close()
        await replica.close()

        failover = []
        for mode in ("fast", "immediate"):
            failover.append(await _restart_under_load(pair, primary, mode))
            print(failover[-1], flush=True)
        await primary.close()
    finally:
        pair.stop()

    lines = [
        "## Read replicas and failover",
        "",
        f"Measured {today()} on {machine()}, PostgreSQL 18 (embedded binaries): a primary and a streaming "
        "replica started by the bench on this machine (they share its cores, so the replica adds no CPU "
        "here: the figures are the cost of the routing, not a scale-out). Command: `python -m bench "
        f"replicas`. Median of {rounds} interleaved rounds; pools of 8.",
        "",
        "Reads (`swarms.find_by_id`, ops/s): the library without DATABASE_READ_URL, the library with it "
        "(every read on the replica), raw asyncpg on the replica with the same SQL.",
        "",
        "| concurrency | primary only | with replica | raw asyncpg on the replica | with replica vs "
        "primary only | with replica vs raw |",
        "|---:|---:|---:|---:|---:|---:|",
        *read_rows,
        "",
        "Write-then-read (`update_status` then `find_by_id` of the same row, one caller, ms per pair; "
        "every read checked to see its write):",
        "",
        "| primary only | with replica (read-your-writes) | raw asyncpg on the primary | cost of "
        "read-your-writes |",
        "|---:|---:|---:|---:|",
        f"| {ms['primary only']:.2f} | {ms['with replica']:.2f} | {ms['raw']:.2f} | "
        f"+{ms['with replica'] - ms['primary only']:.2f} ms "
        f"({ms['with replica'] / ms['primary only']:.2f}x) |",
        "",
        f"With the replica, {served:,} of those reads were served by it and {waited:,} first asked it how "
        "far it had replayed (the rest found the replica's cached position already past the write, or "
        "fell back to "
        "the primary after DATABASE_READ_WAIT). Each pair pays one `pg_current_wal_lsn()` on the primary "
        "and, when the replica's cached position is behind, one `pg_last_wal_replay_lsn()` on the replica.",
        "",
        "Primary restart under load (8 callers looping over retried `find_by_id` and retried "
        "`update_status`, POSTGRES_RETRY_ATTEMPTS=3, POSTGRES_RETRY_DELAY=1000 ms, the defaults):",
        "",
        "| restart | pg_ctl restart took | recovery (server back -> first successful call) | longest stall "
        "between two successful calls | calls | failed calls |",
        "|---|---:|---:|---:|---:|---:|",
        *(
            f"| -m {f['mode']} | {f['restart_s']:.2f} s | {f['recovery_s'] * 1000:.0f} ms | "
            f"{f['stall_s']:.2f} s | {f['calls']:,} | {f['failed']} |"
            for f in failover
        ),
        "",
    ]
    for f in failover:
        if f["failed"]:
            lines.append(f"Failures with -m {f['mode']}: {'; '.join(f['why'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    from dash_storage.cli.common import run as run_loop

    print(run_loop(run()))

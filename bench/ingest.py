"""Event ingest: the batching EventWriter and create_many against raw asyncpg, in the same run.

    .venv/bin/python -m bench ingest                         # full size, rewrites its section
    .venv/bin/python bench/ingest.py --events 20000          # prints the section, other sizes
    .venv/bin/python bench/ingest.py --parts bulk --rounds 11 # only create_many(1000) against COPY

1. 64 concurrent producers, each creating events one at a time (awaiting each, as agents do):
   - ``EventWriter.create`` (validation, shared batches, one commit per batch);
   - raw asyncpg: ``pool.fetchrow`` of the repository's own single-row INSERT (one commit each);
   - raw asyncpg ``copy_records_to_table`` of the same rows in batches of 64 on one connection:
     what a hand-written batcher could do with the 64 events these producers have outstanding;
   - raw asyncpg ``copy_records_to_table`` in batches of 500 on two connections: the ceiling for
     getting these rows into the table with asyncpg, whoever produces them.
   Plus the writer with 512 producers, to show what it does when more events are outstanding.
2. ``EventRepository.create_many`` of 1,000 events against raw ``copy_records_to_table`` of 1,000.
3. The COPY threshold: ``create_many(n)`` forced through each path (one INSERT over arrays, or
   one binary COPY) for small n; ``COPY_MIN_BATCH`` is set from this.

Raw COPY sends every column but the timestamp (its default, now(), fills it in) and returns
nothing; the library validates, generates ids, stamps the database clock and returns the stored
events. Rounds are interleaved and ``events`` is emptied (then a CHECKPOINT) before each
measurement, so table growth and drift hit every side alike; medians are reported. Timings are
never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import checkpoint, machine, raw_pool, scratch_database, server_version, today
from dash_storage.core.database import Database
from dash_storage.core.ids import new_id
from dash_storage.repositories import event_copy, event_ingest
from dash_storage.repositories.event_input import MAX_BATCH as MAX_EVENTS_PER_CALL
from dash_storage.repositories.event_writer import EventWriter
from dash_storage.repositories.events import EventRepository

PRODUCERS = 64
MAX_BATCH = 500
WRITER_CONCURRENCY = 2
THRESHOLD_SIZES = (1, 2, 4, 8, 16, 32, 64, 96, 128, 256)
TYPES = ["agent.spawned", "agent.step", "llm.call", "agent.completed"]
RAW_COPY_COLUMNS = [c for c in event_copy.COPY_COLUMNS if c != "timestamp"]

Case = Callable[[int], Awaitable[float]]  # (number of events) -> events per second


def payload(i: int) -> dict[str, Any]:
    return {"step": i, "tokens": 120 + i % 50, "model": "kimi-k2.5", "note": "réponse reçue"}


async def producers(total: int, workers: int, create: Callable[[int], Awaitable[object]]) -> float:
    """``workers`` tasks, each creating events one at a time until ``total`` are made; events/s."""
    counter = iter(range(total))

    async def producer() -> None:
        for i in counter:
            await create(i)

    started = time.perf_counter()
    await asyncio.gather(*(producer() for _ in range(workers)))
    return total / (time.perf_counter() - started)


async def batches(
    total: int, size: int, workers: int, write: Callable[[int, int], Awaitable[object]]
) -> float:
    """``write(first, n)`` for consecutive batches of ``size`` on ``workers`` tasks; events/s."""
    counter = iter(range(0, total, size))

    async def worker() -> None:
        for first in counter:
            await write(first, min(size, total - first))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return total / (time.perf_counter() - started)


async def rounds(db: Database, cases: dict[str, tuple[Case, int]], n: int) -> dict[str, float]:
    """A warm-up (a tenth of the size), then ``n`` interleaved rounds of every case, ``events``
    emptied (and a CHECKPOINT) before each; the median events/s of each case."""
    results: dict[str, list[float]] = {name: [] for name in cases}
    for case, size in cases.values():  # connections, prepared statements, codecs
        await case(max(size // 10, 1))
    for _ in range(n):
        for name, (case, size) in cases.items():
            await db.execute("TRUNCATE events")
            await checkpoint(db)
            results[name].append(await case(size))
    return {name: statistics.median(values) for name, values in results.items()}


PARTS = ("writer", "bulk", "threshold")


async def run(
    events: int = 100_000,
    batch_ops: int = 200,
    n_rounds: int = 3,
    database: str = "dash_bench_ingest",
    parts: tuple[str, ...] = PARTS,
) -> str:
    async with scratch_database(database, postgres_min_pool_size=16, postgres_max_pool_size=16) as db:
        version = await server_version(db)
        swarm = new_id()
        await db.execute("INSERT INTO swarms (id, name) VALUES ($1, 'ingest')", swarm)
        repo = EventRepository(db)
        insert_pool = await raw_pool(db, min_size=16, max_size=16)
        # A plain pool (asyncpg's own binary JSONB codec, which takes JSON text) for raw COPY.
        copy_pool = await asyncpg.create_pool(min_size=2, max_size=2, **await db.connect_kwargs())
        assert copy_pool is not None

        def raw_records(first: int, n: int) -> list[tuple[Any, ...]]:
            return [
                (
                    new_id(),
                    swarm,
                    None,
                    TYPES[i % 4],
                    orjson.dumps(payload(i)).decode(),
                    None,
                    None,
                    "agent",
                    "info",
                )
                for i in range(first, first + n)
            ]

        async def raw_copy(first: int, n: int) -> None:
            async with copy_pool.acquire() as con:
                await con.copy_records_to_table(
                    event_copy.COPY_TABLE, records=raw_records(first, n), columns=RAW_COPY_COLUMNS
                )

        def through_writer(workers: int) -> Case:
            async def case(n: int) -> float:
                async with EventWriter(db, max_batch=MAX_BATCH, max_concurrency=WRITER_CONCURRENCY) as writer:
                    return await producers(
                        n,
                        workers,
                        lambda i: writer.create(swarm, TYPES[i % 4], payload=payload(i), entity_type="agent"),
                    )

            return case

        async def raw_insert(n: int) -> float:
            return await producers(
                n,
                PRODUCERS,
                lambda i: insert_pool.fetchrow(
                    event_ingest.INSERT_EVENT,
                    *(new_id(), swarm, None, TYPES[i % 4], payload(i), None, None, None, "agent", "info"),
                ),
            )

        async def raw_copy_64(n: int) -> float:
            return await batches(n, PRODUCERS, 1, raw_copy)

        async def raw_copy_500(n: int) -> float:
            return await batches(n, MAX_BATCH, WRITER_CONCURRENCY, raw_copy)

        single: dict[str, float] = {}
        if "writer" in parts:
            single = await rounds(
                db,
                {
                    "writer": (through_writer(PRODUCERS), events),
                    "writer512": (through_writer(512), events),
                    "insert": (raw_insert, events // 4),  # the slow one: fewer events, same rate
                    "copy64": (raw_copy_64, events),
                    "copy500": (raw_copy_500, events),
                },
                n_rounds,
            )
            print(f"  producers: { {k: round(v) for k, v in single.items()} }", flush=True)

        def items(first: int, n: int) -> list[dict[str, Any]]:
            return [
                {"swarm_id": swarm, "type": TYPES[i % 4], "payload": payload(i), "entity_type": "agent"}
                for i in range(first, first + n)
            ]

        async def create_many_1000(n: int) -> float:
            return await batches(n, 1000, 1, lambda first, k: repo.create_many(items(first, k)))

        async def raw_copy_1000(n: int) -> float:
            return await batches(n, 1000, 1, raw_copy)

        bulk: dict[str, float] = {}
        # Bulk rounds of 200 calls (a few seconds each; rounds of 50 calls swung by 15% with the
        # checkpoints) and at least 7 of them steady the median.
        bulk_rounds = max(n_rounds, 7)
        if "bulk" in parts:
            bulk = await rounds(
                db,
                {
                    "create_many": (create_many_1000, batch_ops * 1000),
                    "copy": (raw_copy_1000, batch_ops * 1000),
                },
                bulk_rounds,
            )
            print(f"  create_many: { {k: round(v) for k, v in bulk.items()} }", flush=True)

        def forced(size: int, copy: bool) -> Case:
            async def case(n: int) -> float:
                saved = event_ingest.COPY_MIN_BATCH
                event_ingest.COPY_MIN_BATCH = 1 if copy else MAX_EVENTS_PER_CALL + 1
                try:
                    return await batches(n, size, 1, lambda first, k: repo.create_many(items(first, k)))
                finally:
                    event_ingest.COPY_MIN_BATCH = saved

            return case

        threshold: dict[int, dict[str, float]] = {}
        for size in THRESHOLD_SIZES if "threshold" in parts else ():
            n = max(size * 20, 2000)
            got = await rounds(
                db, {"insert": (forced(size, False), n), "copy": (forced(size, True), n)}, n_rounds
            )
            threshold[size] = got
            print(f"  create_many({size}): { {k: round(v) for k, v in got.items()} }", flush=True)

        await insert_pool.close()
        await copy_pool.close()

    lines = [
        "## Event ingest: batching writer and COPY",
        "",
        f"Measured {today()} on {machine()}, PostgreSQL {version}, uvloop. Command: `make bench`.",
        f"Median of {n_rounds} interleaved rounds, `events` emptied and a CHECKPOINT before each;",
        f"{events:,} events per round (raw single-row INSERT: {events // 4:,}). Every commit is durable",
        "(synchronous_commit on).",
        f"The writer is `EventWriter(max_batch={MAX_BATCH}, max_concurrency={WRITER_CONCURRENCY})`.",
        "",
    ]
    if single:
        w, w512, i, c64, c500 = (single[k] for k in ("writer", "writer512", "insert", "copy64", "copy500"))
        lines += [
            "| way to write | events/s | vs raw COPY ×500 | vs raw COPY ×64 | vs raw INSERT |",
            "|---|---:|---:|---:|---:|",
            f"| `EventWriter.create`, {PRODUCERS} producers one at a time | {w:,.0f} | {w / c500:.2f}x "
            f"| {w / c64:.2f}x | {w / i:.2f}x |",
            f"| `EventWriter.create`, 512 producers one at a time | {w512:,.0f} | {w512 / c500:.2f}x "
            f"| {w512 / c64:.2f}x | {w512 / i:.2f}x |",
            f"| raw asyncpg single-row INSERT, {PRODUCERS} producers, pool of 16 | {i:,.0f} "
            f"| {i / c500:.2f}x | {i / c64:.2f}x | 1.00x |",
            f"| raw asyncpg COPY, batches of {PRODUCERS}, one connection | {c64:,.0f} | {c64 / c500:.2f}x "
            f"| 1.00x | {c64 / i:.2f}x |",
            f"| raw asyncpg COPY, batches of {MAX_BATCH}, {WRITER_CONCURRENCY} connections | {c500:,.0f} "
            f"| 1.00x | {c500 / c64:.2f}x | {c500 / i:.2f}x |",
            "",
            f"{PRODUCERS} producers that each await their event never have more than {PRODUCERS} events",
            f"outstanding, so no writer can commit more than {PRODUCERS} at a time, and every commit waits "
            "for",
            f"a WAL flush, which raw COPY in batches of {MAX_BATCH} pays once per {MAX_BATCH} rows. "
            '"vs raw COPY',
            f'×{PRODUCERS}" compares with COPY of the batches these producers can form; with more producers',
            "outstanding the writer's batches grow (the 512-producer row).",
            "",
        ]
    if bulk:
        m, mc = bulk["create_many"], bulk["copy"]
        lines += [
            f"Median of {bulk_rounds} interleaved rounds of {batch_ops} calls each:",
            "",
            "| bulk write | events/s | vs raw COPY of 1000 rows |",
            "|---|---:|---:|",
            f"| `EventRepository.create_many(1000)`, one call at a time | {m:,.0f} | {m / mc:.2f}x |",
            f"| raw asyncpg `copy_records_to_table` of 1000 rows, one at a time | {mc:,.0f} | 1.00x |",
            "",
        ]
    if threshold:
        lines += [
            f"Choosing the path (`COPY_MIN_BATCH` = {event_ingest.COPY_MIN_BATCH}): `create_many(n)` "
            "forced through",
            "each, one call at a time.",
            "",
            "| n | one INSERT over arrays | one binary COPY | COPY / INSERT |",
            "|---:|---:|---:|---:|",
        ]
    for size, got in threshold.items():
        ins, copy = got["insert"], got["copy"]
        lines.append(f"| {size} | {ins:,.0f} ev/s | {copy:,.0f} ev/s | {copy / ins:.2f}x |")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    from dash_storage.cli.common import run as run_loop

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch-ops", type=int, default=200, help="create_many(1000) calls per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--database", default="dash_bench_ingest")
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated, of {', '.join(PARTS)} (default: all)",
    )
    args = parser.parse_args()
    parts = tuple(p for p in args.parts.split(",") if p)
    if unknown := set(parts) - set(PARTS):
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    print(run_loop(run(args.events, args.batch_ops, args.rounds, args.database, parts)))


if __name__ == "__main__":
    main()

"""Benchmark: ``import_sqlite`` of a legacy dash.db with 1,000,000 events.

    make bench                                  # all benchmarks, rewrites BENCHMARKS.md
    .venv/bin/python -m bench import            # this one only, rewrites its section
    .venv/bin/python bench/import_sqlite.py --events 20000   # prints the section, other sizes

Builds (once, cached under bench/results/) a legacy file with the test factory's realistic rows,
imports it into a scratch database ``dash_bench_import`` (created, migrated, dropped), then:

1. the first import (everything written) — the headline rows/s;
2. a second import of the same file (everything already present: the idempotent re-run);
3. a dry run;
4. the baseline: raw asyncpg ``copy_records_to_table`` of the same, already converted, event rows
   into the emptied ``events`` table, on one connection, same batch size (no reading, no
   conversion, no ON CONFLICT): the straightforward way to load these rows with asyncpg. The
   report gives the importer's rate as a ratio of it (the importer uses two writer connections).

``run()`` returns the results as a Markdown section; timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench, when run as a script
sys.path.insert(0, str(ROOT / "src"))

from bench.common import RESULTS, scratch_database  # noqa: E402
from bench.legacy_factory import build_legacy_file  # noqa: E402
from dash_storage.cli.common import run as run_loop  # noqa: E402
from dash_storage.core.database import Database  # noqa: E402
from dash_storage.core.models import Event  # noqa: E402
from dash_storage.legacy import import_sqlite  # noqa: E402

BENCH_DB = "dash_bench_import"
EVENT_COLUMNS = Event._fields


def legacy_file(events: int, swarms: int, agents: int, rebuild: bool) -> tuple[Path, float | None]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"legacy_{events}e_{swarms}s_{agents}a.db"
    if path.exists() and not rebuild:
        return path, None
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    started = time.perf_counter()
    build_legacy_file(path, swarms=swarms, agents=agents, events=events, seed=11)
    return path, time.perf_counter() - started


async def raw_copy_baseline(db: Database, batch: int) -> tuple[int, float]:
    """Raw asyncpg COPY of the imported (already converted) events into the emptied events table.

    A plain ``asyncpg.connect`` (asyncpg's own binary jsonb codec, payload passed as JSON text), the
    same batch size, one transaction per batch: the ceiling for getting these rows into this table.
    """
    con: asyncpg.Connection = await asyncpg.connect(**await db.connect_kwargs())
    try:
        select = ", ".join("payload::text" if c == "payload" else f'"{c}"' for c in EVENT_COLUMNS)
        rows = await con.fetch(f"SELECT {select} FROM events")
        records = [tuple(r) for r in rows]
        del rows
        await con.execute("TRUNCATE events")
        started = time.perf_counter()
        for i in range(0, len(records), batch):
            async with con.transaction():
                await con.copy_records_to_table(
                    "events", records=records[i : i + batch], columns=EVENT_COLUMNS
                )
        elapsed = time.perf_counter() - started
        count = await con.fetchval("SELECT count(*) FROM events")
        assert count == len(records), (count, len(records))
    finally:
        await con.close()
    return len(records), elapsed


async def run(
    events: int = 1_000_000,
    swarms: int = 300,
    agents: int = 600,
    batch_size: int = 5000,
    rebuild: bool = False,
    keep: bool = False,
) -> str:
    """Run the benchmark; the results as a Markdown section."""
    path, build_seconds = legacy_file(events, swarms, agents, rebuild)
    async with scratch_database(
        BENCH_DB, keep=keep, postgres_min_pool_size=1, postgres_max_pool_size=4
    ) as db:
        server_version = await db.fetchval("SHOW server_version")

        first = await import_sqlite(db, path, batch_size=batch_size, report_path=RESULTS / "import.jsonl")
        second = await import_sqlite(db, path, batch_size=batch_size, report_path=RESULTS / "again.jsonl")
        dry = await import_sqlite(
            db, path, batch_size=batch_size, dry_run=True, report_path=RESULTS / "dry.jsonl"
        )
        copied, copy_seconds = await raw_copy_baseline(db, batch_size)

    ev = first.tables["events"]
    raw_rate = copied / copy_seconds if copy_seconds else 0.0
    lines = [
        "## import-sqlite: legacy dash.db → PostgreSQL",
        "",
        f"- machine: `{platform.machine()}`, {os.cpu_count()} CPUs, PostgreSQL {server_version} "
        f"(schema from migrations), asyncpg {asyncpg.__version__}, Python {platform.python_version()}",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        "- command: `make bench` / `python -m bench import`",
        f"- legacy file: {path.name} ({path.stat().st_size / 1e6:.0f} MB; "
        f"{first.tables['swarms'].read} swarms, {first.tables['agents'].read} agents, {ev.read:,} events"
        + (f"; built in {build_seconds:.1f} s" if build_seconds is not None else "; cached")
        + f"), batch size {batch_size}",
        "",
        "| run | events read | written | already present | rejected | seconds | events/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rep in (("first import", first), ("second import (no-op)", second), ("dry run", dry)):
        e = rep.tables["events"]
        lines.append(
            f"| {name} | {e.read:,} | {e.written:,} | {e.already_present:,} | {e.rejected:,} | "
            f"{rep.elapsed_seconds:.1f} | {rep.events_per_second:,.0f} |"
        )
    lines.append(
        "| baseline: raw asyncpg COPY of the converted rows (1 connection) | "
        f"{copied:,} | {copied:,} | 0 | 0 | {copy_seconds:.1f} | {raw_rate:,.0f} |"
    )
    lines += [
        "",
        f"First import: **{first.events_per_second:,.0f} events/s** end to end (read SQLite, convert, COPY, "
        f"INSERT ... ON CONFLICT into the indexed `events`, FK checks; 2 writer connections), "
        f"{first.events_per_second / raw_rate:.2f}x the raw-COPY baseline."
        if raw_rate
        else "",
    ]
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--swarms", type=int, default=300)
    parser.add_argument("--agents", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached legacy file")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database afterwards")
    args = parser.parse_args()
    print(
        await run(
            events=args.events,
            swarms=args.swarms,
            agents=args.agents,
            batch_size=args.batch_size,
            rebuild=args.rebuild,
            keep=args.keep,
        )
    )


if __name__ == "__main__":
    run_loop(main())

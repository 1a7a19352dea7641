"""Shared pieces of the benchmarks: a scratch database, timing, machine facts, Markdown output."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import platform
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from dash_storage.core.config import load_settings
from dash_storage.core.database import Database
from dash_storage.core.errors import DashStorageError
from dash_storage.migrations.runner import MigrationRunner

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


@asynccontextmanager
async def scratch_database(
    name: str, *, keep: bool = False, migrate: bool = True, **overrides: object
) -> AsyncIterator[Database]:
    """A freshly created database ``name``, migrated unless ``migrate`` is false (dropped afterwards
    unless ``keep``)."""
    # Loaders send long statements (millions of rows): no per-statement time limit here.
    settings = load_settings(postgres_db=name, **{"postgres_command_timeout": 0, **overrides})
    admin_db = Database(settings)
    kwargs = await admin_db.connect_kwargs("postgres")
    admin = await asyncpg.connect(**kwargs)
    ident = await admin.fetchval("SELECT quote_ident($1)", name)
    await admin.execute(f"DROP DATABASE IF EXISTS {ident} WITH (FORCE)")
    await admin.execute(f"CREATE DATABASE {ident}")
    db = Database(settings)
    try:
        await db.initialize()
        if migrate:
            await MigrationRunner(db).migrate()
        yield db
    finally:
        await db.close()
        if not keep:
            await admin.execute(f"DROP DATABASE IF EXISTS {ident} WITH (FORCE)")
        await admin.close()


async def raw_pool(db: Database, *, min_size: int, max_size: int) -> asyncpg.Pool:
    """A plain asyncpg pool on the same database, set up as an asyncpg user would (JSON codecs)."""
    import orjson

    async def init(con: asyncpg.Connection) -> None:
        for typename in ("json", "jsonb"):
            await con.set_type_codec(
                typename,
                schema="pg_catalog",
                encoder=lambda v: orjson.dumps(v).decode(),
                decoder=orjson.loads,
                format="text",
            )

    kwargs = await db.connect_kwargs()
    pool = await asyncpg.create_pool(min_size=min_size, max_size=max_size, init=init, **kwargs)
    assert pool is not None
    return pool


async def checkpoint(db: Database) -> None:
    """Write out what earlier work left in the server's buffers, so that it is not flushed in the
    middle of the next measurement, on one side's rounds more than the other's (skipped where the
    role may not run CHECKPOINT)."""
    try:
        await db.execute("CHECKPOINT")
    except DashStorageError:
        pass


async def run_ops(op: Callable[[int], Awaitable[object]], total: int, concurrency: int) -> float:
    """Run ``op(i)`` for i in range(total) on ``concurrency`` workers; return operations per second."""
    counter = iter(range(total))

    async def worker() -> None:
        for i in counter:
            await op(i)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total / (time.perf_counter() - started)


@dataclass
class Comparison:
    name: str
    concurrency: int
    ours: float  # operations per second (median of rounds)
    raw: float
    unit: str = "ops/s"

    @property
    def cost_ratio(self) -> float:
        """How many times longer one call takes through the library than through raw asyncpg."""
        return self.raw / self.ours


async def compare(
    name: str,
    ours: Callable[[int], Awaitable[object]],
    raw: Callable[[int], Awaitable[object]],
    *,
    total: int,
    concurrency: int,
    rounds: int = 5,
    unit: str = "ops/s",
) -> Comparison:
    """Interleave rounds of both sides (so drift hits both alike) and keep each side's median."""
    await run_ops(ours, max(total // 10, 10), concurrency)  # warm-up: connections, statement caches
    await run_ops(raw, max(total // 10, 10), concurrency)
    a, b = [], []
    for _ in range(rounds):
        a.append(await run_ops(ours, total, concurrency))
        b.append(await run_ops(raw, total, concurrency))
    return Comparison(name, concurrency, statistics.median(a), statistics.median(b), unit)


def machine() -> str:
    import asyncpg as apg

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{platform.machine()}, {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
        f"asyncpg {apg.__version__}"
    )


async def server_version(db: Database) -> str:
    return str(await db.fetchval("SELECT current_setting('server_version')"))


def today() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def table(rows: list[Comparison]) -> str:
    out = [
        "| operation | concurrency | dash-storage | raw asyncpg | cost ratio (lower is better) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r.name} | {r.concurrency} | {r.ours:,.0f} {r.unit} | {r.raw:,.0f} {r.unit} | "
            f"{r.cost_ratio:.2f}x |"
        )
    return "\n".join(out)

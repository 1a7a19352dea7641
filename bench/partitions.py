"""The partitioned event log beside the unpartitioned one, in one run.

    python -m bench partitions                                  # rewrites its section of BENCHMARKS.md
    DASH_BENCH_PARTITION_EVENTS=200000 python -m bench.partitions   # prints the section only

Two scratch databases per size: one with every migration (``events`` range-partitioned by
"timestamp", stats from the hourly and per-minute rollups), one with the migrations up to the last
one before partitioning only (the unpartitioned ``events`` the library had before). Both get the
same events, generated server-side (INSERT ... SELECT generate_series with the same random seeds):
about 30 days in time order, 5 swarms of 10 agents, the skewed type mix and severities of
bench/queries.py. Then, side by side:

1. Reads, one client, calls of the two sides interleaved in rounds: ``get_stats(24)`` (on the
   unpartitioned side the statement get_stats sent before the rollups: one scan of the window's
   events), the ``event_stats_24h`` view (before: the same scan with distinct counts),
   ``find_by_filter(swarm, types, since 24h, limit 100)`` and ``find_by_agent_id(limit 100)``.
   Before these, the partitioned side's rollups are brought up to date as an operator's cron
   would, with ``event_maintenance.maintain`` (what ``dash-db maintain`` runs).
2. Ingest: ``EventWriter`` with 64 producers and ``create_many(1000)``, each side under its own
   library (see bench/partitions_worker.py: the current library cannot write to the old table),
   beside raw asyncpg ``copy_records_to_table`` into the same two tables; interleaved rounds,
   medians.
3. Dropping a month: ``event_partitions.prune`` (what ``dash-db prune`` runs) against the
   batched DELETE the library ran before (10,000 rows a statement, until none is left) for the
   same rows, with the size of ``events`` (all partitions, indexes and TOAST) before and after.
   The DELETE stops after ``DASH_BENCH_PARTITION_DELETE_CAP`` seconds; its total is then
   extrapolated from its rate, and the section says so.

And once: the time of the conversion migrations themselves on an unpartitioned database holding
``DASH_BENCH_PARTITION_CONVERT_EVENTS`` events.

Knobs (environment): DASH_BENCH_PARTITION_EVENTS (comma-separated sizes, default
"1000000,10000000"), DASH_BENCH_PARTITION_CALLS (calls per side of the fast reads, default 500;
the raw-scan ones get 200, or this if smaller), DASH_BENCH_PARTITION_DELETE_CAP (seconds, default
300), DASH_BENCH_PARTITION_CONVERT_EVENTS (default 1000000, 0 skips), DASH_BENCH_UNPARTITIONED_REF
(the git commit whose library writes the unpartitioned side; default: the last commit before
partitioning).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import os
import pickle
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import orjson

from bench import partitions_worker as worker
from bench.common import ROOT, machine, scratch_database, server_version, today
from bench.queries import (
    INSERT_AGENTS,
    INSERT_EVENTS,
    INSERT_SWARMS,
    RARE_TYPES,
    TYPE_MIX,
    Latency,
    measure,
    type_slots,
)
from dash_storage.core.database import Database
from dash_storage.core.ids import new_id
from dash_storage.migrations.runner import MigrationFile, MigrationRunner
from dash_storage.repositories import event_maintenance, event_partitions, event_rollups
from dash_storage.repositories.events import EventRepository

DEFAULT_SIZES = (1_000_000, 10_000_000)
DAYS = 30
SWARMS = 5
AGENTS_PER_SWARM = 10
#: Rows per INSERT ... SELECT statement of the load (each with its own random seed); small enough
#: that no statement holds back the server's oldest transaction (and so others' rollups) for long.
CHUNK = 100_000
#: The last migration of the unpartitioned schema, and the two that convert it.
LAST_UNPARTITIONED = "20261130175500"
PARTITIONS_MIGRATION = "20261130190500"
#: The last commit of the library before the event log was partitioned: it writes the
#: unpartitioned side of the ingest measurement.
BEFORE_PARTITIONING = "fbccebf5a6e2a54f6743598d2823b4685ab075ea"
COMMON = ["llm.call", "tool.call"]
INGEST_EVENTS = 30_000
INGEST_ROUNDS = 7
#: dash-db maintain runs at most, waiting for the rollups to catch up after the load.
MAINTAIN_RUNS = 60
#: The measurements of the last run, written after each size.
SAVED = Path(tempfile.gettempdir()) / "dash_pbench_partitions.pickle"
RAW_COPY_COLUMNS = [
    "id", "swarm_id", "agent_id", "type", "payload", "correlation_id", "parent_event_id",
    "entity_type", "severity",
]  # fmt: skip
#: What the old get_stats sent (sql/events.sql select_stats before the rollups): one scan of the
#: window's events.
OLD_SELECT_STATS = """
SELECT GROUPING(type) AS g_type, GROUPING(severity) AS g_severity, type, severity, count(*)
FROM events
WHERE "timestamp" >= now() - make_interval(secs => $1::float8)
GROUP BY GROUPING SETS ((type), (severity), ())
"""
#: One batch of the old delete_older_than (sql/events.sql delete_events_batch before partitioning),
#: which it repeated, each batch its own statement, until a batch deleted fewer than the batch size.
OLD_DELETE_BATCH = """
DELETE FROM events WHERE id = ANY(ARRAY(
    SELECT id FROM events WHERE "timestamp" < $1 ORDER BY "timestamp", id LIMIT $2
))
"""
OLD_DELETE_BATCH_SIZE = 10_000
#: Every partition of events (or the plain table), with indexes and TOAST.
EVENTS_BYTES = """
SELECT sum(pg_total_relation_size(r))
FROM (SELECT relid FROM pg_partition_tree('events') UNION SELECT 'events'::regclass) AS t(r)
"""
ROLLUP_BYTES = "SELECT pg_total_relation_size('event_counts') + pg_total_relation_size('event_actor_counts')"
ROLLUP_ROWS = "SELECT (SELECT count(*) FROM event_counts), (SELECT count(*) FROM event_actor_counts)"


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").replace("_", "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"{name} must be a whole number, not {raw!r}") from None


def _sizes() -> list[int]:
    raw = os.environ.get("DASH_BENCH_PARTITION_EVENTS", "").strip()
    if not raw:
        return list(DEFAULT_SIZES)
    try:
        sizes = [int(s.replace("_", "")) for s in raw.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(
            f"DASH_BENCH_PARTITION_EVENTS must be comma-separated event counts, not {raw!r}"
        ) from None
    if not sizes or min(sizes) < 10_000:
        raise SystemExit(f"DASH_BENCH_PARTITION_EVENTS: each size must be at least 10000, not {raw!r}")
    return sizes


class MigrationsUpTo(MigrationRunner):
    """Applies the migrations up to and including version ``last`` only: an older schema."""

    def __init__(self, db: Database, last: str) -> None:
        super().__init__(db)
        self.last = last

    def files(self) -> list[MigrationFile]:
        files = super().files()
        if not any(f.name.startswith(self.last) for f in files):
            raise SystemExit(f"no migration {self.last}_*.sql to stop at")
        return [f for f in files if f.name[: len(self.last)] <= self.last]


@asynccontextmanager
async def unpartitioned_database(name: str, **overrides: object) -> AsyncIterator[Database]:
    """A scratch database with the schema as it was before partitioning (dropped afterwards)."""
    async with scratch_database(name, migrate=False, **overrides) as db:
        await MigrationsUpTo(db, LAST_UNPARTITIONED).migrate()
        yield db


# ---------------------------------------------------------------------------------------------
# loading


@dataclass
class Loaded:
    seconds: float
    vacuum_seconds: float
    bytes: int


async def load(db: Database, events: int, start: dt.datetime, *, partitioned: bool) -> Loaded:
    """Swarms, agents and ``events`` events over [start, start + DAYS), the same rows on every
    database (each chunk seeds random() the same way); then VACUUM ANALYZE."""
    started = time.perf_counter()
    span = DAYS * 86_400.0
    await db.execute(INSERT_SWARMS, SWARMS, start - dt.timedelta(days=1))
    await db.execute(INSERT_AGENTS, SWARMS, AGENTS_PER_SWARM, start - dt.timedelta(hours=12))
    if partitioned:
        # The library creates partitions before its own writes; these rows are generated by SQL.
        await event_partitions.cover(db, [start + dt.timedelta(hours=h) for h in range(DAYS * 24 + 1)])
    slots = type_slots()
    async with db.acquire() as con:
        for number, lo in enumerate(range(1, events + 1, CHUNK)):
            hi = min(lo + CHUNK - 1, events)
            await con.execute("SELECT setseed($1)", (number % 1000) / 1000.0)
            await con.execute(INSERT_EVENTS, lo, hi, events, SWARMS, AGENTS_PER_SWARM, start, span, slots)
        loaded = time.perf_counter() - started
        await con.execute("VACUUM ANALYZE")
    vacuumed = time.perf_counter() - started - loaded
    size = int(await db.fetchval(EVENTS_BYTES))
    side = "partitioned" if partitioned else "unpartitioned"
    print(f"  {side}: {events:,} events loaded in {loaded:.0f} s, vacuum {vacuumed:.0f} s", flush=True)
    return Loaded(loaded, vacuumed, size)


# ---------------------------------------------------------------------------------------------
# reads


async def old_get_stats(db: Database, hours: float) -> tuple[int, dict[str, int], dict[str, int]]:
    """What get_stats did before the rollups: the one statement, folded the same way."""
    rows = await db.fetch(OLD_SELECT_STATS, hours * 3600.0, retry=True)
    total, by_type, by_severity = 0, {}, {}
    for g_type, g_severity, typ, sev, n in rows:
        if g_type and g_severity:
            total = int(n)
        elif not g_type:
            by_type[typ] = int(n)
        else:
            by_severity[sev] = int(n)
    return total, by_type, by_severity


@dataclass
class Reads:
    results: list[Latency]
    totals: tuple[int, int]  # events in the last 24 h: partitioned, unpartitioned


async def reads(part: Database, unpart: Database, fast_calls: int, slow_calls: int) -> Reads:
    rp, ru = EventRepository(part), EventRepository(unpart)
    rng = random.Random(6)
    swarm_ids = [r[0] for r in await part.fetch("SELECT id FROM swarms ORDER BY id")]
    agent_ids = [r[0] for r in await part.fetch("SELECT id FROM agents ORDER BY id")]
    pick_swarm = [rng.choice(swarm_ids) for _ in range(fast_calls)]
    pick_agent = [rng.choice(agent_ids) for _ in range(fast_calls)]
    since = await part.fetchval("SELECT now() - interval '24 hours'")
    stats = await rp.get_stats(24)
    old_total, _, _ = await old_get_stats(unpart, 24)
    rounds = 10

    def by_filter(repo: EventRepository, types: list[str]) -> Callable[[int], Awaitable[object]]:
        return lambda i: repo.find_by_filter(swarm_id=pick_swarm[i], types=types, since=since, limit=100)

    cases: list[tuple[str, Callable[[int], Awaitable[object]], Callable[[int], Awaitable[object]], int]] = [
        ("get_stats(24)", lambda i: rp.get_stats(24), lambda i: old_get_stats(unpart, 24), slow_calls),
        ("event_stats_24h view", lambda i: rp.get_stats_24h(), lambda i: ru.get_stats_24h(), slow_calls),
        (
            f"find_by_filter(swarm, 2 common types {'/'.join(COMMON)}, since 24h, limit 100)",
            by_filter(rp, COMMON),
            by_filter(ru, COMMON),
            fast_calls,
        ),
        (
            f"find_by_filter(swarm, 2 rare types {'/'.join(RARE_TYPES)}, since 24h, limit 100)",
            by_filter(rp, RARE_TYPES),
            by_filter(ru, RARE_TYPES),
            fast_calls,
        ),
        (
            "find_by_agent_id(agent, limit 100), newest first",
            lambda i: rp.find_by_agent_id(pick_agent[i], limit=100),
            lambda i: ru.find_by_agent_id(pick_agent[i], limit=100),
            fast_calls,
        ),
    ]  # fmt: skip
    results = [await measure(name, ours, raw, calls, rounds) for name, ours, raw, calls in cases]
    return Reads(results, (stats.total, old_total))


# ---------------------------------------------------------------------------------------------
# ingest


def library_tree(ref: str, into: Path) -> Path:
    """The ``src`` folder of the library at git commit ``ref``, extracted under ``into``."""
    try:
        data = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", ref, "src/dash_storage"],
            check=True,
            capture_output=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = (
            exc.stderr.decode(errors="replace").strip()
            if isinstance(exc, subprocess.CalledProcessError)
            else exc
        )
        raise SystemExit(
            f"cannot read the library at commit {ref} from git ({detail}); set DASH_BENCH_UNPARTITIONED_REF"
        ) from None
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def _inside(path: str, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


async def run_worker(src: Path, database: str, case: str, events: int, swarm: uuid.UUID) -> float:
    """events/s of one bench.partitions_worker run with ``src`` first on the import path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(ROOT)])}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.partitions_worker", database, case, str(events), str(swarm),
        cwd=str(ROOT), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"ingest worker ({case} on {database}) failed:\n{err.decode(errors='replace')}")
    answer = orjson.loads(out.splitlines()[-1])
    if not _inside(answer["library"], src):
        raise RuntimeError(f"the ingest worker imported {answer['library']}, not the library under {src}")
    return float(answer["events_per_s"])


@dataclass
class Ingest:
    #: case -> (partitioned events/s, unpartitioned events/s), medians
    rates: dict[str, tuple[float, float]] = field(default_factory=dict)
    rows_added: int = 0


async def ingest(part: Database, unpart: Database, old_src: Path, swarm: uuid.UUID) -> Ingest:
    new_src = ROOT / "src"
    before = [int(await d.fetchval("SELECT count(*) FROM events")) for d in (part, unpart)]
    pools: list[asyncpg.Pool] = []
    for db in (part, unpart):
        pool = await asyncpg.create_pool(min_size=1, max_size=1, **await db.connect_kwargs())
        assert pool is not None
        pools.append(pool)

    def raw_copy(pool: asyncpg.Pool, batch: int) -> Callable[[int], Awaitable[float]]:
        async def case(n: int) -> float:
            async with pool.acquire() as con:
                started = time.perf_counter()
                for first in range(0, n, batch):
                    records = [
                        (new_id(), swarm, None, worker.TYPES[i % 4], orjson.dumps(worker.payload(i)).decode(),
                         None, None, "agent", "info")
                        for i in range(first, min(first + batch, n))
                    ]  # fmt: skip
                    await con.copy_records_to_table("events", records=records, columns=RAW_COPY_COLUMNS)
                return n / (time.perf_counter() - started)

        return case

    def lib(src: Path, db: Database, case: str) -> Callable[[int], Awaitable[float]]:
        return lambda n: run_worker(src, db.settings.postgres_db, case, n, swarm)

    sides: dict[str, tuple[Callable[[int], Awaitable[float]], Callable[[int], Awaitable[float]]]] = {
        "writer": (lib(new_src, part, "writer"), lib(old_src, unpart, "writer")),
        "create_many": (lib(new_src, part, "create_many"), lib(old_src, unpart, "create_many")),
        "copy64": (raw_copy(pools[0], worker.PRODUCERS), raw_copy(pools[1], worker.PRODUCERS)),
        "copy1000": (raw_copy(pools[0], worker.BULK), raw_copy(pools[1], worker.BULK)),
    }
    for p, u in sides.values():  # warm-up of the in-process sides (the workers warm up themselves)
        await p(2000)
        await u(2000)
    got: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in sides}
    for r in range(INGEST_ROUNDS):
        for name, (p, u) in sides.items():
            # Alternate which side goes first, so drift within a round hits both alike.
            first, second = (p, u) if r % 2 == 0 else (u, p)
            a = await first(INGEST_EVENTS)
            b = await second(INGEST_EVENTS)
            pa, ua = (a, b) if r % 2 == 0 else (b, a)
            got[name][0].append(pa)
            got[name][1].append(ua)
        print(
            f"  ingest round {r + 1}: { {k: (round(v[0][-1]), round(v[1][-1])) for k, v in got.items()} }",
            flush=True,
        )
    for pool in pools:
        await pool.close()
    after = [int(await d.fetchval("SELECT count(*) FROM events")) for d in (part, unpart)]
    result = Ingest({k: (statistics.median(v[0]), statistics.median(v[1])) for k, v in got.items()})
    result.rows_added = after[0] - before[0]
    if after[1] - before[1] != result.rows_added:
        print(f"  note: rows added differ: {after[0] - before[0]:,} vs {after[1] - before[1]:,}", flush=True)
    return result


# ---------------------------------------------------------------------------------------------
# dropping a month


@dataclass
class Drop:
    partitions: int
    events: int
    cutoff: dt.datetime
    seconds: float
    bytes_before: int
    bytes_after: int


@dataclass
class Delete:
    to_delete: int
    deleted: int
    batches: int
    seconds: float
    capped: bool
    bytes_before: int
    bytes_after: int
    vacuum_seconds: float
    bytes_after_vacuum: int

    @property
    def estimated_seconds(self) -> float:
        return self.seconds * self.to_delete / self.deleted if self.capped and self.deleted else self.seconds


async def drop_month(part: Database, keep: dt.timedelta) -> Drop:
    before = int(await part.fetchval(EVENTS_BYTES))
    started = time.perf_counter()
    report = await event_partitions.prune(part, keep)
    seconds = time.perf_counter() - started
    after = int(await part.fetchval(EVENTS_BYTES))
    cutoff = max(p.upper for p in report.partitions)
    left = await part.fetchval('SELECT count(*) FROM events WHERE "timestamp" < $1', cutoff)
    assert left == 0, f"{left} events before the cutoff after the prune"
    print(
        f"  prune: {len(report.partitions)} partitions, {report.events:,} events, {seconds:.2f} s", flush=True
    )
    return Drop(len(report.partitions), report.events, cutoff, seconds, before, after)


async def delete_month(unpart: Database, cutoff: dt.datetime, cap: float) -> Delete:
    to_delete = int(await unpart.fetchval('SELECT count(*) FROM events WHERE "timestamp" < $1', cutoff))
    before = int(await unpart.fetchval(EVENTS_BYTES))
    deleted = batches = 0
    capped = False
    started = time.perf_counter()
    while True:
        status = await unpart.execute(OLD_DELETE_BATCH, cutoff, OLD_DELETE_BATCH_SIZE, retry=True)
        n = int(status.rsplit(" ", 1)[-1])
        deleted += n
        batches += 1
        if n < OLD_DELETE_BATCH_SIZE:
            break
        if time.perf_counter() - started >= cap:
            capped = True
            break
    seconds = time.perf_counter() - started
    after = int(await unpart.fetchval(EVENTS_BYTES))
    print(
        f"  delete: {deleted:,} of {to_delete:,} events in {seconds:.1f} s{' (capped)' if capped else ''}",
        flush=True,
    )
    async with unpart.acquire() as con:
        t = time.perf_counter()
        await con.execute("VACUUM events")
        vacuum_seconds = time.perf_counter() - t
    after_vacuum = int(await unpart.fetchval(EVENTS_BYTES))
    return Delete(to_delete, deleted, batches, seconds, capped, before, after, vacuum_seconds, after_vacuum)


# ---------------------------------------------------------------------------------------------
# the conversion migration


@dataclass
class Conversion:
    events: int
    load_seconds: float
    partition_seconds: float
    rollup_seconds: float
    bytes_before: int
    bytes_after: int
    rollup_bytes: int


async def conversion(events: int, database: str) -> Conversion:
    async with unpartitioned_database(database, postgres_min_pool_size=1, postgres_max_pool_size=2) as db:
        start = await db.fetchval("SELECT date_trunc('second', now()) - make_interval(days => $1)", DAYS)
        loaded = await load(db, events, start, partitioned=False)
        t = time.perf_counter()
        await MigrationsUpTo(db, PARTITIONS_MIGRATION).migrate()
        partition_seconds = time.perf_counter() - t
        t = time.perf_counter()
        await MigrationRunner(db).migrate()
        rollup_seconds = time.perf_counter() - t
        n = int(await db.fetchval("SELECT count(*) FROM events"))
        assert n == events, f"{n} events after the conversion, {events} before"
        after = int(await db.fetchval(EVENTS_BYTES))
        rollup_bytes = int(await db.fetchval(ROLLUP_BYTES))
    print(f"  conversion of {events:,}: {partition_seconds:.1f} s + {rollup_seconds:.1f} s", flush=True)
    return Conversion(
        events, loaded.seconds, partition_seconds, rollup_seconds, loaded.bytes, after, rollup_bytes
    )


# ---------------------------------------------------------------------------------------------
# one size


@dataclass
class SizeResult:
    events: int
    load_part: Loaded
    load_unpart: Loaded
    maintain_seconds: float
    rolled_up: int
    maintain_runs: int
    behind: int
    rollup_rows: tuple[int, int]
    rollup_bytes: int
    partitions: int
    reads: Reads
    ingest: Ingest
    drop: Drop
    delete: Delete
    server_version: str


async def one_size(events: int, old_src: Path, fast_calls: int, slow_calls: int, cap: float) -> SizeResult:
    print(f"== {events:,} events", flush=True)
    pool = {"postgres_min_pool_size": 2, "postgres_max_pool_size": 4}
    async with (
        scratch_database("dash_pbench_part", **pool) as part,
        unpartitioned_database("dash_pbench_unpart", **pool) as unpart,
    ):
        version = await server_version(part)
        start = await part.fetchval("SELECT date_trunc('second', now()) - make_interval(days => $1)", DAYS)
        load_part = await load(part, events, start, partitioned=True)
        load_unpart = await load(unpart, events, start, partitioned=False)
        # An operator's cron: dash-db maintain (partitions ahead, rollups up to date). A refresh
        # stops below the oldest transaction running anywhere on the server (other sessions'
        # work can hold it back), so it is run again until nothing is left behind.
        maintain_seconds, rolled_up, runs = 0.0, 0, 0
        while True:
            t = time.perf_counter()
            report = await event_maintenance.maintain(part)
            maintain_seconds += time.perf_counter() - t
            rolled_up += report.rolled_up
            runs += 1
            behind = (await event_rollups.state(part)).behind
            if behind == 0 or runs >= MAINTAIN_RUNS:
                break
            await asyncio.sleep(5)
        print(
            f"  maintain: {rolled_up:,} events rolled up in {maintain_seconds:.0f} s ({runs} runs), "
            f"{behind:,} left behind",
            flush=True,
        )
        rollup_rows = tuple(await part.fetchrow(ROLLUP_ROWS))
        rollup_bytes = int(await part.fetchval(ROLLUP_BYTES))
        partitions = len(await event_partitions.list_partitions(part))
        read = await reads(part, unpart, fast_calls, slow_calls)
        swarm = await part.fetchval("SELECT id FROM swarms ORDER BY id LIMIT 1")
        written = await ingest(part, unpart, old_src, swarm)
        drop = await drop_month(part, dt.timedelta(days=1))
        delete = await delete_month(unpart, drop.cutoff, cap)
    return SizeResult(
        events=events,
        load_part=load_part,
        load_unpart=load_unpart,
        maintain_seconds=maintain_seconds,
        rolled_up=rolled_up,
        maintain_runs=runs,
        behind=behind,
        rollup_rows=(int(rollup_rows[0]), int(rollup_rows[1])),
        rollup_bytes=rollup_bytes,
        partitions=partitions,
        reads=read,
        ingest=written,
        drop=drop,
        delete=delete,
        server_version=version,
    )


# ---------------------------------------------------------------------------------------------
# the section


def _mb(n: int) -> str:
    return f"{n / 1024 / 1024:,.0f} MB"


def _ms(samples: list[float], q: float) -> str:
    return f"{Latency.pct(samples, q):.2f}"


def _read_rows(results: list[SizeResult]) -> list[str]:
    out = [
        "| events | query | calls per side | partitioned p50 / p99 ms | unpartitioned p50 / p99 ms | "
        "p50 unpartitioned / partitioned |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for s in results:
        for r in s.reads.results:
            ratio = statistics.median(r.raw) / statistics.median(r.ours)
            out.append(
                f"| {s.events:,} | {r.name} | {r.calls:,} | {_ms(r.ours, 0.5)} / {_ms(r.ours, 0.99)} | "
                f"{_ms(r.raw, 0.5)} / {_ms(r.raw, 0.99)} | {ratio:,.1f}x |"
            )
    return out


def _ingest_rows(results: list[SizeResult]) -> list[str]:
    names = {
        "writer": f"`EventWriter.create`, {worker.PRODUCERS} producers one at a time",
        "create_many": "`EventRepository.create_many(1000)`, one call at a time",
        "copy64": f"raw asyncpg `copy_records_to_table`, batches of {worker.PRODUCERS}, one connection",
        "copy1000": f"raw asyncpg `copy_records_to_table`, batches of {worker.BULK}, one connection",
    }
    out = [
        "| events in the table | way to write | partitioned events/s | unpartitioned events/s | "
        "partitioned / unpartitioned |",
        "|---:|---|---:|---:|---:|",
    ]
    for s in results:
        for key, label in names.items():
            p, u = s.ingest.rates[key]
            out.append(f"| {s.events:,} | {label} | {p:,.0f} | {u:,.0f} | {p / u:.2f}x |")
    return out


def _drop_rows(results: list[SizeResult]) -> list[str]:
    out = [
        "| events | way | events removed | time | `events` size before | after | after VACUUM |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for s in results:
        d, x = s.drop, s.delete
        out.append(
            f"| {s.events:,} | `event_partitions.prune` ({d.partitions} day partitions) | {d.events:,} | "
            f"{d.seconds:.2f} s | {_mb(d.bytes_before)} | {_mb(d.bytes_after)} | (nothing to vacuum) |"
        )
        if x.capped:
            time_text = (
                f"stopped after {x.seconds:.0f} s ({x.deleted:,} rows, {x.batches:,} batches); "
                f"all {x.to_delete:,}: ~{x.estimated_seconds / 60:.0f} min (extrapolated)"
            )
        else:
            time_text = f"{x.seconds:.1f} s ({x.batches:,} batches)"
        out.append(
            f"| {s.events:,} | old batched DELETE (10,000 rows a statement) | {x.deleted:,} | {time_text} | "
            f"{_mb(x.bytes_before)} | {_mb(x.bytes_after)} | {_mb(x.bytes_after_vacuum)} "
            f"(VACUUM {x.vacuum_seconds:.0f} s) |"
        )
    return out


async def run() -> str:
    sizes = _sizes()
    fast_calls = _env_int("DASH_BENCH_PARTITION_CALLS", 500)
    slow_calls = min(200, fast_calls)
    cap = float(_env_int("DASH_BENCH_PARTITION_DELETE_CAP", 300))
    convert_events = _env_int("DASH_BENCH_PARTITION_CONVERT_EVENTS", 1_000_000)
    ref = os.environ.get("DASH_BENCH_UNPARTITIONED_REF", "").strip() or BEFORE_PARTITIONING
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dash_pbench_") as tmp:
        old_src = library_tree(ref, Path(tmp))
        converted = await conversion(convert_events, "dash_pbench_convert") if convert_events else None
        results: list[SizeResult] = []
        for n in sizes:
            results.append(await one_size(n, old_src, fast_calls, slow_calls, cap))
            # Kept, so that the measurements survive a failure while writing the section.
            SAVED.write_bytes(pickle.dumps((results, converted)))
    version = results[0].server_version if results else "?"
    minutes = (time.perf_counter() - began) / 60
    return _section(results, converted, version, ref, minutes, cap)


def _section(
    results: list[SizeResult],
    converted: Conversion | None,
    version: str,
    ref: str,
    minutes: float,
    cap: float,
) -> str:
    big = results[-1]
    stats_part = big.reads.results[0]
    lines = [
        "## Partitioned event log versus unpartitioned",
        "",
        f"Measured {today()} on {machine()}, PostgreSQL {version}, uvloop; one run of "
        f"`python -m bench partitions`, {minutes:.0f} minutes in all; 15-minute load average at the end "
        f"{os.getloadavg()[2]:.1f} (this benchmark alone keeps it near 1; client and server share the "
        "cores, so other work on the machine shows in the figures). Figures are medians of interleaved "
        "rounds; single-run noise of 10-20% is normal on a shared machine.",
        "",
        "Two scratch databases per size: *partitioned* has every migration (`events` range-partitioned "
        'by "timestamp", one partition per UTC day, stats from the hourly and per-minute rollups); '
        f"*unpartitioned* has the migrations up to {LAST_UNPARTITIONED} only (the table before "
        f"partitioning). Both hold the same events: {DAYS} days in time order, {SWARMS} swarms of "
        f"{AGENTS_PER_SWARM} agents, {len(TYPE_MIX)} types in the skewed mix of the queries benchmark, "
        "mostly debug/info severities, ~100-byte JSON payloads, generated server-side (INSERT ... SELECT "
        "generate_series, the same random seeds on both), then VACUUM ANALYZE.",
        "",
        "| events | load partitioned / unpartitioned | `events` size partitioned / unpartitioned | "
        "partitions | `dash-db maintain` after the load (rollups from nothing) | rollup rows (counts / "
        "actor counts), size |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for s in results:
        lines.append(
            f"| {s.events:,} | {s.load_part.seconds:.0f} s / {s.load_unpart.seconds:.0f} s | "
            f"{_mb(s.load_part.bytes)} / {_mb(s.load_unpart.bytes)} | {s.partitions} | "
            f"{s.rolled_up:,} events in {s.maintain_seconds:.0f} s"
            + (f" ({s.maintain_runs} runs)" if s.maintain_runs > 1 else "")
            + (f", {s.behind:,} still behind" if s.behind else "")
            + f" | {s.rollup_rows[0]:,} / "
            f"{s.rollup_rows[1]:,}, {_mb(s.rollup_bytes)} |"
        )
    lines += [
        "",
        "### Reads",
        "",
        "Before the reads, the partitioned side's rollups were brought up to date once, as an "
        "operator's cron does (`event_maintenance.maintain`, what `dash-db maintain` runs; the table "
        "above shows how long catching up on the whole load took); no event was written during the "
        "reads. One client, sequential calls, warm cache (a warm-up pass first), the two sides' calls "
        "interleaved in 10 rounds; a random swarm or agent per call, the same sequence on both sides. "
        "Partitioned `get_stats(24)` is the library's (rollups plus the raw events they do not hold); "
        "unpartitioned it is the statement get_stats sent before the rollups (`SELECT GROUPING(type), "
        'GROUPING(severity), type, severity, count(*) FROM events WHERE "timestamp" >= now() - '
        "make_interval(secs => $1) GROUP BY GROUPING SETS ((type), (severity), ())`), sent the same "
        "way. `event_stats_24h` is the view on each side (before: that scan with distinct counts). "
        "The find_by_* calls are the current repository on both (the same SQL).",
        "",
        *_read_rows(results),
        "",
        "Both sides counted the same window: "
        + "; ".join(
            f"{s.events:,} events: {s.reads.totals[0]:,} partitioned, {s.reads.totals[1]:,} unpartitioned"
            for s in results
        )
        + " in the last 24 h (the window moves between the two calls).",
        "",
        f"At {big.events:,} events partitioned `get_stats(24)` answered in {_ms(stats_part.ours, 0.99)} ms "
        f"at p99 (aim: under 20 ms)"
        + (
            f", against {_ms(results[0].reads.results[0].ours, 0.99)} ms at {results[0].events:,}"
            if len(results) > 1
            else ""
        )
        + ".",
        "",
        "### Ingest",
        "",
        "Into the loaded tables (after the reads), each side written by its own library: partitioned by "
        "the current one, unpartitioned by the library of git commit "
        f"`{ref[:12]}` (the last before partitioning; the current library cannot write to the old table, "
        'its statements name the key (id, "timestamp")). Each library measurement runs in a process '
        "of its own (bench/partitions_worker.py: a warm-up of a tenth, then "
        f"{INGEST_EVENTS:,} events timed); raw asyncpg COPY (every column but the timestamp, which "
        f"defaults to now()) runs in the bench's process. Median of {INGEST_ROUNDS} rounds, the sides "
        "alternating which goes first; every commit durable. "
        f"{big.ingest.rows_added:,} events were added to each side at {big.events:,}.",
        "",
        *_ingest_rows(results),
        "",
        "### Dropping a month",
        "",
        "Partitioned: `event_partitions.prune(db, timedelta(days=1))`, what `dash-db prune "
        "--older-than 1d` runs: every day partition wholly older than a day is counted, marked, "
        "detached CONCURRENTLY and dropped with its rollups. Unpartitioned: the same rows (timestamp "
        "before the upper bound of the last partition dropped) with the loop the library ran before, "
        '`DELETE FROM events WHERE id = ANY(ARRAY(SELECT id FROM events WHERE "timestamp" < $1 ORDER '
        'BY "timestamp", id LIMIT 10000))` until a batch deletes fewer, each batch its own statement'
        + (
            f"; stopped after {cap:.0f} s where it had not finished, and its total extrapolated "
            "linearly from the rows it deleted in that time"
            if any(s.delete.capped for s in results)
            else ""
        )
        + ". Size: `pg_total_relation_size` summed over `pg_partition_tree('events')` (table, "
        "indexes, TOAST). A DELETE leaves its dead rows in the files: a plain VACUUM afterwards makes "
        "the space reusable but does not give it back; dropping a partition removes its files. The "
        "size before includes the events the ingest measurement added (above), the same on both sides.",
        "",
        *_drop_rows(results),
        "",
    ]
    if converted is not None:
        c = converted
        lines += [
            "### The conversion itself",
            "",
            f"An unpartitioned database holding {c.events:,} events (the same generator, "
            f"{_mb(c.bytes_before)}), then the two migrations as `dash-db migrate` applies them: "
            f"{PARTITIONS_MIGRATION}_event_partitions (copy into day partitions, count and checksum "
            f"check, keys and indexes built per partition) took {c.partition_seconds:.1f} s, the "
            f"rollups migration (rolling up every event) {c.rollup_seconds:.1f} s: "
            f"{c.partition_seconds + c.rollup_seconds:.1f} s in all, during which writers wait. "
            f"Afterwards `events` is {_mb(c.bytes_after)}, the rollups {_mb(c.rollup_bytes)}.",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    from dash_storage.cli.common import run as run_loop

    print(run_loop(run()))


if __name__ == "__main__":
    main()

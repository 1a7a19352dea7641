"""Queries at scale: the hot reads on a big event log, against raw asyncpg.

    python -m bench queries                                   # full size: 10,000,000 events
    python -m bench.queries --events 200000 --swarms 100      # a quick run while developing

Loads ``events`` rows over ``swarms`` swarms (10 agents each) into a scratch database, server-side
(``INSERT ... SELECT ... FROM generate_series`` in chunks), then VACUUM ANALYZE, and measures
per-call latency (p50/p99, one client, warm cache) of:

- ``EventRepository.find_by_filter(swarm_id, types=[2 types], since=now-24h, limit=100)``, once
  with two common types and once with two rare ones (fewer than 100 matches per swarm and day, so
  the query must walk the swarm's whole day);
- ``EventRepository.find_by_agent_id(agent, limit=100)``;
- ``EventRepository.get_stats(24)`` (every event of the last day, all swarms).

Each runs next to raw asyncpg sending the same SQL with the same arguments (a random swarm or agent
per call, the same sequence for both sides). The data imitate a week of a busy platform: events
in time order (an append-only log), about 20 types with a skewed mix, 90% of events from an agent,
severities mostly debug/info, JSON payloads of about 100 bytes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from bench.common import machine, raw_pool, scratch_database, server_version, today
from dash_storage.core.database import Database
from dash_storage.repositories import event_filters, event_partitions, event_rollups
from dash_storage.repositories.events import EventRepository

DEFAULT_EVENTS = 10_000_000
DEFAULT_SWARMS = 1_000
AGENTS_PER_SWARM = 10
DAYS = 7
#: Rows per INSERT ... SELECT statement of the load.
CHUNK = 500_000
#: Event types and their share of the log in percent (they add up to 100).
TYPE_MIX = {
    "llm.call": 18,
    "llm.response": 18,
    "tool.call": 12,
    "tool.result": 12,
    "agent.step": 11,
    "agent.heartbeat": 8,
    "budget.consumed": 6,
    "task.progress": 4,
    "agent.spawned": 2,
    "agent.started": 2,
    "agent.completed": 2,
    "task.created": 1,
    "task.assigned": 1,
    "task.completed": 1,
    "agent.paused": 0.5,
    "agent.resumed": 0.5,
    "llm.error": 0.5,
    "tool.error": 0.5,
    "agent.failed": 0.25,
    "budget.exceeded": 0.25,
}
COMMON_TYPES = ["llm.call", "tool.call"]  # 30% of the log
RARE_TYPES = ["agent.completed", "agent.failed"]  # 2.25% of the log

# Swarm and agent ids are derived from their numbers, so the event load needs no lookups.
INSERT_SWARMS = """
INSERT INTO swarms (id, name, status, config, created_at)
SELECT md5('dash-bench-swarm-' || s)::uuid, 'swarm-' || s, 'active', '{"max_agents": 10}',
       $2::timestamptz
FROM generate_series(0, $1::int - 1) AS s
"""
INSERT_AGENTS = """
INSERT INTO agents (id, swarm_id, label, status, lifecycle_state, model, task, spawned_at)
SELECT md5('dash-bench-agent-' || s || '-' || a)::uuid, md5('dash-bench-swarm-' || s)::uuid,
       'agent-' || a, 'running', 'running', 'kimi-k2.5', 'bench task', $3::timestamptz
FROM generate_series(0, $1::int - 1) AS s, generate_series(0, $2::int - 1) AS a
"""
# Events $1..$2 of $3, spread evenly over [$6, $6 + $7 seconds) in id order (an append-only log
# is written in time order); a random swarm of $4 and agent of $5 each; type drawn from the slot
# array $8 (each type repeated by its weight). Ids are UUIDv7-like (time prefix), as new_id() makes.
INSERT_EVENTS = """
INSERT INTO events (id, swarm_id, agent_id, type, payload, "timestamp", correlation_id,
                    entity_type, severity)
SELECT (lpad(to_hex((extract(epoch FROM x.ts) * 1000)::bigint), 12, '0') || '7'
        || substr(md5(x.g::text), 1, 19))::uuid,
       md5('dash-bench-swarm-' || x.s)::uuid,
       CASE WHEN x.r_agent < 0.9 THEN md5('dash-bench-agent-' || x.s || '-' || x.a)::uuid END,
       ($8::text[])[1 + floor(x.r_type * cardinality($8::text[]))::int],
       jsonb_build_object('model', 'kimi-k2.5', 'tokens', floor(x.r_sev * 4000)::int,
                          'step', x.g % 1000, 'latency_ms', floor(x.r_type * 900)::int,
                          'note', substr(md5(x.g::text), 1, 20)),
       x.ts,
       'run-' || (x.g / 16),
       CASE WHEN x.r_agent >= 0.9 THEN 'system' WHEN x.r_agent < 0.2 THEN 'task' ELSE 'agent' END,
       CASE WHEN x.r_sev < 0.30 THEN 'debug' WHEN x.r_sev < 0.85 THEN 'info'
            WHEN x.r_sev < 0.95 THEN 'warning' WHEN x.r_sev < 0.995 THEN 'error'
            ELSE 'critical' END
FROM (
    SELECT g, $6::timestamptz + make_interval(secs => (g - 1) * $7::float8 / $3::bigint) AS ts,
           floor(random() * $4::int)::int AS s, floor(random() * $5::int)::int AS a,
           random() AS r_agent, random() AS r_type, random() AS r_sev
    FROM generate_series($1::bigint, $2::bigint) AS g
) AS x
"""
SIZES = """
SELECT pg_size_pretty(pg_table_size('events')), pg_size_pretty(pg_indexes_size('events')),
       current_setting('shared_buffers'), current_setting('jit')
"""


def type_slots() -> list[str]:
    """The type mix as an array of slots (a type repeated 4 times per percent)."""
    return [name for name, pct in TYPE_MIX.items() for _ in range(round(pct * 4))]


@dataclass
class Load:
    events: int
    swarms: int
    agents: int
    seconds: float
    vacuum_seconds: float
    table_size: str
    index_size: str
    shared_buffers: str
    jit: str


async def load(db: Database, events: int, swarms: int, agents_per_swarm: int = AGENTS_PER_SWARM) -> Load:
    """Fill the (empty, migrated) database: swarms, agents, then events in chunks; VACUUM ANALYZE."""
    started = time.perf_counter()
    now = await db.fetchval("SELECT now()")
    start = now - dt.timedelta(days=DAYS)
    span = DAYS * 86_400.0
    slots = type_slots()
    await db.execute(INSERT_SWARMS, swarms, start - dt.timedelta(days=1))
    await db.execute(INSERT_AGENTS, swarms, agents_per_swarm, start - dt.timedelta(hours=12))
    # events is partitioned by time: the partitions of the days loaded (the library makes them
    # itself before its own writes; these rows are generated by SQL).
    await event_partitions.cover(db, [start + dt.timedelta(hours=h) for h in range(0, DAYS * 24 + 1)])
    for lo in range(1, events + 1, CHUNK):
        hi = min(lo + CHUNK - 1, events)
        await db.execute(INSERT_EVENTS, lo, hi, events, swarms, agents_per_swarm, start, span, slots)
        print(f"  loaded {hi:,} / {events:,} events ({time.perf_counter() - started:.0f} s)", flush=True)
    loaded = time.perf_counter() - started
    async with db.acquire() as con:
        await con.execute("VACUUM ANALYZE")
    vacuumed = time.perf_counter() - started - loaded
    row = await db.fetchrow(SIZES)
    assert row is not None
    return Load(events, swarms, swarms * agents_per_swarm, loaded, vacuumed, *row)


@dataclass
class Latency:
    name: str
    calls: int
    ours: list[float]  # seconds per call
    raw: list[float]

    @staticmethod
    def pct(samples: list[float], q: float) -> float:
        ordered = sorted(samples)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000.0

    def row(self) -> str:
        o50, o99 = self.pct(self.ours, 0.50), self.pct(self.ours, 0.99)
        r50, r99 = self.pct(self.raw, 0.50), self.pct(self.raw, 0.99)
        ops_ours = len(self.ours) / sum(self.ours)
        ops_raw = len(self.raw) / sum(self.raw)
        ratio = statistics.median(self.ours) / statistics.median(self.raw)
        return (
            f"| {self.name} | {self.calls:,} | {o50:.2f} / {o99:.2f} | {r50:.2f} / {r99:.2f} | "
            f"{ops_ours:,.0f} | {ops_raw:,.0f} | {ratio:.2f}x |"
        )


async def measure(
    name: str,
    ours: Callable[[int], Awaitable[object]],
    raw: Callable[[int], Awaitable[object]],
    calls: int,
    rounds: int = 4,
) -> Latency:
    """Time ``calls`` sequential calls of each side, in interleaved rounds, after a warm-up pass."""
    for i in range(max(calls // 10, 2)):  # warm-up: connections, statement caches, buffer cache
        await ours(i)
        await raw(i)
    result = Latency(name, calls, [], [])
    per_round = max(calls // rounds, 1)
    i = 0
    while i < calls:
        for side, op in ((result.ours, ours), (result.raw, raw)):
            for j in range(i, min(i + per_round, calls)):
                t = time.perf_counter()
                await op(j)
                side.append(time.perf_counter() - t)
        i += per_round
    print(f"  {result.row()}", flush=True)
    return result


def literal(value: Any) -> str:
    """A SQL literal for an EXECUTE argument (untyped, so the prepared parameter's type applies)."""
    if value is None:
        return "NULL"
    if isinstance(value, list | tuple):
        return "ARRAY[" + ", ".join(literal(v) for v in value) + "]"
    text = value.isoformat() if isinstance(value, dt.datetime) else str(value)
    return "'" + text.replace("'", "''") + "'"


async def prepared_plans(
    con: Any, sql: str, args: tuple[Any, ...], executions: int = 10, *, analyze: bool = False
) -> tuple[list[dict[str, Any]], int, int]:
    """EXPLAIN (FORMAT JSON) of ``sql`` as a prepared statement, ``executions`` times with ``args``.

    EXPLAIN EXECUTE goes through the same plan cache as asyncpg's prepared statements: the first
    five executions get custom plans (planned for the values), later ones may get the value-blind
    generic plan. The last plan is the one a long-lived pooled connection ends up using. Returns
    the plans, and how many were generic and custom. Only ``analyze=True`` runs the statement.
    """
    options = "ANALYZE, BUFFERS, FORMAT JSON" if analyze else "FORMAT JSON"
    call = f"EXPLAIN ({options}) EXECUTE dash_plan"
    if args:
        call += "(" + ", ".join(literal(a) for a in args) + ")"
    await con.execute(f"PREPARE dash_plan AS {sql}")
    try:
        plans = []
        for _ in range(executions):
            got = await con.fetchval(call)
            plans.append((orjson.loads(got) if isinstance(got, str) else got)[0])
        counts = await con.fetchrow(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE name = 'dash_plan'"
        )
    finally:
        await con.execute("DEALLOCATE dash_plan")
    return plans, counts[0], counts[1]


def plan_summary(plan: dict[str, Any]) -> str:
    """One line from EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON): the node tree, rows, buffers, time."""

    def nodes(node: dict[str, Any]) -> str:
        label = str(node["Node Type"])
        if "Index Name" in node:
            label += f" using {node['Index Name']}"
        elif "Relation Name" in node:
            label += f" on {node['Relation Name']}"
        children = node.get("Plans", [])
        if not children:
            return label
        return label + " > " + (" + ".join(nodes(c) for c in children))

    top = plan["Plan"]
    jit = plan.get("JIT")
    jit_ms = f", JIT {jit['Timing']['Total']:.0f} ms" if jit else ""
    return (
        f"{nodes(top)}; {top['Actual Rows']} rows, {top.get('Shared Hit Blocks', 0)} buffers hit / "
        f"{top.get('Shared Read Blocks', 0)} read, {plan['Execution Time']:.2f} ms{jit_ms}"
    )


async def explain(pool: asyncpg.Pool, sql: str, args: tuple[Any, ...], executions: int) -> str:
    """The plan a pooled connection settles on for ``sql`` (see ``prepared_plans``), analysed."""
    async with pool.acquire() as con:
        plans, generic, _ = await prepared_plans(con, sql, args, executions, analyze=True)
    # Once the plan cache picks the generic plan it keeps it, so the last plan is generic if any is.
    kind = "generic" if generic else "custom"
    return f"{plan_summary(plans[-1])} ({kind} plan at execution {executions})"


async def run(
    events: int = DEFAULT_EVENTS,
    swarms: int = DEFAULT_SWARMS,
    calls: int = 2000,
    stats_calls: int = 10,
    database: str = "dash_bench_queries",
) -> str:
    async with scratch_database(database, postgres_min_pool_size=2, postgres_max_pool_size=4) as db:
        version = await server_version(db)
        print(f"  loading {events:,} events over {swarms:,} swarms", flush=True)
        loaded = await load(db, events, swarms)
        repo = EventRepository(db)
        pool = await raw_pool(db, min_size=2, max_size=4)
        rng = random.Random(6)
        swarm_ids = [r[0] for r in await db.fetch("SELECT id FROM swarms ORDER BY id")]
        agent_ids = [r[0] for r in await db.fetch("SELECT id FROM agents ORDER BY id")]
        pick_swarm = [rng.choice(swarm_ids) for _ in range(calls)]
        pick_agent = [rng.choice(agent_ids) for _ in range(calls)]
        since = await db.fetchval("SELECT now() - interval '24 hours'")
        # The repositories' own SQL (tests/integration/test_query_plans.py checks it is what they send).
        filter_sql = event_filters.select_sql(("swarm_id", "types", "since"), "ASC", after=False)
        no_since_sql = event_filters.select_sql(("swarm_id", "types"), "ASC", after=False)
        agent_sql = event_filters.select_sql(("agent_id",), "DESC", after=False)
        stats_args = (24 * 3600.0,)

        Case = tuple[str, Any, Any, int, str, tuple[Any, ...]]

        def by_types(kind: str, types: list[str]) -> Case:
            return (
                f"find_by_filter (swarm, 2 {kind} types {'/'.join(types)}, since 24h, limit 100)",
                lambda i: repo.find_by_filter(swarm_id=pick_swarm[i], types=types, since=since, limit=100),
                lambda i: pool.fetch(filter_sql, 100, pick_swarm[i], types, since),
                calls,
                filter_sql,
                (100, pick_swarm[0], types, since),
            )

        cases: list[Case] = [
            by_types("common", COMMON_TYPES),
            by_types("rare", RARE_TYPES),
            (
                "find_by_filter (swarm, 2 rare types, NO since, limit 100): the swarm's whole log",
                lambda i: repo.find_by_filter(swarm_id=pick_swarm[i], types=RARE_TYPES, limit=100),
                lambda i: pool.fetch(no_since_sql, 100, pick_swarm[i], RARE_TYPES),
                calls // 4,
                no_since_sql,
                (100, pick_swarm[0], RARE_TYPES),
            ),
            (
                "find_by_agent_id (limit 100, newest first)",
                lambda i: repo.find_by_agent_id(pick_agent[i], limit=100),
                lambda i: pool.fetch(agent_sql, 100, pick_agent[i]),
                calls,
                agent_sql,
                (100, pick_agent[0]),
            ),
            (
                "get_stats(24) (all swarms)",
                lambda i: repo.get_stats(24),
                lambda i: pool.fetch(event_rollups.SELECT_EVENT_COUNTS, *stats_args),
                stats_calls,
                event_rollups.SELECT_EVENT_COUNTS,
                stats_args,
            ),
        ]
        results: list[Latency] = []
        plans: list[str] = []
        for name, ours, raw, n, sql, args in cases:
            results.append(await measure(name, ours, raw, n))
            executions = 10 if n > 100 else 6
            plans.append(f"- {name}: {await explain(pool, sql, args, executions)}")
        await pool.close()
    return "\n".join(
        [
            "## Queries at scale",
            "",
            f"Measured {today()} on {machine()}, PostgreSQL {version}, uvloop. Command: `make bench`.",
            "",
            f"Data: {loaded.events:,} events over {loaded.swarms:,} swarms and {loaded.agents:,} agents, "
            f"{DAYS} days in time order, {len(TYPE_MIX)} event types (skewed mix), ~100-byte JSON "
            f"payloads; loaded server-side in {loaded.seconds:.0f} s (INSERT ... SELECT generate_series, "
            f"chunks of {CHUNK:,}), then VACUUM ANALYZE in {loaded.vacuum_seconds:.0f} s. Table "
            f"{loaded.table_size}, indexes {loaded.index_size}; shared_buffers {loaded.shared_buffers} "
            f"(the rest stays in the OS page cache), jit={loaded.jit}.",
            "",
            "Warm cache: each query first runs a warm-up pass. One client, sequential calls, a random "
            "swarm or agent per call (the same sequence for both sides), rounds of the library and raw "
            "asyncpg interleaved. Latency in ms; ops/s = calls / summed latency; the ratio is the "
            "library's median latency over raw asyncpg's (same SQL, same arguments).",
            "",
            "| query | calls | dash-storage p50 / p99 ms | raw asyncpg p50 / p99 ms | dash-storage ops/s |"
            " raw ops/s | ratio |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *(r.row() for r in results),
            "",
            "Plans: the plan a pooled connection settles on (EXPLAIN ANALYZE EXECUTE of the prepared",
            "statement, repeated past the five custom plans after which the server may go generic):",
            "",
            *plans,
            "",
        ]
    )


def main() -> None:
    from dash_storage.cli.common import run as run_loop

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=DEFAULT_EVENTS)
    parser.add_argument("--swarms", type=int, default=DEFAULT_SWARMS)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--stats-calls", type=int, default=10)
    parser.add_argument("--database", default="dash_bench_queries")
    a = parser.parse_args()
    print(run_loop(run(a.events, a.swarms, a.calls, a.stats_calls, a.database)))


if __name__ == "__main__":
    main()

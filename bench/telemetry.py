"""What telemetry costs: single-row workloads with telemetry off, spans only, on, and raw asyncpg, in the
same run.

"Off" is a plain Database (what every Database is unless given ``telemetry=`` or DASH_OTEL=1). "On" is
a second Database on the same database with ``Telemetry`` over the real OpenTelemetry SDK: spans go
through a ``BatchSpanProcessor`` to an exporter that drops them (so the figure is the cost of making,
recording and queueing spans and metrics, not of a network), metrics into an ``InMemoryMetricReader``
(recorded on every call, read by nobody). "Spans only" is "on" with the no-op meter provider, to tell
the spans' share from the metrics'. Raw asyncpg runs the same SQL on a pool that does not reset
connections on release. Rounds of the four sides are interleaved, rotating who goes first, and each
side's median is kept; client CPU is ``time.process_time()`` over a round (the SDK's export thread
included) divided by the operations.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal

from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from bench.common import machine, run_ops, scratch_database, server_version, today
from bench.repositories import plain_pool
from dash_storage import AgentRepository, BudgetRepository, Database, SwarmRepository, Telemetry
from dash_storage.core.ids import new_id
from dash_storage.repositories import agent_transitions as transition_sql
from dash_storage.repositories import agents as agent_sql
from dash_storage.repositories import budgets as budget_sql
from dash_storage.repositories import swarms as swarm_sql

Op = Callable[[int], Awaitable[object]]
SIDES = ("off", "spans", "on", "raw")


class Discard(SpanExporter):
    """An exporter that drops every span: the cost measured stops at the exporter."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


async def _side(op: Op, total: int, concurrency: int) -> tuple[float, float]:
    cpu = time.process_time()
    rate = await run_ops(op, total, concurrency)
    return rate, (time.process_time() - cpu) / total * 1e6


async def _compare(
    ops: dict[str, Op], total: int, concurrency: int, rounds: int
) -> dict[str, tuple[float, float]]:
    """Median (ops/s, CPU µs per op) of each side over interleaved rounds."""
    for op in ops.values():
        await run_ops(op, max(total // 10, 10), concurrency)  # warm-up: connections, statement caches
    got: dict[str, list[tuple[float, float]]] = {name: [] for name in ops}
    names = list(ops)
    for n in range(rounds):
        for name in names[n % len(names) :] + names[: n % len(names)]:
            got[name].append(await _side(ops[name], total, concurrency))
    med = statistics.median
    return {name: (med(r for r, _ in v), med(c for _, c in v)) for name, v in got.items()}


async def run(total: int = 1000, pool_size: int = 8, rounds: int = 7) -> str:
    async with scratch_database(
        "dash_bench_otel", postgres_min_pool_size=pool_size, postgres_max_pool_size=pool_size
    ) as off:
        version = await server_version(off)
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(BatchSpanProcessor(Discard()))
        meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
        on = Database(off.settings, telemetry=Telemetry(tracer_provider, meter_provider))
        await on.initialize()
        spans = Database(off.settings, telemetry=Telemetry(tracer_provider, NoOpMeterProvider()))
        await spans.initialize()
        pool = await plain_pool(off, pool_size)
        swarm = await SwarmRepository(off).create(name="bench")
        budget = await BudgetRepository(off).create("swarm", swarm.id, allocated=Decimal("1e12"))
        final = sorted(transition_sql.FINAL_AGENT_STATUSES)
        repos = {
            db_name: (SwarmRepository(db), AgentRepository(db), BudgetRepository(db, combine=False))
            for db_name, db in (("off", off), ("spans", spans), ("on", on))
        }

        def swarm_read(side: str) -> Op:
            if side == "raw":
                return lambda i: pool.fetchrow(swarm_sql.SELECT_SWARM_BY_ID, swarm.id)
            swarms = repos[side][0]
            return lambda i: swarms.find_by_id(swarm.id)

        def swarm_write(side: str) -> Op:
            if side == "raw":

                async def raw(i: int) -> object:
                    return await pool.fetchrow(swarm_sql.INSERT_SWARM, new_id(), "s", {"i": i}, "creating")

                return raw
            swarms = repos[side][0]
            return lambda i: swarms.create(name="s", config={"i": i})

        def agent_lifecycle(side: str) -> Op:
            if side == "raw":

                async def raw(i: int) -> object:
                    row = await pool.fetchrow(
                        agent_sql.INSERT_AGENT,
                        new_id(), swarm.id, None, "pending", "initializing", "m", "t", {}, None, None,
                        None, None, 3, None, {}, final,
                    )  # fmt: skip
                    assert row is not None
                    step = transition_sql.TRANSITION
                    await pool.fetchrow(step, row[0], *transition_sql.status_args("running"))
                    await pool.fetchrow(step, row[0], *transition_sql.pause_args("bench"))
                    return await pool.fetchrow(step, row[0], *transition_sql.RESUME_ARGS)

                return raw
            agents = repos[side][1]

            async def ours(i: int) -> object:
                a = await agents.create(swarm.id, model="m", task="t")
                await agents.update_status(a.id, "running")
                await agents.pause(a.id, "bench")
                return await agents.resume(a.id)

            return ours

        def consume(side: str) -> Op:
            if side == "raw":
                return lambda i: pool.fetchrow(
                    budget_sql.CONSUME, budget.id, 10, Decimal("0.0001"), str(new_id()), new_id()
                )
            budgets = repos[side][2]
            return lambda i: budgets.try_consume(budget.id, 10, Decimal("0.0001"))

        # (name, repository calls per operation, the operation of each side, operations per round)
        cases = [
            ("swarms.find_by_id", 1, swarm_read, total),
            ("swarms.create", 1, swarm_write, total),
            ("budgets.try_consume (combine=False)", 1, consume, total),
            ("agents: create, running, pause, resume", 4, agent_lifecycle, total // 2),
        ]
        rows = [
            "| workload | concurrency | off ops/s | on ops/s | raw ops/s | on vs off | off vs raw "
            "| CPU µs/op off | spans only | on | raw | CPU added per call: spans only, on |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, calls, make, n in cases:
            for concurrency in (1, pool_size):
                r = await _compare({side: make(side) for side in SIDES}, n, concurrency, rounds)
                (off_rate, off_cpu), (on_rate, on_cpu), (raw_rate, raw_cpu) = r["off"], r["on"], r["raw"]
                spans_cpu = r["spans"][1]
                line = (
                    f"| {name} | {concurrency} | {off_rate:,.0f} | {on_rate:,.0f} | {raw_rate:,.0f} "
                    f"| {on_rate / off_rate:.2f}x | {off_rate / raw_rate:.2f}x | {off_cpu:.0f} "
                    f"| {spans_cpu:.0f} | {on_cpu:.0f} | {raw_cpu:.0f} "
                    f"| {(spans_cpu - off_cpu) / calls:+.0f} µs, {(on_cpu - off_cpu) / calls:+.0f} µs |"
                )
                print(line, flush=True)
                rows.append(line)
        await pool.close()
        await on.close()
        await spans.close()
        tracer_provider.shutdown()
        meter_provider.shutdown()
    return "\n".join(
        [
            "## Telemetry: off, on (OpenTelemetry SDK) and raw asyncpg",
            "",
            f"Measured {today()} on {machine()}, PostgreSQL {version}, uvloop. Command: "
            "`python -m bench telemetry`.",
            f"Median of {rounds} interleaved rounds (the four sides rotate who goes first). *Off*: a "
            "plain Database, as every Database is without `telemetry=` or DASH_OTEL=1 (its repositories "
            "are the plain classes: no per-call check at all). *On*: `Telemetry` over the OpenTelemetry "
            "SDK, one CLIENT span per repository call through a `BatchSpanProcessor` to an exporter that "
            "drops it, and `db.client.operation.duration` recorded per call; a real exporter's encoding "
            "and network come on top, in its own thread. *Spans only*: the same with OpenTelemetry's "
            "no-op meter provider (no metric recorded). *Raw*: asyncpg running the same SQL on a pool "
            "without reset on release. *On vs off* and *off vs raw*: throughput ratios (higher is better). "
            "CPU is the client's process time per operation (all threads); *CPU added per call* is "
            "(on - off) divided by the repository calls in one operation.",
            "",
            "\n".join(rows),
            "",
        ]
    )

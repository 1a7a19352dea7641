"""The PostgreSQL side of the import: the statements, the reference look-ups and the batch writers.

Every insert is ``ON CONFLICT DO NOTHING``, so a second run writes nothing and a retried batch is
safe. Swarms (with their budgets) and agents go in as one ``INSERT ... SELECT FROM unnest(...)``
per batch. Events are COPYed (binary) into a session TEMP table and moved with one
``INSERT INTO events SELECT ... ON CONFLICT (id) DO NOTHING``, one transaction per batch, by
writers on their own connections (:func:`write_event_batches`). A connection that made the staging
table is closed when its writer stops, never handed back to the pool: pooled connections carry no
session state (the pool does not reset them). Behind a transaction-mode pooler a session's TEMP table
would stay on a server connection the next transaction may not get, so there each batch's
transaction makes its own (``ON COMMIT DROP``). In a dry run the writers only count, with the
``COUNT_*`` statements, how many rows would be new.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable, Sequence
from typing import Final

from dash_storage.core.connections import discard, transaction_on
from dash_storage.core.database import Connection, Database
from dash_storage.legacy.mapping import AgentRef, SwarmRef, legacy_uuid
from dash_storage.legacy.report import Batch

__all__ = [
    "CHECK_SCHEMA_SQL",
    "COUNT_AGENTS_SQL",
    "COUNT_BUDGETS_SQL",
    "COUNT_EVENTS_SQL",
    "COUNT_SWARMS_SQL",
    "CREATE_EVENTS_STAGE_IN_TX_SQL",
    "CREATE_EVENTS_STAGE_SQL",
    "ENSURE_PARTITIONS_FOR_STAGE_SQL",
    "FIND_AGENTS_SQL",
    "FIND_SWARMS_SQL",
    "INSERT_AGENTS_SQL",
    "INSERT_BUDGETS_SQL",
    "INSERT_EVENTS_FROM_STAGE_SQL",
    "INSERT_SWARMS_SQL",
    "find_agents",
    "find_swarms",
    "schema_present",
    "write_agents",
    "write_event_batches",
    "write_events",
    "write_swarms",
]

LOOKUP_CHUNK: Final = 10_000  # ids per reference look-up in PostgreSQL

# Are the target tables there (the schema is migrated)?
CHECK_SCHEMA_SQL: Final = """
SELECT to_regclass('public.swarms') IS NOT NULL AND to_regclass('public.agents') IS NOT NULL
   AND to_regclass('public.events') IS NOT NULL AND to_regclass('public.budgets') IS NOT NULL
"""
# Which of these swarm ids exist (reference checks for swarms not in the legacy file).
FIND_SWARMS_SQL: Final = "SELECT id FROM swarms WHERE id = ANY($1::uuid[])"
# Which of these agent ids exist, with their swarm (reference checks for agents not in the file).
FIND_AGENTS_SQL: Final = "SELECT id, swarm_id FROM agents WHERE id = ANY($1::uuid[])"
# Dry run: how many of these (distinct) swarm ids exist.
COUNT_SWARMS_SQL: Final = "SELECT count(*) FROM swarms WHERE id = ANY($1::uuid[])"
# Dry run: how many of these (distinct) agent ids exist.
COUNT_AGENTS_SQL: Final = "SELECT count(*) FROM agents WHERE id = ANY($1::uuid[])"
# Dry run: how many of these (distinct) event ids exist.
COUNT_EVENTS_SQL: Final = "SELECT count(*) FROM events WHERE id = ANY($1::uuid[])"
# Dry run: how many of these budgets would conflict (same id, or the swarm already has its budget).
COUNT_BUDGETS_SQL: Final = """
SELECT count(*) FROM unnest($1::uuid[], $2::uuid[]) AS t(id, swarm_id)
WHERE EXISTS (SELECT 1 FROM budgets b WHERE b.id = t.id)
   OR EXISTS (SELECT 1 FROM budgets b WHERE b.scope_type = 'swarm' AND b.scope_id = t.swarm_id)
"""
# Insert a batch of swarms; existing ids are left alone.
INSERT_SWARMS_SQL: Final = """
INSERT INTO swarms (id, name, config, status, created_at, completed_at)
SELECT t.id, t.name, t.config::jsonb, t.status, COALESCE(t.created_at, now()), t.completed_at
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::timestamptz[])
    AS t(id, name, config, status, created_at, completed_at)
ON CONFLICT (id) DO NOTHING
"""
# Insert a batch of swarm-scope budgets; a budget whose id or scope already exists is left alone.
INSERT_BUDGETS_SQL: Final = """
INSERT INTO budgets (id, swarm_id, scope_type, scope_id, allocated, consumed)
SELECT t.id, t.swarm_id, 'swarm', t.swarm_id, t.allocated, t.consumed
FROM unnest($1::uuid[], $2::uuid[], $3::numeric[], $4::numeric[]) AS t(id, swarm_id, allocated, consumed)
ON CONFLICT DO NOTHING
"""
# Insert a batch of agents; existing ids are left alone.
INSERT_AGENTS_SQL: Final = """
INSERT INTO agents (id, swarm_id, label, status, lifecycle_state, model, task, config, context, code,
                    reasoning, safety_boundaries, spawned_at, completed_at, pause_time, paused_by,
                    runtime, retry_count, max_retries, last_error, budget_limit, metadata)
SELECT t.id, t.swarm_id, t.label, t.status, t.lifecycle_state, t.model, t.task, '{}'::jsonb,
       t.context::jsonb, t.code::jsonb, t.reasoning::jsonb, t.safety_boundaries::jsonb,
       COALESCE(t.spawned_at, now()), t.completed_at, t.pause_time, t.paused_by, t.runtime,
       t.retry_count, t.max_retries, t.last_error, t.budget_limit, t.metadata::jsonb
FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
            $8::text[], $9::text[], $10::text[], $11::text[], $12::timestamptz[],
            $13::timestamptz[], $14::timestamptz[], $15::text[], $16::bigint[], $17::int[],
            $18::int[], $19::text[], $20::numeric[], $21::text[])
    AS t(id, swarm_id, label, status, lifecycle_state, model, task, context, code, reasoning,
         safety_boundaries, spawned_at, completed_at, pause_time, paused_by, runtime, retry_count,
         max_retries, last_error, budget_limit, metadata)
ON CONFLICT (id) DO NOTHING
"""
# The staging table of one writer's connection; ON COMMIT DELETE ROWS empties it after every batch.
CREATE_EVENTS_STAGE_SQL: Final = """
CREATE TEMP TABLE IF NOT EXISTS dash_import_events (
    id uuid, swarm_id uuid, agent_id uuid, type text, payload text, "timestamp" timestamptz,
    entity_type text, severity text
) ON COMMIT DELETE ROWS
"""
# The same, made inside one batch's transaction and dropped at its end (behind a transaction-mode
# pooler, where the next transaction may run on another server connection).
CREATE_EVENTS_STAGE_IN_TX_SQL: Final = """
CREATE TEMP TABLE IF NOT EXISTS dash_import_events (
    id uuid, swarm_id uuid, agent_id uuid, type text, payload text, "timestamp" timestamptz,
    entity_type text, severity text
) ON COMMIT DROP
"""
# The partitions of events that one staged batch needs, created if missing ($1: the width of a new
# one): events of any age are imported, and events has no default partition.
ENSURE_PARTITIONS_FOR_STAGE_SQL: Final = """
SELECT dash_event_partitions_ensure(
    ARRAY(SELECT DISTINCT COALESCE("timestamp", now()) FROM pg_temp.dash_import_events), $1::interval)
"""
# Move one staged batch into events; existing events (same id and time) are left alone.
INSERT_EVENTS_FROM_STAGE_SQL: Final = """
INSERT INTO events (id, swarm_id, agent_id, type, payload, "timestamp", entity_type, severity)
SELECT id, swarm_id, agent_id, type, payload::jsonb, COALESCE("timestamp", now()), entity_type, severity
FROM pg_temp.dash_import_events
ON CONFLICT (id, "timestamp") DO NOTHING
"""
# Where each batch is COPYed (the table CREATE_EVENTS_STAGE_SQL makes), and its columns.
EVENTS_STAGE_TABLE: Final = "dash_import_events"
EVENTS_STAGE_SCHEMA: Final = "pg_temp"
EVENTS_STAGE_COLUMNS: Final = tuple(
    "id swarm_id agent_id type payload timestamp entity_type severity".split()
)


def _rowcount(status: str) -> int:
    # "INSERT 0 <n>"
    return int(status.rsplit(" ", 1)[-1])


async def schema_present(db: Database) -> bool:
    """Whether the target tables are there (the schema is migrated)."""
    return bool(await db.fetchval(CHECK_SCHEMA_SQL, retry=True))


# -- references to rows that are not in the legacy file ---------------------------------------------


async def find_swarms(db: Database, keys: Sequence[str]) -> dict[str, SwarmRef]:
    """Legacy swarm id → its uuid if that swarm exists in PostgreSQL, else None."""
    result: dict[str, SwarmRef] = {}
    for i in range(0, len(keys), LOOKUP_CHUNK):
        by_uuid = {legacy_uuid("swarms", k): k for k in keys[i : i + LOOKUP_CHUNK]}
        found = {r[0] for r in await db.fetch(FIND_SWARMS_SQL, list(by_uuid), retry=True)}
        for u, k in by_uuid.items():
            result[k] = u if u in found else None
    return result


async def find_agents(db: Database, keys: Sequence[str]) -> dict[str, AgentRef]:
    """Legacy agent id → (its uuid, its swarm's uuid) if that agent exists in PostgreSQL, else None."""
    result: dict[str, AgentRef] = {}
    for i in range(0, len(keys), LOOKUP_CHUNK):
        by_uuid = {legacy_uuid("agents", k): k for k in keys[i : i + LOOKUP_CHUNK]}
        rows = await db.fetch(FIND_AGENTS_SQL, list(by_uuid), retry=True)
        found_agents = {r[0]: r[1] for r in rows}
        for u, k in by_uuid.items():
            swarm = found_agents.get(u)
            result[k] = (u, swarm) if swarm is not None else None
    return result


# -- swarms and agents: one statement per batch -----------------------------------------------------


async def write_swarms(con: Connection, batch: Batch, dry_run: bool) -> tuple[int, int]:
    """Insert a swarm batch and its budgets: (swarms written, budgets written); counted in a dry run."""
    budgets = batch.budgets
    if dry_run:
        distinct = list(dict.fromkeys(batch.ids))
        present = await con.fetchval(COUNT_SWARMS_SQL, distinct) if distinct else 0
        budget_present = (
            await con.fetchval(COUNT_BUDGETS_SQL, [b[0] for b in budgets], [b[1] for b in budgets])
            if budgets
            else 0
        )
        return len(distinct) - int(present), len(budgets) - int(budget_present)
    written = 0
    if batch.records:
        cols = list(zip(*batch.records, strict=True))
        written = _rowcount(await con.execute(INSERT_SWARMS_SQL, *cols))
    budgets_written = 0
    if budgets:
        cols = list(zip(*budgets, strict=True))
        budgets_written = _rowcount(await con.execute(INSERT_BUDGETS_SQL, *cols))
    return written, budgets_written


async def write_agents(con: Connection, batch: Batch, dry_run: bool) -> tuple[int, int]:
    """Insert an agent batch: (agents written, 0); counted in a dry run."""
    if not batch.records:
        return 0, 0
    if dry_run:
        distinct = list(dict.fromkeys(batch.ids))
        present = await con.fetchval(COUNT_AGENTS_SQL, distinct)
        return len(distinct) - int(present), 0
    cols = list(zip(*batch.records, strict=True))
    return _rowcount(await con.execute(INSERT_AGENTS_SQL, *cols)), 0


# -- events: COPY into a session TEMP table, then INSERT ... SELECT ---------------------------------


async def write_events(
    con: Connection,
    batch: Batch,
    dry_run: bool,
    *,
    stage_in_tx: bool = False,
    partition_width: dt.timedelta = dt.timedelta(days=1),
) -> int:
    """Write one event batch in one transaction: events written. The staging table must exist,
    unless ``stage_in_tx``: then the transaction makes it. Missing partitions (of
    ``partition_width``) are created first."""
    if not batch.records:
        return 0
    if dry_run:
        distinct = list(dict.fromkeys(batch.ids))
        present = await con.fetchval(COUNT_EVENTS_SQL, distinct)
        return len(distinct) - int(present)
    async with transaction_on(con):
        if stage_in_tx:
            await con.execute(CREATE_EVENTS_STAGE_IN_TX_SQL)
        await con.copy_records_to_table(
            EVENTS_STAGE_TABLE,
            records=batch.records,
            columns=EVENTS_STAGE_COLUMNS,
            schema_name=EVENTS_STAGE_SCHEMA,
        )
        await con.execute(ENSURE_PARTITIONS_FOR_STAGE_SQL, partition_width)
        status = await con.execute(INSERT_EVENTS_FROM_STAGE_SQL)
    return _rowcount(status)


async def write_event_batches(
    db: Database,
    queue: asyncio.Queue[Batch | None],
    commit: Callable[[Batch, int], None],
    *,
    dry_run: bool,
) -> None:
    """One event writer: write batches from ``queue`` until it yields None, ``commit(batch, written)``
    after each. It holds one connection with its own staging table; on a transient failure it
    reconnects and re-writes the batch it held (idempotent), then carries on.

    The connection that has the staging table is closed when the writer stops, however it stops
    (done, failed or cancelled): the pool never gets it back, so no pooled connection keeps a TEMP
    table. Closing costs nothing per batch, unlike a table created and dropped in every batch's
    transaction; the pool opens a fresh connection when it next needs one.
    """
    held: list[Batch] = []  # the batch being written (kept across a reconnect)
    stage_in_tx = db.settings.postgres_pooler == "transaction"

    async def loop(con: Connection, _attempt: int) -> None:
        try:
            if not dry_run and not stage_in_tx:
                await con.execute(CREATE_EVENTS_STAGE_SQL)
            while True:
                if not held:
                    item = await queue.get()
                    if item is None:
                        return
                    held.append(item)
                written = await write_events(
                    con,
                    held[0],
                    dry_run,
                    stage_in_tx=stage_in_tx,
                    partition_width=db.settings.event_partition_size,
                )
                commit(held.pop(), written)
        finally:
            if not dry_run:
                discard(con)

    await db.run(loop, retry=True)

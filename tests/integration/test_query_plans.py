"""EXPLAIN guards: the hot queries use their intended index and never scan a big table sequentially.

The SQL is captured from real repository calls (``RecordingDatabase`` records every statement
before sending it), so the plans are those of exactly what the repositories send; for the event
log, the guard explains the statement from the registry (``sql/events.sql`` by name, or the filter
composer ``event_filters``) after checking that it is the one the call sent. The data are a
scaled-down copy of the ``bench.queries`` benchmark's (a week of events in time order, as an
append-only log is written, a skewed mix of types), plus sessions, budgets and a ledger, in a
scratch database of their own (dropped afterwards), analysed before planning.

Each statement is planned the way asyncpg runs it: as a prepared statement, executed repeatedly
on one connection. The server plans the first five executions with the actual values (custom
plans) and may then switch to a value-blind generic plan when it looks no more expensive; both the
first plan and the one in use after ten executions are checked.
"""

from __future__ import annotations

import datetime as dt
import itertools
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypeVar, cast

import asyncpg
import pytest

from bench import queries as bench_queries
from dash_storage import sql
from dash_storage.core.config import Settings
from dash_storage.core.database import Connection, Database, Record
from dash_storage.migrations import MigrationRunner
from dash_storage.repositories import agents as agent_sql
from dash_storage.repositories import budgets as budget_sql
from dash_storage.repositories import event_filters
from dash_storage.repositories import sessions as session_sql
from dash_storage.repositories import swarms as swarm_sql
from dash_storage.repositories.agents import AgentRepository
from dash_storage.repositories.budgets import BudgetRepository
from dash_storage.repositories.events import EventRepository
from dash_storage.repositories.sessions import SessionRepository
from tests.conftest import TEST_DB, drop_database, recreate_database

T = TypeVar("T")
PLANS_DB = f"{TEST_DB}_qplans"
EVENTS = 80_000
SWARMS = 50
AGENTS_PER_SWARM = 20
SESSIONS = 20_000
LEDGER_PER_BUDGET = 20
#: How many times each prepared statement is explained: past the five custom plans after which
#: the server may settle on a generic plan.
EXECUTIONS = 10

# Sessions: 30% never expire, 1% expired (cleanup_expired runs often, so few are due at a time).
INSERT_SESSIONS = """
INSERT INTO sessions (tree_data, current_branch, metadata, expires_at)
SELECT '{"root": "main"}', 'branch-' || (g % 500), '{}',
       CASE WHEN g % 100 = 0 THEN now() - interval '1 hour'
            WHEN g % 10 < 3 THEN NULL
            ELSE now() + make_interval(secs => g) END
FROM generate_series(1, $1::int) AS g
"""
# One budget per swarm and per agent.
INSERT_BUDGETS = """
INSERT INTO budgets (swarm_id, scope_type, scope_id, allocated, max_tokens)
SELECT id, 'swarm', id, 1000, NULL FROM swarms
UNION ALL
SELECT swarm_id, 'agent', id, 100, 1000000 FROM agents
"""
# Ledger rows (the counters are not kept in step: only the plans matter here).
INSERT_LEDGER = """
INSERT INTO budget_ledger (budget_id, tokens, cost, idempotency_key)
SELECT b.id, 10, 0.001, 'key-' || g FROM budgets b, generate_series(1, $1::int) AS g
"""


class RecordingConnection:
    """A pooled connection (as ``run`` hands it out) that records every statement before sending it."""

    def __init__(self, con: Connection, sent: list[tuple[str, tuple[Any, ...]]]) -> None:
        self._con = con
        self._sent = sent

    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[Record]:
        self._sent.append((query, args))
        return await self._con.fetch(query, *args, timeout=timeout)

    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None) -> Record | None:
        self._sent.append((query, args))
        return await self._con.fetchrow(query, *args, timeout=timeout)

    async def fetchval(self, query: str, *args: Any, timeout: float | None = None) -> Any:
        self._sent.append((query, args))
        return await self._con.fetchval(query, *args, timeout=timeout)

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        self._sent.append((query, args))
        return await self._con.execute(query, *args, timeout=timeout)


class RecordingDatabase(Database):
    """A Database that records the text and arguments of every statement before sending it (also
    those that a function given to ``run`` sends on its connection)."""

    def __init__(self, settings: Settings, **overrides: Any) -> None:
        super().__init__(settings, **overrides)
        self.sent: list[tuple[str, tuple[Any, ...]]] = []

    async def fetch(
        self, query: str, *args: Any, retry: bool = False, timeout: float | None = None, replica: bool = False
    ) -> list[Record]:
        self.sent.append((query, args))
        return await super().fetch(query, *args, retry=retry, timeout=timeout, replica=replica)

    async def fetchrow(
        self, query: str, *args: Any, retry: bool = False, timeout: float | None = None, replica: bool = False
    ) -> Record | None:
        self.sent.append((query, args))
        return await super().fetchrow(query, *args, retry=retry, timeout=timeout, replica=replica)

    async def fetchval(
        self, query: str, *args: Any, retry: bool = False, timeout: float | None = None, replica: bool = False
    ) -> Any:
        self.sent.append((query, args))
        return await super().fetchval(query, *args, retry=retry, timeout=timeout, replica=replica)

    async def execute(self, query: str, *args: Any, retry: bool = False, timeout: float | None = None) -> str:
        self.sent.append((query, args))
        return await super().execute(query, *args, retry=retry, timeout=timeout)

    async def run(
        self, fn: Callable[[Connection, int], Awaitable[T]], *, retry: bool = False, transaction: bool = False
    ) -> T:
        async def recorded(con: Connection, attempt: int) -> T:
            return await fn(cast(Connection, RecordingConnection(con, self.sent)), attempt)

        return await super().run(recorded, retry=retry, transaction=transaction)

    async def capture(self, call: Awaitable[object]) -> tuple[str, tuple[Any, ...]]:
        """Run one repository call and return the one statement it sent (text, arguments)."""
        before = len(self.sent)
        await call
        sent = self.sent[before:]
        assert len(sent) == 1, f"expected one statement, got {len(sent)}: {[q for q, _ in sent]}"
        return sent[0]


@dataclass
class Data:
    db: RecordingDatabase
    now: dt.datetime
    swarm: uuid.UUID
    agent: uuid.UUID
    budget: uuid.UUID


@pytest.fixture(scope="module")
async def data(settings: Settings) -> AsyncIterator[Data]:
    """The scratch database ``<test db>_qplans``, migrated, filled and analysed; dropped afterwards."""
    await recreate_database(settings, PLANS_DB)
    db = RecordingDatabase(
        settings,
        postgres_db=PLANS_DB,
        postgres_min_pool_size=1,
        postgres_max_pool_size=2,
        dash_migrations_dir=None,  # the built-in schema only, whatever the environment adds
    )
    try:
        await db.initialize()
        await MigrationRunner(db).migrate()
        await bench_queries.load(db, EVENTS, SWARMS, AGENTS_PER_SWARM)
        await db.execute(INSERT_SESSIONS, SESSIONS)
        await db.execute(INSERT_BUDGETS)
        await db.execute(INSERT_LEDGER, LEDGER_PER_BUDGET)
        async with db.acquire() as con:
            await con.execute("VACUUM ANALYZE")
        await load_partitions(db)
        swarm = await db.fetchval("SELECT id FROM swarms ORDER BY id LIMIT 1")
        agent = await db.fetchval("SELECT id FROM agents WHERE swarm_id = $1 ORDER BY id LIMIT 1", swarm)
        budget = await db.fetchval("SELECT id FROM budgets WHERE scope_id = $1", agent)
        yield Data(db, await db.fetchval("SELECT now()"), swarm, agent, budget)
    finally:
        await db.close()
        await drop_database(settings, PLANS_DB)


# -- plans -------------------------------------------------------------------------------------


@dataclass
class Plans:
    first: dict[str, Any]  # the plan of the first execution (a custom plan)
    steady: dict[str, Any]  # the plan after EXECUTIONS executions
    generic_plans: int
    custom_plans: int


async def plan(db: Database, sql: str, args: tuple[Any, ...]) -> Plans:
    """Prepare ``sql`` on one connection and EXPLAIN its execution EXECUTIONS times with ``args``
    (the plan cache as asyncpg meets it; see ``bench.queries.prepared_plans``). Nothing runs."""
    async with db.acquire() as con:
        plans, generic, custom = await bench_queries.prepared_plans(con, sql, args, EXECUTIONS)
    return Plans(plans[0], plans[-1], generic, custom)


def _nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _nodes(child)


#: events is partitioned by time: a partition's scan counts as a scan of "events" (one holding
#: fewer than SMALL_PARTITION rows, such as the empty ones kept ahead of the clock, as
#: "events (small partition)": a sequential scan of it reads next to nothing), and a partition's
#: index as the index of events it belongs to. Filled by the ``data`` fixture.
PARTITIONS: dict[str, str] = {}
SMALL_PARTITION = 1_000


def scans(p: dict[str, Any]) -> list[tuple[str, str | None, str | None]]:
    """(node type, relation, index) of every node of an EXPLAIN (FORMAT JSON) plan."""
    return [
        (
            n["Node Type"],
            PARTITIONS.get(n.get("Relation Name") or "", n.get("Relation Name")),
            PARTITIONS.get(n.get("Index Name") or "", n.get("Index Name")),
        )
        for n in _nodes(p["Plan"])
    ]


async def load_partitions(db: Database) -> None:
    """Fill PARTITIONS from the catalog (after ANALYZE)."""
    PARTITIONS.clear()
    for child, parent, rows in await db.fetch(
        "SELECT c.relname, p.relname, c.reltuples FROM pg_inherits i "
        "JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent"
    ):
        if parent == "events" and rows < SMALL_PARTITION:
            parent = "events (small partition)"
        PARTITIONS[child] = parent


def check(p: dict[str, Any], hot: Hot, what: str) -> None:
    found = scans(p)
    seq = [rel for kind, rel, _ in found if kind == "Seq Scan" and rel in hot.tables]
    assert not seq, f"{what}: sequential scan of {seq}: {found}"
    used = {index for _, _, index in found if index}
    assert hot.indexes <= used, f"{what}: expected {sorted(hot.indexes)}, used {sorted(used)}: {found}"
    conds = " AND ".join(n["Index Cond"] for n in _nodes(p["Plan"]) if "Index Cond" in n)
    for needle in hot.seeks:
        assert needle in conds, f"{what}: {needle} is not an index condition (only {conds!r})"


# -- the hot queries -----------------------------------------------------------------------------

Capture = Callable[[Data], Awaitable[tuple[str, tuple[Any, ...]]]]


async def _filter(d: Data) -> tuple[str, tuple[Any, ...]]:
    return await d.db.capture(
        EventRepository(d.db).find_by_filter(
            swarm_id=d.swarm,
            types=bench_queries.COMMON_TYPES,
            since=d.now - dt.timedelta(hours=24),
            limit=100,
        )
    )


async def _filter_rare(d: Data) -> tuple[str, tuple[Any, ...]]:
    return await d.db.capture(
        EventRepository(d.db).find_by_filter(
            swarm_id=d.swarm, types=bench_queries.RARE_TYPES, since=d.now - dt.timedelta(hours=24), limit=100
        )
    )


async def _filter_after(d: Data) -> tuple[str, tuple[Any, ...]]:
    repo = EventRepository(d.db)
    since = d.now - dt.timedelta(hours=24)
    page = await repo.find_by_filter(
        swarm_id=d.swarm, types=bench_queries.COMMON_TYPES, since=since, limit=20
    )
    assert len(page) == 20
    return await d.db.capture(
        repo.find_by_filter(
            swarm_id=d.swarm,
            types=bench_queries.COMMON_TYPES,
            since=since,
            limit=100,
            after=EventRepository.cursor(page[-1]),
        )
    )


async def _filter_after_desc(d: Data) -> tuple[str, tuple[Any, ...]]:
    repo = EventRepository(d.db)
    page = await repo.find_by_filter(swarm_id=d.swarm, limit=20, order="desc")
    assert len(page) == 20
    return await d.db.capture(
        repo.find_by_filter(swarm_id=d.swarm, limit=100, order="desc", after=EventRepository.cursor(page[-1]))
    )


async def _by_agent(d: Data) -> tuple[str, tuple[Any, ...]]:
    return await d.db.capture(EventRepository(d.db).find_by_agent_id(d.agent, limit=100))


async def _by_swarm(d: Data) -> tuple[str, tuple[Any, ...]]:
    return await d.db.capture(EventRepository(d.db).find_by_swarm_id(d.swarm, limit=100))


async def _timeline(d: Data) -> tuple[str, tuple[Any, ...]]:
    return await d.db.capture(
        EventRepository(d.db).get_timeline(d.swarm, since=d.now - dt.timedelta(hours=6), limit=100)
    )


async def _consume(d: Data) -> tuple[str, tuple[Any, ...]]:
    return await d.db.capture(
        BudgetRepository(d.db).consume_budget(d.budget, 10, Decimal("0.01"), idempotency_key="plan-test")
    )


async def _consume_new(d: Data) -> tuple[str, tuple[Any, ...]]:
    """A consume without a key: its generated key cannot be in the ledger yet (CONSUME_NEW)."""
    return await d.db.capture(
        BudgetRepository(d.db, combine=False).consume_budget(d.budget, 10, Decimal("0.01"))
    )


async def _cleanup_sessions(d: Data) -> tuple[str, tuple[Any, ...]]:
    return await d.db.capture(SessionRepository(d.db).cleanup_expired())


async def _agents_of_swarm(d: Data) -> tuple[str, tuple[Any, ...]]:
    return await d.db.capture(AgentRepository(d.db).find_by_swarm_id(d.swarm))


@dataclass(frozen=True)
class Hot:
    capture: Capture
    indexes: set[str]  # must all appear in the plan
    tables: set[str]  # must not be scanned sequentially
    seeks: tuple[str, ...] = ()  # must be index conditions (the scan starts there), not filters
    statement: str | None = None  # the registry's statement: what the call must send, and is planned


EVENTS_SQL = sql.load("events")


def find_events(filters: tuple[str, ...], order: str = "ASC", after: bool = False) -> str:
    """The registry's statement of find_by_filter with these filters (see event_filters)."""
    return event_filters.select_sql(filters, order, after)


SWARM_IDX = "events_swarm_id_timestamp_idx"
SINCE = '"timestamp" >= '
CURSOR_ASC = 'ROW("timestamp", id) > ROW('
CURSOR_DESC = 'ROW("timestamp", id) < ROW('
HOT: dict[str, Hot] = {
    "events.find_by_filter(swarm, types, since, limit)": Hot(
        _filter, {SWARM_IDX}, {"events"}, (SINCE,), find_events(("swarm_id", "types", "since"))
    ),
    "events.find_by_filter(swarm, rare types, since, limit)": Hot(
        _filter_rare, {SWARM_IDX}, {"events"}, (SINCE,), find_events(("swarm_id", "types", "since"))
    ),
    "events.find_by_filter(..., after=cursor)": Hot(
        _filter_after,
        {SWARM_IDX},
        {"events"},
        (SINCE, CURSOR_ASC),
        find_events(("swarm_id", "types", "since"), after=True),
    ),
    "events.find_by_filter(swarm, order=desc, after=cursor)": Hot(
        _filter_after_desc, {SWARM_IDX}, {"events"}, (CURSOR_DESC,), find_events(("swarm_id",), "DESC", True)
    ),
    "events.find_by_agent_id": Hot(
        _by_agent, {"events_agent_id_timestamp_idx"}, {"events"}, (), find_events(("agent_id",), "DESC")
    ),
    "events.find_by_swarm_id": Hot(
        _by_swarm, {SWARM_IDX}, {"events"}, (), find_events(("swarm_id",), "DESC")
    ),
    "events.get_timeline": Hot(
        _timeline, {SWARM_IDX}, {"events"}, (SINCE,), find_events(("swarm_id", "since"))
    ),
    # The ledger is read only through dash_ledger_entries (see test_hot_budgets for its plan).
    "budgets.consume_budget (CONSUME)": Hot(_consume, {"budgets_pkey"}, {"budgets", "budget_ledger"}),
    "budgets.consume_budget without a key (CONSUME_NEW)": Hot(
        _consume_new, {"budgets_pkey"}, {"budgets", "budget_ledger"}, (), budget_sql.CONSUME_NEW
    ),
    "sessions.cleanup_expired": Hot(_cleanup_sessions, {"sessions_expires_at_idx"}, {"sessions"}),
    "agents.find_by_swarm_id": Hot(_agents_of_swarm, {"agents_swarm_id_idx"}, {"agents"}),
}


@pytest.mark.parametrize("name", list(HOT))
async def test_hot_query_uses_its_index(data: Data, name: str) -> None:
    hot = HOT[name]
    sent, args = await hot.capture(data)
    if hot.statement is not None:
        assert sent == hot.statement, f"{name}: the call did not send the registry's statement"
    plans = await plan(data.db, hot.statement or sent, args)
    check(plans.first, hot, f"{name} (first plan)")
    check(plans.steady, hot, f"{name} (after {EXECUTIONS} executions)")


# -- the benchmark's SQL is the repositories' SQL -------------------------------------------------


async def test_helpers_build_what_the_repositories_send(data: Data) -> None:
    """bench/queries.py (and this file's readers) build the SQL from the module's helpers and
    constants; they must be exactly what the repositories send."""
    sent, args = await _filter(data)
    assert sent == find_events(("swarm_id", "types", "since"))
    assert args[0] == 100 and args[1] == data.swarm and list(args[2]) == bench_queries.COMMON_TYPES

    sent, args = await data.db.capture(
        EventRepository(data.db).find_by_filter(
            swarm_id=data.swarm, types=bench_queries.RARE_TYPES, limit=100
        )
    )
    assert (sent, args[:2]) == (find_events(("swarm_id", "types")), (100, data.swarm))

    sent, args = await _by_agent(data)
    assert (sent, args) == (find_events(("agent_id",), "DESC"), (100, data.agent))

    sent, args = await data.db.capture(EventRepository(data.db).count(swarm_id=data.swarm, severity="info"))
    assert (sent, args) == (event_filters.count_sql(("swarm_id", "severity")), (data.swarm, "info"))

    assert (await _consume(data))[0] == budget_sql.CONSUME
    assert (await _consume_new(data))[0] == budget_sql.CONSUME_NEW
    assert (await _cleanup_sessions(data))[0] == session_sql.DELETE_EXPIRED
    assert (await _agents_of_swarm(data))[0] == agent_sql.SELECT_AGENTS_BY_SWARM


# -- every named statement is accepted by a real server ------------------------------------------

_SQL_START = re.compile(r"\s*(SELECT|INSERT|UPDATE|DELETE|WITH)\b", re.IGNORECASE)


def _named_statements() -> list[tuple[str, str]]:
    """Every complete statement kept as a module-level constant by the repositories (templates,
    which still hold ``{placeholders}``, and WHERE fragments excluded)."""
    found = []
    for module in (swarm_sql, agent_sql, session_sql, budget_sql):
        for name, value in vars(module).items():
            if name.isupper() and not name.endswith("_TEMPLATE") and isinstance(value, str):
                if _SQL_START.match(value):
                    found.append((f"{module.__name__.rsplit('.', 1)[-1]}.{name}", value))
    return found


STATEMENTS = _named_statements()


def test_statements_are_found() -> None:
    names = {n for n, _ in STATEMENTS}
    assert {"budgets.CONSUME", "budgets.CONSUME_NEW"} <= names
    assert len(STATEMENTS) >= 30


async def test_every_named_statement_prepares(data: Data) -> None:
    """The server parses, name-resolves and type-checks every statement (PREPARE, nothing runs)."""
    failures = []
    async with data.db.acquire() as con:
        for name, sql in STATEMENTS:
            try:
                await con.prepare(sql)
            except asyncpg.PostgresError as exc:
                failures.append(f"{name}: {exc}")
    assert not failures, "\n".join(failures)


# -- every composed filter variant of the event log keeps its index ------------------------------
# (That every statement of the registry prepares, composed ones included, is test_sql_registry.py.)


KEY_INDEXES = {"swarm_id": SWARM_IDX, "agent_id": "events_agent_id_timestamp_idx"}


def _keyed_variants() -> Iterator[tuple[str, tuple[str, ...], str, bool]]:
    """(kind, filters, order, after) of every composed statement that filters on swarm or agent."""
    for k in range(1, len(event_filters.FILTERS) + 1):
        for filters in itertools.combinations(event_filters.FILTERS, k):
            if "swarm_id" not in filters and "agent_id" not in filters:
                continue
            yield "count", filters, "ASC", False
            for order, after in itertools.product(event_filters.ORDERS, (False, True)):
                yield "select", filters, order, after


async def test_every_filter_variant_seeks_its_index_under_a_generic_plan(data: Data) -> None:
    """Each statement with a swarm or agent filter seeks that column's index even in the value-blind
    generic plan a pooled prepared statement may settle on (forced here), because every filter is a
    plain condition of its own statement, never ``$n IS NULL OR column = $n``."""
    values: dict[str, Any] = {
        "swarm_id": data.swarm,
        "agent_id": data.agent,
        "types": bench_queries.COMMON_TYPES,
        "entity_type": "agent",
        "severity": "info",
        "since": data.now - dt.timedelta(hours=24),
        "until": data.now,
    }
    cursor = (data.now - dt.timedelta(hours=12), uuid.UUID(int=0))
    failures = []
    async with data.db.acquire() as con:
        await con.execute("SET plan_cache_mode = force_generic_plan")
        try:
            for kind, filters, order, after in _keyed_variants():
                given = tuple(values[f] for f in filters)
                if kind == "count":
                    text, args = event_filters.count_sql(filters), given
                else:
                    text = event_filters.select_sql(filters, order, after)
                    args = (100, *given, *(cursor if after else ()))
                plans, generic, _ = await bench_queries.prepared_plans(con, text, args, 1)
                found = scans(plans[0])
                used = {index for _, _, index in found}
                conds = " AND ".join(n["Index Cond"] for n in _nodes(plans[0]["Plan"]) if "Index Cond" in n)
                seq = [rel for node, rel, _ in found if node == "Seq Scan" and rel == "events"]
                # At least one of the keys given is sought in its own index.
                seeks = [
                    k
                    for k, index in KEY_INDEXES.items()
                    if k in filters and index in used and f"{k} = " in conds
                ]
                if generic != 1 or seq or not seeks:
                    failures.append(f"{kind} {filters} {order} after={after}: {found} ({conds!r})")
        finally:
            await con.execute("RESET plan_cache_mode")
    assert not failures, "\n".join(failures)

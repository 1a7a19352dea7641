"""Event ingest: create_many through binary COPY, and the batching EventWriter, on a real PostgreSQL.

What the server did is observed from inside it: a statement-level trigger logs each INSERT/COPY
into ``events`` (its text, the transaction's now(), its row count), and a deferred constraint
trigger can hold every commit on an advisory lock, so "not acknowledged before commit" is checked
while a commit is really pending.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import asyncpg
import orjson
import pytest

from dash_storage import DashStorageError, EventWriter
from dash_storage.core.config import Settings
from dash_storage.core.database import Connection, Database
from dash_storage.core.errors import ConflictError, NotFoundError, ValidationError
from dash_storage.core.ids import new_id
from dash_storage.core.models import Event
from dash_storage.repositories import event_ingest, event_partitions
from dash_storage.repositories.event_copy import FIRST_CHUNK
from dash_storage.repositories.event_ingest import COPY_MIN_BATCH
from dash_storage.repositories.events import EventRepository
from tests import reliability
from tests.conftest import TEST_DB, MakeDatabase, admin_connect
from tests.factories import make_agent, make_swarm, wait_until
from tests.faults.chaos import capped, gather_outcomes, sized, terminating_connections
from tests.faults.databases import LostAnswerDatabase, StatementHook, as_attempt

T = TypeVar("T")
UTC = dt.UTC

LOG_DDL = """
CREATE TABLE ingest_log (n serial, query text, tx_now timestamptz, rows bigint);
CREATE FUNCTION ingest_log_statement() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ingest_log (query, tx_now, rows) SELECT current_query(), now(), count(*) FROM new_rows;
    RETURN NULL;
END $$;
CREATE TRIGGER ingest_log AFTER INSERT ON events REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION ingest_log_statement();
"""
LOG_DROP = """
DROP TRIGGER IF EXISTS ingest_log ON events;
DROP FUNCTION IF EXISTS ingest_log_statement();
DROP TABLE IF EXISTS ingest_log;
"""
GATE_KEY = 6406  # the advisory lock the test holds to stall commits
GATE_DDL = f"""
CREATE FUNCTION ingest_commit_gate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared({GATE_KEY});
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER ingest_commit_gate AFTER INSERT ON events
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION ingest_commit_gate();
"""
GATE_DROP = """
DROP TRIGGER IF EXISTS ingest_commit_gate ON events;
DROP FUNCTION IF EXISTS ingest_commit_gate();
"""


class Statement(NamedTuple):
    query: str
    tx_now: dt.datetime
    rows: int

    @property
    def kind(self) -> str:
        """COPY, or INSERT (also one inside WITH)."""
        first = self.query.lstrip().split(None, 1)[0].upper()
        return "INSERT" if first == "WITH" and "INSERT INTO events" in self.query else first


@pytest.fixture
async def statements(db: Database) -> AsyncIterator[Callable[[], Awaitable[list[Statement]]]]:
    """Log every statement that inserts into events; yields a function returning the log so far."""
    await db.execute(LOG_DDL)

    async def read() -> list[Statement]:
        rows = await db.fetch("SELECT query, tx_now, rows FROM ingest_log ORDER BY n")
        return [Statement(*r) for r in rows]

    try:
        yield read
    finally:
        await db.execute(LOG_DROP)


class CommitGate:
    """While ``held``, every transaction that inserted events waits at COMMIT."""

    def __init__(self, admin: asyncpg.Connection) -> None:
        self.admin = admin

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        await self.admin.execute("SELECT pg_advisory_lock($1)", GATE_KEY)
        try:
            yield
        finally:
            await self.admin.execute("SELECT pg_advisory_unlock($1)", GATE_KEY)

    async def stalled(self) -> bool:
        """True once a backend waits for the gate, i.e. is stuck in its COMMIT."""
        return await self.waiting() > 0

    async def waiting(self) -> int:
        """How many backends wait for the gate."""
        return int(
            await self.admin.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND objid = $1",
                GATE_KEY,
            )
        )


@pytest.fixture
async def gate(db: Database, settings: Settings) -> AsyncIterator[CommitGate]:
    await db.execute(GATE_DDL)
    admin = await admin_connect(settings, TEST_DB)
    try:
        yield CommitGate(admin)
    finally:
        await admin.close()
        await db.execute(GATE_DROP)


def same_json(a: Any, b: Any) -> bool:
    """Equal as JSON, types included (1 is not 1.0), key order aside."""
    return orjson.dumps(a, option=orjson.OPT_SORT_KEYS) == orjson.dumps(b, option=orjson.OPT_SORT_KEYS)


def assert_same_events(got: Sequence[Event], expected: Sequence[Event]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g == e
        assert same_json(g.payload, e.payload), (g.payload, e.payload)
        assert g.timestamp.utcoffset() == dt.timedelta(0)


async def primed(database: Database) -> int:
    """Initialise ``database`` and make the reads it makes once, before its first event write (the
    partitions and the database clock, which is read again if an answer was slow); how many calls
    ``LostAnswerDatabase`` has replayed so far."""
    await database.initialize()
    await event_partitions.now(database)
    return getattr(database, "replays", 0)


def _stamped_together(events: Sequence[Event], tx_now: dt.datetime) -> None:
    """The timestamps a batch left out: one value for the whole batch, fixed by the library before
    the first attempt from the database clock (so close to the writing transaction's now())."""
    stamps = {e.timestamp for e in events}
    assert len(stamps) == 1, stamps
    assert abs(stamps.pop() - tx_now) < dt.timedelta(seconds=5)


async def stored_events(db: Database, ids: Sequence[uuid.UUID]) -> list[Event]:
    rows = await db.fetch(
        'SELECT id, swarm_id, agent_id, type, payload, "timestamp", correlation_id, parent_event_id, '
        "entity_type, severity FROM events WHERE id = ANY($1::uuid[])",
        list(ids),
    )
    by_id = {r[0]: Event(*r) for r in rows}
    return [by_id[i] for i in ids if i in by_id]


async def assert_stored_once(db: Database, created: Sequence[Event], types: list[str]) -> None:
    """``created`` has the events asked for (``types``, in order), each stored once and as returned."""
    assert [e.type for e in created] == types
    assert await db.fetchval("SELECT count(*) FROM events") == len(types)
    assert_same_events(await stored_events(db, [e.id for e in created]), list(created))


async def create_many_on(database: Database, items: list[dict[str, Any]]) -> list[Event]:
    """``create_many(items)`` through ``database``, initialised for the call and closed after it."""
    await database.initialize()
    try:
        return await EventRepository(database).create_many(items)
    finally:
        await database.close()


# -- create_many: COPY for large batches ------------------------------------------------------------


async def test_large_batches_use_copy_and_small_ones_one_insert(
    db: Database, statements: Callable[[], Awaitable[list[Statement]]]
) -> None:
    swarm = await make_swarm(db)
    repo = EventRepository(db)
    small = await repo.create_many([{"swarm_id": swarm, "type": "small"}] * (COPY_MIN_BATCH - 1))
    large = await repo.create_many([{"swarm_id": swarm, "type": "large"}] * COPY_MIN_BATCH)
    log = await statements()
    assert [(s.kind, s.rows) for s in log] == [("INSERT", COPY_MIN_BATCH - 1), ("COPY", COPY_MIN_BATCH)]
    # Timestamps not given are the database clock of the writing transaction, on both paths.
    _stamped_together(small, log[0].tx_now)
    _stamped_together(large, log[1].tx_now)
    assert_same_events(await stored_events(db, [e.id for e in small + large]), small + large)


async def test_create_many_of_5000_round_trips_every_value_exactly(db: Database) -> None:
    swarm = await make_swarm(db)
    agent = await make_agent(db, swarm)
    repo = EventRepository(db)
    base = dt.datetime(2025, 7, 1, 12, 0, 0, 123456, tzinfo=UTC)
    zones = [UTC, dt.timezone(dt.timedelta(hours=5, minutes=30)), dt.timezone(dt.timedelta(hours=-8))]
    payloads: list[Any] = [
        {
            "text": "héllo wörld — 你好 🌍 \u0301e",
            "none": None,
            "nested": {"list": [1, 2.5, None, True, "x"]},
        },
        {"big": 2**63 - 1, "neg": -(2**63 - 1), "float": 0.1, "tiny": 1e-300, "exp": 1.5e300, "zero": 0.0},
        ["a", {"b": []}, {}, "", " "],
        'just a string with \\ backslash and "quotes" and \n newline',
        12345,
        None,  # defaults to {}
        {"emoji": "👩‍👩‍👧", "rtl": "مرحبا", "keys with spaces": {"ключ": "значение"}},
    ]
    items: list[dict[str, Any]] = []
    for i in range(5000):
        item: dict[str, Any] = {"swarm_id": swarm, "type": f"type-{i % 17}-ü", "payload": payloads[i % 7]}
        if i % 3 == 0:
            item["timestamp"] = (base + dt.timedelta(microseconds=7 * i)).astimezone(zones[i // 3 % 3])
        if i % 4 == 0:
            item["correlation_id"] = f"corr-{i // 4}-ß"
        if i % 5 == 0:
            item["agent_id"] = agent
            item["entity_type"] = "agent"
        if i % 6 == 0:
            item["parent_event_id"] = uuid.uuid4()
        item["severity"] = ("debug", "info", "warning", "error", "critical")[i % 5]
        if i % 2:
            item["id"] = uuid.uuid4()  # random, not time-ordered: order must be the input's
        items.append(item)

    created = await repo.create_many(items)

    assert len(created) == 5000
    assert len({e.id for e in created}) == 5000
    defaulted = {e.timestamp for i, e in enumerate(created) if i % 3}
    assert len(defaulted) == 1  # one transaction, one now()
    for item, event in zip(items, created, strict=True):
        if "id" in item:
            assert event.id == item["id"]
        assert event.swarm_id == swarm
        assert event.type == item["type"]
        expected_payload = {} if item["payload"] is None else item["payload"]
        assert same_json(event.payload, expected_payload)
        if "timestamp" in item:
            assert event.timestamp == item["timestamp"]
        assert event.correlation_id == item.get("correlation_id")
        assert event.agent_id == item.get("agent_id")
        assert event.parent_event_id == item.get("parent_event_id")
        assert event.entity_type == item.get("entity_type", "system")
        assert event.severity == item["severity"]
    assert_same_events(await stored_events(db, [e.id for e in created]), created)
    assert await db.fetchval("SELECT count(*) FROM events") == 5000


async def test_copy_batch_is_all_or_nothing(db: Database) -> None:
    swarm = await make_swarm(db)
    repo = EventRepository(db)
    existing = await repo.create(swarm, "old")
    items: list[dict[str, Any]] = [{"swarm_id": swarm, "type": f"n{i}"} for i in range(200)]
    items[150]["id"] = existing.id
    with pytest.raises(ConflictError):
        await repo.create_many(items)
    items = [{"swarm_id": swarm, "type": f"n{i}"} for i in range(200)]
    items[199]["swarm_id"] = uuid.uuid4()  # unknown swarm: foreign key
    with pytest.raises(NotFoundError):
        await repo.create_many(items)
    assert await db.fetchval("SELECT count(*) FROM events") == 1


async def test_copy_path_after_a_lost_answer_stores_once_and_returns_the_stored_events(
    db: Database, settings: Settings, statements: Callable[[], Awaitable[list[Statement]]]
) -> None:
    swarm = await make_swarm(db)
    lossy = LostAnswerDatabase(settings)
    items = [{"swarm_id": swarm, "type": f"e{i}", "payload": {"i": i}} for i in range(300)]
    base = await primed(lossy)
    created = await create_many_on(lossy, items)
    assert lossy.replays == base + 1  # the write, its answer lost once
    await assert_stored_once(db, created, [f"e{i}" for i in range(300)])
    # The retry found every event written and wrote nothing; the timestamps are the first attempt's.
    log = await statements()
    assert [(s.kind, s.rows) for s in log] == [("COPY", 300)]
    _stamped_together(created, log[0].tx_now)


async def test_insert_path_after_a_lost_answer_stores_once_and_returns_the_stored_events(
    db: Database, settings: Settings, statements: Callable[[], Awaitable[list[Statement]]]
) -> None:
    swarm = await make_swarm(db)
    lossy = LostAnswerDatabase(settings)
    base = await primed(lossy)
    n = COPY_MIN_BATCH - 1
    try:
        items = [{"swarm_id": swarm, "type": f"e{i}", "payload": {"i": i}} for i in range(n)]
        created = await EventRepository(lossy).create_many(items)
    finally:
        await lossy.close()
    assert lossy.replays == base + 1
    assert [e.type for e in created] == [f"e{i}" for i in range(n)]
    assert await db.fetchval("SELECT count(*) FROM events") == n
    assert_same_events(await stored_events(db, [e.id for e in created]), created)
    # The retry found every event written (its INSERT wrote none); the timestamps are the first's.
    log = await statements()
    assert [(s.kind, s.rows) for s in log] == [("INSERT", n), ("INSERT", 0)]
    _stamped_together(created, log[0].tx_now)


async def test_a_copy_broken_midway_is_retried_with_the_same_ids(
    db: Database, monkeypatch: pytest.MonkeyPatch, statements: Callable[[], Awaitable[list[Statement]]]
) -> None:
    """Ids not given are made at validation, before anything is sent; the connection breaking
    after the first piece of the COPY was sent leaves the rest unsent. The retry sends every row
    with the id it had, and stores every event once."""
    swarm = await make_swarm(db)
    attempts: list[list[uuid.UUID]] = []  # the ids each attempt sent, piece by piece
    real_chunk = event_ingest.copy_chunk

    def breaking_chunk(rows: Sequence[Any], payloads: Any, start: int, end: int) -> bytes:
        if start == 0:
            attempts.append([])
        elif len(attempts) == 1:  # the second piece of the first attempt
            raise ConnectionResetError("the connection broke during the COPY")
        attempts[-1].extend(r[0] for r in rows[start:end])
        return real_chunk(rows, payloads, start, end)

    monkeypatch.setattr(event_ingest, "copy_chunk", breaking_chunk)
    n = 3 * FIRST_CHUNK
    created = await EventRepository(db).create_many([{"swarm_id": swarm, "type": f"e{i}"} for i in range(n)])
    first_attempt, retry = attempts
    ids = [e.id for e in created]
    assert first_attempt == ids[:FIRST_CHUNK] and retry == ids  # the same ids, sent again
    assert [e.type for e in created] == [f"e{i}" for i in range(n)]
    assert tuple(await db.fetchrow("SELECT count(*), count(DISTINCT id) FROM events") or ()) == (n, n)
    assert_same_events(await stored_events(db, ids), created)
    assert [(s.kind, s.rows) for s in await statements()] == [("COPY", n)]


class PartlyLostDatabase(Database):
    """Runs a retried transactional call once, then deletes some of what it wrote (as if only part
    had been stored) and runs it again as a retry attempt."""

    async def run(
        self, fn: Callable[[Connection, int], Awaitable[T]], *, retry: bool = False, transaction: bool = False
    ) -> T:
        first = await super().run(as_attempt(fn, 1), transaction=transaction)
        assert isinstance(first, list)
        doomed = [e.id for e in first[::2]]
        await self.execute("DELETE FROM events WHERE id = ANY($1::uuid[])", doomed)
        return await super().run(as_attempt(fn, 2), transaction=transaction)


async def test_copy_retry_writes_only_the_missing_events(
    db: Database, settings: Settings, statements: Callable[[], Awaitable[list[Statement]]]
) -> None:
    swarm = await make_swarm(db)
    items = [{"swarm_id": swarm, "type": f"e{i}"} for i in range(200)]
    created = await create_many_on(PartlyLostDatabase(settings), items)
    await assert_stored_once(db, created, [f"e{i}" for i in range(200)])
    log = await statements()
    assert [(s.kind, s.rows) for s in log] == [("COPY", 200), ("COPY", 100)]
    # The kept half has the first transaction's clock, the rewritten half the retry's.
    _stamped_together(created[1::2], log[0].tx_now)
    _stamped_together(created[::2], log[1].tx_now)


# -- EventWriter ------------------------------------------------------------------------------------


async def test_writer_stores_1000_concurrent_creates_once_each_with_their_own_result(
    db: Database, statements: Callable[[], Awaitable[list[Statement]]]
) -> None:
    swarm = await make_swarm(db)
    async with EventWriter(db, max_batch=300) as writer:
        created = await asyncio.gather(
            *(
                writer.create(swarm, f"t{i}", payload={"i": i, "s": "ünï"}, correlation_id=str(i))
                for i in range(1000)
            )
        )
    for i, event in enumerate(created):
        assert (event.type, event.payload, event.correlation_id) == (f"t{i}", {"i": i, "s": "ünï"}, str(i))
    assert len({e.id for e in created}) == 1000
    assert tuple(await db.fetchrow("SELECT count(*), count(DISTINCT id) FROM events") or ()) == (1000, 1000)
    assert_same_events(await stored_events(db, [e.id for e in created]), list(created))
    log = await statements()
    assert sum(s.rows for s in log) == 1000
    assert len(log) < 20  # shared writes, not one per event
    assert max(s.rows for s in log) <= 300


async def test_writer_error_reaches_only_the_callers_it_concerns(db: Database) -> None:
    swarm = await make_swarm(db)
    repo = EventRepository(db)
    taken = await repo.create(swarm, "taken")
    bad = {7, 123, 124, 180}
    missing = {i: uuid.uuid4() for i in bad}
    twice = new_id()

    async def one(writer: EventWriter, i: int) -> Event:
        if i in bad:
            return await writer.create(missing[i], f"t{i}")  # no such swarm
        if i == 50:
            return await writer.create(swarm, f"t{i}", id=taken.id)  # id exists
        if i in (60, 61):
            return await writer.create(swarm, f"t{i}", id=twice)  # two callers, one id: one wins
        return await writer.create(swarm, f"t{i}")

    async with EventWriter(db) as writer:
        outcomes = await asyncio.gather(*(one(writer, i) for i in range(200)), return_exceptions=True)
    for i, outcome in enumerate(outcomes):
        if i in bad:  # each caller learns which swarm is missing: its own
            assert isinstance(outcome, NotFoundError), (i, outcome)
            assert (outcome.entity, outcome.key) == ("swarm", missing[i])
            assert str(outcome) == f"swarm {missing[i]} not found"
        elif i == 50:
            assert isinstance(outcome, ConflictError), (i, outcome)
        elif i not in (60, 61):
            assert isinstance(outcome, Event) and outcome.type == f"t{i}", (i, outcome)
    winner, loser = sorted(outcomes[60:62], key=lambda o: isinstance(o, BaseException))
    assert isinstance(winner, Event) and winner.id == twice
    assert isinstance(loser, ConflictError)
    assert await db.fetchval("SELECT count(*) FROM events") == 1 + 200 - 6


async def test_writer_holds_a_repeated_id_until_its_twin_is_written(db: Database, gate: CommitGate) -> None:
    """Two creates of one caller-given id never go out in two batches at once: with different
    timestamps both would pass the look-up of given ids and be stored. The second waits until the
    first has committed, then fails as a conflict; other events do not wait with it."""
    swarm = await make_swarm(db)
    twice = new_id()
    async with EventWriter(db, max_concurrency=2) as writer:
        async with gate.held():
            first = asyncio.create_task(writer.create(swarm, "first", id=twice))
            await wait_until(gate.stalled, "the first batch waits at COMMIT")
            second = asyncio.create_task(writer.create(swarm, "second", id=twice))
            await asyncio.sleep(0.3)  # time for a wrongly sent second batch to reach COMMIT
            assert await gate.waiting() == 1
            assert not second.done()
            # An event with another id does not wait behind the held one: it goes out meanwhile.
            third = asyncio.create_task(writer.create(swarm, "third"))

            async def both_at_commit() -> bool:
                return await gate.waiting() == 2

            await wait_until(both_at_commit, "the third event's batch waits at COMMIT too")
            assert not second.done()
        assert (await first).id == twice
        assert (await third).type == "third"
        with pytest.raises(ConflictError):
            await second
    assert await db.fetchval("SELECT count(*) FROM events WHERE id = $1", twice) == 1


async def test_writer_validates_in_the_callers_task_before_queueing(db: Database) -> None:
    swarm = await make_swarm(db)
    async with EventWriter(db) as writer:
        with pytest.raises(ValidationError) as info:
            await writer.create(swarm, "")
        assert info.value.field == "type"
        with pytest.raises(ValidationError) as info:
            await writer.create(swarm, "x", payload={"bad": float("nan")})
        assert info.value.field == "payload"
        with pytest.raises(ValidationError) as info:
            await writer.create(swarm, "x", severity="loud")
        assert info.value.field == "severity"
        assert writer.pending == 0
        assert (await writer.create(swarm, "fine")).type == "fine"
    with pytest.raises(ValidationError):
        EventWriter(db, max_batch=0)
    with pytest.raises(ValidationError):
        EventWriter(db, max_delay_ms=-1)


async def test_writer_answers_only_after_commit(
    db: Database, gate: CommitGate, make_database: MakeDatabase
) -> None:
    swarm = await make_swarm(db)
    other = await make_database(postgres_min_pool_size=1, postgres_max_pool_size=2)
    async with EventWriter(db) as writer:
        async with gate.held():
            tasks = [asyncio.create_task(writer.create(swarm, f"t{i}")) for i in range(100)]
            await wait_until(gate.stalled, "a batch waits at COMMIT")
            assert not any(t.done() for t in tasks)  # inserted, not committed: nobody answered
            assert await other.fetchval("SELECT count(*) FROM events") == 0
        visible: list[bool] = []

        async def check(task: asyncio.Task[Event]) -> None:
            event = await task
            # At the moment create() returned, the row is committed: another connection sees it.
            visible.append(await other.fetchval("SELECT count(*) FROM events WHERE id = $1", event.id) == 1)

        await asyncio.gather(*(check(t) for t in tasks))
    assert visible == [True] * 100


async def test_writer_close_and_flush_write_everything_queued(db: Database) -> None:
    swarm = await make_swarm(db)
    writer = EventWriter(db)
    tasks = [asyncio.create_task(writer.create(swarm, f"a{i}")) for i in range(50)]
    await asyncio.sleep(0)  # queued, not written
    await writer.flush()
    assert all(t.done() and not t.cancelled() for t in tasks)
    assert await db.fetchval("SELECT count(*) FROM events") == 50
    tasks = [asyncio.create_task(writer.create(swarm, f"b{i}")) for i in range(70)]
    await asyncio.sleep(0)
    await writer.close()
    assert all(t.done() and t.exception() is None for t in tasks)
    assert await db.fetchval("SELECT count(*) FROM events") == 120
    with pytest.raises(DashStorageError):
        await writer.create(swarm, "late")
    await writer.close()  # idempotent
    await writer.flush()  # nothing to do


async def test_writer_cancelled_callers_lose_and_duplicate_nothing(db: Database, gate: CommitGate) -> None:
    swarm = await make_swarm(db)
    async with EventWriter(db, max_concurrency=1) as writer:
        async with gate.held():
            first = [asyncio.create_task(writer.create(swarm, f"first{i}")) for i in range(20)]
            await wait_until(gate.stalled, "the first batch waits at COMMIT")
            queued = [asyncio.create_task(writer.create(swarm, f"queued{i}")) for i in range(20)]
            await asyncio.sleep(0)  # queued behind the stalled batch (one write at a time)
            assert writer.pending == 40
            first[3].cancel()  # its batch is being written: it will be stored, unanswered
            for t in queued[::4]:
                t.cancel()  # still queued: dropped
        await asyncio.gather(*first, *queued, return_exceptions=True)
    stored = {r[0] for r in await db.fetch("SELECT type FROM events")}
    assert stored == {f"first{i}" for i in range(20)} | {f"queued{i}" for i in range(20) if i % 4}
    assert await db.fetchval("SELECT count(*) FROM events") == len(stored)
    for i, t in enumerate(first):
        assert t.cancelled() if i == 3 else t.result().type == f"first{i}"
    for i, t in enumerate(queued):
        assert t.cancelled() if i % 4 == 0 else t.result().type == f"queued{i}"


async def test_writer_retries_a_lost_answer_without_duplicates(db: Database, settings: Settings) -> None:
    swarm = await make_swarm(db)
    lossy = LostAnswerDatabase(settings)
    await lossy.initialize()
    try:
        async with EventWriter(lossy) as writer:
            created = await asyncio.gather(*(writer.create(swarm, f"t{i}") for i in range(150)))
    finally:
        await lossy.close()
    assert lossy.replays >= 1
    await assert_stored_once(db, created, [f"t{i}" for i in range(150)])


KILLS = sized(300, 3000)  # connections the server terminates while the writer works
# A kill every 15 ms, and a calm 150 ms after each 500 ms of killing: on a busy machine a batch (a
# fresh connection, then a COPY) may never fit between two kills, and the test then
# found nothing acknowledged to check.
KILL_EVERY, CALM = 0.015, (0.5, 0.15)


@pytest.mark.reliability
@pytest.mark.soak
@pytest.mark.direct_server("it kills the pooled connections' server processes mid-work")
async def test_writer_under_a_connection_kill_loop_stores_each_acknowledged_event_once(
    db: Database, settings: Settings, make_database: MakeDatabase
) -> None:
    swarm = await make_swarm(db)
    chaos = capped(await make_database(postgres_retry_attempts=10, postgres_retry_delay=20))
    attempted: list[uuid.UUID] = []
    acknowledged: set[uuid.UUID] = set()
    raised: set[uuid.UUID] = set()
    errors: list[BaseException] = []

    async def producer(writer: EventWriter, killed: list[int]) -> None:
        # Keep creating until the server has terminated enough connections (however fast or slow
        # this machine is), within a cap on the events tried.
        while killed[0] < KILLS and len(attempted) < 20_000:
            event_id = new_id()
            attempted.append(event_id)
            try:
                event = await writer.create(swarm, "chaos", id=event_id, payload={"id": str(event_id)})
            except Exception as exc:
                errors.append(exc)
                raised.add(event_id)
            else:
                assert event.id == event_id
                acknowledged.add(event_id)

    async with terminating_connections(settings, interval=KILL_EVERY, calm=CALM) as killed:
        async with EventWriter(chaos) as writer:
            await asyncio.gather(*(producer(writer, killed) for _ in range(64)))

    admin = await admin_connect(settings, TEST_DB)
    try:
        total, distinct = await admin.fetchrow("SELECT count(*), count(DISTINCT id) FROM events")
        stored = {r[0] for r in await admin.fetch("SELECT id FROM events")}
    finally:
        await admin.close()
    print(
        f"\n{killed[0]} terminated; {len(attempted)} tried, {len(acknowledged)} acked, {len(raised)} raised"
    )
    assert all(isinstance(e, DashStorageError) for e in errors), errors[:3]
    assert total == distinct == len(stored)
    assert acknowledged <= stored  # nothing acknowledged is lost
    assert stored <= acknowledged | raised  # nothing stored that nobody asked for
    assert killed[0] > 0
    assert acknowledged
    reliability.record(
        "connection faults",
        "EventWriter (64 producers, shared batches) while every pooled connection is terminated every "
        f"{KILL_EVERY * 1000:.0f} ms (calm for {CALM[1] * 1000:.0f} ms after each {CALM[0] * 1000:.0f} ms)",
        operations=len(attempted),
        succeeded=len(acknowledged),
        lost=len(acknowledged - stored),
        duplicated=total - distinct,
        raw_errors=sum(not isinstance(e, DashStorageError) for e in errors),
        notes=f"{killed[0]} connections terminated; a raised create may still be stored (lost answer)",
    )


COPY_BATCHES = sized(40, 400)


@pytest.mark.soak
@pytest.mark.direct_server("it kills the pooled connections' server processes mid-work")
async def test_copy_batches_with_generated_ids_under_a_connection_kill_loop_are_stored_once(
    db: Database, settings: Settings, make_database: MakeDatabase
) -> None:
    """create_many through COPY, ids left to the library (generated while the data is encoded),
    while the server terminates connections: a batch is stored whole or not at all, once."""
    swarm = await make_swarm(db)
    chaos = capped(await make_database(postgres_retry_attempts=10, postgres_retry_delay=20))
    repo = EventRepository(chaos)
    size = 2 * FIRST_CHUNK + 7  # sent in several pieces

    def job(n: int) -> Callable[[], Awaitable[list[Event]]]:
        return lambda: repo.create_many([{"swarm_id": swarm, "type": f"batch-{n}"} for _ in range(size)])

    async with terminating_connections(settings, interval=KILL_EVERY, calm=CALM) as killed:
        outcomes = await gather_outcomes([job(n) for n in range(COPY_BATCHES)], workers=4)

    rows = await db.fetch("SELECT type, count(*), count(DISTINCT id) FROM events GROUP BY type")
    stored = {r[0]: (r[1], r[2]) for r in rows}
    returned = raised = 0
    for n, outcome in outcomes:
        if isinstance(outcome, BaseException):
            assert isinstance(outcome, DashStorageError), repr(outcome)
            assert stored.get(f"batch-{n}", (0, 0)) in ((0, 0), (size, size))  # whole or nothing
            raised += 1
        else:
            returned += 1
            assert stored[f"batch-{n}"] == (size, size)
            assert [e.type for e in outcome] == [f"batch-{n}"] * size
            assert_same_events(await stored_events(db, [e.id for e in outcome]), outcome)
    assert killed[0] > 0 and returned
    assert all(total == distinct for total, distinct in stored.values())
    print(f"\n{killed[0]} terminated; {returned} batches returned, {raised} raised")


async def test_a_small_batch_keeps_every_optional_field_whether_set_in_some_rows_or_none(
    db: Database,
) -> None:
    swarm = await make_swarm(db)
    agent = await make_agent(db, swarm)
    repo = EventRepository(db)
    at = dt.datetime(2026, 5, 4, 3, 2, 1, 123456, tzinfo=UTC)
    sparse: list[dict[str, Any]] = [{"swarm_id": swarm, "type": f"s{i}"} for i in range(6)]
    sparse[2] |= {"agent_id": agent, "timestamp": at, "correlation_id": "c", "parent_event_id": new_id()}
    bare = [{"swarm_id": swarm, "type": f"b{i}"} for i in range(6)]
    for items in (sparse, bare):
        created = await repo.create_many(items)
        assert_same_events(await stored_events(db, [e.id for e in created]), created)
        for item, event in zip(items, created, strict=True):
            assert event.agent_id == item.get("agent_id")
            assert event.correlation_id == item.get("correlation_id")
            assert event.parent_event_id == item.get("parent_event_id")
            assert "timestamp" not in item or event.timestamp == at
    assert await db.fetchval("SELECT count(*) FROM events") == 12


class LookupLog(StatementHook):
    """A real Database that counts the look-ups of events by id that ingest sends."""

    lookups = 0

    async def statement(
        self, method: str, query: str, args: Sequence[Any], retry: bool, timeout: float | None
    ) -> Any:
        if query == event_ingest.SELECT_EVENTS_BY_IDS:
            self.lookups += 1
        return await super().statement(method, query, args, retry, timeout)


async def test_writer_looks_up_only_the_ids_its_callers_gave(db: Database, settings: Settings) -> None:
    # A look-up by id reads every partition; an id the writer generated is a new UUIDv7 that no
    # stored event has, so only ids given by callers are looked up (a given one may be stored
    # with another timestamp, which the key (id, timestamp) would not catch).
    swarm = await make_swarm(db)
    taken = await EventRepository(db).create(swarm, "taken")
    logged = LookupLog(settings)
    await logged.initialize()
    try:
        async with EventWriter(logged) as writer:
            created = await asyncio.gather(*(writer.create(swarm, f"t{i}") for i in range(100)))
            assert logged.lookups == 0
            with pytest.raises(ConflictError):
                await writer.create(swarm, "again", id=taken.id)
            assert logged.lookups == 1
    finally:
        await logged.close()
    assert len({e.id for e in created}) == 100
    assert await db.fetchval("SELECT count(*) FROM events") == 101

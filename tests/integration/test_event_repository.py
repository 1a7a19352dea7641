"""EventRepository against a real PostgreSQL: writes, batches, filters, cursor paging, stats, pruning."""

from __future__ import annotations

import base64
import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import pytest

from dash_storage.core.database import Database
from dash_storage.core.errors import ConflictError, NotFoundError, ValidationError
from dash_storage.core.models import Event, Severity
from dash_storage.repositories import event_partitions
from dash_storage.repositories.events import EventRepository
from tests.factories import make_agent, make_swarm

UTC = dt.UTC


async def event_count(db: Database) -> int:
    return int(await db.fetchval("SELECT count(*) FROM events"))


@pytest.fixture
def repo(db: Database) -> EventRepository:
    return EventRepository(db)


# -- create / find ----------------------------------------------------------------------------------


async def test_create_uses_defaults_and_database_clock(db: Database, repo: EventRepository) -> None:
    swarm = await make_swarm(db)
    db_now = await db.fetchval("SELECT now()")
    event = await repo.create(swarm, "swarm.started")
    assert event.swarm_id == swarm
    assert event.type == "swarm.started"
    assert event.payload == {}
    assert event.agent_id is None
    assert event.entity_type == "system"
    assert event.severity == "info"
    assert event.correlation_id is None and event.parent_event_id is None
    assert event.timestamp >= db_now
    assert event.id.version == 7
    assert await repo.find_by_id(event.id) == event
    assert await repo.find_by_id(str(event.id)) == event


async def test_an_event_is_never_stamped_before_a_statement_that_ran_first(
    db: Database, repo: EventRepository
) -> None:
    """Timestamps left out come from the library's estimate of the database clock (no round trip
    per write). It may run ahead of the server's clock, never behind: an event created after a
    statement is stamped no earlier than that statement's clock reading."""
    swarm = await make_swarm(db)
    for _ in range(300):
        before = await db.fetchval("SELECT clock_timestamp()")
        single = await repo.create(swarm, "after")
        batch = await repo.create_many([{"swarm_id": swarm, "type": "after"}] * 3)
        assert single.timestamp >= before
        assert all(e.timestamp >= before for e in batch)


async def test_the_clock_offset_is_measured_again_once_old(db: Database, repo: EventRepository) -> None:
    """Client and server clocks drift apart: an offset older than CLOCK_MAX_AGE is read again
    before the next stamp. Here the kept offset is made an hour wrong and old."""
    swarm = await make_swarm(db)
    await repo.create(swarm, "first")  # the partitions and the clock are read
    pmap = event_partitions._maps[db]
    for write in (
        lambda: repo.create(swarm, "after"),
        lambda: repo.create_many([{"swarm_id": swarm, "type": "after"}] * 10),
    ):
        pmap._clock_offset = -3600.0
        pmap._clock_read -= event_partitions.CLOCK_MAX_AGE + 1
        before = await db.fetchval("SELECT clock_timestamp()")
        written = await write()
        stamps = [e.timestamp for e in (written if isinstance(written, list) else [written])]
        assert min(stamps) >= before
        assert max(stamps) - before < dt.timedelta(seconds=5)


async def test_create_with_every_field(db: Database, repo: EventRepository) -> None:
    swarm = await make_swarm(db)
    agent = await make_agent(db, swarm)
    parent = await repo.create(swarm, "task.started", agent_id=agent)
    ts = dt.datetime(2025, 5, 1, 12, 30, 15, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    given = uuid.uuid4()
    payload = {"model": "kimi-k2.5", "tokens": [1, 2, 3], "nested": {"ok": True, "x": None}}
    event = await repo.create(
        str(swarm),
        "task.done",
        agent_id=str(agent),
        payload=payload,
        timestamp=ts,
        correlation_id="corr-1",
        parent_event_id=parent.id,
        entity_type="task",
        severity="warning",
        id=given,
    )
    assert event.id == given
    assert event.payload == payload
    assert event.timestamp == ts
    assert (event.correlation_id, event.parent_event_id) == ("corr-1", parent.id)
    assert (event.entity_type, event.severity, event.agent_id) == ("task", "warning", agent)
    assert await repo.find_by_id(given) == event


async def test_create_accepts_non_object_payload(db: Database, repo: EventRepository) -> None:
    swarm = await make_swarm(db)
    assert (await repo.create(swarm, "t", payload=[1, "two"])).payload == [1, "two"]
    assert (await repo.create(swarm, "t", payload="text")).payload == "text"
    assert (await repo.create(swarm, "t", payload=0)).payload == 0


async def test_find_by_id_missing_is_none(repo: EventRepository) -> None:
    assert await repo.find_by_id(uuid.uuid4()) is None


async def test_create_existing_id_is_conflict(db: Database, repo: EventRepository) -> None:
    """An event's key is (id, timestamp): the log is partitioned by time, and a unique key of a
    partitioned table must hold the partition column."""
    swarm = await make_swarm(db)
    first = await repo.create(swarm, "a")
    with pytest.raises(ConflictError):
        await repo.create(swarm, "b", id=first.id, timestamp=first.timestamp)
    assert await event_count(db) == 1
    assert (await repo.find_by_id(first.id)) == first


async def test_create_unknown_swarm_or_agent_is_not_found(db: Database, repo: EventRepository) -> None:
    swarm = await make_swarm(db)
    missing_swarm, missing_agent = uuid.uuid4(), uuid.uuid4()
    with pytest.raises(NotFoundError) as err:
        await repo.create(missing_swarm, "a")
    assert (err.value.entity, err.value.key) == ("swarm", missing_swarm)
    assert str(err.value) == f"swarm {missing_swarm} not found"
    with pytest.raises(NotFoundError) as err:
        await repo.create(swarm, "a", agent_id=missing_agent)
    assert (err.value.entity, err.value.key) == ("agent", missing_agent)
    assert str(err.value) == f"agent {missing_agent} not found"
    assert await event_count(db) == 0


@pytest.mark.parametrize("size", [10, 200], ids=["insert", "copy"])
async def test_create_many_names_the_missing_parent(db: Database, repo: EventRepository, size: int) -> None:
    """A batch that references a missing swarm or agent fails as a whole with NotFoundError naming
    the first missing parent in input order; nothing of it is written."""
    swarm = await make_swarm(db)
    agent = await make_agent(db, swarm)
    missing_swarm, missing_agent, later = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    items: list[dict[str, Any]] = [
        {"swarm_id": swarm, "type": f"n{i}", "agent_id": agent} for i in range(size)
    ]
    items[size // 2]["swarm_id"] = missing_swarm
    items[size - 1]["swarm_id"] = later
    with pytest.raises(NotFoundError) as err:
        await repo.create_many(items)
    assert (err.value.entity, err.value.key) == ("swarm", missing_swarm)
    assert str(err.value) == f"swarm {missing_swarm} not found"
    items = [{"swarm_id": swarm, "type": f"n{i}"} for i in range(size)]
    items[size - 2]["agent_id"] = missing_agent
    with pytest.raises(NotFoundError) as err:
        await repo.create_many(items)
    assert (err.value.entity, err.value.key) == ("agent", missing_agent)
    assert await event_count(db) == 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"swarm_id": "not-a-uuid"}, "swarm_id"),
        ({"swarm_id": None}, "swarm_id"),
        ({"type": ""}, "type"),
        ({"type": "   "}, "type"),
        ({"type": 5}, "type"),
        ({"type": "x" * 256}, "type"),
        ({"agent_id": "nope"}, "agent_id"),
        ({"payload": {"bad": float("nan")}}, "payload"),
        ({"payload": {1: "non-string key"}}, "payload"),
        ({"payload": {"s": "nul\x00"}}, "payload"),
        ({"payload": object()}, "payload"),
        ({"timestamp": dt.datetime(2025, 1, 1)}, "timestamp"),
        ({"timestamp": "2025-01-01"}, "timestamp"),
        ({"correlation_id": 12}, "correlation_id"),
        ({"parent_event_id": "x"}, "parent_event_id"),
        ({"entity_type": "robot"}, "entity_type"),
        ({"severity": "fatal"}, "severity"),
        ({"severity": None}, "severity"),
        ({"id": "123"}, "id"),
    ],
)
async def test_create_rejects_bad_input(
    db: Database, repo: EventRepository, kwargs: dict[str, Any], field: str
) -> None:
    swarm = await make_swarm(db)
    args: dict[str, Any] = {"swarm_id": swarm, "type": "ok", **kwargs}
    with pytest.raises(ValidationError) as info:
        await repo.create(args.pop("swarm_id"), args.pop("type"), **args)
    assert info.value.field == field
    assert await event_count(db) == 0


# -- create_many ------------------------------------------------------------------------------------


async def test_create_many_returns_events_in_input_order(db: Database, repo: EventRepository) -> None:
    swarm = await make_swarm(db)
    agent = await make_agent(db, swarm)
    base = dt.datetime(2025, 6, 1, tzinfo=UTC)
    given = [uuid.uuid4() for _ in range(60)]  # random (not time-ordered) ids: order must be input's
    items: list[dict[str, Any]] = []
    for i, event_id in enumerate(given):
        item: dict[str, Any] = {"swarm_id": swarm, "type": f"t{i % 3}", "id": event_id}
        if i % 2:
            item["agent_id"] = agent
            item["payload"] = {"i": i}
            item["severity"] = "error"
            item["entity_type"] = "agent"
        if i % 3 == 0:
            item["timestamp"] = base - dt.timedelta(seconds=i)  # decreasing: not the insert order
            item["correlation_id"] = f"c{i}"
        items.append(item)
    created = await repo.create_many(items)
    assert [e.id for e in created] == given
    for i, event in enumerate(created):
        assert event.type == f"t{i % 3}"
        assert event.payload == ({"i": i} if i % 2 else {})
        assert event.severity == ("error" if i % 2 else "info")
        assert event.agent_id == (agent if i % 2 else None)
        if i % 3 == 0:
            assert event.timestamp == base - dt.timedelta(seconds=i)
            assert event.correlation_id == f"c{i}"
        assert await repo.find_by_id(event.id) == event
    assert await event_count(db) == 60


async def test_create_many_generates_ids_and_accepts_any_iterable(
    db: Database, repo: EventRepository
) -> None:
    swarm = await make_swarm(db)
    created = await repo.create_many({"swarm_id": swarm, "type": "gen"} for _ in range(5))
    assert len({e.id for e in created}) == 5
    assert all(e.id.version == 7 for e in created)
    # Timestamps default to the database clock: one statement, one now().
    assert len({e.timestamp for e in created}) == 1


async def test_create_many_empty_batch_writes_nothing(db: Database, repo: EventRepository) -> None:
    assert await repo.create_many([]) == []
    assert await event_count(db) == 0


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"type": ""}, "events[3].type"),
        ({"severity": "loud"}, "events[3].severity"),
        ({"swarm_id": "x"}, "events[3].swarm_id"),
        ({"timestamp": dt.datetime(2025, 1, 1)}, "events[3].timestamp"),
        ({"payload": {"x": float("inf")}}, "events[3].payload"),
        ({"unknown": 1}, "events[3]"),
    ],
)
async def test_create_many_validates_everything_before_writing(
    db: Database, repo: EventRepository, bad: dict[str, Any], field: str
) -> None:
    swarm = await make_swarm(db)
    items: list[dict[str, Any]] = [{"swarm_id": swarm, "type": "ok"} for _ in range(6)]
    items[3] = {**items[3], **bad}
    with pytest.raises(ValidationError) as info:
        await repo.create_many(items)
    assert info.value.field == field
    assert await event_count(db) == 0


async def test_create_many_rejects_malformed_batches(db: Database, repo: EventRepository) -> None:
    swarm = await make_swarm(db)
    with pytest.raises(ValidationError) as info:
        await repo.create_many([{"swarm_id": swarm, "type": "a"}, {"swarm_id": swarm}])
    assert info.value.field == "events[1].type"
    with pytest.raises(ValidationError) as info:
        await repo.create_many([{"swarm_id": swarm, "type": "a"}, "not a mapping"])  # type: ignore[list-item]
    assert info.value.field == "events[1]"
    with pytest.raises(ValidationError) as info:
        await repo.create_many({"swarm_id": swarm, "type": "a"})  # type: ignore[arg-type]
    assert info.value.field == "events"
    same = uuid.uuid4()
    with pytest.raises(ValidationError) as info:
        await repo.create_many(
            [
                {"swarm_id": swarm, "type": "a", "id": same},
                {"swarm_id": swarm, "type": "b"},
                {"swarm_id": swarm, "type": "c", "id": str(same)},
            ]
        )
    assert info.value.field == "events[2].id"
    with pytest.raises(ValidationError) as info:
        await repo.create_many({"swarm_id": swarm, "type": "a"} for _ in range(10_001))
    assert info.value.field == "events"
    assert await event_count(db) == 0


async def test_create_many_is_all_or_nothing_in_the_database(db: Database, repo: EventRepository) -> None:
    swarm = await make_swarm(db)
    existing = await repo.create(swarm, "old")
    items: list[dict[str, Any]] = [{"swarm_id": swarm, "type": f"n{i}"} for i in range(10)]
    items[5]["id"] = existing.id  # conflicts only in the database
    with pytest.raises(ConflictError):
        await repo.create_many(items)
    assert await event_count(db) == 1
    items = [{"swarm_id": swarm, "type": f"n{i}"} for i in range(10)]
    items[7]["swarm_id"] = uuid.uuid4()  # unknown swarm: foreign key
    with pytest.raises(NotFoundError):
        await repo.create_many(items)
    assert await event_count(db) == 1


# -- filters ----------------------------------------------------------------------------------------


async def _fixture_log(db: Database, repo: EventRepository) -> dict[str, Any]:
    s1, s2 = await make_swarm(db, "one"), await make_swarm(db, "two")
    a1, a2 = await make_agent(db, s1), await make_agent(db, s1)
    t0 = dt.datetime(2025, 3, 1, tzinfo=UTC)
    items: list[dict[str, Any]] = []
    for i in range(40):
        items.append(
            {
                "swarm_id": s1 if i % 4 else s2,
                "agent_id": (a1 if i % 2 else a2) if i % 4 else None,
                "type": ("agent.spawned", "agent.completed", "task.progress")[i % 3],
                "timestamp": t0 + dt.timedelta(minutes=i),
                "entity_type": "agent" if i % 4 else "system",
                "severity": ("debug", "info", "warning", "error", "critical")[i % 5],
            }
        )
    created = await repo.create_many(items)
    return {"s1": s1, "s2": s2, "a1": a1, "a2": a2, "t0": t0, "events": created}


def _key(e: Event) -> tuple[dt.datetime, uuid.UUID]:
    return (e.timestamp, e.id)


async def test_find_by_filter_combines_filters(db: Database, repo: EventRepository) -> None:
    log = await _fixture_log(db, repo)
    events: list[Event] = log["events"]
    t0: dt.datetime = log["t0"]

    def expect(pred: Any) -> list[Event]:
        return sorted((e for e in events if pred(e)), key=_key)

    cases: list[tuple[dict[str, Any], Any]] = [
        ({}, lambda e: True),
        ({"swarm_id": log["s1"]}, lambda e: e.swarm_id == log["s1"]),
        ({"agent_id": log["a1"]}, lambda e: e.agent_id == log["a1"]),
        ({"types": ["agent.spawned", "task.progress"]}, lambda e: e.type != "agent.completed"),
        ({"entity_type": "system"}, lambda e: e.entity_type == "system"),
        ({"severity": "error"}, lambda e: e.severity == "error"),
        (
            {"since": t0 + dt.timedelta(minutes=10), "until": t0 + dt.timedelta(minutes=20)},
            lambda e: t0 + dt.timedelta(minutes=10) <= e.timestamp < t0 + dt.timedelta(minutes=20),
        ),
        (
            {"swarm_id": log["s1"], "types": ["agent.completed"], "severity": "info"},
            lambda e: e.swarm_id == log["s1"] and e.type == "agent.completed" and e.severity == "info",
        ),
        ({"swarm_id": log["s2"], "agent_id": log["a1"]}, lambda e: False),
    ]
    for filters, pred in cases:
        expected = expect(pred)
        assert await repo.find_by_filter(**filters) == expected, filters
        assert await repo.count(**filters) == len(expected), filters
        desc = await repo.find_by_filter(**filters, order="desc")
        assert desc == list(reversed(expected)), filters
    assert await repo.find_by_filter(limit=5) == expect(lambda e: True)[:5]
    assert await repo.find_by_filter(types=[]) == []
    assert await repo.count(types=[]) == 0


async def test_find_by_agent_and_swarm_newest_first(db: Database, repo: EventRepository) -> None:
    log = await _fixture_log(db, repo)
    events: list[Event] = log["events"]
    t0: dt.datetime = log["t0"]
    by_agent = sorted((e for e in events if e.agent_id == log["a1"]), key=_key, reverse=True)
    assert await repo.find_by_agent_id(log["a1"]) == by_agent
    assert await repo.find_by_agent_id(log["a1"], limit=2) == by_agent[:2]
    since = t0 + dt.timedelta(minutes=25)
    assert await repo.find_by_agent_id(log["a1"], since=since) == [
        e for e in by_agent if e.timestamp >= since
    ]
    by_swarm = sorted((e for e in events if e.swarm_id == log["s2"]), key=_key, reverse=True)
    assert await repo.find_by_swarm_id(log["s2"]) == by_swarm
    assert (
        await repo.find_by_swarm_id(log["s2"], 3, since) == [e for e in by_swarm if e.timestamp >= since][:3]
    )
    assert await repo.find_by_agent_id(uuid.uuid4()) == []


async def test_get_timeline_is_ascending_within_window(db: Database, repo: EventRepository) -> None:
    log = await _fixture_log(db, repo)
    events: list[Event] = log["events"]
    t0: dt.datetime = log["t0"]
    ours = sorted((e for e in events if e.swarm_id == log["s1"]), key=_key)
    assert await repo.get_timeline(log["s1"]) == ours
    lo, hi = t0 + dt.timedelta(minutes=5), t0 + dt.timedelta(minutes=15)
    assert await repo.get_timeline(log["s1"], since=lo, until=hi) == [
        e for e in ours if lo <= e.timestamp < hi
    ]
    assert await repo.get_timeline(log["s1"], limit=4) == ours[:4]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 10_001}, "limit"),
        ({"limit": "10"}, "limit"),
        ({"order": "sideways"}, "order"),
        ({"types": "agent.spawned"}, "types"),
        ({"types": ["ok", ""]}, "types"),
        ({"severity": "loud"}, "severity"),
        ({"entity_type": "robot"}, "entity_type"),
        ({"since": dt.datetime(2025, 1, 1)}, "since"),
        ({"until": "yesterday"}, "until"),
        ({"swarm_id": "x"}, "swarm_id"),
        ({"agent_id": 5}, "agent_id"),
    ],
)
async def test_find_by_filter_rejects_bad_input(
    repo: EventRepository, kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError) as info:
        await repo.find_by_filter(**kwargs)
    assert info.value.field == field


# -- cursor paging ----------------------------------------------------------------------------------


async def _page_all(repo: EventRepository, size: int, **filters: Any) -> list[Event]:
    seen: list[Event] = []
    after: str | None = None
    while True:
        page = await repo.find_by_filter(**filters, limit=size, after=after)
        seen.extend(page)
        if len(page) < size:
            return seen
        after = EventRepository.cursor(page[-1])


async def test_cursor_paging_with_identical_timestamps_is_complete(
    db: Database, repo: EventRepository
) -> None:
    swarm = await make_swarm(db)
    other = await make_swarm(db)
    same = dt.datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
    created = await repo.create_many(
        [{"swarm_id": swarm, "type": "tick", "timestamp": same, "id": uuid.uuid4()} for _ in range(1000)]
    )
    await repo.create_many([{"swarm_id": other, "type": "tick", "timestamp": same} for _ in range(10)])
    expected = sorted(created, key=_key)

    pages = await _page_all(repo, 37, swarm_id=swarm)
    assert [e.id for e in pages] == [e.id for e in expected]
    assert len({e.id for e in pages}) == 1000

    desc: list[Event] = []
    after: str | None = None
    while True:
        page = await repo.find_by_filter(swarm_id=swarm, limit=64, after=after, order="desc")
        desc.extend(page)
        if len(page) < 64:
            break
        after = EventRepository.cursor(page[-1])
    assert [e.id for e in desc] == [e.id for e in reversed(expected)]

    # Without a swarm filter (the global (timestamp, id) index), the other swarm's rows interleave.
    everything = await _page_all(repo, 101)
    assert len(everything) == 1010
    assert len({e.id for e in everything}) == 1010
    assert [_key(e) for e in everything] == sorted(_key(e) for e in everything)


async def test_cursor_paging_is_stable_while_appending(db: Database, repo: EventRepository) -> None:
    swarm = await make_swarm(db)
    t0 = dt.datetime(2025, 1, 1, tzinfo=UTC)
    await repo.create_many(
        [{"swarm_id": swarm, "type": "a", "timestamp": t0 + dt.timedelta(seconds=i)} for i in range(30)]
    )
    first = await repo.find_by_filter(swarm_id=swarm, limit=10)
    # Rows appended before the cursor position never show up on later pages; rows after it do.
    await repo.create(swarm, "early", timestamp=t0 - dt.timedelta(days=1))
    late = await repo.create(swarm, "late", timestamp=t0 + dt.timedelta(days=1))
    rest = await repo.find_by_filter(swarm_id=swarm, limit=100, after=EventRepository.cursor(first[-1]))
    assert len(rest) == 21
    assert rest[-1] == late
    assert not {e.id for e in first} & {e.id for e in rest}


async def test_cursor_round_trips_and_rejects_garbage(db: Database, repo: EventRepository) -> None:
    swarm = await make_swarm(db)
    event = await repo.create(swarm, "x", timestamp=dt.datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC))
    cursor = EventRepository.cursor(event)
    assert isinstance(cursor, str) and cursor.isascii()
    assert await repo.find_by_filter(after=cursor) == []
    assert await repo.find_by_filter(after=cursor, order="desc") == []
    raw = base64.urlsafe_b64decode(cursor + "==")
    wrong_version = base64.urlsafe_b64encode(b"\x02" + raw[1:]).rstrip(b"=").decode()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    # The last character carries 2 data bits and 4 zero bits: setting a zero bit decodes to the
    # same bytes but is not what cursor() produces.
    non_canonical = cursor[:-1] + alphabet[alphabet.index(cursor[-1]) | 1]
    huge = base64.urlsafe_b64encode(b"\x01" + (2**63 - 1).to_bytes(8, "big") + raw[9:]).rstrip(b"=").decode()
    for garbage in (
        "",
        "garbage",
        cursor + "A",
        cursor[:-1],
        cursor[:-1] + "=",
        cursor.replace(cursor[5], "+" if cursor[5] != "+" else "/"),
        wrong_version,
        non_canonical,
        huge,
        123,
        b"bytes",
    ):
        with pytest.raises(ValidationError) as info:
            await repo.find_by_filter(after=garbage)  # type: ignore[arg-type]
        assert info.value.field == "after", garbage


# -- stats ------------------------------------------------------------------------------------------


async def test_get_stats_empty_is_zero_filled(repo: EventRepository) -> None:
    stats = await repo.get_stats()
    assert stats.hours == 24
    assert stats.total == 0
    assert stats.by_type == {}
    assert stats.by_severity == {s.value: 0 for s in Severity}
    assert await repo.get_stats_24h() == []


async def test_get_stats_counts_the_window_by_database_clock(db: Database, repo: EventRepository) -> None:
    swarm = await make_swarm(db)
    agent = await make_agent(db, swarm)
    now = await db.fetchval("SELECT now()")
    await repo.create_many(
        [
            {"swarm_id": swarm, "type": "a", "severity": "error", "agent_id": agent},
            {"swarm_id": swarm, "type": "a", "severity": "error"},
            {"swarm_id": swarm, "type": "b", "severity": "debug", "agent_id": agent},
            {"swarm_id": swarm, "type": "c", "timestamp": now - dt.timedelta(hours=30)},
        ]
    )
    stats = await repo.get_stats(24)
    assert stats.total == 3
    assert stats.by_type == {"a": 2, "b": 1}
    assert stats.by_severity == {"debug": 1, "info": 0, "warning": 0, "error": 2, "critical": 0}
    wide = await repo.get_stats(hours=48.5)
    assert wide.hours == 48.5
    assert wide.total == 4
    assert wide.by_type == {"a": 2, "b": 1, "c": 1}
    assert wide.by_severity["info"] == 1
    assert sum(wide.by_type.values()) == sum(wide.by_severity.values()) == wide.total
    assert (await repo.get_stats(Decimal("0.001"))).total <= 3

    view = await repo.get_stats_24h()
    assert [(r.event_type, r.event_count, r.unique_agents, r.unique_swarms) for r in view] == [
        ("a", 2, 1, 1),
        ("b", 1, 1, 1),
    ]
    assert all(r.first_event <= r.last_event for r in view)


@pytest.mark.parametrize("hours", [-1, float("nan"), float("inf"), "24", True, None, 10**9])
async def test_get_stats_rejects_bad_hours(repo: EventRepository, hours: Any) -> None:
    with pytest.raises(ValidationError) as info:
        await repo.get_stats(hours)
    assert info.value.field == "hours"


# -- delete_older_than ------------------------------------------------------------------------------


async def test_delete_older_than_deletes_in_batches(db: Database, repo: EventRepository) -> None:
    swarm = await make_swarm(db)
    now = await db.fetchval("SELECT now()")
    old = await repo.create_many(
        [
            {"swarm_id": swarm, "type": "old", "timestamp": now - dt.timedelta(days=2, minutes=i % 5)}
            for i in range(50)
        ]
    )
    new = await repo.create_many([{"swarm_id": swarm, "type": "new"} for _ in range(10)])
    assert await repo.delete_older_than(24, batch_size=7) == 50
    remaining = {r[0] for r in await db.fetch("SELECT id FROM events")}
    assert remaining == {e.id for e in new}
    assert not remaining & {e.id for e in old}
    assert await repo.delete_older_than(24, batch_size=7) == 0


async def test_delete_older_than_drops_only_whole_partitions(db: Database, repo: EventRepository) -> None:
    """Events go a whole (day-long) partition at a time: a partition only partly before the cutoff
    stays until it lies wholly before it."""
    swarm = await make_swarm(db)
    t0 = dt.datetime(2025, 1, 1, tzinfo=UTC)
    await repo.create_many(
        [{"swarm_id": swarm, "type": "x", "timestamp": t0 + dt.timedelta(hours=i)} for i in range(48)]
    )
    assert await repo.delete_older_than(t0 + dt.timedelta(hours=30), batch_size=10) == 24
    left = await repo.find_by_filter(swarm_id=swarm)
    assert [e.timestamp for e in left] == [t0 + dt.timedelta(hours=i) for i in range(24, 48)]
    names = {r[0] for r in await db.fetch("SELECT name FROM event_partitions")}
    assert "events_p20250101_0000" not in names and "events_p20250102_0000" in names
    assert await repo.delete_older_than(t0 + dt.timedelta(hours=47)) == 0
    assert await repo.delete_older_than(t0 + dt.timedelta(hours=48)) == 24
    assert await event_count(db) == 0


@pytest.mark.parametrize(
    ("cutoff", "batch_size", "field"),
    [
        (dt.datetime(2025, 1, 1), 10, "cutoff"),
        (-5, 10, "cutoff"),
        ("24", 10, "cutoff"),
        (float("nan"), 10, "cutoff"),
        (24, 0, "batch_size"),
        (24, 100_001, "batch_size"),
    ],
)
async def test_delete_older_than_rejects_bad_input(
    db: Database, repo: EventRepository, cutoff: Any, batch_size: Any, field: str
) -> None:
    swarm = await make_swarm(db)
    await repo.create(swarm, "x", timestamp=dt.datetime(2000, 1, 1, tzinfo=UTC))
    with pytest.raises(ValidationError) as info:
        await repo.delete_older_than(cutoff, batch_size=batch_size)
    assert info.value.field == field
    assert await event_count(db) == 1

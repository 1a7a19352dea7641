"""``SQLiteStorage``: the old Dash store, read and written in its exact old format."""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bench.legacy_factory import build_legacy_file
from dash_storage.core.errors import ConflictError, DashStorageError, ValidationError
from dash_storage.legacy import SQLiteStorage
from dash_storage.legacy.sqlite import AGENT_COLUMNS, EVENT_COLUMNS, SWARM_COLUMNS


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStorage]:
    s = SQLiteStorage(db_path=tmp_path / "dash.db")
    await s.initialize()
    try:
        yield s
    finally:
        await s.close()


def raw(path: Path, sql: str, *params: object) -> list[tuple[object, ...]]:
    con = sqlite3.connect(path)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


async def test_initialize_creates_the_old_tables_in_wal_mode(store: SQLiteStorage) -> None:
    path = store.db_path
    for table, columns in (("swarms", SWARM_COLUMNS), ("agents", AGENT_COLUMNS), ("events", EVENT_COLUMNS)):
        info = raw(path, f"SELECT name, type, \"notnull\", pk FROM pragma_table_info('{table}')")
        assert tuple(r[0] for r in info) == columns
        assert {r[0]: r[1] for r in info}["id"] == "TEXT"
        assert {r[0] for r in info if r[3]} == {"id"}
    types = {r[0]: r[1] for r in raw(path, "SELECT name, type FROM pragma_table_info('swarms')")}
    assert types["budget_allocated"] == "REAL" and types["config"] == "TEXT" and types["created_at"] == "TEXT"
    assert raw(path, "PRAGMA journal_mode")[0][0] == "wal"
    # initialize() on an existing file keeps its data.
    await store.create_swarm(name="kept")
    again = SQLiteStorage(db_path=path)
    await again.initialize()
    await again.initialize()  # idempotent
    try:
        assert [s["name"] for s in await again.get_all_swarms()] == ["kept"]
    finally:
        await again.close()


async def test_swarm_round_trip_in_the_old_format(store: SQLiteStorage) -> None:
    created = await store.create_swarm(
        {"id": "swarm-1738000000-ab12cd", "name": "群れ 🐝", "status": "running"},
        config={"max_agents": 10, "note": "naïve"},
        agents=["agent-1", "agent-2"],
        budget={"allocated": 100.0, "consumed": 12.5, "remaining": 87.5},
        metrics={"tokens": 42},
        created_at=dt.datetime(2025, 1, 27, 12, 0, 0, 123456, tzinfo=dt.UTC),
    )
    assert created == {
        "id": "swarm-1738000000-ab12cd",
        "name": "群れ 🐝",
        "status": "running",
        "config": {"max_agents": 10, "note": "naïve"},
        "agents": ["agent-1", "agent-2"],
        "created_at": "2025-01-27T12:00:00.123Z",
        "completed_at": None,
        "budget_allocated": 100.0,
        "budget_consumed": 12.5,
        "budget_remaining": 87.5,
        "metrics": {"tokens": 42},
    }
    assert await store.get_swarm("swarm-1738000000-ab12cd") == created
    assert await store.get_swarm("nope") is None
    # Stored as the old code stored it: JSON text, ISO text, REAL money.
    row = raw(
        store.db_path,
        "SELECT typeof(config), config, typeof(created_at), typeof(budget_allocated) FROM swarms",
    )[0]
    assert row == ("text", '{"max_agents":10,"note":"naïve"}', "text", "real")


async def test_create_swarm_defaults_and_ordering(store: SQLiteStorage) -> None:
    first = await store.create_swarm(name="a", created_at="2025-01-01T00:00:00.000Z")
    second = await store.create_swarm(name="b", created_at="2025-02-01T00:00:00.000Z")
    assert first["id"].startswith("swarm-") and first["id"] != second["id"]
    assert first["status"] == "creating" and first["config"] == {} and first["agents"] == []
    assert first["budget_allocated"] is None
    assert [s["name"] for s in await store.get_all_swarms()] == ["b", "a"]  # newest first
    fresh = await store.create_swarm(name="now")
    assert dt.datetime.fromisoformat(fresh["created_at"]).year >= 2025


async def test_agent_round_trip(store: SQLiteStorage) -> None:
    await store.create_swarm(id="s1", name="s")
    agent = await store.create_agent(
        id="agent-1",
        swarm_id="s1",
        label="エージェント 🤖",
        model="kimi-k2.5",
        task="Build feature",
        status="spawning",
        child_ids=["agent-2"],
        context={"contextWindow": 100000},
        max_retries=0,
        budget_limit=2.5,
        metadata={"tags": ["x"]},
    )
    assert agent["label"] == "エージェント 🤖"
    assert agent["child_ids"] == ["agent-2"]
    assert agent["context"] == {"contextWindow": 100000}
    assert agent["code"] is None and agent["reasoning"] is None
    assert agent["max_retries"] == 0  # zero is kept (the old reader turned it into 3)
    assert agent["retry_count"] == 0 and agent["runtime"] == 0
    assert agent["budget_limit"] == 2.5
    assert await store.get_agent("agent-1") == agent
    assert await store.get_agent("missing") is None
    await store.create_agent(
        id="agent-0", swarm_id="s1", model="m", task="t", spawned_at="2024-01-01T00:00:00Z"
    )
    await store.create_agent(id="other", swarm_id="s2", model="m", task="t")
    assert [a["id"] for a in await store.get_agents_by_swarm("s1")] == ["agent-0", "agent-1"]
    assert await store.get_agents_by_swarm("none") == []


async def test_events_round_trip_newest_first_with_limit(store: SQLiteStorage) -> None:
    for i in range(5):
        await store.store_event(
            id=f"evt-{i}",
            event_type="agent.status_changed",
            timestamp=f"2025-01-27T12:00:0{i}.000Z",
            source={"type": "agent", "id": "a1"},
            payload={"i": i, "msg": "処理中"},
            agent_id="a1" if i % 2 == 0 else None,
            swarm_id="s1",
        )
    by_swarm = await store.get_events_by_swarm("s1")
    assert [e["id"] for e in by_swarm] == ["evt-4", "evt-3", "evt-2", "evt-1", "evt-0"]
    assert by_swarm[0]["payload"] == {"i": 4, "msg": "処理中"}
    assert by_swarm[0]["source"] == {"type": "agent", "id": "a1"}
    assert [e["id"] for e in await store.get_events_by_swarm("s1", limit=2)] == ["evt-4", "evt-3"]
    assert [e["id"] for e in await store.get_events_by_agent("a1")] == ["evt-4", "evt-2", "evt-0"]
    bare = await store.store_event(event_type="system.heartbeat")
    assert bare["id"].startswith("evt-") and bare["payload"] is None and bare["source"] is None


async def test_bad_json_in_a_row_is_returned_raw(store: SQLiteStorage) -> None:
    path = store.db_path
    con = sqlite3.connect(path)
    with con:
        con.execute(
            "INSERT INTO swarms (id, name, status, config, agents, created_at, metrics) "
            "VALUES ('s', 'n', 'idle', '{broken', '[\"a\"', 'yesterday', NULL)"
        )
        con.execute(
            "INSERT INTO events (id, timestamp, event_type, source, payload, swarm_id) "
            "VALUES ('e', 'x', 't', 'nope', '{\"ok\": true}', 's')"
        )
    con.close()
    swarm = await store.get_swarm("s")
    assert swarm is not None
    assert swarm["config"] == "{broken" and swarm["agents"] == '["a"' and swarm["metrics"] is None
    assert swarm["created_at"] == "yesterday"
    (event,) = await store.get_events_by_swarm("s")
    assert event["source"] == "nope" and event["payload"] == {"ok": True}


async def test_reads_a_realistic_legacy_file(tmp_path: Path) -> None:
    manifest = build_legacy_file(tmp_path / "dash.db", swarms=12, agents=40, events=400)
    async with SQLiteStorage(db_path=manifest.path) as store:
        swarms = await store.get_all_swarms()
        assert len(swarms) == 13  # 12 + one without id
        bad = manifest.special["swarm_bad_config"][0]
        found = await store.get_swarm(bad)
        assert found is not None and found["config"] == "{max_agents: 10"
        agents = await store.get_agents_by_swarm(manifest.swarm_ids[0])
        assert agents and all(a["swarm_id"] == manifest.swarm_ids[0] for a in agents)


async def test_bad_input_is_rejected_naming_the_field(store: SQLiteStorage) -> None:
    with pytest.raises(ValidationError) as info:
        await store.create_swarm(name="x", colour="red")
    assert info.value.field == "colour"
    with pytest.raises(ValidationError) as info:
        await store.create_swarm(status="running")
    assert info.value.field == "name"
    with pytest.raises(ValidationError) as info:
        await store.create_agent(swarm_id="s", task="t")
    assert info.value.field == "model"
    with pytest.raises(ValidationError) as info:
        await store.create_agent(model="m", task="t", runtime="long")
    assert info.value.field == "runtime"
    with pytest.raises(ValidationError) as info:
        await store.store_event(payload={})
    assert info.value.field == "event_type"
    with pytest.raises(ValidationError) as info:
        await store.store_event(event_type="t", payload={"x": object()})
    assert info.value.field == "payload"
    with pytest.raises(ValidationError) as info:
        await store.get_events_by_swarm("s", limit=0)
    assert info.value.field == "limit"
    with pytest.raises(ValidationError) as info:
        await store.get_swarm("")
    assert info.value.field == "swarm_id"
    assert await store.get_all_swarms() == []  # nothing was written


async def test_duplicate_id_is_a_conflict(store: SQLiteStorage) -> None:
    await store.create_swarm(id="dup", name="one")
    with pytest.raises(ConflictError):
        await store.create_swarm(id="dup", name="two")
    found = await store.get_swarm("dup")
    assert found is not None and found["name"] == "one"


async def test_values_are_parameters_not_sql(store: SQLiteStorage) -> None:
    nasty = "x'); DROP TABLE swarms; --"
    await store.create_swarm(id=nasty, name=nasty)
    found = await store.get_swarm(nasty)
    assert found is not None and found["name"] == nasty
    assert len(await store.get_all_swarms()) == 1


async def test_use_before_initialize_and_double_close(tmp_path: Path) -> None:
    s = SQLiteStorage(db_path=tmp_path / "x.db")
    with pytest.raises(DashStorageError, match="initialize"):
        await s.get_swarm("a")
    await s.close()
    await s.initialize()
    await s.close()
    await s.close()
    assert "closed" in repr(s)


async def test_calls_do_not_block_the_event_loop(store: SQLiteStorage) -> None:
    """Every call runs on aiosqlite's thread: other coroutines keep running while it works."""
    await store.create_swarm(id="s", name="s")
    ticks = 0
    running = True

    async def ticker() -> None:
        nonlocal ticks
        while running:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    try:
        for i in range(200):
            await store.store_event(id=f"e{i}", event_type="t", swarm_id="s", payload={"i": i})
        events = await store.get_events_by_swarm("s", limit=1000)
    finally:
        running = False
        await task
    assert len(events) == 200
    # A blocking implementation never yields inside these awaits, so the ticker would not run.
    assert ticks > 0

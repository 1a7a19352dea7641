"""``import_sqlite`` and ``dash-db import-sqlite``: a realistic legacy file into a real PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil
import sqlite3
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
import typer
from typer.testing import CliRunner

from bench.legacy_factory import LegacyManifest, build_legacy_file
from dash_storage.core.database import Database
from dash_storage.core.errors import ValidationError
from dash_storage.legacy import LEGACY_NAMESPACE, ImportReport, SQLiteStorage, import_sqlite, legacy_uuid
from dash_storage.legacy.mapping import (
    AGENT_STATUS_MAP,
    SWARM_STATUS_MAP,
    budget_uuid,
    map_agent_status,
    map_swarm_status,
)
from dash_storage.legacy.report import default_report_path

TABLES = ("swarms", "budgets", "agents", "events")
UNREADABLE_TIME = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def legacy_master(tmp_path_factory: pytest.TempPathFactory) -> LegacyManifest:
    """One realistic legacy file (20 swarms, 500 agents, 5,000 events, every kind of anomaly)."""
    return build_legacy_file(tmp_path_factory.mktemp("legacy") / "dash.db")


@pytest.fixture
def legacy(legacy_master: LegacyManifest, tmp_path: Path) -> LegacyManifest:
    """A private copy of the master file (the report is written next to it)."""
    path = tmp_path / "dash.db"
    shutil.copyfile(legacy_master.path, path)
    copy = LegacyManifest(**{**legacy_master.__dict__, "path": path})
    return copy


async def row_counts(db: Database) -> dict[str, int]:
    return {t: await db.fetchval(f"SELECT count(*) FROM {t}") for t in TABLES}


def counts(report: ImportReport) -> dict[str, dict[str, int]]:
    return {t: {k: v for k, v in c.as_dict().items() if k != "skipped"} for t, c in report.tables.items()}


def report_lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def write_raw(path: Path, *statements: str | tuple[str, tuple[Any, ...]]) -> None:
    """Write straight into the legacy file what the old store's API would refuse (wrong types, bad
    bytes, other tables): each statement is SQL text, or (SQL text, parameters)."""
    con = sqlite3.connect(path)
    with con:
        for statement in statements:
            sql, params = (statement, ()) if isinstance(statement, str) else statement
            con.execute(sql, params)
    con.close()


# -- ids ---------------------------------------------------------------------------------------------


def test_legacy_ids_map_to_fixed_uuid5_values() -> None:
    # These literals pin the namespace: changing it would make a re-import duplicate everything.
    assert str(LEGACY_NAMESPACE) == "b2970b88-b228-4032-b6d6-06af2462ec82"
    assert str(legacy_uuid("swarms", "swarm-1738000000-ab12cd")) == "2c6d884d-0ca4-5c6d-b9e8-ea31b10f7126"
    assert legacy_uuid("swarms", "swarm-1738000000-ab12cd") == uuid.uuid5(
        LEGACY_NAMESPACE, "swarms:swarm-1738000000-ab12cd"
    )
    # The table is part of the key; the same string in two tables gives two ids.
    assert legacy_uuid("agents", "x") != legacy_uuid("events", "x")
    assert budget_uuid("s") == uuid.uuid5(LEGACY_NAMESPACE, "budget:s")
    # An id that already is a UUID is kept (any spelling uuid.UUID accepts).
    u = "550E8400-E29B-41D4-A716-446655440000"
    assert legacy_uuid("swarms", u) == uuid.UUID(u)
    assert legacy_uuid("events", "{" + u + "}") == uuid.UUID(u)
    assert legacy_uuid("events", "not-a-uuid-but-exactly-36-characters") == uuid.uuid5(
        LEGACY_NAMESPACE, "events:not-a-uuid-but-exactly-36-characters"
    )
    assert legacy_uuid("events", "エージェント") == uuid.uuid5(LEGACY_NAMESPACE, "events:エージェント")


def test_status_maps() -> None:
    assert map_swarm_status("running") == "active"
    assert map_swarm_status(" Running ") == "active"
    assert map_swarm_status("idle") == "paused"
    assert map_swarm_status("starting") == "creating"
    assert map_swarm_status("done") == "completed"
    assert map_swarm_status("error") == "failed"
    assert map_swarm_status("killed") == "destroyed"
    assert map_swarm_status("hibernating") == "paused"  # unknown: the conservative default
    assert map_swarm_status(None) == "paused"
    assert map_agent_status("idle") == ("pending", "initializing")
    assert map_agent_status("spawning") == ("pending", "spawning")
    assert map_agent_status("killing") == ("killed", "cleaning_up")
    assert map_agent_status("waiting") == ("blocked", "paused")
    assert map_agent_status("zombie") == ("blocked", "paused")
    assert map_agent_status(3) == ("blocked", "paused")
    # Every value of the new sets maps to itself.
    for status in ("creating", "active", "scaling", "paused", "completed", "failed", "destroyed"):
        assert SWARM_STATUS_MAP[status] == status
    for status in ("pending", "running", "paused", "completed", "failed", "blocked", "killed"):
        assert AGENT_STATUS_MAP[status][0] == status


# -- a full import --------------------------------------------------------------------------------------


async def test_first_import_matches_the_manifest(db: Database, legacy: LegacyManifest) -> None:
    report = await import_sqlite(db, legacy.path)
    got = counts(report)
    for table in TABLES:
        assert got[table] == {**legacy.expected[table], "already_present": 0}, table
    assert await row_counts(db) == {t: legacy.expected[t]["written"] for t in TABLES}
    assert report.report_path == str(default_report_path(legacy.path))
    assert report.to_dict()["rejects_total"] == sum(len(v) for v in legacy.rejected.values())


async def test_second_import_changes_nothing(db: Database, legacy: LegacyManifest) -> None:
    first = await import_sqlite(db, legacy.path)
    before = await row_counts(db)
    fingerprint = await db.fetchval(
        "SELECT md5(string_agg(id::text || payload::text || swarm_id::text || coalesce(agent_id::text, '')"
        " || timestamp::text, ',' ORDER BY id)) FROM events"
    )
    second = await import_sqlite(db, legacy.path, batch_size=333)
    for table in TABLES:
        a, b = first.tables[table], second.tables[table]
        assert b.written == 0, table
        assert b.already_present == a.written, table
        assert (b.read, b.repaired, b.rejected) == (a.read, a.repaired, a.rejected), table
    assert second.status_mappings == first.status_mappings
    assert await row_counts(db) == before
    assert (
        await db.fetchval(
            "SELECT md5(string_agg(id::text || payload::text || swarm_id::text"
            " || coalesce(agent_id::text, '')"
            " || timestamp::text, ',' ORDER BY id)) FROM events"
        )
        == fingerprint
    )


async def test_every_legacy_event_appears_exactly_once(db: Database, legacy: LegacyManifest) -> None:
    await import_sqlite(db, legacy.path)
    await import_sqlite(db, legacy.path, batch_size=777)
    expected = [legacy_uuid("events", e) for e in legacy.event_ids]
    assert len(set(expected)) == len(expected)
    found = await db.fetchval("SELECT count(*) FROM events WHERE id = ANY($1::uuid[])", expected)
    assert found == len(expected)
    assert await db.fetchval("SELECT count(*) FROM events") == len(expected)
    rejected = [legacy_uuid("events", e) for e in legacy.rejected["events"] if e is not None]
    assert await db.fetchval("SELECT count(*) FROM events WHERE id = ANY($1::uuid[])", rejected) == 0


async def test_ids_and_references_are_deterministic(db: Database, legacy: LegacyManifest) -> None:
    await import_sqlite(db, legacy.path)
    swarm_ids = {r["id"] for r in await db.fetch("SELECT id FROM swarms")}
    assert swarm_ids == {legacy_uuid("swarms", s) for s in legacy.swarm_ids}
    for kept in legacy.special["uuid_swarm"]:
        assert uuid.UUID(kept) in swarm_ids
    con = sqlite3.connect(legacy.path)
    try:
        agent_rows = con.execute("SELECT id, swarm_id FROM agents WHERE id IS NOT NULL").fetchall()
    finally:
        con.close()
    imported = {r["id"]: r["swarm_id"] for r in await db.fetch("SELECT id, swarm_id FROM agents")}
    for legacy_id, legacy_swarm in agent_rows:
        if legacy_id in legacy.agent_ids:
            assert imported[legacy_uuid("agents", legacy_id)] == legacy_uuid("swarms", legacy_swarm)
    # The legacy id is kept for people who search by it.
    sid = legacy.swarm_ids[0]
    config = await db.fetchval("SELECT config FROM swarms WHERE id = $1", legacy_uuid("swarms", sid))
    assert config["legacy_id"] == sid
    budget = await db.fetchrow(
        "SELECT id, scope_type, scope_id, swarm_id FROM budgets WHERE swarm_id = $1",
        legacy_uuid("swarms", sid),
    )
    assert budget is not None
    assert budget["id"] == budget_uuid(sid)
    assert budget["scope_type"] == "swarm" and budget["scope_id"] == budget["swarm_id"]


async def test_status_mappings_are_reported_and_applied(db: Database, legacy: LegacyManifest) -> None:
    report = await import_sqlite(db, legacy.path)
    swarm_map = report.status_mappings["swarms"]
    for raw_status, n in legacy.swarm_statuses.items():
        assert swarm_map[f"{raw_status}→{map_swarm_status(raw_status)}"] == n
    assert sum(swarm_map.values()) == len(legacy.swarm_ids)
    assert swarm_map["hibernating→paused"] == legacy.swarm_statuses["hibernating"]
    assert swarm_map["Running→active"] == legacy.swarm_statuses["Running"]
    agent_map = report.status_mappings["agents"]
    lifecycle_map = report.status_mappings["agents.lifecycle_state"]
    for raw_status, n in legacy.agent_statuses.items():
        status, lifecycle = map_agent_status(raw_status)
        assert agent_map[f"{raw_status}→{status}"] == n
        assert lifecycle_map[f"{raw_status}→{lifecycle}"] == n
    assert agent_map["zombie→blocked"] == legacy.agent_statuses["zombie"]
    assert lifecycle_map["spawning→spawning"] == legacy.agent_statuses["spawning"]
    assert lifecycle_map["killing→cleaning_up"] == legacy.agent_statuses["killing"]
    # What is in the database agrees with the report.
    in_db = {
        r["status"]: r["n"] for r in await db.fetch("SELECT status, count(*) AS n FROM agents GROUP BY 1")
    }
    expected: dict[str, int] = {}
    for raw_status, n in legacy.agent_statuses.items():
        status = map_agent_status(raw_status)[0]
        expected[status] = expected.get(status, 0) + n
    assert in_db == expected
    lines = [x for x in report_lines(Path(report.report_path or "")) if x["kind"] == "mapping"]
    assert {(x["table"], x["mapping"]): x["count"] for x in lines}[("swarms", "idle→paused")] == swarm_map[
        "idle→paused"
    ]


async def test_rejects_and_repairs_are_listed_in_the_report_file(
    db: Database, legacy: LegacyManifest, tmp_path: Path
) -> None:
    target = tmp_path / "reports" / "legacy.jsonl"
    report = await import_sqlite(db, legacy.path, report_path=target)
    assert report.report_path == str(target)
    assert not default_report_path(legacy.path).exists()
    lines = report_lines(target)
    assert lines[0]["kind"] == "start" and lines[-1]["kind"] == "summary"
    rejects = [x for x in lines if x["kind"] == "reject"]
    by_table: dict[str, list[str | None]] = {t: [] for t in TABLES}
    for x in rejects:
        assert x["reason"]
        by_table[x["table"]].append(x["legacy_id"])
    for table in TABLES:
        assert sorted(by_table[table], key=str) == sorted(legacy.rejected[table], key=str), table
    reasons = {(x["table"], x["legacy_id"]): x["reason"] for x in rejects}
    orphan = next(a for a in legacy.rejected["agents"] if a and a.startswith("agent-orphan-"))
    assert (
        "swarm 'swarm-missing-" in reasons[("agents", orphan)] and "not found" in reasons[("agents", orphan)]
    )
    assert "NOT NULL" in reasons[("agents", "agent-noswarm-0")]
    assert reasons[("swarms", None)] == "missing id"
    assert "not a finite number" in reasons[("budgets", legacy.special["budget_infinite"][0])]
    missing_swarm_event = legacy.special["event_missing_swarm"][0]
    assert "not found" in reasons[("events", missing_swarm_event)]
    # Every repair is listed with the field and what was done.
    repairs = [x for x in lines if x["kind"] == "repair"]
    fields = {(x["table"], x["legacy_id"], x["field"]) for x in repairs}
    assert ("swarms", legacy.special["swarm_bad_config"][0], "config") in fields
    assert ("agents", legacy.special["agent_bad_metadata"][0], "metadata") in fields
    assert ("events", legacy.special["event_missing_agent"][0], "agent_id") in fields
    assert ("events", legacy.special["event_bad_timestamp"][0], "timestamp") in fields
    assert ("budgets", legacy.special["budget_overspent"][0], "allocated") in fields
    assert (
        len({(x["table"], x["legacy_id"]) for x in repairs if x["table"] == "events"})
        == (legacy.expected["events"]["repaired"])
    )
    summary = lines[-1]
    assert summary["tables"]["events"]["rejected"] == legacy.expected["events"]["rejected"]
    assert summary["dry_run"] is False


async def test_repaired_values(db: Database, legacy: LegacyManifest) -> None:
    await import_sqlite(db, legacy.path)

    async def swarm(legacy_id: str) -> Any:
        return await db.fetchrow("SELECT * FROM swarms WHERE id = $1", legacy_uuid("swarms", legacy_id))

    async def budget(legacy_id: str) -> Any:
        return await db.fetchrow("SELECT * FROM budgets WHERE id = $1", budget_uuid(legacy_id))

    async def event(legacy_id: str) -> Any:
        return await db.fetchrow("SELECT * FROM events WHERE id = $1", legacy_uuid("events", legacy_id))

    bad_config = await swarm(legacy.special["swarm_bad_config"][0])
    assert bad_config["config"]["_legacy_raw"] == "{max_agents: 10"
    assert isinstance(bad_config["config"]["legacy_agents"], list)
    bad_agents = await swarm(legacy.special["swarm_bad_agents"][0])
    assert bad_agents["config"]["legacy_agents"] == {"_legacy_raw": "[agent-1, "}
    assert bad_agents["config"]["model"] in ("kimi-k2.5", "claude-sonnet-4", "gpt-4o-mini")
    bad_created = await swarm(legacy.special["swarm_bad_created_at"][0])
    assert bad_created["created_at"] == UNREADABLE_TIME
    assert bad_created["config"]["legacy_created_at"] == "yesterday"
    # Non-ASCII text survives.
    names = {r["name"] for r in await db.fetch("SELECT name FROM swarms")}
    assert "群れ-1 🐝" in names and "Рой 3" in names

    over = await budget(legacy.special["budget_overspent"][0])
    assert (over["allocated"], over["consumed"]) == (Decimal(150), Decimal(150))
    null_alloc = await budget(legacy.special["budget_null_allocated"][0])
    assert (null_alloc["allocated"], null_alloc["consumed"]) == (Decimal("5.5"), Decimal("5.5"))
    rounded = await budget(legacy.special["budget_rounded"][0])
    assert rounded["consumed"] == 0 and rounded["allocated"] == 10
    assert await budget(legacy.special["budget_infinite"][0]) is None
    assert await budget(legacy.special["swarm_without_budget"][0]) is None
    assert await swarm(legacy.special["budget_infinite"][0]) is not None  # the swarm itself is kept
    regular = await budget(legacy.swarm_ids[0])
    assert regular["allocated"] == Decimal("100") and regular["currency"] == "USD"

    async def agent(legacy_id: str) -> Any:
        return await db.fetchrow("SELECT * FROM agents WHERE id = $1", legacy_uuid("agents", legacy_id))

    bad_meta = await agent(legacy.special["agent_bad_metadata"][0])
    assert bad_meta["metadata"]["_legacy_raw"] == "{'priority': 1}"
    assert bad_meta["metadata"]["legacy_id"] == legacy.special["agent_bad_metadata"][0]
    list_meta = await agent(legacy.special["agent_list_metadata"][0])
    assert list_meta["metadata"]["_legacy_value"] == [1, 2]
    bad_context = await agent(legacy.special["agent_bad_context"][0])
    assert bad_context["context"] == {"_legacy_raw": "{inputContext: oops"}
    bad_children = await agent(legacy.special["agent_bad_child_ids"][0])
    assert bad_children["metadata"]["legacy_child_ids"] == {"_legacy_raw": "[agent-x"}
    child = legacy.special["agent_with_parent"][0]
    child_row = await agent(child)
    parent = child_row["metadata"]["legacy_parent_id"]
    parent_row = await agent(parent)
    assert child in parent_row["metadata"]["legacy_child_ids"]
    no_spawn = await agent(legacy.special["agent_bad_spawned_at"][0])
    assert no_spawn["spawned_at"] == UNREADABLE_TIME
    assert no_spawn["metadata"]["legacy_spawned_at"] == "not a date"
    zero_retries = await db.fetchval("SELECT count(*) FROM agents WHERE max_retries = 0")
    assert zero_retries > 0  # 0 is a valid setting and is kept

    missing = await event(legacy.special["event_missing_agent"][0])
    assert missing["agent_id"] is None and missing["payload"]["_legacy_agent_id"].startswith("agent-missing-")
    assert missing["entity_type"] == "agent"
    orphan = await event(legacy.special["event_orphan_agent"][0])
    assert orphan["agent_id"] is None and orphan["payload"]["_legacy_agent_id"].startswith("agent-orphan-")
    derived = await event(legacy.special["event_null_swarm"][0])
    agent_row = await db.fetchrow("SELECT swarm_id FROM agents WHERE id = $1", derived["agent_id"])
    assert derived["swarm_id"] == agent_row["swarm_id"]
    bad_payload = await event(legacy.special["event_bad_payload"][0])
    assert bad_payload["payload"]["_legacy_raw"].endswith('"oops"')
    bad_source = await event(legacy.special["event_bad_source"][0])
    assert bad_source["payload"]["_legacy_source"] == {"_legacy_raw": "{type: agent"}
    list_payload = await event(legacy.special["event_list_payload"][0])
    assert list_payload["payload"]["_legacy_value"][2] == "ペイロード"
    bad_ts = await event(legacy.special["event_bad_timestamp"][0])
    assert bad_ts["timestamp"] == UNREADABLE_TIME
    assert bad_ts["payload"]["_legacy_timestamp"] == "not-a-date"
    epoch = await event(legacy.special["event_epoch_timestamp"][0])
    assert epoch["timestamp"].year == 2025
    # source.type became entity_type; the source itself is kept in the payload.
    kinds = {r["entity_type"] for r in await db.fetch("SELECT DISTINCT entity_type FROM events")}
    assert kinds == {"agent", "task", "system"}
    sample = await db.fetchrow("SELECT * FROM events WHERE entity_type = 'task' LIMIT 1")
    assert sample["payload"]["_legacy_source"]["type"] == "task"
    severities = {r["severity"] for r in await db.fetch("SELECT DISTINCT severity FROM events")}
    assert severities == {"info", "warning", "error", "debug"}


async def test_dry_run_writes_nothing_and_counts_like_a_real_run(
    db: Database, legacy: LegacyManifest
) -> None:
    dry = await import_sqlite(db, legacy.path, dry_run=True)
    assert await row_counts(db) == dict.fromkeys(TABLES, 0)
    assert dry.dry_run and dry.report_path == str(default_report_path(legacy.path, dry_run=True))
    real = await import_sqlite(db, legacy.path)
    assert counts(dry) == counts(real)
    assert dry.status_mappings == real.status_mappings
    after = await row_counts(db)
    again = await import_sqlite(db, legacy.path, dry_run=True, batch_size=1000)
    assert await row_counts(db) == after
    for table in TABLES:
        assert again.tables[table].written == 0
        assert again.tables[table].already_present == real.tables[table].written


async def test_small_batches_give_the_same_result(db: Database, tmp_path: Path) -> None:
    manifest = build_legacy_file(tmp_path / "dash.db", swarms=10, agents=30, events=400, seed=3)
    seen: list[tuple[str, int, int]] = []
    report = await import_sqlite(
        db, manifest.path, batch_size=7, progress=lambda t, done, total: seen.append((t, done, total))
    )
    for table in TABLES:
        assert counts(report)[table] == {**manifest.expected[table], "already_present": 0}
    last = {t: (done, total) for t, done, total in seen}
    assert last == {
        "swarms": (manifest.expected["swarms"]["read"],) * 2,
        "agents": (manifest.expected["agents"]["read"],) * 2,
        "events": (manifest.expected["events"]["read"],) * 2,
    }
    assert len([s for s in seen if s[0] == "events"]) == -(-400 // 7)


async def test_references_to_rows_already_in_postgresql_are_accepted(db: Database, tmp_path: Path) -> None:
    existing = uuid.uuid4()
    await db.execute("INSERT INTO swarms (id, name) VALUES ($1, 'made by the new code')", existing)
    path = tmp_path / "dash.db"
    async with SQLiteStorage(db_path=path) as old:
        await old.create_agent(id="a1", swarm_id=str(existing), model="m", task="t", status="running")
        await old.store_event(id="e1", event_type="agent.spawned", agent_id="a1", swarm_id=str(existing))
        await old.store_event(id="e2", event_type="agent.note", agent_id="a1")  # swarm from the agent
    report = await import_sqlite(db, path)
    assert report.tables["agents"].written == 1 and report.tables["events"].written == 2
    assert report.tables["swarms"].read == 0
    rows = await db.fetch("SELECT swarm_id, agent_id FROM events ORDER BY id")
    assert {r["swarm_id"] for r in rows} == {existing}
    assert {r["agent_id"] for r in rows} == {legacy_uuid("agents", "a1")}
    # The existing swarm was not touched and got no budget.
    assert await db.fetchval("SELECT name FROM swarms WHERE id = $1", existing) == "made by the new code"
    assert await db.fetchval("SELECT count(*) FROM budgets") == 0


async def test_nul_characters_and_invalid_utf8_are_repaired(db: Database, tmp_path: Path) -> None:
    path = tmp_path / "dash.db"
    async with SQLiteStorage(db_path=path) as old:
        await old.create_swarm(id="s", name="nul\x00name", config={"k": "v\x00w"})
        await old.store_event(id="e1", event_type="type\x00x", swarm_id="s", payload={"text": "a\x00b"})
    write_raw(
        path,
        "INSERT INTO events (id, timestamp, event_type, swarm_id) "
        "VALUES ('e2', '2025-01-27T00:00:00Z', CAST(X'6F6B20FF21' AS TEXT), 's')",
    )
    report = await import_sqlite(db, path)
    assert report.tables["events"].written == 2 and report.tables["events"].rejected == 0
    swarm = await db.fetchrow("SELECT name, config FROM swarms")
    assert swarm["name"] == "nulname" and swarm["config"]["k"] == "vw"
    e1 = await db.fetchrow("SELECT type, payload FROM events WHERE id = $1", legacy_uuid("events", "e1"))
    assert e1["type"] == "typex" and e1["payload"]["text"] == "ab"
    e2 = await db.fetchval("SELECT type FROM events WHERE id = $1", legacy_uuid("events", "e2"))
    assert e2 == "ok \ufffd!"
    assert report.tables["swarms"].repaired == 1 and report.tables["events"].repaired == 2
    utf8 = [r for r in report.repairs if r.legacy_id == "e2"]
    assert len(utf8) == 1 and "U+FFFD" in utf8[0].action


async def test_bad_arguments(db: Database, tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as info:
        await import_sqlite(db, tmp_path / "missing.db")
    assert info.value.field == "path"
    text = tmp_path / "notes.txt"
    text.write_text("this is not a database " * 100)
    with pytest.raises(ValidationError) as info:
        await import_sqlite(db, text)
    assert info.value.field == "path"
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(ValidationError, match="not a legacy Dash database"):
        await import_sqlite(db, other)
    with pytest.raises(ValidationError) as info:
        await import_sqlite(db, other, batch_size=0)
    assert info.value.field == "batch_size"
    assert await row_counts(db) == dict.fromkeys(TABLES, 0)


async def test_the_legacy_file_is_not_modified(db: Database, legacy: LegacyManifest) -> None:
    before = legacy.path.read_bytes()
    await import_sqlite(db, legacy.path)
    assert legacy.path.read_bytes() == before


# -- the command line ---------------------------------------------------------------------------------


def cli_app() -> typer.Typer:
    from dash_storage.cli.importer import import_sqlite as command

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command("import-sqlite")(command)

    @app.callback()
    def main() -> None:
        """Test shell (so import-sqlite is a sub-command, as in dash-db)."""

    return app


async def invoke(*args: str) -> Any:
    # The command runs its own event loop (uvloop.run), so it runs on a thread here.
    return await asyncio.to_thread(CliRunner().invoke, cli_app(), list(args))


async def test_cli_json_output(db: Database, legacy: LegacyManifest, tmp_path: Path) -> None:
    target = tmp_path / "r.jsonl"
    result = await invoke("import-sqlite", str(legacy.path), "--json", "--report", str(target))
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for table in TABLES:
        assert data["tables"][table]["written"] == legacy.expected[table]["written"]
        assert data["tables"][table]["rejected"] == legacy.expected[table]["rejected"]
        assert data["tables"][table]["skipped"] == legacy.expected[table]["rejected"]
    assert data["status_mappings"]["swarms"]["idle→paused"] == legacy.swarm_statuses["idle"]
    assert data["report_path"] == str(target) and target.exists()
    assert {r["table"] for r in data["rejects"]} == set(TABLES)
    assert await db.fetchval("SELECT count(*) FROM events") == legacy.expected["events"]["written"]
    again = await invoke("import-sqlite", str(legacy.path), "--json", "--batch-size", "1000")
    assert again.exit_code == 0
    assert (
        json.loads(again.stdout)["tables"]["events"]["already_present"]
        == legacy.expected["events"]["written"]
    )


async def test_cli_tables_and_dry_run(db: Database, legacy: LegacyManifest) -> None:
    result = await invoke("import-sqlite", str(legacy.path), "--dry-run")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "dry run" in out.lower() and "already present" in out
    assert "idle→paused" in out and "rejected rows" in out
    assert "nothing was written" in out
    assert await db.fetchval("SELECT count(*) FROM swarms") == 0


async def test_cli_missing_file_and_usage_errors(db: Database, tmp_path: Path) -> None:
    result = await invoke("import-sqlite", str(tmp_path / "nope.db"))
    assert result.exit_code == 2  # a PATH that is not there is a usage error
    assert "no such file" in result.output
    result = await invoke("import-sqlite", str(tmp_path / "nope.db"), "--batch-size", "0")
    assert result.exit_code == 2
    bad = tmp_path / "bad.db"
    bad.write_text("not sqlite " * 100)
    result = await invoke("import-sqlite", str(bad), "--json")
    assert result.exit_code == 1
    assert "invalid path" in result.output
    assert result.stdout == ""


def test_report_timestamps_are_iso() -> None:
    # The factory's timestamps are the old JavaScript toISOString() format the importer reads.
    from bench.legacy_factory import iso

    assert iso(1_738_000_000.5) == "2025-01-27T17:46:40.500Z"
    assert dt.datetime.fromisoformat(iso(0)).tzinfo is not None


async def test_unreadable_timestamps_sort_first_and_are_reported(db: Database, tmp_path: Path) -> None:
    """A legacy time nobody can read becomes 1970-01-01T00:00:00Z (never now(), which would make
    those rows the newest): findable with one query, the original text kept beside the row, and a
    repair in the report naming the value used."""
    path = tmp_path / "dash.db"
    async with SQLiteStorage(db_path=path) as old:
        await old.create_swarm(id="s", name="s", status="running", created_at="2025-01-27T00:00:00Z")
        await old.create_swarm(id="s-bad", name="s-bad", status="running", created_at="last tuesday")
    times = [f"2025-01-27T00:00:0{n}Z" for n in range(3)] + ["soon", "", "NaN"]
    write_raw(
        path,
        "INSERT INTO agents (id, status, model, task, spawned_at, swarm_id)"
        " VALUES ('a', 'running', 'm', 't', '32/13/2025', 's')",
        *(
            (
                "INSERT INTO events (id, timestamp, event_type, payload, swarm_id)"
                " VALUES (?, ?, 't', '{}', 's')",
                (f"e{i}", ts),
            )
            for i, ts in enumerate(times)
        ),
    )
    report = await import_sqlite(db, path)
    assert report.tables["events"].written == 6 and report.tables["events"].rejected == 0

    def uid(table: str, legacy_id: str) -> uuid.UUID:
        return legacy_uuid(table, legacy_id)

    swarm_id = uid("swarms", "s")
    newest = await db.fetch(
        'SELECT id FROM events WHERE swarm_id = $1 ORDER BY "timestamp" DESC, id DESC LIMIT 3', swarm_id
    )
    assert [r["id"] for r in newest] == [uid("events", f"e{i}") for i in (2, 1, 0)]
    unreadable = await db.fetch(
        'SELECT id, payload FROM events WHERE "timestamp" = $1 ORDER BY id', UNREADABLE_TIME
    )
    assert {r["id"] for r in unreadable} == {uid("events", f"e{i}") for i in (3, 4, 5)}
    assert sorted(r["payload"]["_legacy_timestamp"] for r in unreadable) == ["", "NaN", "soon"]
    agent = await db.fetchrow("SELECT spawned_at, metadata FROM agents WHERE id = $1", uid("agents", "a"))
    assert agent["spawned_at"] == UNREADABLE_TIME and agent["metadata"]["legacy_spawned_at"] == "32/13/2025"
    bad_swarm = await db.fetchrow(
        "SELECT created_at, config FROM swarms WHERE id = $1", uid("swarms", "s-bad")
    )
    assert bad_swarm["created_at"] == UNREADABLE_TIME
    assert bad_swarm["config"]["legacy_created_at"] == "last tuesday"
    repairs = {(r.table, r.legacy_id, r.field): r.action for r in report.repairs}
    for key in (
        ("events", "e3", "timestamp"),
        ("events", "e4", "timestamp"),
        ("events", "e5", "timestamp"),
        ("agents", "a", "spawned_at"),
        ("swarms", "s-bad", "created_at"),
    ):
        assert "1970-01-01T00:00:00Z" in repairs[key] and "now()" not in repairs[key], key
    assert "'soon'" in repairs[("events", "e3", "timestamp")]


async def test_values_of_the_wrong_sqlite_type(db: Database, tmp_path: Path) -> None:
    """SQLite stores whatever it is given; the importer repairs or rejects, never crashes."""
    path = tmp_path / "dash.db"
    async with SQLiteStorage(db_path=path) as old:
        await old.create_swarm(id="s", name="s", status="running")
    write_raw(
        path,
        "INSERT INTO agents (id, status, model, task, spawned_at, swarm_id, runtime, budget_limit,"
        " retry_count, max_retries) VALUES ('a', 'idle', 'm', 't', '2025-01-27T00:00:00Z', 's',"
        " 'long', 'cheap', -2, 1e12)",
        "INSERT INTO events (id, timestamp, event_type, payload, swarm_id)"
        " VALUES (X'01', '2025-01-27T00:00:00Z', 't', '{}', 's')",
        "INSERT INTO events (id, timestamp, event_type, payload, source, swarm_id)"
        " VALUES ('e5', 1738000000, 't', 5, 7, 's')",
    )
    report = await import_sqlite(db, path)
    assert report.tables["agents"].written == 1 and report.tables["agents"].repaired == 1
    agent = await db.fetchrow("SELECT runtime, budget_limit, retry_count, max_retries FROM agents")
    assert dict(agent) == {"runtime": 0, "budget_limit": None, "retry_count": 0, "max_retries": 2**31 - 1}
    assert [r.reason for r in report.rejects] == ["id is not text (bytes)"]
    event = await db.fetchrow("SELECT payload, timestamp FROM events")
    assert event["payload"] == {"_legacy_value": 5, "_legacy_source": 7}
    assert event["timestamp"] == dt.datetime(2025, 1, 27, 17, 46, 40, tzinfo=dt.UTC)


async def test_a_pool_of_one_connection_gives_the_same_result(
    db: Database, legacy: LegacyManifest, make_database: Any
) -> None:
    small = await make_database(postgres_min_pool_size=1, postgres_max_pool_size=1)
    report = await import_sqlite(small, legacy.path, batch_size=1000)
    for table in TABLES:
        assert counts(report)[table] == {**legacy.expected[table], "already_present": 0}, table
    assert await row_counts(db) == {t: legacy.expected[t]["written"] for t in TABLES}


async def test_writers_reconnect_after_their_connections_are_killed(
    db: Database, legacy: LegacyManifest, make_database: Any, settings: Any
) -> None:
    """A transient failure mid-import (server kills the sessions) is retried; nothing is lost or doubled."""
    from tests.conftest import admin_connect

    target = await make_database(postgres_retry_delay=20, postgres_retry_attempts=5)
    killed: list[int] = []
    kills: list[asyncio.Future[Any]] = []

    async def kill() -> None:
        # Kill the writers' sessions (busy ones only: the test's own pool sits idle), retrying
        # until one was caught at work.
        con = await admin_connect(settings, await target.fetchval("SELECT current_database()"))
        try:
            for _ in range(200):
                rows = await con.fetch(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                    "AND application_name = 'dash-storage' AND state <> 'idle'"
                )
                if rows:
                    killed.append(len(rows))
                    return
                await asyncio.sleep(0.001)
        finally:
            await con.close()

    def progress(table: str, done: int, total: int) -> None:
        if table == "events" and not kills:
            kills.append(asyncio.ensure_future(kill()))

    report = await import_sqlite(target, legacy.path, batch_size=250, progress=progress)
    await asyncio.gather(*kills)
    assert killed and killed[0] >= 1
    events = report.tables["events"]
    assert events.written + events.already_present == legacy.expected["events"]["written"]
    assert events.read == legacy.expected["events"]["read"]
    expected = [legacy_uuid("events", e) for e in legacy.event_ids]
    assert await db.fetchval("SELECT count(*) FROM events WHERE id = ANY($1::uuid[])", expected) == len(
        expected
    )
    assert await db.fetchval("SELECT count(*) FROM events") == len(expected)


async def test_an_older_file_without_some_columns_reads_them_as_null(db: Database, tmp_path: Path) -> None:
    """Columns an older legacy file lacks are read as NULL (and then repaired like any NULL)."""
    path = tmp_path / "dash.db"
    write_raw(
        path,
        "CREATE TABLE swarms (id TEXT PRIMARY KEY, name TEXT, status TEXT, created_at TEXT)",
        "CREATE TABLE agents (id TEXT PRIMARY KEY, status TEXT, model TEXT, task TEXT, swarm_id TEXT)",
        "CREATE TABLE events (id TEXT PRIMARY KEY, timestamp TEXT, event_type TEXT, swarm_id TEXT)",
        "INSERT INTO swarms VALUES ('s', 'old', 'running', '2025-01-27T00:00:00Z')",
        "INSERT INTO agents VALUES ('a', 'idle', 'm', 't', 's')",
        "INSERT INTO events VALUES ('e', '2025-01-27T00:00:00Z', 'step', 's')",
    )
    report = await import_sqlite(db, path)
    assert {t: (c.written, c.rejected) for t, c in report.tables.items()} == {
        "swarms": (1, 0),
        "budgets": (0, 0),
        "agents": (1, 0),
        "events": (1, 0),
    }
    swarm = await db.fetchrow("SELECT name, config, completed_at FROM swarms")
    assert swarm["name"] == "old" and swarm["completed_at"] is None
    assert swarm["config"] == {"legacy_id": "s"}
    agent = await db.fetchrow("SELECT spawned_at, runtime, max_retries, metadata FROM agents")
    assert agent["spawned_at"] == UNREADABLE_TIME and (agent["runtime"], agent["max_retries"]) == (0, 3)
    event = await db.fetchrow("SELECT agent_id, payload, entity_type FROM events")
    assert event["agent_id"] is None and event["payload"] == {} and event["entity_type"] == "system"


@pytest.mark.parametrize("outcome", ["completed", "failed", "cancelled"])
async def test_the_import_leaves_no_staging_table_behind(
    db: Database, legacy: LegacyManifest, make_database: Any, outcome: str
) -> None:
    """The event writers' TEMP tables never reach the pool, whose hand-back does not reset sessions:
    after an import, done, failed or cancelled while its writers are busy, no pooled connection and
    no session of the database has one."""
    target = await make_database(postgres_min_pool_size=2, postgres_max_pool_size=2)
    running: list[asyncio.Future[ImportReport]] = []

    def progress(table: str, done: int, total: int) -> None:
        if table != "events" or outcome == "completed":
            return
        if outcome == "failed":
            raise RuntimeError("stopped by the caller")
        running[0].cancel()

    running.append(
        asyncio.ensure_future(import_sqlite(target, legacy.path, batch_size=500, progress=progress))
    )
    if outcome == "completed":
        await running[0]
    else:
        with pytest.raises(RuntimeError if outcome == "failed" else asyncio.CancelledError):
            await running[0]
    async with target.acquire() as first, target.acquire() as second:
        for con in (first, second):
            assert await con.fetchval("SELECT to_regclass('pg_temp.dash_import_events')") is None
    staged = "SELECT count(*) FROM pg_class WHERE relname = 'dash_import_events'"
    for _ in range(200):  # a closed session drops its TEMP tables as its backend exits
        if not await db.fetchval(staged):
            break
        await asyncio.sleep(0.05)
    assert await db.fetchval(staged) == 0

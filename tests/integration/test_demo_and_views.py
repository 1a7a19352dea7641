"""The demo simulation keeps every invariant, and the terminal views show what is stored."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
from decimal import Decimal

import pytest

from dash_storage import Database
from dash_storage.cli.simulation import run_demo
from dash_storage.core.errors import ValidationError
from dash_storage.repositories.agents import AgentRepository
from dash_storage.repositories.events import EventRepository
from dash_storage.repositories.sessions import SessionRepository
from dash_storage.repositories.swarms import SwarmRepository
from tests.conftest import TEST_DB
from tests.factories import wait_until


async def test_demo_simulation_invariants(db: Database) -> None:
    seen = []
    # The budget must run out on a slow machine too (CI through a pooler managed about 40 grants a
    # second). A step costs 0.0004 to 0.004, so 0.02 covers at most 50 grants, and 20 agents want at
    # least 160 steps; the deadline only ends the run if the machine stalls for seconds.
    result = await run_demo(
        db,
        agents=20,
        seconds=4.0,
        allocated=Decimal("0.02"),
        seed=7,
        on_progress=lambda p: seen.append(p.events),
    )
    assert seen and seen == sorted(seen)
    summary = result.summary
    assert summary is not None
    assert summary.total_agents == 20 and summary.running_agents == 0
    assert summary.status == "completed"
    # The budget ran out and was never overspent; the ledger explains every cent.
    budget = await db.fetchrow(
        "SELECT allocated, consumed, used_tokens, id FROM budgets WHERE swarm_id = $1", result.swarm_id
    )
    assert budget is not None
    assert budget["consumed"] <= budget["allocated"] == Decimal("0.02")
    ledger = await db.fetchrow(
        "SELECT sum(cost) AS cost, sum(tokens) AS tokens, count(*) AS n "
        "FROM budget_ledger WHERE budget_id = $1",
        budget["id"],
    )
    assert ledger is not None
    assert ledger["cost"] == budget["consumed"] and ledger["tokens"] == budget["used_tokens"]
    assert ledger["n"] == result.progress.grants
    assert result.progress.denials > 0  # it did run out
    stored = await db.fetchval("SELECT count(*) FROM events WHERE swarm_id = $1", result.swarm_id)
    assert stored == result.progress.events
    assert len(result.activity) == 20
    assert result.session_branches == ["main", "explore-1", "explore-2", "explore-3"]
    session = await db.fetchrow(
        "SELECT current_branch, metadata FROM sessions WHERE id = $1", result.session_id
    )
    assert session is not None and session["current_branch"] == "explore-3"
    assert set(session["metadata"]) >= {"swarm_id", "branch_1_created_by", "branch_3_created_by"}


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**(os.environ if env is None else env), "POSTGRES_DB": TEST_DB}
    return subprocess.run(
        [sys.executable, "-m", "dash_storage", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_terminal_views(db: Database) -> None:
    result = await run_demo(db, agents=6, seconds=0.8, allocated=Decimal("0.05"), seed=1)
    swarm_id = str(result.swarm_id)

    swarms = _cli("swarms", "--json")
    assert swarms.returncode == 0, swarms.stderr
    rows = json.loads(swarms.stdout)
    assert [r["id"] for r in rows] == [swarm_id] and rows[0]["total_agents"] == 6

    agents = _cli("agents", "--swarm", swarm_id, "--json", "--limit", "3")
    assert agents.returncode == 0, agents.stderr
    assert len(json.loads(agents.stdout)) == 3

    events = _cli(
        "events", "--swarm", swarm_id, "--type", "agent.spawned", "--type", "swarm.started", "--json"
    )
    assert events.returncode == 0, events.stderr
    types = [e["type"] for e in json.loads(events.stdout)]
    assert sorted(set(types)) == ["agent.spawned", "swarm.started"] and len(types) == 7

    budgets = _cli("budgets", "--swarm", swarm_id, "--json")
    assert budgets.returncode == 0, budgets.stderr
    (budget,) = json.loads(budgets.stdout)
    assert Decimal(budget["consumed"]) <= Decimal(budget["allocated"]) == Decimal("0.05")

    table = _cli("swarms")
    assert table.returncode == 0 and "swarms (1)" in table.stdout


def _flat(text: str) -> str:
    return " ".join(text.replace("│", " ").split())


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (("agents", "--swarm", "not-a-uuid"), "--swarm"),
        (("agents", "--status", "sleeping"), "--status"),
        (("agents", "--lifecycle", "asleep"), "--lifecycle"),
        (("swarms", "--status", "bogus"), "--status"),
        (("events", "--severity", "loud"), "--severity"),
        (("events", "--limit", "0"), "--limit"),
        (("events", "--since", "yesterday"), "--since"),
        (("events", "--since", "15x"), "--since"),
        (("events", "--since", "-2h"), "--since"),
        (("events", "--since", "2h", "--hours", "2"), "--since"),
        (("budgets", "--scope-type", "galaxy"), "--scope-type"),
        (("sessions", "--limit", "0"), "--limit"),
        (("events", "--type", ""), "--type"),  # checked by the library, still named as the option
        (("events", "--type", "x" * 300), "--type"),
    ],
)
def test_views_reject_bad_input_with_usage_error(args: tuple[str, ...], option: str) -> None:
    result = _cli(*args)
    assert result.returncode == 2, result.stderr
    assert option in result.stderr
    assert result.stdout == ""


async def test_piped_tables_keep_ids_numbers_and_json_payloads_whole(db: Database) -> None:
    result = await run_demo(db, agents=3, seconds=0.5, allocated=Decimal("0.02"), seed=3)
    swarm_id = str(result.swarm_id)
    await EventRepository(db).create(
        result.swarm_id, "note", payload={"text": "[red]not markup[/]", "n": 1}, entity_type="system"
    )
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}  # a pipe, as in CI or make demo

    swarms = _cli("swarms", env=env)
    assert swarms.returncode == 0, swarms.stderr
    assert swarm_id in swarms.stdout and "…" not in swarms.stdout

    budgets = _cli("budgets", "--swarm", swarm_id, env=env)
    assert budgets.returncode == 0, budgets.stderr
    assert "2000000" in budgets.stdout and "…" not in budgets.stdout

    agents = _cli("agents", "--swarm", swarm_id, env=env)
    assert agents.returncode == 0, agents.stderr
    for row in await db.fetch("SELECT id FROM agents WHERE swarm_id = $1", result.swarm_id):
        assert str(row["id"]) in agents.stdout

    events = _cli("events", "--swarm", swarm_id, "--type", "note", env=env)
    assert events.returncode == 0, events.stderr
    assert '{"n":1,"text":"[red]not markup[/]"}' in events.stdout  # JSON (jsonb key order), not repr
    assert "'text'" not in events.stdout

    demo = _cli("demo", "--agents", "2", "--seconds", "0.5", "--budget", "0.01", env=env)
    assert demo.returncode == 0, demo.stderr
    assert "…" not in demo.stdout
    assert re.search(r"│ demo-swarm-[0-9a-f]{6} +│", demo.stdout), demo.stdout
    assert re.search(r"Demo swarm [0-9a-f-]{36} on the", demo.stdout), demo.stdout


async def test_events_since_and_limit(db: Database) -> None:
    swarm = await SwarmRepository(db).create(name="since")
    events = EventRepository(db)
    now = await db.fetchval("SELECT now()")
    await events.create(swarm.id, "old", timestamp=now - dt.timedelta(days=3))
    await events.create(swarm.id, "hour", timestamp=now - dt.timedelta(minutes=90))
    for _ in range(3):
        await events.create(swarm.id, "recent")

    def types(*args: str) -> list[str]:
        result = _cli("events", "--swarm", str(swarm.id), "--json", *args)
        assert result.returncode == 0, result.stderr
        return [e["type"] for e in json.loads(result.stdout)]

    assert sorted(set(types("--since", "15m"))) == ["recent"]
    assert sorted(set(types("--since", "2h"))) == ["hour", "recent"]
    assert sorted(set(types("--since", "1d"))) == ["hour", "recent"]
    assert sorted(set(types("--since", "1w"))) == ["hour", "old", "recent"]
    stamp = (now - dt.timedelta(hours=2)).astimezone(dt.UTC).replace(tzinfo=None).isoformat()
    assert sorted(set(types("--since", stamp))) == ["hour", "recent"]  # no offset: UTC
    assert sorted(set(types("--since", (now - dt.timedelta(hours=2)).isoformat()))) == ["hour", "recent"]
    assert types("--limit", "2") == ["recent", "recent"]


async def test_agents_lifecycle_filter(db: Database) -> None:
    swarm = await SwarmRepository(db).create(name="lifecycle")
    agents = AgentRepository(db)
    first = await agents.create(swarm.id, model="m", task="t")
    second = await agents.create(swarm.id, model="m", task="t")
    await agents.update_lifecycle_state(second.id, "spawning")

    def ids(*args: str) -> list[str]:
        result = _cli("agents", "--swarm", str(swarm.id), "--json", *args)
        assert result.returncode == 0, result.stderr
        return [a["id"] for a in json.loads(result.stdout)]

    assert ids("--lifecycle", "spawning") == [str(second.id)]
    assert ids("--lifecycle", first.lifecycle_state) == [str(first.id)]
    assert ids("--lifecycle", "destroyed") == []


async def test_sessions_view(db: Database) -> None:
    sessions = SessionRepository(db)
    live = await sessions.create(tree_data={"root": "main"}, current_branch="main", metadata={"k": "v"})
    expired = await sessions.create(current_branch="old", ttl_seconds=0.001)

    async def expired_by_the_database_clock() -> bool:
        return bool(await db.fetchval("SELECT clock_timestamp() > $1", expired.expires_at))

    await wait_until(expired_by_the_database_clock, "the session has expired")

    listed = _cli("sessions", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["id"] for r in rows] == [str(live.id)]
    assert rows[0]["tree_data"] == {"root": "main"} and rows[0]["metadata"] == {"k": "v"}

    everything = _cli("sessions", "--include-expired", "--json")
    assert {r["id"] for r in json.loads(everything.stdout)} == {str(live.id), str(expired.id)}

    table = _cli("sessions")
    assert table.returncode == 0, table.stderr
    assert "sessions (1)" in table.stdout and str(live.id) in table.stdout
    assert '{"k":"v"}' in table.stdout


async def test_demo_checks_every_option_before_writing(db: Database) -> None:
    cases = [
        (("--budget", "-1"), "--budget"),
        (("--budget", "0"), "--budget"),
        (("--budget", "abc"), "--budget"),
        (("--budget", "NaN"), "--budget"),
        (("--budget", "0.00000000001"), "--budget"),
        (("--agents", "0"), "--agents"),
        (("--seconds", "nan"), "--seconds"),
        (("--seconds", "0.1"), "--seconds"),
    ]
    for args, option in cases:
        result = _cli("demo", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert option in result.stderr, (args, result.stderr)
        assert result.stdout == "", "no progress bars before the options are checked"
    assert await db.fetchval("SELECT count(*) FROM swarms") == 0
    assert await db.fetchval("SELECT count(*) FROM events") == 0


async def test_run_demo_checks_its_options_before_writing(db: Database) -> None:
    with pytest.raises(ValidationError) as info:
        await run_demo(db, agents=2, seconds=0.5, allocated=Decimal(-1))
    assert info.value.field == "allocated"
    assert await db.fetchval("SELECT count(*) FROM swarms") == 0

"""The demo simulation keeps every invariant, and the terminal views show what is stored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from decimal import Decimal

from dash_storage import Database
from dash_storage.simulation import run_demo
from tests.conftest import TEST_DB


async def test_demo_simulation_invariants(db: Database) -> None:
    seen = []
    result = await run_demo(
        db,
        agents=20,
        seconds=1.5,
        allocated=Decimal("0.30"),
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
    assert budget["consumed"] <= budget["allocated"] == Decimal("0.30")
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


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "POSTGRES_DB": TEST_DB}
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


def test_views_reject_bad_input_with_usage_error() -> None:
    bad_uuid = _cli("agents", "--swarm", "not-a-uuid")
    assert bad_uuid.returncode == 2 and "not a UUID" in bad_uuid.stderr
    bad_status = _cli("agents", "--status", "sleeping")
    assert bad_status.returncode == 1 and "status" in bad_status.stderr
    bad_limit = _cli("events", "--limit", "0")
    assert bad_limit.returncode == 2

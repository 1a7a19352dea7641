"""Write realistic legacy Dash SQLite files (``dash.db``) for the importer's benchmark and tests.

It lives with the benchmarks so that the dependency runs one way: the tests may import ``bench``,
``bench`` never imports the tests.

``build_legacy_file(path, swarms=20, agents=500, events=5000)`` creates the file with the old
schema (``dash_storage.legacy.sqlite.SCHEMA_STATEMENTS``) and fills it the way years of the old code
would have: old-style ids (``swarm-1738000000-ab12cd``) mixed with UUID ids, statuses outside the
new sets, non-ASCII text, NULLs where the old schema allowed them and, with ``anomalies=True``, a
fixed set of broken rows (bad JSON, orphans, unreadable timestamps, missing ids, odd budgets).

The returned :class:`LegacyManifest` says what a first import into an empty database must report,
so tests compare against it instead of re-deriving the importer's rules.
"""

from __future__ import annotations

import datetime as dt
import random
import sqlite3
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from dash_storage.legacy.sqlite import INSERT_AGENT_SQL, INSERT_EVENT_SQL, INSERT_SWARM_SQL, SCHEMA_STATEMENTS

BASE_EPOCH = 1_738_000_000  # 2025-01-27, when these files would have been written

SWARM_STATUSES = (
    "running",
    "idle",
    "paused",
    "completed",
    "failed",
    "done",
    "starting",
    "error",
    "killed",
    "active",
    "Running",
    "hibernating",  # in no map: goes to the conservative default
)
AGENT_STATUSES = (
    "idle",
    "spawning",
    "running",
    "paused",
    "completed",
    "failed",
    "killing",
    "done",
    "error",
    "waiting",
    "terminated",
    "zombie",  # in no map: goes to the conservative default
    "blocked",
    "Running",
)
TERMINAL = {"completed", "failed", "done", "error", "killed", "terminated"}
SWARM_NAMES = ("research swarm {i}", "群れ-{i} 🐝", "équipe {i}", "Рой {i}", "swarm_{i}")
AGENT_LABELS = (None, "worker-{j}", "エージェント{j} 🤖", "Ünïcödé {j}", "планировщик {j}")
EVENT_TYPES = (
    "agent.spawned",
    "agent.status_changed",
    "task.completed",
    "budget.consumed",
    "system.heartbeat",
)
MODELS = ("kimi-k2.5", "claude-sonnet-4", "gpt-4o-mini")

# Event anomalies (count each) when anomalies=True; see build_legacy_file.
EVENT_ANOMALIES = {
    "missing_agent": 50,  # agent not in the file: kept, agent_id NULL (repaired)
    "orphan_agent": 20,  # agent rejected (its swarm is missing): kept, agent_id NULL (repaired)
    "missing_swarm": 30,  # swarm not in the file: rejected
    "null_swarm": 10,  # no swarm_id, known agent: swarm taken from the agent (repaired)
    "null_swarm_agent": 5,  # neither: rejected
    "null_id": 1,  # no id: rejected
    "bad_payload": 20,  # repaired
    "bad_source": 10,  # repaired
    "list_payload": 5,  # repaired (wrapped into an object)
    "bad_timestamp": 5,  # repaired (1970-01-01T00:00:00Z, the text kept in the payload)
    "epoch_timestamp": 5,  # epoch milliseconds as text: read as a time, not a repair
}
EVENT_REJECTED = ("missing_swarm", "null_swarm_agent", "null_id")


@dataclass
class LegacyManifest:
    """What was written, and what a first import into an empty database must report."""

    path: Path
    swarm_ids: list[str] = field(default_factory=list)  # legacy ids that import
    agent_ids: list[str] = field(default_factory=list)
    event_ids: list[str] = field(default_factory=list)
    rejected: dict[str, list[str | None]] = field(default_factory=dict)  # table → legacy ids
    expected: dict[str, dict[str, int]] = field(default_factory=dict)  # table → read/written/...
    swarm_statuses: Counter[str] = field(default_factory=Counter)  # raw statuses of imported swarms
    agent_statuses: Counter[str] = field(default_factory=Counter)
    special: dict[str, list[str]] = field(default_factory=dict)  # named rows for targeted checks

    def mark(self, name: str, legacy_id: str) -> None:
        self.special.setdefault(name, []).append(legacy_id)


def iso(seconds: float) -> str:
    """JavaScript's ``toISOString()`` of an epoch time."""
    value = dt.datetime.fromtimestamp(seconds, dt.UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def build_legacy_file(
    path: Path,
    *,
    swarms: int = 20,
    agents: int = 500,
    events: int = 5000,
    seed: int = 7,
    anomalies: bool = True,
) -> LegacyManifest:
    """Create ``path`` (it must not exist) as a legacy dash.db and return its manifest."""
    if anomalies and (swarms < 10 or agents < 10 or events < sum(EVENT_ANOMALIES.values()) + 10):
        raise ValueError("anomalies need at least 10 swarms, 10 agents and 171 events")
    rng = random.Random(seed)
    m = LegacyManifest(path=path, rejected={"swarms": [], "budgets": [], "agents": [], "events": []})

    def hex6() -> str:
        return f"{rng.getrandbits(24):06x}"

    def a_uuid() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    # -- swarms -----------------------------------------------------------------------------------
    swarm_rows: list[list[Any]] = []
    swarm_repaired: set[str] = set()
    budget_read = budget_repaired = budget_rejected = 0
    for i in range(swarms):
        sid = a_uuid() if i % 5 == 4 else f"swarm-{BASE_EPOCH + i * 37}-{hex6()}"
        status = SWARM_STATUSES[i % len(SWARM_STATUSES)]
        created = BASE_EPOCH + i * 600
        allocated: float | None = 100.0 + i
        consumed: float | None = round(rng.uniform(0, 50), 6)
        row = [
            sid,
            SWARM_NAMES[i % len(SWARM_NAMES)].format(i=i),
            status,
            _json({"max_agents": 25, "model": MODELS[i % len(MODELS)], "note": "日本語 ✓"}),
            "[]",  # filled in with the agent ids below
            iso(created),
            iso(created + 3600) if status.lower() in TERMINAL else None,
            allocated,
            consumed,
            None,
            None if i % 3 == 0 else _json({"tokens": 1000 + i, "cost": 0.25 * i}),
        ]
        if anomalies:
            if i == 1:
                row[3] = "{max_agents: 10"  # bad JSON config
                swarm_repaired.add(sid)
                m.mark("swarm_bad_config", sid)
            elif i == 2:
                row[4] = "[agent-1, "  # bad JSON agents (kept as is below)
                swarm_repaired.add(sid)
                m.mark("swarm_bad_agents", sid)
            elif i == 3:
                row[5] = "yesterday"
                swarm_repaired.add(sid)
                m.mark("swarm_bad_created_at", sid)
            elif i == 4:
                row[7], row[8] = 100.0, 150.0  # consumed above allocated
                m.mark("budget_overspent", sid)
                budget_repaired += 1
            elif i == 6:
                row[7] = row[8] = None  # no budget at all
                m.mark("swarm_without_budget", sid)
            elif i == 7:
                row[7], row[8] = None, 5.5
                m.mark("budget_null_allocated", sid)
                budget_repaired += 1
            elif i == 8:
                row[7], row[8] = 10.0, 1e-12  # finer than the money columns hold
                m.mark("budget_rounded", sid)
                budget_repaired += 1
            elif i == 9:
                row[7] = float("inf")
                m.mark("budget_infinite", sid)
                m.rejected["budgets"].append(sid)
                budget_rejected += 1
        if row[7] is not None and row[8] is not None:
            row[9] = row[7] - row[8]
        if row[7] is not None or row[8] is not None:
            budget_read += 1
        if i % 5 == 4:
            m.mark("uuid_swarm", sid)
        swarm_rows.append(row)
        m.swarm_ids.append(sid)
        m.swarm_statuses[status] += 1
    if anomalies:
        swarm_rows.append([None, "no id", "running", "{}", "[]", iso(BASE_EPOCH), None, 1.0, 0.0, 1.0, None])
        m.rejected["swarms"].append(None)

    # -- agents -----------------------------------------------------------------------------------
    agent_rows: list[list[Any]] = []
    agent_swarm: dict[str, str] = {}
    by_swarm: dict[str, list[str]] = {}
    agent_repaired = 0
    for j in range(agents):
        aid = a_uuid() if j % 7 == 3 else f"agent-{BASE_EPOCH * 1000 + j * 1013}-{hex6()}"
        swarm_id = m.swarm_ids[j % swarms]
        siblings = by_swarm.setdefault(swarm_id, [])
        status = AGENT_STATUSES[j % len(AGENT_STATUSES)]
        spawned = BASE_EPOCH + 60 + j * 7
        label = AGENT_LABELS[j % len(AGENT_LABELS)]
        row = [
            aid,
            label.format(j=j) if label else None,
            status,
            MODELS[j % len(MODELS)],
            f"Task {j}: résumé the 文書 and report 📄",
            iso(spawned),
            iso(spawned + 120) if status.lower() in TERMINAL else None,
            None if j % 11 == 0 else rng.randrange(0, 600_000),
            iso(spawned + 60) if status == "paused" else None,
            "user-123" if status == "paused" else None,
            swarm_id,
            siblings[0] if siblings and j % 4 == 0 else None,
            _json([]),
            _json({"inputContext": ["spec.md"], "contextSize": 2048, "contextWindow": 100000}),
            None if j % 2 else _json({"language": "python", "files": ["main.py"]}),
            _json({"traces": [], "decisions": ["split task"], "confidence": 0.9}),
            j % 4,
            0 if j % 13 == 0 else 3,  # 0 retries is a valid setting
            "timeout calling model" if status in ("failed", "error") else None,
            None if j % 5 == 0 else round(rng.uniform(1, 20), 4),
            None if j % 3 else _json({"maxTokens": 8000, "allowNetwork": False}),
            _json({"priority": j % 3, "tags": ["legacy", "测试"]}),
        ]
        if anomalies and 1 <= j <= 8:
            agent_repaired += 1
            if j <= 3:
                row[13] = "{inputContext: oops"
                m.mark("agent_bad_context", aid)
            elif j <= 5:
                row[21] = "{'priority': 1}"
                m.mark("agent_bad_metadata", aid)
            elif j == 6:
                row[5] = "not a date"
                m.mark("agent_bad_spawned_at", aid)
            elif j == 7:
                row[21] = "[1, 2]"
                m.mark("agent_list_metadata", aid)
            else:
                row[12] = "[agent-x"
                m.mark("agent_bad_child_ids", aid)
        if row[11] is not None:
            m.mark("agent_with_parent", aid)
        siblings.append(aid)
        agent_rows.append(row)
        m.agent_ids.append(aid)
        agent_swarm[aid] = swarm_id
        m.agent_statuses[status] += 1
    # Children lists, as the old code kept them.
    parents: dict[str, list[str]] = {}
    for row in agent_rows:
        if row[11] is not None:
            parents.setdefault(row[11], []).append(row[0])
    for row in agent_rows:
        if row[0] in parents and row[12] == "[]":
            row[12] = _json(parents[row[0]])
    orphan_agents: list[str] = []
    if anomalies:
        for k in range(10):
            oid = f"agent-orphan-{k}-{hex6()}"
            orphan_agents.append(oid)
            m.rejected["agents"].append(oid)
            agent_rows.append(_plain_agent(oid, f"swarm-missing-{k}", BASE_EPOCH + k))
        for k in range(2):
            oid = f"agent-noswarm-{k}"
            m.rejected["agents"].append(oid)
            agent_rows.append(_plain_agent(oid, None, BASE_EPOCH + k))
        agent_rows.append(_plain_agent(None, m.swarm_ids[0], BASE_EPOCH))
        m.rejected["agents"].append(None)
    # The swarms' agent lists.
    for row in swarm_rows:
        if row[0] in by_swarm and row[4] == "[]":
            row[4] = _json(by_swarm[row[0]])

    # -- events -----------------------------------------------------------------------------------
    kinds: list[str] = []
    if anomalies:
        for kind, count in EVENT_ANOMALIES.items():
            kinds.extend([kind] * count)
    kinds.extend(["regular"] * (events - len(kinds)))
    rng.shuffle(kinds)
    event_rows: list[list[Any]] = []
    event_repaired = 0
    for n, kind in enumerate(kinds):
        eid: str | None = a_uuid() if n % 13 == 5 else f"evt-{BASE_EPOCH * 1000 + n}-{hex6()}"
        agent_id: str | None = m.agent_ids[rng.randrange(agents)] if n % 5 else None
        swarm_id: str | None = agent_swarm[agent_id] if agent_id else m.swarm_ids[n % swarms]
        event_type = EVENT_TYPES[n % len(EVENT_TYPES)]
        payload: str | None = _json(
            {
                "step": n,
                "message": "処理中 ✨ naïve café",
                **({"severity": ("warning", "error", "debug")[n % 3]} if n % 10 == 0 else {}),
            }
        )
        if n % 17 == 0:
            payload = None  # the old code allowed events without payload
        if agent_id:
            source: str | None = _json({"type": "agent", "id": agent_id})
        elif n % 3 == 0:
            source = _json({"type": "task", "id": f"task-{n}"})
        else:
            source = _json({"type": "system"})
        if n % 19 == 0:
            source = None
        timestamp = iso(BASE_EPOCH + 3600 + n * 0.25)
        if kind == "missing_agent":
            agent_id = f"agent-missing-{n}"
            swarm_id = m.swarm_ids[n % swarms]
        elif kind == "orphan_agent":
            agent_id = orphan_agents[n % len(orphan_agents)]
            swarm_id = m.swarm_ids[n % swarms]
        elif kind == "missing_swarm":
            agent_id, swarm_id = None, f"swarm-missing-evt-{n}"
        elif kind == "null_swarm":
            agent_id = m.agent_ids[n % agents]
            swarm_id = None
        elif kind == "null_swarm_agent":
            agent_id = swarm_id = None
        elif kind == "null_id":
            eid = None
        elif kind == "bad_payload":
            payload = '{"step": ' + str(n) + ', "oops"'
        elif kind == "bad_source":
            source = "{type: agent"
        elif kind == "list_payload":
            payload = _json([n, "list", "ペイロード"])
        elif kind == "bad_timestamp":
            timestamp = "not-a-date"
        elif kind == "epoch_timestamp":
            timestamp = str((BASE_EPOCH + 3600) * 1000 + n)
        if kind != "regular":
            if eid is not None:
                m.mark(f"event_{kind}", eid)
        if kind in EVENT_REJECTED:
            m.rejected["events"].append(eid)
        else:
            assert eid is not None
            m.event_ids.append(eid)
            if kind not in ("regular", "epoch_timestamp"):
                event_repaired += 1
        event_rows.append([eid, timestamp, event_type, source, payload, agent_id, swarm_id])

    # -- write --------------------------------------------------------------------------------------
    con = sqlite3.connect(path)
    try:
        con.execute("PRAGMA journal_mode = WAL")
        for statement in SCHEMA_STATEMENTS:
            con.execute(statement)
        with con:
            con.executemany(INSERT_SWARM_SQL, swarm_rows)
            con.executemany(INSERT_AGENT_SQL, agent_rows)
            con.executemany(INSERT_EVENT_SQL, event_rows)
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        con.close()

    n_swarm_rows = len(swarm_rows)
    m.expected = {
        "swarms": {
            "read": n_swarm_rows,
            "written": swarms,
            "repaired": len(swarm_repaired),
            "rejected": n_swarm_rows - swarms,
        },
        "budgets": {
            "read": budget_read,
            "written": budget_read - budget_rejected,
            "repaired": budget_repaired,
            "rejected": budget_rejected,
        },
        "agents": {
            "read": len(agent_rows),
            "written": agents,
            "repaired": agent_repaired,
            "rejected": len(agent_rows) - agents,
        },
        "events": {
            "read": len(event_rows),
            "written": len(m.event_ids),
            "repaired": event_repaired,
            "rejected": len(event_rows) - len(m.event_ids),
        },
    }
    return m


def _plain_agent(agent_id: str | None, swarm_id: str | None, when: int) -> list[Any]:
    return [
        agent_id,
        "orphan",
        "running",
        "kimi-k2.5",
        "lost task",
        iso(when),
        None,
        0,
        None,
        None,
        swarm_id,
        None,
        "[]",
        None,
        None,
        None,
        0,
        3,
        None,
        None,
        None,
        "{}",
    ]

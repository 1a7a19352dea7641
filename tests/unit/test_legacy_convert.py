"""The legacy row converters (``dash_storage.legacy.convert``), without a server.

Rows are built as the reader returns them (rowid, then the columns of ``LEGACY_COLUMNS`` in
order), so these tests also hold the converters to the reader's column order.
"""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import orjson

from dash_storage.legacy.convert import EVENT_TYPE_DEFAULT, convert_agents, convert_events, convert_swarms
from dash_storage.legacy.mapping import AGENT_STATUS_DEFAULT, SWARM_STATUS_DEFAULT, budget_uuid, legacy_uuid
from dash_storage.legacy.reader import LEGACY_COLUMNS
from dash_storage.legacy.report import Batch, Reject
from dash_storage.legacy.values import NOT_JSON, NOT_OBJECT, NUL_REMOVED, UNREADABLE_TIME

UTC = dt.UTC
WHEN = "2025-01-27T17:46:40Z"
INSTANT = dt.datetime(2025, 1, 27, 17, 46, 40, tzinfo=UTC)
SWARM = legacy_uuid("swarms", "s")
AGENT = legacy_uuid("agents", "a")

SWARM_FIELDS = ("id", "name", "config", "status", "created_at", "completed_at")
AGENT_FIELDS = (
    "id swarm_id label status lifecycle_state model task context code reasoning safety_boundaries "
    "spawned_at completed_at pause_time paused_by runtime retry_count max_retries last_error "
    "budget_limit metadata"
).split()
EVENT_FIELDS = ("id", "swarm_id", "agent_id", "type", "payload", "timestamp", "entity_type", "severity")


def row(table: str, rowid: int = 1, **columns: Any) -> tuple[Any, ...]:
    """A row as the reader returns it; columns not given are NULL."""
    unknown = set(columns) - set(LEGACY_COLUMNS[table])
    assert not unknown, unknown
    return (rowid, *(columns.get(c) for c in LEGACY_COLUMNS[table]))


def record(fields: tuple[str, ...] | list[str], values: tuple[Any, ...]) -> dict[str, Any]:
    out = dict(zip(fields, values, strict=True))
    for key in ("config", "metadata", "payload", "context", "code", "reasoning", "safety_boundaries"):
        if isinstance(out.get(key), str):
            out[key] = orjson.loads(out[key])
    return out


def repairs_of(batch: Batch, legacy_id: str) -> dict[str, str]:
    return {r.field: r.action for r in batch.repairs if r.legacy_id == legacy_id}


def events(*rows: tuple[Any, ...], lossy: set[int] | None = None) -> Batch:
    batch = Batch("events")
    convert_events(list(rows), batch, {"s": SWARM, "gone": None}, {"a": (AGENT, SWARM)}, lossy or set())
    return batch


# -- swarms -----------------------------------------------------------------------------------------


def test_a_swarm_keeps_everything_the_new_schema_has_no_column_for() -> None:
    json = {"config": '{"max_agents": 5}', "agents": '["a1", "a2"]', "metrics": '{"tokens": 10}'}
    times = {"created_at": WHEN, "completed_at": "1738000000000"}
    batch = convert_swarms(
        [row("swarms", id="s", name="Research", status=" RUNNING ", **json, **times)], set()
    )
    [swarm] = [record(SWARM_FIELDS, r) for r in batch.records]
    assert swarm == {
        "id": SWARM,
        "name": "Research",
        "config": {
            "max_agents": 5,
            "legacy_id": "s",
            "legacy_agents": ["a1", "a2"],
            "legacy_metrics": {"tokens": 10},
        },
        "status": "active",
        "created_at": INSTANT,
        "completed_at": INSTANT,
    }
    assert batch.mappings == {("swarms", " RUNNING →active"): 1}
    assert (batch.read, batch.repaired, batch.repairs, batch.rejects) == (1, 0, [], [])
    assert batch.new_refs == {"s": SWARM} and batch.ids == [SWARM]
    assert batch.budgets == []  # no budget columns: no budget


def test_a_swarm_is_repaired_where_it_can_be() -> None:
    times = {"created_at": "last tuesday", "completed_at": "soon"}
    swarm_row = row(
        "swarms", 7, id="s", name=None, status="hibernating", config="[1]", agents="a1,a2", **times
    )
    batch = convert_swarms([swarm_row], {7})
    [swarm] = [record(SWARM_FIELDS, r) for r in batch.records]
    assert swarm["name"] == "s"  # the legacy id stands in
    assert swarm["status"] == SWARM_STATUS_DEFAULT
    assert swarm["config"] == {
        "_legacy_value": [1],
        "legacy_id": "s",
        "legacy_agents": {"_legacy_raw": "a1,a2"},
        "legacy_created_at": "last tuesday",
    }
    assert swarm["created_at"] == UNREADABLE_TIME and swarm["completed_at"] is None
    fixed = repairs_of(batch, "s")
    assert set(fixed) == {"*", "name", "config", "agents", "created_at", "completed_at"}
    assert "U+FFFD" in fixed["*"]
    assert fixed["agents"] == NOT_JSON
    assert batch.repaired == 1  # one row, however many of its values changed


def test_swarms_without_a_usable_id_are_rejected() -> None:
    batch = convert_swarms(
        [row("swarms", 1, id=None), row("swarms", 2, id=""), row("swarms", 3, id=5)], set()
    )
    assert batch.records == [] and batch.read == 3
    assert batch.rejects == [
        Reject("swarms", None, "missing id"),
        Reject("swarms", "", "missing id"),
        Reject("swarms", "5", "id is not text (int)"),
    ]


def test_a_swarm_budget_becomes_a_budget_row() -> None:
    batch = convert_swarms(
        [
            row(
                "swarms", 1, id="fine", name="n", created_at=WHEN, budget_allocated=10.5, budget_consumed=0.25
            ),
            row("swarms", 2, id="over", name="n", created_at=WHEN, budget_allocated=1.0, budget_consumed=2.5),
            row("swarms", 3, id="half", name="n", created_at=WHEN, budget_consumed=-1.0),
            row(
                "swarms", 4, id="bad", name="n", created_at=WHEN, budget_allocated="cheap", budget_consumed=1
            ),
        ],
        set(),
    )
    assert [r[0] for r in batch.records] == [
        legacy_uuid("swarms", k) for k in ("fine", "over", "half", "bad")
    ]
    assert batch.budgets == [
        (budget_uuid("fine"), legacy_uuid("swarms", "fine"), Decimal("10.5"), Decimal("0.25")),
        (budget_uuid("over"), legacy_uuid("swarms", "over"), Decimal("2.5"), Decimal("2.5")),
        (budget_uuid("half"), legacy_uuid("swarms", "half"), Decimal(0), Decimal(0)),
    ]
    assert batch.budget_read == 4 and batch.budget_repaired == 2
    assert repairs_of(batch, "over") == {
        "allocated": "consumed 2.5 exceeded allocated 1.0; allocated raised to 2.5"
    }
    assert repairs_of(batch, "half") == {"consumed": "negative amount -1.0 set to 0"}
    # a budget that cannot be read is rejected on its own; its swarm is still imported
    assert batch.budget_rejects == [Reject("budgets", "bad", "budget_allocated is not a number ('cheap')")]
    assert batch.rejects == []


# -- agents -----------------------------------------------------------------------------------------


def test_an_agent_gets_its_status_lifecycle_and_legacy_links() -> None:
    who = {"id": "a", "swarm_id": "s", "status": "Working", "model": "m", "task": "t", "spawned_at": WHEN}
    links = {"parent_id": "p", "child_ids": '["c1"]', "context": '{"k": 1}', "metadata": '{"owner": "me"}'}
    first_row = row("agents", 1, **who, **links, retry_count=2, budget_limit=1.5)
    second_row = row(
        "agents", 2, id="b", swarm_id="s", status="sleeping", model="m", task="t", child_ids="[]"
    )
    batch = convert_agents([first_row, second_row], {"s": SWARM}, set())
    first, second = (record(AGENT_FIELDS, r) for r in batch.records)
    assert first["id"] == AGENT and first["swarm_id"] == SWARM
    assert (first["status"], first["lifecycle_state"]) == ("running", "running")
    assert first["metadata"] == {
        "owner": "me",
        "legacy_id": "a",
        "legacy_parent_id": "p",
        "legacy_child_ids": ["c1"],
    }
    assert first["context"] == {"k": 1} and first["code"] is None
    assert (first["spawned_at"], first["runtime"], first["retry_count"], first["max_retries"]) == (
        INSTANT,
        0,
        2,
        3,
    )
    assert first["budget_limit"] == Decimal("1.5")
    assert (second["status"], second["lifecycle_state"]) == AGENT_STATUS_DEFAULT  # unknown: a person decides
    assert second["metadata"] == {"legacy_id": "b"}  # no children: nothing to keep
    assert second["spawned_at"] == UNREADABLE_TIME
    assert batch.mappings[("agents", "Working→running")] == 1
    assert batch.mappings[("agents.lifecycle_state", "sleeping→paused")] == 1
    assert batch.new_refs == {"a": (AGENT, SWARM), "b": (legacy_uuid("agents", "b"), SWARM)}


def test_an_agent_without_its_swarm_is_rejected() -> None:
    batch = convert_agents(
        [
            row("agents", 1, id="a1", swarm_id=None),
            row("agents", 2, id="a2", swarm_id="gone"),
            row("agents", 3, id="a3", swarm_id="elsewhere"),
        ],
        {"gone": None},
        set(),
    )
    assert batch.records == [] and batch.read == 3
    assert [r.reason for r in batch.rejects] == [
        "agent has no swarm_id (agents.swarm_id is NOT NULL)",
        "swarm 'gone' not found",
        "swarm 'elsewhere' not found",
    ]


def test_agent_values_of_the_wrong_kind_are_repaired() -> None:
    text = {"model": 7, "task": "t\x00ask", "spawned_at": "32/13/2025", "reasoning": "not json"}
    numbers = {"runtime": "long", "retry_count": -2, "max_retries": 1e12, "budget_limit": "cheap"}
    batch = convert_agents(
        [row("agents", id="a", swarm_id="s", status="idle", **text, **numbers)], {"s": SWARM}, set()
    )
    [agent] = [record(AGENT_FIELDS, r) for r in batch.records]
    assert (agent["model"], agent["task"]) == ("7", "task")
    assert agent["spawned_at"] == UNREADABLE_TIME and agent["metadata"]["legacy_spawned_at"] == "32/13/2025"
    assert (agent["runtime"], agent["retry_count"], agent["max_retries"]) == (0, 0, 2**31 - 1)
    assert agent["budget_limit"] is None
    assert agent["reasoning"] == {"_legacy_raw": "not json"}
    # in the order the converter meets them: the row's own checks, then column by column
    fields = "spawned_at runtime retry_count max_retries budget_limit model task reasoning"
    assert list(repairs_of(batch, "a")) == fields.split()
    assert batch.repaired == 1


# -- events -----------------------------------------------------------------------------------------


def event(rowid: int, legacy_id: Any, **columns: Any) -> tuple[Any, ...]:
    """An event row of swarm ``s`` at :data:`WHEN`, of type ``t``, unless ``columns`` say otherwise."""
    return row(
        "events", rowid, **{"id": legacy_id, "timestamp": WHEN, "event_type": "t", "swarm_id": "s", **columns}
    )


def test_an_event_is_mapped_with_its_source_and_severity() -> None:
    source, payload = '{"type": "Task", "id": "t-1"}', '{"level": "WARN", "step": 1}'
    batch = events(event(1, "e", event_type="agent.step", source=source, payload=payload, agent_id="a"))
    [mapped] = [record(EVENT_FIELDS, r) for r in batch.records]
    assert mapped == {
        "id": legacy_uuid("events", "e"),
        "swarm_id": SWARM,
        "agent_id": AGENT,
        "type": "agent.step",
        "payload": {"level": "WARN", "step": 1, "_legacy_source": {"type": "Task", "id": "t-1"}},
        "timestamp": INSTANT,
        "entity_type": "task",
        "severity": "warning",
    }
    assert (batch.read, batch.repaired, batch.repairs, batch.ids) == (1, 0, [], [mapped["id"]])


def test_event_entity_type_and_severity_defaults() -> None:
    batch = events(
        event(1, "agent", agent_id="a"),
        event(2, "system", source='"cli"'),
        event(3, "odd", payload='{"severity": "loud"}'),
        event(4, "fatal", payload='{"severity": "fatal"}'),
    )
    got = {r[0]: (r[6], r[7]) for r in batch.records}
    assert got == {
        legacy_uuid("events", "agent"): ("agent", "info"),
        legacy_uuid("events", "system"): ("system", "info"),
        legacy_uuid("events", "odd"): ("system", "info"),
        legacy_uuid("events", "fatal"): ("system", "critical"),
    }


def test_event_times_in_every_old_format_and_the_fallback() -> None:
    batch = events(
        event(1, "iso", timestamp="2025-01-27T18:46:40+01:00"),
        event(2, "naive", timestamp="2025-01-27T17:46:40"),
        event(3, "ms", timestamp=1738000000000),
        event(4, "text-s", timestamp="1738000000"),
        event(5, "bad", timestamp="soon", payload='{"x": 1}'),
        event(6, "null", timestamp=None),
    )
    times = {r[0]: r[5] for r in batch.records}
    for key in ("iso", "naive", "ms", "text-s"):
        assert times[legacy_uuid("events", key)] == INSTANT, key
    assert times[legacy_uuid("events", "bad")] == times[legacy_uuid("events", "null")] == UNREADABLE_TIME
    payloads = {r[0]: orjson.loads(r[4]) for r in batch.records}
    assert payloads[legacy_uuid("events", "bad")] == {"x": 1, "_legacy_timestamp": "soon"}
    assert payloads[legacy_uuid("events", "null")] == {}
    assert "1970-01-01T00:00:00Z" in repairs_of(batch, "bad")["timestamp"]
    assert batch.repaired == 2


def test_event_payloads_are_always_objects_without_nul() -> None:
    batch = events(
        event(1, "raw", payload="{oops"),
        event(2, "list", payload="[1, 2]"),
        event(3, "nul", event_type="t\x00ype", payload='{"a": "b\\u0000"}'),
        event(4, "src", event_type=None, source="{bad"),
    )
    got = {r[0]: (r[3], orjson.loads(r[4])) for r in batch.records}
    assert got == {
        legacy_uuid("events", "raw"): ("t", {"_legacy_raw": "{oops"}),
        legacy_uuid("events", "list"): ("t", {"_legacy_value": [1, 2]}),
        legacy_uuid("events", "nul"): ("type", {"a": "b"}),
        legacy_uuid("events", "src"): (EVENT_TYPE_DEFAULT, {"_legacy_source": {"_legacy_raw": "{bad"}}),
    }
    assert repairs_of(batch, "raw") == {"payload": NOT_JSON}
    assert repairs_of(batch, "list") == {"payload": NOT_OBJECT}
    assert repairs_of(batch, "nul") == {"payload": NUL_REMOVED, "event_type": NUL_REMOVED}
    missing_type = f"missing event type; set to {EVENT_TYPE_DEFAULT!r}"
    assert repairs_of(batch, "src") == {"source": NOT_JSON, "event_type": missing_type}
    assert batch.repaired == 4


def test_event_references_are_resolved_repaired_or_rejected() -> None:
    batch = events(
        event(1, "via-agent", swarm_id=None, agent_id="a"),
        event(2, "lost-agent", agent_id="who"),
        event(3, "orphan", swarm_id=None, agent_id="who"),
        event(4, "gone", swarm_id="gone"),
        event(5, b"\x01"),
        event(6, "unknown", swarm_id="nowhere"),
    )
    kept = {r[0]: (r[1], r[2], orjson.loads(r[4])) for r in batch.records}
    assert kept == {
        legacy_uuid("events", "via-agent"): (SWARM, AGENT, {}),
        legacy_uuid("events", "lost-agent"): (SWARM, None, {"_legacy_agent_id": "who"}),
    }
    assert repairs_of(batch, "via-agent") == {"swarm_id": "missing swarm_id; taken from the event's agent"}
    assert repairs_of(batch, "lost-agent") == {"agent_id": "agent 'who' not found; agent_id set to NULL"}
    assert batch.rejects == [
        Reject("events", "orphan", "event has no swarm_id and no known agent to take it from"),
        Reject("events", "gone", "swarm 'gone' not found"),
        Reject("events", "\x01", "id is not text (bytes)"),
        Reject("events", "unknown", "swarm 'nowhere' not found"),
    ]
    assert batch.read == 6 and batch.repaired == 2


def test_rows_read_with_bad_utf8_are_reported_once_each() -> None:
    batch = events(event(1, "ok"), event(2, "lossy", event_type="ok \ufffd"), lossy={2})
    assert len(batch.records) == 2
    assert list(repairs_of(batch, "lossy")) == ["*"] and repairs_of(batch, "ok") == {}
    assert batch.repaired == 1


def test_slices_of_one_batch_add_up() -> None:
    rows = [event(i, f"e{i}") for i in range(1, 8)]
    whole = events(*rows)
    sliced = Batch("events")
    for start in range(0, len(rows), 3):
        convert_events(rows[start : start + 3], sliced, {"s": SWARM}, {}, set())
    assert sliced.records == whole.records and sliced.read == whole.read == 7
    assert all(isinstance(i, uuid.UUID) for i in sliced.ids)

"""Client-generated ids (UUIDv7) and the shape of the records."""

from __future__ import annotations

import datetime as dt
import pickle
import time
import uuid

import pytest

from dash_storage.core.ids import new_id, new_ids
from dash_storage.core.models import AGENT_COLUMNS, EVENT_COLUMNS, UNSET, Agent, Event


def test_uuid7_layout_and_time() -> None:
    before = time.time_ns() // 1_000_000
    value = new_id()
    after = time.time_ns() // 1_000_000
    assert value.version == 7 and value.variant == uuid.RFC_4122
    assert before <= value.int >> 80 <= after + 1


def test_ids_are_unique_and_time_ordered() -> None:
    ids = [new_id() for _ in range(50_000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)


def test_batches_of_ids_follow_single_ids_in_order() -> None:
    """new_ids(n) makes what n calls of new_id would: unique, increasing, valid UUIDv7s, in
    sequence with the ids made before and after it (across a counter overflow too)."""
    before = time.time_ns() // 1_000_000
    ids = [new_id(), *new_ids(10_000), new_id(), *new_ids(1), *new_ids(0), new_id()]
    after = time.time_ns() // 1_000_000
    assert len(ids) == 10_004 and len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    for value in ids:
        assert value.version == 7 and value.variant == uuid.RFC_4122
        assert uuid.UUID(str(value)) == value and hash(uuid.UUID(str(value))) == hash(value)
        assert before <= value.int >> 80 <= after + 10  # 10,000 ids borrow at most a few ms
    assert pickle.loads(pickle.dumps(ids[5])) == ids[5]


def test_records_are_immutable_and_typed() -> None:
    event = Event(new_id(), new_id(), None, "t", {}, dt.datetime.now(dt.UTC), None, None, "system", "info")
    with pytest.raises(AttributeError):
        event.type = "other"  # type: ignore[misc]
    assert event._asdict()["type"] == "t"
    assert EVENT_COLUMNS.split(", ")[5] == '"timestamp"'
    assert [c.strip('"') for c in EVENT_COLUMNS.split(", ")] == list(Event._fields)
    assert AGENT_COLUMNS.split(", ") == list(Agent._fields)
    assert repr(UNSET) == "UNSET"

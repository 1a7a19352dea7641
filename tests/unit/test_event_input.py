"""An event's fields and their validation: one definition, shared by every write path."""

from __future__ import annotations

import datetime as dt
import gc
import inspect
import uuid
from collections import OrderedDict
from enum import IntEnum
from typing import Any, ClassVar

import orjson
import pytest

from dash_storage import EventRepository, EventWriter
from dash_storage.core import driver
from dash_storage.core.errors import ValidationError
from dash_storage.core.ids import new_id
from dash_storage.core.models import Event
from dash_storage.repositories.event_input import (
    FIELDS,
    MAX_BATCH,
    PAUSE_GC_BATCH,
    REQUIRED,
    EventFields,
    EventInput,
    _check_event,
    _fast_event,
    check_batch,
    check_event,
    dump_payload,
    payload_json,
    prepare_batch,
    prepare_event,
)

UTC = dt.UTC
SWARM = uuid.UUID("01930000-0000-7000-8000-000000000001")


def test_the_fields_are_those_of_an_event() -> None:
    assert FIELDS == set(Event._fields)
    assert REQUIRED == ("swarm_id", "type")
    assert set(EventFields.__annotations__) == FIELDS - set(REQUIRED)
    assert set(EventInput.__annotations__) == FIELDS


def test_both_creates_take_the_one_field_list() -> None:
    """EventWriter.create is a drop-in for EventRepository.create: the same parameters, all from
    EventFields."""
    repo = inspect.signature(EventRepository.create)
    writer = inspect.signature(EventWriter.create)
    assert [(p.name, p.kind, p.annotation) for p in repo.parameters.values()] == [
        (p.name, p.kind, p.annotation) for p in writer.parameters.values()
    ]
    assert repo.parameters["fields"].annotation == "Unpack[EventFields]"


def test_a_full_event_keeps_every_value_in_its_field() -> None:
    given: dict[str, Any] = {
        "swarm_id": str(SWARM),
        "type": "agent.step",
        "agent_id": new_id(),
        "payload": {"step": 1, "items": [1, 2]},
        "timestamp": dt.datetime(2026, 1, 1, 12, tzinfo=dt.timezone(dt.timedelta(hours=2))),
        "correlation_id": "run-7",
        "parent_event_id": new_id(),
        "entity_type": "task",
        "severity": "warning",
        "id": new_id(),
    }
    event = Event(*check_event(given))
    assert event._asdict() == {
        **given,
        "swarm_id": SWARM,
        "timestamp": dt.datetime(2026, 1, 1, 10, tzinfo=UTC),  # the same instant, in UTC
    }
    assert event.timestamp.tzinfo == UTC


def test_defaults() -> None:
    row = check_event({"swarm_id": SWARM, "type": "t", "payload": None})
    event_id, swarm, agent, typ, payload, timestamp, corr, parent, entity_type, severity = row
    assert event_id.version == 7  # made here, before the first attempt: retries keep it
    assert (swarm, agent, typ, payload, timestamp, corr, parent) == (SWARM, None, "t", {}, None, None, None)
    assert (entity_type, severity) == ("system", "info")
    assert check_event({"swarm_id": SWARM, "type": "t"})[0] != event_id


class NoJSON:
    pass


BAD: list[tuple[str, Any]] = [
    ("swarm_id", "not-a-uuid"),
    ("swarm_id", None),
    ("type", ""),
    ("type", 42),
    ("type", "nul\x00byte"),
    ("agent_id", "nope"),
    ("payload", NoJSON()),
    ("payload", {"x": float("nan")}),
    ("timestamp", dt.datetime(2026, 1, 1)),  # naive
    ("timestamp", "2026-01-01T00:00:00Z"),
    ("timestamp", dt.datetime(1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=3)))),  # year 0 in UTC
    ("correlation_id", 7),
    ("parent_event_id", 1.5),
    ("entity_type", "robot"),
    ("entity_type", None),
    ("severity", "loud"),
    ("id", "x"),
]


@pytest.mark.parametrize(("field", "value"), BAD, ids=[f"{f}={v!r}" for f, v in BAD])
def test_each_bad_field_is_named(field: str, value: Any) -> None:
    event = {"swarm_id": SWARM, "type": "t", field: value}
    with pytest.raises(ValidationError) as caught:
        check_event(event)
    assert caught.value.field == field
    with pytest.raises(ValidationError) as caught:
        check_batch([{"swarm_id": SWARM, "type": "ok"}, event])
    assert caught.value.field == f"events[1].{field}"
    with pytest.raises(ValidationError) as caught:
        prepare_event(event)
    assert caught.value.field == field


def test_the_first_bad_field_is_reported_in_a_fixed_order() -> None:
    with pytest.raises(ValidationError) as caught:
        check_event({"swarm_id": "bad", "type": "", "severity": "loud"})
    assert caught.value.field == "swarm_id"
    with pytest.raises(ValidationError) as caught:
        check_event({"swarm_id": SWARM, "type": "t", "severity": "loud", "payload": NoJSON()})
    assert caught.value.field == "payload"


def test_an_unknown_key_is_named() -> None:
    with pytest.raises(ValidationError) as caught:
        check_event({"swarm_id": SWARM, "type": "t", "colour": "red"})
    assert (caught.value.field, caught.value.problem) == ("event", "has unknown key 'colour'")
    with pytest.raises(ValidationError) as caught:
        check_batch([{"swarm_id": SWARM, "type": "t", "colour": "red"}])
    assert (caught.value.field, caught.value.problem) == ("events[0]", "has unknown key 'colour'")


@pytest.mark.parametrize("missing", ["swarm_id", "type"])
def test_a_missing_required_field_is_named(missing: str) -> None:
    item = {"swarm_id": SWARM, "type": "t"}
    del item[missing]
    with pytest.raises(ValidationError) as caught:
        check_batch([item])
    assert (caught.value.field, caught.value.problem) == (f"events[0].{missing}", "is required")


@pytest.mark.parametrize("events", ["a string", b"bytes", {"swarm_id": SWARM, "type": "t"}, 3, None])
def test_a_batch_must_be_a_list_of_mappings(events: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        check_batch(events)
    assert caught.value.field == "events"


def test_a_batch_item_must_be_a_mapping() -> None:
    with pytest.raises(ValidationError) as caught:
        check_batch([{"swarm_id": SWARM, "type": "t"}, ("swarm_id", SWARM)])
    assert caught.value.field == "events[1]"


def test_a_batch_repeats_no_id() -> None:
    same = new_id()
    with pytest.raises(ValidationError) as caught:
        check_batch([{"swarm_id": SWARM, "type": "t", "id": same}] * 2)
    assert (caught.value.field, caught.value.problem) == ("events[1].id", "repeats the id of events[0]")


@pytest.mark.parametrize("as_generator", [False, True])
def test_a_batch_gets_new_increasing_ids_and_keeps_those_given(as_generator: bool) -> None:
    given = new_id()
    items = [{"swarm_id": SWARM, "type": "t"} for _ in range(300)]
    items[150]["id"] = given
    rows, _, given_ids = prepare_batch((i for i in items) if as_generator else items)
    assert rows[150][0] == given and given_ids == [given]
    made = [r[0] for i, r in enumerate(rows) if i != 150]
    assert made == sorted(made) and len(set(made)) == 299
    assert all(i.version == 7 for i in made)


def test_a_batch_holds_at_most_max_batch_events() -> None:
    item = {"swarm_id": SWARM, "type": "t"}
    assert len(check_batch(item for _ in range(MAX_BATCH))) == MAX_BATCH
    with pytest.raises(ValidationError, match="split the batch"):
        check_batch(item for _ in range(MAX_BATCH + 1))


class Watching(OrderedDict[str, Any]):
    """An event mapping (not a plain dict, so it is read through the full checks) that records
    whether the garbage collector is on whenever it is read."""

    seen: ClassVar[list[bool]] = []

    def __getitem__(self, key: str) -> Any:
        Watching.seen.append(gc.isenabled())
        return super().__getitem__(key)


def test_a_big_batch_pauses_the_garbage_collector_and_leaves_it_as_it_found_it() -> None:
    item = {"swarm_id": SWARM, "type": "t"}
    watched = [Watching(item) for _ in range(PAUSE_GC_BATCH)]
    assert gc.isenabled()
    Watching.seen = []
    prepare_batch(watched)
    assert Watching.seen and not any(Watching.seen) and gc.isenabled()
    # Back on after a refused batch too.
    with pytest.raises(ValidationError):
        prepare_batch([*watched[1:], {"swarm_id": SWARM, "type": ""}])
    assert gc.isenabled()
    # Left off for a caller who had turned it off.
    gc.disable()
    try:
        prepare_batch(watched)
        assert not gc.isenabled()
    finally:
        gc.enable()
    # Small batches, and iterators (their code is the caller's), run with the collector as it is.
    Watching.seen = []
    prepare_batch(watched[1:])
    prepare_batch(iter(watched))
    assert Watching.seen and all(Watching.seen)


def test_prepare_serialises_the_validated_payload() -> None:
    given = {"swarm_id": SWARM, "type": "t", "payload": {"list": ("a", 1)}}
    row, payload = prepare_event(given)
    assert payload == b'\x01{"list":["a",1]}'  # jsonb's binary form: version 1, then the JSON text
    assert payload_json(payload) == b'{"list":["a",1]}'
    # The row is the event as stored: its payload as a read hands it back, shared with nobody.
    assert type(row) is Event and row[4] == {"list": ["a", 1]}
    assert row[4] is not given["payload"]


# -- the fast path -----------------------------------------------------------------------------------


class Level(IntEnum):
    HIGH = 2


class Text(str):
    pass


class Id(uuid.UUID):
    pass


PG_UUID = driver.uuid_from_bytes()

NESTED_64: Any = []
for _ in range(64):
    NESTED_64 = [NESTED_64]


def same_types(a: Any, b: Any) -> bool:
    """The same types all the way down (1 is not 1.0, a tuple is not a list)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same_types(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same_types(x, y) for x, y in zip(a, b, strict=True))
    return True


def _event(**fields: Any) -> dict[str, Any]:
    return {"swarm_id": SWARM, "type": "agent.step", "id": new_id(), **fields}


#: Valid events: the fast path takes the first ones, declines the rest (``check_event`` takes them).
FAST: list[dict[str, Any]] = [
    _event(),
    _event(payload={"step": 1, "tokens": 120, "model": "kimi-k2.5", "note": "réponse reçue"}),
    _event(
        swarm_id=str(SWARM),
        agent_id=str(new_id()),
        parent_event_id=new_id(),
        payload={"a": [1, 2.5, None, True, {"b": ("c", -0.0)}], "big": 2**63 - 1, "low": -(2**63 - 1)},
        timestamp=dt.datetime(2026, 1, 1, tzinfo=UTC),
        correlation_id="",
        entity_type="task",
        severity="critical",
    ),
    _event(payload={"f": 1.5, "neg": -0.0, "tiny": 5e-324, "none": None, "no": False, "i": -(2**63 - 1)}),
    _event(payload=("a", 1, 2.5, None, True)),
    _event(payload=["a", {"nested": [1]}]),
    _event(payload="a string"),
    _event(payload=0),
    _event(payload=False),
    _event(payload=1.5),
    _event(payload=[]),
    # Ids as the database hands them back (asyncpg's own UUID class): the swarm a caller just made.
    _event(swarm_id=PG_UUID(SWARM.bytes), agent_id=PG_UUID(new_id().bytes), id=PG_UUID(new_id().bytes)),
]
SLOW: list[dict[str, Any]] = [
    _event(payload={"text": "a backslash then u0000: \\u0000"}),  # serialised, it looks like a NUL
    _event(type="étape"),
    _event(correlation_id="run-é"),
    _event(timestamp=dt.datetime(2026, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=2)))),
    _event(payload=OrderedDict(a=1)),
    _event(payload={"deep": NESTED_64[0]}),
    _event(payload=NESTED_64),
    _event(payload="x" * (3 * 1024 * 1024)),
    _event(payload={"level": Level.HIGH}),
    _event(type=Text("agent.step")),
    _event(swarm_id=Id(str(SWARM))),
]


@pytest.mark.parametrize("event", FAST + SLOW, ids=range(len(FAST + SLOW)))
def test_the_fast_path_gives_what_the_full_checks_give(event: dict[str, Any]) -> None:
    slow_row = _check_event(event, "", True)
    slow = (slow_row, dump_payload(slow_row[4], "payload"))
    fast = _fast_event(event, True)
    assert (fast is not None) == any(event is e for e in FAST)
    if fast is not None:
        assert fast[:2] == slow
        assert [type(v) for v in fast[0]] == [type(v) for v in slow[0]]
        stored = orjson.loads(payload_json(slow[1]))
        # The copy it may hand of the payload as stored: equal to the decoded JSON, types too.
        if fast[2] is not None:
            assert fast[2] == stored and same_types(fast[2], stored)
            if isinstance(fast[2], dict | list):  # a container of its own, never the caller's
                assert fast[2] is not event.get("payload")
    # prepare_event and prepare_batch hand the event as stored: its payload decoded from the JSON
    # sent; prepare_batch also stamps ``now`` when no timestamp was given.
    as_stored = (*slow_row[:4], orjson.loads(payload_json(slow[1])), *slow_row[5:])
    assert prepare_event(event) == (as_stored, slow[1])
    assert check_event(event) == slow_row
    assert prepare_batch([event]) == ([as_stored], [slow[1]], [slow_row[0]])
    now = dt.datetime.now(dt.UTC)
    stamped = prepare_batch([event], now)[0][0]
    assert stamped[5] == (now if slow_row[5] is None else slow_row[5])


HOSTILE: list[tuple[str, Any]] = [
    ("payload", {"a": [1, float("nan")]}),
    ("payload", {"a": {"b": float("-inf")}}),
    ("payload", float("inf")),
    ("payload", {"a": 2**63}),
    ("payload", [-(2**63)]),
    ("payload", 2**64),
    ("payload", {"a": ["nul\x00"]}),
    ("payload", {"nul\x00key": 1}),
    ("payload", {"a": ["lone \ud800"]}),
    ("payload", {"lone \udfff": 1}),
    ("payload", {1: "x"}),
    ("payload", {"a": [new_id()]}),
    ("payload", {"a": {1, 2}}),
    ("payload", [NESTED_64]),
    ("payload", {"deep": NESTED_64}),
    ("type", "   "),
    ("type", "t" * 256),
    ("type", "nul\x00"),
    ("type", "lone \ud800"),
    ("correlation_id", "c" * 256),
    ("correlation_id", "lone \ud800"),
    ("entity_type", "robot"),
    ("severity", 1),
    ("swarm_id", "not-a-uuid"),
    ("swarm_id", "1" * 65),
    ("id", 1.5),
    ("agent_id", b"\x00" * 16),
    ("parent_event_id", "nope"),
    ("timestamp", dt.datetime(2026, 1, 1)),
]


@pytest.mark.parametrize(("field", "value"), HOSTILE, ids=[f"{f}={v!r:.40}" for f, v in HOSTILE])
def test_the_fast_path_refuses_nothing_itself(field: str, value: Any) -> None:
    """Bad values are never taken by the fast path; the full checks name the field, on every path."""
    event = _event(**{field: value})
    assert _fast_event(event, True) is None
    with pytest.raises(ValidationError) as caught:
        prepare_event(event)
    assert caught.value.field == field
    with pytest.raises(ValidationError) as caught:
        check_event(event)
    assert caught.value.field == field
    with pytest.raises(ValidationError) as caught:
        prepare_batch([_event(), event])
    assert caught.value.field == f"events[1].{field}"

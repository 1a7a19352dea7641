"""An event as callers give it: its fields, defined once here, and the validation every write shares.

``EventFields`` (the optional fields) and ``EventInput`` (an item of ``create_many``) are the one
definition of the field list: ``EventRepository.create`` and ``EventWriter.create`` take them as
``**fields: Unpack[EventFields]``, ``FIELDS`` (the names accepted) is read from them, and
``check_event`` is the one validation (and the one place that knows the defaults) of every path:
``create``, ``create_many`` and ``EventWriter``.

Validation has a fast path for the common shapes (a dict whose ids are UUIDs or None, ASCII
texts, no timestamp or one in UTC, a payload of plain dicts, lists, strings, numbers, booleans
and None). It only ever accepts what ``check_event`` accepts, and returns what it returns; an
event off that path, and every bad one, goes through ``check_event``, which names the field.
"""

from __future__ import annotations

import datetime as dt
import gc
import itertools
import operator
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Required, TypedDict, cast

import orjson

from dash_storage.core import driver
from dash_storage.core import validation as v
from dash_storage.core.errors import ValidationError
from dash_storage.core.ids import new_id, new_ids
from dash_storage.core.models import EntityType, Event, Severity

__all__ = [
    "ENTITY_TYPES",
    "FIELDS",
    "JSONB_VERSION",
    "MAX_BATCH",
    "PAUSE_GC_BATCH",
    "REQUIRED",
    "SEVERITIES",
    "EventFields",
    "EventInput",
    "EventRow",
    "check_batch",
    "check_event",
    "dump_payload",
    "events_of",
    "make_event",
    "payload_json",
    "prepare_batch",
    "prepare_event",
]

ENTITY_TYPES = frozenset(e.value for e in EntityType)
SEVERITIES = frozenset(s.value for s in Severity)
#: Most events ``create_many`` accepts in one call (one statement; split bigger batches).
MAX_BATCH = 10_000
#: The fewest items (of a list or tuple) for which ``prepare_batch`` pauses the garbage collector:
#: by default a collection is due every 700 new container objects, which a batch makes in a few
#: hundred events.
PAUSE_GC_BATCH = 64
#: The first byte of jsonb's binary form (then the JSON text): how payloads are kept and sent.
JSONB_VERSION = b"\x01"


class EventFields(TypedDict, total=False):
    """The optional fields of an event: the keyword arguments of ``create`` after swarm_id and type.

    Left out: ``payload`` is ``{}``, ``timestamp`` the database clock when the event is written,
    ``entity_type`` "system", ``severity`` "info", ``id`` a new UUIDv7 (made before the first
    attempt, so a retried write stores the event once).
    """

    agent_id: uuid.UUID | str | None
    payload: Any
    timestamp: dt.datetime | None
    correlation_id: str | None
    parent_event_id: uuid.UUID | str | None
    entity_type: str
    severity: str
    id: uuid.UUID | str | None


class EventInput(EventFields, total=False):
    """One item of ``create_many``: ``swarm_id`` and ``type``, plus any of ``EventFields``."""

    swarm_id: Required[uuid.UUID | str]
    type: Required[str]


#: The names of the fields of an event, required (in ``create``'s order) and optional.
REQUIRED: tuple[str, ...] = tuple(
    k for k in EventInput.__annotations__ if k not in EventFields.__annotations__
)
FIELDS: frozenset[str] = frozenset(EventInput.__annotations__)

#: A validated event, in the field order of ``Event`` (which is also the parameter order of
#: insert_event and the column order of the binary COPY): the id is set, the payload is a Python
#: value, the timestamp is in UTC or None (the database clock). The rows of ``prepare_event`` and
#: ``prepare_batch`` are ``Event`` objects already, their payloads as stored (see ``prepare_batch``).
EventRow = tuple[
    uuid.UUID,
    uuid.UUID,
    uuid.UUID | None,
    str,
    Any,
    dt.datetime | None,
    str | None,
    uuid.UUID | None,
    str,
    str,
]
# A row as validation makes it: its id is None when the caller gave none and none was asked for.
_CheckedRow = tuple[
    uuid.UUID | None,
    uuid.UUID,
    uuid.UUID | None,
    str,
    Any,
    dt.datetime | None,
    str | None,
    uuid.UUID | None,
    str,
    str,
]


# New ids are made this many at a time for a batch (fewer when fewer are left to validate).
_ID_BLOCK = 256
#: What asyncpg sends as -infinity / infinity.
_INFINITE = (dt.datetime.min.replace(tzinfo=dt.UTC), dt.datetime.max.replace(tzinfo=dt.UTC))


def check_event(event: Mapping[str, Any], prefix: str = "") -> EventRow:
    """Validate one event given as a mapping of ``EventInput``; the id is generated if not given.

    The field named in an error is ``prefix + name`` (e.g. ``events[3].type``); an unknown key is
    reported on the event itself (``events[3]``).
    """
    got = _fast_event(event, True) if type(event) is dict else None
    row = got[0] if got is not None else _check_event(event, prefix, True)
    return cast(EventRow, row)  # its id is set (new=True)


def _check_event(event: Mapping[str, Any], prefix: str, new: bool) -> _CheckedRow:
    """``check_event`` for any input: every rule, each failure a ValidationError naming the field.
    An id not given is generated if ``new``, else left None."""
    if not FIELDS.issuperset(event):
        unknown = next(key for key in event if key not in FIELDS)
        raise ValidationError(prefix.rstrip(".") or "event", f"has unknown key {unknown!r}")
    for key in REQUIRED:
        if key not in event:
            raise ValidationError(prefix + key, "is required")
    get = event.get
    sid = v.check_uuid(event["swarm_id"], prefix + "swarm_id")
    typ = v.check_text(event["type"], prefix + "type", allow_empty=False)
    assert sid is not None and typ is not None
    payload = get("payload")
    data = {} if payload is None else v.check_json(payload, prefix + "payload")
    ts = v.check_timestamp(get("timestamp"), prefix + "timestamp", optional=True)
    if ts is not None:
        try:
            ts = ts.astimezone(dt.UTC)  # what the database stores and hands back
        except OverflowError:
            raise ValidationError(prefix + "timestamp", "is out of range once converted to UTC") from None
        if ts in _INFINITE:
            # asyncpg sends these as -infinity / infinity, which no time partition holds.
            raise ValidationError(prefix + "timestamp", "must be after datetime.min and before datetime.max")
    event_id = v.check_uuid(get("id"), prefix + "id", optional=True)
    return (
        new_id() if event_id is None and new else event_id,
        sid,
        v.check_uuid(get("agent_id"), prefix + "agent_id", optional=True),
        typ,
        data,
        ts,
        v.check_text(get("correlation_id"), prefix + "correlation_id", optional=True),
        v.check_uuid(get("parent_event_id"), prefix + "parent_event_id", optional=True),
        _choice(get("entity_type", "system"), ENTITY_TYPES, prefix + "entity_type"),
        _choice(get("severity", "info"), SEVERITIES, prefix + "severity"),
    )


def check_batch(events: Any) -> list[EventRow]:
    """Validate the items of ``create_many`` (mappings of ``EventInput``), with distinct ids; an
    id not given is generated."""
    return prepare_batch(events)[0]


def prepare_batch(
    events: Any, now: dt.datetime | None = None
) -> tuple[list[EventRow], list[bytes], list[uuid.UUID]]:
    """Validate the items of ``create_many`` as ``check_batch`` does, in one pass, and make each
    the event as it will be stored, for ``insert_prepared``: an id not given is a new UUIDv7, a
    timestamp not given is ``now`` (left None if ``now`` is None), and the payload is the value
    the JSON text sent stands for, shared with nobody (see ``make_event``). Returns the rows
    (``Event`` objects),
    their payloads serialised in the same order, and the ids the caller gave (only those can be
    stored already).

    Making each row whole here, in one tuple, costs less than completing it later, and for a
    list or tuple of ``PAUSE_GC_BATCH`` items or more, Python's cyclic garbage collector is paused
    during this one synchronous pass (then turned on again if it was on). What the pass makes is
    still in use when it ends, so a collection mid-batch frees nothing; it only moves the batch's
    objects into older generations, which brings on the full collections that scan every object
    of the process. The pause covers no caller code but the items' own mapping methods; memory
    freed by reference counting is freed as usual. A thread that turns the collector off during
    the pass finds it on again afterwards."""
    big = (type(events) is list or type(events) is tuple) and len(events) >= PAUSE_GC_BATCH
    if not big or not gc.isenabled():
        return _prepared(events, now)
    gc.disable()
    try:
        return _prepared(events, now)
    finally:
        gc.enable()


def _prepared(events: Any, now: dt.datetime | None) -> tuple[list[EventRow], list[bytes], list[uuid.UUID]]:
    """``prepare_batch``, the garbage collector aside."""
    if isinstance(events, str | bytes | Mapping) or not isinstance(events, Iterable):
        raise ValidationError("events", "must be a list of events (mappings)")
    rows: list[EventRow] = []
    payloads: list[bytes] = []
    given: list[uuid.UUID] = []
    add_row, add_payload, add_given = rows.append, payloads.append, given.append
    seen: dict[int, int] = {}  # the ids as ints: hashing a UUID object costs a Python call
    first_of = seen.setdefault
    fast, stored, loads = _fast_event, make_event, orjson.loads
    size = len(events) if type(events) is list or type(events) is tuple else None
    fresh: list[uuid.UUID] = []  # new ids not used yet, the next one last
    for i, item in enumerate(events):
        if i >= MAX_BATCH:
            raise ValidationError("events", f"holds more than {MAX_BATCH} events; split the batch")
        got = fast(item, False) if type(item) is dict else None
        if got is None:
            if not isinstance(item, Mapping):
                raise ValidationError(f"events[{i}]", f"must be a mapping, got {type(item).__name__}")
            prefix = f"events[{i}]."
            row = _check_event(item, prefix, False)
            got = row, dump_payload(row[4], prefix + "payload"), None
        row, text, payload = got
        event_id = row[0]
        if event_id is None:
            if not fresh:  # ids for the rest of the batch, a block at a time (cheaper together)
                fresh = new_ids(min(size - i, _ID_BLOCK) if size is not None else _ID_BLOCK)
                fresh.reverse()
            event_id = fresh.pop()
        else:
            first = first_of(event_id.int, i)
            if first != i:
                raise ValidationError(f"events[{i}].id", f"repeats the id of events[{first}]")
            add_given(event_id)
        ts = row[5]
        # The Event as stored (``make_event``), built here in one go.
        add_row(
            stored(
                Event,
                (event_id, row[1], row[2], row[3], loads(text[1:]) if payload is None else payload,
                 now if ts is None else ts, row[6], row[7], row[8], row[9]),
            )
        )  # fmt: skip
        add_payload(text)
    return rows, payloads, given


def prepare_event(event: Mapping[str, Any]) -> tuple[EventRow, bytes]:
    """Validate one event as ``create`` does and serialise its payload (for ``insert_prepared``):
    the row is the event as it will be stored (as in ``prepare_batch``), its timestamp None when
    not given."""
    got = _fast_event(event, True) if type(event) is dict else None
    if got is None:
        row = _check_event(event, "", True)
        got = row, dump_payload(row[4], "payload"), None
    row, text, payload = got
    if payload is None:
        payload = orjson.loads(text[1:])
    r = row
    return make_event(Event, (r[0], r[1], r[2], r[3], payload, r[5], r[6], r[7], r[8], r[9])), text


# tuple.__new__ builds an Event from its fields in order (a tuple, or a record read back), without
# the Python-level __new__ of a NamedTuple, which binds ten arguments by name: half the cost. Each
# Event made by ``prepare_batch`` and ``prepare_event`` holds the event as a read would hand it
# back: every value is what is sent (timestamps in UTC, as the database hands them back), and the
# payload is decoded from the very JSON text sent (what follows jsonb's version byte:
# ``payload_json`` inlined), or for a payload with no nested container a copy, which is the same
# value; either way it shares nothing with the caller's. JSONB keeps its values; what a read may
# spell differently is key order (dict equality ignores it) and a float written with an exponent
# that is a whole number (1e+16 reads back as the equal int 10000000000000000).
make_event = cast(Callable[[type[Event], Iterable[Any]], Event], tuple.__new__)

#: A record's slice of every column: a plain tuple, cut in C.
_ALL_COLUMNS = operator.itemgetter(slice(None))


def events_of(rows: Sequence[Any]) -> list[Event]:
    """Events from rows holding an Event's columns in order (records of a read of the log).

    Each record is first sliced whole, which hands back a plain tuple, and ``make_event`` copies
    a plain tuple without stepping through the record item by item: about a fifth less than
    making each Event from its record, on the path of every read of the log."""
    return list(map(make_event, itertools.repeat(Event, len(rows)), map(_ALL_COLUMNS, rows)))


def dump_payload(value: Any, field: str) -> bytes:
    """The payload as written (and compared with on a retry): jsonb's binary form, the version
    byte 1 and then the JSON text (``payload_json`` reads the JSON text back)."""
    try:
        return JSONB_VERSION + orjson.dumps(value)
    except TypeError as exc:
        raise ValidationError(field, f"is not JSON-serialisable: {exc}") from None


def payload_json(payload: bytes) -> bytes:
    """The JSON text of a payload from ``dump_payload`` / ``prepare_event``."""
    return payload[1:]


def _choice(value: Any, allowed: frozenset[str], field: str) -> str:
    result = v.check_choice(value, allowed, field)
    assert result is not None
    return result


# -- the fast path ---------------------------------------------------------------------------------

_UUID = uuid.UUID
# The exact UUID classes taken as they are: the standard one, and asyncpg's subclass, which every
# id read from the database is (an event of a swarm the caller just created names it so).
_UUIDS = frozenset(driver.uuid_types())
_ID = driver.uuid_types()[1]  # asyncpg's class: the ids this library makes, and every id read
# The event types seen to pass the checks (a batch repeats a few): looked up, not checked again.
_known_types: set[str] = set()
_KNOWN_TYPES = 4096  # at most this many are kept
_DATETIME = dt.datetime
_UTC = dt.UTC
_MAX_TEXT = v.SHORT_TEXT
_MAX_INT = v.BIGINT_MAX
_MAX_DEPTH = v.MAX_JSON_DEPTH
# Serialised JSON at most this long is within check_json's size budget whatever its shape: the
# budget counts 8 bytes per value plus the length of each string, and every value takes at least
# one byte of JSON text (a string its quotes and at least its length).
_FAST_JSON_BYTES = v.MAX_JSON_BYTES // 8
_NUL_ESCAPE = b"\\u0000"  # how orjson writes a NUL character (PostgreSQL's jsonb refuses it)
_SLOW = object()  # "not on the fast path" (None is a valid value)
_FLAT, _NESTED = 1, 2  # the shapes of a plain JSON value (see _plain_json)
_EMPTY_OBJECT = JSONB_VERSION + b"{}"
_dumps = orjson.dumps
_JSONError = orjson.JSONEncodeError


def _fast_event(event: dict[str, Any], new: bool) -> tuple[_CheckedRow, bytes, Any] | None:
    """``(_check_event(event, "", new), dump_payload(...), stored)`` for an event on the fast
    path, else None. ``stored`` is a copy of the payload as the database will hand it back, when
    that is cheap to make (no container in it holds another: a copy of the dict or list, a list
    for a tuple), else None: decode the JSON text for it.

    Accepts a subset of what ``check_event`` accepts and returns the same row: exact types only
    (no subclasses, but asyncpg's own UUID class), ASCII texts, a timestamp whose tzinfo is UTC
    itself; anything else, valid or not, is left to ``check_event``.
    """
    if not FIELDS.issuperset(event):
        return None
    get = event.get
    sid = get("swarm_id")
    if type(sid) is not _ID and type(sid) is not _UUID:
        sid = _uuid_or_slow(sid)
        if sid is None or sid is _SLOW:
            return None
    typ = get("type")
    if type(typ) is not str:
        return None
    if typ not in _known_types:
        if not 0 < len(typ) <= _MAX_TEXT or not typ.isascii() or "\x00" in typ or typ.isspace():
            return None
        if len(_known_types) >= _KNOWN_TYPES:
            _known_types.clear()
        _known_types.add(typ)
    payload = get("payload")
    if payload is None:
        data: Any = {}
        stored: Any = {}
        text = _EMPTY_OBJECT
    else:
        shape = _plain_json(payload, 0)
        if not shape:
            return None
        try:
            text = _dumps(payload)
        except _JSONError:  # e.g. a lone surrogate or a non-string key: check_event says which
            return None
        if len(text) > _FAST_JSON_BYTES or _NUL_ESCAPE in text:
            return None
        # A new, exactly sized bytes: orjson's own result holds a much larger allocation, which
        # costs more to keep than this copy.
        text = JSONB_VERSION + text
        data = payload
        if shape == _FLAT:  # a copy is the payload as stored, much cheaper than decoding the text
            t = type(payload)
            stored = payload.copy() if t is dict else list(payload) if t is list or t is tuple else payload
        else:
            stored = None
    ts = get("timestamp")
    if ts is not None and (type(ts) is not _DATETIME or ts.tzinfo is not _UTC or ts in _INFINITE):
        return None
    corr = get("correlation_id")
    if corr is not None and (
        type(corr) is not str or len(corr) > _MAX_TEXT or not corr.isascii() or "\x00" in corr
    ):
        return None
    entity_type = get("entity_type", "system")
    severity = get("severity", "info")
    if (
        type(entity_type) is not str
        or entity_type not in ENTITY_TYPES
        or type(severity) is not str
        or severity not in SEVERITIES
    ):
        return None
    agent = get("agent_id")
    if agent is not None and type(agent) is not _UUID and (agent := _uuid_or_slow(agent)) is _SLOW:
        return None
    parent = get("parent_event_id")
    if parent is not None and type(parent) is not _UUID and (parent := _uuid_or_slow(parent)) is _SLOW:
        return None
    event_id = get("id")
    if event_id is None:
        if new:
            event_id = new_id()
    elif type(event_id) is not _UUID and (event_id := _uuid_or_slow(event_id)) is _SLOW:
        return None
    row = cast(_CheckedRow, (event_id, sid, agent, typ, data, ts, corr, parent, entity_type, severity))
    return row, text, stored


def _uuid_or_slow(value: Any) -> Any:
    """``check_uuid(value, optional=True)`` for a UUID, None or a UUID string; else ``_SLOW``."""
    if value is None or type(value) in _UUIDS:
        return value
    if type(value) is str and len(value) <= 64:
        try:
            return _UUID(value)
        except ValueError:
            pass
    return _SLOW


def _plain_json(value: Any, depth: int) -> int:
    """``_FLAT`` or ``_NESTED`` if ``value`` is made only of exact dicts, lists, tuples, strings,
    bools, None, 64-bit ints and finite floats, nested no deeper than check_json allows (``_FLAT``:
    no container holds another), else 0. Strings are not read here: what check_json refuses in
    them (NUL, a lone surrogate) shows in, or stops, the serialisation."""
    t = type(value)
    if t is dict:
        items: Any = value.values()
    elif t is list or t is tuple:
        items = value
    else:
        return _FLAT if t is str or value is None or t is bool or _plain_scalar(value) else 0
    if depth >= _MAX_DEPTH:
        return 0
    shape = _FLAT
    for item in items:
        t = type(item)
        if t is str or item is None or t is bool:
            continue
        if t is int:
            if -_MAX_INT <= item <= _MAX_INT:
                continue
            return 0
        if t is float:
            if item - item == 0.0:  # finite: inf - inf and nan - nan are nan
                continue
            return 0
        if not _plain_json(item, depth + 1):
            return 0
        shape = _NESTED
    return shape


def _plain_scalar(value: Any) -> bool:
    t = type(value)
    if t is int:
        return bool(-_MAX_INT <= value <= _MAX_INT)
    if t is float:
        return bool(value - value == 0.0)
    return False

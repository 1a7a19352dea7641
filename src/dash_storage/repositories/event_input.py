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
import uuid
from collections.abc import Iterable, Mapping
from typing import Any, Required, TypedDict, cast

import orjson

from dash_storage.core import driver
from dash_storage.core import validation as v
from dash_storage.core.errors import ValidationError
from dash_storage.core.ids import new_id
from dash_storage.core.models import EntityType, Severity

__all__ = [
    "ENTITY_TYPES",
    "FIELDS",
    "JSONB_VERSION",
    "MAX_BATCH",
    "REQUIRED",
    "SEVERITIES",
    "EventFields",
    "EventInput",
    "EventRow",
    "PendingRow",
    "check_batch",
    "check_event",
    "dump_payload",
    "payload_json",
    "prepare_batch",
    "prepare_event",
]

ENTITY_TYPES = frozenset(e.value for e in EntityType)
SEVERITIES = frozenset(s.value for s in Severity)
#: Most events ``create_many`` accepts in one call (one statement; split bigger batches).
MAX_BATCH = 10_000
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
#: insert_event and the column order of the binary COPY): the id is set, the payload is still a
#: Python value, the timestamp is in UTC or None (the database clock).
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
#: A row of ``prepare_batch``: an EventRow whose id is None when the caller gave none. Generating
#: ids costs about as much as validating; ``event_ingest`` does it while the server inserts the
#: rows sent before, always before the row is first sent (so every attempt sends the same id).
PendingRow = tuple[
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


def _check_event(event: Mapping[str, Any], prefix: str, new: bool) -> PendingRow:
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
    return [cast(EventRow, r if r[0] is not None else (new_id(), *r[1:])) for r in prepare_batch(events)[0]]


def prepare_batch(events: Any) -> tuple[list[PendingRow], list[bytes]]:
    """Validate the items of ``create_many`` as ``check_batch`` does, in one pass, and serialise
    their payloads (for ``insert_prepared``): the rows, and the payloads in the same order. An id
    not given is left None, for ``insert_prepared`` to generate."""
    if isinstance(events, str | bytes | Mapping) or not isinstance(events, Iterable):
        raise ValidationError("events", "must be a list of events (mappings)")
    rows: list[PendingRow] = []
    payloads: list[bytes] = []
    add_row, add_payload = rows.append, payloads.append
    seen: dict[int, int] = {}  # the ids as ints: hashing a UUID object costs a Python call
    first_of = seen.setdefault
    fast = _fast_event
    for i, item in enumerate(events):
        if i >= MAX_BATCH:
            raise ValidationError("events", f"holds more than {MAX_BATCH} events; split the batch")
        got = fast(item, False) if type(item) is dict else None
        if got is None:
            if not isinstance(item, Mapping):
                raise ValidationError(f"events[{i}]", f"must be a mapping, got {type(item).__name__}")
            prefix = f"events[{i}]."
            row = _check_event(item, prefix, False)
            got = row, dump_payload(row[4], prefix + "payload")
        row = got[0]
        if row[0] is not None:  # ids generated later are new, and distinct
            first = first_of(row[0].int, i)
            if first != i:
                raise ValidationError(f"events[{i}].id", f"repeats the id of events[{first}]")
        add_row(row)
        add_payload(got[1])
    return rows, payloads


def prepare_event(event: Mapping[str, Any]) -> tuple[EventRow, bytes]:
    """Validate one event as ``create`` does and serialise its payload (for ``insert_prepared``)."""
    got = _fast_event(event, True) if type(event) is dict else None
    if got is None:
        row = _check_event(event, "", True)
        got = row, dump_payload(row[4], "payload")
    return cast(tuple[EventRow, bytes], got)  # its id is set (new=True)


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
_EMPTY_OBJECT = JSONB_VERSION + b"{}"
_dumps = orjson.dumps
_JSONError = orjson.JSONEncodeError


def _fast_event(event: dict[str, Any], new: bool) -> tuple[PendingRow, bytes] | None:
    """``(_check_event(event, "", new), dump_payload(...))`` for an event on the fast path, else
    None.

    Accepts a subset of what ``check_event`` accepts and returns the same row: exact types only
    (no subclasses, but asyncpg's own UUID class), ASCII texts, a timestamp whose tzinfo is UTC
    itself; anything else, valid or not, is left to ``check_event``.
    """
    if not FIELDS.issuperset(event):
        return None
    get = event.get
    sid = get("swarm_id")
    if type(sid) is not _UUID:
        sid = _uuid_or_slow(sid)
        if sid is None or sid is _SLOW:
            return None
    typ = get("type")
    if (
        type(typ) is not str
        or not 0 < len(typ) <= _MAX_TEXT
        or not typ.isascii()
        or "\x00" in typ
        or typ.isspace()
    ):
        return None
    payload = get("payload")
    if payload is None:
        data: Any = {}
        text = _EMPTY_OBJECT
    else:
        if not _plain_json(payload, 0):
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
    row = (event_id, sid, agent, typ, data, ts, corr, parent, entity_type, severity)
    return row, text


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


def _plain_json(value: Any, depth: int) -> bool:
    """True if ``value`` is made only of exact dicts, lists, tuples, strings, bools, None,
    64-bit ints and finite floats, nested no deeper than check_json allows. Strings are not read
    here: what check_json refuses in them (NUL, a lone surrogate) shows in, or stops, the
    serialisation."""
    t = type(value)
    if t is dict:
        items: Any = value.values()
    elif t is list or t is tuple:
        items = value
    else:
        return t is str or value is None or t is bool or _plain_scalar(value)
    if depth >= _MAX_DEPTH:
        return False
    for item in items:
        t = type(item)
        if t is str or item is None or t is bool:
            continue
        if t is int:
            if -_MAX_INT <= item <= _MAX_INT:
                continue
            return False
        if t is float:
            if item - item == 0.0:  # finite: inf - inf and nan - nan are nan
                continue
            return False
        if not _plain_json(item, depth + 1):
            return False
    return True


def _plain_scalar(value: Any) -> bool:
    t = type(value)
    if t is int:
        return bool(-_MAX_INT <= value <= _MAX_INT)
    if t is float:
        return bool(value - value == 0.0)
    return False

"""Validated events in PostgreSQL's binary COPY format, for ``COPY events (...) FROM STDIN``.

asyncpg's ``copy_records_to_table`` would need binary codecs for every column, and the pool's JSONB
codec is text-format, so the rows are encoded here: as fast, and no per-connection introspection
query. The format: a signature, flags (0) and header extension length (0); per row a field count,
then per field its length (-1 for NULL) and bytes; the data ends with -1. A jsonb field is its
binary form, which the payloads already are (version byte 1, then the JSON text).
"""

from __future__ import annotations

import datetime as dt
import struct
from collections.abc import Iterator, Sequence

from dash_storage.core.models import Event
from dash_storage.repositories.event_input import ENTITY_TYPES, SEVERITIES, EventRow

__all__ = [
    "COPY_COLUMNS",
    "COPY_TABLE",
    "FIRST_CHUNK",
    "MAX_CHUNK",
    "chunk_ranges",
    "copy_chunk",
    "copy_data",
]

#: The table and columns of the COPY, in the order ``copy_data`` encodes them (that of EventRow).
COPY_TABLE = "events"
COPY_COLUMNS = Event._fields
#: Rows in the first piece of ``chunk_ranges``; the pieces after it double, up to MAX_CHUNK rows.
FIRST_CHUNK = 64
MAX_CHUNK = 512

_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_TRAILER = b"\xff\xff"
_NULL = b"\xff\xff\xff\xff"
# The field count, then id, swarm_id and agent_id (each its length and 16 bytes), or agent_id NULL.
_ROW_START = struct.Struct(">hi16si16si16s").pack
_ROW_START_NO_AGENT = struct.Struct(">hi16si16si").pack
_LENGTH = struct.Struct(">i").pack
_UUID = struct.Struct(">i16s").pack
_TIMESTAMP = struct.Struct(">iq").pack  # length 8, microseconds since 2000-01-01 UTC
_PG_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
_MICROSECOND = dt.timedelta(microseconds=1)
_FIELDS = len(COPY_COLUMNS)
_NOTHING_YET = object()  # no timestamp (or id) encoded yet
# entity_type and severity as COPY fields (length, then UTF-8), both at once, encoded once.
_CHOICE_PAIRS = {
    (e, s): _LENGTH(len(e.encode())) + e.encode() + _LENGTH(len(s.encode())) + s.encode()
    for e in ENTITY_TYPES
    for s in SEVERITIES
}


def copy_data(rows: Sequence[EventRow], payloads: Sequence[bytes]) -> bytes:
    """``rows`` (with their payloads in jsonb's binary form, as ``prepare_event`` makes them, and
    each with its timestamp) as binary COPY data, columns in COPY_COLUMNS order."""
    return _encode(rows, payloads, _HEADER, _TRAILER)


def chunk_ranges(n: int) -> Iterator[tuple[int, int]]:
    """The rows (start, end) of each piece of the COPY data of ``n`` rows: a first piece of
    ``FIRST_CHUNK`` rows, so that the server starts inserting at once, then pieces twice as big as
    the one before (up to ``MAX_CHUNK`` rows), encoded while the server inserts those sent."""
    start, size = 0, FIRST_CHUNK
    while True:
        end = min(start + size, n)
        yield start, end
        if end == n:
            return
        start, size = end, min(2 * size, MAX_CHUNK)


def copy_chunk(rows: Sequence[EventRow], payloads: Sequence[bytes], start: int, end: int) -> bytes:
    """Rows ``start`` to ``end`` of ``copy_data(rows, payloads)``: the piece of it they make (with
    the header if ``start`` is 0, and the trailer if ``end`` is the last row)."""
    head, tail = _HEADER if start == 0 else b"", _TRAILER if end == len(rows) else b""
    return _encode(rows[start:end], payloads[start:end], head, tail)


def _encode(rows: Sequence[EventRow], payloads: Sequence[bytes], head: bytes, tail: bytes) -> bytes:
    """``head``, the rows as binary COPY data, then ``tail``."""
    # The timestamp field last encoded, by the datetime it came from: a batch stamped by the
    # library shares one datetime object, so it is encoded once. Likewise the swarm and agent ids:
    # a batch usually names one swarm (and agent) object throughout.
    last_ts: object = _NOTHING_YET
    last_field = b""
    last_swarm: object = _NOTHING_YET
    swarm_bytes = b""
    last_agent: object = _NOTHING_YET
    agent_bytes = b""
    null_null = _NULL + _NULL  # correlation_id and parent_event_id both left out
    out = [head]
    add = out.append
    null, length, uuid_field, choices = _NULL, _LENGTH, _UUID, _CHOICE_PAIRS
    types: dict[str, bytes] = {}  # the type field of each type seen (a batch repeats a few)
    # One list of pieces joined once; a UUID's 16 bytes from its int (``.bytes`` is a property
    # of the standard class that does the same, at the cost of a Python call).
    for r, p in zip(rows, payloads, strict=True):
        swarm, agent, typ, ts, corr, parent = r[1], r[2], r[3], r[5], r[6], r[7]
        if swarm is not last_swarm:
            last_swarm, swarm_bytes = swarm, swarm.int.to_bytes(16)
        if agent is None:
            add(_ROW_START_NO_AGENT(_FIELDS, 16, r[0].int.to_bytes(16), 16, swarm_bytes, -1))
        else:
            if agent is not last_agent:
                last_agent, agent_bytes = agent, agent.int.to_bytes(16)
            add(_ROW_START(_FIELDS, 16, r[0].int.to_bytes(16), 16, swarm_bytes, 16, agent_bytes))
        field = types.get(typ)
        if field is None:
            field = types[typ] = _text_field(typ)
        add(field)
        add(length(len(p)))
        add(p)
        if ts is last_ts:
            add(last_field)
        else:
            assert ts is not None, "every row is stamped before it is encoded"
            last_ts, last_field = ts, _TIMESTAMP(8, (ts - _PG_EPOCH) // _MICROSECOND)
            add(last_field)
        if corr is None and parent is None:
            add(null_null)
        else:
            add(null if corr is None else _text_field(corr))
            add(null if parent is None else uuid_field(16, parent.int.to_bytes(16)))
        add(choices[r[8], r[9]])
    add(tail)
    return b"".join(out)


def _text_field(text: str) -> bytes:
    data = text.encode()
    return _LENGTH(len(data)) + data

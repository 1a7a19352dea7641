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
from collections.abc import Sequence

from dash_storage.core.models import Event
from dash_storage.repositories.event_input import ENTITY_TYPES, SEVERITIES, EventRow

__all__ = ["COPY_COLUMNS", "COPY_TABLE", "copy_data"]

#: The table and columns of the COPY, in the order ``copy_data`` encodes them (that of EventRow).
COPY_TABLE = "events"
COPY_COLUMNS = Event._fields

_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_TRAILER = b"\xff\xff"
_NULL = b"\xff\xff\xff\xff"
_ROW_START = struct.Struct(">hi16si16s").pack  # field count; id and swarm_id (length, 16 bytes)
_LENGTH = struct.Struct(">i").pack
_UUID = struct.Struct(">i16s").pack
_TIMESTAMP = struct.Struct(">iq").pack  # length 8, microseconds since 2000-01-01 UTC
_PG_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
_MICROSECOND = dt.timedelta(microseconds=1)
_FIELDS = len(COPY_COLUMNS)
# entity_type and severity as COPY fields (length, then UTF-8), encoded once.
_CHOICES = {c: _LENGTH(len(c.encode())) + c.encode() for c in ENTITY_TYPES | SEVERITIES}


def copy_data(rows: Sequence[EventRow], payloads: Sequence[bytes], now: dt.datetime | None) -> bytes:
    """``rows`` (with their payloads in jsonb's binary form, as ``prepare_event`` makes them) as
    binary COPY data, columns in COPY_COLUMNS order. A row without a timestamp gets ``now``, which
    must then be given."""
    default_ts = b"" if now is None else _TIMESTAMP(8, (now - _PG_EPOCH) // _MICROSECOND)
    out = [_HEADER]
    add = out.append
    null, choices, length, uuid_field = _NULL, _CHOICES, _LENGTH, _UUID
    # One list of pieces joined once; a UUID's 16 bytes from its int (``.bytes`` is a property
    # that does the same, at the cost of a Python call).
    for r, p in zip(rows, payloads, strict=True):
        typ = r[3].encode()
        agent, ts, corr, parent = r[2], r[5], r[6], r[7]
        add(_ROW_START(_FIELDS, 16, r[0].int.to_bytes(16), 16, r[1].int.to_bytes(16)))
        add(null if agent is None else uuid_field(16, agent.int.to_bytes(16)))
        add(length(len(typ)))
        add(typ)
        add(length(len(p)))
        add(p)
        add(default_ts if ts is None else _TIMESTAMP(8, (ts - _PG_EPOCH) // _MICROSECOND))
        if corr is None:
            add(null)
        else:
            text = corr.encode()
            add(length(len(text)))
            add(text)
        add(null if parent is None else uuid_field(16, parent.int.to_bytes(16)))
        add(choices[r[8]])
        add(choices[r[9]])
    add(_TRAILER)
    return b"".join(out)

"""The binary COPY encoding of events, read back with an independent decoder of the format."""

from __future__ import annotations

import datetime as dt
import struct
import uuid
from typing import Any

import orjson
import pytest

from dash_storage.core.ids import new_id
from dash_storage.core.models import Event
from dash_storage.repositories.event_copy import (
    COPY_COLUMNS,
    FIRST_CHUNK,
    MAX_CHUNK,
    chunk_ranges,
    copy_chunk,
    copy_data,
)
from dash_storage.repositories.event_input import EventRow, prepare_event

UTC = dt.UTC
PG_EPOCH = dt.datetime(2000, 1, 1, tzinfo=UTC)
SIGNATURE = b"PGCOPY\n\xff\r\n\x00"


def decode(data: bytes) -> list[list[bytes | None]]:
    """The fields of every row of PostgreSQL binary COPY data (the format as documented)."""
    assert data[:11] == SIGNATURE
    flags, extension = struct.unpack(">ii", data[11:19])
    assert (flags, extension) == (0, 0)
    pos, rows = 19, []
    while True:
        (count,) = struct.unpack(">h", data[pos : pos + 2])
        pos += 2
        if count == -1:
            assert pos == len(data), "bytes after the trailer"
            return rows
        fields: list[bytes | None] = []
        for _ in range(count):
            (length,) = struct.unpack(">i", data[pos : pos + 4])
            pos += 4
            if length == -1:
                fields.append(None)
            else:
                fields.append(data[pos : pos + length])
                pos += length
        rows.append(fields)


def timestamp_of(field: bytes) -> dt.datetime:
    (micros,) = struct.unpack(">q", field)
    return PG_EPOCH + dt.timedelta(microseconds=micros)


def as_event(fields: list[bytes | None]) -> Event:
    """A decoded row as the Event it encodes (columns in COPY_COLUMNS order)."""
    values: dict[str, Any] = dict(zip(COPY_COLUMNS, fields, strict=True))
    for key in ("id", "swarm_id", "agent_id", "parent_event_id"):
        raw = values[key]
        values[key] = None if raw is None else uuid.UUID(bytes=raw)
    for key in ("type", "correlation_id", "entity_type", "severity"):
        raw = values[key]
        values[key] = None if raw is None else raw.decode()
    payload = values["payload"]
    assert payload is not None and payload[:1] == b"\x01", "JSONB binary version 1"
    values["payload"] = orjson.loads(payload[1:])
    values["timestamp"] = timestamp_of(values["timestamp"])
    return Event(**values)


def prepared(**event: Any) -> tuple[EventRow, bytes]:
    return prepare_event({"swarm_id": new_id(), "type": "t", **event})


def stamped(rows: list[EventRow], now: dt.datetime) -> list[EventRow]:
    """``rows``, those without a timestamp given ``now`` (as the library stamps them before it
    encodes them: one datetime for the whole batch)."""
    return [r if r[5] is not None else (*r[:5], now, *r[6:]) for r in rows]


def test_columns_are_the_event_fields() -> None:
    assert COPY_COLUMNS == Event._fields


def test_every_field_round_trips() -> None:
    at = dt.datetime(2026, 11, 30, 12, 34, 56, 789012, tzinfo=UTC)
    full = prepared(
        agent_id=new_id(),
        payload={"ünï": ["cödé", 1, 2.5, None, True], "nested": {"k": "v"}},
        timestamp=at,
        correlation_id="corr-é",
        parent_event_id=new_id(),
        entity_type="agent",
        severity="critical",
    )
    bare = prepared()
    now = dt.datetime(2026, 12, 1, tzinfo=UTC)
    rows = decode(copy_data(stamped([full[0], bare[0]], now), [full[1], bare[1]]))
    assert len(rows) == 2 and all(len(r) == len(COPY_COLUMNS) for r in rows)
    first, second = (as_event(r) for r in rows)
    row = full[0]
    assert first == Event(*row)
    # Left out: NULLs, the defaults, and the timestamp the library stamped.
    assert second == Event(bare[0][0], bare[0][1], None, "t", {}, now, None, None, "system", "info")
    assert rows[1][2] is None and rows[1][6] is None and rows[1][7] is None


@pytest.mark.parametrize(
    "at",
    [
        dt.datetime(2000, 1, 1, tzinfo=UTC),
        dt.datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),  # before the PostgreSQL epoch
        # The extremes an event may have (datetime.min and .max themselves are refused: asyncpg
        # sends them as -infinity / infinity, which no time partition holds).
        dt.datetime(1, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
        dt.datetime(9999, 12, 31, 23, 59, 59, 999998, tzinfo=UTC),
        dt.datetime(2026, 3, 29, 2, 30, tzinfo=dt.timezone(dt.timedelta(hours=-7))),
    ],
)
def test_timestamps_are_exact_to_the_microsecond(at: dt.datetime) -> None:
    row, payload = prepared(timestamp=at)
    (fields,) = decode(copy_data([row], [payload]))
    assert timestamp_of(fields[5] or b"") == at


def test_the_payload_is_the_json_text_given() -> None:
    # The bytes sent are exactly the JSON the retry path compares with (no second serialisation).
    row, payload = prepared(payload={"b": 1, "a": [1e16, "\u2028"]})
    (fields,) = decode(copy_data(stamped([row], dt.datetime.now(UTC)), [payload]))
    assert fields[4] == payload == b"\x01" + orjson.dumps(row[4])


def test_no_rows_is_a_header_and_a_trailer() -> None:
    assert decode(copy_data([], [])) == []


@pytest.mark.parametrize("n", [0, 1, FIRST_CHUNK, FIRST_CHUNK + 1, 1000, 3 * MAX_CHUNK + 7])
def test_the_chunks_join_to_the_data(n: int) -> None:
    events = [prepared(payload={"i": i}, correlation_id=str(i) if i % 2 else None) for i in range(n)]
    rows, payloads = stamped([e[0] for e in events], dt.datetime.now(UTC)), [e[1] for e in events]
    chunks = [copy_chunk(rows, payloads, start, end) for start, end in chunk_ranges(n)]
    assert b"".join(chunks) == copy_data(rows, payloads)
    # A small first piece (the server starts inserting at once), then pieces twice as big as the
    # one before, up to MAX_CHUNK rows.
    header, trailer = SIGNATURE + bytes(8), b"\xff\xff"
    counted = [
        len(decode((b"" if i == 0 else header) + chunk + (b"" if i == len(chunks) - 1 else trailer)))
        for i, chunk in enumerate(chunks)
    ]
    expected, size, left = [], FIRST_CHUNK, n
    while True:
        expected.append(min(size, left))
        left -= expected[-1]
        if not left:
            break
        size = min(2 * size, MAX_CHUNK)
    assert counted == expected


@pytest.mark.parametrize(
    "fields",
    [
        {"correlation_id": "only-this"},
        {"parent_event_id": new_id()},
        {"timestamp": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)},
        {"agent_id": new_id(), "type": "ünï-type", "severity": "debug", "entity_type": "task"},
    ],
)
def test_each_optional_field_alone_round_trips(fields: dict[str, Any]) -> None:
    now = dt.datetime(2026, 12, 1, tzinfo=UTC)
    events = [prepared(**fields), prepared(), prepared(**fields)]  # rows of both shapes, mixed
    rows = decode(copy_data(stamped([e[0] for e in events], now), [e[1] for e in events]))
    for (row, _), fields_read in zip(events, rows, strict=True):
        assert as_event(fields_read) == Event(*row[:5], row[5] or now, *row[6:])

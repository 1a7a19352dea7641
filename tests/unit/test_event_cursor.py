"""The keyset cursor of the event log: exact round trips, and anything not made by it refused."""

from __future__ import annotations

import base64
import datetime as dt
import struct
import uuid

import pytest

from dash_storage.core.errors import DashStorageError, ValidationError
from dash_storage.core.ids import new_id
from dash_storage.core.models import Event
from dash_storage.repositories.event_cursor import decode_cursor, encode_cursor
from dash_storage.repositories.events import EventRepository

UTC = dt.UTC
PLUS_5 = dt.timezone(dt.timedelta(hours=5, minutes=30))
NOT_A_CURSOR = "is not a cursor returned by EventRepository.cursor()"


def raw_cursor(version: bytes, micros: int, event_id: bytes = bytes(16)) -> str:
    """A cursor spelled by hand, as a client could forge one."""
    raw = version + struct.pack(">q", micros) + event_id
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


@pytest.mark.parametrize(
    "timestamp",
    [
        dt.datetime(2026, 11, 30, 17, 0, 0, 123456, tzinfo=UTC),
        dt.datetime(1970, 1, 1, tzinfo=UTC),
        dt.datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),  # negative microseconds
        dt.datetime(1, 1, 1, tzinfo=UTC),
        dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        dt.datetime(2026, 6, 1, 12, 0, 0, 1, tzinfo=PLUS_5),  # any aware time: the same instant
    ],
)
def test_round_trip_keeps_the_exact_position(timestamp: dt.datetime) -> None:
    event_id = new_id()
    cursor = encode_cursor(timestamp, event_id)
    assert len(cursor) == 34 and cursor.isascii()
    decoded_at, decoded_id = decode_cursor(cursor)
    assert decoded_at == timestamp and decoded_at.tzinfo == UTC
    assert decoded_id == event_id


def test_repository_cursor_is_the_events_position() -> None:
    at = dt.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    event = Event(new_id(), new_id(), None, "t", {}, at, None, None, "system", "info")
    assert decode_cursor(EventRepository.cursor(event)) == (at, event.id)


def test_cursors_of_one_timestamp_differ_by_id() -> None:
    at = dt.datetime(2026, 1, 1, tzinfo=UTC)
    first, second = uuid.UUID(int=1), uuid.UUID(int=2)
    assert encode_cursor(at, first) != encode_cursor(at, second)
    assert decode_cursor(encode_cursor(at, second))[1] == second


VALID = encode_cursor(dt.datetime(2026, 1, 1, tzinfo=UTC), uuid.UUID(int=0xABC))


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (None, NOT_A_CURSOR),
        (12345, NOT_A_CURSOR),
        (VALID.encode(), NOT_A_CURSOR),  # bytes, not str
        ("", NOT_A_CURSOR),
        (VALID[:-1], NOT_A_CURSOR),  # truncated
        (VALID + "A", NOT_A_CURSOR),  # extended
        (VALID + "==", NOT_A_CURSOR),  # padded
        (VALID[:10] + "+" + VALID[11:], NOT_A_CURSOR),  # standard base64, not base64url
        (VALID[:10] + "é" + VALID[11:], NOT_A_CURSOR),
        (" " + VALID[1:], NOT_A_CURSOR),
        ("not a cursor at all, just words!!", NOT_A_CURSOR),
        (raw_cursor(b"\x02", 0), NOT_A_CURSOR),  # a version this code never wrote
        (raw_cursor(b"\x00", 0), NOT_A_CURSOR),
        (raw_cursor(b"\x01", 2**63 - 1), "holds a timestamp out of range"),
        (raw_cursor(b"\x01", -(2**63)), "holds a timestamp out of range"),
    ],
)
def test_garbage_is_refused_with_a_clear_error(value: object, problem: str) -> None:
    with pytest.raises(ValidationError) as caught:
        decode_cursor(value)
    assert caught.value.field == "after"
    assert caught.value.problem == problem
    assert isinstance(caught.value, DashStorageError)


def test_a_non_canonical_spelling_is_refused() -> None:
    # 25 bytes are 33⅓ base64 characters: the last character carries 4 unused low bits. A cursor
    # with any of them set decodes to the same bytes, but is not what encode_cursor writes.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(VALID[-1])
    assert last & 0b1111 == 0
    for stray in range(1, 16):
        tampered = VALID[:-1] + alphabet[last | stray]
        assert base64.urlsafe_b64decode(tampered + "==") == base64.urlsafe_b64decode(VALID + "==")
        with pytest.raises(ValidationError) as caught:
            decode_cursor(tampered)
        assert caught.value.problem == NOT_A_CURSOR


def test_the_field_named_is_the_callers() -> None:
    with pytest.raises(ValidationError) as caught:
        decode_cursor("nope", field="position")
    assert caught.value.field == "position"

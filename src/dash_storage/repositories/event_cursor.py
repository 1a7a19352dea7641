"""The opaque keyset cursor of the event log: a position ``("timestamp", id)``, as a short string.

A cursor is base64url (no padding) of a version byte, the timestamp in microseconds since the Unix
epoch (UTC, signed 64-bit) and the event id (16 bytes): 34 characters. Decoding is strict: only
the exact spelling ``encode_cursor`` makes is accepted, so a tampered or made-up cursor is a
ValidationError, never a silently different position.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
import struct
import uuid
from typing import Any

from dash_storage.core.errors import ValidationError

__all__ = ["decode_cursor", "encode_cursor"]

_VERSION = b"\x01"
_STRUCT = struct.Struct(">q16s")  # microseconds since the Unix epoch (UTC), event id
_LENGTH = 34  # base64url (no padding) of 1 + 8 + 16 bytes
_SPELLING = re.compile(r"[A-Za-z0-9_-]{34}")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_NOT_A_CURSOR = "is not a cursor returned by EventRepository.cursor()"


def encode_cursor(timestamp: dt.datetime, event_id: uuid.UUID) -> str:
    """The cursor positioned at (``timestamp``, ``event_id``); ``timestamp`` must be aware."""
    delta = timestamp - _EPOCH
    micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    raw = _VERSION + _STRUCT.pack(micros, event_id.bytes)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(value: Any, field: str = "after") -> tuple[dt.datetime, uuid.UUID]:
    """Strictly decode a cursor made by ``encode_cursor``; anything else is a ValidationError."""
    if not isinstance(value, str) or len(value) != _LENGTH or not _SPELLING.fullmatch(value):
        raise ValidationError(field, _NOT_A_CURSOR)
    try:
        raw = base64.urlsafe_b64decode(value + "==")
    except (binascii.Error, ValueError):
        raise ValidationError(field, _NOT_A_CURSOR) from None
    if len(raw) != 1 + _STRUCT.size or raw[:1] != _VERSION:
        raise ValidationError(field, _NOT_A_CURSOR)
    micros, id_bytes = _STRUCT.unpack(raw[1:])
    try:
        timestamp = _EPOCH + dt.timedelta(microseconds=micros)
    except OverflowError:
        raise ValidationError(field, "holds a timestamp out of range") from None
    event_id = uuid.UUID(bytes=id_bytes)
    if encode_cursor(timestamp, event_id) != value:  # non-canonical spelling (stray low bits)
        raise ValidationError(field, _NOT_A_CURSOR)
    return timestamp, event_id

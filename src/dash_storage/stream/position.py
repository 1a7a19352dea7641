"""A position in the event stream, and the opaque cursor string that carries it.

A position is (transaction id, seq) of the last event a reader has passed; the stream continues
with every event after it. The cursor string is versioned and checked, so a stored cursor from a
later release, or a typo, is refused with a clear error rather than read as a wrong place.
"""

from __future__ import annotations

import base64
import binascii
import struct
from typing import NamedTuple

from dash_storage.core.errors import ValidationError

__all__ = ["BEGINNING", "Position", "decode", "encode"]

_PREFIX = "s1."
_LAYOUT = struct.Struct(">QQ")
_MAX_SEQ = 2**63 - 1


class Position(NamedTuple):
    tx_id: int
    seq: int

    @classmethod
    def before_mark(cls, mark: int) -> Position:
        """The position just before every transaction at or above ``mark``."""
        return cls(max(mark - 1, 0), _MAX_SEQ)

    def redis_id(self) -> str:
        """The Redis stream entry id of the event at this position (both parts are 64-bit)."""
        return f"{self.tx_id}-{self.seq}"


BEGINNING = Position(0, 0)


def encode(position: Position) -> str:
    return _PREFIX + base64.urlsafe_b64encode(_LAYOUT.pack(*position)).decode().rstrip("=")


def decode(cursor: str, *, field: str = "after") -> Position:
    """The position in ``cursor``; ValidationError naming ``field`` if it is not one of ours."""
    if not isinstance(cursor, str) or not cursor.startswith(_PREFIX):
        raise ValidationError(field, f"not a stream cursor: {cursor!r:.80}")
    body = cursor[len(_PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        raise ValidationError(field, f"not a stream cursor: {cursor!r:.80}") from None
    if len(raw) != _LAYOUT.size:
        raise ValidationError(field, f"not a stream cursor: {cursor!r:.80}")
    tx_id, seq = _LAYOUT.unpack(raw)
    if seq > _MAX_SEQ:
        raise ValidationError(field, f"not a stream cursor: {cursor!r:.80}")
    return Position(tx_id, seq)

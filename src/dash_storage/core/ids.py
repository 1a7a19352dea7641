"""Client-generated ids: UUIDv7 (RFC 9562), time-ordered so new rows land at the right edge of the
primary-key index, and known before the INSERT so that a retried create can never add a second row."""

from __future__ import annotations

import random
import struct
import threading
import time
import uuid

from dash_storage.core import driver

__all__ = ["new_id", "new_ids"]

# Ids must be unique, not secret: the Mersenne Twister (seeded from os.urandom, and re-seeded in a
# forked child by the random module itself) is several times cheaper than a syscall per id.
_rand = random.getrandbits
_lock = threading.Lock()
# Each id is built from its 16 bytes by asyncpg's own uuid.UUID subclass (the class of every id
# read from the database): made in C, several times cheaper than uuid.UUID(int=...), and sent by
# asyncpg without a detour through text.
_from_bytes = driver.uuid_from_bytes()
_pack = struct.Struct(">QQ").pack
_MS_MASK = (1 << 48) - 1
_VERSION = 0x7 << 12  # in the high 64 bits, above the 12-bit counter
_VARIANT = 0b10 << 62  # in the low 64 bits, above 62 random bits
# The last id handed out, as its millisecond and counter: (ms << 12) | counter.
_last = 0


def new_id() -> uuid.UUID:
    """A new UUIDv7: 48-bit Unix milliseconds, then a 12-bit counter (monotonic within a
    millisecond in this process), then 62 random bits."""
    with _lock:
        at = _reserve(time.time_ns() // 1_000_000, 1)
    return _made(at)


def new_ids(n: int) -> list[uuid.UUID]:
    """``n`` new UUIDv7s, as ``n`` calls of ``new_id`` would make them (in increasing order), for
    a batch: the clock and the lock are taken once."""
    if n <= 0:
        return []
    with _lock:
        first = _reserve(time.time_ns() // 1_000_000, n)
    return [_made(at) for at in range(first, first + n)]


def _made(at: int) -> uuid.UUID:
    """The id of ``at`` (``(ms << 12) | counter``, see ``_reserve``) with 62 new random bits."""
    return _from_bytes(_pack((at >> 12 & _MS_MASK) << 16 | _VERSION | at & 0xFFF, _VARIANT | _rand(62)))


def _reserve(ms: int, n: int) -> int:
    """The millisecond and counter (``(ms << 12) | counter``) of the first of ``n`` new ids (n at
    least 1), the clock reading ``ms``; the others follow it one by one. A millisecond the clock
    has moved on to starts its counter at a random point below 1024, leaving room to count up; a
    counter that runs past 4095 borrows the next millisecond. The caller holds ``_lock``."""
    global _last
    start = ms << 12
    first = start | _rand(10) if start > _last else _last + 1
    _last = first + n - 1
    return first

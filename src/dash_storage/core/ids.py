"""Client-generated ids: UUIDv7 (RFC 9562), time-ordered so new rows land at the right edge of the
primary-key index, and known before the INSERT so that a retried create can never add a second row."""

from __future__ import annotations

import random
import threading
import time
import uuid

__all__ = ["new_id", "new_ids"]

# Ids must be unique, not secret: the Mersenne Twister (seeded from os.urandom, and re-seeded in a
# forked child by the random module itself) is several times cheaper than a syscall per id.
_rand = random.getrandbits
_lock = threading.Lock()
_UUID = uuid.UUID
_UNKNOWN = uuid.SafeUUID.unknown
_new = object.__new__
_set = object.__setattr__  # uuid.UUID refuses attribute assignment; its slots are set directly
_last_ms = 0
_counter = 0


def new_id() -> uuid.UUID:
    """A new UUIDv7: 48-bit Unix milliseconds, then a 12-bit counter (monotonic within a
    millisecond in this process), then 62 random bits."""
    with _lock:
        ms, counter = _step(time.time_ns() // 1_000_000)
    return _made(ms, counter)


def new_ids(n: int) -> list[uuid.UUID]:
    """``n`` new UUIDv7s, as ``n`` calls of ``new_id`` would make them (in increasing order), for
    a batch: the clock and the lock are taken once."""
    with _lock:
        now = time.time_ns() // 1_000_000
        steps = [_step(now) for _ in range(n)]
    return [_made(ms, counter) for ms, counter in steps]


def _step(ms: int) -> tuple[int, int]:
    """The millisecond and counter of the next id, the clock reading ``ms``; the caller holds
    ``_lock``."""
    global _last_ms, _counter
    if ms > _last_ms:
        _last_ms = ms
        _counter = _rand(10)  # a random start, leaving room to count up
    else:
        _counter += 1
        if _counter > 0xFFF:  # counter overflow: borrow the next millisecond
            _last_ms += 1
            _counter = 0
    return _last_ms, _counter


def _made(ms: int, counter: int) -> uuid.UUID:
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | counter << 64 | 0b10 << 62 | _rand(62)
    # uuid.UUID(int=value) with its argument checks skipped (the value is a valid 128-bit UUIDv7
    # by construction): the same object, in less than half the time, for every row a batch writes.
    made = _new(_UUID)
    _set(made, "int", value)
    _set(made, "is_safe", _UNKNOWN)
    return made

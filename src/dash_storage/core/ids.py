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
    global _last_ms, _counter
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms > _last_ms:
            _last_ms = ms
            _counter = _rand(10)  # a random start, leaving room to count up
        else:
            _counter += 1
            if _counter > 0xFFF:  # counter overflow: borrow the next millisecond
                _last_ms += 1
                _counter = 0
            ms = _last_ms
        counter = _counter
    rand = _rand(62)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | counter << 64 | 0b10 << 62 | rand
    # uuid.UUID(int=value) with its argument checks skipped (the value is a valid 128-bit UUIDv7
    # by construction): the same object, in less than half the time, for every row a batch writes.
    made = _new(_UUID)
    _set(made, "int", value)
    _set(made, "is_safe", _UNKNOWN)
    return made


def new_ids(n: int) -> list[uuid.UUID]:
    """``n`` new UUIDv7s, as ``n`` calls of ``new_id`` would make them (in increasing order), for
    a batch: the clock and the lock are taken once."""
    global _last_ms, _counter
    if n <= 0:
        return []
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms > _last_ms:
            _last_ms = ms
            _counter = _rand(10) - 1  # the first of the batch takes the random start
        counters: list[int] = []
        stamps: list[int] = []
        counter, last = _counter, _last_ms
        for _ in range(n):
            counter += 1
            if counter > 0xFFF:  # counter overflow: borrow the next millisecond
                last += 1
                counter = 0
            counters.append(counter)
            stamps.append(last)
        _counter, _last_ms = counter, last
    made: list[uuid.UUID] = []
    add, rand, new, set_, cls, unknown = made.append, _rand, _new, _set, _UUID, _UNKNOWN
    for ms, counter in zip(stamps, counters, strict=True):
        one = new(cls)
        set_(one, "int", (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | counter << 64 | 0b10 << 62 | rand(62))
        set_(one, "is_safe", unknown)
        add(one)
    return made

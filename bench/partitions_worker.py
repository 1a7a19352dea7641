"""One ingest measurement of ``bench.partitions``, in a process of its own.

    python -m bench.partitions_worker DATABASE CASE EVENTS SWARM_ID

``bench.partitions`` runs this twice per round: once under the current library, writing into the
partitioned ``events``, and once under the library as it was before the event log was partitioned
(an older source tree put first on PYTHONPATH), writing into the unpartitioned ``events`` that
library was made for (the current one cannot write there: its statements name the key
(id, "timestamp")). So this module imports only what every version of dash_storage has had.

CASE is ``writer`` (``EventWriter``, 64 producers each awaiting its event, as agents do) or
``create_many`` (``EventRepository.create_many`` of 1,000 events, one call at a time). A warm-up of
a tenth of EVENTS comes first (connections, prepared statements, codecs), then EVENTS are timed.
Prints one JSON line: events per second, and the file dash_storage was imported from.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from dash_storage.cli.common import run as run_loop
from dash_storage.core.config import load_settings
from dash_storage.core.database import Database
from dash_storage.repositories.event_writer import EventWriter
from dash_storage.repositories.events import EventRepository

PRODUCERS = 64
BULK = 1000
#: The writer as bench/ingest.py runs it.
MAX_BATCH = 500
WRITER_CONCURRENCY = 2
POOL_SIZE = 16
TYPES = ["agent.spawned", "agent.step", "llm.call", "agent.completed"]
CASES = ("writer", "create_many")


def payload(i: int) -> dict[str, Any]:
    return {"step": i, "tokens": 120 + i % 50, "model": "kimi-k2.5", "note": "réponse reçue"}


async def _producers(total: int, create: Callable[[int], Awaitable[object]]) -> float:
    counter = iter(range(total))

    async def producer() -> None:
        for i in counter:
            await create(i)

    started = time.perf_counter()
    await asyncio.gather(*(producer() for _ in range(PRODUCERS)))
    return total / (time.perf_counter() - started)


async def _writer(db: Database, swarm: uuid.UUID, events: int) -> float:
    async with EventWriter(db, max_batch=MAX_BATCH, max_concurrency=WRITER_CONCURRENCY) as writer:
        return await _producers(
            events,
            lambda i: writer.create(swarm, TYPES[i % 4], payload=payload(i), entity_type="agent"),
        )


async def _create_many(db: Database, swarm: uuid.UUID, events: int) -> float:
    repo = EventRepository(db)
    started = time.perf_counter()
    for first in range(0, events, BULK):
        await repo.create_many(
            [
                {"swarm_id": swarm, "type": TYPES[i % 4], "payload": payload(i), "entity_type": "agent"}
                for i in range(first, min(first + BULK, events))
            ]
        )
    return events / (time.perf_counter() - started)


async def measure(database: str, case: str, events: int, swarm: uuid.UUID) -> float:
    settings = load_settings(
        postgres_db=database, postgres_min_pool_size=POOL_SIZE, postgres_max_pool_size=POOL_SIZE
    )
    db = Database(settings)
    await db.initialize()
    try:
        write = _writer if case == "writer" else _create_many
        await write(db, swarm, max(events // 10, BULK))
        return await write(db, swarm, events)
    finally:
        await db.close()


def main(argv: list[str]) -> None:
    if len(argv) != 4 or argv[1] not in CASES:
        raise SystemExit(
            f"usage: python -m bench.partitions_worker DATABASE {'|'.join(CASES)} EVENTS SWARM_ID"
        )
    database, case, events, swarm = argv[0], argv[1], int(argv[2]), uuid.UUID(argv[3])
    rate = run_loop(measure(database, case, events, swarm))
    import dash_storage

    print(orjson.dumps({"events_per_s": rate, "library": dash_storage.__file__}).decode(), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

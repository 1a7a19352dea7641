"""Kill loops for the soak-style tests, and how big and how patient those tests are.

A soak-style test (marked ``soak``) runs a workload while the server terminates every pooled
connection every few milliseconds, then checks that nothing acknowledged was lost and nothing was
stored twice. ``make test`` runs each of them at a small size; ``make soak`` (``DASH_SOAK=1``) runs
them at full size: the same checks on several times the operations.

Under such a loop most attempts die, so many calls reach their last retries. With the library's
default back-off (doubling up to 30 s per wait) those calls then sleep for seconds, and a test took
anywhere from 20 s to over 3 minutes depending on the machine's load, while proving nothing more:
what these tests check (exactly-once under retries) depends on the attempts being made, not on how
long they wait in between. :func:`capped` keeps a Database's attempts and first delay and caps every
wait at :data:`MAX_BACKOFF`, so that a call under fire gives up within about a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

from dash_storage.core.config import Settings
from dash_storage.core.database import Database
from tests.conftest import TEST_DB, admin_connect
from tests.faults.workload import terminate_loop

__all__ = ["MAX_BACKOFF", "SOAK", "capped", "gather_outcomes", "sized", "terminating_connections"]

T = TypeVar("T")

#: True under ``make soak`` (DASH_SOAK=1): soak-style tests run at full size.
SOAK = os.environ.get("DASH_SOAK", "") not in ("", "0")

#: The longest single back-off wait of a Database under fire (seconds).
MAX_BACKOFF = 0.1


def sized(quick: int, soak: int) -> int:
    """``quick`` in ``make test``, ``soak`` in ``make soak``."""
    return soak if SOAK else quick


def capped(db: Database, max_delay: float = MAX_BACKOFF) -> Database:
    """``db`` with its retry policy's waits capped at ``max_delay`` (attempts and first delay kept)."""
    db.policy = dataclasses.replace(db.policy, max_delay=max_delay)
    return db


@contextlib.asynccontextmanager
async def terminating_connections(
    settings: Settings, interval: float = 0.01, *, calm: tuple[float, float] | None = None
) -> AsyncIterator[list[int]]:
    """While inside, terminate every 'dash-storage' connection to the test database every ``interval``
    seconds (the admin connection doing it has another application_name, so it survives); with
    ``calm=(every, length)``, pause for ``length`` seconds after each ``every`` seconds of killing.

    Yields a one-item list holding the number of connections terminated so far.
    """
    admin = await admin_connect(settings, TEST_DB)
    try:
        async with terminate_loop(admin, interval, calm=calm) as killed:
            yield killed
    finally:
        await admin.close()


async def gather_outcomes(
    jobs: Sequence[Callable[[], Awaitable[T]]], workers: int
) -> list[tuple[int, T | BaseException]]:
    """Run ``jobs`` on ``workers`` concurrent tasks; (job index, result or exception) for each."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(jobs)):
        queue.put_nowait(i)
    outcomes: list[tuple[int, T | BaseException]] = []

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            try:
                outcomes.append((i, await jobs[i]()))
            except Exception as exc:
                outcomes.append((i, exc))

    await asyncio.gather(*(worker() for _ in range(workers)))
    return sorted(outcomes, key=lambda o: o[0])

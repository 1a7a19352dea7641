"""EventWriter: many concurrent ``create()`` calls share one round trip and one commit.

Each ``create()`` is validated in the caller's task (errors are raised there, before anything is
queued), then queued; one writer loop per EventWriter takes what is queued whenever a write slot is
free and writes it as one batch (``event_ingest.insert_prepared``: one INSERT, or binary COPY for big
batches). A caller's ``create()`` returns only after the batch that holds its event committed.

- Batches form by themselves: while a batch is being written, new events queue up, and the next
  batch takes them all (up to ``max_batch``). A lone event goes out at once.
- A batch that fails for a reason that may concern only some of its rows (a missing swarm or agent,
  a duplicate id: SQLSTATE classes 22 and 23) is split in halves and written again, down to single
  events, so the error reaches exactly the callers it concerns and the others succeed.
- Transient failures are retried by the Database (the ids are fixed before the first attempt, so a
  retry never stores an event twice); an error that outlives the retries reaches every caller of
  that batch.
- A caller cancelled while its event waits in the queue is dropped from it; one cancelled while
  its batch is being written does not disturb the others (its event may or may not be stored).
- ``close()`` (or leaving ``async with``) writes everything queued, then stops the loop. When
  idle, the loop waits on an event: no polling, no cost.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections import deque
from types import TracebackType
from typing import Unpack

from dash_storage.core import validation as v
from dash_storage.core.database import Database, get_database
from dash_storage.core.errors import ConflictError, DashStorageError, NotFoundError, ValidationError
from dash_storage.core.models import Event
from dash_storage.repositories.event_ingest import insert_prepared
from dash_storage.repositories.event_input import MAX_BATCH, EventFields, EventRow, prepare_event

__all__ = ["EventWriter"]

log = logging.getLogger("dash_storage.event_writer")

# A queued event: its row, its payload, its caller's future, and whether the caller gave the id.
_Item = tuple[EventRow, bytes, "asyncio.Future[Event]", bool]


class EventWriter:
    """Batches concurrent ``create()`` calls into shared writes. Use as ``async with``, or call
    ``close()`` when done.

    ``max_batch``: most events per write. ``max_delay_ms``: the longest a ready batch waits to
    grow while events are still arriving (a burst that has stopped is written at once, so a lone
    event costs one round trip). ``max_concurrency``: batches written at the same time (each on its
    own pooled connection). A writer belongs to the event loop it is first used on.

    ```python
    async with EventWriter(db) as writer:  # e.g. shared by every agent of a swarm
        event = await writer.create(swarm.id, "agent.step", payload={"step": 1})
    ```
    """

    __slots__ = (
        "_closed",
        "_concurrency",
        "_db",
        "_inflight",
        "_inflight_ids",
        "_max_batch",
        "_max_delay",
        "_pending",
        "_slot_freed",
        "_task",
        "_urgent",
        "_wakeup",
    )

    def __init__(
        self,
        db: Database | None = None,
        *,
        max_batch: int = 500,
        max_delay_ms: float = 2.0,
        max_concurrency: int = 2,
    ) -> None:
        batch = v.check_int(max_batch, "max_batch", minimum=1, maximum=MAX_BATCH)
        concurrency = v.check_int(max_concurrency, "max_concurrency", minimum=1, maximum=64)
        if isinstance(max_delay_ms, bool) or not isinstance(max_delay_ms, int | float):
            raise ValidationError("max_delay_ms", f"must be a number, got {type(max_delay_ms).__name__}")
        if not math.isfinite(max_delay_ms) or not 0 <= max_delay_ms <= 10_000:
            raise ValidationError("max_delay_ms", f"must be between 0 and 10000, got {max_delay_ms}")
        assert batch is not None and concurrency is not None
        self._db = db
        self._max_batch = batch
        self._max_delay = max_delay_ms / 1000.0
        self._pending: deque[_Item] = deque()
        self._inflight: dict[asyncio.Task[None], list[asyncio.Future[Event]]] = {}
        # The ids callers gave to the events being written (as ints), which a queued event that
        # repeats one must not join (see ``_take``).
        self._inflight_ids: set[int] = set()
        self._concurrency = concurrency
        self._slot_freed = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._urgent = 0  # flush() calls waiting: write what is queued without lingering

    @property
    def db(self) -> Database:
        """The Database written to: the one given, else the shared default."""
        return self._db if self._db is not None else get_database()

    @property
    def pending(self) -> int:
        """Events accepted and not yet answered (queued or being written)."""
        return len(self._pending) + sum(len(f) for f in self._inflight.values())

    async def __aenter__(self) -> EventWriter:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def create(self, swarm_id: uuid.UUID | str, type: str, **fields: Unpack[EventFields]) -> Event:
        """Append one event, as ``EventRepository.create`` does (the same arguments), sharing the
        write with others.

        Returns the stored event once its batch has committed. Raises ValidationError (before
        queueing), NotFoundError naming the swarm or agent if it does not exist, ConflictError if
        the id exists, and DashStorageError if the writer is closed.
        """
        if self._closed:
            raise DashStorageError("this EventWriter is closed")
        row, data = prepare_event({"swarm_id": swarm_id, "type": type, **fields})
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Event] = loop.create_future()
        self._pending.append((row, data, future, fields.get("id") is not None))
        if self._task is None:
            self._task = loop.create_task(self._run(), name="dash-storage EventWriter")
        if len(self._pending) == 1 or self._inflight_ids:  # (the loop may wait, see _run)
            self._wakeup.set()
        return await future

    async def flush(self) -> None:
        """Wait until every event accepted so far is written (or has failed for its caller)."""
        futures = [item[2] for item in self._pending]
        for batch in self._inflight.values():
            futures.extend(batch)
        if not futures:
            return
        self._urgent += 1
        self._wakeup.set()
        try:
            await asyncio.wait(futures)
        finally:
            self._urgent -= 1

    async def close(self) -> None:
        """Write everything queued, then stop. Further ``create()`` calls raise. Idempotent."""
        self._closed = True
        if self._task is None:
            return
        self._wakeup.set()
        # Shielded: a caller cancelled while closing must not abandon the queued events.
        await asyncio.shield(self._task)

    # -- the writer loop --------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                while not self._pending:
                    if self._closed:
                        if self._inflight:
                            await asyncio.wait(list(self._inflight))
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                while len(self._inflight) >= self._concurrency:
                    self._slot_freed.clear()
                    await self._slot_freed.wait()
                await self._linger(loop)
                batch = self._take()
                if not batch:
                    if self._pending:
                        # Each repeats the id of an event being written: wait for a write to end
                        # or another event to arrive.
                        self._wakeup.clear()
                        await self._wakeup.wait()
                    continue  # (else every queued caller had been cancelled)
                self._inflight_ids.update(item[0][0].int for item in batch if item[3])
                task = loop.create_task(self._write(batch))
                self._inflight[task] = [item[2] for item in batch]
                task.add_done_callback(self._written)
        finally:
            # Reached only by close() or if this task is cancelled: nobody may wait forever.
            self._closed = True
            error = DashStorageError("the EventWriter stopped before writing this event")
            while self._pending:
                future = self._pending.popleft()[2]
                if not future.done():
                    future.set_exception(error)

    async def _linger(self, loop: asyncio.AbstractEventLoop) -> None:
        """Let the batch grow while events keep arriving, up to max_batch and max_delay."""
        deadline = loop.time() + self._max_delay
        size = len(self._pending)
        while size < self._max_batch and not self._closed and not self._urgent and loop.time() < deadline:
            await asyncio.sleep(0)  # one turn of the loop: callers just woken get to queue
            grown = len(self._pending)
            if grown == size:
                return
            size = grown

    def _take(self) -> list[_Item]:
        """Up to max_batch queued events with distinct ids; cancelled callers are dropped. An event
        that repeats the id of another in the batch, or of one being written, waits until that
        write has ended, and then fails alone as a conflict (or is written, if the other failed).
        Two batches in flight at once must not hold one id: with different timestamps both would
        pass the look-up of caller-given ids and be stored."""
        batch: list[_Item] = []
        ids: set[int] = set()  # the ids as ints: hashing a UUID object costs a Python call
        busy = self._inflight_ids
        later: list[_Item] = []
        pending = self._pending
        while pending and len(batch) < self._max_batch:
            item = pending.popleft()
            if item[2].done():
                continue
            event_id = item[0][0].int
            if event_id in ids or (item[3] and event_id in busy):
                later.append(item)
                continue
            ids.add(event_id)
            batch.append(item)
        pending.extendleft(reversed(later))
        return batch

    def _written(self, task: asyncio.Task[None]) -> None:
        del self._inflight[task]
        self._slot_freed.set()
        self._wakeup.set()  # events that waited for this write to end can go now
        if not task.cancelled() and task.exception() is not None:
            log.error("EventWriter batch failed unexpectedly", exc_info=task.exception())

    async def _write(self, batch: list[_Item]) -> None:
        """Write one batch and answer each of its callers."""
        try:
            if self.db.telemetry is not None:
                self.db.telemetry.event_batch(len(batch))
            await self._write_or_split(batch)
        except BaseException as exc:
            # A bug or a cancellation (the event loop shutting down): nobody may wait forever.
            if isinstance(exc, DashStorageError):
                error = exc
            else:
                error = DashStorageError(
                    f"the write was interrupted ({type(exc).__name__}); the event may or may not be stored"
                )
                error.__cause__ = exc
            _fail(batch, error)
            raise
        finally:
            self._inflight_ids.difference_update(item[0][0].int for item in batch if item[3])

    async def _write_or_split(self, batch: list[_Item]) -> None:
        """Write the batch; if a row-level error fails it, bisect to isolate the culprits."""
        try:
            events = await insert_prepared(
                self.db,
                [item[0] for item in batch],
                [item[1] for item in batch],
                given_ids=[item[0][0] for item in batch if item[3]],
            )
        except DashStorageError as exc:
            if len(batch) == 1 or not _may_concern_some_rows(exc):
                _fail(batch, exc)
                return
            # Nothing of the batch was written (all or nothing): write each half on its own,
            # leaving out callers cancelled meanwhile.
            middle = len(batch) // 2
            for half in (batch[:middle], batch[middle:]):
                alive = [item for item in half if not item[2].done()]
                if alive:
                    await self._write_or_split(alive)
            return
        for item, event in zip(batch, events, strict=True):
            if not item[2].done():
                item[2].set_result(event)


def _fail(batch: list[_Item], exc: BaseException) -> None:
    for item in batch:
        if not item[2].done():
            item[2].set_exception(exc)


def _may_concern_some_rows(exc: DashStorageError) -> bool:
    """Errors a single row can cause (constraint violations, data exceptions), unlike e.g. an
    unreachable server or a missing table, which concern the whole batch."""
    if isinstance(exc, ConflictError | NotFoundError | ValidationError):
        return True
    state = getattr(exc, "sqlstate", None) or getattr(exc.__cause__, "sqlstate", None)
    return isinstance(state, str) and state[:2] in ("22", "23")

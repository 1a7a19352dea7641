"""Following the event log: every committed event exactly once, in commit-consistent order.

A ``Follower`` reads pages of the stream below the mark of finished transactions (see
``sql/stream.sql``), yields the events its filters want, and waits for the next commit on
LISTEN/NOTIFY (one notification per writing transaction), on a connection of its own: to
DATABASE_DIRECT_URL when that is set. Behind a transaction-mode pooler without DATABASE_DIRECT_URL it
does not LISTEN at all (through such a pooler a notification goes to whichever client holds the
server connection at the time) and polls; it polls too while its listening connection is lost.
Its ``cursor`` is an opaque string: store it, and a later ``Follower(after=cursor)`` continues
with the next event, with nothing skipped or repeated.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any, Final, TypedDict

import asyncpg

from dash_storage import sql
from dash_storage.core import validation as v
from dash_storage.core.database import Database, Record
from dash_storage.core.errors import DashStorageError, ValidationError
from dash_storage.core.models import Event
from dash_storage.stream.position import BEGINNING, Position, decode, encode

__all__ = ["CHANNEL", "HORIZON_SQL", "FollowOptions", "Follower", "Page"]

log = logging.getLogger("dash_storage.stream")

CHANNEL: Final = "dash_events"
_Q = sql.load("stream")
# A page query is the mark, then the page read below it: with filters, or (cheaper) without.
PAGE_SQL: Final = f"{_Q['part_mark']}\n{_Q['part_page']}"
PAGE_ALL_SQL: Final = f"{_Q['part_mark']}\n{_Q['part_page_all']}"
MARK_SQL: Final = _Q["mark"]
HORIZON_SQL: Final = _Q["horizon"]

# The columns of an event in a page row (after mark, held, horizon, tx_id, seq, wanted).
_EVENT_COLUMNS = slice(6, 16)
_FIRST_REPOLL = 0.002  # while an open transaction holds rows back: re-read soon, then less often


class Page(list[Event]):
    """The wanted events of one read, and the cursor to resume after them (``positions`` holds
    each event's own place in the stream)."""

    def __init__(self, events: list[Event], positions: list[Position], end: Position, mark: int) -> None:
        super().__init__(events)
        self.positions = positions
        self.end = end
        self.cursor = encode(end)
        self.mark = mark


class FollowOptions(TypedDict, total=False):
    """The keyword arguments of :class:`Follower` after ``db`` (see there; each may be left out)."""

    swarm_id: uuid.UUID | str | None
    types: Sequence[str] | None
    agent_id: uuid.UUID | str | None
    after: str | None
    from_start: bool
    batch_size: int
    poll_interval: float
    listen: bool


class Follower:
    """``async with Follower(db, ...) as stream: async for event in stream: ...``.

    Start: ``after`` (a cursor from an earlier follower), else ``from_start=True`` (the whole log),
    else from now (the events of transactions that finish from now on; a few that committed just
    before may come too). Filters: ``swarm_id``, ``types`` (any of), ``agent_id``.
    ``batch_size`` rows are read per round trip; ``poll_interval`` (seconds) is the longest wait
    without a notification. ``listen=False`` polls only, and so does a follower behind a
    transaction-mode pooler without DATABASE_DIRECT_URL (``listening`` stays False).
    """

    def __init__(
        self,
        db: Database,
        *,
        swarm_id: uuid.UUID | str | None = None,
        types: Sequence[str] | None = None,
        agent_id: uuid.UUID | str | None = None,
        after: str | None = None,
        from_start: bool = False,
        batch_size: int = 1000,
        poll_interval: float = 0.5,
        listen: bool = True,
    ) -> None:
        self.db = db
        self._swarm = v.check_uuid(swarm_id, "swarm_id", optional=True)
        self._agent = v.check_uuid(agent_id, "agent_id", optional=True)
        self._types = _check_types(types)
        if after is not None and from_start:
            raise ValidationError("after", "give a cursor or from_start=True, not both")
        self._position: Position | None = decode(after) if after is not None else None
        if from_start:
            self._position = BEGINNING
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= 100_000:
            raise ValidationError("batch_size", f"must be an integer from 1 to 100000, got {batch_size!r}")
        if (
            isinstance(poll_interval, bool)
            or not isinstance(poll_interval, int | float)
            or poll_interval <= 0
        ):
            raise ValidationError(
                "poll_interval", f"must be a positive number of seconds, got {poll_interval!r}"
            )
        self._batch = batch_size
        self._poll = float(poll_interval)
        # LISTEN needs a connection that keeps session state (see Database.can_hold_session).
        self._listen = listen and db.can_hold_session
        if listen and not self._listen:
            log.info(
                "follower polls every %.3g s: POSTGRES_POOLER=transaction and no DATABASE_DIRECT_URL "
                "to LISTEN on",
                self._poll,
            )
        self._woken = asyncio.Event()
        self._listener: asyncpg.Connection[Record] | None = None
        self._closed = False
        self._managed = False  # inside ``async with``: the block closes it, not the iteration
        self.listening = False  # whether notifications currently wake this follower

    # -- position -----------------------------------------------------------------------------

    @property
    def cursor(self) -> str:
        """Where this follower is: resume after the last event it has yielded (or scanned past)."""
        if self._position is None:
            raise DashStorageError("the follower has not started: iterate it first (or pass after=)")
        return encode(self._position)

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Follower:
        self._managed = True
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Fix the starting position (for "from now") and begin listening."""
        if self._position is None:
            mark = int(await self.db.fetchval(MARK_SQL, retry=True))
            self._position = Position.before_mark(mark)
        if self._listen and self._listener is None:
            await self._open_listener()

    async def close(self) -> None:
        self._closed = True
        listener, self._listener = self._listener, None
        self.listening = False
        if listener is not None and not listener.is_closed():
            try:
                await asyncio.wait_for(listener.close(), timeout=2.0)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                listener.terminate()

    async def _open_listener(self) -> None:
        try:
            con = await self.db.connect()
        except DashStorageError as exc:
            log.info("follower polls: no listening connection (%s)", exc)
            return
        try:
            await con.add_listener(CHANNEL, self._notified)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            # A transaction-mode pooler refuses LISTEN or drops it after the transaction.
            log.info("follower polls: LISTEN is not available (%s)", exc)
            con.terminate()
            return
        except BaseException:  # cancelled half-way: the connection must not leak
            con.terminate()
            raise
        if self._closed:  # closed while the connection was being opened
            con.terminate()
            return
        con.add_termination_listener(self._listener_lost)
        self._listener = con
        self.listening = True

    def _notified(self, *_: Any) -> None:
        self._woken.set()

    def _listener_lost(self, *_: Any) -> None:
        self.listening = False
        self._listener = None
        self._woken.set()  # read at once: a commit may have come while the connection died

    # -- reading ------------------------------------------------------------------------------

    async def read_page(self) -> tuple[Page, bool, bool]:
        """One read: (wanted events and the cursor after them, page was full, rows held back)."""
        if self._position is None:
            await self.start()
        assert self._position is not None
        pos = self._position
        if self._swarm is None and self._types is None and self._agent is None:
            rows = await self.db.fetch(PAGE_ALL_SQL, str(pos.tx_id), pos.seq, self._batch, retry=True)
        else:
            rows = await self.db.fetch(
                PAGE_SQL,
                str(pos.tx_id),
                pos.seq,
                self._batch,
                self._swarm,
                self._types,
                self._agent,
                retry=True,
            )
        mark = int(rows[0]["mark"])
        held = bool(rows[0]["held"])
        if pos.tx_id >= int(rows[0]["horizon"]):
            raise DashStorageError(
                f"the cursor is ahead of this server's transactions (position {pos.tx_id}, next "
                f"transaction {rows[0]['horizon']}): it comes from another database history (a "
                "restore, a failover that lost writes, an upgrade by dump). Follow from_start=True "
                "or from now, and save the new cursor"
            )
        events: list[Event] = []
        positions: list[Position] = []
        scanned = 0
        last = pos
        for r in rows:
            if r["tx_id"] is None:
                break
            scanned += 1
            last = Position(int(r["tx_id"]), r["seq"])
            if r["wanted"]:
                events.append(Event(*r[_EVENT_COLUMNS]))
                positions.append(last)
        full = scanned >= self._batch
        end = last if full else max(last, Position.before_mark(mark))
        self._position = end
        if events and self.db.telemetry is not None:
            self.db.telemetry.follower_page(events[-1].timestamp)
        return Page(events, positions, end, mark), full, held

    async def pages(self) -> AsyncIterator[Page]:
        """Non-empty pages of wanted events, each with the cursor to resume after it."""
        if self._position is None or (self._listen and self._listener is None and not self._closed):
            await self.start()
        repoll = _FIRST_REPOLL
        try:
            while not self._closed:
                self._woken.clear()
                page, full, held = await self.read_page()
                if page:
                    yield page
                if full:
                    continue
                if held:
                    # An open transaction holds rows back; a transaction that wrote no events sends
                    # no notification when it ends, so look again soon, then less and less often.
                    await self._wait(repoll)
                    repoll = min(repoll * 2, self._poll)
                else:
                    repoll = _FIRST_REPOLL
                    if self._listen and self._listener is None:
                        await self._open_listener()
                    await self._wait(self._poll)
        finally:
            if not self._managed:  # iterated without ``async with``: nothing else closes it
                await self.close()

    async def _wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._woken.wait(), timeout)
        except TimeoutError:
            pass

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events()

    async def _events(self) -> AsyncIterator[Event]:
        async for page in self.pages():
            for event, pos in zip(page, page.positions, strict=True):
                self._position = pos
                yield event
            self._position = page.end


def statements() -> dict[str, str]:
    """The page queries composed from ``sql/stream.sql``'s fragments, by name."""
    return {"page": PAGE_SQL, "page_all": PAGE_ALL_SQL}


def _check_types(types: Sequence[str] | None) -> list[str] | None:
    if types is None:
        return None
    if isinstance(types, str) or not isinstance(types, Sequence):
        raise ValidationError("types", f"must be a list of event types, got {types!r:.80}")
    out = []
    for t in types:
        if not isinstance(t, str) or not t.strip():
            raise ValidationError("types", f"every type must be a non-empty string, got {t!r:.80}")
        out.append(t)
    if not out:
        raise ValidationError("types", "must name at least one type (or be None for every type)")
    return out

"""The event log as a stream: every committed event reaches every follower exactly once.

The proof runs writers of every kind at once (single creates, create_many through COPY, an
EventWriter's batches, transactions that stay open while others commit, transactions that roll
back) beside several followers: one of them is killed and resumed from its saved cursor, another
loses its listening connection. At the end every follower holds exactly the committed set: no gap,
no duplicate, nothing rolled back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import uuid
from collections.abc import Awaitable, Callable

import pytest

from dash_storage import EventRepository, EventWriter
from dash_storage.core.database import Database
from dash_storage.core.errors import ValidationError
from dash_storage.stream import Follower, list_cursors, load_cursor, save_cursor
from tests.factories import make_swarm

SOAK = os.environ.get("DASH_SOAK") == "1"
LISTENERS = (
    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN%' AND datname = current_database()"
)
WRITE_SECONDS = 30.0 if SOAK else 3.0


class Boom(Exception):
    pass


@pytest.mark.soak
async def test_every_committed_event_reaches_every_follower_exactly_once(
    db: Database, make_database: Callable[..., Awaitable[Database]]
) -> None:
    swarm = await make_swarm(db, "streamed")
    writers_db = await make_database(postgres_max_pool_size=24)
    repo = EventRepository(writers_db)
    committed: set[uuid.UUID] = set()
    rolled_back: set[uuid.UUID] = set()
    commits = [0]
    stop = asyncio.Event()

    async def singles() -> None:
        while not stop.is_set():
            committed.add((await repo.create(swarm, "single")).id)
            commits[0] += 1

    async def batches() -> None:
        while not stop.is_set():
            events = await repo.create_many([{"swarm_id": swarm, "type": "batch"} for _ in range(200)])
            committed.update(e.id for e in events)
            commits[0] += 1

    async def writer_batches() -> None:
        async with EventWriter(writers_db) as writer:

            async def producer() -> None:
                while not stop.is_set():
                    committed.add((await writer.create(swarm, "writer")).id)

            await asyncio.gather(*(producer() for _ in range(16)))

    async def open_transactions() -> None:
        # Stays open while hundreds of others commit, then commits: its rows have the smallest
        # transaction id of their time, and must still be delivered, once.
        while not stop.is_set():
            ids = [uuid.uuid4() for _ in range(5)]
            async with writers_db.transaction() as con:
                for i in ids:
                    await con.execute(
                        "INSERT INTO events (id, swarm_id, type) VALUES ($1, $2, 'slow')", i, swarm
                    )
                await asyncio.sleep(0.3)
            committed.update(ids)
            commits[0] += 1

    async def rollbacks() -> None:
        while not stop.is_set():
            ids = [uuid.uuid4() for _ in range(20)]
            with contextlib.suppress(Boom):
                async with writers_db.transaction() as con:
                    for i in ids:
                        await con.execute(
                            "INSERT INTO events (id, swarm_id, type) VALUES ($1, $2, 'doomed')", i, swarm
                        )
                    await asyncio.sleep(0.02)
                    raise Boom
            rolled_back.update(ids)

    seen: dict[str, list[uuid.UUID]] = {"plain": [], "filtered": [], "listener-lost": [], "resumed": []}
    resumable = asyncio.Event()

    async def follow(name: str, **kwargs: object) -> None:
        async with Follower(db, from_start=True, batch_size=300, **kwargs) as stream:  # type: ignore[arg-type]
            async for event in stream:
                seen[name].append(event.id)

    async def follow_killed_and_resumed() -> None:
        async def run(after: str | None) -> None:
            async with Follower(db, after=after, from_start=after is None, batch_size=100) as stream:
                async for event in stream:
                    seen["resumed"].append(event.id)
                    if after is None:  # the run that will be killed saves its place as it goes
                        await save_cursor(db, "test-resumed", stream.cursor)
                    if len(seen["resumed"]) == 500:
                        resumable.set()

        first = asyncio.create_task(run(None))
        await resumable.wait()
        first.cancel()  # killed mid-stream: its place is whatever it saved last
        with contextlib.suppress(asyncio.CancelledError):
            await first
        await run(await load_cursor(db, "test-resumed"))

    async def lose_listener(follower_task_started: asyncio.Event) -> None:
        await follower_task_started.wait()
        for _ in range(1000):  # until the followers are listening (bounded: 10 s)
            if await db.fetchval(LISTENERS, retry=True) >= 4:
                break
            await asyncio.sleep(0.01)
        await db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%' "
            "AND datname = current_database()"
        )

    started = asyncio.Event()

    async def follow_losing_listener() -> None:
        started.set()
        await follow("listener-lost")

    followers = [
        asyncio.create_task(follow("plain")),
        asyncio.create_task(follow("filtered", swarm_id=swarm)),
        asyncio.create_task(follow_losing_listener()),
        asyncio.create_task(follow_killed_and_resumed()),
        asyncio.create_task(lose_listener(started)),
    ]
    writers = [singles(), batches(), writer_batches(), open_transactions(), rollbacks(), rollbacks()]
    writing = asyncio.gather(*writers)
    await asyncio.sleep(WRITE_SECONDS)
    stop.set()
    await writing

    for _ in range(6000):  # until every follower has caught up (bounded: 60 s)
        if all(committed <= set(ids) for ids in seen.values()):
            break
        await asyncio.sleep(0.01)
    for task in followers:
        task.cancel()
    await asyncio.gather(*followers, return_exceptions=True)

    assert commits[0] > (2000 if SOAK else 100), "too few commits interleaved"
    assert rolled_back
    for name, ids in seen.items():
        assert len(ids) == len(set(ids)), f"{name}: an event was delivered twice"
        assert set(ids) == committed, (
            f"{name}: missing {len(committed - set(ids))}, rolled back or unknown {len(set(ids) - committed)}"
        )


async def test_order_follows_commits_and_cursors_resume(db: Database) -> None:
    swarm = await make_swarm(db, "streamed")
    repo = EventRepository(db)
    async with Follower(db, swarm_id=swarm) as stream:  # from now
        first = await repo.create(swarm, "one")
        second = await repo.create_many(
            [{"swarm_id": swarm, "type": "two"}, {"swarm_id": swarm, "type": "three"}]
        )
        got = []
        async for event in stream:
            got.append(event)
            if len(got) == 3:
                cursor = stream.cursor
                break
    assert [e.id for e in got] == [first.id, *(e.id for e in second)]
    later = await repo.create(swarm, "four")
    async with Follower(db, after=cursor) as resumed:
        async for event in resumed:
            assert event.id == later.id
            break


async def test_filters_by_type_and_agent(db: Database) -> None:
    from dash_storage import AgentRepository

    swarm = await make_swarm(db, "streamed")
    agent = await AgentRepository(db).create(swarm)
    repo = EventRepository(db)
    async with Follower(db, types=["keep"], agent_id=agent.id) as stream:
        await repo.create(swarm, "keep")
        await repo.create(swarm, "drop", agent_id=agent.id)
        kept = await repo.create(swarm, "keep", agent_id=agent.id)
        async for event in stream:
            assert event.id == kept.id
            break


async def test_a_transaction_left_open_holds_followers_back_then_releases(db: Database) -> None:
    swarm = await make_swarm(db, "streamed")
    repo = EventRepository(db)
    async with Follower(db, swarm_id=swarm, poll_interval=0.05) as stream:
        async with db.transaction() as con:
            held = uuid.uuid4()
            await con.execute("INSERT INTO events (id, swarm_id, type) VALUES ($1, $2, 'held')", held, swarm)
            after = await repo.create(swarm, "after")  # commits while the other stays open
            page, _full, blocked = await stream.read_page()
            assert list(page) == [] and blocked, "a row above the mark was delivered early"
        got = []
        async for event in stream:
            got.append(event.id)
            if len(got) == 2:
                break
    assert got == [held, after.id]  # the earlier transaction first: it began first


async def test_rolled_back_events_are_never_delivered(db: Database) -> None:
    swarm = await make_swarm(db, "streamed")
    repo = EventRepository(db)
    async with Follower(db, swarm_id=swarm) as stream:
        with pytest.raises(Boom):
            async with db.transaction() as con:
                await con.execute("INSERT INTO events (swarm_id, type) VALUES ($1, 'doomed')", swarm)
                raise Boom
        kept = await repo.create(swarm, "kept")
        async for event in stream:
            assert event.id == kept.id
            break


async def test_bad_cursor_and_arguments_are_named(db: Database) -> None:
    with pytest.raises(ValidationError, match="after"):
        Follower(db, after="not-a-cursor")
    with pytest.raises(ValidationError, match="types"):
        Follower(db, types="agent.spawned")
    with pytest.raises(ValidationError, match="after"):
        Follower(db, after="s1.AAAA", from_start=True)
    with pytest.raises(ValidationError, match="cursor"):
        await save_cursor(db, "x", "garbage")


async def test_saved_cursors_report_their_lag(db: Database) -> None:
    swarm = await make_swarm(db, "streamed")
    repo = EventRepository(db)
    async with Follower(db) as stream:
        await repo.create(swarm, "a")
        async for _event in stream:
            await save_cursor(db, "dashboard", stream.cursor)
            break
    await repo.create_many([{"swarm_id": swarm, "type": "b"} for _ in range(7)])
    (lag,) = [c for c in await list_cursors(db) if c.name == "dashboard"]
    assert lag.behind == 7 and lag.oldest_behind is not None


async def test_polling_without_notifications_delivers_too(db: Database) -> None:
    swarm = await make_swarm(db, "streamed")
    repo = EventRepository(db)
    async with Follower(db, swarm_id=swarm, listen=False, poll_interval=0.05) as stream:
        assert not stream.listening
        created = await repo.create(swarm, "polled")
        async for event in stream:
            assert event.id == created.id
            break


async def test_a_page_is_one_ordered_index_range_on_a_big_log(db: Database) -> None:
    """The follower's page reads the stream index in order (no sort of the log, no scan of it),
    also under the generic plan a prepared statement ends up with."""
    from dash_storage.stream import follow

    swarm = await make_swarm(db, "streamed")
    async with db.acquire() as con:
        await con.copy_records_to_table(
            "events",
            records=[(uuid.uuid4(), swarm, "bulk") for _ in range(60_000)],
            columns=["id", "swarm_id", "type"],
        )
        await con.execute("ANALYZE events")
        for name in ("page", "page_all"):
            args = "'0', 0, 500" + (", NULL, NULL, NULL" if name == "page" else "")
            await con.execute("SET plan_cache_mode = force_generic_plan")
            try:
                await con.execute(f"PREPARE stream_page AS {follow.statements()[name]}")
                rows = await con.fetch(f"EXPLAIN EXECUTE stream_page({args})")
            finally:
                await con.execute("DEALLOCATE stream_page")
                await con.execute("RESET plan_cache_mode")
            plan = "\n".join(r[0] for r in rows)
            # events is partitioned by time: each partition's stream index, merged in order.
            assert re.search(r"Index Scan using events_p\d{8}_\d{4}_tx_id_seq_idx on events_p", plan), (
                f"{name}:\n{plan}"
            )
            assert "Merge Append" in plan, f"{name}:\n{plan}"
            assert "Seq Scan on events" not in plan, f"{name}:\n{plan}"


async def test_paging_never_repeats_and_never_skips_what_was_committed_before(db: Database) -> None:
    """find_by_filter(after=cursor) while others write: every event committed before paging began
    is returned exactly once (the paging promise; the feed promise belongs to follow())."""
    swarm = await make_swarm(db, "paged")
    repo = EventRepository(db)
    before = {e.id for e in await repo.create_many([{"swarm_id": swarm, "type": "old"} for _ in range(2000)])}
    stop = asyncio.Event()

    async def writer() -> None:
        while not stop.is_set():
            await repo.create_many([{"swarm_id": swarm, "type": "new"} for _ in range(50)])

    writing = asyncio.create_task(writer())
    seen: list[uuid.UUID] = []
    cursor = None
    try:
        while True:
            page = await repo.find_by_filter(swarm_id=swarm, limit=97, after=cursor)
            if not page:
                break
            seen.extend(e.id for e in page)
            cursor = EventRepository.cursor(page[-1])
            if before <= set(seen) and len(seen) > 3000:
                break
    finally:
        stop.set()
        await writing
    assert len(seen) == len(set(seen)), "a row was repeated"
    assert before <= set(seen), "a row committed before paging began was skipped"


async def test_a_cursor_from_another_database_history_is_refused(db: Database) -> None:
    from dash_storage.core.errors import DashStorageError
    from dash_storage.stream.position import Position, encode

    ahead = encode(Position(2**62, 1))  # far beyond any transaction this server has had
    async with Follower(db, after=ahead, listen=False) as stream:
        with pytest.raises(DashStorageError, match="another database history"):
            await stream.read_page()

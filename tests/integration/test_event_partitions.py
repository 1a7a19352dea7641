"""The event log partitioned by time: partitions made before the writes that need them, retention by
dropping whole partitions, exact stats from the rollups, and the conversion of an existing log."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from dash_storage.core.config import Settings
from dash_storage.core.database import Connection, Database
from dash_storage.core.errors import ConflictError, NotFoundError, ValidationError
from dash_storage.migrations import MigrationRunner
from dash_storage.migrations.files import builtin_migrations
from dash_storage.repositories import event_maintenance, event_partitions, event_rollups
from dash_storage.repositories.agents import AgentRepository
from dash_storage.repositories.events import EventRepository
from dash_storage.repositories.swarms import SwarmRepository
from tests.conftest import TEST_DB, MakeDatabase, admin_connect, drop_database, recreate_database
from tests.factories import make_agent, make_swarm, wait_until
from tests.faults.databases import as_attempt

UTC = dt.UTC
T = TypeVar("T")


async def _partition_of(db: Database, ts: dt.datetime) -> Any:
    return await db.fetchrow(
        "SELECT name, lower_bound, upper_bound FROM event_partitions "
        "WHERE $1 >= lower_bound AND $1 < upper_bound",
        ts,
    )


async def _raw_stats(db: Database, since: str) -> dict[tuple[str, str], int]:
    rows = await db.fetch(
        f"SELECT type, severity, count(*) FROM events WHERE timestamp >= {since} GROUP BY 1, 2"
    )
    return {(r[0], r[1]): r[2] for r in rows}


async def _rolled_up(db: Database) -> None:
    """Refresh the rollups until they hold every event (a transaction open anywhere on the server
    holds the stream's mark back, and with it the rollups, until it ends)."""

    async def done() -> bool:
        await event_rollups.refresh(db)
        return (await event_rollups.state(db)).behind == 0

    await wait_until(done, "the rollups to hold every event", seconds=60)


# -- partitions appear before the writes that need them ------------------------------------------------


async def test_events_of_any_time_are_stored_in_their_partition(db: Database) -> None:
    swarm = await make_swarm(db)
    repo = EventRepository(db)
    times = [
        dt.datetime(1971, 3, 4, 5, 6, tzinfo=UTC),  # a legacy import from long ago
        dt.datetime(2099, 12, 31, 23, 59, tzinfo=UTC),  # clock skew, or a scheduled event
        dt.datetime.now(UTC) + dt.timedelta(days=40),
    ]
    one = await repo.create(swarm, "past", timestamp=times[0])
    many = await repo.create_many([{"swarm_id": swarm, "type": "t", "timestamp": t} for t in times[1:] * 60])
    assert one.timestamp == times[0] and len(many) == 120
    for t in times:
        part = await _partition_of(db, t)
        assert part is not None, t
        assert part["name"] == "events_p" + t.strftime("%Y%m%d") + "_0000"
        assert part["upper_bound"] - part["lower_bound"] == dt.timedelta(days=1)
    assert await db.fetchval("SELECT count(*) FROM events") == 121


async def test_datetime_min_and_max_are_refused_before_anything_is_written(db: Database) -> None:
    swarm = await make_swarm(db)
    for bad in (dt.datetime.min.replace(tzinfo=UTC), dt.datetime.max.replace(tzinfo=UTC)):
        with pytest.raises(ValidationError, match="timestamp"):
            await EventRepository(db).create_many(
                [{"swarm_id": swarm, "type": "ok"}, {"swarm_id": swarm, "type": "bad", "timestamp": bad}]
            )
    assert await db.fetchval("SELECT count(*) FROM events") == 0


async def test_migrate_and_routine_writes_keep_a_week_of_partitions_ahead(
    db: Database, make_database: MakeDatabase
) -> None:
    now = dt.datetime.now(UTC)
    # Take away every empty partition from tomorrow on (as if the log had not been written to for
    # a week); a new process's first write makes them again.
    con = await admin_connect(db.settings, TEST_DB)
    try:
        for (name,) in await con.fetch(
            "SELECT name FROM event_partitions WHERE lower_bound > now() + interval '1 day'"
        ):
            await con.execute(f'DROP TABLE "{name}"')
    finally:
        await con.close()
    assert await _partition_of(db, now + dt.timedelta(days=5)) is None
    fresh = await make_database()
    await EventRepository(fresh).create(await make_swarm(db), "now")
    for days in range(7):
        assert await _partition_of(db, now + dt.timedelta(days=days)) is not None, days


async def test_a_partition_dropped_behind_the_librarys_back_is_made_again(db: Database) -> None:
    swarm = await make_swarm(db)
    repo = EventRepository(db)
    when = dt.datetime(1999, 5, 5, 12, tzinfo=UTC)
    await repo.create(swarm, "first", timestamp=when)  # the library now knows this partition
    await db.execute('DROP TABLE "events_p19990505_0000"')
    again = await repo.create(swarm, "second", timestamp=when + dt.timedelta(minutes=1))
    assert (await repo.find_by_id(again.id)) == again
    batch = await repo.create_many([{"swarm_id": swarm, "type": "b", "timestamp": when} for _ in range(3)])
    assert len(batch) == 3


class LostThenPruned(Database):
    """The first retried write runs once and its answer is lost (as if the connection dropped after
    COMMIT); then ``prune`` drops a partition behind the library's back, and the write runs again
    as a retry attempt."""

    prune = ""

    async def run(
        self, fn: Callable[[Connection, int], Awaitable[T]], *, retry: bool = False, transaction: bool = False
    ) -> T:
        if not retry or not self.prune:
            return await super().run(fn, retry=retry, transaction=transaction)
        await super().run(as_attempt(fn, 1), transaction=transaction)
        await self.execute(f'DROP TABLE "{self.prune}"')
        self.prune = ""
        return await super().run(as_attempt(fn, 2), transaction=transaction)


@pytest.mark.parametrize("size", [4, 40], ids=["insert", "copy"])
async def test_a_retry_that_finds_part_of_its_batch_pruned_stores_every_event_once(
    db: Database, settings: Settings, size: int
) -> None:
    # The lost first attempt stored the whole batch; a prune then took the older day's half. The
    # retry finds the newer half stored (its own rows, not a conflict) and the partition of the
    # older half gone: that partition is made again and the retry goes on, storing that half.
    swarm = await make_swarm(db)
    days = [dt.datetime(1999, 6, 6, 12, tzinfo=UTC), dt.datetime(1999, 6, 7, 12, tzinfo=UTC)]
    items = [{"swarm_id": swarm, "type": f"e{i}", "timestamp": days[i % 2]} for i in range(size)]
    lossy = LostThenPruned(settings)
    await lossy.initialize()
    try:
        lossy.prune = "events_p19990606_0000"
        created = await EventRepository(lossy).create_many(items)
    finally:
        await lossy.close()
    assert not lossy.prune  # the fault happened
    assert [e.type for e in created] == [f"e{i}" for i in range(size)]
    stored = await db.fetch("SELECT id, type, timestamp FROM events")
    assert sorted((e.id, e.type, e.timestamp) for e in created) == sorted(tuple(r) for r in stored)
    assert await _partition_of(db, days[0]) is not None


async def test_processes_racing_for_one_new_partition_all_write(
    db: Database, make_database: MakeDatabase
) -> None:
    swarm = await make_swarm(db)
    when = dt.datetime(1988, 8, 8, 8, tzinfo=UTC)
    dbs = [await make_database() for _ in range(6)]
    created = await asyncio.gather(
        *(EventRepository(d).create(swarm, f"r{i}", timestamp=when) for i, d in enumerate(dbs))
    )
    assert len({e.id for e in created}) == 6
    assert (
        await db.fetchval("SELECT count(*) FROM event_partitions WHERE name = 'events_p19880808_0000'") == 1
    )


async def test_partition_size_is_a_setting_and_never_overlaps(
    db: Database, make_database: MakeDatabase
) -> None:
    swarm = await make_swarm(db)
    six = await make_database(dash_event_partition_size="6h")
    when = dt.datetime(1977, 7, 7, 13, 30, tzinfo=UTC)
    await EventRepository(six).create(swarm, "six", timestamp=when)
    part = await _partition_of(db, when)
    assert (part["lower_bound"], part["upper_bound"]) == (
        dt.datetime(1977, 7, 7, 12, tzinfo=UTC),
        dt.datetime(1977, 7, 7, 18, tzinfo=UTC),
    )
    # A day-long partition made next to it is cut short where the 6-hour one begins.
    await EventRepository(db).create(swarm, "day", timestamp=when - dt.timedelta(hours=3))
    part = await _partition_of(db, when - dt.timedelta(hours=3))
    assert (part["lower_bound"], part["upper_bound"]) == (
        dt.datetime(1977, 7, 7, tzinfo=UTC),
        dt.datetime(1977, 7, 7, 12, tzinfo=UTC),
    )


async def test_time_bounded_reads_prune_to_their_partitions(db: Database) -> None:
    swarm = await make_swarm(db)
    now = dt.datetime.now(UTC)
    await EventRepository(db).create_many(
        [{"swarm_id": swarm, "type": "t", "timestamp": now - dt.timedelta(days=d)} for d in range(20)]
    )
    since = now - dt.timedelta(hours=30)
    needed = await db.fetchval("SELECT count(*) FROM event_partitions WHERE upper_bound > $1", since)
    total = await db.fetchval("SELECT count(*) FROM event_partitions")
    assert total > needed + 10
    query = (
        'SELECT id FROM events WHERE swarm_id = $1 AND "timestamp" >= $2 ORDER BY "timestamp", id LIMIT 100'
    )
    async with db.acquire() as con:
        for mode in ("force_custom_plan", "force_generic_plan"):
            await con.execute(f"SET plan_cache_mode = {mode}")
            try:
                await con.execute(f"PREPARE pruned AS {query}")
                plan = await con.fetchval(
                    f"EXPLAIN (FORMAT JSON) EXECUTE pruned('{swarm}', '{since.isoformat()}')"
                )
            finally:
                await con.execute("DEALLOCATE pruned")
                await con.execute("RESET plan_cache_mode")
            text = json.dumps(plan)
            scanned = text.count('"Relation Name": "events_p')
            removed = sum(int(n) for n in _values(plan, "Subplans Removed"))
            # A custom plan lists only the partitions it needs; a generic one removes the others
            # when it starts.
            assert scanned - removed <= needed, (mode, scanned, removed, needed)


def _values(node: Any, key: str) -> list[Any]:
    if isinstance(node, dict):
        found = [node[key]] if key in node else []
        return found + [v for child in node.values() for v in _values(child, key)]
    if isinstance(node, list):
        return [v for child in node for v in _values(child, key)]
    if isinstance(node, str):
        try:
            return _values(json.loads(node), key)
        except ValueError:
            return []
    return []


# -- retention: whole partitions, never rows ---------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "POSTGRES_DB": TEST_DB}
    return subprocess.run(
        [sys.executable, "-m", "dash_storage", *args], env=env, capture_output=True, text=True, timeout=120
    )


async def test_prune_drops_whole_partitions_and_their_rollups(db: Database) -> None:
    swarm = await make_swarm(db)
    repo = EventRepository(db)
    now = dt.datetime.now(UTC)
    await repo.create_many(
        [
            {"swarm_id": swarm, "type": "old", "timestamp": now - dt.timedelta(days=d, minutes=m)}
            for d in range(40, 46)
            for m in range(5)
        ]
    )
    keep = await repo.create_many([{"swarm_id": swarm, "type": "new"} for _ in range(5)])
    await event_rollups.refresh(db)
    size_before = await db.fetchval("SELECT sum(total_bytes) FROM event_partitions")

    dry = _cli("prune", "--older-than", "30d", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    planned = json.loads(dry.stdout)
    assert planned["dry_run"] and planned["events"] == 30 and len(planned["partitions"]) >= 6
    assert await db.fetchval("SELECT count(*) FROM events") == 35

    done = _cli("prune", "--older-than", "30d", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["events"] == 30 and report["partitions"] == planned["partitions"]
    assert {r[0] for r in await db.fetch("SELECT id FROM events")} == {e.id for e in keep}
    names = {r[0] for r in await db.fetch("SELECT name FROM event_partitions")}
    assert not names & {p["name"] for p in report["partitions"]}
    # Nothing left to vacuum: the space went with the partitions.
    size_after = await db.fetchval("SELECT sum(total_bytes) FROM event_partitions")
    assert size_after == size_before - report["bytes"]
    assert not await db.fetchval(
        "SELECT count(*) FROM event_counts WHERE bucket < now() - interval '30 days'"
    )
    stats = await repo.get_stats(24 * 365)
    assert stats.total == 5 and stats.by_type == {"new": 5}


async def test_prune_needs_a_cutoff_and_says_which(db: Database) -> None:
    result = _cli("prune")
    assert (
        result.returncode == 2 and "--older-than" in result.stderr and "DASH_EVENT_RETENTION" in result.stderr
    )
    result = _cli("prune", "--older-than", "ten days")
    assert result.returncode == 2 and "12h, 30d or 2w" in result.stderr


async def test_a_prune_interrupted_after_detaching_is_finished_by_the_next(db: Database) -> None:
    swarm = await make_swarm(db)
    when = dt.datetime(2001, 2, 3, 4, tzinfo=UTC)
    await EventRepository(db).create(swarm, "gone", timestamp=when)
    await _rolled_up(db)
    lower, upper = dt.datetime(2001, 2, 3, tzinfo=UTC), dt.datetime(2001, 2, 4, tzinfo=UTC)
    mark = f"{event_partitions.PRUNED_MARK} {lower.isoformat()} {upper.isoformat()}"
    await db.execute(f"COMMENT ON TABLE events_p20010203_0000 IS '{mark}'")
    await db.execute("ALTER TABLE events DETACH PARTITION events_p20010203_0000")
    assert await db.fetchval(
        "SELECT count(*) FROM event_counts WHERE bucket >= $1 AND bucket < $2", lower, upper
    )
    await event_partitions.prune(db, dt.datetime(1990, 1, 1, tzinfo=UTC))
    assert await db.fetchval("SELECT to_regclass('events_p20010203_0000')") is None
    assert not await db.fetchval(
        "SELECT count(*) FROM event_counts WHERE bucket >= $1 AND bucket < $2", lower, upper
    )


async def test_maintain_runs_once_at_a_time(db: Database, make_database: MakeDatabase) -> None:
    others = [await make_database() for _ in range(3)]
    reports = await asyncio.gather(*(event_maintenance.maintain(d) for d in [db, *others]))
    assert any(not r.skipped for r in reports)
    # While another host holds the maintenance lock, a run does nothing and says so.
    holder = await admin_connect(db.settings, TEST_DB)
    try:
        assert await holder.fetchval("SELECT pg_try_advisory_lock(4410, 3)")
        assert (await event_maintenance.maintain(others[0])).skipped
        held = _cli("maintain", "--json")
        assert held.returncode == 0 and json.loads(held.stdout)["skipped"] is True
    finally:
        await holder.close()
    result = _cli("maintain", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["skipped"] is False
    doctor = _cli("doctor", "--json")
    part = json.loads(doctor.stdout)["partitions"]
    assert part["count"] >= 8 and part["retention"] == "keep everything"


# -- exact stats from the rollups --------------------------------------------------------------------


async def test_stats_are_exact_under_concurrent_writes_rollbacks_and_deletes(
    db: Database, make_database: MakeDatabase
) -> None:
    """Writers add events (this minute, earlier this hour, hours and days ago), some in transactions
    that roll back; a refresher rolls up meanwhile; an agent and a swarm are deleted. At every check,
    inside one snapshot, the rollup-based counts equal counting the raw rows."""
    swarms = [await make_swarm(db, f"s{i}") for i in range(3)]
    agents = [await make_agent(db, s) for s in swarms for _ in range(4)]
    writer_db = await make_database()
    repo = EventRepository(writer_db)
    stop = asyncio.Event()
    offsets = [
        dt.timedelta(0),
        dt.timedelta(minutes=-7),
        dt.timedelta(hours=-3, seconds=-17),
        dt.timedelta(hours=-23, minutes=-59),
        dt.timedelta(days=-2),
    ]

    async def write(k: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            agent = agents[(k + n) % len(agents)]
            swarm = swarms[agents.index(agent) // 4]
            batch = [
                {
                    "swarm_id": swarm,
                    "agent_id": agent,
                    "type": f"t{(k + i) % 3}",
                    "severity": ("info", "warning", "error")[i % 3],
                    "timestamp": dt.datetime.now(UTC) + offsets[(n + i) % len(offsets)],
                }
                for i in range(1 + n % 4)
            ]
            if n % 5 == 0:  # a batch that rolls back: never counted
                try:
                    async with writer_db.transaction() as con:
                        await con.execute(
                            "INSERT INTO events (swarm_id, agent_id, type) VALUES ($1, $2, 'ghost')",
                            swarm,
                            agent,
                        )
                        raise RuntimeError("rolled back")
                except (RuntimeError, ConflictError):  # ConflictError: its agent was deleted
                    pass
            else:
                try:
                    await repo.create_many(batch)
                except NotFoundError:  # its agent or swarm was deleted meanwhile
                    pass

    async def refresh() -> None:
        while not stop.is_set():
            await event_rollups.refresh(writer_db, wait=False)
            await asyncio.sleep(0.01)

    async def check() -> None:
        async with db.transaction(isolation="repeatable_read") as con:
            for hours in (0.5, 24, 24 * 3):
                since = f"now() - make_interval(secs => {hours * 3600})"
                raw = {
                    (r[0], r[1]): r[2]
                    for r in await con.fetch(
                        "SELECT type, severity, count(*) FROM events "
                        f"WHERE timestamp >= {since} GROUP BY 1, 2"
                    )
                }
                rolled = {
                    (r[0], r[1]): r[2]
                    for r in await con.fetch(
                        f"SELECT type, severity, sum(events) FROM dash_event_counts({since}) GROUP BY 1, 2"
                    )
                }
                assert rolled == raw, hours
            raw24 = await con.fetch(
                "SELECT type, count(*), count(DISTINCT agent_id), count(DISTINCT swarm_id), "
                "min(timestamp), max(timestamp) FROM events "
                "WHERE timestamp >= now() - interval '24 hours' GROUP BY 1 ORDER BY 1"
            )
            view = await con.fetch("SELECT * FROM event_stats_24h ORDER BY 1")
            assert [tuple(r) for r in view] == [tuple(r) for r in raw24]

    tasks = [asyncio.create_task(write(k)) for k in range(4)] + [asyncio.create_task(refresh())]
    try:
        for round_ in range(8):
            await asyncio.sleep(0.25)
            await check()
            if round_ == 3:
                await AgentRepository(db).delete(agents[0])
            if round_ == 5:
                await SwarmRepository(db).delete(swarms[2])
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    await check()
    await event_rollups.refresh(db)
    await check()
    stats = await EventRepository(db).get_stats(72)
    raw = await _raw_stats(db, "now() - interval '72 hours'")
    assert stats.total == sum(raw.values())
    assert await db.fetchval("SELECT count(*) FROM events WHERE type = 'ghost'") == 0


async def test_writers_never_wait_for_the_rollups(db: Database, make_database: MakeDatabase) -> None:
    """50 writers of one type in one hour while another session holds every rollup lock (the
    rollups' advisory lock, and the row locks of this hour's counts): they all finish, since no
    write touches a rollup row."""
    swarm = await make_swarm(db)
    await EventRepository(db).create(swarm, "hot")
    await _rolled_up(db)
    holder = await admin_connect(db.settings, TEST_DB)
    writers = await make_database(postgres_max_pool_size=50)
    try:
        await holder.execute("BEGIN")
        await holder.execute("SELECT pg_advisory_xact_lock(4410, 2)")
        locked = await holder.fetchval("SELECT count(*) FROM (SELECT 1 FROM event_counts FOR UPDATE) t")
        assert locked > 0
        repo = EventRepository(writers)
        done = await asyncio.wait_for(
            asyncio.gather(*(repo.create(swarm, "hot") for _ in range(50))), timeout=60
        )
        assert len(done) == 50
    finally:
        await holder.execute("ROLLBACK")
        await holder.close()
    stats = await EventRepository(db).get_stats(1)
    assert stats.by_type == {"hot": 51}


# -- converting an existing log -----------------------------------------------------------------------


async def test_an_existing_log_is_converted_with_every_event(settings: Settings) -> None:
    name = f"{TEST_DB}_convert"
    await recreate_database(settings, name)
    files = builtin_migrations()
    split = next(i for i, f in enumerate(files) if f.name.endswith("_event_partitions.sql"))
    con = await admin_connect(settings, name)
    try:
        async with con.transaction():
            for f in files[:split]:
                await con.execute(f.text)
        await con.execute(
            "CREATE TABLE _migrations (id SERIAL PRIMARY KEY, name TEXT NOT NULL UNIQUE, "
            "applied_at TIMESTAMPTZ NOT NULL DEFAULT now(), checksum TEXT NOT NULL)"
        )
        for f in files[:split]:
            await con.execute("INSERT INTO _migrations (name, checksum) VALUES ($1, $2)", f.name, f.checksum)
        await con.execute(
            "INSERT INTO swarms (id, name) SELECT gen_random_uuid(), 's' || g FROM generate_series(1, 3) g"
        )
        await con.execute("INSERT INTO agents (id, swarm_id) SELECT gen_random_uuid(), id FROM swarms")
        await con.execute(
            'INSERT INTO events (swarm_id, agent_id, type, payload, "timestamp", severity) '
            "SELECT a.swarm_id, CASE WHEN g % 3 = 0 THEN NULL ELSE a.id END, 't' || (g % 5), "
            "jsonb_build_object('g', g), now() - make_interval(hours => g % 2000), "
            "(ARRAY['debug','info','warning','error','critical'])[1 + g % 5] "
            "FROM agents a, generate_series(1, 4000) g"
        )
        await con.execute(
            "INSERT INTO events (swarm_id, type, timestamp) SELECT id, 'ancient', '1970-01-01' FROM swarms"
        )
        checksum = "SELECT count(*), sum(hashtextextended(e::text, 0)::numeric) FROM events e"
        before = tuple(await con.fetchrow(checksum))
        positions = await con.fetch("SELECT id, tx_id::text, seq FROM events ORDER BY id")
    finally:
        await con.close()
    db = Database(settings, postgres_db=name, dash_migrations_dir=None)
    try:
        await db.initialize()
        applied = await MigrationRunner(db).migrate()
        assert [a for a in applied] == [f.name for f in files[split:]]
        assert await db.fetchval("SELECT relkind::text FROM pg_class WHERE relname = 'events'") == "p"
        assert tuple(await db.fetchrow(checksum)) == before
        assert await db.fetch("SELECT id, tx_id::text, seq FROM events ORDER BY id") == positions
        stats = await EventRepository(db).get_stats(24 * 100)
        raw = await _raw_stats(db, "now() - interval '100 days'")
        assert stats.total == sum(raw.values()) and stats.total > 0
        # The stream goes on after the converted rows.
        swarm = await db.fetchval("SELECT id FROM swarms LIMIT 1")
        new = await EventRepository(db).create(swarm, "after")
        assert await db.fetchval(
            "SELECT seq > (SELECT max(seq) FROM events WHERE id <> $1) FROM events WHERE id = $1", new.id
        )
    finally:
        await db.close()
        await drop_database(settings, name)

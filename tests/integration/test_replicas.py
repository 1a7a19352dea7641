"""Read replicas (DATABASE_READ_URL) against a real primary and a real streaming replica.

The pair is made by ``tests/replica_server.py`` from the embedded PostgreSQL 18 binaries, once for
this module; the schema is migrated on the primary and reaches the replica by streaming. Which
server served a read is proved on the servers themselves: ``pg_is_in_recovery()`` and
``inet_server_port()`` of the serving connection, or data that only one of them has yet (the
replica's replay paused).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from dash_storage.core.database import Database
from dash_storage.core.errors import DashStorageError
from dash_storage.migrations.runner import MigrationRunner
from dash_storage.repositories.agents import AgentRepository
from dash_storage.repositories.swarms import SwarmRepository
from tests import replica_server
from tests.replica_server import ReplicaPair

pytestmark = pytest.mark.direct_server("starts its own primary and replica; no pooler in front")

_why = replica_server.unavailable_reason()
if _why is not None:
    pytest.skip(_why, allow_module_level=True)


@pytest.fixture(scope="module")
def pair() -> Iterator[ReplicaPair]:
    p = ReplicaPair().start()
    try:
        yield p
    finally:
        p.stop()


def _settings(pair: ReplicaPair, **overrides: Any) -> dict[str, Any]:
    return {
        "database_url": pair.primary_url,
        "database_read_url": pair.replica_url,
        "postgres_retry_delay": 50,
        "postgres_retry_attempts": 40,
        **overrides,
    }


@pytest.fixture(scope="module")
async def migrated(pair: ReplicaPair) -> None:
    db = Database(database_url=pair.primary_url)
    try:
        await MigrationRunner(db).migrate()
    finally:
        await db.close()


@pytest.fixture
async def make_db(pair: ReplicaPair, migrated: None) -> AsyncIterator[Any]:
    made: list[Database] = []

    async def make(**overrides: Any) -> Database:
        db = Database(**_settings(pair, **overrides))
        made.append(db)
        await db.initialize()
        assert db.replicas is not None
        db.replicas.check_interval = 0.05
        await until(lambda: db.replicas.status()[0].state == "up", db)  # type: ignore[union-attr]
        return db

    yield make
    for db in made:
        await db.close()
    # Every test leaves the replica running, replaying, without delay.
    if not pair.running_replica:
        await asyncio.to_thread(pair.start_replica)
    await asyncio.to_thread(pair.psql_replica, "SELECT pg_wal_replay_resume()")


async def until(condition: Any, db: Database, what: str = "condition", limit: float = 30.0) -> None:
    """Wait until ``condition()`` holds (the checks run in the background), reading meanwhile so that
    the background checks are running; fail after ``limit`` seconds (a hang, not a timing claim)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(
                f"{what} never became true; replicas: {db.replicas and db.replicas.status()}"
            )
        await db.fetchval("SELECT 1", replica=True)
        await asyncio.sleep(0.02)


async def served_by(db: Database) -> tuple[bool, int]:
    """(in recovery?, port) of the server that serves a read marked read-only right now."""
    row = await db.fetchrow("SELECT pg_is_in_recovery() AS r, inet_server_port() AS p", replica=True)
    assert row is not None
    return row["r"], row["p"]


async def test_marked_reads_go_to_the_replica_and_the_rest_to_the_primary(
    make_db: Any, pair: ReplicaPair
) -> None:
    db = await make_db()
    assert await served_by(db) == (True, pair.replica_port)
    # Not marked, a write, and a read inside a transaction: the primary.
    assert await db.fetchval("SELECT pg_is_in_recovery()") is False
    assert await db.fetchval("SELECT inet_server_port()", retry=True) == pair.primary_port
    async with db.transaction() as con:
        assert await con.fetchval("SELECT pg_is_in_recovery()") is False
    swarm = await SwarmRepository(db).create(name="r-" + uuid.uuid4().hex[:8])
    assert await db.fetchval("SELECT pg_is_in_recovery()", retry=True) is False
    # After the write, the replica still serves (once it has replayed it).
    assert (await SwarmRepository(db).find_by_id(swarm.id)) == swarm
    assert await served_by(db) == (True, pair.replica_port)


async def test_repository_reads_are_served_by_the_replica(make_db: Any, pair: ReplicaPair) -> None:
    """With replay paused, a row written by another process is on the primary only: a repository
    read that does not find it was served by the replica."""
    reader = await make_db()
    writer = Database(database_url=pair.primary_url)
    try:
        await asyncio.to_thread(pair.psql_replica, "SELECT pg_wal_replay_pause()")
        swarm = await SwarmRepository(writer).create(name="hidden-" + uuid.uuid4().hex[:8])
        repo = SwarmRepository(reader)
        assert await repo.find_by_id(swarm.id) is None
        assert await repo.exists(swarm.id) is False
        assert swarm.id not in {s.id for s in await repo.list(limit=1000)}
        before = reader.replicas.replicas[0].reads  # type: ignore[union-attr]
        await asyncio.to_thread(pair.psql_replica, "SELECT pg_wal_replay_resume()")
        # Replayed now: the replica finds it.
        found = None
        for _ in range(500):
            found = await repo.find_by_id(swarm.id)
            if found is not None:
                break
            await asyncio.sleep(0.01)
        assert found == swarm
        assert reader.replicas.replicas[0].reads > before  # type: ignore[union-attr]
    finally:
        await writer.close()


async def _write_then_read(db: Database, rounds: int) -> None:
    """Each round writes through ``db`` and reads at once: every read must see the write just made."""
    swarms, agents = SwarmRepository(db), AgentRepository(db)
    swarm = await swarms.create(name="ryw-" + uuid.uuid4().hex[:8])
    for i in range(rounds):
        status = ("paused", "active")[i % 2]
        await swarms.update_status(swarm.id, status)
        found = await swarms.find_by_id(swarm.id)
        assert found is not None and found.status == status
        agent = await agents.create(swarm.id, label=f"a{i}")
        assert await agents.find_by_id(agent.id) == agent
        assert await agents.count(swarm_id=swarm.id) == i + 1


async def test_reads_see_the_callers_own_writes(make_db: Any) -> None:
    db = await make_db()
    await _write_then_read(db, 30)
    replicas = db.replicas
    assert replicas is not None
    assert replicas.replicas[0].reads > 0


async def test_reads_see_own_writes_while_the_replica_is_delayed(make_db: Any, pair: ReplicaPair) -> None:
    """Replay held back 100 ms: with a 2 s wait the reads wait for the replica; with none they go to
    the primary. Either way every read sees the write before it."""
    await asyncio.to_thread(pair.psql_replica, "ALTER SYSTEM SET recovery_min_apply_delay = '100ms'")
    await asyncio.to_thread(pair.psql_replica, "SELECT pg_reload_conf()")
    try:
        waiting = await make_db(database_read_wait=2000)
        await _write_then_read(waiting, 6)
        assert waiting.replicas is not None and waiting.replicas.waits > 0
        assert waiting.replicas.replicas[0].reads > 0
        hurried = await make_db(database_read_wait=0)
        await _write_then_read(hurried, 6)
        assert hurried.replicas is not None and hurried.replicas.primary_reads > 0
    finally:
        await asyncio.to_thread(pair.psql_replica, "ALTER SYSTEM RESET recovery_min_apply_delay")
        await asyncio.to_thread(pair.psql_replica, "SELECT pg_reload_conf()")


async def test_reads_see_own_writes_while_replay_is_paused(make_db: Any, pair: ReplicaPair) -> None:
    db = await make_db(database_read_wait=5)
    await asyncio.to_thread(pair.psql_replica, "SELECT pg_wal_replay_pause()")
    await _write_then_read(db, 10)
    assert db.replicas is not None and db.replicas.primary_reads > 0


async def test_a_replica_stopped_under_load_fails_no_call(make_db: Any, pair: ReplicaPair) -> None:
    db = await make_db()
    swarms = SwarmRepository(db)
    swarm = await swarms.create(name="load-" + uuid.uuid4().hex[:8])
    stop = asyncio.Event()
    done = [0]

    async def reader() -> None:
        while not stop.is_set():
            assert await swarms.find_by_id(swarm.id) == swarm
            assert await swarms.count() >= 1
            done[0] += 1

    workers = [asyncio.create_task(reader()) for _ in range(4)]
    try:
        await until(lambda: done[0] > 20, db, "reads before the stop")
        await asyncio.to_thread(pair.stop_replica)
        await until(lambda: db.replicas.status()[0].state == "down", db, "replica seen down")  # type: ignore[union-attr]
        mark = done[0]
        await until(lambda: done[0] > mark + 50, db, "reads from the primary")
        assert await served_by(db) == (False, pair.primary_port)
        await asyncio.to_thread(pair.start_replica)
        await until(lambda: db.replicas.status()[0].state == "up", db, "replica back")  # type: ignore[union-attr]
        mark = done[0]
        await until(lambda: done[0] > mark + 20, db, "reads after the restart")
    finally:
        stop.set()
        results = await asyncio.gather(*workers, return_exceptions=True)
    assert [r for r in results if r is not None] == []  # no call failed
    assert await served_by(db) == (True, pair.replica_port)


async def test_a_replica_that_lags_past_the_limit_is_left_aside(make_db: Any, pair: ReplicaPair) -> None:
    db = await make_db(database_read_max_lag=0.3)
    replicas = db.replicas
    assert replicas is not None
    other = Database(database_url=pair.primary_url)
    try:
        await asyncio.to_thread(pair.psql_replica, "SELECT pg_wal_replay_pause()")
        await SwarmRepository(other).create(name="lag-" + uuid.uuid4().hex[:8])
        await until(lambda: replicas.status()[0].state == "lagging", db, "replica seen lagging")
        assert await served_by(db) == (False, pair.primary_port)
        status = replicas.status()[0]
        assert status.lag_s is not None and status.lag_s > 0.3
        assert status.error is not None and "DATABASE_READ_MAX_LAG" in status.error
        await asyncio.to_thread(pair.psql_replica, "SELECT pg_wal_replay_resume()")
        await until(lambda: replicas.status()[0].state == "up", db, "replica caught up")
        assert await served_by(db) == (True, pair.replica_port)
    finally:
        await other.close()


async def test_an_unreachable_replica_fails_no_read(pair: ReplicaPair, migrated: None) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = Database(database_url=pair.primary_url, database_read_url=pair.url(port), postgres_retry_attempts=0)
    try:
        assert db.replicas is not None
        statuses = await db.replicas.check()
        assert statuses[0].state == "down" and statuses[0].error
        assert await served_by(db) == (False, pair.primary_port)
        assert await SwarmRepository(db).count() >= 0
    finally:
        await db.close()


def test_doctor_shows_each_replica(pair: ReplicaPair, migrated: None) -> None:
    import json
    import subprocess
    import sys

    env = {**os.environ, "DATABASE_URL": pair.primary_url, "DATABASE_READ_URL": pair.replica_url}
    done = subprocess.run(
        [sys.executable, "-m", "dash_storage", "doctor", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    [replica] = report["replicas"]
    assert replica["name"] == f"127.0.0.1:{pair.replica_port}"
    assert replica["state"] == "up" and replica["lag_s"] is not None and replica["error"] is None


def test_read_urls_are_checked() -> None:
    with pytest.raises(DashStorageError, match="DATABASE_READ_URL: URL 2 must start with "):
        Database(database_url="postgresql://h/db", database_read_url="postgresql://a/db, mysql://b/db")

"""Database: pool lifecycle, transactions, codecs, exhaustion, retries after killed connections."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any
from uuid import uuid4 as new_uuid

import asyncpg
import pytest

from dash_storage import (
    ConflictError,
    Database,
    DatabaseError,
    DatabaseUnavailableError,
    PoolExhaustedError,
    get_database,
    reset_database,
)
from dash_storage.core.config import Settings
from tests.conftest import TEST_DB, admin_connect
from tests.factories import wait_until


async def test_initialize_health_and_stats(make_database) -> None:
    db: Database = await make_database(postgres_min_pool_size=2, postgres_max_pool_size=4)
    health = await db.health_check()
    assert health.ok and health.database == TEST_DB
    assert health.server_version and health.latency_ms is not None
    stats = db.stats()
    assert (stats.min, stats.max) == (2, 4)
    assert stats.size >= 2 and stats.in_use == 0 and stats.waiting == 0
    async with db.acquire():
        assert db.stats().in_use == 1
    assert db.stats().in_use == 0


async def test_json_and_jsonb_round_trip_as_python(db: Database) -> None:
    value = {"a": [1, 2.5, None, "ü"], "b": {"c": True}}
    assert await db.fetchval("SELECT $1::jsonb", value) == value
    assert await db.fetchval("SELECT $1::json", value) == value


async def test_transaction_commits_and_rolls_back(db: Database) -> None:
    await db.execute("CREATE TEMP TABLE IF NOT EXISTS t_tx (v int)")  # temp: per connection
    await db.execute("DROP TABLE IF EXISTS tx_probe")
    await db.execute("CREATE TABLE tx_probe (v int)")
    try:
        async with db.transaction() as con:
            await con.execute("INSERT INTO tx_probe VALUES (1)")
        with pytest.raises(RuntimeError):
            async with db.transaction() as con:
                await con.execute("INSERT INTO tx_probe VALUES (2)")
                raise RuntimeError("caller's own error passes through unchanged")
        with pytest.raises(ConflictError):
            async with db.transaction() as con:
                await con.execute("INSERT INTO tx_probe VALUES (3)")
                await con.execute("CREATE UNIQUE INDEX tx_probe_u ON tx_probe (v)")
                await con.execute("INSERT INTO tx_probe VALUES (3)")
        assert await db.fetch("SELECT v FROM tx_probe ORDER BY v") == [(1,)]
        assert db.stats().in_use == 0
    finally:
        await db.execute("DROP TABLE IF EXISTS tx_probe")


async def test_pool_exhaustion_names_size_and_fix(make_database) -> None:
    db: Database = await make_database(
        postgres_min_pool_size=0, postgres_max_pool_size=3, postgres_connection_timeout=300
    )
    async with contextlib.AsyncExitStack() as held:
        for _ in range(3):
            await held.enter_async_context(db.acquire())
        assert db.stats().in_use == 3
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(PoolExhaustedError) as info:
            await db.fetchval("SELECT 1")
        assert loop.time() - started < 5  # bounded by the acquire timeout, not forever
        message = str(info.value)
        assert "3" in message and "POSTGRES_MAX_POOL_SIZE" in message and "leak" in message
    assert await db.fetchval("SELECT 1") == 1
    assert db.stats().in_use == 0


@pytest.mark.parametrize("how", ["statement", "block"])
async def test_a_caller_looping_over_statements_lets_a_queued_caller_in(make_database, how: str) -> None:
    """A connection goes back to the pool at once (no release task), so the caller that released it
    could take it back before the caller queued for it runs: one loop of statements would then hold
    a pool of one until the queued caller's acquire timed out. The queued caller gets it next."""
    db: Database = await make_database(
        postgres_min_pool_size=1, postgres_max_pool_size=1, postgres_connection_timeout=2000
    )
    order: list[str] = []

    async def statement() -> None:
        if how == "statement":
            await db.fetchval("SELECT pg_sleep(0.01)")
        else:
            await db.run(lambda con, _: con.fetchval("SELECT pg_sleep(0.01)"))

    async def looping() -> None:
        for _ in range(300):  # about 3 s in all: longer than the queued caller may wait
            await statement()
        order.append("loop")

    async def queued() -> None:
        await wait_until(lambda: _in_use(db), "the loop holds the only connection")
        await db.fetchval("SELECT 1")
        order.append("queued")

    await asyncio.gather(looping(), queued())
    assert order == ["queued", "loop"]


async def _in_use(db: Database) -> bool:
    return db.stats().in_use == 1


async def _kill_pool_connections(settings: Settings) -> int:
    admin = await admin_connect(settings, TEST_DB)
    try:
        return int(
            await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND application_name = 'dash-storage'"
            )
        )
    finally:
        await admin.close()


async def test_query_succeeds_after_every_connection_was_terminated(make_database, settings) -> None:
    db: Database = await make_database(
        postgres_min_pool_size=4, postgres_max_pool_size=4, postgres_retry_attempts=5, postgres_retry_delay=10
    )

    # Make sure every pooled connection exists, then kill them all.
    async def hold() -> None:
        async with db.acquire() as con:
            await con.execute("SELECT pg_sleep(0.05)")

    await asyncio.gather(*(hold() for _ in range(4)))

    # Killed while in use: the query in flight fails over to a fresh connection.
    async def slow_read() -> int:
        return int(await db.fetchval("SELECT 42 FROM pg_sleep(0.5)", retry=True))

    task = asyncio.create_task(slow_read())
    admin = await admin_connect(settings, TEST_DB)
    try:

        async def reading() -> bool:
            return bool(
                await admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND state = 'active' AND query LIKE 'SELECT 42 FROM pg_sleep%'"
                )
            )

        await wait_until(reading, "the read is running on the server")
    finally:
        await admin.close()
    killed = await _kill_pool_connections(settings)
    assert killed >= 4
    assert await task == 42
    # Killed while idle: the next calls simply work.
    await _kill_pool_connections(settings)
    results = await asyncio.gather(*(db.fetchval("SELECT $1::int", i, retry=True) for i in range(20)))
    assert results == list(range(20))
    assert db.stats().in_use == 0  # discarded connections were returned, nothing leaked


async def test_non_transient_errors_are_not_retried(make_database) -> None:
    db: Database = await make_database(postgres_retry_attempts=5, postgres_retry_delay=10)
    attempts: list[int] = []

    async def bad_syntax(con, attempt: int) -> None:
        attempts.append(attempt)
        await con.execute("SELEC 1")

    with pytest.raises(DatabaseError) as info:
        await db.run(bad_syntax, retry=True)
    assert attempts == [1]
    assert isinstance(info.value.__cause__, asyncpg.PostgresSyntaxError)

    attempts.clear()

    async def duplicate(con, attempt: int) -> None:
        attempts.append(attempt)
        await con.execute(
            "SELECT * FROM (VALUES (1)) v(x); CREATE TEMP TABLE d (x int primary key); "
            "INSERT INTO d VALUES (1), (1)"
        )

    with pytest.raises(ConflictError):
        await db.run(duplicate, retry=True)
    assert attempts == [1]


def unreachable(settings: Settings, **overrides: Any) -> Database:
    """A Database pointed at a port where nothing listens."""
    return Database(settings, postgres_host="127.0.0.1", postgres_port=1, database_url=None, **overrides)


async def test_unreachable_server_fails_with_unavailable(settings: Settings) -> None:
    db = unreachable(
        settings, postgres_retry_attempts=1, postgres_retry_delay=1, postgres_connection_timeout=500
    )
    with pytest.raises(DatabaseUnavailableError) as info:
        await db.initialize()
    assert "127.0.0.1:1 (POSTGRES_HOST / POSTGRES_PORT)" in str(info.value)  # says what it tried
    report = await db.health_check()
    assert not report.ok and report.error


async def test_caller_owned_database_is_not_closed_by_repositories(db: Database) -> None:
    from dash_storage.repositories.base import Repository

    repo = Repository(db)
    await repo.initialize()
    del repo
    assert db.is_initialized
    assert await db.fetchval("SELECT 1") == 1


async def test_shared_default_database(monkeypatch: pytest.MonkeyPatch) -> None:
    await reset_database()
    first = get_database()
    assert get_database() is first
    await first.initialize()
    assert await first.fetchval("SELECT current_database()") == TEST_DB
    await reset_database()
    assert not first.is_initialized
    assert get_database() is not first
    await reset_database()


async def test_password_absent_from_logs_and_errors(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "Zq9-never-print-me"
    caplog.set_level(logging.DEBUG)
    db = unreachable(
        settings,
        postgres_password=secret,
        postgres_retry_attempts=2,
        postgres_retry_delay=1,
        postgres_connection_timeout=300,
    )
    with pytest.raises(DatabaseUnavailableError) as info:
        await db.initialize()
    texts = [str(info.value), repr(info.value), repr(db), repr(db.settings), caplog.text]
    assert all(secret not in t for t in texts)


async def test_connection_lost_inside_transaction_reports_the_real_error(
    db: Database, settings: Settings
) -> None:
    """If the connection dies inside a transaction block, the error is the (transient) loss, not
    the follow-up failure of the ROLLBACK on a dead connection."""
    with pytest.raises(DatabaseUnavailableError):
        async with db.transaction() as con:
            pid = await con.fetchval("SELECT pg_backend_pid()")
            admin = await admin_connect(settings, TEST_DB)
            try:
                await admin.execute("SELECT pg_terminate_backend($1)", pid)
            finally:
                await admin.close()
            await con.execute("SELECT pg_sleep(0.2)")
    assert db.stats().in_use == 0
    assert await db.fetchval("SELECT 1") == 1


async def test_a_closed_database_is_not_reopened_by_stray_work(make_database) -> None:
    """Found in review: work that outlived close() (a background retry) silently reopened a pool
    that nobody would close. After close() the Database refuses until initialize() is called."""
    db: Database = await make_database()
    await db.close()
    with pytest.raises(DatabaseUnavailableError, match="closed"):
        await db.fetchval("SELECT 1")
    assert not db.is_initialized
    await db.initialize()
    assert await db.fetchval("SELECT 1") == 1


async def test_budget_combiner_does_not_keep_its_database_alive(settings: Settings) -> None:
    """Found in review: a module-level map of combiners kept every Database (and its loop) alive."""
    import gc
    import weakref

    from dash_storage.repositories.budgets import BudgetRepository

    db = Database(settings)
    await db.initialize()
    assert await BudgetRepository(db).try_consume(new_uuid(), 1, "0.01") is not None
    await db.close()
    ref = weakref.ref(db)
    del db
    gc.collect()
    assert ref() is None


async def test_run_does_not_replay_a_copy_cut_off_mid_stream(db: Database, settings: Settings) -> None:
    """Found in review: asyncpg does not count COPY as a sent statement, so a connection lost in the
    middle of a COPY looked "untouched" and run() re-ran it even with retry=False."""
    await db.execute("DROP TABLE IF EXISTS copy_probe")
    await db.execute("CREATE TABLE copy_probe (v int)")
    calls = 0

    async def copy(con, attempt: int) -> None:
        nonlocal calls
        calls += 1
        await con.copy_records_to_table("copy_probe", records=[(i,) for i in range(10)])

    admin = await admin_connect(settings, TEST_DB)
    try:
        lock = admin.transaction()
        await lock.start()
        # SHARE lets asyncpg's column lookup (a SELECT) through but blocks the COPY itself.
        await admin.execute("LOCK TABLE copy_probe IN SHARE MODE")
        task = asyncio.create_task(db.run(copy, retry=False))
        for _ in range(100):  # wait until the COPY is blocked on the lock
            await asyncio.sleep(0.02)
            pid = await admin.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND query LIKE 'COPY%' AND pid <> pg_backend_pid()"
            )
            if pid:
                break
        assert pid, "the COPY never started"
        await admin.execute("SELECT pg_terminate_backend($1)", pid)
        await lock.rollback()
        with pytest.raises(DatabaseUnavailableError):
            await task
    finally:
        await admin.close()
        await db.execute("DROP TABLE IF EXISTS copy_probe")
    assert calls == 1

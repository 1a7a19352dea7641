"""dash-storage behind a real PgBouncer (Debian's package), in session and in transaction mode.

Each test starts what it needs from ``bench/pgbouncer.py``: PgBouncers of their own in front of the
test server (the server itself: DATABASE_DIRECT_URL in the runs through a pooler). They check that
a wrong POSTGRES_POOLER is refused at start-up with one clear error, that transaction mode survives
its server connection changing under it (and what breaks without it), and that session state
(migrations, LISTEN, the legacy import's staging table) goes where it keeps.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from bench.legacy_factory import build_legacy_file
from bench.pgbouncer import PgBouncer
from dash_storage.core import driver
from dash_storage.core.config import Settings
from dash_storage.core.connections import init_connection
from dash_storage.core.database import Database
from dash_storage.core.errors import ConfigurationError, DatabaseUnavailableError, map_error
from dash_storage.legacy import import_sqlite
from dash_storage.migrations.runner import MigrationRunner
from dash_storage.repositories.budgets import BudgetRepository
from dash_storage.repositories.events import EventRepository
from dash_storage.repositories.swarms import SwarmRepository
from dash_storage.stream.follow import CHANNEL, Follower
from tests.conftest import admin_connect

PID_SQL = "SELECT pg_backend_pid()"


def server_address(settings: Settings) -> tuple[str, int]:
    """The test server itself (not the pooler of a pooler run)."""
    direct = settings.direct_connect_kwargs()
    if direct is not None:
        parts = urlsplit(direct["dsn"])
        return parts.hostname or "127.0.0.1", parts.port or 5432
    if settings.database_url is not None:
        parts = urlsplit(settings.database_url.get_secret_value())
        return parts.hostname or "127.0.0.1", parts.port or 5432
    assert settings.postgres_host is not None
    return settings.postgres_host, settings.postgres_port


def login(settings: Settings) -> tuple[str, str]:
    if settings.database_url is not None:
        parts = urlsplit(settings.database_url.get_secret_value())
        return parts.username or settings.postgres_user, parts.password or ""
    return settings.postgres_user, settings.postgres_password.get_secret_value()


@pytest.fixture(scope="module")
def bouncers(settings: Settings) -> Iterator[dict[str, PgBouncer]]:
    """One PgBouncer per pool mode, in front of the test server, for this module."""
    if settings.target != "server":
        pytest.skip(
            "PgBouncer needs a PostgreSQL server on TCP (set POSTGRES_HOST); the embedded one has none"
        )
    host, port = server_address(settings)
    user, password = login(settings)
    started: dict[str, PgBouncer] = {}
    try:
        for mode in ("session", "transaction"):
            started[mode] = PgBouncer(
                mode, server_host=host, server_port=port, user=user, password=password, pool_size=10
            ).start()
    except RuntimeError as exc:
        for b in started.values():
            b.stop()
        pytest.skip(f"no PgBouncer here: {exc}")
    yield started
    for b in started.values():
        b.stop()


class Through:
    """Databases on the test database through one of the PgBouncers; closed at the end."""

    def __init__(self, settings: Settings, bouncers: dict[str, PgBouncer]) -> None:
        self.settings = settings
        self.bouncers = bouncers
        self.made: list[Database] = []

    def database(self, mode: str, *, direct: bool = True, **overrides: Any) -> Database:
        b = self.bouncers[mode]
        user, password = login(self.settings)
        settings = {
            "database_url": None,
            "postgres_host": "127.0.0.1",
            "postgres_port": b.port,
            "postgres_user": user,
            "postgres_password": password,
            "database_direct_url": b.direct_url() if direct else None,
            **overrides,
        }
        db = Database(self.settings, **settings)
        self.made.append(db)
        return db

    def server(self, **overrides: Any) -> Database:
        """Straight to the server, past any pooler."""
        host, port = server_address(self.settings)
        settings = {"postgres_pooler": "none", "database_direct_url": None, **overrides}
        db = Database(self.settings, database_url=None, postgres_host=host, postgres_port=port, **settings)
        self.made.append(db)
        return db

    async def close(self) -> None:
        for db in self.made:
            await db.close()


@pytest.fixture
async def through(settings: Settings, bouncers: dict[str, PgBouncer], db: Database) -> AsyncIterator[Through]:
    t = Through(settings, bouncers)
    yield t
    await t.close()


async def raw_connect(db: Database, **extra: Any) -> asyncpg.Connection:
    """A plain asyncpg connection to where ``db``'s pool goes (its own statement cache setting)."""
    return await asyncpg.connect(**{**(await db.connect_kwargs()), **extra})


async def hold_a_transaction(db: Database) -> tuple[asyncpg.Connection, asyncpg.transaction.Transaction, int]:
    """A second client of ``db``'s pooler, inside an open transaction: (connection, transaction, its
    server process). PgBouncer gives it the server connection used last."""
    other = await raw_connect(db, statement_cache_size=0)
    tx = other.transaction()
    await tx.start()
    return other, tx, await other.fetchval(PID_SQL)


# -- the start-up check ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "setting", "variable", "says"),
    [
        (
            "session",
            "none",
            "POSTGRES_POOLER",
            "set POSTGRES_POOLER=session if it keeps one server connection",
        ),
        ("transaction", "none", "POSTGRES_POOLER", "it pools by transaction"),
        ("transaction", "session", "POSTGRES_POOLER", "POSTGRES_POOLER=session, but the pooler"),
    ],
)
async def test_a_setting_that_does_not_match_the_pooler_is_refused_at_start_up(
    through: Through, mode: str, setting: str, variable: str, says: str
) -> None:
    db = through.database(mode, postgres_pooler=setting)
    with pytest.raises(ConfigurationError) as info:
        await db.initialize()
    assert info.value.variable == variable
    assert says in str(info.value)
    assert not db.is_initialized  # the pool it opened to look was closed again


async def test_prepared_statements_through_pgbouncer_before_1_21_are_refused_at_start_up(
    through: Through,
) -> None:
    """PgBouncer carries protocol-level prepared statements in transaction mode only from 1.21 on,
    with max_prepared_statements set; this one (the machine's package, without that setting)
    cannot, and the check proves it by running a statement after its server connection changed."""
    db = through.database(
        "transaction", postgres_pooler="transaction", postgres_pooler_prepared_statements=True
    )
    with pytest.raises(ConfigurationError) as info:
        await db.initialize()
    assert info.value.variable == "POSTGRES_POOLER_PREPARED_STATEMENTS"
    assert "PgBouncer 1.21 or later with max_prepared_statements" in str(info.value)


@pytest.mark.parametrize("mode", ["session", "transaction"])
async def test_the_right_setting_opens_and_reports_the_pooler(through: Through, mode: str) -> None:
    db = through.database(mode, postgres_pooler=mode)
    await db.initialize()
    assert db.pooler is not None and db.pooler.pooled
    assert "a pooler sits in front of the server" in db.pooler.describe()
    assert (await db.health_check()).ok


async def test_the_check_does_not_stall_when_the_pooler_has_no_server_connection_free(
    settings: Settings, bouncers: dict[str, PgBouncer]
) -> None:
    """Session mode with every server connection held by the pool itself: the second client of the
    check would wait for one (for PgBouncer's query_wait_timeout); it gives up within
    POSTGRES_CONNECTION_TIMEOUT, undecided, and the pool opens."""
    host, port = server_address(settings)
    user, password = login(settings)
    with PgBouncer(
        "session", server_host=host, server_port=port, user=user, password=password, pool_size=2
    ) as small:
        db = Database(
            settings,
            database_url=None,
            postgres_host="127.0.0.1",
            postgres_port=small.port,
            postgres_user=user,
            postgres_password=password,
            postgres_pooler="session",
            postgres_min_pool_size=2,
            postgres_max_pool_size=2,
            postgres_connection_timeout=1000,
            database_direct_url=small.direct_url(),
        )
        try:
            await db.initialize()
            assert db.pooler is not None and db.pooler.pooled and db.pooler.by_transaction is None
            assert await db.fetchval("SELECT 1") == 1
        finally:
            await db.close()


async def test_no_pooler_is_seen_on_the_server_itself(through: Through) -> None:
    for setting in ("none", "session", "transaction"):
        db = through.server(postgres_pooler=setting)
        await db.initialize()
        assert db.pooler is not None and not db.pooler.pooled, setting


async def test_a_login_the_pooler_refuses_is_named_and_not_retried(
    through: Through, caplog: pytest.LogCaptureFixture
) -> None:
    """PgBouncer says "SASL authentication failed" with SQLSTATE 08P01 (the code of a broken
    connection), where the server says 28P01: still one ConfigurationError, without retries."""
    db = through.database("transaction", postgres_pooler="transaction", postgres_password="not-the-password")
    with caplog.at_level(logging.WARNING, logger="dash_storage"):
        with pytest.raises(ConfigurationError) as info:
            await db.initialize()
    assert info.value.variable == "POSTGRES_PASSWORD"
    assert "rejected the login" in str(info.value)
    assert not [r for r in caplog.records if "retry" in r.getMessage()]


async def test_a_database_the_pooler_cannot_open_is_named(through: Through) -> None:
    db = through.database("session", postgres_pooler="session", postgres_db="dash_no_such_database")
    with pytest.raises(ConfigurationError) as info:
        await db.initialize()
    assert info.value.variable == "POSTGRES_DB"
    assert "'dash_no_such_database' does not exist" in str(info.value)


# -- transaction mode: the server connection changes under a client ----------------------------------


async def test_a_statement_cache_breaks_behind_transaction_pooling_and_the_error_says_why(
    through: Through,
) -> None:
    """What POSTGRES_POOLER=transaction prevents, produced for real: asyncpg's named statement is
    prepared on one server process, another client takes that process, and the next run of the
    statement lands where it was never prepared."""
    db = through.database("transaction", postgres_pooler="transaction")
    con = await raw_connect(db, statement_cache_size=100)  # asyncpg's default
    try:
        first = await con.fetchval("SELECT pg_backend_pid() + $1", 0)
        other, tx, taken = await hold_a_transaction(db)
        try:
            assert taken == first  # PgBouncer handed the other client our server connection
            with pytest.raises(asyncpg.InvalidSQLStatementNameError) as info:
                await con.fetchval("SELECT pg_backend_pid() + $1", 0)
        finally:
            await tx.rollback()
            await other.close()
    finally:
        await con.close()
    assert driver.message_is_missing_statement(info.value)
    mapped = map_error(info.value)
    assert isinstance(mapped, ConfigurationError) and mapped.variable == "POSTGRES_POOLER"
    assert "transaction-mode pooler" in str(mapped)


async def test_transaction_mode_runs_on_whatever_server_connection_it_gets(through: Through) -> None:
    """With POSTGRES_POOLER=transaction the same statements (parameters, JSON codecs, a transaction
    block) work after the pooled connection was moved to another server process."""
    db = through.database("transaction", postgres_pooler="transaction", postgres_max_pool_size=2)
    swarms = SwarmRepository(db)
    async with db.acquire() as con:
        first = await con.fetchval("SELECT pg_backend_pid() + $1", 0)
        assert await con.fetchval("SELECT $1::jsonb", {"a": [1, 2]}) == {"a": [1, 2]}
        other, tx, taken = await hold_a_transaction(db)
        try:
            assert taken == first
            moved = await con.fetchval("SELECT pg_backend_pid() + $1", 0)
            assert moved != first  # really on another server process now
            assert await con.fetchval("SELECT $1::jsonb", {"a": [1, 2]}) == {"a": [1, 2]}
        finally:
            await tx.rollback()
            await other.close()
    swarm = await swarms.create(name="moved", config={"k": "v"})
    assert (await swarms.find_by_id(swarm.id)) == swarm


async def test_transaction_mode_under_concurrent_load(through: Through) -> None:
    """Many callers on few client connections in front of fewer server connections: every kind of
    call the repositories make (single statements, blocks in a transaction, batches) succeeds."""
    db = through.database("transaction", postgres_pooler="transaction", postgres_max_pool_size=6)
    swarms, events, budgets = SwarmRepository(db), EventRepository(db), BudgetRepository(db)
    swarm = await swarms.create(name="load")
    budget = await budgets.create("swarm", swarm.id, allocated=Decimal("1000"))
    pids: set[int] = set()

    async def worker(n: int) -> None:
        for i in range(15):
            s = await swarms.create(name=f"w{n}-{i}", config={"n": n})
            assert (await swarms.find_by_id(s.id)) is not None
            await events.create(swarm.id, "agent.step", payload={"n": n, "i": i})
            assert (await budgets.try_consume(budget.id, 1, Decimal("0.01"))).granted
            async with db.transaction() as con:
                pids.add(await con.fetchval(PID_SQL))
                await con.execute("UPDATE swarms SET name = name || '+' WHERE id = $1", s.id)
        await events.create_many([{"swarm_id": swarm.id, "type": "batch", "payload": {"n": n}}] * 20)

    await asyncio.gather(*(worker(n) for n in range(24)))
    admin = await admin_connect(through.settings, through.settings.database_name())
    try:
        assert await admin.fetchval("SELECT count(*) FROM events WHERE swarm_id = $1", swarm.id) == 24 * 35
        assert await admin.fetchval("SELECT count(*) FROM swarms WHERE name LIKE 'w%+'") == 24 * 15
    finally:
        await admin.close()
    after = await budgets.find_by_id(budget.id)
    assert after is not None and after.consumed == Decimal("3.60")


# -- session state goes where it keeps ----------------------------------------------------------------


async def test_migrations_behind_a_transaction_pooler_need_the_direct_url(through: Through) -> None:
    db = through.database("transaction", postgres_pooler="transaction", direct=False)
    runner = MigrationRunner(db)
    for call in (runner.migrate, runner.status):
        with pytest.raises(ConfigurationError) as info:
            await call()
        assert info.value.variable == "DATABASE_DIRECT_URL"


async def test_migrations_go_to_the_direct_url(through: Through) -> None:
    db = through.database("transaction", postgres_pooler="transaction")
    runner = MigrationRunner(db)
    assert await runner.migrate() == []  # the test database is migrated already
    assert {s.state for s in await runner.status()} == {"applied"}
    con = await db.connect()
    try:
        assert await con.fetchval(PID_SQL) == con.get_server_pid()  # no pooler in between
    finally:
        await con.close()


async def test_a_direct_url_that_does_not_answer_is_named(through: Through) -> None:
    db = through.database("transaction", postgres_pooler="transaction", postgres_retry_attempts=0)
    bad = Database(db.settings, database_direct_url="postgresql://u:p@127.0.0.1:1/x")
    with pytest.raises(DatabaseUnavailableError, match=r"127\.0\.0\.1:1 \(DATABASE_DIRECT_URL\)"):
        await bad.connect()


async def test_the_follower_polls_behind_a_transaction_pooler_without_the_direct_url(
    through: Through,
) -> None:
    db = through.database("transaction", postgres_pooler="transaction", direct=False)
    swarm = await SwarmRepository(db).create(name="polled")
    async with Follower(db, swarm_id=swarm.id, poll_interval=0.05) as stream:
        assert not stream.listening
        await EventRepository(db).create(swarm.id, "agent.step", payload={"i": 1})
        event = await asyncio.wait_for(anext(aiter(stream)), 10)
    assert event.payload == {"i": 1}


@pytest.mark.parametrize("mode", ["session", "transaction"])
async def test_the_follower_listens_on_the_direct_url(through: Through, mode: str) -> None:
    db = through.database(mode, postgres_pooler=mode)
    swarm = await SwarmRepository(db).create(name="listened")
    async with Follower(db, swarm_id=swarm.id, poll_interval=0.5) as stream:
        assert stream.listening
        listener = stream._listener
        assert listener is not None
        # Its own server process (no pooler between), which keeps the LISTEN.
        assert await listener.fetchval(PID_SQL) == listener.get_server_pid()
        assert await listener.fetchval("SELECT pg_listening_channels()") == CHANNEL
        await EventRepository(db).create(swarm.id, "agent.step", payload={"i": 2})
        event = await asyncio.wait_for(anext(aiter(stream)), 30)
    assert event.payload == {"i": 2}


async def test_the_legacy_import_leaves_no_staging_table_on_pooled_server_connections(
    through: Through, tmp_path: Path
) -> None:
    """Behind a transaction-mode pooler each batch makes and drops its staging table in its own
    transaction: a session TEMP table would stay on a server connection the pooler keeps (and
    the next batch could run on another one, without it)."""
    legacy = build_legacy_file(tmp_path / "dash.db", swarms=10, agents=40, events=1200)
    db = through.database("transaction", postgres_pooler="transaction", postgres_max_pool_size=3)
    report = await import_sqlite(db, legacy.path, batch_size=100)
    assert report.tables["events"].written > 1000
    admin = await admin_connect(through.settings, through.settings.database_name())
    try:
        left = await admin.fetchval("SELECT count(*) FROM pg_class WHERE relname = 'dash_import_events'")
    finally:
        await admin.close()
    assert left == 0


# -- the driver text the error mapping relies on, on the server itself ----------------------------------


async def test_a_missing_asyncpg_statement_is_recognised(settings: Settings, db: Database) -> None:
    con = await admin_connect(settings, settings.database_name())
    try:
        await init_connection(con)
        assert await con.fetchval("SELECT $1::int + 1", 1) == 2  # prepared by name, cached
        await con.execute("DEALLOCATE ALL")  # gone from the server, still in asyncpg's cache
        with pytest.raises(asyncpg.InvalidSQLStatementNameError) as info:
            await con.fetchval("SELECT $1::int + 1", 1)
    finally:
        await con.close()
    assert driver.message_is_missing_statement(info.value)
    assert not driver.message_is_missing_statement(asyncpg.InvalidSQLStatementNameError("x"))

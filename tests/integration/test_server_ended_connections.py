"""Connections the server has just ended: what a call made right after sees.

Every pooled backend is terminated by a separate client that waits until the backends are gone,
while this process's event loop is blocked, so the server's goodbye (its FATAL message and the
closed socket) sits unread on every pooled connection when the next call is made: the exact state
asyncpg's pool would hand out.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from dash_storage.core.database import Database
from dash_storage.core.errors import CommandTimeoutError, ConnectionLostError, map_error
from dash_storage.repositories.swarms import SwarmRepository

ROUNDS = 20
POOL = {"postgres_min_pool_size": 2, "postgres_max_pool_size": 4}


# How many of the processes $1 still exist on the server's machine (read by the server itself, so it
# also holds for a server in a container). A zombie counts as alive: its socket is closed already.
PROCESSES_ALIVE = (
    "SELECT count(*) FROM unnest($1::int[]) AS p WHERE (pg_stat_file('/proc/' || p, true)).isdir"
)


class Killer:
    """A client on its own thread and event loop that terminates every pooled backend and waits
    until they have exited. ``kill()`` blocks the caller's loop on purpose, so that nothing of the
    server's goodbye is read by the pool in the meantime."""

    def __init__(self, kwargs: dict[str, object]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.con: asyncpg.Connection = self._run(asyncpg.connect(**kwargs))
        self.sees_processes = self._run(self._sees_processes())

    async def _sees_processes(self) -> bool:
        """Whether this server can tell when a process has exited: on Linux, as a superuser."""
        try:
            return bool(
                await self.con.fetchval(PROCESSES_ALIVE, [await self.con.fetchval("SELECT pg_backend_pid()")])
            )
        except asyncpg.PostgresError:
            return False

    def _run(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def kill(self) -> int:
        return int(self._run(self._kill()))

    async def _kill(self) -> int:
        pids = await self.con.fetch(
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND application_name = 'dash-storage'"
        )
        # A backend leaves pg_stat_activity just before its process exits, and its socket closes
        # only when the process is gone: wait (bounded) until the server's /proc has no such process.
        for _ in range(5000):
            alive = await self.con.fetchval(PROCESSES_ALIVE, [r["pid"] for r in pids])
            if not alive:
                break
        assert not alive, "the terminated backends did not exit"
        return len(pids)

    def close(self) -> None:
        self._run(self.con.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


@pytest.fixture
async def killer(database: Database) -> AsyncIterator[Killer]:
    k = Killer(await database.connect_kwargs())
    try:
        if not k.sees_processes:
            pytest.skip("needs a superuser on a Linux server, to see when a terminated backend has exited")
        yield k
    finally:
        k.close()


async def fill_pool(db: Database) -> None:
    """Make the pool hold its maximum of idle connections."""
    pool = await db.ready()
    cons = [await pool.acquire() for _ in range(db.settings.postgres_max_pool_size)]
    for con in cons:
        await pool.release(con)


@pytest.mark.direct_server("it ends the pooled connections' own server sessions")
async def test_a_connection_the_server_ended_is_never_handed_out(make_database, killer: Killer) -> None:  # type: ignore[no-untyped-def]
    db = await make_database(**POOL)
    failures: list[str] = []
    for _ in range(ROUNDS):
        await fill_pool(db)
        assert killer.kill() >= 2
        try:
            async with db.acquire() as con:
                assert await con.fetchval("SELECT 1") == 1
        except Exception as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
    assert failures == []


@pytest.mark.direct_server("it ends the pooled connections' own server sessions")
async def test_a_retried_read_goes_again_at_once_after_a_lost_connection(
    make_database,  # type: ignore[no-untyped-def]
    killer: Killer,
) -> None:
    # Back-off of 20 s: a read that waited in back-off could not finish in the time allowed below.
    db = await make_database(postgres_retry_delay=20_000, **POOL)
    swarm = await SwarmRepository(db).create(name="kept")
    for _ in range(ROUNDS):
        await fill_pool(db)
        killer.kill()
        # Whether the call meets a connection that is refused before sending or one that ends in
        # the middle of its statement, a retry must not sit in back-off.
        started = time.monotonic()
        found = await SwarmRepository(db).find_by_id(swarm.id)
        assert found is not None and found.id == swarm.id
        assert time.monotonic() - started < 5.0, "the first retry after a lost connection waited"


@pytest.mark.direct_server("it ends the pooled connections' own server sessions")
async def test_calls_ten_milliseconds_after_the_kill_all_succeed(make_database, killer: Killer) -> None:  # type: ignore[no-untyped-def]
    db = await make_database(**POOL)
    swarms = SwarmRepository(db)
    swarm = await swarms.create(name="steady")
    for _ in range(ROUNDS):
        await fill_pool(db)
        killer.kill()
        await asyncio.sleep(0.01)
        assert await db.fetchval("SELECT 1") == 1
        assert (await swarms.find_by_id(swarm.id)) is not None
        async with db.acquire() as con:
            assert await con.fetchval("SELECT 2") == 2


def test_a_session_the_server_ended_is_said_in_words() -> None:
    fatal = asyncpg.AdminShutdownError.new(  # type: ignore[attr-defined]
        {"M": "terminating connection due to administrator command", "C": "57P01", "S": "FATAL"}
    )
    in_flight = asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation")
    in_flight.__cause__ = fatal
    err = map_error(in_flight)
    assert isinstance(err, ConnectionLostError)
    assert "the server ended the connection" in str(err)
    assert "administrator" in str(err)
    assert "may or may not have taken effect" in str(err)

    unsent = map_error(
        asyncpg.InternalClientError("cannot switch to state 12; another operation (2) is in progress")
    )
    assert isinstance(unsent, ConnectionLostError)
    assert "nothing was applied" in str(unsent)
    assert "cannot switch" not in str(unsent).split("(")[0]


async def test_a_timeout_is_raised_after_one_attempt(make_database, caplog) -> None:  # type: ignore[no-untyped-def]
    db = await make_database(postgres_retry_attempts=3, postgres_retry_delay=10)
    with caplog.at_level("WARNING", logger="dash_storage.core.retry"), pytest.raises(CommandTimeoutError):
        await db.fetchval("SELECT pg_sleep(1)", retry=True, timeout=0.2)
    assert [r for r in caplog.records if "retry" in r.getMessage()] == []

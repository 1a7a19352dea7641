"""Idle gaps and pool pressure.

Idle gaps: after the server closed pooled connections that sat idle (idle_session_timeout, a
terminated backend, a goodbye message whose end-of-file never came), the next call succeeds without
the caller seeing an error, reads and never-retried writes (``increment_retry``) alike: a connection
found dead before anything was sent on it is replaced.

Pool pressure: 500 concurrent callers on a pool of 5 all finish; with a short acquire timeout the
excess get PoolExhaustedError with its hint; cancelled callers (waiting, or mid-query, or inside a
transaction) and exceptions inside transactions leave nothing in use.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from dash_storage.core.config import Settings
from dash_storage.core.database import Connection, Database
from dash_storage.core.errors import (
    ConflictError,
    DashStorageError,
    DatabaseError,
    DatabaseUnavailableError,
    PoolExhaustedError,
)
from dash_storage.repositories.agents import AgentRepository
from dash_storage.repositories.events import EventRepository
from tests.conftest import (
    TEST_DB,
    MakeDatabase,
    admin_connect,
    admin_execute,
    drop_database,
    migrate,
    recreate_database,
)
from tests.factories import make_agent, make_swarm, wait_until
from tests.faults.proxy import proxy_for
from tests.reliability import record, record_counts

pytestmark = [
    pytest.mark.reliability,
    pytest.mark.direct_server(
        "server processes ended by idle_session_timeout, pg_terminate_backend and a fault proxy"
    ),
]

IDLE_DB = f"{TEST_DB}_idle"
POOL_PIDS = "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND application_name = 'dash-storage'"


async def warm(db: Database, n: int) -> list[int]:
    """Make ``n`` pooled connections exist (all in use at once); their server pids."""

    async def hold(con: Connection, _: int) -> int:
        return int(await con.fetchval("SELECT pg_backend_pid() FROM pg_sleep(0.05)"))

    return sorted(set(await asyncio.gather(*(db.run(hold) for _ in range(n)))))


class Tally:
    """Counts calls and what they raised (every failure should be a DashStorageError)."""

    def __init__(self) -> None:
        self.operations = 0
        self.succeeded = 0
        self.errors: list[BaseException] = []

    async def __call__(self, call: Awaitable[Any]) -> Any:
        self.operations += 1
        try:
            result = await call
        except Exception as exc:
            self.errors.append(exc)
            return None
        self.succeeded += 1
        return result

    @property
    def raw_errors(self) -> int:
        return sum(1 for e in self.errors if not isinstance(e, DashStorageError))

    def record(self, fault: str, notes: str) -> None:
        """These counts as an "idle gaps" row of RELIABILITY.md."""
        record_counts("idle gaps", fault, self, notes)


# -- idle gaps --------------------------------------------------------------------------------------


@pytest.fixture
async def idle_db(settings: Settings) -> AsyncIterator[str]:
    """A scratch database whose sessions the server ends after 500 ms idle."""
    await recreate_database(settings, IDLE_DB)
    try:
        scratch = Database(settings, postgres_db=IDLE_DB)
        try:
            await migrate(scratch)
        finally:
            await scratch.close()
        await admin_execute(settings, "ALTER DATABASE {db} SET idle_session_timeout = '500ms'", db=IDLE_DB)
        yield IDLE_DB
    finally:
        await drop_database(settings, IDLE_DB)


async def test_connections_ended_by_idle_session_timeout_are_replaced_unseen(
    idle_db: str, settings: Settings, make_database: MakeDatabase
) -> None:
    d = await make_database(postgres_db=idle_db, postgres_min_pool_size=3, postgres_max_pool_size=3)
    agents, events = AgentRepository(d), EventRepository(d)
    swarm = await make_swarm(d, "idle")
    agent = await make_agent(d, swarm, status="running")
    admin = await admin_connect(settings)
    tally, rounds, ended = Tally(), 3, 0
    try:
        for _ in range(rounds):
            pids = await warm(d, 3)

            async def gone(pids: list[int] = pids) -> bool:
                alive = {r[0] for r in await admin.fetch(POOL_PIDS, idle_db)}
                return not alive & set(pids)

            await wait_until(gone, "the server ends the idle sessions")
            ended += len(pids)
            # Straight after the gap: a read, a never-retried write, an idempotent write.
            await tally(agents.find_by_id(agent))
            await tally(agents.increment_retry(agent))
            await tally(events.create(swarm, "after-idle"))
            await asyncio.gather(*(tally(agents.increment_retry(agent)) for _ in range(3)))
    finally:
        await admin.close()
    assert tally.errors == []
    stored = await AgentRepository(d).find_by_id(agent)
    assert stored is not None and stored.retry_count == 4 * rounds  # each exactly once
    assert await EventRepository(d).count(swarm_id=swarm) == rounds
    assert d.stats().in_use == 0
    tally.record(
        "idle_session_timeout = 500 ms ends every pooled session, then read + increment_retry + create",
        f"{ended} idle sessions ended by the server over {rounds} rounds; no caller saw an error; "
        "retry_count exact (never-retried write applied once)",
    )


async def test_statement_sent_as_the_server_ends_the_idle_session_is_replayed(
    idle_db: str, settings: Settings, make_database: MakeDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    """The race: the server's idle-session goodbye is on its way while a never-retried write goes
    out. The server ran nothing (it only ends sessions that wait for a command), so the write is
    sent again on a fresh connection, and applied once."""
    caplog.set_level(logging.DEBUG, logger="dash_storage")
    async with proxy_for(settings) as proxy:
        d = await make_database(
            postgres_db=idle_db,
            **proxy.overrides,
            postgres_min_pool_size=1,
            postgres_max_pool_size=1,
            postgres_retry_attempts=0,
        )
        agents = AgentRepository(d)
        agent = await make_agent(d, await make_swarm(d, "idle"), status="running")
        await agents.increment_retry(agent)  # prepared on the one connection: next time, one message
        pid = await d.fetchval("SELECT pg_backend_pid()")
        proxy.hold_answers()  # the server's goodbye will wait in the proxy
        admin = await admin_connect(settings)
        try:

            async def ended() -> bool:
                return not await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid)

            await wait_until(ended, "the server ends the idle session")
        finally:
            await admin.close()
        # The write goes out (the proxy forwards it; the server's words stay held), and only then
        # does the goodbye arrive, as the write's answer.
        forwarded = proxy.stats.chunks
        call = asyncio.create_task(agents.increment_retry(agent))

        async def write_sent() -> bool:
            return proxy.stats.chunks > forwarded

        await wait_until(write_sent, "the write forwarded to the server")
        proxy.resume()
        after = await asyncio.wait_for(call, timeout=20)
    assert after is not None and after.retry_count == 2
    assert "pooled connection was dead (ConnectionDoesNotExistError)" in caplog.text
    assert d.stats().in_use == 0
    record(
        "idle gaps",
        "idle_session_timeout goodbye in flight while increment_retry is sent (proxy holds the answer)",
        operations=1,
        succeeded=1,
        notes="the write met the FATAL 57P05 as its answer; the server had run nothing, so it was sent "
        "again on a fresh connection: retry_count exact",
    )


async def test_connections_terminated_while_idle_are_replaced_unseen(
    db: Database, settings: Settings, make_database: MakeDatabase
) -> None:
    d = await make_database(postgres_min_pool_size=3, postgres_max_pool_size=3)
    agents = AgentRepository(d)
    agent = await make_agent(db, await make_swarm(db, "idle"), status="running")
    admin = await admin_connect(settings, TEST_DB)
    tally, rounds, killed = Tally(), 3, 0
    try:
        for _ in range(rounds):
            pids = await warm(d, 3)
            killed += int(
                await admin.fetchval("SELECT count(pg_terminate_backend(p)) FROM unnest($1::int[]) p", pids)
            )

            async def gone(pids: list[int] = pids) -> bool:
                return not await admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)", pids
                )

            await wait_until(gone, "the terminated backends exit")

            async def in_transaction(con: Connection, _: int) -> int:
                return int(await con.fetchval("SELECT retry_count FROM agents WHERE id = $1", agent))

            await asyncio.gather(
                tally(agents.increment_retry(agent)), tally(agents.increment_retry(agent)),
                tally(agents.find_by_id(agent)), tally(d.run(in_transaction, transaction=True)),
            )  # fmt: skip
    finally:
        await admin.close()
    assert tally.errors == []
    stored = await AgentRepository(db).find_by_id(agent)
    assert stored is not None and stored.retry_count == 2 * rounds
    assert d.stats().in_use == 0
    tally.record(
        "pg_terminate_backend of every idle pooled connection, then increment_retry x2 + read + transaction",
        f"{killed} idle connections terminated over {rounds} rounds; no caller saw an error",
    )


async def test_goodbye_without_end_of_file_is_replaced_unseen(
    db: Database, settings: Settings, make_database: MakeDatabase
) -> None:
    """The server's FATAL arrives but the socket stays open (a proxy holds it): the connection looks
    open, yet cannot start a statement. Nothing was sent on it, so every API replaces it."""
    async with proxy_for(settings) as proxy:
        d = await make_database(
            **proxy.overrides,
            postgres_min_pool_size=3,
            postgres_max_pool_size=3,
            postgres_retry_attempts=0,  # no retry: what succeeds here succeeded by replacement
        )
        agents = AgentRepository(d)
        agent = await make_agent(db, await make_swarm(db, "idle"), status="running")
        admin = await admin_connect(settings, TEST_DB)
        proxy.hold_close = True

        async def in_run(con: Connection, _: int) -> int:
            return int(
                await con.fetchval("UPDATE agents SET runtime = runtime + 1 WHERE id = $1 RETURNING 1", agent)
            )

        async def in_transaction() -> None:
            async with d.transaction() as con:
                await con.execute("UPDATE agents SET runtime = runtime + 10 WHERE id = $1", agent)

        calls: list[Callable[[], Awaitable[Any]]] = [
            lambda: agents.increment_retry(agent),  # one statement, never retried
            lambda: d.run(in_run),  # a function, never retried
            in_transaction,  # BEGIN meets the dead connection
            lambda: agents.find_by_id(agent),
        ]
        tally, broken = Tally(), 0
        try:
            for call in calls:
                held = proxy.stats.held
                pids = await warm(d, 3)
                await admin.fetchval("SELECT count(pg_terminate_backend(p)) FROM unnest($1::int[]) p", pids)

                async def all_held(held: int = held) -> bool:
                    return proxy.stats.held >= held + 3

                await wait_until(all_held, "three goodbyes held open by the proxy")
                broken += 3
                assert d.stats().idle == 3  # they look fine to the pool
                await tally(call())

            # The other side: a function that already sent a write when its connection dies is
            # not re-run (that write would apply twice); the caller gets DatabaseUnavailableError.
            async def dies_after_a_write(con: Connection, _: int) -> None:
                # Exactly one statement sent before the failure.
                pid = await con.fetchval(
                    "UPDATE agents SET runtime = runtime + 100 WHERE id = $1 RETURNING pg_backend_pid()",
                    agent,
                )
                held = proxy.stats.held
                await admin.fetchval("SELECT pg_terminate_backend($1)", pid)

                async def goodbye_held() -> bool:
                    return proxy.stats.held > held

                await wait_until(goodbye_held, "the goodbye held open")
                await con.execute("SELECT 1")

            with pytest.raises(DatabaseUnavailableError):
                await d.run(dies_after_a_write)
        finally:
            await admin.close()
            proxy.release_held()
        assert tally.errors == [], tally.errors
        stored = await AgentRepository(db).find_by_id(agent)
        assert stored is not None and (stored.retry_count, stored.runtime) == (1, 111)
        assert d.stats().in_use == 0
    tally.record(
        "server goodbye (FATAL) on idle connections, socket held open by a proxy: looks alive, is dead",
        f"{broken} dead-but-open connections; increment_retry, run(), transaction() and a read "
        "each replaced them with retries off; writes applied exactly once; a run() that had already "
        "written was not re-run (DatabaseUnavailableError)",
    )


# -- pool pressure ----------------------------------------------------------------------------------


async def test_500_callers_on_a_pool_of_5_all_finish(make_database: MakeDatabase) -> None:
    d = await make_database(postgres_min_pool_size=5, postgres_max_pool_size=5)
    peak = 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, d.stats().waiting)
            await asyncio.sleep(0.001)

    sampler = asyncio.create_task(sample())
    results = await asyncio.gather(
        *(d.fetchval("SELECT $1::int FROM pg_sleep(0.002)", i) for i in range(500)), return_exceptions=True
    )
    done.set()
    await sampler
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    assert results == list(range(500))
    assert peak > 5  # callers really queued for the 5 connections
    stats = d.stats()
    assert (stats.in_use, stats.waiting, stats.size) == (0, 0, 5)
    record(
        "pool pressure",
        "500 concurrent callers on a pool of 5 (default acquire timeout)",
        operations=500,
        succeeded=500 - len(errors),
        raw_errors=sum(1 for e in errors if not isinstance(e, DashStorageError)),
        notes=f"up to {peak} callers waiting at once; all finished; pool back to 5 idle",
    )


async def test_short_acquire_timeout_gives_the_excess_pool_exhausted(make_database: MakeDatabase) -> None:
    d = await make_database(
        postgres_min_pool_size=5, postgres_max_pool_size=5, postgres_connection_timeout=100
    )
    results = await asyncio.gather(
        *(d.fetchval("SELECT 1 FROM pg_sleep(0.5)") for _ in range(500)), return_exceptions=True
    )
    ok = [r for r in results if r == 1]
    exhausted = [r for r in results if isinstance(r, PoolExhaustedError)]
    assert len(ok) + len(exhausted) == 500  # nothing else: no other error, no hang
    assert len(ok) >= 5 and exhausted
    message = str(exhausted[0])
    assert "POSTGRES_MAX_POOL_SIZE" in message and "leak" in message and "5" in message
    stats = d.stats()
    assert (stats.in_use, stats.waiting) == (0, 0), stats
    assert await d.fetchval("SELECT 2") == 2
    record(
        "pool pressure",
        "500 concurrent 0.5 s callers on a pool of 5 with a 100 ms acquire timeout",
        operations=500,
        succeeded=len(ok),
        raw_errors=sum(
            1 for r in results if isinstance(r, BaseException) and not isinstance(r, DashStorageError)
        ),
        notes=f"{len(exhausted)} PoolExhaustedError naming POSTGRES_MAX_POOL_SIZE and leaks; "
        "pool back to idle",
    )


async def test_cancelled_callers_leave_nothing_in_use(
    db: Database, settings: Settings, make_database: MakeDatabase
) -> None:
    d = await make_database(postgres_min_pool_size=3, postgres_max_pool_size=3)
    admin = await admin_connect(settings, TEST_DB)
    cancelled = 0

    async def settled() -> bool:
        s = d.stats()
        return (s.in_use, s.waiting) == (0, 0)

    async def sleeping() -> int:
        return int(await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = 'dash-storage' "
            "AND state = 'active' AND query LIKE '%pg_sleep(20)%'", TEST_DB))  # fmt: skip

    try:
        # 1. Cancelled while waiting for a connection.
        holders = [asyncio.create_task(d.fetchval("SELECT 1 FROM pg_sleep(0.5)")) for _ in range(3)]
        waiters = [asyncio.create_task(d.fetchval("SELECT 1")) for _ in range(20)]

        async def all_waiting() -> bool:
            return d.stats().waiting == 20

        await wait_until(all_waiting, "20 callers waiting")
        for w in waiters:
            w.cancel()
        outcomes = await asyncio.gather(*waiters, return_exceptions=True)
        cancelled += sum(1 for o in outcomes if isinstance(o, asyncio.CancelledError))
        assert await asyncio.gather(*holders) == [1, 1, 1]
        await wait_until(settled, "pool idle after cancelled waiters")

        # 2. Cancelled in the middle of a query, and 3. inside a transaction: the server's
        # statements are cancelled too, and nothing of the transaction is committed.
        async def in_transaction() -> None:
            async with d.transaction() as con:
                await con.execute("INSERT INTO swarms (name) VALUES ('cancelled-tx')")
                await con.execute("SELECT pg_sleep(20)")

        running = [asyncio.create_task(d.fetchval("SELECT pg_sleep(20)")) for _ in range(2)]
        running.append(asyncio.create_task(in_transaction()))

        async def all_sleeping() -> bool:
            return await sleeping() == 3

        await wait_until(all_sleeping, "3 queries running on the server")
        for r in running:
            r.cancel()
        outcomes = await asyncio.gather(*running, return_exceptions=True)
        cancelled += sum(1 for o in outcomes if isinstance(o, asyncio.CancelledError))
        await wait_until(settled, "pool idle after cancelled queries")

        async def none_sleeping() -> bool:
            return await sleeping() == 0

        await wait_until(none_sleeping, "the server cancelled the statements")
    finally:
        await admin.close()
    assert cancelled == 23
    assert await db.fetchval("SELECT count(*) FROM swarms WHERE name = 'cancelled-tx'") == 0
    after = await asyncio.gather(*(d.fetchval("SELECT $1::int", i) for i in range(20)))
    assert after == list(range(20))
    stats = d.stats()
    assert (stats.in_use, stats.waiting) == (0, 0) and stats.size <= 3
    record(
        "pool pressure",
        "callers cancelled while waiting for a connection, mid-query and inside a transaction",
        operations=cancelled + len(after),
        succeeded=len(after),
        notes=f"{cancelled} cancelled (20 waiting, 2 mid-query, 1 mid-transaction): pool back to idle, "
        "server statements cancelled, nothing committed; 20 calls after all succeeded",
    )


async def test_exceptions_inside_transactions_leave_nothing_in_use(
    db: Database, make_database: MakeDatabase
) -> None:
    d = await make_database(postgres_min_pool_size=0, postgres_max_pool_size=3)
    existing = await db.fetchval("INSERT INTO swarms (name) VALUES ('taken') RETURNING id")

    class Boom(Exception):
        pass

    async def failing(i: int) -> None:
        async with d.transaction() as con:
            await con.execute("INSERT INTO swarms (name) VALUES ($1)", f"tx-fail-{i}")
            if i % 3 == 0:
                raise Boom(i)  # the caller's own error
            if i % 3 == 1:
                await con.execute("SELEC 1")  # a server error
            await con.execute("INSERT INTO swarms (id, name) VALUES ($1, 'dup')", existing)  # a conflict

    results = await asyncio.gather(*(failing(i) for i in range(60)), return_exceptions=True)
    kinds = {type(r) for r in results}
    assert kinds == {Boom, DatabaseError, ConflictError}, kinds
    assert await db.fetchval("SELECT count(*) FROM swarms WHERE name LIKE 'tx-fail-%'") == 0
    stats = d.stats()
    assert (stats.in_use, stats.waiting) == (0, 0) and stats.size <= 3
    async with d.transaction() as con:
        await con.execute("INSERT INTO swarms (name) VALUES ('tx-ok')")
    assert await db.fetchval("SELECT count(*) FROM swarms WHERE name = 'tx-ok'") == 1
    record(
        "pool pressure",
        "60 concurrent transactions on a pool of 3 failing inside (own exception, SQL error, conflict)",
        operations=61,
        succeeded=1,
        raw_errors=sum(
            1 for r in results if isinstance(r, BaseException) and not isinstance(r, DashStorageError | Boom)
        ),
        notes="all 60 rolled back (no row left), pool back to idle, the next transaction committed",
    )

"""Connection faults under a 32-task workload: nothing that returned success is lost or doubled.

Faults: every pooled backend terminated in a loop; a TCP proxy (tests/faults/proxy.py) between the
library and PostgreSQL that adds latency, resets connections at random and on command, and stalls
(stops forwarding without closing). After each fault the workload's effects are checked against its
answers (tests/faults/workload.py), failed budget charges are asked again, and the same Database must
be healthy with nothing in use. The server restart is in tests/e2e/test_server_restart.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator

import pytest

from dash_storage.core.config import Settings
from dash_storage.core.database import Database
from dash_storage.core.errors import CommandTimeoutError, DashStorageError
from dash_storage.repositories.agents import AgentRepository
from tests.conftest import TEST_DB, MakeDatabase, admin_connect
from tests.factories import wait_until
from tests.faults.chaos import capped, sized
from tests.faults.proxy import FaultProxy, proxy_for
from tests.faults.workload import Workload, assert_recovered, terminate_loop
from tests.reliability import record

pytestmark = [
    pytest.mark.reliability,
    pytest.mark.direct_server(
        "it kills the pooled connections' server processes and cuts connections with a fault proxy"
    ),
]

#: How long each workload runs under its fault (seconds).
SECONDS = sized(3, 30)


@pytest.fixture
async def proxy(settings: Settings) -> AsyncIterator[FaultProxy]:
    async with proxy_for(settings, seed=7) as p:
        yield p


def retried(caplog: pytest.LogCaptureFixture) -> str:
    """What the library retried, from its retry warnings (e.g. '12 DatabaseUnavailableError')."""
    found = re.findall(r"failed \((\w+)\), retry", caplog.text)
    counts = {name: found.count(name) for name in sorted(set(found))}
    return ", ".join(f"{n} {name}" for name, n in counts.items()) or "none"


@pytest.mark.soak
async def test_workload_while_every_backend_is_terminated_in_a_loop(
    db: Database, settings: Settings, make_database: MakeDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dash_storage.core.retry")
    chaos = capped(
        await make_database(postgres_max_pool_size=10, postgres_retry_attempts=6, postgres_retry_delay=10)
    )
    work = Workload(chaos, tasks=32, ops_per_task=100 * SECONDS, seconds=SECONDS, charges=40 * SECONDS)
    await work.setup(db)
    admin = await admin_connect(settings, TEST_DB)
    try:
        async with terminate_loop(admin, interval=0.025) as killed:
            await work.run()
    finally:
        await admin.close()

    rep = await work.verify(db)
    rep.assert_clean()
    assert killed[0] > 0
    await assert_recovered(chaos)
    print(f"\nterminated {killed[0]}; retried {retried(caplog)}; {rep}")
    rep.record(
        "pg_terminate_backend of every pooled backend every 25 ms, 32 tasks",
        f"{killed[0]} backends terminated; retried: {retried(caplog)}; {rep.outcome_notes()}",
    )


@contextlib.asynccontextmanager
async def proxy_chaos(
    proxy: FaultProxy, *, every: float, stall_at: float, stall_for: float
) -> AsyncIterator[None]:
    """Reset every connection every ``every`` s, and stall all forwarding once for ``stall_for`` s."""

    async def monkey() -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        stalled = False
        while True:
            await asyncio.sleep(every)
            elapsed = loop.time() - started
            if not stalled and elapsed >= stall_at:
                stalled = True
                proxy.stall()
                await asyncio.sleep(stall_for)
                proxy.resume()
            proxy.reset_all()

    task = asyncio.create_task(monkey())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        proxy.resume()
        proxy.reset_probability = 0.0
        proxy.latency = 0.0


@pytest.mark.soak
async def test_workload_through_a_faulty_proxy(
    db: Database, proxy: FaultProxy, make_database: MakeDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dash_storage.core.retry")
    chaos = await make_database(
        **proxy.overrides,
        postgres_max_pool_size=10,
        postgres_command_timeout=400,
        postgres_connection_timeout=1500,
        postgres_retry_attempts=6,
        postgres_retry_delay=20,
    )
    work = Workload(chaos, tasks=32, ops_per_task=100 * SECONDS, seconds=SECONDS, charges=40 * SECONDS)
    await work.setup(db)
    proxy.latency = 0.001
    proxy.reset_probability = 0.01
    async with proxy_chaos(proxy, every=0.3, stall_at=1.0, stall_for=1.0):
        await work.run()

    rep = await work.verify(db)
    rep.assert_clean()
    assert proxy.stats.resets > 0
    await assert_recovered(chaos)
    print(f"\nproxy {proxy.stats}; retried {retried(caplog)}; {rep}")
    rep.record(
        "TCP proxy: 1 ms latency, 1% of chunks reset, all connections reset every 300 ms, one 1 s stall; "
        "32 tasks",
        f"{proxy.stats.resets} connections reset; retried: {retried(caplog)}; {rep.outcome_notes()}",
    )


async def test_stalled_connection_times_out_and_is_never_reused(
    db: Database, proxy: FaultProxy, make_database: MakeDatabase
) -> None:
    """A half-open connection (the proxy stops forwarding, closes nothing) costs a caller at most
    POSTGRES_COMMAND_TIMEOUT; the connection is discarded; a write is not retried, a read is."""
    stalled = await make_database(
        **proxy.overrides,
        postgres_min_pool_size=1,
        postgres_max_pool_size=1,
        postgres_command_timeout=300,
        postgres_connection_timeout=1000,
        postgres_retry_attempts=4,
        postgres_retry_delay=200,
    )
    swarm = await db.fetchval("INSERT INTO swarms (name) VALUES ('stall') RETURNING id")
    agent = await AgentRepository(db).create(swarm)
    agents = AgentRepository(stalled)
    first_pid = await stalled.fetchval("SELECT pg_backend_pid()")
    outcomes: list[BaseException | None] = []

    # A non-idempotent write on the stalled connection: CommandTimeoutError, no retry.
    proxy.stall()
    with pytest.raises(CommandTimeoutError) as info:
        await asyncio.wait_for(agents.increment_retry(agent.id), timeout=20)
    outcomes.append(info.value)
    assert "POSTGRES_COMMAND_TIMEOUT" in str(info.value)
    assert stalled.stats().in_use == 0

    # A transaction while the network is still black-holed: a DashStorageError, bounded.
    with pytest.raises(DashStorageError) as tx_info:
        async with asyncio.timeout(20), stalled.transaction() as con:
            await con.fetchval("SELECT 1")
    outcomes.append(tx_info.value)
    print(f"\nstalled transaction: {tx_info.value!r}")
    assert stalled.stats().in_use == 0

    # A read (retried) that starts stalled and succeeds once the network is back.
    asyncio.get_running_loop().call_later(0.8, proxy.resume)
    found = await asyncio.wait_for(agents.find_by_id(agent.id), timeout=20)
    assert found is not None and found.id == agent.id
    outcomes.append(None)

    assert await stalled.fetchval("SELECT pg_backend_pid()") != first_pid  # the stalled one is gone
    await assert_recovered(stalled)

    # The write's bytes were held by the proxy and may reach the server late, on the stalled
    # connection's backend; once that backend has exited, nothing more can arrive: at most once.
    async def stalled_backend_gone() -> bool:
        return not await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", first_pid)

    await wait_until(stalled_backend_gone, "the stalled connection's backend has exited")
    after = await AgentRepository(db).find_by_id(agent.id)
    assert after is not None and after.retry_count <= 1
    raw = sum(1 for o in outcomes if o is not None and not isinstance(o, DashStorageError))
    record(
        "connection faults",
        "stalled / half-open connection (proxy stops forwarding, closes nothing)",
        operations=len(outcomes),
        succeeded=sum(1 for o in outcomes if o is None),
        duplicated=max(0, after.retry_count - 1),
        raw_errors=raw,
        notes="POSTGRES_COMMAND_TIMEOUT=300 ms: increment_retry raised CommandTimeoutError (not retried), "
        "a transaction raised DatabaseUnavailableError, a retried read succeeded after the stall; "
        "the timed-out connection was discarded",
    )

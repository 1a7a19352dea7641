"""Every test gets a real PostgreSQL.

The server is the one named by DATABASE_URL / POSTGRES_HOST, else an embedded one (data under
``.test-data/``). Tests run in their own database, ``dash_test`` unless DASH_TEST_DATABASE says
otherwise; it is dropped and re-created (and migrated) once per run, and every table is emptied
before each test that uses the ``db`` fixture. The user's ``dash`` database is never touched.

Importing this module changes nothing: the environment that subprocesses (``dash-db`` runs) need is
set when pytest starts (``pytest_configure``) and restored when it ends.

``pytest --reliability-report=RELIABILITY.md`` (what ``make reliability`` runs) also writes the
findings of the tests marked ``reliability`` to that file; no other run writes it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from dash_storage.core.config import Settings, load_settings
from dash_storage.core.database import Database
from dash_storage.migrations.runner import MigrationRunner
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[1]
TEST_DB = os.environ.get("DASH_TEST_DATABASE", "dash_test")
#: The pool mode of the PgBouncer in front of the server in the runs through one (``make test-pooler``
#: sets POSTGRES_POOLER); "none" in every other run.
POOLER = (os.environ.get("POSTGRES_POOLER") or "none").strip().lower()

#: The ``make_database`` fixture: ``await make_database(**setting_overrides)``.
MakeDatabase = Callable[..., Awaitable[Database]]


def session_environment() -> dict[str, str]:
    """The variables a test run sets for itself and for the processes it starts: the test database,
    and (with no server configured) the embedded server's data under ``.test-data/``."""
    env = {"POSTGRES_DB": TEST_DB}
    if not (os.environ.get("DATABASE_URL") or os.environ.get("POSTGRES_HOST")):
        env["DASH_DATA_DIR"] = os.environ.get("DASH_DATA_DIR") or str(ROOT / ".test-data" / "embedded")
    return env


def base_settings(**overrides: Any) -> Settings:
    return load_settings(postgres_db=TEST_DB, **overrides)


async def admin_connect(settings: Settings, database: str = "postgres") -> asyncpg.Connection:
    """A plain asyncpg connection to ``database`` on the test server (for setup and fault injection):
    to the server itself (DATABASE_DIRECT_URL) in the runs through a pooler."""
    kwargs = settings.direct_connect_kwargs(database=database)
    if kwargs is None:
        kwargs = await Database(settings).connect_kwargs(database)
    return await asyncpg.connect(**kwargs)


async def admin_execute(settings: Settings, *statements: str, **names: str) -> None:
    """Run ``statements`` in order on an admin connection; each ``{key}`` in them stands for the
    identifier ``names[key]``, quoted by the server."""
    con = await admin_connect(settings)
    try:
        idents = {key: await con.fetchval("SELECT quote_ident($1)", name) for key, name in names.items()}
        for statement in statements:
            await con.execute(statement.format(**idents))
    finally:
        await con.close()


async def recreate_database(settings: Settings, name: str, *, template: str | None = None) -> None:
    drop = "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
    if template:
        await admin_execute(
            settings, drop, "CREATE DATABASE {db} TEMPLATE {template}", db=name, template=template
        )
    else:
        await admin_execute(settings, drop, "CREATE DATABASE {db}", db=name)


async def drop_database(settings: Settings, name: str) -> None:
    await admin_execute(settings, "DROP DATABASE IF EXISTS {db} WITH (FORCE)", db=name)


async def migrate(database: Database) -> None:
    await MigrationRunner(database).migrate()


@pytest.fixture(scope="session")
def settings() -> Settings:
    return base_settings()


@pytest.fixture(scope="session")
async def database(settings: Settings) -> AsyncIterator[Database]:
    """The session's Database on the freshly created and migrated test database."""
    await recreate_database(settings, TEST_DB)
    db = Database(settings)
    await db.initialize()
    await migrate(db)
    try:
        yield db
    finally:
        await db.close()


async def _truncate_all(db: Database) -> None:
    tables = await db.fetch(
        "SELECT quote_ident(tablename) AS t FROM pg_tables WHERE schemaname = 'public' "
        "AND tablename <> '_migrations'"
    )
    if tables:
        await db.execute("TRUNCATE " + ", ".join(r["t"] for r in tables) + " CASCADE")


@pytest.fixture
async def db(database: Database) -> Database:
    """The test database, emptied of rows (schema kept) before the test."""
    await _truncate_all(database)
    return database


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own (on a free port, persisting with AOF), stopped after it."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def make_database(settings: Settings, database: Database) -> AsyncIterator[MakeDatabase]:
    """Build extra Database objects on the test database (created and migrated) with setting
    overrides; closed afterwards."""
    made: list[Database] = []

    async def factory(**overrides: Any) -> Database:
        d = Database(settings, **overrides)
        made.append(d)
        await d.initialize()
        return d

    yield factory
    for d in made:
        await d.close()


# -- the session: environment, markers, the reliability report ---------------------------------------

_environment = pytest.MonkeyPatch()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--reliability-report",
        metavar="PATH",
        default=None,
        help="write the findings of the tests marked 'reliability' to PATH (make reliability), "
        "only if every one of them ran and passed",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "reliability: a fault/input test whose findings go to RELIABILITY.md")
    config.addinivalue_line(
        "markers", "soak: a fault loop sized by DASH_SOAK (small in make test, full size in make soak)"
    )
    config.addinivalue_line(
        "markers",
        "direct_server(reason): about the PostgreSQL server itself, reached directly (it kills server "
        "processes, puts a fault proxy in front, ...): skipped, with the reason, in the runs through a "
        "pooler (make test-pooler)",
    )
    if TEST_DB == "dash":
        raise pytest.UsageError(
            "DASH_TEST_DATABASE must not be 'dash': the tests drop and re-create their database"
        )
    for name, value in session_environment().items():
        _environment.setenv(name, value)


def pytest_unconfigure(config: pytest.Config) -> None:
    _environment.undo()


_reliability = {"collected": 0, "passed": 0, "failed": 0}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _reliability["collected"] = sum(1 for item in items if item.get_closest_marker("reliability"))
    if POOLER != "none":
        for item in items:
            marker = item.get_closest_marker("direct_server")
            if marker is not None:
                why = marker.args[0] if marker.args else marker.kwargs.get("reason", "")
                why = f"needs the server itself, not a {POOLER}-mode pooler: {why}"
                item.add_marker(pytest.mark.skip(reason=why))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "reliability" not in report.keywords:
        return
    if report.failed:
        _reliability["failed"] += 1
    elif report.when == "call" and report.passed:
        _reliability["passed"] += 1


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With --reliability-report: write the report when every reliability test of the whole suite
    ran and passed; otherwise say why not and fail the run."""
    target = session.config.getoption("reliability_report")
    if not target:
        return
    from tests import reliability

    config = session.config
    why_not = None
    if not (
        config.args_source == pytest.Config.ArgsSource.TESTPATHS
        and config.option.markexpr in ("", "reliability")
        and not config.option.keyword
        and not config.option.deselect
    ):
        why_not = "only a run of every reliability test (no paths, -k, --deselect or other -m) writes it"
    elif not _reliability["collected"] or not reliability.FINDINGS:
        why_not = "no reliability test ran"
    elif _reliability["failed"] or _reliability["passed"] != _reliability["collected"]:
        passed, failed = _reliability["passed"], _reliability["failed"]
        skipped = max(0, _reliability["collected"] - passed - failed)
        why_not = (
            f"{passed} of {_reliability['collected']} reliability tests passed "
            f"({failed} failed, {skipped} skipped)"
        )
    if why_not is not None:
        session.config.get_terminal_writer().line(f"\n{target} not written: {why_not}", red=True)
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        return
    server = os.environ.get("DASH_RELIABILITY_SERVER") or (
        "PostgreSQL server at " + os.environ["POSTGRES_HOST"]
        if os.environ.get("POSTGRES_HOST")
        else "embedded"
    )
    Path(target).write_text(reliability.render(server))
    session.config.get_terminal_writer().line(f"\nwrote {target}")

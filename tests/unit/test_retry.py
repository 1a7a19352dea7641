"""The retry policy: what is transient, how long it waits, that non-transient errors are not retried."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from dash_storage.core.config import Settings, load_settings
from dash_storage.core.database import Database
from dash_storage.core.errors import (
    ConfigurationError,
    ConflictError,
    DashStorageError,
    DatabaseError,
    DatabaseUnavailableError,
    SerializationConflictError,
    is_retryable,
    is_transient,
    map_error,
)
from dash_storage.core.retry import RetryPolicy, retry_call


def _pg(cls: type[asyncpg.PostgresError]) -> asyncpg.PostgresError:
    return cls.new({"M": "boom", "C": cls.sqlstate})  # type: ignore[attr-defined, no-any-return]


@pytest.mark.parametrize(
    "exc",
    [
        _pg(asyncpg.AdminShutdownError),
        _pg(asyncpg.CannotConnectNowError),
        _pg(asyncpg.TooManyConnectionsError),
        _pg(asyncpg.SerializationError),
        _pg(asyncpg.DeadlockDetectedError),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        ConnectionRefusedError(111, "refused"),
        ConnectionResetError(104, "reset"),
    ],
)
def test_transient(exc: BaseException) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize(
    "exc", [_pg(asyncpg.PostgresSyntaxError), _pg(asyncpg.UniqueViolationError), ValueError("x")]
)
def test_not_transient(exc: BaseException) -> None:
    assert not is_transient(exc)


def test_mapping_keeps_kind() -> None:
    assert isinstance(map_error(_pg(asyncpg.UniqueViolationError)), ConflictError)
    assert isinstance(map_error(_pg(asyncpg.SerializationError)), SerializationConflictError)
    assert isinstance(map_error(ConnectionRefusedError(111, "refused")), DatabaseUnavailableError)
    assert isinstance(map_error(_pg(asyncpg.PostgresSyntaxError)), DatabaseError)


def test_backoff_is_exponential_with_jitter() -> None:
    policy = RetryPolicy(attempts=5, delay=0.1, max_delay=1.0)
    for n, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0)]:
        waits = {policy.backoff(n) for _ in range(50)}
        assert all(ceiling / 2 <= w <= ceiling for w in waits)
        assert len(waits) > 1  # jitter


async def test_retries_transient_then_succeeds() -> None:
    calls = []

    async def op(attempt: int) -> str:
        calls.append(attempt)
        if attempt < 3:
            raise _pg(asyncpg.CannotConnectNowError)
        return "ok"

    assert await retry_call(op, RetryPolicy(attempts=3, delay=0.001)) == "ok"
    assert calls == [1, 2, 3]


async def test_gives_up_after_attempts_with_mapped_error() -> None:
    calls = []

    async def op(attempt: int) -> None:
        calls.append(attempt)
        raise _pg(asyncpg.TooManyConnectionsError)

    with pytest.raises(DatabaseUnavailableError) as info:
        await retry_call(op, RetryPolicy(attempts=2, delay=0.001))
    assert calls == [1, 2, 3]
    assert isinstance(info.value.__cause__, asyncpg.TooManyConnectionsError)


async def test_non_transient_raised_at_once() -> None:
    calls = []

    async def op(attempt: int) -> None:
        calls.append(attempt)
        raise _pg(asyncpg.UniqueViolationError)

    with pytest.raises(DashStorageError):
        await retry_call(op, RetryPolicy(attempts=5, delay=0.001))
    assert calls == [1]


# -- one policy, applied once ------------------------------------------------------------------


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once the socket is closed


@pytest.fixture
def down_server(monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    return load_settings(
        postgres_host="127.0.0.1",
        postgres_port=_closed_port(),
        postgres_retry_attempts=2,
        postgres_retry_delay=10,
    )


def _retries(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]


@pytest.mark.parametrize("how", ["fetchval", "run", "transaction-run", "connect", "import"])
async def test_a_server_that_is_down_is_tried_attempts_plus_one_times(
    how: str, down_server: Settings, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    db = Database(down_server)

    async def noop(con: object, attempt: int) -> None:
        return None

    calls = {
        "fetchval": lambda: db.fetchval("SELECT 1", retry=True),
        "run": lambda: db.run(noop, retry=True),
        "transaction-run": lambda: db.run(noop, retry=True, transaction=True),
        "connect": lambda: db.connect(),
        "import": lambda: _import(db, tmp_path),
    }
    with caplog.at_level("WARNING", logger="dash_storage.core.retry"):
        with pytest.raises(DatabaseUnavailableError) as info:
            await calls[how]()
    assert len(_retries(caplog)) == 2, _retries(caplog)
    assert "127.0.0.1" in str(info.value)  # the server that was tried is named
    await db.close()


async def _import(db: Database, tmp_path: Path) -> None:
    from bench.legacy_factory import build_legacy_file
    from dash_storage.legacy.importer import import_sqlite

    path = tmp_path / "dash.db"
    build_legacy_file(path, swarms=2, agents=3, events=10, anomalies=False)
    await import_sqlite(db, path)


def test_a_timeout_is_not_retried_but_a_connect_timeout_is() -> None:
    assert not is_retryable(TimeoutError())
    assert not is_retryable(map_error(TimeoutError()))
    assert is_transient(map_error(TimeoutError()))  # its connection is still discarded
    assert is_retryable(DatabaseUnavailableError("timed out connecting"))


def test_a_server_without_tls_is_a_configuration_error() -> None:
    exc = ConnectionError('PostgreSQL server at "db:5432" rejected SSL upgrade')
    assert not is_transient(exc)
    err = map_error(exc)
    assert isinstance(err, ConfigurationError) and err.variable == "POSTGRES_SSL"

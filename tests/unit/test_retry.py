"""The retry policy: what is transient, how long it waits, that non-transient errors are not retried."""

from __future__ import annotations

import asyncpg
import pytest

from dash_storage.errors import (
    ConflictError,
    DashStorageError,
    DatabaseError,
    DatabaseUnavailableError,
    SerializationConflictError,
    is_transient,
    map_error,
)
from dash_storage.retry import RetryPolicy, retry_call


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

"""Real Databases that replay or intercept calls, to put a retry in the exact state a fault leaves.

They override only public methods: the one-statement helpers (``fetch``, ``fetchrow``,
``fetchval``, ``execute``, all routed through :meth:`StatementHook.statement`) and ``run``.
Everything they send goes to the real test database.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from dash_storage.core.database import Connection, Database, Record

__all__ = ["LostAnswerDatabase", "RetryAttemptDatabase", "StatementHook"]

T = TypeVar("T")


def as_attempt(
    fn: Callable[[Connection, int], Awaitable[T]], attempt: int
) -> Callable[[Connection, int], Awaitable[T]]:
    """``fn`` run as attempt number ``attempt``, whatever attempt the Database is on."""

    async def call(con: Connection, _: int) -> T:
        return await fn(con, attempt)

    return call


class StatementHook(Database):
    """A real Database whose one-statement helpers all go through :meth:`statement`, which a
    subclass overrides to count, replay or fail statements."""

    async def statement(
        self, method: str, query: str, args: Sequence[Any], retry: bool, timeout: float | None
    ) -> Any:
        """Send one statement with ``Database.<method>`` (``fetch``, ``fetchrow``, ...)."""
        send = getattr(super(), method)
        return await send(query, *args, retry=retry, timeout=timeout)

    async def fetch(
        self, query: str, *args: Any, retry: bool = False, timeout: float | None = None
    ) -> list[Record]:
        return await self.statement("fetch", query, args, retry, timeout)  # type: ignore[no-any-return]

    async def fetchrow(
        self, query: str, *args: Any, retry: bool = False, timeout: float | None = None
    ) -> Record | None:
        return await self.statement("fetchrow", query, args, retry, timeout)  # type: ignore[no-any-return]

    async def fetchval(
        self, query: str, *args: Any, retry: bool = False, timeout: float | None = None
    ) -> Any:
        return await self.statement("fetchval", query, args, retry, timeout)

    async def execute(self, query: str, *args: Any, retry: bool = False, timeout: float | None = None) -> str:
        return await self.statement("execute", query, args, retry, timeout)  # type: ignore[no-any-return]


class LostAnswerDatabase(StatementHook):
    """A real Database that, for every retried call, runs it once, throws the answer away (as if the
    connection dropped after COMMIT) and runs it again as a retry attempt. ``replays`` counts them."""

    replays = 0

    async def statement(
        self, method: str, query: str, args: Sequence[Any], retry: bool, timeout: float | None
    ) -> Any:
        if retry:
            self.replays += 1
            await super().statement(method, query, args, False, timeout)
        return await super().statement(method, query, args, False, timeout)

    async def run(
        self, fn: Callable[[Connection, int], Awaitable[T]], *, retry: bool = False, transaction: bool = False
    ) -> T:
        if not retry:
            return await super().run(fn, transaction=transaction)
        self.replays += 1
        await super().run(as_attempt(fn, 1), transaction=transaction)
        return await super().run(as_attempt(fn, 2), transaction=transaction)


class RetryAttemptDatabase(Database):
    """Runs every retried ``run`` directly as attempt 2, as after a first attempt that failed or
    whose answer was lost: the retry must recognise its own earlier write and nobody else's."""

    async def run(
        self, fn: Callable[[Connection, int], Awaitable[T]], *, retry: bool = False, transaction: bool = False
    ) -> T:
        return await super().run(as_attempt(fn, 2) if retry else fn, transaction=transaction)

"""Rows the tests need as a setting (a swarm, an agent, a budget), and waiting for a condition.

The factories write plain rows with SQL, so that a test of one repository does not depend on
another repository to build its fixtures. Each row gets its id from the client, and the insert
ignores a row that already has it: a retried insert whose first answer was lost cannot fail or write
twice, so the factories are safe on a Database whose connections are being killed.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

from dash_storage.core.database import Database
from dash_storage.core.ids import new_id

__all__ = ["make_agent", "make_budget", "make_swarm", "snapshot", "wait_until"]


async def make_swarm(db: Database, name: str = "swarm") -> uuid.UUID:
    """A new swarm (schema defaults for everything but the name); its id."""
    swarm_id = new_id()
    await db.execute(
        "INSERT INTO swarms (id, name) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
        swarm_id,
        name,
        retry=True,
    )
    return swarm_id


async def make_agent(db: Database, swarm_id: uuid.UUID, *, status: str = "pending") -> uuid.UUID:
    """A new agent of ``swarm_id`` with ``status`` (schema defaults for the rest); its id."""
    agent_id = new_id()
    await db.execute(
        "INSERT INTO agents (id, swarm_id, status) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
        agent_id,
        swarm_id,
        status,
        retry=True,
    )
    return agent_id


async def make_budget(
    db: Database, allocated: Decimal | int | str, max_tokens: int | None = None, *, name: str = "funded"
) -> uuid.UUID:
    """A new swarm and a swarm-scope budget of ``allocated`` (and ``max_tokens``) for it; its id."""
    budget_id, swarm_id = new_id(), await make_swarm(db, name)
    await db.execute(
        "INSERT INTO budgets (id, swarm_id, scope_type, scope_id, allocated, max_tokens) "
        "VALUES ($1, $2, 'swarm', $2, $3, $4) ON CONFLICT (id) DO NOTHING",
        budget_id,
        swarm_id,
        Decimal(allocated),
        max_tokens,
        retry=True,
    )
    return budget_id


async def snapshot(db: Database) -> list[Any]:
    """Every row of swarms, agents, sessions and budgets, to prove that a call changed nothing."""
    out: list[Any] = []
    for table in ("swarms", "agents", "sessions", "budgets"):
        out.append(await db.fetch(f"SELECT to_jsonb(t) FROM {table} t ORDER BY id"))
    return out


async def wait_until(check: Callable[[], Awaitable[object]], what: str, seconds: float = 10.0) -> None:
    """Poll ``check`` until it returns a true value (a state to reach, not a time to wait); fail
    after ``seconds``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"not reached within {seconds} s: {what}")
        await asyncio.sleep(0.01)

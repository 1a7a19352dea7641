"""A simulated swarm, used by ``dash-db demo``: the whole library at work in a few seconds.

Fifty agents spawn, move through their lifecycle, write events, spend from one shared swarm budget
until it runs out, get paused and resumed, fail and retry; a session tree grows branches. Everything
goes through the public repositories, exactly as an agent platform would use them.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal

from dash_storage.core import validation as v
from dash_storage.core.database import Database
from dash_storage.core.errors import ValidationError
from dash_storage.core.models import AgentActivity, EventTypeStats, SwarmSummary
from dash_storage.repositories.agents import AgentRepository
from dash_storage.repositories.budgets import BudgetRepository
from dash_storage.repositories.events import EventRepository
from dash_storage.repositories.sessions import SessionRepository
from dash_storage.repositories.swarms import SwarmRepository

__all__ = ["DemoProgress", "DemoResult", "check_demo_options", "run_demo"]

MAX_AGENTS = 1000
MIN_SECONDS, MAX_SECONDS = 0.5, 600.0
MODELS = ("kimi-k2.5", "claude-sonnet", "gpt-5-mini", "llama-4-70b")
PRICE_PER_TOKEN = Decimal("0.000002")  # USD


@dataclass
class DemoProgress:
    agents_total: int
    agents_spawned: int = 0
    agents_finished: int = 0
    events: int = 0
    grants: int = 0
    denials: int = 0
    spent: Decimal = Decimal(0)
    allocated: Decimal = Decimal(0)


@dataclass
class DemoResult:
    swarm_id: uuid.UUID
    session_id: uuid.UUID
    progress: DemoProgress
    summary: SwarmSummary | None
    activity: list[AgentActivity] = field(default_factory=list)
    event_stats: list[EventTypeStats] = field(default_factory=list)
    session_branches: list[str] = field(default_factory=list)


def check_demo_options(agents: object, seconds: object, allocated: object) -> tuple[int, float, Decimal]:
    """The demo's options, checked before anything is written: ValidationError names the bad one.

    ``agents`` is 1..1000, ``seconds`` a finite number in [0.5, 600], ``allocated`` (the swarm
    budget in USD) an amount above zero with at most 10 decimal places.
    """
    count = v.check_int(agents, "agents", minimum=1, maximum=MAX_AGENTS)
    assert count is not None
    duration = v.check_duration(seconds, "seconds", maximum=MAX_SECONDS)
    if duration < MIN_SECONDS:
        raise ValidationError("seconds", f"must be at least {MIN_SECONDS}, got {duration}")
    money = v.check_money(allocated, "allocated")
    assert money is not None
    if money == 0:
        raise ValidationError("allocated", "must be above 0 (the agents spend from it), got 0")
    return count, duration, money


async def run_demo(
    db: Database,
    *,
    agents: int = 50,
    seconds: float = 4.0,
    allocated: Decimal = Decimal("2.50"),
    seed: int | None = None,
    on_progress: Callable[[DemoProgress], None] | None = None,
) -> DemoResult:
    """Simulate one swarm on ``db`` (already migrated) and return what the views say about it.

    The options are checked first (see :func:`check_demo_options`), so a bad one writes nothing.
    If the simulation fails once the swarm exists, the swarm is marked ``failed``.
    """
    agents, seconds, allocated = check_demo_options(agents, seconds, allocated)
    swarms = SwarmRepository(db)
    swarm = await swarms.create(name=f"demo-swarm-{uuid.uuid4().hex[:6]}", config={"max_agents": agents})
    try:
        return await _simulate(
            db,
            swarm.id,
            agents=agents,
            seconds=seconds,
            allocated=allocated,
            rng=random.Random(seed),
            on_progress=on_progress,
        )
    except BaseException:
        # Interrupted or failed half-way: say so, rather than leave a swarm that looks alive.
        with contextlib.suppress(Exception):
            await swarms.update_status(swarm.id, "failed")
        raise


async def _simulate(
    db: Database,
    swarm_id: uuid.UUID,
    *,
    agents: int,
    seconds: float,
    allocated: Decimal,
    rng: random.Random,
    on_progress: Callable[[DemoProgress], None] | None,
) -> DemoResult:
    swarms, agent_repo = SwarmRepository(db), AgentRepository(db)
    events, budgets, sessions = EventRepository(db), BudgetRepository(db), SessionRepository(db)
    progress = DemoProgress(agents_total=agents, allocated=allocated)

    def tick() -> None:
        if on_progress is not None:
            on_progress(progress)

    budget = await budgets.create("swarm", swarm_id, allocated=allocated, max_tokens=2_000_000)
    await swarms.update_status(swarm_id, "active")
    await events.create(swarm_id, "swarm.started", payload={"agents": agents}, entity_type="system")
    session = await sessions.create(
        tree_data={"root": "main", "branches": {"main": []}},
        current_branch="main",
        metadata={"swarm_id": str(swarm_id)},
        ttl_seconds=3600,
    )
    deadline = asyncio.get_running_loop().time() + seconds

    async def agent_life(n: int) -> None:
        agent = await agent_repo.create(
            swarm_id,
            model=rng.choice(MODELS),
            task=f"subtask {n}",
            label=f"agent-{n:02d}",
            max_retries=2,
            metadata={"n": n},
        )
        await agent_repo.update_lifecycle_state(agent.id, "spawning")
        await events.create(
            swarm_id, "agent.spawned", agent_id=agent.id, payload={"model": agent.model}, entity_type="agent"
        )
        await agent_repo.update_lifecycle_state(agent.id, "running")
        await agent_repo.update_status(agent.id, "running")
        progress.agents_spawned += 1
        progress.events += 1
        tick()
        step = 0
        outcome = "completed"
        work = rng.randint(8, 60)  # steps this agent's task needs; the budget may run out first
        while step < work and asyncio.get_running_loop().time() < deadline:
            step += 1
            await asyncio.sleep(rng.uniform(0.02, 0.12))  # the model thinks
            tokens = rng.randint(200, 2000)
            cost = PRICE_PER_TOKEN * tokens
            if not await budgets.consume_budget(budget.id, tokens, cost):
                progress.denials += 1
                await events.create(
                    swarm_id,
                    "budget.exhausted",
                    agent_id=agent.id,
                    severity="warning",
                    entity_type="agent",
                    payload={"step": step, "wanted": str(cost)},
                )
                progress.events += 1
                outcome = "blocked"
                break
            progress.grants += 1
            progress.spent += cost
            batch = [
                {
                    "swarm_id": swarm_id,
                    "agent_id": agent.id,
                    "type": "agent.step",
                    "entity_type": "task",
                    "payload": {"step": step, "tokens": tokens},
                },
                {
                    "swarm_id": swarm_id,
                    "agent_id": agent.id,
                    "type": "llm.call",
                    "entity_type": "agent",
                    "severity": "debug",
                    "payload": {"tokens": tokens, "cost": str(cost)},
                },
            ]
            await events.create_many(batch)
            progress.events += len(batch)
            roll = rng.random()
            if roll < 0.03:
                await agent_repo.pause(agent.id, "supervisor")
                await events.create(swarm_id, "agent.paused", agent_id=agent.id, entity_type="agent")
                await asyncio.sleep(0.05)
                await agent_repo.resume(agent.id)
                await events.create(swarm_id, "agent.resumed", agent_id=agent.id, entity_type="agent")
                progress.events += 2
            elif roll < 0.05:
                updated = await agent_repo.increment_retry(agent.id)
                await events.create(
                    swarm_id,
                    "agent.error",
                    agent_id=agent.id,
                    severity="error",
                    entity_type="agent",
                    payload={"retry": updated.retry_count if updated else None},
                )
                progress.events += 1
                if updated is not None and updated.retry_count > updated.max_retries:
                    outcome = "failed"
                    break
            tick()
        await agent_repo.update_lifecycle_state(agent.id, "completing")
        await agent_repo.update(agent.id, runtime=step * 70)
        await agent_repo.update_status(
            agent.id, outcome, last_error="retries exhausted" if outcome == "failed" else None
        )
        await agent_repo.update_lifecycle_state(agent.id, "failed" if outcome == "failed" else "destroyed")
        await events.create(
            swarm_id,
            f"agent.{outcome}",
            agent_id=agent.id,
            entity_type="agent",
            severity="error" if outcome == "failed" else "info",
        )
        progress.events += 1
        progress.agents_finished += 1
        tick()

    async def grow_session() -> list[str]:
        branches = ["main"]
        for i in range(1, 4):
            await asyncio.sleep(seconds / 5)
            name = f"explore-{i}"
            branches.append(name)
            tree = {"root": "main", "branches": {b: [f"{b}:step-{k}" for k in range(i)] for b in branches}}
            await sessions.update_tree_data(session.id, tree, name)
            await sessions.merge_metadata(session.id, {f"branch_{i}_created_by": f"agent-{i:02d}"})
        return branches

    results = await asyncio.gather(*(agent_life(n) for n in range(agents)), grow_session())
    branches = results[-1]
    assert isinstance(branches, list)
    await swarms.update_status(swarm_id, "completed")
    await events.create(swarm_id, "swarm.completed", payload={"spent": str(progress.spent)})
    progress.events += 2
    tick()
    return DemoResult(
        swarm_id=swarm_id,
        session_id=session.id,
        progress=progress,
        summary=await swarms.get_summary(swarm_id),
        activity=await agent_repo.get_activity(swarm_id=swarm_id, limit=agents),
        event_stats=await events.get_stats_24h(),
        session_branches=branches,
    )

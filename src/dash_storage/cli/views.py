"""Read-only views for a person at a terminal: ``dash-db swarms|agents|events|budgets``."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from typing import Annotated, Any

import typer
from rich.table import Table

from dash_storage.cli.common import console, print_json, run
from dash_storage.database import Database
from dash_storage.repositories.agents import AgentRepository
from dash_storage.repositories.budgets import BudgetRepository
from dash_storage.repositories.events import EventRepository
from dash_storage.repositories.swarms import SwarmRepository

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]
LimitOpt = Annotated[int, typer.Option(min=1, max=10_000, help="At most this many rows.")]


def _uuid(value: str | None, option: str) -> uuid.UUID | None:
    if value is None:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        raise typer.BadParameter(f"not a UUID: {value!r}", param_hint=option) from None


def _show(rows: Sequence[Any], columns: Sequence[str], title: str, json_out: bool) -> None:
    if json_out:
        print_json([r._asdict() if hasattr(r, "_asdict") else asdict(r) for r in rows])
        return
    table = Table(title=f"{title} ({len(rows)})")
    for col in columns:
        table.add_column(col)
    for r in rows:
        cells = []
        for col in columns:
            value = getattr(r, col)
            if isinstance(value, dt.datetime):
                value = value.strftime("%Y-%m-%d %H:%M:%S")
            cells.append("-" if value is None else str(value))
        table.add_row(*cells)
    console.print(table)


async def _with_db(fn: Any) -> Any:
    async with Database() as db:
        return await fn(db)


def swarms(
    status: Annotated[str | None, typer.Option(help="Only swarms in this status.")] = None,
    limit: LimitOpt = 50,
    json_out: JsonOpt = False,
) -> None:
    """List swarms with their agent counts and budget (the swarm_summary view)."""
    rows = run(_with_db(lambda db: SwarmRepository(db).list_summaries(status=status, limit=limit)))
    _show(
        rows,
        (
            "id",
            "name",
            "status",
            "running_agents",
            "total_agents",
            "budget_allocated",
            "budget_consumed",
            "budget_percentage",
        ),
        "swarms",
        json_out,
    )


def agents(
    swarm: Annotated[str | None, typer.Option(help="Only agents of this swarm (UUID).")] = None,
    status: Annotated[str | None, typer.Option(help="Only agents in this status.")] = None,
    model: Annotated[str | None, typer.Option(help="Only agents using this model.")] = None,
    limit: LimitOpt = 50,
    json_out: JsonOpt = False,
) -> None:
    """List agents (newest first)."""
    swarm_id = _uuid(swarm, "--swarm")
    rows = run(
        _with_db(
            lambda db: AgentRepository(db).list(swarm_id=swarm_id, status=status, model=model, limit=limit)
        )
    )
    _show(
        rows,
        ("id", "label", "status", "lifecycle_state", "model", "retry_count", "spawned_at"),
        "agents",
        json_out,
    )


def events(
    swarm: Annotated[str | None, typer.Option(help="Only events of this swarm (UUID).")] = None,
    agent: Annotated[str | None, typer.Option(help="Only events of this agent (UUID).")] = None,
    type_: Annotated[list[str] | None, typer.Option("--type", help="Event type; repeat for several.")] = None,
    severity: Annotated[str | None, typer.Option(help="Only this severity.")] = None,
    hours: Annotated[float | None, typer.Option(min=0, help="Only the last N hours.")] = None,
    limit: LimitOpt = 50,
    json_out: JsonOpt = False,
) -> None:
    """List events, newest first, with filters."""
    swarm_id, agent_id = _uuid(swarm, "--swarm"), _uuid(agent, "--agent")

    async def query(db: Database) -> Any:
        since = None
        if hours is not None:
            now = await db.fetchval("SELECT now()", retry=True)
            since = now - dt.timedelta(hours=hours)
        return await EventRepository(db).find_by_filter(
            swarm_id=swarm_id,
            agent_id=agent_id,
            types=type_,
            severity=severity,
            since=since,
            limit=limit,
            order="desc",
        )

    rows = run(_with_db(query))
    _show(
        rows,
        ("timestamp", "type", "severity", "entity_type", "swarm_id", "agent_id", "payload"),
        "events",
        json_out,
    )


def budgets(
    swarm: Annotated[str | None, typer.Option(help="Only budgets of this swarm (UUID).")] = None,
    scope_type: Annotated[str | None, typer.Option(help="swarm, agent or project.")] = None,
    limit: LimitOpt = 50,
    json_out: JsonOpt = False,
) -> None:
    """List budgets with allocation and consumption."""
    swarm_id = _uuid(swarm, "--swarm")
    rows = run(
        _with_db(lambda db: BudgetRepository(db).list(scope_type=scope_type, swarm_id=swarm_id, limit=limit))
    )
    _show(
        rows,
        ("id", "scope_type", "scope_id", "allocated", "consumed", "currency", "max_tokens", "used_tokens"),
        "budgets",
        json_out,
    )


def register(app: typer.Typer) -> None:
    for fn in (swarms, agents, events, budgets):
        app.command(fn.__name__)(fn)

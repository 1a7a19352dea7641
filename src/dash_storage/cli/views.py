"""Read-only views for a person at a terminal: ``dash-db swarms|agents|events|budgets|sessions``.

Every option is checked before the database is asked anything; a bad value is a usage error
(exit 2) naming the option.
"""

from __future__ import annotations

import datetime as dt
import math
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from typing import Annotated, Any, TypeVar

import typer

from dash_storage.cli import stream
from dash_storage.cli.common import print_json, run, usage_error
from dash_storage.cli.help import DashCommand
from dash_storage.cli.since import parse_since
from dash_storage.cli.tables import cell, kind_of, new_table, print_table
from dash_storage.core.database import Database
from dash_storage.core.errors import ValidationError
from dash_storage.core.models import AgentStatus, LifecycleState, ScopeType, Severity, SwarmStatus
from dash_storage.repositories.agents import AgentRepository
from dash_storage.repositories.budgets import BudgetRepository
from dash_storage.repositories.events import EventRepository
from dash_storage.repositories.sessions import SessionRepository
from dash_storage.repositories.swarms import SwarmRepository
from dash_storage.stream.position import decode

T = TypeVar("T")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]
LimitOpt = Annotated[int, typer.Option(min=1, max=10_000, help="At most this many rows.")]


# The repositories name fields as their arguments; the options are named for people.
_OPTION_OF = {
    "types": "--type",
    "lifecycle_state": "--lifecycle",
    "swarm_id": "--swarm",
    "agent_id": "--agent",
}


def _uuid(value: str | None, option: str) -> uuid.UUID | None:
    if value is None:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        raise usage_error(option, f"not a UUID: {value!r}") from None


def _list(
    fn: Callable[[Database], Awaitable[Sequence[Any]]], columns: Sequence[str], title: str, json_out: bool
) -> None:
    """Print what ``fn`` reads: a table of ``columns``, or JSON."""
    rows = _query(fn)
    if json_out:
        print_json([r._asdict() if hasattr(r, "_asdict") else asdict(r) for r in rows])
        return
    kinds = [kind_of(getattr(r, col) for r in rows) for col in columns]
    table = new_table(f"{title} ({len(rows)})", list(zip(columns, kinds, strict=True)))
    for r in rows:
        table.add_row(*(cell(getattr(r, col)) for col in columns))
    print_table(table)


def _query(fn: Callable[[Database], Awaitable[T]]) -> T:
    async def with_db() -> T:
        async with Database() as db:
            return await fn(db)

    try:
        return run(with_db())
    except ValidationError as exc:  # the library's own check of a filter value
        option = _OPTION_OF.get(exc.field, f"--{exc.field.replace('_', '-')}")
        raise usage_error(option, exc.problem) from None


def swarms(
    status: Annotated[SwarmStatus | None, typer.Option(help="Only swarms in this status.")] = None,
    limit: LimitOpt = 50,
    json_out: JsonOpt = False,
) -> None:
    """List swarms with their agent counts and budget (the swarm_summary view)."""
    _list(
        lambda db: SwarmRepository(db).list_summaries(status=status, limit=limit),
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
    swarm: Annotated[str | None, typer.Option(metavar="UUID", help="Only agents of this swarm.")] = None,
    status: Annotated[AgentStatus | None, typer.Option(help="Only agents in this status.")] = None,
    lifecycle: Annotated[
        LifecycleState | None, typer.Option(help="Only agents in this lifecycle state.")
    ] = None,
    model: Annotated[str | None, typer.Option(metavar="MODEL", help="Only agents using this model.")] = None,
    limit: LimitOpt = 50,
    json_out: JsonOpt = False,
) -> None:
    """List agents (newest first)."""
    swarm_id = _uuid(swarm, "--swarm")
    _list(
        lambda db: AgentRepository(db).list(
            swarm_id=swarm_id, status=status, lifecycle_state=lifecycle, model=model, limit=limit
        ),
        ("id", "label", "status", "lifecycle_state", "model", "retry_count", "spawned_at"),
        "agents",
        json_out,
    )


def _since(since: str | None, hours: float | None) -> dt.datetime | dt.timedelta | None:
    if since is not None and hours is not None:
        raise usage_error("--since", "give --since or --hours, not both")
    if hours is not None:
        if not math.isfinite(hours):
            raise usage_error("--hours", f"must be a finite number of hours, got {hours}")
        return dt.timedelta(hours=hours)
    if since is None:
        return None
    try:
        return parse_since(since)
    except ValueError as exc:
        raise usage_error("--since", str(exc)) from None


def events(
    swarm: Annotated[str | None, typer.Option(metavar="UUID", help="Only events of this swarm.")] = None,
    agent: Annotated[str | None, typer.Option(metavar="UUID", help="Only events of this agent.")] = None,
    type_: Annotated[
        list[str] | None, typer.Option("--type", metavar="TYPE", help="Event type; repeat for several.")
    ] = None,
    severity: Annotated[Severity | None, typer.Option(help="Only this severity.")] = None,
    since: Annotated[
        str | None,
        typer.Option(
            metavar="WHEN",
            help="Only events from this moment on: an ISO timestamp (UTC unless it has an offset) "
            "or a duration back from now (15m, 2h, 1d, 1w).",
        ),
    ] = None,
    hours: Annotated[
        float | None, typer.Option(min=0, max=876_000, help="Only the last N hours (like --since Nh).")
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=10_000,
            help="At most this many rows (default 50); with --follow, stop after this many.",
        ),
    ] = None,
    json_out: JsonOpt = False,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow",
            help="Print events as they commit, oldest first, until Ctrl-C (JSON lines with --json, each "
            "with the cursor to resume after it). Starts from now unless --from-start or --after.",
        ),
    ] = False,
    from_start: Annotated[
        bool, typer.Option("--from-start", help="With --follow: start at the first event of the log.")
    ] = False,
    after: Annotated[
        str | None,
        typer.Option(
            metavar="CURSOR", help="With --follow: continue after this cursor (from an earlier run)."
        ),
    ] = None,
) -> None:
    """List events, newest first, with filters; or follow them as they commit (--follow)."""
    swarm_id, agent_id = _uuid(swarm, "--swarm"), _uuid(agent, "--agent")
    if (from_start or after is not None) and not follow:
        raise usage_error("--from-start" if from_start else "--after", "only goes with --follow")
    if follow:
        if since is not None or hours is not None:
            raise usage_error("--since" if since is not None else "--hours", "does not go with --follow")
        if from_start and after is not None:
            raise usage_error("--after", "give --after or --from-start, not both")
        if after is not None:
            try:
                decode(after)
            except ValidationError as exc:
                raise usage_error("--after", exc.problem) from None
        stream.follow_events(
            swarm_id=swarm_id,
            agent_id=agent_id,
            types=type_,
            severity=severity.value if severity is not None else None,
            after=after,
            from_start=from_start,
            limit=limit,
            json_out=json_out,
        )
        return
    start = _since(since, hours)

    async def query(db: Database) -> Any:
        moment = start
        if isinstance(moment, dt.timedelta):  # back from the server's clock, not this machine's
            moment = await db.fetchval("SELECT now()", retry=True) - moment
        return await EventRepository(db).find_by_filter(
            swarm_id=swarm_id,
            agent_id=agent_id,
            types=type_,
            severity=severity,
            since=moment,
            limit=limit if limit is not None else 50,
            order="desc",
        )

    _list(
        query,
        ("timestamp", "type", "severity", "entity_type", "swarm_id", "agent_id", "payload"),
        "events",
        json_out,
    )


def budgets(
    swarm: Annotated[str | None, typer.Option(metavar="UUID", help="Only budgets of this swarm.")] = None,
    scope_type: Annotated[ScopeType | None, typer.Option(help="Only budgets of this scope.")] = None,
    limit: LimitOpt = 50,
    json_out: JsonOpt = False,
) -> None:
    """List budgets with allocation and consumption."""
    swarm_id = _uuid(swarm, "--swarm")
    _list(
        lambda db: BudgetRepository(db).list(scope_type=scope_type, swarm_id=swarm_id, limit=limit),
        ("id", "scope_type", "scope_id", "allocated", "consumed", "currency", "max_tokens", "used_tokens"),
        "budgets",
        json_out,
    )


def sessions(
    include_expired: Annotated[
        bool, typer.Option("--include-expired", help="Also list expired sessions.")
    ] = False,
    limit: LimitOpt = 50,
    json_out: JsonOpt = False,
) -> None:
    """List sessions, newest first (--json includes each session's tree)."""
    _list(
        lambda db: SessionRepository(db).list(include_expired=include_expired, limit=limit),
        ("id", "current_branch", "created_at", "updated_at", "expires_at", "metadata"),
        "sessions",
        json_out,
    )


def register(app: typer.Typer) -> None:
    for fn in (swarms, agents, events, budgets, sessions):
        app.command(fn.__name__, cls=DashCommand)(fn)

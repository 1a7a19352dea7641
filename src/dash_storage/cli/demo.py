"""``dash-db demo``: migrate, simulate a swarm with a live progress display, print the three views."""

from __future__ import annotations

from dataclasses import asdict
from decimal import Decimal
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dash_storage.cli.common import console, print_json, run
from dash_storage.database import Database
from dash_storage.migrations.runner import MigrationRunner
from dash_storage.simulation import DemoProgress, DemoResult, run_demo


async def _demo(
    agents: int, seconds: float, allocated: Decimal, quiet: bool
) -> tuple[DemoResult, list[str], str]:
    async with Database() as db:
        applied = await MigrationRunner(db).migrate()
        where = db.settings.target
        if quiet:
            return await run_demo(db, agents=agents, seconds=seconds, allocated=allocated), applied, where
        columns = (
            TextColumn("{task.description:<18}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console, transient=False) as bar:
            spawned = bar.add_task("agents spawned", total=agents)
            finished = bar.add_task("agents finished", total=agents)
            spend = bar.add_task("budget spent (¢)", total=int(allocated * 100))
            events = bar.add_task("events written", total=None)

            def show(p: DemoProgress) -> None:
                bar.update(spawned, completed=p.agents_spawned)
                bar.update(finished, completed=p.agents_finished)
                bar.update(spend, completed=int(p.spent * 100))
                bar.update(events, completed=p.events)

            result = await run_demo(db, agents=agents, seconds=seconds, allocated=allocated, on_progress=show)
        return result, applied, where


def _render(result: DemoResult, applied: list[str], where: str) -> None:
    _render_views(result, applied, where)
    if where == "embedded":
        console.print(
            "The embedded PostgreSQL keeps running for the next command; [bold]dash-db down[/] stops it."
        )


def _render_views(result: DemoResult, applied: list[str], where: str) -> None:
    p = result.progress
    console.print(
        f"\n[bold]Demo swarm[/] {result.swarm_id} on the {where} PostgreSQL "
        f"({len(applied)} migration(s) applied now)"
    )
    console.print(
        f"{p.events} events, {p.grants} budget grants, {p.denials} denials once the budget ran out "
        f"(spent ${p.spent:.6f} of ${p.allocated}); session {result.session_id} has branches "
        f"{', '.join(result.session_branches)}\n"
    )
    s = result.summary
    table = Table(title="swarm_summary")
    for col in ("name", "status", "running", "total agents", "allocated", "consumed", "%"):
        table.add_column(col)
    if s is not None:
        table.add_row(
            s.name,
            s.status,
            str(s.running_agents),
            str(s.total_agents),
            str(s.budget_allocated),
            str(s.budget_consumed),
            str(s.budget_percentage),
        )
    console.print(table)
    table = Table(title="agent_activity (first 15)")
    for col in ("label", "model", "status", "lifecycle", "duration s", "retries", "runtime ms"):
        table.add_column(col)
    for a in result.activity[:15]:
        table.add_row(
            a.label or "-",
            a.model or "-",
            a.status,
            a.lifecycle_state,
            f"{float(a.duration_seconds):.2f}",
            str(a.retry_count),
            str(a.runtime),
        )
    console.print(table)
    table = Table(title="event_stats_24h")
    for col in ("type", "count", "agents", "swarms", "first", "last"):
        table.add_column(col)
    for e in result.event_stats:
        table.add_row(
            e.event_type,
            str(e.event_count),
            str(e.unique_agents),
            str(e.unique_swarms),
            e.first_event.strftime("%H:%M:%S.%f")[:-3],
            e.last_event.strftime("%H:%M:%S.%f")[:-3],
        )
    console.print(table)


def demo(
    agents: Annotated[int, typer.Option(min=1, max=1000, help="How many agents to simulate.")] = 50,
    seconds: Annotated[float, typer.Option(min=0.5, max=600, help="How long the agents work.")] = 4.0,
    budget: Annotated[str, typer.Option(help="The swarm budget in USD (runs out during the demo).")] = "2.50",
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the result as JSON, no progress bars.")
    ] = False,
) -> None:
    """Migrate, simulate a swarm of agents (events, budget, pauses, a session tree), show the views."""
    try:
        allocated = Decimal(budget)
    except ArithmeticError:
        raise typer.BadParameter(f"not a number: {budget!r}", param_hint="--budget") from None
    result, applied, where = run(_demo(agents, seconds, allocated, quiet=json_out))
    if json_out:
        data: dict[str, Any] = asdict(result)
        data["migrations_applied"] = applied
        data["target"] = where
        print_json(data)
    else:
        _render(result, applied, where)

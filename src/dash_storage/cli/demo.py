"""``dash-db demo``: migrate, simulate a swarm with a live progress display, print the three views."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import asdict
from decimal import Decimal
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dash_storage.cli.common import console, print_json, run, usage_error
from dash_storage.cli.simulation import (
    MAX_AGENTS,
    MAX_SECONDS,
    MIN_SECONDS,
    DemoProgress,
    DemoResult,
    check_demo_options,
    run_demo,
)
from dash_storage.cli.tables import cell, new_table, print_table
from dash_storage.core.database import Database
from dash_storage.core.errors import ValidationError
from dash_storage.core.models import Event
from dash_storage.migrations.runner import MigrationRunner
from dash_storage.stream import Follower


async def _demo(
    agents: int, seconds: float, allocated: Decimal, quiet: bool
) -> tuple[DemoResult, list[str], str, list[Event]]:
    async with Database() as db:
        applied = await MigrationRunner(db).migrate()
        where = db.settings.target
        live: list[Event] = []
        # A follower watches the log from now, as a dashboard would: every event of the demo
        # arrives once, as its transaction commits.
        async with Follower(db) as stream:

            async def watch() -> None:
                async for event in stream:
                    live.append(event)

            watcher = asyncio.create_task(watch())
            try:
                if quiet:
                    result = await run_demo(db, agents=agents, seconds=seconds, allocated=allocated)
                else:
                    result = await _with_progress(db, agents, seconds, allocated, live)
                for _ in range(500):  # the last commits reach the follower (bounded: 5 s)
                    if sum(e.swarm_id == result.swarm_id for e in live) >= result.progress.events:
                        break
                    await asyncio.sleep(0.01)
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
        return result, applied, where, [e for e in live if e.swarm_id == result.swarm_id]


async def _with_progress(
    db: Database, agents: int, seconds: float, allocated: Decimal, live: list[Event]
) -> DemoResult:
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
        followed = bar.add_task("events followed", total=None)

        def show(p: DemoProgress) -> None:
            bar.update(spawned, completed=p.agents_spawned)
            bar.update(finished, completed=p.agents_finished)
            bar.update(spend, completed=int(p.spent * 100))
            bar.update(events, completed=p.events)
            bar.update(followed, completed=len(live))

        return await run_demo(db, agents=agents, seconds=seconds, allocated=allocated, on_progress=show)


def _render_stream(live: list[Event], written: int) -> None:
    console.print(
        f"[bold]Live stream[/]: a follower received {len(live)} of the {written} events as they "
        "committed, each once (dash-db events --follow shows them; dash-db relay copies them to Redis)."
    )
    table = new_table(
        "the last events, as they arrived",
        [("timestamp", "id"), ("type", "text"), ("severity", "text"), ("agent_id", "id")],
    )
    for e in live[-5:]:
        table.add_row(cell(e.timestamp), cell(e.type), cell(e.severity), cell(e.agent_id))
    print_table(table)


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
    table = new_table(
        "swarm_summary",
        [
            ("name", "text"),
            ("status", "text"),
            ("running", "number"),
            ("total agents", "number"),
            ("allocated", "number"),
            ("consumed", "number"),
            ("%", "number"),
        ],
    )
    if s is not None:
        table.add_row(
            *map(
                cell,
                (
                    s.name,
                    s.status,
                    s.running_agents,
                    s.total_agents,
                    s.budget_allocated,
                    s.budget_consumed,
                    s.budget_percentage,
                ),
            )
        )
    print_table(table)
    table = new_table(
        "agent_activity (first 15)",
        [
            ("label", "text"),
            ("model", "text"),
            ("status", "text"),
            ("lifecycle", "text"),
            ("duration s", "number"),
            ("retries", "number"),
            ("runtime ms", "number"),
        ],
    )
    for a in result.activity[:15]:
        table.add_row(
            *map(
                cell,
                (
                    a.label,
                    a.model,
                    a.status,
                    a.lifecycle_state,
                    f"{float(a.duration_seconds):.2f}",
                    a.retry_count,
                    a.runtime,
                ),
            )
        )
    print_table(table)
    table = new_table(
        "event_stats_24h",
        [
            ("type", "text"),
            ("count", "number"),
            ("agents", "number"),
            ("swarms", "number"),
            ("first", "id"),
            ("last", "id"),
        ],
    )
    for e in result.event_stats:
        table.add_row(
            *map(
                cell,
                (
                    e.event_type,
                    e.event_count,
                    e.unique_agents,
                    e.unique_swarms,
                    e.first_event.strftime("%H:%M:%S.%f")[:-3],
                    e.last_event.strftime("%H:%M:%S.%f")[:-3],
                ),
            )
        )
    print_table(table)


_OPTION_OF = {"agents": "--agents", "seconds": "--seconds", "allocated": "--budget"}


def demo(
    agents: Annotated[int, typer.Option(min=1, max=MAX_AGENTS, help="How many agents to simulate.")] = 50,
    seconds: Annotated[
        float, typer.Option(min=MIN_SECONDS, max=MAX_SECONDS, help="How long the agents work.")
    ] = 4.0,
    budget: Annotated[
        str,
        typer.Option(metavar="USD", help="The swarm budget in USD, above 0 (runs out during the demo)."),
    ] = "2.50",
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the result as JSON, no progress bars.")
    ] = False,
) -> None:
    """Migrate, simulate a swarm of agents (events, budget, pauses, a session tree), show the views."""
    # Every option is checked before the first write and before the progress bars start.
    try:
        agents, seconds, allocated = check_demo_options(agents, seconds, budget)
    except ValidationError as exc:
        raise usage_error(_OPTION_OF.get(exc.field, exc.field), exc.problem) from None
    result, applied, where, live = run(_demo(agents, seconds, allocated, quiet=json_out))
    if json_out:
        data: dict[str, Any] = asdict(result)
        data["migrations_applied"] = applied
        data["target"] = where
        data["events_followed_live"] = len(live)
        print_json(data)
    else:
        _render(result, applied, where)
        _render_stream(live, result.progress.events)

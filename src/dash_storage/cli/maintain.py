"""``dash-db maintain`` and ``dash-db prune``: the upkeep of the event log's partitions and rollups."""

from __future__ import annotations

from typing import Annotated

import typer

from dash_storage.cli.common import console, fail, print_json, run, usage_error
from dash_storage.core.config import load_settings, parse_duration
from dash_storage.core.database import Database
from dash_storage.core.errors import DashStorageError
from dash_storage.repositories import event_maintenance, event_partitions

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of text.")]
OlderThanOpt = Annotated[
    str | None,
    typer.Option(
        "--older-than",
        help="Drop the partitions wholly older than this (12h, 30d, 2w); default: DASH_EVENT_RETENTION.",
        show_default=False,
    ),
]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Say what would go, drop nothing.")]


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def prune(older_than: OlderThanOpt = None, dry_run: DryRunOpt = False, json_out: JsonOpt = False) -> None:
    """Drop the event partitions wholly older than the cutoff (never row by row) and their rollups.

    A partition only partly older than the cutoff stays until it is wholly older. Detaching does not
    block writers or readers.
    """
    settings = load_settings()
    if older_than is None:
        retention = settings.event_retention
        if retention is None:
            raise usage_error(
                "--older-than",
                "nothing to prune by: give --older-than (e.g. 30d) or set DASH_EVENT_RETENTION",
            )
    else:
        try:
            retention = parse_duration(older_than, "--older-than")
        except ValueError as exc:
            raise usage_error("--older-than", str(exc)) from None

    async def go() -> event_partitions.PruneReport:
        async with Database(settings) as db:
            return await event_partitions.prune(db, retention, dry_run=dry_run)

    try:
        report = run(go())
    except DashStorageError as exc:
        raise fail(str(exc)) from None
    if json_out:
        print_json(report.as_dict())
        return
    verb = "would drop" if dry_run else "dropped"
    console.print(
        f"{verb} {len(report.partitions)} partitions before {report.cutoff.isoformat()}: "
        f"{report.events:,} events, {_size(report.bytes)}",
        highlight=False,
    )
    for p in report.partitions:
        console.print(f"  {p.name}: {p.lower.isoformat()} to {p.upper.isoformat()}", highlight=False)


def maintain(json_out: JsonOpt = False) -> None:
    """The periodic upkeep of the event log: partitions a week ahead, prune past DASH_EVENT_RETENTION,
    rollups brought up to date. Safe from cron on several hosts at once (one runs, the others skip).
    """
    settings = load_settings()

    async def go() -> event_maintenance.MaintenanceReport:
        async with Database(settings) as db:
            return await event_maintenance.maintain(db, retention=settings.event_retention)

    try:
        report = run(go())
    except DashStorageError as exc:
        raise fail(str(exc)) from None
    if json_out:
        print_json(report.as_dict())
        return
    if report.skipped:
        console.print("another dash-db maintain is running; nothing done", highlight=False)
        return
    pruned = report.pruned
    console.print(
        f"partitions created: {report.partitions_created}; "
        + (
            f"pruned: {len(pruned.partitions)} partitions, {pruned.events:,} events; "
            if pruned is not None
            else "pruned: nothing (DASH_EVENT_RETENTION not set); "
        )
        + f"events rolled up: {report.rolled_up:,}",
        highlight=False,
    )

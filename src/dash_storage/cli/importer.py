"""``dash-db import-sqlite PATH``: copy a legacy Dash SQLite file into PostgreSQL.

A thin shell over :func:`dash_storage.legacy.import_sqlite`: a progress bar while it runs, then a
table of counts per table, the status mappings and the first rejects. No SQL here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from dash_storage.cli.common import console, err_console, fail, print_json, run
from dash_storage.cli.tables import print_table
from dash_storage.core.config import load_settings
from dash_storage.core.database import Database
from dash_storage.core.errors import DashStorageError
from dash_storage.legacy.importer import ImportReport, ProgressCallback
from dash_storage.legacy.importer import import_sqlite as _import_sqlite

__all__ = ["import_sqlite"]

SHOWN_REJECTS = 20


async def _run(
    path: Path,
    *,
    dry_run: bool,
    batch_size: int,
    report: Path | None,
    progress: ProgressCallback | None,
) -> ImportReport:
    # Two connections write events side by side.
    db = Database(load_settings(), postgres_min_pool_size=1, postgres_max_pool_size=2)
    try:
        return await _import_sqlite(
            db, path, dry_run=dry_run, batch_size=batch_size, progress=progress, report_path=report
        )
    finally:
        await db.close()


def import_sqlite(
    path: Annotated[Path, typer.Argument(help="The legacy SQLite file (dash.db) to import.")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Read, convert and count everything; write nothing.")
    ] = False,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, max=100_000, help="Rows per batch (one transaction each).")
    ] = 5000,
    report: Annotated[
        Path | None,
        typer.Option(
            "--report",
            help="Where to write the JSON-lines report of rejects, repairs and mappings "
            "(default: next to PATH, PATH.import-report.jsonl).",
            dir_okay=False,
        ),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")
    ] = False,
) -> None:
    """Import a legacy Dash SQLite file: swarms (with budgets), agents and events.

    Ids become deterministic UUIDs, so running it again changes nothing. Unknown statuses are
    mapped and counted; rows that cannot be imported are listed in the report file with a reason.
    """
    problem = _not_a_file(path)
    if problem:
        raise fail(f"invalid PATH: {escape(str(path))} {problem}", code=2)
    try:
        if json_out:
            result = run(_run(path, dry_run=dry_run, batch_size=batch_size, report=report, progress=None))
        else:
            result = _with_progress(path, dry_run=dry_run, batch_size=batch_size, report=report)
    except DashStorageError as exc:
        raise fail(escape(str(exc))) from None
    if json_out:
        print_json(result.to_dict())
        return
    _print_report(result)


def _not_a_file(path: Path) -> str | None:
    """Why ``path`` cannot be the legacy SQLite file, or None when it is a file."""
    if path.is_dir():
        return "is a directory; give the SQLite file in it (usually dash.db)"
    if not path.exists():
        return "does not exist (no such file)"
    if not path.is_file():
        return "is not a regular file"
    return None


def _with_progress(path: Path, *, dry_run: bool, batch_size: int, report: Path | None) -> ImportReport:
    columns = (
        TextColumn("{task.description:>8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rows"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err_console, transient=False) as bar:
        tasks: dict[str, TaskID] = {}

        def progress(table: str, done: int, total: int) -> None:
            if table not in tasks:
                tasks[table] = bar.add_task(table, total=total)
            bar.update(tasks[table], completed=done, total=total)

        return run(_run(path, dry_run=dry_run, batch_size=batch_size, report=report, progress=progress))


def _print_report(result: ImportReport) -> None:
    title = "import-sqlite (dry run: nothing written)" if result.dry_run else "import-sqlite"
    table = Table(title=title, show_header=True)
    table.add_column("table")
    for name in ("read", "written", "already present", "repaired", "rejected"):
        table.add_column(name, justify="right", no_wrap=True, overflow="fold")
    for name, counts in result.tables.items():
        table.add_row(
            name,
            str(counts.read),
            str(counts.written),
            str(counts.already_present),
            f"[yellow]{counts.repaired}[/]" if counts.repaired else "0",
            f"[red]{counts.rejected}[/]" if counts.rejected else "0",
        )
    print_table(table)

    if result.status_mappings:
        mappings = Table(title="status mappings (legacy → new)", show_header=True)
        mappings.add_column("table")
        mappings.add_column("mapping")
        mappings.add_column("rows", justify="right", no_wrap=True, overflow="fold")
        for name, entries in result.status_mappings.items():
            for key, count in entries.items():
                old, _, new = key.partition("→")
                style = "" if old.strip().lower() == new else "yellow"
                mappings.add_row(name, f"[{style}]{escape(key)}[/]" if style else escape(key), str(count))
        print_table(mappings)

    total_rejects = sum(c.rejected for c in result.tables.values())
    if total_rejects:
        rejects = Table(title=f"rejected rows (first {min(SHOWN_REJECTS, total_rejects)} of {total_rejects})")
        rejects.add_column("table")
        rejects.add_column("legacy id", no_wrap=True, overflow="fold")
        rejects.add_column("reason", overflow="fold")
        for r in result.rejects[:SHOWN_REJECTS]:
            rejects.add_row(r.table, escape(r.legacy_id or "(none)"), escape(r.reason))
        print_table(rejects)
    rate = f", {result.events_per_second:,.0f} events/s" if result.tables["events"].read else ""
    console.print(f"Done in {result.elapsed_seconds:.1f} s{rate}.", highlight=False)
    if result.report_path:
        console.print(f"Report (every reject and repair): {escape(result.report_path)}", highlight=False)
    if result.dry_run:
        console.print("[bold]Dry run:[/] nothing was written to the database.")

"""``dash-db migrate``: apply pending migrations, show their state, create a new one."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.text import Text

from dash_storage.cli.common import console, fail, print_json, run
from dash_storage.cli.help import DashCommand, DashGroup
from dash_storage.cli.tables import new_table, print_table
from dash_storage.core.config import load_settings
from dash_storage.core.database import Database
from dash_storage.core.errors import DashStorageError, ValidationError
from dash_storage.migrations import MigrationRunner, MigrationStatus, create_migration
from dash_storage.migrations.runner import check_migration_name

app = typer.Typer(
    cls=DashGroup,
    help="Apply pending migrations (no sub-command), show their state (status), or create one.",
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]

_STATE_STYLE = {"applied": "green", "pending": "yellow", "modified": "bold red", "missing": "magenta"}


async def _migrate() -> tuple[str, list[str]]:
    db = Database(load_settings())
    try:
        applied = await MigrationRunner(db).migrate()
    finally:
        await db.close()
    return db.settings.database_name(), applied


async def _status() -> list[MigrationStatus]:
    # One connection is plenty for reading the state.
    db = Database(load_settings(), postgres_min_pool_size=0, postgres_max_pool_size=1)
    try:
        return await MigrationRunner(db).status()
    finally:
        await db.close()


@app.callback(invoke_without_command=True)
def migrate(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """Apply every pending migration in name order (each in its own transaction)."""
    if ctx.invoked_subcommand is not None:
        return
    try:
        database, applied = run(_migrate())
    except DashStorageError as exc:
        raise fail(escape(str(exc))) from None
    if json_out:
        print_json({"database": database, "applied": applied})
        return
    if not applied:
        console.print(f"Nothing to do: database [bold]{database}[/] is up to date.", highlight=False)
        return
    console.print(f"Applied {len(applied)} migration(s) to [bold]{database}[/]:", highlight=False)
    for name in applied:
        console.print(f"  [green]✓[/] {name}", highlight=False)


# States that need a person: migrate status exits 1 when any migration is in one of them.
_PROBLEMS = ("modified", "missing")


@app.command("status", cls=DashCommand)
def status(json_out: JsonOpt = False) -> None:
    """List every migration: applied (with time), pending, modified or missing.

    Exits 0 when every file is applied or pending, 1 when one is modified or missing.
    """
    try:
        entries = run(_status())
    except DashStorageError as exc:
        raise fail(escape(str(exc))) from None
    counts: dict[str, int] = {}
    for e in entries:
        counts[e.state] = counts.get(e.state, 0) + 1
    if json_out:
        print_json([_as_json(e) for e in entries])
    else:
        _print_status(entries, counts)
    if any(counts.get(state) for state in _PROBLEMS):
        raise typer.Exit(1)


def _print_status(entries: list[MigrationStatus], counts: dict[str, int]) -> None:
    table = new_table("migrations", [("name", "id"), ("state", "text"), ("applied_at", "id")])
    for e in entries:
        applied_at = e.applied_at.isoformat(timespec="seconds") if e.applied_at else "-"
        table.add_row(Text(e.name), Text(e.state, style=_STATE_STYLE.get(e.state, "")), Text(applied_at))
    print_table(table)
    console.print(", ".join(f"{n} {state}" for state, n in counts.items()) or "no migrations")
    if counts.get("modified"):
        console.print(
            "[bold red]migrate refuses to run while a file is modified[/] "
            "(restore it, or put the change in a new migration)."
        )
    if counts.get("missing"):
        console.print(
            "[magenta]a missing migration was applied but its file is gone[/] "
            "(restore the file, or check DASH_MIGRATIONS_DIR)."
        )


def _as_json(entry: MigrationStatus) -> dict[str, Any]:
    data = dataclasses.asdict(entry)
    data["applied_at"] = entry.applied_at.isoformat() if entry.applied_at else None
    data["path"] = str(entry.path) if entry.path else None
    return data


@app.command("create", cls=DashCommand)
def create(
    name: Annotated[str, typer.Argument(help="What the migration does, in [a-z0-9_]+ (e.g. add_tags).")],
    directory: Annotated[
        Path | None,
        typer.Option(
            "--dir",
            metavar="FOLDER",
            help="Folder to write into (default: DASH_MIGRATIONS_DIR).",
            file_okay=False,
            dir_okay=True,
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Write a new timestamped migration file with the standard header (never overwrites)."""
    try:
        folder = directory if directory is not None else load_settings().dash_migrations_dir
        if folder is None:
            check_migration_name(name)  # a bad name is reported first, as with a folder
            raise fail(_no_folder(name), code=2)
        path = create_migration(name, folder)
    except ValidationError as exc:
        raise fail(escape(str(exc)), code=2) from None
    except DashStorageError as exc:
        raise fail(escape(str(exc))) from None
    if json_out:
        print_json({"path": str(path)})
    else:
        console.print(f"Created [bold]{escape(str(path))}[/]", highlight=False)


def _no_folder(name: str) -> str:
    return escape(
        f"no folder to write the new migration into: it would be YYYYMMDDHHMMSS_{name}.sql in "
        "DASH_MIGRATIONS_DIR, which is not set (the built-in migrations live inside the installed "
        "package and are not for your own). Choose the folder with --dir FOLDER, or set "
        "DASH_MIGRATIONS_DIR (environment or .env), the folder migrate reads your migrations from"
    )

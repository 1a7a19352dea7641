"""The ``dash-db`` command line: a thin shell over the library (it never writes SQL of its own)."""

from __future__ import annotations

import importlib.metadata
import logging
import sys
from typing import Annotated

import typer

from dash_storage.cli import demo, importer, maintain, migrate, server, stream, views
from dash_storage.cli.common import fail
from dash_storage.cli.help import DashCommand, DashGroup
from dash_storage.core.errors import DashStorageError

app = typer.Typer(
    name="dash-db",
    help="Manage the Dash PostgreSQL store: start/stop the database, migrate, import, inspect.",
    cls=DashGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command("up", cls=DashCommand)(server.up)
app.command("down", cls=DashCommand)(server.down)
app.command("doctor", cls=DashCommand)(server.doctor)
app.add_typer(migrate.app, name="migrate")
app.command("import-sqlite", cls=DashCommand)(importer.import_sqlite)
app.command("demo", cls=DashCommand)(demo.demo)
app.command("relay", cls=DashCommand)(stream.relay)
app.command("maintain", cls=DashCommand)(maintain.maintain)
app.command("prune", cls=DashCommand)(maintain.prune)
views.register(app)


def package_version() -> str:
    try:
        return importlib.metadata.version("dash-storage")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree, not installed
        return "unknown (not installed)"


def _print_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"dash-db (dash-storage) {package_version()}\n")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            is_eager=True,
            callback=_print_version,
            help="Print the version of dash-storage and exit.",
        ),
    ] = False,
) -> None:
    """Manage the Dash PostgreSQL store: start/stop the database, migrate, import, inspect."""


def _log_to_stderr() -> None:
    """Library warnings (e.g. a retried connect) as plain lines on stderr, never on stdout (--json)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("dash-db: %(message)s"))
    logger = logging.getLogger("dash_storage")
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)


def run() -> None:
    """Console-script entry point: exit 0 ok, 1 failure, 2 usage error."""
    _log_to_stderr()
    try:
        app()
    except DashStorageError as exc:
        raise SystemExit(fail(str(exc)).exit_code) from None
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    run()

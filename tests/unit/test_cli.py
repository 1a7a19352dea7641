"""The dash-db command line without a database: help, version, option checks, output helpers."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import io
from pathlib import Path
from typing import Any

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from dash_storage.cli.main import app
from dash_storage.cli.since import parse_since
from dash_storage.cli.tables import cell, kind_of, new_table

ENV = {"COLUMNS": "200", "DASH_MIGRATIONS_DIR": ""}


def _invoke(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(app, list(args), env={**ENV, **(env or {})})


def _command_paths() -> list[tuple[str, ...]]:
    paths: list[tuple[str, ...]] = [()]

    def walk(command: Any, prefix: tuple[str, ...]) -> None:
        for name, sub in getattr(command, "commands", {}).items():
            paths.append((*prefix, name))
            walk(sub, (*prefix, name))

    walk(typer.main.get_command(app), ())
    return paths


def test_every_command_is_reached() -> None:
    names = {" ".join(p) for p in _command_paths()}
    assert {"sessions", "events", "migrate status", "migrate create", "import-sqlite"} <= names


@pytest.mark.parametrize("path", _command_paths(), ids=lambda p: " ".join(p) or "dash-db")
def test_help_shows_plain_flags_and_argument_names(path: tuple[str, ...]) -> None:
    result = _invoke(*path, "--help")
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output
    assert "{" not in result.output and "}" not in result.output


def test_usage_lines_name_arguments_in_capitals() -> None:
    assert "dash-db import-sqlite [OPTIONS] PATH" in _invoke("import-sqlite", "--help").output
    assert "dash-db migrate create [OPTIONS] NAME" in _invoke("migrate", "create", "--help").output


def test_version_comes_from_the_package_metadata() -> None:
    result = _invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"dash-db (dash-storage) {importlib.metadata.version('dash-storage')}"


def test_import_sqlite_of_a_directory_is_a_usage_error(tmp_path: Path) -> None:
    result = _invoke("import-sqlite", str(tmp_path))
    assert result.exit_code == 2
    flat = " ".join(result.output.split())
    assert "is a directory" in flat and "no such file" not in flat

    missing = _invoke("import-sqlite", str(tmp_path / "nope.db"))
    assert missing.exit_code == 2
    assert "does not exist" in " ".join(missing.output.split())


def test_migrate_create_without_a_folder_says_where_and_how(tmp_path: Path) -> None:
    result = _invoke("migrate", "create", "add_tags")
    assert result.exit_code == 2
    flat = " ".join(result.output.split())
    assert "YYYYMMDDHHMMSS_add_tags.sql" in flat
    assert "--dir" in flat and "DASH_MIGRATIONS_DIR" in flat
    bad = _invoke("migrate", "create", "Add-Tags")  # the name is checked first, folder or not
    assert bad.exit_code == 2 and "Add-Tags" in bad.output


# -- --since ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "back"),
    [
        ("30s", dt.timedelta(seconds=30)),
        ("15m", dt.timedelta(minutes=15)),
        ("2h", dt.timedelta(hours=2)),
        ("1d", dt.timedelta(days=1)),
        ("1.5d", dt.timedelta(hours=36)),
        ("2w", dt.timedelta(weeks=2)),
        (" 2H ", dt.timedelta(hours=2)),
    ],
)
def test_since_durations(text: str, back: dt.timedelta) -> None:
    assert parse_since(text) == back


def test_since_timestamps_are_aware_and_utc_without_an_offset() -> None:
    assert parse_since("2026-01-31") == dt.datetime(2026, 1, 31, tzinfo=dt.UTC)
    assert parse_since("2026-01-31 09:30") == dt.datetime(2026, 1, 31, 9, 30, tzinfo=dt.UTC)
    plus_one = parse_since("2026-01-31T09:30:00+01:00")
    assert isinstance(plus_one, dt.datetime)
    assert plus_one == dt.datetime(2026, 1, 31, 8, 30, tzinfo=dt.UTC)


@pytest.mark.parametrize("text", ["", "yesterday", "15", "15x", "-2h", "2 h", "h", "1e3h", "99999999w"])
def test_since_rejects_everything_else_saying_what_is_accepted(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_since(text)
    assert "15m" in str(info.value)


# -- tables -------------------------------------------------------------------------------------


def test_cells_are_json_and_never_markup() -> None:
    assert cell({"b": [1, 2], "a": None}).plain == '{"b":[1,2],"a":null}'
    assert cell("[red]x[/]").plain == "[red]x[/]"
    assert cell(None).plain == "-"


def test_id_and_number_columns_are_never_cut_even_in_a_narrow_table() -> None:
    ident = "01a22d4a-c0be-72cd-9d4b-58b904a9dc59"
    assert kind_of([None, 2_000_000]) == "number"
    table = new_table("t", [("id", "id"), ("tokens", "number"), ("note", "text")])
    table.add_row(cell(ident), cell(2_000_000), cell("a long note " * 10))
    out = io.StringIO()
    Console(width=60, file=out).print(table)
    text = out.getvalue()
    assert ident in text and "2000000" in text and "…" not in text

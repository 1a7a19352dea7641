"""The shipped migration files, and the pure parts of the runner (no database needed)."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest

from dash_storage.core.errors import MigrationError, ValidationError
from dash_storage.migrations import (
    builtin_migrations,
    create_migration,
    discover_migrations,
    split_statements,
)
from dash_storage.migrations.runner import FILENAME_PATTERN, MigrationFile

VERSIONS = Path(__file__).resolve().parents[2] / "src" / "dash_storage" / "migrations" / "versions"


def _shipped() -> list[Path]:
    return sorted(p for p in VERSIONS.iterdir() if p.is_file())


def test_there_are_shipped_migrations() -> None:
    assert _shipped(), "no migration files in src/dash_storage/migrations/versions"


@pytest.mark.parametrize("path", _shipped(), ids=lambda p: p.name)
def test_shipped_file_name_and_header(path: Path) -> None:
    assert FILENAME_PATTERN.match(path.name), f"{path.name} is not YYYYMMDDHHMMSS_name.sql"
    stamp, name = path.stem.split("_", 1)
    moment = dt.datetime.strptime(stamp, "%Y%m%d%H%M%S")  # a real date and time
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == f"-- Migration: {name}"
    assert lines[1] == f"-- Created: {moment:%Y-%m-%dT%H:%M:%S}Z", "Created must match the file's timestamp"


def test_package_data_lists_the_same_files() -> None:
    """importlib.resources (what the runner uses) sees exactly the files in the source tree."""
    assert [f.name for f in builtin_migrations()] == [p.name for p in _shipped()]
    for f in builtin_migrations():
        assert f.source == "builtin"
        assert f.data == (VERSIONS / f.name).read_bytes()


def test_shipped_timestamps_are_unique() -> None:
    stamps = [p.name[:14] for p in _shipped()]
    assert len(stamps) == len(set(stamps))


# -- discovery ----------------------------------------------------------------------------------


def test_user_folder_joins_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "20000101000000_early.sql").write_text("SELECT 1;\n")
    (tmp_path / "20990101000000_late.sql").write_text("SELECT 1;\n")
    (tmp_path / ".gitkeep").write_text("")
    (tmp_path / "README.txt").write_text("Our own migrations.\n")  # not SQL: not a migration
    (tmp_path / "notes.txt").write_text("SELECT 1;\n")
    (tmp_path / "20990101000001_draft.sql.bak").write_text("SELECT 1;\n")
    names = [f.name for f in discover_migrations(tmp_path)]
    assert all(n.endswith(".sql") for n in names)
    assert names == sorted(names)
    assert names[0] == "20000101000000_early.sql"
    assert names[-1] == "20990101000000_late.sql"


@pytest.mark.parametrize(
    "bad",
    [
        "add_stuff.sql",
        "2026_short.sql",
        "20990101000000_Upper.sql",
        "20990101000000-x.sql",
        "20990101000000_x.SQL",
        "20990101000000_.sql",
    ],
)
def test_badly_named_user_file_is_an_error_naming_it(tmp_path: Path, bad: str) -> None:
    (tmp_path / bad).write_text("SELECT 1;\n")
    with pytest.raises(MigrationError) as info:
        discover_migrations(tmp_path)
    assert bad in str(info.value)


def test_same_name_in_both_folders_is_an_error(tmp_path: Path) -> None:
    shipped = _shipped()[0].name
    (tmp_path / shipped).write_text("SELECT 1;\n")
    with pytest.raises(MigrationError) as info:
        discover_migrations(tmp_path)
    assert shipped in str(info.value)


def test_missing_user_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(MigrationError):
        discover_migrations(tmp_path / "nope")


# -- header -------------------------------------------------------------------------------------


def _file(text: str) -> MigrationFile:
    return MigrationFile(name="20990101000000_x.sql", data=text.encode(), path=None, source="user")


def test_no_transaction_marker_only_counts_in_the_header() -> None:
    assert _file(
        "-- Migration: x\n-- dash:no-transaction\n\nCREATE INDEX CONCURRENTLY i ON t (a);\n"
    ).no_transaction
    assert _file("\n-- Migration: x\n\n--   dash:no-transaction  \nSELECT 1;\n").no_transaction
    assert not _file("-- Migration: x\nSELECT 1;\n-- dash:no-transaction\n").no_transaction
    assert not _file("-- Migration: x\n-- dash:no-transaction please not\nSELECT 1;\n").no_transaction


def test_checksum_is_sha256_of_the_bytes() -> None:
    import hashlib

    assert _file("SELECT 1;\n").checksum == hashlib.sha256(b"SELECT 1;\n").hexdigest()


# -- statement splitting (for no-transaction files) ---------------------------------------------


def test_split_statements_honours_quotes_comments_and_dollar_quotes() -> None:
    sql = (
        "-- header; with a semicolon\n"
        "CREATE TABLE t (a text DEFAULT 'x;y', \"we;ird\" int);\n"
        "/* block; /* nested; */ still; */\n"
        "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $body$ BEGIN RETURN 1; END; $body$;\n"
        "SELECT E'it\\'s; fine', $$a;b$$, 'doubled '';';\n"
        "CREATE INDEX CONCURRENTLY t_a_idx ON t (a)\n"
        "-- trailing comment only;\n"
    )
    statements = split_statements(sql)
    assert [s for _, s in statements] == [
        "-- header; with a semicolon\nCREATE TABLE t (a text DEFAULT 'x;y', \"we;ird\" int);",
        "/* block; /* nested; */ still; */\n"
        "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $body$ BEGIN RETURN 1; END; $body$;",
        "SELECT E'it\\'s; fine', $$a;b$$, 'doubled '';';",
        "CREATE INDEX CONCURRENTLY t_a_idx ON t (a)\n-- trailing comment only;",
    ]
    for offset, statement in statements:
        assert sql[offset:].startswith(statement)


def test_split_statements_drops_comment_only_chunks() -> None:
    assert split_statements("-- only a comment;\n  ;\n/* x; */\n") == []


# -- create -------------------------------------------------------------------------------------


def test_create_writes_timestamped_file_with_header(tmp_path: Path) -> None:
    moment = dt.datetime(2026, 11, 26, 12, 0, 0, tzinfo=dt.UTC)
    path = create_migration("add_tags", tmp_path, now=moment)
    assert path == tmp_path / "20261126120000_add_tags.sql"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "-- Migration: add_tags"
    assert lines[1] == "-- Created: 2026-11-26T12:00:00Z"
    assert "-- Add your SQL here" in lines
    assert FILENAME_PATTERN.match(path.name)
    # The new file is a valid migration as far as discovery is concerned.
    assert path.name in [f.name for f in discover_migrations(tmp_path)]


def test_create_uses_utc(tmp_path: Path) -> None:
    moment = dt.datetime(2026, 1, 1, 1, 30, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    path = create_migration("x", tmp_path, now=moment)
    assert path.name == "20251231233000_x.sql"


@pytest.mark.parametrize("bad", ["", "Add", "add-tags", "add tags", "../evil", "ümlaut", "a;b", "x" * 101])
def test_create_refuses_bad_names(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValidationError) as info:
        create_migration(bad, tmp_path)
    assert info.value.field == "name"
    assert list(tmp_path.iterdir()) == []


def test_create_never_overwrites(tmp_path: Path) -> None:
    moment = dt.datetime(2026, 11, 26, 12, 0, 0, tzinfo=dt.UTC)
    path = create_migration("dup", tmp_path, now=moment)
    path.write_text("-- mine\n")
    with pytest.raises(MigrationError) as info:
        create_migration("dup", tmp_path, now=moment)
    assert path.name in str(info.value)
    assert path.read_text() == "-- mine\n"


def test_create_needs_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as info:
        create_migration("x", None)
    assert "DASH_MIGRATIONS_DIR" in str(info.value)
    with pytest.raises(ValidationError):
        create_migration("x", tmp_path / "nope")


def test_filename_pattern() -> None:
    assert FILENAME_PATTERN.pattern == r"^\d{14}_[a-z0-9_]+\.sql$"
    assert re.fullmatch(FILENAME_PATTERN, "20260101000000_initial_schema.sql")

"""The migration runner and ``dash-db migrate`` against a real PostgreSQL.

Each test that changes migration state works in its own scratch database (``dash_migr_*``),
dropped afterwards, so the session's test database is never disturbed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from dash_storage.core.config import Settings
from dash_storage.core.database import Database
from dash_storage.core.errors import DatabaseUnavailableError, MigrationError
from dash_storage.migrations import MigrationRunner, builtin_migrations, create_migration
from dash_storage.migrations.runner import MigrationRunError
from tests.conftest import admin_connect, drop_database, recreate_database

SCHEMA_SQL = (files("dash_storage") / "schema.sql").read_text(encoding="utf-8")
BUILTIN = [f.name for f in builtin_migrations()]

Scratch = Callable[[], Awaitable[Database]]


@pytest.fixture
async def scratch(settings: Settings) -> AsyncIterator[Scratch]:
    """Make empty scratch databases (``dash_migr_<random>``); closed and dropped afterwards."""
    made: list[Database] = []

    async def factory() -> Database:
        name = f"dash_migr_{uuid.uuid4().hex[:12]}"
        await recreate_database(settings, name)
        db = Database(
            settings,
            postgres_db=name,
            postgres_min_pool_size=0,
            postgres_max_pool_size=3,
            dash_migrations_dir=None,
        )
        made.append(db)
        return db

    yield factory
    for db in made:
        await db.close()
        await drop_database(settings, db.settings.postgres_db)


def _write(folder: Path, name: str, body: str, *, header: str = "") -> Path:
    path = folder / name
    stem = name[15:-4]
    path.write_text(
        f"-- Migration: {stem}\n-- Created: 2099-01-01T00:00:00Z\n{header}\n{body}\n", encoding="utf-8"
    )
    return path


async def _rows(db: Database) -> list[tuple[Any, ...]]:
    return [
        tuple(r) for r in await db.fetch("SELECT id, name, applied_at, checksum FROM _migrations ORDER BY id")
    ]


async def _table_exists(db: Database, name: str) -> bool:
    return bool(await db.fetchval("SELECT to_regclass($1) IS NOT NULL", name))


# -- catalog snapshot ---------------------------------------------------------------------------

_CATALOG_QUERIES = {
    "relations": """
        SELECT c.relname, c.relkind::text, c.relpersistence::text, c.relrowsecurity
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' ORDER BY 1""",
    "columns": """
        SELECT c.relname, a.attname,
               row_number() OVER (PARTITION BY c.oid ORDER BY a.attnum) AS position,
               format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull,
               pg_get_expr(d.adbin, d.adrelid) AS default_expr, a.attidentity::text,
               a.attgenerated::text, coll.collname::text
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        LEFT JOIN pg_collation coll ON coll.oid = a.attcollation AND a.attcollation <> 0
        WHERE n.nspname = 'public' AND a.attnum > 0 AND NOT a.attisdropped
          AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
        ORDER BY 1, 2""",
    # NOT NULL constraints (catalogued from PostgreSQL 18 on) are compared by the columns query:
    # their names are generated, and the migration that rebuilt events as a partitioned table got
    # names with a suffix (the old table still held the plain ones), which no tool relies on.
    "constraints": """
        SELECT conrelid::regclass::text, conname, contype::text, pg_get_constraintdef(oid),
               condeferrable, condeferred
        FROM pg_constraint WHERE connamespace = 'public'::regnamespace AND contype <> 'n'
        ORDER BY 1, 2""",
    "indexes": """
        SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1, 2""",
    "views": """
        SELECT viewname, definition FROM pg_views WHERE schemaname = 'public' ORDER BY 1""",
    "matviews": """
        SELECT matviewname, definition FROM pg_matviews WHERE schemaname = 'public' ORDER BY 1""",
    "triggers": """
        SELECT t.tgrelid::regclass::text, t.tgname, pg_get_triggerdef(t.oid), t.tgenabled::text
        FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
        WHERE NOT t.tgisinternal AND c.relnamespace = 'public'::regnamespace ORDER BY 1, 2""",
    "functions": """
        SELECT p.proname, pg_get_function_identity_arguments(p.oid), p.prokind::text,
               CASE WHEN p.prokind IN ('f', 'p') THEN pg_get_functiondef(p.oid) END
        FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace ORDER BY 1, 2""",
    "sequences": """
        SELECT sequencename, data_type::text, start_value, min_value, max_value, increment_by, cycle,
               cache_size
        FROM pg_sequences WHERE schemaname = 'public' ORDER BY 1""",
    "types": """
        SELECT t.typname, t.typtype::text,
               ARRAY(SELECT e.enumlabel::text FROM pg_enum e WHERE e.enumtypid = t.oid
                     ORDER BY e.enumsortorder) AS labels,
               format_type(t.typbasetype, t.typtypmod) AS base
        FROM pg_type t
        WHERE t.typnamespace = 'public'::regnamespace AND t.typtype IN ('e', 'd', 'r', 'm')
        ORDER BY 1""",
    "extensions": "SELECT extname FROM pg_extension ORDER BY 1",
    "policies": """
        SELECT tablename, policyname, permissive, roles::text, cmd, qual, with_check
        FROM pg_policies WHERE schemaname = 'public' ORDER BY 1, 2""",
}


async def _catalog(db: Database) -> dict[str, list[tuple[Any, ...]]]:
    return {key: [tuple(r) for r in await db.fetch(sql)] for key, sql in _CATALOG_QUERIES.items()}


# -- tests --------------------------------------------------------------------------------------


async def test_session_database_is_migrated(database: Database) -> None:
    """The conftest session fixture migrates through MigrationRunner: everything applied."""
    entries = await MigrationRunner(database, extra_dir=None).status()
    assert [e.name for e in entries] == BUILTIN
    assert {e.state for e in entries} == {"applied"}


async def test_replayed_migrations_equal_schema_sql(scratch: Scratch) -> None:
    migrated = await scratch()
    assert await MigrationRunner(migrated).migrate() == BUILTIN
    documented = await scratch()
    await documented.execute(SCHEMA_SQL)

    got, want = await _catalog(migrated), await _catalog(documented)
    assert want["relations"], "schema.sql created nothing?"
    for key in _CATALOG_QUERIES:
        only_migrated = sorted(set(got[key]) - set(want[key]), key=repr)
        only_schema = sorted(set(want[key]) - set(got[key]), key=repr)
        assert not only_migrated and not only_schema, (
            f"{key} differ between the replayed migrations and schema.sql:\n"
            f"  only in migrations: {only_migrated}\n  only in schema.sql: {only_schema}"
        )
        assert got[key] == want[key], key


async def test_status_before_anything_is_all_pending_and_creates_nothing(scratch: Scratch) -> None:
    db = await scratch()
    entries = await MigrationRunner(db).status()
    assert [e.name for e in entries] == BUILTIN
    assert all(e.state == "pending" and e.applied_at is None and e.path is not None for e in entries)
    assert not await _table_exists(db, "_migrations")


async def test_migrate_twice_is_a_no_op(scratch: Scratch) -> None:
    db = await scratch()
    runner = MigrationRunner(db)
    assert await runner.migrate() == BUILTIN
    before = await _rows(db)
    assert [r[1] for r in before] == BUILTIN
    checksums = {f.name: f.checksum for f in builtin_migrations()}
    assert all(r[3] == checksums[r[1]] for r in before)

    assert await runner.migrate() == []
    assert await _rows(db) == before
    assert {e.state for e in await runner.status()} == {"applied"}


async def _dash_db(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dash_storage",
        *args,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _env(db: Database, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DASH_MIGRATIONS_DIR"}
    env["POSTGRES_DB"] = db.settings.postgres_db
    env["COLUMNS"] = "200"
    env.update(extra)
    return env


async def test_two_concurrent_cli_runs_apply_each_file_once(scratch: Scratch, tmp_path: Path) -> None:
    db = await scratch()
    user = tmp_path / "user"
    user.mkdir()
    # A slow user migration widens the window in which the two runners overlap.
    _write(user, "20990101000000_slow.sql", "SELECT pg_sleep(0.5);\nCREATE TABLE slow_one (id int);")
    _write(user, "20990101000001_after_slow.sql", "CREATE TABLE after_slow (id int);")
    env = _env(db, DASH_MIGRATIONS_DIR=str(user))

    results = await asyncio.gather(
        _dash_db("migrate", "--json", env=env, cwd=tmp_path),
        _dash_db("migrate", "--json", env=env, cwd=tmp_path),
    )
    for code, _out, err in results:
        assert code == 0, err
    expected = [*BUILTIN, "20990101000000_slow.sql", "20990101000001_after_slow.sql"]
    applied = [json.loads(out)["applied"] for _, out, _ in results]
    assert sorted(applied[0] + applied[1]) == sorted(expected), "each file applied by exactly one runner"

    names = [r[1] for r in await _rows(db)]
    assert names == expected  # recorded once each, in name order
    assert await _table_exists(db, "after_slow")


async def test_modified_applied_file_is_refused(scratch: Scratch, tmp_path: Path) -> None:
    db = await scratch()
    path = _write(tmp_path, "20990101000000_user_table.sql", "CREATE TABLE user_table (id int);")
    runner = MigrationRunner(db, extra_dir=tmp_path)
    assert await runner.migrate() == [*BUILTIN, path.name]

    path.write_text(path.read_text() + "ALTER TABLE user_table ADD COLUMN extra int;\n")
    _write(tmp_path, "20990101000001_next.sql", "CREATE TABLE next_one (id int);")
    states = {e.name: e.state for e in await runner.status()}
    assert states[path.name] == "modified"
    assert states["20990101000001_next.sql"] == "pending"

    rows = await _rows(db)
    with pytest.raises(MigrationError) as info:
        await runner.migrate()
    assert path.name in str(info.value)
    assert info.value.migration == path.name
    assert await _rows(db) == rows, "nothing applied while a file is modified"
    assert not await _table_exists(db, "next_one")

    code, _out, err = await _dash_db("migrate", env=_env(db, DASH_MIGRATIONS_DIR=str(tmp_path)), cwd=tmp_path)
    assert code == 1
    assert path.name in err


async def test_failing_file_rolls_back_and_keeps_earlier_ones(scratch: Scratch, tmp_path: Path) -> None:
    db = await scratch()
    _write(tmp_path, "20990101000000_good.sql", "CREATE TABLE good_one (id int);")
    bad = _write(
        tmp_path,
        "20990101000001_bad.sql",
        "CREATE TABLE bad_one (id int);\nINSERT INTO bad_one VALUES (1);\nSELEC 1;",
    )
    _write(tmp_path, "20990101000002_later.sql", "CREATE TABLE later_one (id int);")
    runner = MigrationRunner(db, extra_dir=tmp_path)

    with pytest.raises(MigrationError) as info:
        await runner.migrate()
    message = str(info.value)
    assert bad.name in message
    assert 'syntax error at or near "SELEC"' in message  # the server's own words
    assert "line 6" in message  # two header lines, the blank header line, then the body's third line
    assert info.value.migration == bad.name
    assert isinstance(info.value.__cause__, asyncpg.PostgresError)
    # The files applied before the failure stay applied, and the error says which.
    assert isinstance(info.value, MigrationRunError)
    assert info.value.applied == (*BUILTIN, "20990101000000_good.sql")
    assert "20990101000000_good.sql" in message.split("Applied before the failure")[1]

    assert await _table_exists(db, "good_one")
    assert not await _table_exists(db, "bad_one"), "the failed file must be rolled back completely"
    assert not await _table_exists(db, "later_one")
    names = [r[1] for r in await _rows(db)]
    assert names == [*BUILTIN, "20990101000000_good.sql"]
    states = {e.name: e.state for e in await runner.status()}
    assert states[bad.name] == "pending"

    # Fixed, it applies, and the rest follows.
    bad.write_text(bad.read_text().replace("SELEC 1;", "SELECT 1;"))
    assert await runner.migrate() == [bad.name, "20990101000002_later.sql"]
    assert await db.fetchval("SELECT count(*) FROM bad_one") == 1


async def test_failing_file_via_cli_exits_1_with_file_and_server_message(
    scratch: Scratch, tmp_path: Path
) -> None:
    db = await scratch()
    _write(tmp_path, "20990101000000_broken.sql", "CREATE TABLE broken_one (id int REFERENCES nowhere (id));")
    code, _out, err = await _dash_db("migrate", env=_env(db, DASH_MIGRATIONS_DIR=str(tmp_path)), cwd=tmp_path)
    assert code == 1
    flat = " ".join(err.split())
    assert "20990101000000_broken.sql" in flat
    assert 'relation "nowhere" does not exist' in flat
    # What was applied before the failure is named, so the state is known without a second look.
    applied = flat.split("Applied before the failure")[1]
    assert all(name in applied for name in BUILTIN)
    assert "20990101000000_broken.sql" not in applied


async def test_no_transaction_file_can_create_index_concurrently(scratch: Scratch, tmp_path: Path) -> None:
    db = await scratch()
    _write(tmp_path, "20990101000000_table.sql", "CREATE TABLE nt (id int, note text);")
    runner = MigrationRunner(db, extra_dir=tmp_path)
    await runner.migrate()

    # Without the marker the file runs in a transaction, which PostgreSQL refuses for CONCURRENTLY.
    plain = _write(tmp_path, "20990101000001_index.sql", "CREATE INDEX CONCURRENTLY nt_id_idx ON nt (id);")
    with pytest.raises(MigrationError) as info:
        await runner.migrate()
    assert "cannot run inside a transaction block" in str(info.value)
    assert "add the line -- dash:no-transaction to the file's header" in str(info.value)
    plain.unlink()

    marked = _write(
        tmp_path,
        "20990101000002_index.sql",
        "-- a comment; with a semicolon\nCREATE INDEX CONCURRENTLY nt_id_idx ON nt (id);\n"
        "CREATE INDEX CONCURRENTLY nt_note_idx\n    ON nt (note);\n",
        header="-- dash:no-transaction",
    )
    assert await runner.migrate() == [marked.name]
    indexes = {
        r["indexname"] for r in await db.fetch("SELECT indexname FROM pg_indexes WHERE tablename = 'nt'")
    }
    assert indexes == {"nt_id_idx", "nt_note_idx"}
    assert (await db.fetchval("SELECT checksum FROM _migrations WHERE name = $1", marked.name)) == (
        runner.files()[-1].checksum
    )
    assert await runner.migrate() == []


async def test_status_reports_missing_and_cli_json(scratch: Scratch, tmp_path: Path) -> None:
    db = await scratch()
    await MigrationRunner(db).migrate()
    await db.execute(
        "INSERT INTO _migrations (name, checksum) VALUES ($1, $2)", "20000101000000_gone.sql", "0" * 64
    )

    entries = {e.name: e for e in await MigrationRunner(db).status()}
    gone = entries["20000101000000_gone.sql"]
    assert gone.state == "missing" and gone.path is None and gone.applied_at is not None

    env = _env(db)
    # A missing file needs a person: status prints everything and exits 1, so scripts can gate on it.
    code, out, err = await _dash_db("migrate", "status", "--json", env=env, cwd=tmp_path)
    assert code == 1, err
    data = json.loads(out)
    by_name = {d["name"]: d for d in data}
    assert by_name["20000101000000_gone.sql"]["state"] == "missing"
    assert all(by_name[n]["state"] == "applied" for n in BUILTIN)
    assert dt.datetime.fromisoformat(by_name[BUILTIN[0]]["applied_at"]).tzinfo is not None

    code, out, err = await _dash_db("migrate", "status", env=env, cwd=tmp_path)
    assert code == 1, err
    assert "missing" in out and "20000101000000_gone.sql" in out and "applied" in out


async def test_cli_migrate_then_nothing_to_do(scratch: Scratch, tmp_path: Path) -> None:
    db = await scratch()
    env = _env(db)
    code, out, err = await _dash_db("migrate", env=env, cwd=tmp_path)
    assert code == 0, err
    assert BUILTIN[0] in out
    code, out, err = await _dash_db("migrate", env=env, cwd=tmp_path)
    assert code == 0, err
    assert "nothing to do" in out.lower()


async def test_cli_create(tmp_path: Path, settings: Settings) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DASH_MIGRATIONS_DIR"}
    folder = tmp_path / "m"
    folder.mkdir()

    code, _out, err = await _dash_db(
        "migrate", "create", "add_tags", "--dir", str(folder), env=env, cwd=tmp_path
    )
    assert code == 0, err
    created = list(folder.iterdir())
    assert len(created) == 1 and created[0].name.endswith("_add_tags.sql")
    lines = created[0].read_text().splitlines()
    assert lines[0] == "-- Migration: add_tags"
    assert lines[1].startswith("-- Created: ") and lines[1].endswith("Z")

    # DASH_MIGRATIONS_DIR is the default folder.
    code, _out, err = await _dash_db(
        "migrate", "create", "from_env", env={**env, "DASH_MIGRATIONS_DIR": str(folder)}, cwd=tmp_path
    )
    assert code == 0, err
    assert any(p.name.endswith("_from_env.sql") for p in folder.iterdir())

    # A bad name: usage error naming the name.
    code, _out, err = await _dash_db(
        "migrate", "create", "Add-Tags", "--dir", str(folder), env=env, cwd=tmp_path
    )
    assert code == 2
    assert "Add-Tags" in err and "name" in err
    assert len(list(folder.iterdir())) == 2

    # No folder known: a usage error that says what it would write where, and how to choose.
    code, out, err = await _dash_db("migrate", "create", "x", env=env, cwd=tmp_path)
    assert code == 2, err
    flat = " ".join(err.split())
    assert "YYYYMMDDHHMMSS_x.sql" in flat and "DASH_MIGRATIONS_DIR" in flat and "--dir" in flat
    assert out == ""

    # Never overwrite: occupy every name the command could pick in the next minute.
    start = dt.datetime.now(dt.UTC).replace(microsecond=0)
    occupied = []
    for second in range(60):
        path = folder / f"{start + dt.timedelta(seconds=second):%Y%m%d%H%M%S}_dup.sql"
        path.write_text("-- mine\n")
        occupied.append(path)
    code, _out, err = await _dash_db("migrate", "create", "dup", "--dir", str(folder), env=env, cwd=tmp_path)
    assert code == 1
    assert "_dup.sql" in err and "already exists" in " ".join(err.split())
    assert all(p.read_text() == "-- mine\n" for p in occupied)


async def test_fresh_template_and_empty_no_transaction_file_apply(scratch: Scratch, tmp_path: Path) -> None:
    db = await scratch()
    template = create_migration("nothing_yet", tmp_path)
    empty_nt = _write(
        tmp_path, "20990101000000_empty_nt.sql", "-- nothing here;", header="-- dash:no-transaction"
    )
    runner = MigrationRunner(db, extra_dir=tmp_path)
    assert await runner.migrate() == [*BUILTIN, template.name, empty_nt.name]
    assert {e.state for e in await runner.status()} == {"applied"}


async def test_bad_file_name_in_user_folder_fails_before_touching_the_database(
    scratch: Scratch, tmp_path: Path
) -> None:
    db = await scratch()
    (tmp_path / "add_stuff.sql").write_text("CREATE TABLE stuff (id int);\n")
    with pytest.raises(MigrationError) as info:
        await MigrationRunner(db, extra_dir=tmp_path).migrate()
    assert "add_stuff.sql" in str(info.value)
    assert not await _table_exists(db, "_migrations")


async def test_advisory_lock_is_released(scratch: Scratch, settings: Settings) -> None:
    db = await scratch()
    await MigrationRunner(db).migrate()
    con = await admin_connect(settings, db.settings.postgres_db)
    try:
        from dash_storage.migrations import ADVISORY_LOCK_KEY

        assert await con.fetchval("SELECT pg_try_advisory_lock($1)", ADVISORY_LOCK_KEY)
        await con.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_KEY)
    finally:
        await con.close()


async def test_status_exit_code_gates_on_modified_but_not_pending(scratch: Scratch, tmp_path: Path) -> None:
    db = await scratch()
    env = _env(db, DASH_MIGRATIONS_DIR=str(tmp_path))
    path = _write(tmp_path, "20990101000000_user_table.sql", "CREATE TABLE user_table (id int);")

    code, out, err = await _dash_db("migrate", "status", env=env, cwd=tmp_path)
    assert code == 0, err  # pending is the normal state before migrate
    assert "pending" in out

    code, _out, err = await _dash_db("migrate", env=env, cwd=tmp_path)
    assert code == 0, err
    path.write_text(path.read_text() + "-- edited after it was applied\n")

    code, out, _err = await _dash_db("migrate", "status", "--json", env=env, cwd=tmp_path)
    assert code == 1
    assert {d["name"]: d["state"] for d in json.loads(out)}[path.name] == "modified"
    code, out, _err = await _dash_db("migrate", "status", env=env, cwd=tmp_path)
    assert code == 1
    assert path.name in out and "modified" in out


async def test_files_that_are_not_sql_are_ignored(scratch: Scratch, tmp_path: Path) -> None:
    db = await scratch()
    (tmp_path / "README.txt").write_text("Our migrations. Run dash-db migrate.\n")
    (tmp_path / "notes.md").write_text("# notes\n")
    (tmp_path / "drafts").mkdir()
    mine = _write(tmp_path, "20990101000000_mine.sql", "CREATE TABLE mine (id int);")
    runner = MigrationRunner(db, extra_dir=tmp_path)
    assert await runner.migrate() == [*BUILTIN, mine.name]
    assert {e.name for e in await runner.status()} == {*BUILTIN, mine.name}
    code, _out, err = await _dash_db(
        "migrate", "status", env=_env(db, DASH_MIGRATIONS_DIR=str(tmp_path)), cwd=tmp_path
    )
    assert code == 0, err


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends: nothing listens there


@pytest.mark.parametrize("args", [("migrate",), ("migrate", "status"), ("migrate", "status", "--json")])
async def test_unreachable_server_is_named(args: tuple[str, ...], tmp_path: Path) -> None:
    port = _closed_port()
    # Nothing else to reach either: no DATABASE_URL, and no DATABASE_DIRECT_URL (of a run through a pooler).
    gone = ("DATABASE_URL", "DASH_MIGRATIONS_DIR", "DATABASE_DIRECT_URL", "POSTGRES_POOLER")
    env = {k: v for k, v in os.environ.items() if k not in gone}
    env.update(POSTGRES_HOST="127.0.0.1", POSTGRES_PORT=str(port), POSTGRES_RETRY_ATTEMPTS="0")
    code, out, err = await _dash_db(*args, env=env, cwd=tmp_path)
    assert code == 1
    assert f"cannot reach PostgreSQL at 127.0.0.1:{port}" in " ".join(err.split())
    assert out == ""


async def test_runner_names_the_server_it_cannot_reach(settings: Settings) -> None:
    port = _closed_port()
    db = Database(
        settings,
        database_url=None,
        postgres_host="127.0.0.1",
        postgres_port=port,
        postgres_retry_attempts=0,
        dash_migrations_dir=None,
        postgres_pooler="none",
        database_direct_url=None,
    )
    for call in (MigrationRunner(db).migrate, MigrationRunner(db).status):
        with pytest.raises(DatabaseUnavailableError) as info:
            await call()
        assert f"127.0.0.1:{port}" in str(info.value)

"""``dash-db up``, ``down`` and ``doctor``: where the database is and whether it answers."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import asdict
from typing import Annotated, Any

import typer

from dash_storage.cli.common import console, fail, print_json, run
from dash_storage.cli.tables import cell, new_table, print_table
from dash_storage.core.config import Settings, load_settings
from dash_storage.core.database import Database
from dash_storage.core.errors import DashStorageError
from dash_storage.migrations.runner import MigrationRunner
from dash_storage.repositories import event_maintenance
from dash_storage.server import embedded
from dash_storage.stream.cursors import stream_report

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]


def docker_available() -> bool:
    """True when a Docker engine answers (not merely when the client is installed)."""
    if shutil.which("docker") is None:
        return False
    try:
        done = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def up(json_out: JsonOpt = False) -> None:
    """Start PostgreSQL: docker compose (postgres, redis) if a Docker engine answers, else embedded."""
    settings = load_settings()
    if docker_available():
        done = subprocess.run(["docker", "compose", "up", "-d", "postgres", "redis"], check=False)
        if done.returncode != 0:
            raise fail("docker compose up failed (see its output above)")
        info: dict[str, Any] = {"mode": "docker", "connect": "POSTGRES_HOST=127.0.0.1 POSTGRES_PORT=5432"}
    else:
        server = embedded.start(settings.dash_data_dir)
        info = {
            "mode": "embedded",
            "pgdata": str(server.pgdata),
            "pid": server.pid,
            "url": server.url(settings.postgres_db),
            "connect": "leave DATABASE_URL and POSTGRES_HOST unset: dash-storage uses this server",
        }
    if json_out:
        print_json(info)
        return
    if info["mode"] == "docker":
        console.print("[green]PostgreSQL and Redis started with docker compose.[/]")
        console.print(f"Connect with: {info['connect']} (then run [bold]dash-db migrate[/])")
    else:
        console.print(f"[green]Embedded PostgreSQL running[/] (pid {info['pid']}, data in {info['pgdata']}).")
        console.print(f"psql-style URL: {info['url']}")
        console.print(
            "Leave DATABASE_URL and POSTGRES_HOST unset and dash-storage uses it; "
            "[bold]dash-db down[/] stops it."
        )


def down(json_out: JsonOpt = False) -> None:
    """Stop what dash-db up started (docker compose services, or the embedded server)."""
    settings = load_settings()
    if docker_available():
        done = subprocess.run(["docker", "compose", "down"], check=False)
        if done.returncode != 0:
            raise fail("docker compose down failed (see its output above)")
        result: dict[str, Any] = {"mode": "docker", "stopped": True}
    else:
        result = {"mode": "embedded", "stopped": embedded.stop(settings.dash_data_dir)}
    if json_out:
        print_json(result)
    elif result["mode"] == "embedded":
        console.print(
            "Embedded PostgreSQL stopped." if result["stopped"] else "Embedded PostgreSQL was not running."
        )
    else:
        console.print("docker compose services stopped.")


async def _doctor(settings: Settings) -> dict[str, Any]:
    report: dict[str, Any] = {"target": settings.target, "settings": settings.describe()}
    db = Database(settings)
    try:
        await db.initialize()
    except DashStorageError as exc:
        report["connected"] = False
        report["error"] = str(exc)
        return report
    try:
        if db.embedded_server is not None:
            report["embedded"] = {
                "pgdata": str(db.embedded_server.pgdata),
                "pid": db.embedded_server.pid,
                "socket_dir": str(db.embedded_server.socket_dir),
            }
        health = await db.health_check()
        report["connected"] = health.ok
        report["health"] = asdict(health)
        report["pool"] = asdict(db.stats())
        report["pooler"] = _pooler_state(db)
        report["migrations"] = await _migration_state(db)
        report["stream"] = await _stream_state(db)
        report["partitions"] = await _partition_state(db, settings)
        if db.replicas is not None:
            report["replicas"] = [asdict(r) for r in await db.replicas.check()]
    finally:
        await db.close()
    return report


def _pooler_state(db: Database) -> dict[str, Any]:
    """POSTGRES_POOLER, what the start-up check saw, and where session work (migrations, LISTEN) goes."""
    s = db.settings
    if s.database_direct_url is not None:
        session = f"migrations and LISTEN go to {db.describe_target(direct=True)}"
    elif db.can_hold_session:
        session = "migrations and LISTEN go where the pool goes"
    else:
        session = "no DATABASE_DIRECT_URL: migrations refuse to run, followers poll"
    return {
        "setting": s.postgres_pooler,
        "seen": db.pooler.describe() if db.pooler is not None else None,
        "named_statements": s.named_statements,
        "session_work": session,
    }


async def _stream_state(db: Database) -> dict[str, Any]:
    try:
        return await stream_report(db)
    except DashStorageError as exc:  # e.g. not migrated yet
        return {"error": str(exc)}


async def _partition_state(db: Database, settings: Settings) -> dict[str, Any]:
    try:
        return await event_maintenance.partitions_report(db, settings.event_retention)
    except DashStorageError as exc:  # e.g. not migrated yet
        return {"error": str(exc)}


def _print_partitions(p: dict[str, Any]) -> None:
    if "error" in p:
        console.print(f"events: {p['error']}", highlight=False)
        return
    size = p["total_bytes"] / 1024 / 1024
    console.print(
        f"events: {p['count']} partitions from {p['oldest']} to {p['newest']}, {size:.1f} MB, "
        f"about {p['estimated_rows']:,} rows; retention: {p['retention']}",
        highlight=False,
    )
    behind = p["rollups_behind"]
    more = "+" if behind >= p["rollups_behind_limit"] else ""
    moved = p["rollups_updated_at"] or "never"
    console.print(f"rollups: {behind:,}{more} events not rolled up yet (last moved {moved})", highlight=False)


async def _migration_state(db: Database) -> dict[str, Any]:
    try:
        runner = MigrationRunner(db)
        entries = await runner.status()
    except DashStorageError as exc:
        return {"error": str(exc)}
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry.state] = counts.get(entry.state, 0) + 1
    return counts


def _print_stream(st: dict[str, Any]) -> None:
    if "error" in st:
        console.print(f"stream: {st['error']}", highlight=False)
        return
    oldest = st["oldest_open_transaction"]
    if oldest is None:
        console.print("stream: no open transaction holds followers back", highlight=False)
    else:
        who = f"pid {oldest['pid']}, " if oldest["pid"] is not None else ""
        console.print(
            f"stream: oldest open transaction {oldest['age_s']:.1f} s old ({who}"
            f"{oldest['application'] or '-'} on {oldest['database']}, {oldest['state']}); "
            "followers wait for it",
            highlight=False,
        )
    for c in st["cursors"]:
        lag = "up to date" if not c["behind"] else f"{c['behind']} events behind"
        if c["oldest_behind_s"] is not None:
            lag += f", oldest {c['oldest_behind_s']:.1f} s old"
        console.print(f"  reader {c['name']}: {lag}", highlight=False)


def doctor(json_out: JsonOpt = False) -> None:
    """Show the configuration (secrets hidden), server version, pool, pooler, migrations, stream lag, the
    event partitions, the retention setting, the rollups' lag, and each read replica's state and lag."""
    settings = load_settings()
    report = run(_doctor(settings))
    if json_out:
        print_json(report)
    else:
        table = new_table("configuration", [("variable", "id"), ("value", "text")])
        for key, value in report["settings"].items():
            table.add_row(cell(key), cell(value))
        print_table(table)
        console.print(f"target: [bold]{report['target']}[/]")
        if "embedded" in report:
            console.print(
                f"embedded server: pid {report['embedded']['pid']}, data {report['embedded']['pgdata']}"
            )
        if report.get("connected"):
            h = report["health"]
            console.print(
                f"[green]connected[/] to {h['database']} on PostgreSQL {h['server_version']} "
                f"({h['latency_ms']:.1f} ms)"
            )
            p = report["pool"]
            console.print(
                f"pool: size {p['size']}, idle {p['idle']}, in use {p['in_use']}, "
                f"waiting {p['waiting']}, min {p['min']}, max {p['max']}"
            )
            pooler = report["pooler"]
            if pooler["setting"] != "none" or (pooler["seen"] and "sits in front" in pooler["seen"]):
                console.print(
                    f"pooler: POSTGRES_POOLER={pooler['setting']}; {pooler['seen'] or 'not checked'}; "
                    f"{pooler['session_work']}",
                    highlight=False,
                )
            m = report["migrations"]
            states = ", ".join(f"{n} {state}" for state, n in sorted(m.items()) if isinstance(n, int))
            console.print(f"migrations: {states or m.get('error', 'none')}")
            _print_stream(report["stream"])
            _print_partitions(report["partitions"])
            for r in report.get("replicas", []):
                lag = f"lag {r['lag_s']:.1f} s" if r["lag_s"] is not None else "lag unknown"
                why = f" ({r['error']})" if r["error"] else ""
                console.print(f"read replica {r['name']}: {r['state']}, {lag}{why}", highlight=False)
        else:
            console.print(f"[red]cannot connect:[/] {report.get('error', report.get('health'))}")
    if not report.get("connected"):
        raise typer.Exit(1)

"""End to end on the embedded PostgreSQL: what a newcomer gets with no server configured.

Runs the real ``dash-db`` console script in subprocesses with neither DATABASE_URL nor POSTGRES_HOST
set, so the embedded server (PostgreSQL 18 from the wheel) is started under a fresh DASH_DATA_DIR.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.embedded

ROOT = Path(__file__).resolve().parents[2]


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "DATABASE_URL", "DASH_"))}
    env["DASH_DATA_DIR"] = str(data_dir)
    env["POSTGRES_DB"] = "dash_e2e"
    return env


def dash_db(env: dict[str, str], *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dash_storage", *args],
        env=env,
        cwd=env["DASH_DATA_DIR"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def embedded_env(tmp_path_factory: pytest.TempPathFactory):
    data_dir = tmp_path_factory.mktemp("embedded")
    env = _env(data_dir)
    yield env
    dash_db(env, "down")


def test_up_doctor_migrate_demo_down(embedded_env: dict[str, str]) -> None:
    env = embedded_env
    up = dash_db(env, "up", "--json")
    assert up.returncode == 0, up.stderr
    info = json.loads(up.stdout)
    assert info["mode"] == "embedded"
    assert Path(info["pgdata"]).is_relative_to(Path(env["DASH_DATA_DIR"]))

    doctor = dash_db(env, "doctor", "--json")
    assert doctor.returncode == 0, doctor.stderr
    report = json.loads(doctor.stdout)
    assert report["target"] == "embedded"
    assert report["connected"] is True
    assert report["health"]["server_version"].startswith("18")
    assert report["health"]["database"] == "dash_e2e"
    assert report["settings"]["POSTGRES_PASSWORD"] == "***"

    migrate = dash_db(env, "migrate")
    assert migrate.returncode == 0, migrate.stderr
    status = dash_db(env, "migrate", "status", "--json")
    assert status.returncode == 0, status.stderr
    assert {m["state"] for m in json.loads(status.stdout)} == {"applied"}

    demo = dash_db(env, "demo", "--json", "--agents", "12", "--seconds", "1.5", "--budget", "0.20")
    assert demo.returncode == 0, demo.stderr
    result = json.loads(demo.stdout)
    assert result["target"] == "embedded"
    summary = result["summary"]
    assert summary["total_agents"] == 12 and summary["running_agents"] == 0
    assert 0 < float(summary["budget_consumed"]) <= 0.20
    assert result["progress"]["events"] > 12
    assert {s["event_type"] for s in result["event_stats"]} >= {"agent.spawned", "swarm.completed"}

    swarms = dash_db(env, "swarms", "--json")
    assert swarms.returncode == 0, swarms.stderr
    assert [s["id"] for s in json.loads(swarms.stdout)] == [result["swarm_id"]]

    down = dash_db(env, "down", "--json")
    assert down.returncode == 0, down.stderr
    assert json.loads(down.stdout) == {"mode": "embedded", "stopped": True}
    again = dash_db(env, "down", "--json")
    assert json.loads(again.stdout)["stopped"] is False


def test_library_starts_embedded_on_demand(embedded_env: dict[str, str]) -> None:
    """The library alone (no dash-db up first) starts or reuses the embedded server."""
    code = (
        "import asyncio\n"
        "from dash_storage import Database\n"
        "async def main():\n"
        "    async with Database() as db:\n"
        "        print(db.settings.target, await db.fetchval('SELECT current_database()'))\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=embedded_env,
        cwd=embedded_env["DASH_DATA_DIR"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["embedded", "dash_e2e"]


def test_concurrent_first_starts_all_succeed(tmp_path: Path) -> None:
    """Several commands run at once on a fresh DASH_DATA_DIR: one initialises and starts the
    server, the others wait for it, and every one creates-or-finds the database without error."""
    env = _env(tmp_path)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "dash_storage", "doctor", "--json"],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    try:
        results = [p.communicate(timeout=300) for p in procs]
        for proc, (out, err) in zip(procs, results, strict=True):
            assert proc.returncode == 0, err
            assert "asyncpg" not in err and "Traceback" not in err, err
            assert json.loads(out)["target"] == "embedded"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        dash_db(env, "down")

"""``dash-db events --follow``, ``dash-db relay --once`` and the stream part of ``dash-db doctor``,
run as a user runs them (subprocesses against the test database)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dash_storage import EventRepository
from dash_storage.core.database import Database
from dash_storage.stream import save_cursor
from tests.factories import make_swarm
from tests.redis_server import RedisServer

CMD = [sys.executable, "-m", "dash_storage"]


async def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *CMD, *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_follow_prints_json_lines_from_the_start_and_resumes_after_a_cursor(db: Database) -> None:
    swarm = await make_swarm(db, "cli-stream")
    made = await EventRepository(db).create_many([{"swarm_id": swarm, "type": f"t{i}"} for i in range(5)])
    code, out, err = await _cli(
        "events", "--follow", "--from-start", "--swarm", str(swarm), "--limit", "3", "--json"
    )
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["id"] for line in lines] == [str(e.id) for e in made[:3]]
    code, out, err = await _cli(
        "events", "--follow", "--after", lines[-1]["cursor"], "--swarm", str(swarm), "--limit", "2", "--json"
    )
    assert code == 0, err
    assert [json.loads(line)["id"] for line in out.splitlines()] == [str(e.id) for e in made[3:]]


async def test_follow_prints_events_as_they_commit_and_stops_cleanly_on_ctrl_c(db: Database) -> None:
    swarm = await make_swarm(db, "cli-stream")
    proc = await asyncio.create_subprocess_exec(
        *CMD, "events", "--follow", "--swarm", str(swarm), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        for _ in range(3000):  # until the follower is listening: it follows from now (bounded: 30 s)
            listening = await db.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN%' "
                "AND datname = current_database()",
                retry=True,
            )
            if listening:
                break
            await asyncio.sleep(0.01)
        event = await EventRepository(db).create(swarm, "live.one", payload={"n": 1})
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert b"live.one" in line and b'{"n":1}' in line
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err
    assert b"resume with --after s1." in out
    assert event.id


async def test_follow_usage_errors_exit_2(db: Database) -> None:
    for args, option in [
        (["--follow", "--after", "nope"], "--after"),
        (["--from-start"], "--from-start"),
        (["--follow", "--since", "1h"], "--since"),
        (["--follow", "--from-start", "--after", "s1.AAAAAAAAAAAAAAAAAAAAAA"], "--after"),
    ]:
        code, _out, err = await _cli("events", *args)
        assert code == 2, (args, err)
        assert option in err


async def test_relay_once_and_doctor_show_the_relay_and_the_lag(db: Database, tmp_path: Path) -> None:
    swarm = await make_swarm(db, "cli-stream")
    await EventRepository(db).create_many([{"swarm_id": swarm, "type": "t"} for _ in range(10)])
    server = RedisServer(tmp_path / "redis").start()
    try:
        env = {**os.environ, "REDIS_URL": server.url}
        code, out, err = await _cli("relay", "--once", "--json", env=env)
        assert code == 0, err
        assert json.loads(out)["relayed"] == 10
    finally:
        server.stop()
    await EventRepository(db).create_many([{"swarm_id": swarm, "type": "t"} for _ in range(4)])
    async with db.transaction() as con:  # an open transaction that holds followers back
        await con.execute("INSERT INTO events (swarm_id, type) VALUES ($1, 'open')", swarm)
        code, out, err = await _cli("doctor", "--json")
        assert code == 0, err
        stream = json.loads(out)["stream"]
        assert stream["oldest_open_transaction"] is not None
        assert {c["name"]: c["behind"] for c in stream["cursors"]}["relay:redis"] == 4
        code, out, err = await _cli("doctor")
        assert "oldest open transaction" in out and "reader relay:redis: 4 events behind" in out


@pytest.mark.parametrize("name", ["", "x" * 201])
async def test_cursor_names_are_checked(db: Database, name: str) -> None:
    from dash_storage.core.errors import ValidationError

    with pytest.raises(ValidationError, match="name"):
        await save_cursor(db, name, "s1.AAAAAAAAAAAAAAAAAAAAAA")

"""The Redis Streams relay against a real redis-server the tests start (AOF on), including a relay
killed with SIGKILL mid-stream and a Redis restart while events keep coming."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator

import orjson
import pytest
import redis.asyncio as aioredis

from dash_storage import EventRepository
from dash_storage.core.database import Database
from dash_storage.core.errors import ValidationError
from dash_storage.stream import Relay, RelayError, load_cursor, save_cursor
from dash_storage.stream.position import encode
from tests.factories import make_swarm
from tests.redis_server import RedisServer


@pytest.fixture
async def rclient(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


async def _ids(client: aioredis.Redis, key: str) -> list[str]:
    return [orjson.loads(fields["event"])["id"] for _entry_id, fields in await client.xrange(key)]


async def test_once_copies_every_event_into_the_all_and_the_swarm_streams(
    db: Database, redis_server: RedisServer, rclient: aioredis.Redis
) -> None:
    a, b = await make_swarm(db, "a"), await make_swarm(db, "b")
    repo = EventRepository(db)
    made = await repo.create_many([{"swarm_id": s, "type": "t"} for s in (a, b, a)])
    stats = await Relay(db, redis_server.url).run(once=True)
    assert stats.relayed == 3 and stats.replayed == 0
    assert await _ids(rclient, "dash:events") == [str(e.id) for e in made]
    assert await _ids(rclient, f"dash:events:{a}") == [str(made[0].id), str(made[2].id)]
    assert await _ids(rclient, f"dash:events:{b}") == [str(made[1].id)]
    assert await load_cursor(db, "relay:redis") == stats.cursor
    entry_id, fields = (await rclient.xrange("dash:events", count=1))[0]
    doc = orjson.loads(fields["event"])
    assert fields["type"] == "t" and doc["swarm_id"] == str(a) and doc["cursor"].startswith("s1.")
    assert entry_id.endswith(f"-{await db.fetchval('SELECT seq FROM events WHERE id = $1', made[0].id)}")
    again = await Relay(db, redis_server.url).run(once=True)
    assert again.relayed == 0 and await rclient.xlen("dash:events") == 3


async def test_a_replayed_write_is_refused_by_redis_not_stored_twice(
    db: Database, redis_server: RedisServer, rclient: aioredis.Redis
) -> None:
    swarm = await make_swarm(db, "relayed")
    await EventRepository(db).create_many([{"swarm_id": swarm, "type": "t"} for _ in range(50)])
    first = await Relay(db, redis_server.url).run(once=True)
    assert first.relayed == 50
    # The cursor save was "lost": the relay starts again from the beginning of the log.
    await save_cursor(db, "relay:redis", encode((0, 0)))  # type: ignore[arg-type]
    second = await Relay(db, redis_server.url).run(once=True)
    assert second.relayed == 0 and second.replayed == 50
    assert await rclient.xlen("dash:events") == 50
    assert await rclient.xlen(f"dash:events:{swarm}") == 50


async def test_a_relay_killed_with_sigkill_resumes_without_loss_or_duplicate(
    db: Database, redis_server: RedisServer, rclient: aioredis.Redis, settings: object
) -> None:
    swarm = await make_swarm(db, "relayed")
    repo = EventRepository(db)
    env = {**os.environ, "REDIS_URL": redis_server.url}
    cmd = [sys.executable, "-m", "dash_storage", "relay"]
    created: list[str] = []
    batch = [{"swarm_id": swarm, "type": "t"}] * 100
    proc = await asyncio.create_subprocess_exec(*cmd, env=env, stdout=subprocess.DEVNULL)
    try:
        for _ in range(40):
            created.extend(str(e.id) for e in await repo.create_many(batch))
            await asyncio.sleep(0.02)
        for _ in range(500):  # until the relay is part-way through
            if await rclient.xlen("dash:events") > 0:
                break
            await asyncio.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), timeout=10)
    finally:
        if proc.returncode is None:
            proc.kill()
    created.extend(str(e.id) for e in await repo.create_many(batch))
    once = await asyncio.create_subprocess_exec(
        *cmd, "--once", "--json", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _out, err = await asyncio.wait_for(once.communicate(), timeout=120)
    assert once.returncode == 0, err.decode()
    ids = await _ids(rclient, "dash:events")
    assert len(ids) == len(set(ids)), "an event was stored twice"
    assert ids == created


async def test_redis_restart_pauses_the_relay_and_nothing_is_lost(
    db: Database, redis_server: RedisServer
) -> None:
    swarm = await make_swarm(db, "relayed")
    repo = EventRepository(db)
    relay = Relay(db, redis_server.url, poll_interval=0.05)
    stop = asyncio.Event()
    running = asyncio.create_task(relay.run(stop=stop))
    created = [str(e.id) for e in await repo.create_many([{"swarm_id": swarm, "type": "t"}] * 100)]
    for _ in range(1000):  # until the first 100 are in Redis (bounded: 10 s)
        if relay.stats.relayed >= 100:
            break
        await asyncio.sleep(0.01)
    await asyncio.to_thread(redis_server.stop)
    created += [str(e.id) for e in await repo.create_many([{"swarm_id": swarm, "type": "t"}] * 100)]
    for _ in range(1000):  # until the relay has met the Redis that is gone (bounded: 10 s)
        if relay.stats.redis_outages:
            break
        await asyncio.sleep(0.01)
    await asyncio.to_thread(redis_server.start)
    created += [str(e.id) for e in await repo.create_many([{"swarm_id": swarm, "type": "t"}] * 100)]
    client = aioredis.from_url(redis_server.url, decode_responses=True)
    try:
        for _ in range(1000):
            if await client.xlen("dash:events") >= len(created):
                break
            await asyncio.sleep(0.01)
        stop.set()
        stats = await asyncio.wait_for(running, timeout=30)
        ids = await _ids(client, "dash:events")
    finally:
        await client.aclose()
    assert stats.redis_outages > 0
    assert ids == created  # the first 100 survived the restart (AOF), the rest came after it


async def test_trimming_keeps_streams_near_maxlen(
    db: Database, redis_server: RedisServer, rclient: aioredis.Redis
) -> None:
    swarm = await make_swarm(db, "relayed")
    await EventRepository(db).create_many([{"swarm_id": swarm, "type": "t"} for _ in range(3000)])
    await Relay(db, redis_server.url, maxlen=500, prefix="trim").run(once=True)
    length = await rclient.xlen("trim:events")
    assert 500 <= length < 3000


def test_bad_relay_settings_are_named(db: Database) -> None:
    with pytest.raises(ValidationError, match="prefix"):
        Relay(db, "redis://127.0.0.1:1/0", prefix="has space")
    with pytest.raises(ValidationError, match="maxlen"):
        Relay(db, "redis://127.0.0.1:1/0", maxlen=-1)


async def test_once_gives_up_on_a_redis_that_stays_away(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dash_storage.stream import relay as relay_module

    swarm = await make_swarm(db, "unrelayed")
    await EventRepository(db).create(swarm, "t")
    monkeypatch.setattr(relay_module, "ONCE_PATIENCE", 0.5)
    with pytest.raises(RelayError, match="unavailable"):
        await Relay(db, "redis://127.0.0.1:1/0").run(once=True)
    assert await load_cursor(db, "relay:redis") is None  # nothing was saved: nothing was relayed


async def test_a_stream_with_entries_the_relay_did_not_write_is_refused_not_skipped(
    db: Database, redis_server: RedisServer, rclient: aioredis.Redis
) -> None:
    swarm = await make_swarm(db, "foreign")
    await EventRepository(db).create_many([{"swarm_id": swarm, "type": "t"} for _ in range(5)])
    await rclient.xadd("dash:events", {"x": "1"}, id="99999999999-0")  # someone else's entry
    with pytest.raises(RelayError, match="did not write"):
        await Relay(db, redis_server.url).run(once=True)
    assert await load_cursor(db, "relay:redis") is None  # nothing counted as relayed


async def test_types_with_spaces_and_any_letters_arrive_whole(
    db: Database, redis_server: RedisServer, rclient: aioredis.Redis
) -> None:
    swarm = await make_swarm(db, "typed")
    kinds = ["agent step 1", "réponse reçue", "a  b", "x"]
    await EventRepository(db).create_many(
        [{"swarm_id": swarm, "type": k, "payload": {"k": k}} for k in kinds]
    )
    await Relay(db, redis_server.url).run(once=True)
    entries = await rclient.xrange("dash:events")
    assert [fields["type"] for _id, fields in entries] == kinds
    assert [orjson.loads(fields["event"])["payload"]["k"] for _id, fields in entries] == kinds

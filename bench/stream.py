"""The event stream: follower latency, catch-up speed, the Redis relay, and what the stream costs ingest.

    .venv/bin/python -m bench stream                 # full size, rewrites its section
    .venv/bin/python bench/stream.py --backlog 200000   # prints the section, smaller

1. Commit-to-follower latency at about 1,000 and about 10,000 events/s of ingest: writers pace
   create_many batches (one commit each); each event's latency is the time from its batch's commit
   acknowledgement to a follower yielding it. A follower woken by LISTEN/NOTIFY beside one that
   polls every 100 ms (what a reader without notifications, or today's find_by_filter polling, gets).
2. Catch-up: a follower reading a backlog from the start, beside raw asyncpg paging the same rows
   by (tx_id, seq) with no mark, no filters and no record building.
3. The relay into Redis (REDIS_URL, keys under a scratch prefix that is deleted afterwards), beside
   raw redis-py pipelines XADDing the same entries (no PostgreSQL read, no cursor save).
4. Ingest with the stream (its two columns, index and notify trigger) beside the same schema
   without them: create_many(1000) and an EventWriter with 64 producers, interleaved rounds.

Timings are never asserted; medians of interleaved rounds where it applies.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, scratch_database, server_version, today
from dash_storage import EventRepository, EventWriter
from dash_storage.core.database import Database
from dash_storage.core.ids import new_id
from dash_storage.stream import Follower, Relay
from dash_storage.stream.relay import entry_document

WITHOUT_STREAM = """
DROP TRIGGER events_notify ON events;
DROP INDEX events_stream_idx;
ALTER TABLE events DROP COLUMN seq, DROP COLUMN tx_id;
"""


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _swarm(db: Database) -> uuid.UUID:
    swarm = new_id()
    await db.execute("INSERT INTO swarms (id, name) VALUES ($1, 'stream bench')", swarm)
    return swarm


async def latency(db: Database, rate: int, seconds: float, *, listen: bool) -> tuple[float, float, int]:
    """Paced ingest at ``rate`` events/s for ``seconds``; p50, p99 (ms) and events followed."""
    swarm = await _swarm(db)
    repo = EventRepository(db)
    batch = max(1, rate // 100)  # 100 commits a second
    acked: dict[uuid.UUID, float] = {}
    got: dict[uuid.UUID, float] = {}
    total = int(rate * seconds)
    follower = Follower(db, swarm_id=swarm, listen=listen, poll_interval=0.1, batch_size=5000)
    async with follower:

        async def follow() -> None:
            async for event in follower:
                got[event.id] = time.perf_counter()
                if len(got) >= total:
                    return

        reader = asyncio.create_task(follow())
        started = time.perf_counter()
        for i in range(0, total, batch):
            due = started + i / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            events = await repo.create_many([{"swarm_id": swarm, "type": "bench"}] * min(batch, total - i))
            now = time.perf_counter()
            for e in events:
                acked[e.id] = now
        await asyncio.wait_for(reader, timeout=60)
    lat = [max(0.0, got[i] - acked[i]) * 1000 for i in acked]
    return pct(lat, 0.5), pct(lat, 0.99), len(got)


async def load_backlog(db: Database, n: int) -> uuid.UUID:
    swarm = await _swarm(db)
    kwargs = await db.connect_kwargs()
    con = await asyncpg.connect(**kwargs)
    try:
        step = 50_000
        for first in range(0, n, step):
            rows = [(new_id(), swarm, "backlog", f'{{"i": {i}}}') for i in range(first, min(n, first + step))]
            await con.copy_records_to_table(
                "events", records=rows, columns=["id", "swarm_id", "type", "payload"]
            )
        await con.execute("ANALYZE events")
    finally:
        await con.close()
    return swarm


async def catch_up(db: Database, n: int) -> tuple[float, float]:
    """Events/s reading the whole backlog: through a Follower, and raw keyset paging."""
    started = time.perf_counter()
    seen = 0
    async with Follower(db, from_start=True, batch_size=5000, listen=False) as follower:
        while seen < n:
            page, full, _held = await follower.read_page()
            seen += len(page)
            if not full and not page:
                break
    ours = seen / (time.perf_counter() - started)

    kwargs = await db.connect_kwargs()
    con = await asyncpg.connect(**kwargs)
    try:
        started = time.perf_counter()
        tx, seq, raw_seen = "0", 0, 0
        while True:
            rows = await con.fetch(
                "SELECT tx_id::text AS tx, seq, id, swarm_id, agent_id, type, payload, timestamp, "
                "correlation_id, parent_event_id, entity_type, severity FROM events "
                "WHERE (tx_id, seq) > ($1::text::xid8, $2) ORDER BY tx_id, seq LIMIT 5000",
                tx,
                seq,
            )
            if not rows:
                break
            raw_seen += len(rows)
            tx, seq = rows[-1]["tx"], rows[-1]["seq"]
        raw = raw_seen / (time.perf_counter() - started)
    finally:
        await con.close()
    return ours, raw


async def relay_speed(db: Database, n: int) -> tuple[float, float, str]:
    """Events/s: Relay(once) over the backlog, and raw pipelined XADDs of the same entries."""
    import redis.asyncio as aioredis

    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    url = db.settings.redis_url.get_secret_value()
    client = aioredis.from_url(url)
    try:
        await client.ping()
    except Exception as exc:  # no Redis here: say so in the report
        await client.aclose()
        return float("nan"), float("nan"), f"no Redis at REDIS_URL ({type(exc).__name__})"
    try:
        started = time.perf_counter()
        stats = await Relay(db, url, prefix=prefix, name=prefix, maxlen=0, batch_size=5000).run(once=True)
        ours = stats.relayed / (time.perf_counter() - started)

        pages: list[Any] = []
        async with Follower(db, from_start=True, batch_size=5000, listen=False) as follower:
            while True:
                page, full, _ = await follower.read_page()
                if page:
                    pages.append(page)
                if not full:
                    break
        started = time.perf_counter()
        sent = 0
        for page in pages:
            pipe = client.pipeline(transaction=False)
            for event, pos in zip(page, page.positions, strict=True):
                fields: Any = {"type": event.type, "event": entry_document(event, page.cursor)}
                pipe.xadd(f"{prefix}-raw:events", fields, id=pos.redis_id())
                pipe.xadd(f"{prefix}-raw:events:{event.swarm_id}", fields, id=pos.redis_id())
            await pipe.execute()
            sent += len(page)
        raw = sent / (time.perf_counter() - started)
        info = await client.info("server")
        return ours, raw, f"Redis {info.get('redis_version')}"
    finally:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def ingest_cost(
    with_db: Database, without_db: Database, n_rounds: int
) -> list[tuple[str, float, float]]:
    """create_many(1000) and EventWriter (64 producers) events/s, with the stream and without."""

    async def create_many(db: Database) -> float:
        swarm = await _swarm(db)
        repo = EventRepository(db)
        started = time.perf_counter()
        for _ in range(20):
            await repo.create_many([{"swarm_id": swarm, "type": "t", "payload": {"i": 1}}] * 1000)
        return 20_000 / (time.perf_counter() - started)

    async def writer(db: Database) -> float:
        swarm = await _swarm(db)
        async with EventWriter(db) as w:
            counter = iter(range(20_000))

            async def producer() -> None:
                for _ in counter:
                    await w.create(swarm, "t", payload={"i": 1})

            started = time.perf_counter()
            await asyncio.gather(*(producer() for _ in range(64)))
        return 20_000 / (time.perf_counter() - started)

    out = []
    for name, case in (("create_many(1000)", create_many), ("EventWriter, 64 producers", writer)):
        with_stream, without = [], []
        await case(with_db)
        await case(without_db)
        for _ in range(n_rounds):
            for db, results in ((with_db, with_stream), (without_db, without)):
                await db.execute("TRUNCATE events")
                results.append(await case(db))
        out.append((name, statistics.median(with_stream), statistics.median(without)))
    return out


async def run(backlog: int = 1_000_000, seconds: float = 5.0, n_rounds: int = 3) -> str:
    lines: list[str] = []
    async with scratch_database("dash_bench_stream", postgres_max_pool_size=16) as db:
        version = await server_version(db)
        lat_rows = []
        for rate in (1_000, 10_000):
            p50, p99, n = await latency(db, rate, seconds, listen=True)
            q50, q99, _ = await latency(db, rate, seconds, listen=False)
            lat_rows.append(
                f"| ~{rate:,} events/s | {n:,} | {p50:.1f} ms | {p99:.1f} ms | {q50:.1f} ms | {q99:.1f} ms |"
            )
        await db.execute("TRUNCATE events")
        await load_backlog(db, backlog)
        ours_read, raw_read = await catch_up(db, backlog)
        ours_relay, raw_relay, redis_note = await relay_speed(db, backlog)
    async with (
        scratch_database("dash_bench_stream_on", postgres_max_pool_size=16) as with_db,
        scratch_database("dash_bench_stream_off", postgres_max_pool_size=16) as without_db,
    ):
        for statement in WITHOUT_STREAM.strip().splitlines():
            await without_db.execute(statement)
        cost = await ingest_cost(with_db, without_db, n_rounds)

    lines += [
        "## The event stream",
        "",
        f"{today()}; {machine()}; PostgreSQL {version}; {redis_note}.",
        "",
        "Commit-to-follower latency (from a batch's commit acknowledgement to the follower yielding",
        f"each of its events; {seconds:.0f} s of paced create_many batches, 100 commits/s):",
        "",
        "| ingest | events followed | LISTEN p50 | LISTEN p99 | polling 100 ms p50 | polling 100 ms p99 |",
        "|---|---:|---:|---:|---:|---:|",
        *lat_rows,
        "",
        f"Catch-up over a {backlog:,}-event backlog, and the relay into Redis Streams (two XADDs an event):",
        "",
        "| reading | dash-storage | raw | ratio |",
        "|---|---:|---:|---:|",
        f"| follower from the start (pages of 5,000) | {ours_read:,.0f} events/s | "
        f"{raw_read:,.0f} events/s | {ours_read / raw_read:.2f}x |",
        f"| relay --once into Redis | {ours_relay:,.0f} events/s | {raw_relay:,.0f} events/s "
        f"| {ours_relay / raw_relay if raw_relay else float('nan'):.2f}x |",
        "",
        "What the stream costs ingest (its columns, index and notify trigger, against the same schema",
        "without them):",
        "",
        "| ingest | with the stream | without | ratio |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {a:,.0f} events/s | {b:,.0f} events/s | {a / b:.2f}x |" for name, a, b in cost),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlog", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from dash_storage.cli.common import run as run_coro

    print(run_coro(run(args.backlog, args.seconds, args.rounds)))


if __name__ == "__main__":
    main()

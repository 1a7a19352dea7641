"""Fan-out: how many followers of the event stream one PostgreSQL server carries.

    .venv/bin/python -m bench fanout                          # full size, rewrites its section
    .venv/bin/python bench/fanout.py --seconds 2 --rounds 1   # prints the section, shorter

One writer paces create_many batches (100 commits a second; about 2,000 and about 10,000 events a
second) while N followers (1, 10, 50, 100), each its own ``Follower`` with its own LISTEN
connection, each receive every event; N = 0 (the ingest alone) is what the server's CPU is compared
with. The followers run in up to four worker processes, started once and given their part of each
phase (one ``Database``, so one pool, per process and phase: the followers of a process share it,
as the followers of one service would), because 100 followers in one Python process measure that
process's CPU, not the server. Per N: the events delivered per second in total (N x ingest),
commit-to-follower latency p50/p99 (from a batch's commit acknowledgement in the writer to a
follower yielding each of its events, as bench/stream.py measures it; both sides read the machine's
monotonic clock), whether every follower got every event exactly once and in commit order, the
server connections in use, and CPU: the PostgreSQL server's (its processes' time in /proc), the
follower processes' and what the rest of the machine used meanwhile. Followers that cannot keep up
fall further behind for as long as the ingest lasts; DRAIN seconds after the last commit the phase
ends and what is still due is counted (a lag, told apart from a loss: an event missing below one a
follower did receive).

What NOTIFY costs by itself: N idle LISTEN connections (in the worker processes, counting the
notifications, reading nothing) beside the ingest alone.

The fan-out alternative: one relay (``Relay``, as ``dash-db relay`` runs it, in a process of its
own) copying the stream into Redis Streams, and N Redis readers (XREAD) in the same worker
processes instead of N PostgreSQL followers. Keys live under a scratch prefix, deleted afterwards.

The server: when this process may start one (root with ``runuser`` and an OS user ``postgres``, or
any other user, and PostgreSQL's ``pg_config``/``initdb``/``pg_ctl`` on the machine), a private
cluster of the machine's PostgreSQL with initdb's defaults and max_connections raised so that 100
LISTEN connections fit; it is stopped and removed afterwards. A private cluster also means that its
CPU is this benchmark's alone. Otherwise the configured server, where a number of followers whose
connections would not fit in what the server has free (less a margin left for everyone else) is
skipped, and the server CPU counted is that of this database's backends.

Timings are never asserted; every figure is the median of the rounds, and rounds interleave the
cases so that drift hits them alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing
import os
import pwd
import queue
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from array import array
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, scratch_database, server_version, today
from dash_storage import EventRepository
from dash_storage.cli.common import run as run_loop
from dash_storage.core.config import load_settings
from dash_storage.core.database import Database
from dash_storage.core.ids import new_id
from dash_storage.stream import Relay
from dash_storage.stream.follow import CHANNEL

RATES = (2_000, 10_000)
FOLLOWERS = (0, 1, 10, 50, 100)  # 0: the ingest alone, what the followers add to is measured against
COMMITS_PER_SECOND = 100
PROCESSES = 4  # worker processes for the followers (or Redis readers); fewer when N is smaller
POOL = 5  # pool connections of each worker process's Database, shared by its followers
ACQUIRE_TIMEOUT_MS = 60_000  # how long a follower's read may wait for one of them
PAGE = 5_000  # a follower's batch_size
MAX_CONNECTIONS = 250  # of the private cluster
MARGIN = 10  # connections left free on a shared server
DRAIN = 15.0  # seconds the followers may take after the last commit before the phase ends
OS_USER = "postgres"
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: Latency histogram: bins 1 % wide from 0.01 ms (a percentile is off by at most 1 %).
_LOW_MS = 0.01
_STEP = math.log(1.01)


# -- the server ---------------------------------------------------------------------------------


@dataclass
class Server:
    overrides: dict[str, Any]  # settings that reach it (empty: the configured server)
    postmaster: int | None  # the private cluster's postmaster (its children are the whole server)
    note: str


def _run(command: list[str], *, as_user: str | None) -> None:
    if as_user is not None:
        command = ["runuser", "-u", as_user, "--", *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-1500:]}")


def _pg_bindir() -> Path | None:
    try:
        out = subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    path = Path(out)
    return path if all((path / tool).exists() for tool in ("initdb", "pg_ctl", "postgres")) else None


def _private_unavailable() -> str | None:
    if _pg_bindir() is None:
        return "no PostgreSQL binaries (pg_config --bindir with initdb, pg_ctl)"
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            return "running as root without runuser (initdb refuses root)"
        try:
            pwd.getpwnam(OS_USER)
        except KeyError:
            return f"running as root and there is no OS user {OS_USER!r} to run the cluster"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_private(root: Path, password: str) -> tuple[int, int]:
    """initdb and start a cluster under ``root``; (port, postmaster pid)."""
    bindir = _pg_bindir()
    assert bindir is not None
    as_user = OS_USER if os.geteuid() == 0 else None
    if as_user is not None:
        entry = pwd.getpwnam(as_user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    pgdata, port = root / "pgdata", _free_port()
    pwfile = root / "pwfile"
    pwfile.write_text(password + "\n")
    if as_user is not None:
        os.chown(pwfile, entry.pw_uid, entry.pw_gid)
    _run(
        [str(bindir / "initdb"), "-D", str(pgdata), "-U", "postgres", "--pwfile", str(pwfile),
         "-A", "scram-sha-256", "--no-sync"],
        as_user=as_user,
    )  # fmt: skip
    with open(pgdata / "postgresql.conf", "a") as conf:
        conf.write(
            f"\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{root}'\n"
            f"max_connections = {MAX_CONNECTIONS}\n"
        )
    _run(
        [
            str(bindir / "pg_ctl"),
            "-D",
            str(pgdata),
            "-l",
            str(root / "server.log"),
            "-w",
            "-t",
            "60",
            "start",
        ],
        as_user=as_user,
    )
    pid = int((pgdata / "postmaster.pid").read_text().split()[0])
    return port, pid


def _stop_private(root: Path) -> None:
    bindir = _pg_bindir()
    if bindir is not None and (root / "pgdata" / "postmaster.pid").exists():
        as_user = OS_USER if os.geteuid() == 0 else None
        with contextlib.suppress(RuntimeError, subprocess.SubprocessError):
            _run(
                [str(bindir / "pg_ctl"), "-D", str(root / "pgdata"), "-m", "fast", "-w", "stop"],
                as_user=as_user,
            )
    shutil.rmtree(root, ignore_errors=True)


@asynccontextmanager
async def server() -> AsyncIterator[Server]:
    """A private cluster when one can be started here, else the configured server."""
    reason = _private_unavailable()
    if reason is not None:
        yield Server({}, None, f"the configured server ({reason} to start a private one)")
        return
    root = Path(tempfile.mkdtemp(prefix="dash_fanout_pg_"))
    password = secrets.token_hex(12)
    try:
        port, pid = await asyncio.to_thread(_start_private, root, password)
        overrides = {
            "postgres_host": "127.0.0.1",
            "postgres_port": port,
            "postgres_user": "postgres",
            "postgres_password": password,
            "database_url": None,
            "database_direct_url": None,
            "postgres_pooler": "none",
        }
        note = (
            f"a private cluster started for this run (initdb defaults, max_connections = {MAX_CONNECTIONS}, "
            "loopback TCP): its CPU is this benchmark's alone"
        )
        yield Server(overrides, pid, note)
    finally:
        await asyncio.to_thread(_stop_private, root)


# -- CPU ------------------------------------------------------------------------------------------


def _ticks(pid: int) -> int | None:
    """utime + stime of ``pid`` in clock ticks, or None when it is gone or not readable."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _children(parent: int) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                data = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            if int(data.rsplit(")", 1)[1].split()[1]) == parent:
                out.append(int(entry.name))
    return out


def cpu_sample(pids: Iterable[int]) -> dict[int, int]:
    out = {}
    for pid in pids:
        t = _ticks(pid)
        if t is not None:
            out[pid] = t
    return out


def cpu_seconds(before: dict[int, int], after: dict[int, int]) -> float:
    """CPU seconds between two samples (a process born in between counts from zero)."""
    return sum(t - before.get(pid, 0) for pid, t in after.items()) / CLK_TCK


def machine_ticks() -> tuple[int, int]:
    """(busy, total) ticks of all CPUs since boot."""
    values = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


# -- workers (processes of their own) --------------------------------------------------------------


class Track:
    """What one follower (or Redis reader) received: each event's arrival, duplicates, disorder."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.times = array("d", bytes(8 * total))
        self.seen = bytearray(total)
        self.distinct = 0
        self.duplicates = 0
        self.foreign = 0
        self.disorder = 0
        self.last_index = -1
        self.max_index = -1
        self.last_time = 0.0
        self.pages = 0  # reads that brought events
        self.reads = 0  # every page query, empty ones too

    def got(self, i: Any, now: float) -> None:
        if not isinstance(i, int) or not 0 <= i < self.total:
            self.foreign += 1
            return
        if self.seen[i]:
            self.duplicates += 1
        else:
            self.seen[i] = 1
            self.times[i] = now
            self.distinct += 1
        if i < self.last_index:
            self.disorder += 1
        self.last_index = i
        self.max_index = max(self.max_index, i)
        self.last_time = now

    @property
    def complete(self) -> bool:
        return self.distinct >= self.total


def _histogram(tracks: list[Track], acks: list[float], batch: int) -> dict[int, int]:
    hist: dict[int, int] = {}
    for t in tracks:
        times, seen = t.times, t.seen
        for i in range(t.total):
            if seen[i]:
                ms = max(0.0, times[i] - acks[i // batch]) * 1000
                b = 0 if ms <= _LOW_MS else int(math.log(ms / _LOW_MS) / _STEP) + 1
                hist[b] = hist.get(b, 0) + 1
    return hist


def percentile(hist: dict[int, int], q: float) -> float:
    n = sum(hist.values())
    if n == 0:
        return float("nan")
    rank = q * n
    seen = 0
    for b in sorted(hist):
        seen += hist[b]
        if seen > rank:
            return _LOW_MS * math.exp(_STEP * b)  # the bin's upper edge
    return _LOW_MS * math.exp(_STEP * max(hist))


async def _follow(db: Database, count: int, total: int, to_main: Any, index: int, link: Connection) -> None:
    repo = EventRepository(db)
    tracks = [Track(total) for _ in range(count)]

    async def consume(stream: Any, track: Track) -> None:
        # Count every page query (the empty re-reads too: while a transaction is open the follower
        # looks again after 2 ms, 4 ms, ...), by wrapping this follower's read_page.
        read_page = stream.read_page

        async def counted() -> Any:
            track.reads += 1
            return await read_page()

        stream.read_page = counted
        async for page in stream.pages():
            track.pages += 1
            for event in page:
                track.got(event.payload.get("i"), time.perf_counter())
            if track.complete:
                return

    async with AsyncExitStack() as stack:
        streams = [await stack.enter_async_context(repo.follow(batch_size=PAGE)) for _ in range(count)]
        await _measured(
            tracks, [consume(s, t) for s, t in zip(streams, tracks, strict=True)], to_main, index, link
        )


async def _read_redis(
    url: str, key: str, count: int, total: int, to_main: Any, index: int, link: Connection
) -> None:
    import orjson
    import redis.asyncio as aioredis

    tracks = [Track(total) for _ in range(count)]
    # redis-py gives up on a reply after 5 s by default; a reader of a saturated machine's event loop
    # may come back to its socket later than that.
    clients = [aioredis.from_url(url, socket_timeout=120) for _ in range(count)]

    async def consume(client: Any, track: Track) -> None:
        last: bytes | str = "0-0"
        while not track.complete:
            reply = await client.xread({key: last}, count=PAGE, block=500)
            for _stream, entries in reply or ():
                track.pages += 1
                now = time.perf_counter()
                for entry_id, fields in entries:
                    last = entry_id
                    track.got(orjson.loads(fields[b"event"])["payload"].get("i"), now)
                    now = time.perf_counter()

    try:
        for c in clients:
            await c.ping()
        await _measured(
            tracks, [consume(c, t) for c, t in zip(clients, tracks, strict=True)], to_main, index, link
        )
    finally:
        for c in clients:
            await c.aclose()


async def _measured(
    tracks: list[Track], consumers: list[Any], to_main: Any, index: int, link: Connection
) -> None:
    """Say ready, consume until every track is complete (or the main process says time is up),
    report CPU and the last arrival, then wait for the commit times and report latency and counts."""
    cpu0 = time.process_time()
    to_main.put(("ready", index))
    tasks = [asyncio.ensure_future(c) for c in consumers]
    everything = asyncio.gather(*tasks)
    # The main process sends "stop" when the drain time is over, then (always) the commit times.
    message = asyncio.ensure_future(asyncio.to_thread(link.recv))
    await asyncio.wait({everything, message}, return_when=asyncio.FIRST_COMPLETED)
    for t in tasks:
        t.cancel()
    await asyncio.wait(tasks)
    for t in tasks:
        failure = None if t.cancelled() else t.exception()
        if failure is not None:
            raise failure
    with contextlib.suppress(asyncio.CancelledError, Exception):
        everything.result()
    cpu = time.process_time() - cpu0
    to_main.put(("done", index, cpu, max(t.last_time for t in tracks)))
    got = await message
    if got == "stop":
        got = await asyncio.to_thread(link.recv)
    acks, batch = got
    to_main.put(
        (
            "result",
            index,
            {
                "hist": _histogram(tracks, acks, batch),
                "distinct": [t.distinct for t in tracks],
                # Missing below the furthest event received: lost. Above it: not there yet.
                "gaps": sum(t.seen[: t.max_index + 1].count(0) for t in tracks),
                "duplicates": sum(t.duplicates for t in tracks),
                "foreign": sum(t.foreign for t in tracks),
                "disorder": sum(t.disorder for t in tracks),
                "pages": sum(t.pages for t in tracks),
                "reads": sum(t.reads for t in tracks),
            },
        )
    )


async def _listen(db: Database, count: int, commits: int, to_main: Any, index: int, link: Connection) -> None:
    """``count`` connections that LISTEN and count the notifications (one per commit is owed)."""
    cons = [await db.connect() for _ in range(count)]
    got = [0] * count
    arrived = asyncio.Event()
    last = 0.0

    def counter(k: int) -> Any:
        def notified(*_: object) -> None:
            nonlocal last
            got[k] += 1
            last = time.perf_counter()
            if sum(got) >= count * commits:
                arrived.set()

        return notified

    try:
        for k, con in enumerate(cons):
            await con.add_listener(CHANNEL, counter(k))
        cpu0 = time.process_time()
        to_main.put(("ready", index))
        message = asyncio.ensure_future(asyncio.to_thread(link.recv))
        waiting = asyncio.ensure_future(arrived.wait())
        await asyncio.wait({waiting, message}, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        to_main.put(("done", index, time.process_time() - cpu0, last))
        if await message == "stop":
            await asyncio.to_thread(link.recv)
        empty = {"hist": {}, "gaps": 0, "duplicates": 0, "foreign": 0, "disorder": 0, "pages": 0, "reads": 0}
        to_main.put(("result", index, {**empty, "distinct": got}))
    finally:
        for con in cons:
            await con.close()


async def _relay(db: Database, url: str, prefix: str, to_main: Any, index: int, link: Connection) -> None:
    relay = Relay(db, url, name=prefix, prefix=prefix, maxlen=0, batch_size=PAGE)
    stop = asyncio.Event()
    cpu0 = time.process_time()
    running = asyncio.ensure_future(relay.run(stop=stop))
    await asyncio.sleep(1.0)  # listening before the first commit
    to_main.put(("ready", index))
    stopping = asyncio.ensure_future(asyncio.to_thread(link.recv))
    await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    stats = await running
    await stopping
    to_main.put(("relay", index, time.process_time() - cpu0, stats.relayed))


def _worker(index: int, to_main: Any, link: Connection) -> None:
    """A worker process: plays its part of one phase per command, until it gets None."""
    while True:
        command = link.recv()
        if command is None:
            return
        try:
            run_loop(_part(index, to_main, link, *command))
        except Exception as exc:
            to_main.put(("error", index, f"{type(exc).__name__}: {exc}"))


async def _part(
    index: int,
    to_main: Any,
    link: Connection,
    role: str,
    count: int,
    overrides: dict[str, Any],
    total: int,
    extra: str,
) -> None:
    pool = {
        "postgres_min_pool_size": 1,
        "postgres_max_pool_size": POOL if role == "pg" else 3,
        # The followers of a process queue for its pool; on a saturated machine a read may wait
        # longer than the default 5 s for a connection, and a follower stops on PoolExhaustedError.
        "postgres_connection_timeout": ACQUIRE_TIMEOUT_MS,
    }
    db = Database(load_settings(**{**overrides, **pool}))
    try:
        if role == "pg":
            await _follow(db, count, total, to_main, index, link)
        elif role == "listen":
            await _listen(db, count, total, to_main, index, link)
        elif role == "redis":
            url, key = extra.split(" ", 1)
            await _read_redis(url, key, count, total, to_main, index, link)
        else:
            url, prefix = extra.split(" ", 1)
            await _relay(db, url, prefix, to_main, index, link)
    finally:
        await db.close()


# -- one phase ------------------------------------------------------------------------------------


@dataclass
class Phase:
    rate: int
    n: int
    mode: str  # "pg" or "redis"
    ingest: float = 0.0
    delivered: float = 0.0
    p50: float = float("nan")
    p99: float = float("nan")
    exact: bool = False
    short: int = 0  # deliveries not made when the phase ended (follower x event)
    lost: int = 0  # of those, skipped: an event missing below one the follower did receive
    extra: int = 0  # duplicates, foreign events and out-of-order arrivals
    connections: int = 0
    server_cpu: float = float("nan")  # cores
    client_cpu: float = 0.0  # cores: the follower / reader processes
    relay_cpu: float = 0.0
    writer_cpu: float = 0.0  # the main process: writer and monitor
    redis_cpu: float = float("nan")
    machine_busy: float = float("nan")  # share of all cores
    others: float = float("nan")  # cores busy with everything else on the machine
    per_page: float = 0.0  # events per read that delivered some
    reads: float = 0.0  # page queries per second, all followers (empty ones too)
    processes: int = 0
    deliveries: int = 0  # owed: followers x events
    skipped: str | None = None


class Bench:
    """The writer and the measurements in this process; followers, readers and the relay in
    worker processes started once (spawned: a fresh interpreter each) and given one part per phase."""

    def __init__(self, db: Database, srv: Server, seconds: float) -> None:
        self.db = db
        self.srv = srv
        self.seconds = seconds
        self.overrides = {**srv.overrides, "postgres_db": db.settings.postgres_db}
        self.redis_url = db.settings.redis_url.get_secret_value()
        self.swarm: uuid.UUID | None = None
        self.mp = multiprocessing.get_context("spawn")
        self.to_main: Any = None
        self.procs: list[Any] = []
        self.links: list[Connection] = []
        self.early: list[tuple[Any, ...]] = []  # messages that came before they were asked for

    async def __aenter__(self) -> Bench:
        self.to_main = self.mp.Queue()
        for index in range(PROCESSES + 1):  # the last one runs the relay
            mine, theirs = self.mp.Pipe()
            p = self.mp.Process(target=_worker, args=(index, self.to_main, theirs), daemon=True)
            p.start()
            self.procs.append(p)
            self.links.append(mine)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for link in self.links:
            with contextlib.suppress(OSError):
                link.send(None)
        for p in self.procs:
            await asyncio.to_thread(p.join, 30)
            if p.is_alive():
                p.kill()

    async def receive(self, kind: str, indexes: list[int], timeout: float) -> dict[int, tuple[Any, ...]]:
        got = {m[1]: m for m in self.early if m[0] == kind}
        self.early = [m for m in self.early if m[0] != kind]
        deadline = time.monotonic() + timeout
        while len(got) < len(indexes):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"workers did not report {kind!r} in {timeout:.0f} s")
            try:
                msg = await asyncio.to_thread(self.to_main.get, True, min(left, 1.0))
            except queue.Empty:
                if any(not p.is_alive() for p in self.procs):
                    raise RuntimeError("a worker process died") from None
                continue
            if msg[0] == "error":
                raise RuntimeError(f"worker {msg[1]}: {msg[2]}")
            if msg[0] == kind:
                got[msg[1]] = msg
            else:
                self.early.append(msg)
        return got

    async def free_connections(self) -> int:
        row = await self.db.fetchrow(
            "SELECT current_setting('max_connections')::int"
            " - current_setting('superuser_reserved_connections')::int"
            " - (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend') AS free"
        )
        assert row is not None
        return int(row["free"])

    async def backends(self) -> list[int]:
        rows = await self.db.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return [int(r["pid"]) for r in rows]

    def server_pids(self, seen: set[int]) -> list[int]:
        if self.srv.postmaster is not None:
            return [self.srv.postmaster, *_children(self.srv.postmaster)]
        return sorted(seen)

    async def redis_cpu(self) -> float:
        import redis.asyncio as aioredis

        client = aioredis.from_url(self.redis_url)
        try:
            info = await client.info("cpu")
            return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
        finally:
            await client.aclose()

    async def phase(self, rate: int, n: int, mode: str) -> Phase:
        """``mode``: "pg" (N followers), "redis" (a relay and N Redis readers) or "notify" (N idle
        LISTEN connections that only count the notifications: what NOTIFY costs by itself)."""
        out = Phase(rate, n, mode)
        processes = min(n, PROCESSES)
        out.processes = processes
        needed = {"pg": n + processes * POOL, "redis": 1 + 3, "notify": n}[mode] + 8
        if not self.srv.overrides:
            free = await self.free_connections()
            if needed > free - MARGIN:
                out.skipped = f"needs about {needed} connections, the server has {free} free"
                return out
        if self.swarm is None:
            self.swarm = new_id()
            await self.db.execute("INSERT INTO swarms (id, name) VALUES ($1, 'fanout bench')", self.swarm)
        await self.db.execute("TRUNCATE events")
        batch = max(1, rate // COMMITS_PER_SECOND)
        total = int(rate * self.seconds) // batch * batch
        prefix = f"dash_fanout_{uuid.uuid4().hex[:8]}"
        readers = list(range(processes))
        relay_index = PROCESSES if mode == "redis" else None
        sizes = [n // processes + (1 if i < n % processes else 0) for i in range(processes)]
        for i in readers:
            role = {"pg": "pg", "redis": "redis", "notify": "listen"}[mode]
            owed = total // batch if mode == "notify" else total  # notifications: one per commit
            self.links[i].send((role, sizes[i], self.overrides, owed, f"{self.redis_url} {prefix}:events"))
        if relay_index is not None:
            self.links[relay_index].send(("relay", 1, self.overrides, total, f"{self.redis_url} {prefix}"))
        seen_pids: set[int] = set()
        peak = 0
        watching = True
        watcher: asyncio.Task[None] | None = None

        async def watch() -> None:
            nonlocal peak
            while watching:
                pids = await self.backends()
                seen_pids.update(pids)
                peak = max(peak, len(pids))
                await asyncio.sleep(0.25)

        try:
            await self.receive("ready", readers + ([relay_index] if relay_index is not None else []), 180)
            watcher = asyncio.create_task(watch())
            await asyncio.sleep(0.3)
            cpu0 = cpu_sample(self.server_pids(seen_pids))
            redis0 = await self.redis_cpu() if mode == "redis" else 0.0
            busy0, all0 = machine_ticks()
            own0 = time.process_time()
            acks: list[float] = []
            repo = EventRepository(self.db)
            started = time.perf_counter()
            for i in range(0, total, batch):
                due = started + i / rate
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                await repo.create_many(
                    [
                        {"swarm_id": self.swarm, "type": "fanout", "payload": {"i": k}}
                        for k in range(i, i + batch)
                    ]
                )
                acks.append(time.perf_counter())
            written = time.perf_counter()
            out.ingest = total / (written - started)

            async def time_up() -> None:
                await asyncio.sleep(DRAIN)
                for i in readers:
                    self.links[i].send("stop")

            timer = asyncio.create_task(time_up())
            done = await self.receive("done", readers, DRAIN + 60)
            timer.cancel()
            ended = time.perf_counter()
            cpu1 = cpu_sample(self.server_pids(seen_pids))
            redis1 = await self.redis_cpu() if mode == "redis" else 0.0
            busy1, all1 = machine_ticks()
            own = time.process_time() - own0
            watching = False
            await watcher
            window = ended - started
            out.connections = peak
            if self.srv.postmaster is not None or seen_pids:
                out.server_cpu = cpu_seconds(cpu0, cpu1) / window
            if mode == "redis":
                out.redis_cpu = (redis1 - redis0) / window
            out.machine_busy = (busy1 - busy0) / max(1, all1 - all0)
            out.client_cpu = sum(m[2] for m in done.values()) / window
            out.writer_cpu = own / window
            last = max((m[3] for m in done.values()), default=written)
            for i in readers:
                self.links[i].send((acks, batch))
            if relay_index is not None:
                self.links[relay_index].send("stop")
            results = await self.receive("result", readers, 120)
            if relay_index is not None:
                relay = await self.receive("relay", [relay_index], 60)
                out.relay_cpu = relay[relay_index][2] / window
            ours = out.client_cpu + out.writer_cpu + out.relay_cpu
            for part in (out.server_cpu, out.redis_cpu):
                ours += 0.0 if math.isnan(part) else part
            out.others = max(0.0, out.machine_busy * (os.cpu_count() or 1) - ours)
            hist: dict[int, int] = {}
            distinct: list[int] = []
            wrong = pages = gaps = reads = 0
            for _, _, r in results.values():
                for b, c in r["hist"].items():
                    hist[b] = hist.get(b, 0) + c
                distinct += r["distinct"]
                wrong += r["duplicates"] + r["foreign"] + r["disorder"]
                pages += r["pages"]
                reads += r.get("reads", 0)
                gaps += r["gaps"]
            out.p50, out.p99 = percentile(hist, 0.5), percentile(hist, 0.99)
            out.short = sum(total - d for d in distinct)
            out.deliveries = n * total
            out.extra = wrong
            out.lost = gaps
            out.exact = gaps == 0 and wrong == 0 and len(distinct) == n
            out.delivered = sum(distinct) / max(1e-9, last - started)
            out.per_page = sum(distinct) / max(1, pages)
            out.reads = reads / window
            if mode == "notify":  # one notification per commit to every listener, nothing more
                out.deliveries = n * len(acks)
                out.short = sum(max(0, len(acks) - d) for d in distinct)
                out.extra = sum(max(0, d - len(acks)) for d in distinct)
                out.exact = out.short == 0 and out.extra == 0 and len(distinct) == n
        finally:
            watching = False
            if watcher is not None and not watcher.done():
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            if mode == "redis":
                await self.drop_keys(prefix)
        return out

    async def drop_keys(self, prefix: str) -> None:
        import redis.asyncio as aioredis

        client = aioredis.from_url(self.redis_url)
        try:
            keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()


# -- the run ----------------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def combine(rounds: list[Phase]) -> Phase:
    """The medians of the rounds; the exactness check must hold in every round."""
    first = rounds[0]
    if first.skipped is not None:
        return first
    out = Phase(first.rate, first.n, first.mode, processes=first.processes)
    for name in (
        "ingest", "delivered", "p50", "p99", "connections", "server_cpu", "client_cpu", "relay_cpu",
        "redis_cpu", "machine_busy", "per_page", "others", "writer_cpu", "reads",
    ):  # fmt: skip
        setattr(out, name, _median([getattr(r, name) for r in rounds]))
    out.exact = all(r.exact for r in rounds)
    out.short = sum(r.short for r in rounds)
    out.lost = sum(r.lost for r in rounds)
    out.extra = sum(r.extra for r in rounds)
    out.deliveries = sum(r.deliveries for r in rounds)
    return out


def _ms(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:,.0f} ms" if value >= 100 else f"{value:.1f} ms"


def _cores(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def _check(p: Phase, rounds: int) -> str:
    if not p.exact:
        return f"**no**: {p.lost:,} skipped, {p.extra:,} duplicated, foreign or out of order"
    if p.short:
        late = p.short / p.deliveries
        return (
            f"no loss, no duplicate, in order; overloaded: {late:.0%} of the deliveries were still due "
            f"{DRAIN:.0f} s after the last commit"
        )
    return f"yes ({rounds}/{rounds} rounds)"


def _above(p: Phase, alone: Phase | None) -> float:
    """PostgreSQL CPU (cores) above the ingest alone, whose share is scaled to the ingest this phase
    reached (a writer that fell behind committed less)."""
    if alone is None or alone is p or math.isnan(p.server_cpu) or math.isnan(alone.server_cpu):
        return float("nan")
    if not alone.ingest:
        return float("nan")
    return p.server_cpu - alone.server_cpu * (p.ingest / alone.ingest)


def _server(p: Phase, alone: Phase | None) -> str:
    if math.isnan(p.server_cpu):
        return "-"
    above = _above(p, alone)
    return f"{p.server_cpu:.2f}" if math.isnan(above) else f"{p.server_cpu:.2f} ({above:+.2f})"


def _keeps_up(p: Phase) -> str:
    """Whether the followers kept pace with the ingest this phase reached (else their backlog grew
    all along); "ingest reached" says whether the writer kept the pace asked for."""
    if p.n == 0 or not p.ingest:
        return "-"
    wanted = p.n * p.ingest
    return "yes" if p.delivered >= 0.95 * wanted else f"**no** ({p.delivered / wanted:.0%})"


def _summary(pg: list[Phase], relayed: list[Phase], notify: list[Phase]) -> list[str]:
    """What the tables say, in sentences computed from them."""
    out = []
    alone = {p.rate: p for p in pg if p.n == 0 and p.skipped is None}
    for rate in sorted({p.rate for p in pg}):
        rows = [p for p in pg if p.rate == rate and p.n > 0 and p.skipped is None]
        kept = [p.n for p in rows if _keeps_up(p) == "yes"]
        most = max(rows, key=lambda p: p.delivered, default=None)
        if most is None:
            continue
        kept_text = (
            f"up to {max(kept)} follower{'s' if max(kept) > 1 else ''} kept pace"
            if kept
            else "no number of followers kept pace"
        )
        paced = [p.n for p in rows if p.ingest >= 0.95 * rate]
        if paced:
            kept_text += f", and the writer kept the pace asked for with up to {max(paced)} beside it"
        out.append(
            f"- ~{rate:,} events/s: {kept_text}; the most delivered was {most.delivered:,.0f} events/s "
            f"(N = {most.n}), with the follower processes at {most.client_cpu:.2f} cores, PostgreSQL at "
            f"{most.server_cpu:.2f} and the rest of the machine at {most.others:.2f}."
        )
    for p in relayed:
        same = next((q for q in pg if q.rate == p.rate and q.n == p.n and q.skipped is None), None)
        if same is not None:
            out.append(
                f"- ~{p.rate:,} events/s to {p.n} readers: the relay delivered {p.delivered:,.0f} events/s "
                f"(p50 {_ms(p.p50)}) on {p.connections:.0f} PostgreSQL connections, against "
                f"{same.delivered:,.0f} events/s (p50 {_ms(same.p50)}) on {same.connections:.0f} for "
                f"{same.n} followers."
            )
    followers = [p for p in pg if p.n > 0 and p.skipped is None and p.delivered]
    per_k = [p.client_cpu / p.delivered * 1e6 for p in followers]
    if per_k:
        cost = statistics.median(per_k)
        out.append(
            f"- Client side: the follower processes spent {cost:.1f} ms of CPU per 1,000 deliveries"
            f" (median of the rows; {min(per_k):.1f} to {max(per_k):.1f}): one client core delivers about"
            f" {1e6 / cost:,.0f} events/s."
        )
    per_read, per_follower, reads_each = [], [], []
    for p in followers:
        above = _above(p, alone.get(p.rate))
        reads = p.reads
        if _keeps_up(p) == "yes" and not math.isnan(above) and reads:
            per_read.append(above / reads * 1e6)
            per_follower.append(above / p.n)
            reads_each.append(reads / p.n)
    if per_read:
        out.append(
            f"- Server side, in the rows whose followers kept pace: a follower's read cost PostgreSQL about"
            f" {statistics.median(per_read):,.0f} µs of CPU above the ingest alone"
            f" ({', '.join(f'{c:,.0f}' for c in per_read)} µs), and a follower about"
            f" {statistics.median(per_follower):.3f} of a server core"
            f" ({', '.join(f'{c:.3f}' for c in per_follower)}), reading"
            f" {', '.join(f'{r:.0f}' for r in reads_each)} times a second ({COMMITS_PER_SECOND} commits/s"
            " asked for; the empty re-reads while a transaction is still open count)."
        )
    for p in notify:
        above = _above(p, alone.get(p.rate))
        if p.skipped is None and p.delivered and not math.isnan(above):
            out.append(
                f"- NOTIFY: {p.n} idle LISTEN connections (reading nothing) added {above:+.2f} server cores"
                f" ({COMMITS_PER_SECOND} commits/s asked for), {above / p.delivered * 1e6:,.0f} µs per"
                f" notification delivered ({p.delivered:,.0f}/s; every listener got one per commit: "
                f"{'yes' if p.exact else 'no'})."
            )
    biggest = max(followers, key=lambda p: p.n, default=None)
    if biggest is not None:
        out.append(
            f"- Connections: {biggest.n} followers held {biggest.connections:.0f} server connections (a"
            f" LISTEN connection each, plus {POOL} pooled per worker process); PostgreSQL's default"
            " max_connections is 100."
        )
    return out


async def _redis_note(url: str) -> str | None:
    """The Redis version, or None when there is no Redis at REDIS_URL."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)
    try:
        info = await client.info("server")
        return f"Redis {info.get('redis_version')}"
    except Exception:  # no Redis here: the relay rows are left out
        return None
    finally:
        await client.aclose()


async def run(
    seconds: float = 3.0,
    rounds: int = 3,
    rates: tuple[int, ...] = RATES,
    followers: tuple[int, ...] = FOLLOWERS,
    relay: bool = True,
) -> str:
    cases: list[tuple[int, int, str]] = [(rate, n, "pg") for rate in rates for n in followers]
    found: dict[tuple[int, int, str], list[Phase]] = {}
    started = time.monotonic()
    async with server() as srv:
        async with scratch_database("dash_fanout_bench", postgres_max_pool_size=4, **srv.overrides) as db:
            version = await server_version(db)
            max_conn = await db.fetchval("SELECT current_setting('max_connections')")
            redis = await _redis_note(db.settings.redis_url.get_secret_value())
            if redis is not None and relay:
                cases += [(rate, max(followers), "redis") for rate in rates]
            if max(followers) > 0:
                cases.append((rates[0], max(followers), "notify"))
            async with Bench(db, srv, seconds) as bench:
                for r in range(rounds):
                    for case in cases if r % 2 == 0 else cases[::-1]:
                        phase = await bench.phase(*case)
                        found.setdefault(case, []).append(phase)
                        print(
                            f"round {r + 1}/{rounds} {case}: p50 {phase.p50:.1f} ms p99 {phase.p99:.1f} ms"
                            f" delivered {phase.delivered:,.0f}/s exact {phase.exact} short {phase.short:,}"
                            f" server {phase.server_cpu:.2f} followers {phase.client_cpu:.2f}"
                            f" others {phase.others:.2f} ({time.monotonic() - started:.0f} s)",
                            flush=True,
                        )
    took = time.monotonic() - started
    pg = [combine(found[c]) for c in cases if c[2] == "pg"]
    relayed = [combine(found[c]) for c in cases if c[2] == "redis"]
    notify = [combine(found[c]) for c in cases if c[2] == "notify"]

    lines = [
        "## Fan-out: followers of the event stream on one server",
        "",
        f"{today()}; {machine()}; PostgreSQL {version} on {srv.note}; max_connections {max_conn}"
        f"{'; ' + redis if redis else ''}. The benchmark, its writer, the followers, the server and"
        " Redis share the machine's cores with whatever else runs on it: the numbers are noisy; each is"
        f" the median of {rounds} interleaved rounds ({took / 60:.0f} min in all).",
        "",
        f"One writer commits create_many batches 100 times a second for {seconds:.0f} s; N followers"
        " (`events.follow()`, each with its own LISTEN connection, pages of"
        f" {PAGE:,}) in min(N, {PROCESSES}) worker processes, one `Database` per process (pool of at most"
        f" {POOL}, shared by that process's followers), each receive every event. Latency: from a batch's"
        " commit acknowledgement in the writer to a follower yielding each of its events. Delivered:"
        " follower-events per second from the first commit to the last delivery. Connections: the"
        " peak of this database's backends during the phase (LISTEN + pools + the writer). Keeps up: the"
        " followers delivered N x the ingest reached (the writer, on the same cores, may itself fall"
        " short of the pace asked for). CPU in cores"
        " (1.00 = one core busy): the PostgreSQL server's processes (in brackets: above the ingest alone,"
        " whose figure is scaled to the ingest each phase reached), the follower processes, and what"
        " the rest of the machine used meanwhile (other engineers' work; the machine's busy time less"
        " this benchmark's processes, the server's and Redis's).",
        "",
        "| ingest | followers | ingest reached | delivered (N x ingest) | keeps up | p50 | p99"
        " | each follower got every event once, in order | server connections | page reads/s (all / with"
        " events) | events per read with events | PostgreSQL CPU (vs ingest alone) | follower CPU"
        " | follower CPU per 1,000 deliveries | rest of the machine |",
        "|---|---:|---:|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    alone = {p.rate: p for p in pg if p.n == 0 and p.skipped is None}
    for p in pg:
        if p.skipped is not None:
            lines.append(f"| ~{p.rate:,}/s | {p.n} | skipped: {p.skipped} |||||||||||||")
            continue
        if p.n == 0:
            lines.append(
                f"| ~{p.rate:,}/s | 0 (ingest alone) | {p.ingest:,.0f}/s | - | - | - | - | - "
                f"| {p.connections:.0f} | - | - | {_server(p, None)} | - | - | {_cores(p.others)} |"
            )
            continue
        useful = p.delivered / p.per_page if p.per_page else 0.0
        per_k = p.client_cpu / p.delivered * 1e6 if p.delivered else float("nan")
        lines.append(
            f"| ~{p.rate:,}/s | {p.n} | {p.ingest:,.0f}/s | {p.delivered:,.0f}/s | {_keeps_up(p)} "
            f"| {_ms(p.p50)} | {_ms(p.p99)} | {_check(p, rounds)} | {p.connections:.0f} "
            f"| {p.reads:,.0f} / {useful:,.0f} "
            f"| {p.per_page:,.0f} | {_server(p, alone.get(p.rate))} | {_cores(p.client_cpu)} | {_ms(per_k)} "
            f"| {_cores(p.others)} |"
        )
    if relayed:
        lines += [
            "",
            "The alternative: one relay (`Relay`, as `dash-db relay` runs it, in a process of its own)"
            " copying the stream into Redis Streams, and N Redis readers (XREAD BLOCK, one connection"
            " each, decoding each entry's JSON) in the same worker processes instead of N followers."
            " Latency is from the commit acknowledgement to a reader holding the entry.",
            "",
            "| ingest | readers | ingest reached | delivered (N x ingest) | keeps up | p50 | p99"
            " | each reader got every event once, in order | PostgreSQL connections"
            " | PostgreSQL CPU (vs ingest alone) | relay CPU | Redis CPU | reader CPU"
            " | reader CPU per 1,000 deliveries | rest of the machine |",
            "|---|---:|---:|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for p in relayed:
            per_k = p.client_cpu / p.delivered * 1e6 if p.delivered else float("nan")
            lines.append(
                f"| ~{p.rate:,}/s | {p.n} | {p.ingest:,.0f}/s | {p.delivered:,.0f}/s | {_keeps_up(p)} "
                f"| {_ms(p.p50)} | {_ms(p.p99)} | {_check(p, rounds)} | {p.connections:.0f} "
                f"| {_server(p, alone.get(p.rate))} | {_cores(p.relay_cpu)} | {_cores(p.redis_cpu)} "
                f"| {_cores(p.client_cpu)} | {_ms(per_k)} | {_cores(p.others)} |"
            )
    lines += [
        "",
        "What the rows say (computed from them; the NOTIFY line comes from a phase of N idle LISTEN"
        " connections in the worker processes that only count notifications, beside the ingest alone):",
        "",
        *_summary(pg, relayed, notify),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rates", type=int, nargs="+", default=list(RATES))
    parser.add_argument("--followers", type=int, nargs="+", default=list(FOLLOWERS))
    parser.add_argument("--no-relay", action="store_true", help="leave out the Redis relay rows")
    args = parser.parse_args()
    text = run(args.seconds, args.rounds, tuple(args.rates), tuple(args.followers), not args.no_relay)
    print(run_loop(text))


if __name__ == "__main__":
    main()

"""OpenTelemetry spans and metrics, exported to the real SDK's in-memory exporter and metric reader,
from calls against the real test database (faults included: a backend terminated mid-statement, pooled
connections the server ended while idle)."""

from __future__ import annotations

import asyncio
import datetime as dt
import http.server
import json
import re
import threading
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from dash_storage import (
    AgentRepository,
    BudgetRepository,
    EventRepository,
    EventWriter,
    SessionRepository,
    SwarmRepository,
    Telemetry,
)
from dash_storage.core.config import Settings
from dash_storage.core.database import Database
from dash_storage.core.errors import ConfigurationError, NotFoundError, ValidationError
from dash_storage.repositories.budget_batcher import combiner_for
from dash_storage.stream import Follower, Relay
from tests.conftest import ROOT, TEST_DB, MakeDatabase, admin_connect
from tests.fresh_python import run_fresh
from tests.integration.test_server_ended_connections import Killer, fill_pool
from tests.redis_server import RedisServer

NEEDLE = "needle-7d1f"  # in every value the tests send: it must never reach an attribute


class Otel:
    """An SDK tracer provider exporting to memory, and a meter provider read on demand."""

    def __init__(self, *, query_text: bool = False) -> None:
        self.exporter = InMemorySpanExporter()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meters = MeterProvider(metric_readers=[self.reader])
        self.telemetry = Telemetry(tracer_provider, self.meters, query_text=query_text)

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if name is None or s.name == name]

    def span(self, name: str) -> ReadableSpan:
        found = self.spans(name)
        assert len(found) == 1, f"{len(found)} spans named {name!r}: {[s.name for s in self.spans()]}"
        return found[0]

    def points(self, metric: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        out: list[Any] = []
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                for m in scope.metrics:
                    if m.name == metric:
                        out.extend(m.data.data_points)
        return out

    def value(self, metric: str, **attributes: Any) -> Any:
        """The one data point of ``metric`` whose attributes include ``attributes``."""
        found = [p for p in self.points(metric) if attributes.items() <= dict(p.attributes).items()]
        assert len(found) == 1, f"{len(found)} points of {metric} with {attributes}"
        return found[0]


@pytest.fixture
def otel() -> Otel:
    return Otel()


@pytest.fixture
async def tdb(db: Database, make_database: MakeDatabase, otel: Otel) -> Database:
    """A Database with telemetry on the emptied test database."""
    return await make_database(telemetry=otel.telemetry)


def server_of(settings: Settings) -> dict[str, Any]:
    if settings.target == "embedded":
        return {}
    return {"server.address": settings.postgres_host, "server.port": settings.postgres_port}


def every_attribute(otel: Otel) -> Iterator[tuple[str, Any]]:
    """Every attribute of every span, span event and metric data point."""
    for span in otel.spans():
        yield from (span.attributes or {}).items()
        for event in span.events:
            yield from (event.attributes or {}).items()
        assert span.status.description is None  # an error's message may quote input
    data = otel.reader.get_metrics_data()
    for resource in data.resource_metrics if data is not None else ():
        for scope in resource.scope_metrics:
            for m in scope.metrics:
                for p in m.data.data_points:
                    yield from dict(p.attributes).items()


# -- spans ------------------------------------------------------------------------------------------


async def test_each_repository_call_is_one_client_span_named_by_the_database_conventions(
    tdb: Database, otel: Otel, settings: Settings
) -> None:
    swarms, agents, sessions = SwarmRepository(tdb), AgentRepository(tdb), SessionRepository(tdb)
    budgets, events = BudgetRepository(tdb), EventRepository(tdb)
    swarm = await swarms.create("s")
    assert (await swarms.find_by_id(swarm.id)) == swarm
    await swarms.update_status(swarm.id, "active")
    agent = await agents.create(swarm.id, model="m")
    await agents.update_status(agent.id, "running")
    await agents.pause(agent.id, "ops")
    session = await sessions.create(metadata={"a": 1})
    await sessions.merge_metadata(session.id, {"b": 2})
    assert await sessions.delete(session.id)
    budget = await budgets.create("swarm", swarm.id, allocated=10)
    assert await budgets.consume_budget(budget.id, 1, "0.5")  # calls try_consume: still one span
    await budgets.get_usage(budget.id)
    await events.create(swarm.id, "t")
    await events.create_many([{"swarm_id": swarm.id, "type": "u"}] * 3)
    assert await events.count(swarm_id=swarm.id) == 4

    expected = {
        ("swarms", "create"): 1,
        ("swarms", "find_by_id"): 1,
        ("swarms", "update_status"): 1,
        ("agents", "create"): 1,
        ("agents", "update_status"): 1,
        ("agents", "pause"): 1,
        ("sessions", "create"): 1,
        ("sessions", "merge_metadata"): 1,
        ("sessions", "delete"): 1,
        ("budgets", "create"): 1,
        ("budgets", "consume_budget"): 1,
        ("budgets", "get_usage"): 1,
        ("events", "create"): 1,
        ("events", "create_many"): 1,
        ("events", "count"): 1,
    }
    seen: dict[tuple[str, str], int] = {}
    for span in otel.spans():
        a = dict(span.attributes or {})
        key = (a["db.collection.name"], a["db.operation.name"])
        seen[key] = seen.get(key, 0) + 1
        assert span.name == f"{key[1]} {key[0]}"
        assert span.kind is SpanKind.CLIENT
        assert span.status.status_code is StatusCode.UNSET
        assert a["db.system.name"] == "postgresql"
        assert a["db.namespace"] == TEST_DB
        assert server_of(settings).items() <= a.items()
        assert "db.query.text" not in a  # only when asked for
        assert span.parent is None  # no span of ours inside another
    assert seen == expected
    # Every call's duration, by operation, as the conventions' histogram.
    assert otel.value("db.client.operation.duration", **{"db.operation.name": "pause"}).count == 1


async def test_a_plain_database_leaves_repositories_untouched(db: Database, tdb: Database) -> None:
    assert db.telemetry is None and db.policy.observer is None
    plain, traced = SwarmRepository(db), SwarmRepository(tdb)
    assert type(plain) is SwarmRepository
    assert plain.create.__func__ is SwarmRepository.create  # type: ignore[attr-defined]
    assert isinstance(traced, SwarmRepository) and type(traced) is not SwarmRepository
    assert traced.create.__func__ is not SwarmRepository.create  # type: ignore[attr-defined]
    assert traced.create.__doc__ == SwarmRepository.create.__doc__


async def test_no_parameter_value_user_or_password_reaches_any_attribute(
    db: Database, make_database: MakeDatabase, settings: Settings
) -> None:
    if settings.target == "embedded" or settings.database_url is not None:
        pytest.skip("needs a server named by POSTGRES_HOST, to name it again with a DATABASE_URL")
    otel = Otel(query_text=True)
    secret = f"pw-{NEEDLE}"
    url = (
        f"postgresql://{settings.postgres_user}:{secret}@{settings.postgres_host}:{settings.postgres_port}"
        f"/{TEST_DB}"
    )
    try:
        tdb = await make_database(database_url=url, telemetry=otel.telemetry)
    except ConfigurationError:
        pytest.skip("needs a server that accepts any password (trust authentication)")
    swarms, events = SwarmRepository(tdb), EventRepository(tdb)
    swarm = await swarms.create(f"name-{NEEDLE}", config={"k": f"config-{NEEDLE}"})
    assert await swarms.find_by_name(f"name-{NEEDLE}") == swarm
    await events.create(swarm.id, f"type-{NEEDLE}", payload={"p": f"payload-{NEEDLE}"})
    await events.find_by_filter(swarm_id=swarm.id, types=[f"type-{NEEDLE}"])
    budget = await BudgetRepository(tdb).create("swarm", swarm.id, allocated=5)
    await BudgetRepository(tdb).try_consume(budget.id, 1, "1", f"key-{NEEDLE}")
    with pytest.raises(ValidationError):
        await swarms.update_status(swarm.id, f"status-{NEEDLE}")  # the message quotes the value
    await SessionRepository(tdb).create(metadata={"m": f"meta-{NEEDLE}"})

    attributes = list(every_attribute(otel))
    assert attributes
    for key, value in attributes:
        assert "user" not in key and "password" not in key, key
        text = str(value)
        assert NEEDLE not in text, (key, text)
        assert "://" not in text, (key, text)
    # The statements are there (asked for with query_text), parameterized: $1, never the values.
    noted = otel.span("find_by_name swarms").attributes or {}
    assert "$1" in str(noted["db.query.text"])
    assert dict(otel.span("create swarms").attributes or {})["server.address"] == settings.postgres_host


async def test_a_failed_call_is_an_error_span_with_its_type_and_sqlstate(tdb: Database, otel: Otel) -> None:
    swarms, agents = SwarmRepository(tdb), AgentRepository(tdb)
    missing = "00000000-0000-7000-8000-000000000001"
    with pytest.raises(NotFoundError):
        await agents.create(missing, model="m")
    with pytest.raises(ValidationError):
        await swarms.find_by_id("not-a-uuid")

    failed = otel.span("create agents")
    assert failed.status.status_code is StatusCode.ERROR
    a = dict(failed.attributes or {})
    assert a["error.type"] == "dash_storage.core.errors.NotFoundError"
    assert a["db.response.status_code"] == "23503"  # the foreign key the server refused
    assert not failed.events  # no exception event: its message would carry the id
    invalid = dict(otel.span("find_by_id swarms").attributes or {})
    assert invalid["error.type"] == "dash_storage.core.errors.ValidationError"
    assert "db.response.status_code" not in invalid  # refused before reaching the server
    point = otel.value("db.client.operation.duration", **{"error.type": a["error.type"]})
    assert point.count == 1


# -- retries and replays ---------------------------------------------------------------------------


async def test_a_retry_is_an_event_on_the_span_and_a_count(
    tdb: Database, otel: Otel, settings: Settings
) -> None:
    swarms = SwarmRepository(tdb)
    swarm = await swarms.create("kept")
    admin = await admin_connect(settings, TEST_DB)
    try:
        lock = admin.transaction()
        await lock.start()
        await admin.execute("LOCK TABLE swarms IN ACCESS EXCLUSIVE MODE")
        read = asyncio.create_task(swarms.find_by_id(swarm.id))
        pid = None
        for _ in range(500):  # until the read waits on the lock: it has been sent
            await asyncio.sleep(0.01)
            pid = await admin.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'dash-storage' AND wait_event_type = 'Lock'"
            )
            if pid:
                break
        assert pid, "the read never waited on the lock"
        await admin.execute("SELECT pg_terminate_backend($1)", pid)
        await lock.rollback()
        assert await read == swarm  # retried on a fresh connection
    finally:
        await admin.close()

    span = otel.span("find_by_id swarms")
    retries = [e for e in span.events if e.name == "dash.retry"]
    assert len(retries) == 1
    event = dict(retries[0].attributes or {})
    assert event["dash.retry.operation"] == "query" and event["dash.retry.attempt"] == 2
    assert event["error.type"] == "dash_storage.core.errors.ConnectionLostError"
    assert span.status.status_code is StatusCode.UNSET  # the call succeeded in the end
    assert otel.value("dash.db.client.retries", **{"dash.retry.operation": "query"}).value == 1


@pytest.mark.direct_server("it ends a pooled connection's own server process")
async def test_a_connection_the_server_ended_while_idle_is_a_replay_event(
    database: Database, make_database: MakeDatabase, otel: Otel
) -> None:
    killer = Killer(await database.connect_kwargs())
    try:
        if not killer.sees_processes:
            pytest.skip("needs a superuser on a Linux server, to see when a terminated backend has exited")
        tdb = await make_database(
            postgres_min_pool_size=2, postgres_max_pool_size=4, telemetry=otel.telemetry
        )
        swarms = SwarmRepository(tdb)
        swarm = await swarms.create("kept")
        await fill_pool(tdb)
        assert killer.kill() >= 2
        assert await swarms.find_by_id(swarm.id) == swarm
    finally:
        killer.close()

    span = otel.span("find_by_id swarms")
    replays = [dict(e.attributes or {}) for e in span.events if e.name == "dash.replay"]
    assert replays and all(r["dash.replay.reason"] == "idle" for r in replays)
    assert not [e for e in span.events if e.name == "dash.retry"]  # nothing was sent: no retry
    counted = otel.value("dash.db.client.replays", **{"dash.replay.reason": "idle"}).value
    assert counted == len(replays)


# -- metrics ----------------------------------------------------------------------------------------


async def test_pool_metrics_follow_connections_in_use_idle_and_waiting(
    db: Database, make_database: MakeDatabase, otel: Otel
) -> None:
    tdb = await make_database(postgres_min_pool_size=1, postgres_max_pool_size=3, telemetry=otel.telemetry)

    def observed() -> tuple[int, int, int]:
        return (
            otel.value("db.client.connection.count", **{"db.client.connection.state": "used"}).value,
            otel.value("db.client.connection.count", **{"db.client.connection.state": "idle"}).value,
            otel.value("db.client.connection.pending_requests").value,
        )

    assert otel.value("db.client.connection.max").value == 3
    pool_name = dict(otel.value("db.client.connection.max").attributes)["db.client.connection.pool.name"]
    assert pool_name.endswith(f"/{TEST_DB}")
    release = asyncio.Event()
    holding = 0

    async def hold() -> None:
        nonlocal holding
        async with tdb.acquire():
            holding += 1
            await release.wait()

    async def settle(until: Any) -> None:
        for _ in range(1000):
            if until():
                return
            await asyncio.sleep(0.001)
        raise AssertionError("the pool never reached the expected state")

    holders = [asyncio.create_task(hold()) for _ in range(2)]
    await settle(lambda: holding == 2)
    assert observed() == (2, tdb.stats().idle, 0) and tdb.stats().in_use == 2
    holders += [asyncio.create_task(hold()) for _ in range(2)]  # the pool has room for one of them
    await settle(lambda: holding == 3 and tdb.stats().waiting == 1)
    assert observed() == (3, 0, 1)
    release.set()
    await asyncio.gather(*holders)
    assert observed() == (0, tdb.stats().idle, 0) and tdb.stats().idle == 3


async def test_the_budget_combiner_records_the_size_of_every_batch(tdb: Database, otel: Otel) -> None:
    swarm = await SwarmRepository(tdb).create("hot")
    budgets = BudgetRepository(tdb)
    budget = await budgets.create("swarm", swarm.id, allocated=1000)
    combiner = combiner_for(tdb)
    batches, requests = combiner.batches, combiner.requests
    results = await asyncio.gather(*(budgets.try_consume(budget.id, 1, "1") for _ in range(60)))
    assert all(r.granted for r in results)

    point = otel.value("dash.budget.consume.batch.size")
    assert point.count == combiner.batches - batches
    assert point.sum == combiner.requests - requests == 60
    assert point.max > 1  # concurrent consumes of one budget went together
    usage = await budgets.get_usage(budget.id)
    assert usage is not None and usage.cost == Decimal(60)


async def test_the_event_writer_records_the_size_of_every_batch(tdb: Database, otel: Otel) -> None:
    swarm = await SwarmRepository(tdb).create("busy")
    async with EventWriter(tdb) as writer:
        await asyncio.gather(*(writer.create(swarm.id, "t", payload={"i": i}) for i in range(100)))
        await writer.create(swarm.id, "alone")

    point = otel.value("dash.event.writer.batch.size")
    # Each batch is one transaction: the stored events tell how many batches there were.
    transactions = await tdb.fetchval("SELECT count(DISTINCT tx_id) FROM events")
    assert (point.count, point.sum) == (transactions, 101)
    assert point.max > 1 and point.min == 1


async def next_page(follower: Follower) -> list[Any]:
    """The next page with events (a transaction open elsewhere on the server may hold them back)."""
    for _ in range(3000):
        page, _full, _held = await follower.read_page()
        if page:
            return list(page)
        await asyncio.sleep(0.01)
    raise AssertionError("no events came: a transaction held the stream back for 30 s")


async def test_follower_lag_is_the_age_of_the_newest_event_of_a_page(tdb: Database, otel: Otel) -> None:
    swarm = await SwarmRepository(tdb).create("followed")
    events = EventRepository(tdb)
    hour_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    # One transaction, so one page; the backfilled event is the last of it in stream order.
    await events.create_many(
        [{"swarm_id": swarm.id, "type": "new"}, {"swarm_id": swarm.id, "type": "old", "timestamp": hour_ago}]
    )
    follower = Follower(tdb, from_start=True, listen=False)
    assert [e.type for e in await next_page(follower)] == ["new", "old"]
    lag = otel.value("dash.stream.follower.lag")
    assert lag.count == 1 and lag.min >= 3600  # this page's newest event is an hour old

    await events.create(swarm.id, "fresh")
    assert [e.type for e in await next_page(follower)] == ["fresh"]
    lag = otel.value("dash.stream.follower.lag")
    assert lag.count == 2 and lag.min < 3600  # a fresh event is younger than the backfilled one
    page, _full, _held = await follower.read_page()  # nothing new: no page, nothing recorded
    assert not page and otel.value("dash.stream.follower.lag").count == 2


async def test_relay_lag_is_recorded_once_redis_has_each_page(
    tdb: Database, otel: Otel, redis_server: RedisServer
) -> None:
    swarm = await SwarmRepository(tdb).create("relayed")
    await EventRepository(tdb).create_many([{"swarm_id": swarm.id, "type": "t"}] * 5)
    stats = await Relay(tdb, redis_server.url, name="otel", batch_size=2).run(once=True)
    assert stats.relayed == 5

    lag = otel.value("dash.stream.relay.lag", **{"dash.relay.name": "otel"})
    assert lag.count == stats.batches == 3  # pages of 2, 2 and 1
    assert otel.value("dash.stream.follower.lag").count == 3


# -- enabling ---------------------------------------------------------------------------------------

_ENV_SCRIPT = """
import asyncio, json, sys
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from dash_storage import Database, SwarmRepository, get_database, reset_database

exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()

async def main():
    swarms = SwarmRepository()  # on the shared default, built from the environment
    # The global providers are set after the Database was made: it follows them.
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    await swarms.count()
    other = Database()
    await SwarmRepository(other).count()
    await other.close()
    await reset_database()

asyncio.run(main())
spans = exporter.get_finished_spans()
print(json.dumps({
    "names": [s.name for s in spans],
    "query_text": [s.attributes.get("db.query.text") for s in spans],
    "metrics": sorted(m.name for r in reader.get_metrics_data().resource_metrics
                      for s in r.scope_metrics for m in s.metrics),
}))
"""


async def test_dash_otel_turns_telemetry_on_with_the_global_providers(db: Database) -> None:
    done = run_fresh(_ENV_SCRIPT, DASH_OTEL="1", DASH_OTEL_QUERY_TEXT="true")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["names"] == ["count swarms", "count swarms"]
    assert out["query_text"] == ["SELECT count(*) FROM swarms"] * 2
    assert "db.client.operation.duration" in out["metrics"]


_DISABLED_SCRIPT = """
import asyncio, sys
from dash_storage import (AgentRepository, BudgetRepository, Database, EventRepository, EventWriter,
                          SessionRepository, SwarmRepository)
from dash_storage.stream import Follower

async def main():
    db = Database()
    await db.initialize()
    swarms = SwarmRepository(db)
    assert type(swarms) is SwarmRepository and db.telemetry is None
    swarm = await swarms.create("plain")
    await AgentRepository(db).create(swarm.id)
    await SessionRepository(db).create()
    budget = await BudgetRepository(db).create("swarm", swarm.id, allocated=5)
    await asyncio.gather(*(BudgetRepository(db).try_consume(budget.id, 1, "1") for _ in range(3)))
    async with EventWriter(db) as writer:
        await writer.create(swarm.id, "t")
    await EventRepository(db).count()
    await Follower(db, from_start=True, listen=False).read_page()
    await db.close()

asyncio.run(main())
print(sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry"))
"""


async def test_without_telemetry_no_opentelemetry_module_is_imported(db: Database) -> None:
    done = run_fresh(_DISABLED_SCRIPT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


class Collector:
    """A real OTLP/HTTP endpoint on loopback: keeps what each POST delivered, by path."""

    def __init__(self) -> None:
        received: dict[str, list[bytes]] = {}
        self.received = received

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.setdefault(self.path, []).append(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def test_the_readme_collector_example_delivers_spans_and_metrics(db: Database) -> None:
    readme = (ROOT / "README.md").read_text()
    [example] = [b for b in re.findall(r"```py\n(.*?)```", readme, re.S) if "OTLPSpanExporter" in b]
    collector = Collector()
    try:
        done = await asyncio.to_thread(run_fresh, example, OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint)
    finally:
        collector.close()
    assert done.returncode == 0, done.stderr
    traces = b"".join(collector.received.get("/v1/traces", []))
    assert b"create swarms" in traces and b"find_by_id swarms" in traces and b"postgresql" in traces
    assert b"traced" not in traces  # the swarm's name is a parameter value
    assert b"db.client.operation.duration" in b"".join(collector.received.get("/v1/metrics", []))


async def test_telemetry_refuses_what_is_not_a_provider() -> None:
    with pytest.raises(ValidationError, match="tracer_provider"):
        Telemetry(tracer_provider="otlp://collector")
    with pytest.raises(ValidationError, match="query_text"):
        Telemetry(query_text="yes")  # type: ignore[arg-type]


async def test_telemetry_outlives_no_database(db: Database, settings: Settings, otel: Otel) -> None:
    """A Telemetry watches its Databases' pools weakly: a dropped Database is not kept, nor observed."""
    import gc
    import weakref

    tdb = Database(settings, telemetry=otel.telemetry)
    await tdb.initialize()
    assert await SwarmRepository(tdb).count() == 0
    await tdb.close()
    ref = weakref.ref(tdb)
    del tdb
    gc.collect()
    assert ref() is None
    assert otel.points("db.client.connection.max") == []

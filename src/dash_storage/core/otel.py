"""The OpenTelemetry side of ``Telemetry``: the instruments, one span per repository call, and the
hooks the Database, the budget combiner, the EventWriter and the stream call. Imported only when a
``Telemetry`` is built (it imports ``opentelemetry``).

Spans follow OpenTelemetry's database conventions: kind CLIENT, named ``{db.operation.name}
{db.collection.name}`` (``create swarms``), with ``db.system.name`` = ``postgresql``, ``db.namespace``
(the database), ``server.address`` / ``server.port`` (never a user name, a password or a DSN),
``db.operation.name`` (the repository method) and ``db.collection.name`` (the repository's table).
No parameter value is ever recorded, and no error message either (messages may quote input): a
failed call carries ``error.type`` (the exception's class) and ``db.response.status_code`` (the
SQLSTATE, when the server answered one), and the span status ERROR. A retry adds a ``dash.retry``
event, a connection replaced before anything was sent on it a ``dash.replay`` event, to the span
current at that moment.
"""

from __future__ import annotations

import contextvars
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import parse_qs, urlsplit

from opentelemetry import context, metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import SpanKind, StatusCode

if TYPE_CHECKING:
    from dash_storage.core.config import Settings
    from dash_storage.core.database import Database

__all__ = ["DatabaseTelemetry", "Instruments", "Operation", "database_attributes", "error_attributes"]

T = TypeVar("T")
Attributes = dict[str, str | int]

SCOPE: Final = "dash_storage"
#: The buckets OpenTelemetry's conventions give for ``db.client.operation.duration`` (seconds).
DURATION_BUCKETS: Final = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)
#: Batch sizes: powers of two up to the largest batch of the combiner and the EventWriter (500).
BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
#: Stream lag (seconds): from a few milliseconds (caught up) to an hour (replaying old history).
LAG_BUCKETS: Final = (0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 3600.0)


class Operation:
    """One public method of a repository, as its span names it."""

    __slots__ = ("attributes", "collection", "name", "span_name")

    def __init__(self, name: str, collection: str) -> None:
        self.name = name
        self.collection = collection
        self.span_name = f"{name} {collection}"
        self.attributes: Attributes = {"db.operation.name": name, "db.collection.name": collection}

    def __repr__(self) -> str:
        return f"<Operation {self.span_name}>"


class _Call:
    """The repository call in progress in this context (one span), and the statements it sent."""

    __slots__ = ("statements",)

    def __init__(self, statements: list[str] | None) -> None:
        self.statements = statements


#: Set while a repository call's span is current: a public method called by another one is part of
#: the outer call (one span per call the application makes).
_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("dash_storage_call", default=None)


def database_attributes(settings: Settings, *, embedded: bool) -> Attributes:
    """The attributes that name the database of every span and metric: system, database, server.

    Only the host and the port of the server: never the user, the password or the DSN. The embedded
    server (a socket in a private folder) has no server address.
    """
    out: Attributes = {"db.system.name": "postgresql", "db.namespace": settings.database_name()}
    if embedded:
        return out
    if settings.database_url is not None:
        parts = urlsplit(settings.database_url.get_secret_value())
        query = parse_qs(parts.query)  # a socket folder or host may come as ?host=...&port=...
        out["server.address"] = parts.hostname or (query.get("host") or ["localhost"])[-1]
        port = str(parts.port or (query.get("port") or ["5432"])[-1])
        if port.isdigit():  # else (several ports for several hosts) the attribute is left out
            out["server.port"] = int(port)
    else:
        out["server.address"] = settings.postgres_host or "localhost"
        out["server.port"] = settings.postgres_port
    return out


def error_attributes(exc: BaseException) -> Attributes:
    """``error.type`` (the exception's class, fully qualified) and, when the server answered with
    one, ``db.response.status_code`` (its SQLSTATE). Never the message: it may quote input."""
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    out: Attributes = {"error.type": name}
    state = getattr(exc, "sqlstate", None) or getattr(exc.__cause__, "sqlstate", None)
    if isinstance(state, str):
        out["db.response.status_code"] = state
    return out


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dash-storage")
    except PackageNotFoundError:
        return ""


class Instruments:
    """The tracer and the metric instruments of one ``Telemetry``, shared by its Databases."""

    def __init__(self, tracer_provider: Any, meter_provider: Any) -> None:
        version = _version()
        self.tracer = trace.get_tracer(SCOPE, version, tracer_provider)
        meter = metrics.get_meter(SCOPE, version, meter_provider)
        self.duration = meter.create_histogram(
            "db.client.operation.duration",
            unit="s",
            description="Duration of repository calls (each may send several statements, retries included).",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.retries = meter.create_counter(
            "dash.db.client.retries",
            unit="{retry}",
            description="Attempts made again after a transient failure (lost connection, timeout, conflict).",
        )
        self.replays = meter.create_counter(
            "dash.db.client.replays",
            unit="{replay}",
            description="Work moved to another connection because its own was found dead before anything "
            "was sent on it (not a retry: nothing reached the server).",
        )
        self.consume_batches = meter.create_histogram(
            "dash.budget.consume.batch.size",
            unit="{request}",
            description="Consumes of one budget sent together by the budget combiner, per statement.",
            explicit_bucket_boundaries_advisory=BATCH_BUCKETS,
        )
        self.event_batches = meter.create_histogram(
            "dash.event.writer.batch.size",
            unit="{event}",
            description="Events an EventWriter wrote in one batch.",
            explicit_bucket_boundaries_advisory=BATCH_BUCKETS,
        )
        self.follower_lag = meter.create_histogram(
            "dash.stream.follower.lag",
            unit="s",
            description="Age of the newest event of each page a Follower reads, when it reads it "
            "(this host's clock minus the event's timestamp).",
            explicit_bucket_boundaries_advisory=LAG_BUCKETS,
        )
        self.relay_lag = meter.create_histogram(
            "dash.stream.relay.lag",
            unit="s",
            description="Age of the newest event of each page the Relay has written to Redis, once Redis "
            "acknowledged it and the relay's cursor was saved.",
            explicit_bucket_boundaries_advisory=LAG_BUCKETS,
        )
        self._lock = threading.Lock()  # the metric reader observes from its own thread
        self._watched: weakref.WeakSet[DatabaseTelemetry] = weakref.WeakSet()
        meter.create_observable_up_down_counter(
            "db.client.connection.count",
            [self._observe_count],
            unit="{connection}",
            description="Open connections of the pool, by state: used (checked out) or idle.",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.pending_requests",
            [self._observe_pending],
            unit="{request}",
            description="Callers waiting for a pooled connection.",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.max",
            [self._observe_max],
            unit="{connection}",
            description="Most connections the pool may open (POSTGRES_MAX_POOL_SIZE).",
        )

    def watch(self, probe: DatabaseTelemetry) -> None:
        with self._lock:
            self._watched.add(probe)

    def _pools(self) -> list[tuple[Attributes, Any]]:
        """(pool attributes, Database.stats()) of every open pool watched."""
        with self._lock:
            probes = list(self._watched)
        out = []
        for probe in probes:
            db = probe.database()
            if db is not None and db.is_initialized:
                out.append((probe.pool_attributes, db.stats()))
        return out

    def _observe_count(self, _options: CallbackOptions) -> Iterable[Observation]:
        observed = []
        for pool, stats in self._pools():
            observed.append(Observation(stats.in_use, {**pool, "db.client.connection.state": "used"}))
            observed.append(Observation(stats.idle, {**pool, "db.client.connection.state": "idle"}))
        return observed

    def _observe_pending(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(stats.waiting, pool) for pool, stats in self._pools()]

    def _observe_max(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(stats.max, pool) for pool, stats in self._pools()]


class DatabaseTelemetry:
    """What one Database reports, and the hooks its code calls (``db.telemetry``).

    Holds its Database weakly: a Database keeps its telemetry, never the other way round.
    """

    __slots__ = (
        "__weakref__",
        "_instruments",
        "_operations",
        "attributes",
        "database",
        "pool_attributes",
        "query_text",
    )

    def __init__(self, instruments: Instruments, db: Database, *, query_text: bool) -> None:
        self._instruments = instruments
        self.database = weakref.ref(db)
        self.query_text = query_text
        s = db.settings
        self.attributes = database_attributes(s, embedded=s.target == "embedded")
        where = (
            f"{self.attributes['server.address']}:{self.attributes['server.port']}"
            if "server.address" in self.attributes
            else "embedded"
        )
        #: ``db.client.connection.pool.name``: server, port and database, as the conventions suggest
        #: for a pool without a name of its own.
        self.pool_attributes: Attributes = {
            "db.client.connection.pool.name": f"{where}/{self.attributes['db.namespace']}"
        }
        self._operations: dict[Operation, Attributes] = {}
        instruments.watch(self)
        if query_text:
            _note_statements(db)

    # -- repository calls -----------------------------------------------------------------------

    async def call(self, op: Operation, work: Coroutine[Any, Any, T]) -> T:
        """Await ``work`` (a repository method's coroutine) inside a span named after ``op``, and
        record its duration."""
        if _CALL.get() is not None:  # called by another repository method: part of that span
            return await work
        attributes = self._operations.get(op)
        if attributes is None:
            attributes = self._operations[op] = {**self.attributes, **op.attributes}
        instruments = self._instruments
        span = instruments.tracer.start_span(op.span_name, kind=SpanKind.CLIENT, attributes=attributes)
        call = _Call([] if self.query_text else None)
        outer = _CALL.set(call)
        token = context.attach(trace.set_span_in_context(span))
        started = time.perf_counter()
        try:
            return await work
        except BaseException as exc:
            failure = error_attributes(exc)
            span.set_attributes(failure)
            span.set_status(StatusCode.ERROR)
            attributes = {**attributes, **failure}
            raise
        finally:
            elapsed = time.perf_counter() - started
            context.detach(token)
            _CALL.reset(outer)
            if call.statements:
                span.set_attribute("db.query.text", "; ".join(call.statements))
            span.end()
            instruments.duration.record(elapsed, attributes)

    # -- hooks ----------------------------------------------------------------------------------

    def retried(self, what: str, attempt: int, exc: BaseException, wait: float) -> None:
        """Attempt ``attempt`` of ``what`` failed transiently; the next one follows after ``wait`` s."""
        failure = error_attributes(exc)
        self._instruments.retries.add(1, {**self.attributes, "dash.retry.operation": what, **failure})
        span = trace.get_current_span()
        if span.is_recording():
            event: dict[str, str | int | float] = {
                "dash.retry.operation": what,
                "dash.retry.attempt": attempt + 1,
                "dash.retry.delay": wait,
                **failure,
            }
            span.add_event("dash.retry", event)

    def replayed(self, reason: str) -> None:
        """Work moved to another connection: its own was dead before anything was sent on it.

        ``reason``: ``idle`` (closed by the server while pooled), ``unsent`` (a statement failed before
        it went out), ``block`` (a ``run`` block failed before sending anything), ``begin`` (a
        transaction's connection was dead at BEGIN).
        """
        self._instruments.replays.add(1, {**self.attributes, "dash.replay.reason": reason})
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event("dash.replay", {"dash.replay.reason": reason})

    def consume_batch(self, size: int) -> None:
        """The budget combiner sent ``size`` consumes of one budget in one statement."""
        self._instruments.consume_batches.record(size, self.attributes)

    def event_batch(self, size: int) -> None:
        """An EventWriter wrote ``size`` events as one batch."""
        self._instruments.event_batches.record(size, self.attributes)

    def follower_page(self, newest: Any) -> None:
        """A Follower read a page whose newest event has the timestamp ``newest``."""
        self._instruments.follower_lag.record(_age(newest), self.attributes)

    def relay_page(self, newest: Any, relay: str) -> None:
        """The Relay ``relay`` has a page in Redis (and its cursor saved); ``newest`` as above."""
        self._instruments.relay_lag.record(_age(newest), {**self.attributes, "dash.relay.name": relay})


def _age(timestamp: Any) -> float:
    """Seconds from ``timestamp`` (an aware datetime) to now on this host's clock; 0 if it is ahead
    (the database server's clock runs ahead of this host's)."""
    return max(time.time() - float(timestamp.timestamp()), 0.0)


def _note_statements(db: Database) -> None:
    """Make ``db``'s one-statement helpers note their statement (the parameterized text, never the
    values) on the repository call in progress. Set on this instance only, so that a Database
    without ``query_text`` runs its helpers untouched."""
    for name in ("fetch", "fetchrow", "fetchval", "execute"):
        setattr(db, name, _noting(getattr(db, name)))


def _noting(send: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def noted(query: str, *args: Any, **kwargs: Any) -> Any:
        call = _CALL.get()
        if call is not None and call.statements is not None and query not in call.statements:
            call.statements.append(query)
        return await send(query, *args, **kwargs)

    return noted

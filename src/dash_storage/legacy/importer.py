"""Import a legacy Dash SQLite file (``dash.db``) into PostgreSQL.

``await import_sqlite(db, "dash.db")`` copies every swarm (with its budget as a swarm-scope budget),
agent and event, and returns an :class:`ImportReport`. What it does, and why:

* **Read-only, streamed.** The file is opened with ``file:...?mode=ro`` inside one read
  transaction (a consistent snapshot even if the old app is still writing), and read in
  ``batch_size`` rows by rowid, so a million events never sit in memory at once.
* **Deterministic ids.** A legacy id that already parses as a UUID is kept; any other string
  becomes ``uuid5(LEGACY_NAMESPACE, "<table>:<id>")`` (see :func:`legacy_uuid`); references are
  mapped the same way. The budget of a swarm gets ``uuid5(LEGACY_NAMESPACE, "budget:<swarm id>")``.
  The legacy string id is kept in ``swarms.config["legacy_id"]`` / ``agents.metadata["legacy_id"]``.
* **Idempotent.** Every insert is ``ON CONFLICT DO NOTHING``: a second run writes nothing and
  counts those rows as already present.
* **Fast path for events.** Each batch is COPYed (binary) into a session TEMP table and moved
  with one ``INSERT INTO events SELECT ... ON CONFLICT (id) DO NOTHING``, one transaction per
  batch. PostgreSQL's side (index and foreign-key maintenance) is the bottleneck, so two writer
  connections take turns while Python reads and converts the next batch; a writer that loses
  its connection reconnects and re-writes its batch. A writer's connection is closed when it is
  done rather than handed back with its TEMP table, as the pool expects connections without
  session state. A pool of one connection works too (one writer). References to rows outside the
  file are looked up once, before the events.
* **Nothing dropped silently.** Every rejected row and every repair is written to a JSON-lines
  report file (next to the input unless ``report_path`` is given), with a reason.
* **Dry run** (``dry_run=True``) reads and converts everything and asks PostgreSQL which rows
  already exist, but writes nothing to the database; the counts are those a real run would give.

Mapping rules (the report counts every one of them):

* swarms: legacy ``agents`` and ``metrics`` go to ``config["legacy_agents"]`` /
  ``config["legacy_metrics"]``; ``budget_allocated``/``budget_consumed`` (REAL) become a budget row
  (``Decimal(str(x))``, at most 10 decimal places; NULL → 0; negative → 0; consumed above
  allocated → allocated raised to consumed); a swarm with both budget columns NULL has no budget.
  ``budget_remaining`` is derived data and is not copied.
* agents: ``parent_id``/``child_ids`` go to ``metadata["legacy_parent_id"]`` /
  ``metadata["legacy_child_ids"]``; an agent whose swarm is missing is rejected
  (``agents.swarm_id`` is NOT NULL). ``lifecycle_state`` is derived from the legacy status.
* events: the legacy ``source`` is kept whole in ``payload["_legacy_source"]`` and its ``type``
  (agent/task/system) becomes ``entity_type`` (else ``agent`` when the event has an agent, else
  ``system``); ``severity`` is taken from a valid ``payload.severity``/``payload.level``, else
  ``info``. An event whose agent is missing is kept with ``agent_id`` NULL and the old id in
  ``payload["_legacy_agent_id"]``; an event without ``swarm_id`` takes its agent's swarm; an event
  whose swarm is missing (or that has neither) is rejected.
* JSON that does not parse is kept as ``{"_legacy_raw": "<text>"}``; valid JSON that must be an
  object but is not is kept as ``{"_legacy_value": <value>}``. Timestamps are read as ISO-8601
  (no offset = UTC) or epoch seconds/milliseconds; unparsable ones become NULL, or
  1970-01-01T00:00:00Z where the column is NOT NULL (so they sort first, never as the newest), with
  the original text kept beside the row and a repair in the report. NUL characters (PostgreSQL text
  cannot hold them) are removed; text that is
  not valid UTF-8 is read with U+FFFD in place of the bad bytes. Rows without an id are rejected.
* statuses: see :data:`SWARM_STATUS_MAP` and :data:`AGENT_STATUS_MAP`; values in neither map go to
  the conservative defaults (swarms ``paused``, agents ``blocked``): not running, not final, so a
  person decides what becomes of them.

References to rows that are not in the file but already exist in PostgreSQL (e.g. a swarm with a
UUID id created by the new code) are accepted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, Final

from dash_storage.core.database import Connection, Database
from dash_storage.core.errors import DashStorageError, ValidationError
from dash_storage.legacy.convert import convert_agents, convert_events, convert_swarms
from dash_storage.legacy.mapping import (
    AGENT_STATUS_DEFAULT,
    AGENT_STATUS_MAP,
    LEGACY_NAMESPACE,
    SWARM_STATUS_DEFAULT,
    SWARM_STATUS_MAP,
    AgentRef,
    SwarmRef,
    legacy_uuid,
    map_agent_status,
    map_swarm_status,
)
from dash_storage.legacy.reader import LEGACY_COLUMNS, LegacyReader
from dash_storage.legacy.report import (
    Batch,
    ImportReport,
    ProgressCallback,
    Reject,
    Repair,
    ReportWriter,
    TableCounts,
    default_report_path,
)
from dash_storage.legacy.writer import (
    find_agents,
    find_swarms,
    schema_present,
    write_agents,
    write_event_batches,
    write_swarms,
)

# The names this module has always offered (most are defined in the modules next to it).
__all__ = [
    "AGENT_STATUS_DEFAULT",
    "AGENT_STATUS_MAP",
    "LEGACY_NAMESPACE",
    "SWARM_STATUS_DEFAULT",
    "SWARM_STATUS_MAP",
    "ImportReport",
    "ProgressCallback",
    "Reject",
    "Repair",
    "TableCounts",
    "default_report_path",
    "import_sqlite",
    "legacy_uuid",
    "map_agent_status",
    "map_swarm_status",
]

_EVENT_WRITERS: Final = 2  # concurrent event writers (connections); PostgreSQL is the bottleneck
_CONVERT_SLICE: Final = 500  # events converted between two yields to the event loop


class _Importer:
    def __init__(
        self,
        db: Database,
        source: Path,
        *,
        dry_run: bool,
        batch_size: int,
        progress: ProgressCallback | None,
        report_path: Path,
    ) -> None:
        self.db = db
        self.source = source
        self.dry_run = dry_run
        self.batch_size = batch_size
        self.progress = progress
        self.report = ImportReport(source=str(source), dry_run=dry_run, report_path=str(report_path))
        self.report_path = report_path
        self.reader = LegacyReader(source)
        self._writer: ReportWriter | None = None
        self.totals: dict[str, int] = {}
        # legacy swarm id → swarm uuid (or None: known to be missing)
        self.swarms: dict[str, SwarmRef] = {}
        # legacy agent id → (agent uuid, swarm uuid), or None: known to be missing
        self.agents: dict[str, AgentRef] = {}

    # -- driver ----------------------------------------------------------------------------------

    async def run(self) -> ImportReport:
        started = time.perf_counter()
        await self.reader.open()
        try:
            if not await schema_present(self.db):
                raise ValidationError(
                    "database",
                    "the dash-storage tables are missing: run `dash-db migrate` first",
                )
            for table in LEGACY_COLUMNS:
                self.totals[table] = await self.reader.count(table)
            self.report_path.parent.mkdir(parents=True, exist_ok=True)
            with self.report_path.open("wb") as out:
                self._writer = ReportWriter(self.report, out)
                self._writer.start()
                lossy = self.reader.lossy
                await self._phase("swarms", lambda rows: convert_swarms(rows, lossy["swarms"]), write_swarms)
                await self._phase(
                    "agents", lambda rows: convert_agents(rows, self.swarms, lossy["agents"]), write_agents
                )
                await self._events_phase()
                self.report.elapsed_seconds = time.perf_counter() - started
                self._writer.finish()
        finally:
            self._writer = None
            await self.reader.close()
        return self.report

    def _commit(self, batch: Batch, written: int, budgets_written: int = 0) -> None:
        """Add a batch that was written (or, in a dry run, checked) to the report."""
        assert self._writer is not None
        counts = self._writer.add(batch, written, budgets_written)
        if batch.table == "swarms":
            self.swarms.update(batch.new_refs)
        elif batch.table == "agents":
            self.agents.update(batch.new_refs)
        if self.progress is not None:
            self.progress(batch.table, counts.read, max(self.totals.get(batch.table, 0), counts.read))

    async def _phase(
        self,
        table: str,
        convert: Callable[[list[tuple[Any, ...]]], Batch],
        write: Callable[[Connection, Batch, bool], Awaitable[tuple[int, int]]],
    ) -> None:
        """Swarms or agents: read a batch, resolve references, convert, write it in one transaction."""
        after = 0
        while True:
            rows = await self.reader.fetch(table, after, self.batch_size)
            if not rows:
                return
            if table == "agents":
                await self._resolve(swarm_keys={r[11] for r in rows})
            batch = convert(rows)
            batch.last_rowid = rows[-1][0]

            async def once(con: Connection, _attempt: int, batch: Batch = batch) -> tuple[int, int]:
                return await write(con, batch, self.dry_run)

            written, budgets_written = await self.db.run(once, retry=True, transaction=not self.dry_run)
            self._commit(batch, written, budgets_written)
            after = batch.last_rowid

    async def _resolve(self, *, swarm_keys: Iterable[Any] = (), agent_keys: Iterable[Any] = ()) -> None:
        """Look up, in PostgreSQL, referenced swarms/agents that are not in the legacy file."""
        swarms = self.swarms
        unknown = [k for k in set(swarm_keys) if isinstance(k, str) and k and k not in swarms]
        swarms.update(await find_swarms(self.db, unknown))
        agents = self.agents
        unknown = [k for k in set(agent_keys) if isinstance(k, str) and k and k not in agents]
        agents.update(await find_agents(self.db, unknown))

    # -- events ----------------------------------------------------------------------------------

    async def _events_phase(self) -> None:
        """Events: COPY each batch into a staging table, then INSERT ... SELECT into ``events``.

        One producer reads batches from SQLite (aiosqlite's thread) and converts them, in slices
        that yield to the event loop; up to :data:`_EVENT_WRITERS` writers, each on its own
        connection with its own session TEMP table, write them (one transaction per batch), so
        PostgreSQL inserts while Python converts. A writer hit by a transient failure reconnects
        and re-writes the batch it held (idempotent), then carries on; its connection is closed
        when it stops, never returned to the pool.
        """
        # References to swarms/agents that are not in the file are looked up once, up front, so
        # the writers never wait for a look-up (and a pool of one connection still works).
        swarm_keys, agent_keys = await self.reader.distinct_event_refs()
        await self._resolve(swarm_keys=swarm_keys, agent_keys=agent_keys)
        writers = max(1, min(_EVENT_WRITERS, self.db.settings.postgres_max_pool_size))
        queue: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=writers)
        tasks = [asyncio.ensure_future(self._produce_events(queue, writers))]
        tasks += [
            asyncio.ensure_future(write_event_batches(self.db, queue, self._commit, dry_run=self.dry_run))
            for _ in range(writers)
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                error = task.exception()
                if error is not None:
                    raise error
        finally:
            for task in tasks:
                task.cancel()
            # Bounded: a writer cancelled in the middle of a query on a dead connection can make
            # asyncpg wait a long time for the cancellation; the error at hand matters more.
            await asyncio.wait(tasks, timeout=self.db.settings.connection_timeout_s + 5.0)

    async def _produce_events(self, queue: asyncio.Queue[Batch | None], writers: int) -> None:
        """Read and convert event batches into ``queue``; then one None per writer.

        No read-ahead: reading on aiosqlite's thread while this thread converts only makes the
        two fight over the GIL (measured slower).
        """
        after = 0
        while True:
            rows = await self.reader.fetch("events", after, self.batch_size)
            if not rows:
                for _ in range(writers):
                    await queue.put(None)
                return
            after = rows[-1][0]
            batch = Batch("events")
            lossy = self.reader.lossy["events"]
            for start in range(0, len(rows), _CONVERT_SLICE):
                convert_events(rows[start : start + _CONVERT_SLICE], batch, self.swarms, self.agents, lossy)
                await asyncio.sleep(0)  # let the writers' round trips through
            batch.last_rowid = after
            await queue.put(batch)


# -- entry point ------------------------------------------------------------------------------------


async def import_sqlite(
    db: Database,
    path: str | Path,
    *,
    dry_run: bool = False,
    batch_size: int = 5000,
    progress: ProgressCallback | None = None,
    report_path: str | Path | None = None,
) -> ImportReport:
    """Import the legacy SQLite file at ``path`` into the database of ``db`` (see the module doc).

    Writes a JSON-lines report (every reject and repair, the status mappings and a summary) to
    ``report_path``, default :func:`default_report_path`. ``dry_run`` writes nothing to the database.
    """
    source = Path(path)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= 100_000:
        raise ValidationError("batch_size", f"must be an integer between 1 and 100000, got {batch_size!r}")
    if not await asyncio.to_thread(source.is_file):
        raise ValidationError("path", f"no such file: {str(source)!r}")
    target = Path(report_path) if report_path is not None else default_report_path(source, dry_run=dry_run)
    importer = _Importer(
        db, source, dry_run=dry_run, batch_size=batch_size, progress=progress, report_path=target
    )
    try:
        return await importer.run()
    except OSError as exc:
        raise DashStorageError(f"import of {str(source)!r} failed: {exc}") from exc

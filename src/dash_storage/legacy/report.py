"""What an import reports: counts per table, rejects, repairs, status mappings, the JSON-lines file.

Converters collect each batch's rejects and repairs in a :class:`Batch`; once the batch is written
(or, in a dry run, checked), :class:`ReportWriter` adds it to the :class:`ImportReport` and writes
every reject and repair to the report file, so nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import IO, Any, Final, TypeAlias

import orjson

__all__ = [
    "MAX_KEPT",
    "TABLES",
    "Batch",
    "ImportReport",
    "ProgressCallback",
    "Reject",
    "Repair",
    "ReportWriter",
    "RowRepairs",
    "TableCounts",
    "default_report_path",
]

TABLES: Final = ("swarms", "budgets", "agents", "events")
MAX_KEPT: Final = 1000  # rejects/repairs kept in memory (all of them go to the report file)

ProgressCallback: TypeAlias = Callable[[str, int, int], None]
"""``progress(table, rows_done, rows_total)``, called after every batch."""


@dataclasses.dataclass(slots=True)
class TableCounts:
    """What happened to the rows of one table."""

    read: int = 0
    written: int = 0
    already_present: int = 0
    repaired: int = 0
    rejected: int = 0

    @property
    def skipped(self) -> int:
        """Rows not written: already present or rejected."""
        return self.already_present + self.rejected

    def as_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "skipped": self.skipped}


@dataclasses.dataclass(frozen=True, slots=True)
class Reject:
    """A legacy row that was not imported, and why."""

    table: str
    legacy_id: str | None
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class Repair:
    """A value that was changed so the row could be imported."""

    table: str
    legacy_id: str | None
    field: str
    action: str


@dataclasses.dataclass(slots=True)
class ImportReport:
    """The outcome of one import (or dry run). ``rejects``/``repairs`` hold the first
    :data:`MAX_KEPT` of each; the report file has all of them."""

    source: str
    dry_run: bool
    report_path: str | None
    tables: dict[str, TableCounts] = dataclasses.field(
        default_factory=lambda: {t: TableCounts() for t in TABLES}
    )
    status_mappings: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    rejects: list[Reject] = dataclasses.field(default_factory=list)
    repairs: list[Repair] = dataclasses.field(default_factory=list)
    elapsed_seconds: float = 0.0

    @property
    def events_per_second(self) -> float:
        """Legacy events processed per second over the whole run."""
        read = self.tables["events"].read
        return read / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON output."""
        return {
            "source": self.source,
            "dry_run": self.dry_run,
            "report_path": self.report_path,
            "tables": {name: counts.as_dict() for name, counts in self.tables.items()},
            "status_mappings": self.status_mappings,
            "rejects": [dataclasses.asdict(r) for r in self.rejects],
            "rejects_total": sum(c.rejected for c in self.tables.values()),
            "repairs": [dataclasses.asdict(r) for r in self.repairs],
            "elapsed_seconds": round(self.elapsed_seconds, 3),
            "events_per_second": round(self.events_per_second, 1),
        }


def default_report_path(source: Path, *, dry_run: bool = False) -> Path:
    """Where the report goes unless told: next to the input (``dash.db.import-report.jsonl``)."""
    suffix = ".dry-run-report.jsonl" if dry_run else ".import-report.jsonl"
    return source.with_name(source.name + suffix)


# -- per-batch bookkeeping --------------------------------------------------------------------------


class Batch:
    """One converted batch; its counts are added to the report only after it was written."""

    __slots__ = (
        "budget_read",
        "budget_rejects",
        "budget_repaired",
        "budgets",
        "ids",
        "last_rowid",
        "mappings",
        "new_refs",
        "read",
        "records",
        "rejects",
        "repaired",
        "repairs",
        "table",
    )

    def __init__(self, table: str) -> None:
        self.table = table
        self.read = 0
        self.last_rowid = 0
        self.records: list[tuple[Any, ...]] = []
        self.ids: list[uuid.UUID] = []
        self.repaired = 0
        self.rejects: list[Reject] = []
        self.repairs: list[Repair] = []
        self.mappings: Counter[tuple[str, str]] = Counter()
        # Accepted legacy ids of this batch → their reference value (added to the lookups after commit).
        self.new_refs: dict[str, Any] = {}
        # Swarm batches also carry their budgets.
        self.budgets: list[tuple[uuid.UUID, uuid.UUID, Decimal, Decimal]] = []
        self.budget_read = 0
        self.budget_repaired = 0
        self.budget_rejects: list[Reject] = []


class RowRepairs:
    """Collects the repairs of one row."""

    __slots__ = ("batch", "count", "legacy_id", "table")

    def __init__(self, batch: Batch, table: str, legacy_id: str | None) -> None:
        self.batch = batch
        self.table = table
        self.legacy_id = legacy_id
        self.count = 0

    def add(self, field: str, action: str) -> None:
        self.count += 1
        self.batch.repairs.append(Repair(self.table, self.legacy_id, field, action))


# -- the JSON-lines report file ---------------------------------------------------------------------


class ReportWriter:
    """Adds written batches to ``report`` and writes the report file ``out``, one JSON object a line:
    a ``start`` line, every ``reject`` and ``repair``, then every status ``mapping`` and a ``summary``."""

    def __init__(self, report: ImportReport, out: IO[bytes]) -> None:
        self.report = report
        self._out = out
        self._mappings: Counter[tuple[str, str]] = Counter()

    def line(self, data: Mapping[str, Any]) -> None:
        self._out.write(orjson.dumps(data) + b"\n")

    def start(self) -> None:
        self.line({"kind": "start", "source": self.report.source, "dry_run": self.report.dry_run})

    def add(self, batch: Batch, written: int, budgets_written: int = 0) -> TableCounts:
        """Count a batch that was written (or, in a dry run, checked); its table's counts after it."""
        counts = self.report.tables[batch.table]
        counts.read += batch.read
        accepted = batch.read - len(batch.rejects)
        counts.written += written
        counts.already_present += accepted - written
        counts.repaired += batch.repaired
        counts.rejected += len(batch.rejects)
        if batch.table == "swarms":
            b = self.report.tables["budgets"]
            b.read += batch.budget_read
            b.written += budgets_written
            b.already_present += len(batch.budgets) - budgets_written
            b.repaired += batch.budget_repaired
            b.rejected += len(batch.budget_rejects)
        for reject in (*batch.rejects, *batch.budget_rejects):
            self.line({"kind": "reject", **dataclasses.asdict(reject)})
            if len(self.report.rejects) < MAX_KEPT:
                self.report.rejects.append(reject)
        for repair in batch.repairs:
            self.line({"kind": "repair", **dataclasses.asdict(repair)})
            if len(self.report.repairs) < MAX_KEPT:
                self.report.repairs.append(repair)
        self._mappings.update(batch.mappings)
        return counts

    def finish(self) -> None:
        """Write the status mappings (also set on the report) and the summary line."""
        mappings: dict[str, dict[str, int]] = {}
        for (table, key), count in sorted(self._mappings.items()):
            mappings.setdefault(table, {})[key] = count
        self.report.status_mappings = mappings
        for table, entries in mappings.items():
            for key, count in entries.items():
                self.line({"kind": "mapping", "table": table, "mapping": key, "count": count})
        summary = self.report.to_dict()
        summary.pop("rejects")
        summary.pop("repairs")
        self.line({"kind": "summary", **summary})

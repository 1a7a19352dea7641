"""Backward compatibility with the SQLite store of earlier Dash versions (``dash.db``).

``SQLiteStorage`` reads and writes the old file in its old format; ``import_sqlite`` copies it into
PostgreSQL (deterministic UUIDs, idempotent, with a report of every mapping, repair and reject).
"""

from dash_storage.legacy.importer import import_sqlite
from dash_storage.legacy.mapping import LEGACY_NAMESPACE, legacy_uuid
from dash_storage.legacy.report import ImportReport, Reject, Repair, TableCounts
from dash_storage.legacy.sqlite import SQLiteStorage

__all__ = [
    "LEGACY_NAMESPACE",
    "ImportReport",
    "Reject",
    "Repair",
    "SQLiteStorage",
    "TableCounts",
    "import_sqlite",
    "legacy_uuid",
]

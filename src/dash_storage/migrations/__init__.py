"""The migration system: timestamped SQL files applied once, in name order, under an advisory lock."""

from dash_storage.migrations.runner import (
    ADVISORY_LOCK_KEY,
    MigrationFile,
    MigrationRunner,
    MigrationState,
    MigrationStatus,
    builtin_migrations,
    create_migration,
    discover_migrations,
    split_statements,
)

__all__ = [
    "ADVISORY_LOCK_KEY",
    "MigrationFile",
    "MigrationRunner",
    "MigrationState",
    "MigrationStatus",
    "builtin_migrations",
    "create_migration",
    "discover_migrations",
    "split_statements",
]

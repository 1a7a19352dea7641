"""dash-storage: the PostgreSQL persistence layer of Dash.

The public API is re-exported here; nothing is defined in this module.
"""

from dash_storage.config import Settings, load_settings
from dash_storage.database import Database, HealthReport, PoolStats, get_database, reset_database
from dash_storage.errors import (
    ConfigurationError,
    ConflictError,
    DashStorageError,
    DatabaseError,
    DatabaseUnavailableError,
    InvalidTransitionError,
    MigrationError,
    NotFoundError,
    PoolExhaustedError,
    SerializationConflictError,
    TransientError,
    ValidationError,
)
from dash_storage.retry import RetryPolicy

__all__ = [
    "ConfigurationError",
    "ConflictError",
    "DashStorageError",
    "Database",
    "DatabaseError",
    "DatabaseUnavailableError",
    "HealthReport",
    "InvalidTransitionError",
    "MigrationError",
    "NotFoundError",
    "PoolExhaustedError",
    "PoolStats",
    "RetryPolicy",
    "SerializationConflictError",
    "Settings",
    "TransientError",
    "ValidationError",
    "get_database",
    "load_settings",
    "reset_database",
]

"""Provisioning the embedded server: start it (in a thread, it blocks) and create the configured
database on first use. ``Database`` calls these when no server is configured."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg

from dash_storage.core.errors import is_driver_error, map_error
from dash_storage.server import embedded

__all__ = ["ensure_database", "start_embedded"]


async def start_embedded(data_dir: Path) -> embedded.EmbeddedServer:
    """Start (or find running) the embedded server under ``data_dir``."""
    return await asyncio.to_thread(embedded.start, data_dir)


async def ensure_database(server: embedded.EmbeddedServer, name: str, timeout: float) -> None:
    """On the embedded server, create the configured database on first use.

    Several processes may start at once on a fresh data directory (two commands in two terminals):
    a concurrent CREATE DATABASE of the same name fails with a duplicate (or, when both passed the
    existence check together, a unique violation on the catalog), which means it exists now.
    """
    try:
        con: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(
            **server.connect_kwargs("postgres"), timeout=timeout
        )
        try:
            exists = await con.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
            if not exists:
                # Identifiers cannot be parameters; quote_ident on the server makes the name safe.
                ident = await con.fetchval("SELECT quote_ident($1)", name)
                try:
                    await con.execute(f"CREATE DATABASE {ident}")
                except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
                    pass  # created by a concurrent process
        finally:
            await con.close()
    except Exception as exc:
        if not is_driver_error(exc):
            raise
        raise map_error(exc, context=f"creating database {name!r} on the embedded server") from exc

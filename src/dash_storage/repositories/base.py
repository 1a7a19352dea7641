"""What every repository shares: which Database it uses."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import asyncpg
import orjson

from dash_storage.core.database import Database, get_database

#: Foreign keys of the rows the repositories insert: constraint -> the parent it needs ("swarm",
#: "agent"). A violation means the parent does not exist, which the repositories report as
#: NotFoundError naming that parent (the same error as every other missing row).
PARENT_KEYS: dict[str, str] = {
    "agents_swarm_id_fkey": "swarm",
    "events_swarm_id_fkey": "swarm",
    "events_agent_id_fkey": "agent",
    "budgets_swarm_id_fkey": "swarm",
}


def missing_parent(exc: BaseException | None) -> str | None:
    """The parent ("swarm", "agent") whose absence failed an insert, if ``exc`` is the driver's
    foreign-key violation of one of PARENT_KEYS; else None."""
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        return PARENT_KEYS.get(getattr(exc, "constraint_name", None) or "")
    return None


def written_by_us(row: Any, expected: Mapping[str, Any]) -> bool:
    """On a retried create that found its id taken: is the stored row the one the lost first
    attempt wrote (same values), or a different row that already had the id (a real conflict)?

    JSON values are compared as JSON (a tuple sent is a list stored).
    """
    for key, value in expected.items():
        if isinstance(value, dict | list | tuple):
            value = orjson.loads(orjson.dumps(value))
        if row[key] != value:
            return False
    return True


class Repository:
    """A repository runs its SQL on ``db``: the one given, else the shared default from the environment.

    A Database passed in belongs to the caller; repositories never close it.
    """

    __slots__ = ("_db",)

    def __init__(self, db: Database | None = None) -> None:
        self._db = db

    @property
    def db(self) -> Database:
        return self._db if self._db is not None else get_database()

    async def initialize(self) -> None:
        """Open the pool (and start the embedded server when that is the target)."""
        await self.db.initialize()

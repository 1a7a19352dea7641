"""What every repository shares: which Database it uses."""

from __future__ import annotations

from dash_storage.database import Database, get_database


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

"""What every repository shares: which Database it uses, and the helpers of its statements."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum
from typing import Any, TypeVar

import orjson

from dash_storage.core.database import Connection, Database, get_database
from dash_storage.core.errors import ConflictError, NotFoundError
from dash_storage.core.models import UNSET
from dash_storage.sql import Queries

#: Foreign keys of the rows the repositories insert: constraint -> the parent it needs ("swarm",
#: "agent"). A violation means the parent does not exist, which the repositories report as
#: NotFoundError naming that parent (the same error as every other missing row).
PARENT_KEYS: dict[str, str] = {
    "agents_swarm_id_fkey": "swarm",
    "events_swarm_id_fkey": "swarm",
    "events_agent_id_fkey": "agent",
    "budgets_swarm_id_fkey": "swarm",
}
#: The directions of every ``list`` ordering, as ``validation.check_direction`` returns them.
DIRECTIONS = ("ASC", "DESC")

R = TypeVar("R")


def values_of(choices: type[StrEnum]) -> frozenset[str]:
    """The values of an enum of text values: the allow-list of the column that holds them."""
    return frozenset(member.value for member in choices)


def missing_parent(exc: ConflictError) -> str | None:
    """The parent ("swarm", "agent") whose absence failed an insert, if ``exc`` is the foreign-key
    violation of one of PARENT_KEYS (as core.errors maps it); else None."""
    return PARENT_KEYS.get(exc.constraint or "")


#: How every ``list`` read ends: by the order column, then by id, in one direction; $1 is the limit
#: and $2 the offset, so the conditions of a read number their parameters from $3.
_ORDER_PAGE = "ORDER BY {column} {direction}, id {direction} LIMIT $1 OFFSET $2"
_PAGE_PARAMETERS = 2
_COLUMN = re.compile(r"[a-z_][a-z0-9_]*")
_PARAMETER = re.compile(r"\$(\d+)")


class ListReads:
    """The reads of a ``list`` method, composed at import time from the ``part_*`` fragments of one
    sql file: its start (``SELECT ... FROM``), the WHERE clause of one filter form, and the order,
    one statement per filter form and (SQL column, direction) of the ``order_by`` allow-list; and
    the counts of the same filter forms.

    Each read is static and holds only the conditions of its form, each a plain comparison, and a
    plain sort key. A parameter standing for "no filter" (``$3 IS NULL OR ...``) is tested on every
    row once the server settles on a generic plan, and a CASE choosing the sort key from a parameter
    costs a projection of every row before the sort: each makes a read of a large table markedly
    slower. The variants are few (forms x columns x 2) and ``statements()`` lists every one, so that
    a test can PREPARE them all.
    """

    __slots__ = ("_columns", "_composed", "_queries", "_start", "parts")

    def __init__(self, queries: Queries, start: str, columns: Mapping[str, str]) -> None:
        for column in columns.values():
            if not _COLUMN.fullmatch(column):
                raise ValueError(
                    f"order column {column!r} of sql/{queries.file}.sql is not a plain column name"
                )
        self._queries = queries
        self._start = queries[start]
        self._columns = tuple(columns.values())
        self._composed: dict[str, str] = {}
        #: The names of the fragments used.
        self.parts = {start}

    def form(self, prefix: str, *conditions: str) -> dict[tuple[str, str], str]:
        """The reads of one filter form, by (SQL column, direction), each named
        ``<prefix>_<column>_<asc|desc>``: the start, then WHERE the fragments ``conditions`` joined by
        AND (a fragment whose OR is not in parentheses must stand alone), then the order."""
        head = self._start + self._where(conditions)
        return {
            (column, direction): self._add(
                f"{prefix}_{column}_{direction.lower()}",
                head + "\n" + _ORDER_PAGE.format(column=column, direction=direction),
            )
            for column in self._columns
            for direction in DIRECTIONS
        }

    def count(self, name: str, start: str, *conditions: str) -> str:
        """The count of one filter form, named ``name``: the fragment ``start`` (``SELECT count(*)
        FROM ...``), then the WHERE clause of ``form``. A count has no page, so the parameters of
        the conditions are numbered from $1 ($3 of the reads is $1 here)."""
        self.parts.add(start)
        where = _PARAMETER.sub(self._unpaged, self._where(conditions))
        return self._add(name, self._queries[start] + where)

    def statements(self) -> dict[str, str]:
        """Every statement composed so far, by name."""
        return dict(self._composed)

    def _where(self, conditions: tuple[str, ...]) -> str:
        self.parts.update(conditions)
        return "\nWHERE " + "\n  AND ".join(self._queries[name] for name in conditions) if conditions else ""

    def _unpaged(self, parameter: re.Match[str]) -> str:
        number = int(parameter.group(1))
        if number <= _PAGE_PARAMETERS:
            raise ValueError(f"a condition of sql/{self._queries.file}.sql uses ${number}, a page parameter")
        return f"${number - _PAGE_PARAMETERS}"

    def _add(self, name: str, text: str) -> str:
        if name in self._composed:
            raise ValueError(f"statement {name!r} of sql/{self._queries.file}.sql is composed twice")
        self._composed[name] = text
        return text


def given(value: Any, check: Callable[[Any], Any]) -> tuple[bool, Any]:
    """One field of a partial ``update``: (given?, its checked value); UNSET is not given."""
    if value is UNSET:
        return False, None
    return True, check(value)


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

    A Database passed in belongs to the caller; repositories never close it. When that Database
    (or the shared default, at the time the repository is made) has telemetry, the instance becomes
    its traced subclass (``repositories.traced``): a span per public call; otherwise it is untouched.
    """

    __slots__ = ("_db",)

    def __init__(self, db: Database | None = None) -> None:
        self._db = db
        if (db if db is not None else get_database()).telemetry is not None:
            from dash_storage.repositories.traced import traced_class

            self.__class__ = traced_class(type(self))

    @property
    def db(self) -> Database:
        return self._db if self._db is not None else get_database()

    async def initialize(self) -> None:
        """Open the pool (and start the embedded server when that is the target)."""
        await self.db.initialize()

    # -- what the repositories' methods share ---------------------------------------------------

    async def _one(
        self, make: Callable[..., R], statement: str, *args: Any, retry: bool = True, replica: bool = False
    ) -> R | None:
        """The record ``make`` builds from the row ``statement`` returns, or None if there is none.
        Retried on a lost connection unless ``retry`` is False (a write that could apply twice).
        ``replica``: a read-only statement, which a read replica may serve."""
        row = await self.db.fetchrow(statement, *args, retry=retry, replica=replica)
        return make(*row) if row is not None else None

    async def _many(self, make: Callable[..., R], statement: str, *args: Any) -> list[R]:
        """The records ``make`` builds from the rows ``statement`` returns (a read: retried, and a
        read replica may serve it)."""
        return [make(*row) for row in await self.db.fetch(statement, *args, retry=True, replica=True)]

    async def _update(
        self, make: Callable[..., R], update: str, find: str, row_id: Any, *fields: tuple[bool, Any]
    ) -> R | None:
        """A partial update, retried: the static UPDATE ``update`` of ``row_id`` with the flag and the
        value of every field (``given``) in order, so that it keeps each field not given; when no
        field is given, the row as it is (``find``). None if there is no such row."""
        if not any(flag for flag, _ in fields):
            return await self._one(make, find, row_id)
        return await self._one(make, update, row_id, *(part for field in fields for part in field))

    async def _create(
        self,
        make: Callable[..., R],
        insert: str,
        find: str,
        args: Sequence[Any],
        ours: Mapping[str, Any],
        entity: str,
        parents: Mapping[str, Any] | None = None,
    ) -> R:
        """Create one row, retried on a lost connection, and return its record.

        ``insert`` is an ``INSERT ... ON CONFLICT (id) DO NOTHING RETURNING`` of ``args`` (the new
        id first), ``find`` reads a row by id. When the id is taken, a retry reads the row back and
        answers it if it holds the values ``ours`` (the attempt whose answer was lost wrote it);
        otherwise the id belonged to another row: ConflictError naming the primary key
        ``<entity>s_pkey``. A foreign-key violation of a parent in ``parents`` (as PARENT_KEYS names
        it -> its id) is NotFoundError naming that parent.
        """
        row_id = args[0]

        async def op(con: Connection, attempt: int) -> R:
            row = await con.fetchrow(insert, *args)
            if row is None and attempt > 1:  # our own row, written by an attempt whose answer was lost?
                row = await con.fetchrow(find, row_id)
                if row is not None and not written_by_us(row, ours):
                    row = None  # another row already had this id
            if row is None:
                raise ConflictError(f"{entity} {row_id} already exists", constraint=f"{entity}s_pkey")
            return make(*row)

        try:
            return await self.db.run(op, retry=True)
        except ConflictError as exc:
            parent = missing_parent(exc)
            if parent is not None and parents is not None and parent in parents:
                raise NotFoundError(parent, parents[parent]) from exc.__cause__
            raise

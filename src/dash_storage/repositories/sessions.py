"""SessionRepository: session trees with optional expiry.

Expiry is judged by the database clock: a session whose ``expires_at <= now()`` is gone for every
read and update here (find_by_id / exists / list / count / find_by_branch skip it, updates return
None) until ``cleanup_expired`` deletes it. ``expires_at`` NULL means the session never expires.
"""

from __future__ import annotations

import builtins
import datetime as dt
import functools
import uuid
from typing import Any

from dash_storage.core import validation as v
from dash_storage.core.database import Connection
from dash_storage.core.errors import ConflictError, ValidationError
from dash_storage.core.ids import new_id
from dash_storage.core.models import SESSION_COLUMNS, UNSET, Session, Unset
from dash_storage.repositories.base import Repository, written_by_us

__all__ = ["MAX_TTL_SECONDS", "SESSION_ORDER_COLUMNS", "SessionRepository"]

#: Longest ttl / extension accepted (about 100 years).
MAX_TTL_SECONDS = 100 * 366 * 86_400
#: Public ``order_by`` names of ``list`` -> SQL column (a fixed allow-list, never input).
SESSION_ORDER_COLUMNS = {
    "created_at": "created_at",
    "updated_at": "updated_at",
    "expires_at": "expires_at",
}

# Idempotent create; expires_at is the given time, else now() + ttl (NULL when neither is given).
INSERT_SESSION = f"""
INSERT INTO sessions (id, tree_data, current_branch, metadata, expires_at)
VALUES ($1, $2, $3, $4, COALESCE($5::timestamptz, now() + make_interval(secs => $6::double precision)))
ON CONFLICT (id) DO NOTHING
RETURNING {SESSION_COLUMNS}
"""  # noqa: S608
# A session by id whatever its expiry (a retried create fetching the row it wrote).
SELECT_SESSION_ANY = f"SELECT {SESSION_COLUMNS} FROM sessions WHERE id = $1"  # noqa: S608
# A live (not expired) session by id.
SELECT_SESSION = f"""
SELECT {SESSION_COLUMNS} FROM sessions
WHERE id = $1 AND (expires_at IS NULL OR expires_at > now())
"""  # noqa: S608
# Template of list(): {where}, {order}, {direction} come only from fixed fragments in code.
LIST_SESSIONS_TEMPLATE = f"""
SELECT {SESSION_COLUMNS} FROM sessions{{where}}
ORDER BY {{order}} {{direction}}, id {{direction}} LIMIT $1 OFFSET $2
"""  # noqa: S608
# Filter of live sessions for the list template.
LIVE_FILTER = " WHERE (expires_at IS NULL OR expires_at > now())"
# Number of live sessions.
COUNT_LIVE = "SELECT count(*) FROM sessions WHERE expires_at IS NULL OR expires_at > now()"
# Number of sessions including expired ones.
COUNT_ALL = "SELECT count(*) FROM sessions"
# Whether a live session exists.
SESSION_EXISTS = """
SELECT EXISTS (SELECT 1 FROM sessions WHERE id = $1 AND (expires_at IS NULL OR expires_at > now()))
"""
# Template of update(): {assignments} is built from the fixed column list UPDATABLE_COLUMNS.
UPDATE_SESSION_TEMPLATE = f"""
UPDATE sessions SET {{assignments}}
WHERE id = $1 AND (expires_at IS NULL OR expires_at > now())
RETURNING {SESSION_COLUMNS}
"""  # noqa: S608
# New tree; current_branch NULL leaves the branch as it is.
UPDATE_TREE_DATA = f"""
UPDATE sessions SET tree_data = $2, current_branch = COALESCE($3, current_branch)
WHERE id = $1 AND (expires_at IS NULL OR expires_at > now())
RETURNING {SESSION_COLUMNS}
"""  # noqa: S608
# Atomic shallow merge of top-level metadata keys, in the database.
MERGE_METADATA = f"""
UPDATE sessions SET metadata = metadata || $2::jsonb
WHERE id = $1 AND (expires_at IS NULL OR expires_at > now())
RETURNING {SESSION_COLUMNS}
"""  # noqa: S608
# Live sessions on a branch, most recently updated first (ties by id).
FIND_BY_BRANCH = f"""
SELECT {SESSION_COLUMNS} FROM sessions
WHERE current_branch = $1 AND (expires_at IS NULL OR expires_at > now())
ORDER BY updated_at DESC, id DESC LIMIT $2 OFFSET $3
"""  # noqa: S608
# Push expiry out by $2 seconds from the later of its current expiry and now.
EXTEND_EXPIRATION = f"""
UPDATE sessions
SET expires_at = greatest(COALESCE(expires_at, now()), now()) + make_interval(secs => $2::double precision)
WHERE id = $1 AND (expires_at IS NULL OR expires_at > now())
RETURNING {SESSION_COLUMNS}
"""  # noqa: S608
# Delete every expired session.
DELETE_EXPIRED = "DELETE FROM sessions WHERE expires_at <= now()"
# Delete one session (expired or not).
DELETE_SESSION = "DELETE FROM sessions WHERE id = $1 RETURNING 1"

#: Columns ``update`` may set, in a fixed order.
UPDATABLE_COLUMNS = ("tree_data", "current_branch", "metadata", "expires_at")


@functools.lru_cache(maxsize=32)
def _list_sql(include_expired: bool, order: str, direction: str) -> str:
    where = "" if include_expired else LIVE_FILTER
    return LIST_SESSIONS_TEMPLATE.format(where=where, order=order, direction=direction)


@functools.lru_cache(maxsize=32)
def _update_sql(columns: tuple[str, ...]) -> str:
    assert all(c in UPDATABLE_COLUMNS for c in columns)
    assignments = ", ".join(f"{c} = ${i}" for i, c in enumerate(columns, start=2))
    return UPDATE_SESSION_TEMPLATE.format(assignments=assignments)


def _id(value: Any, field: str = "id") -> uuid.UUID:
    result = v.check_uuid(value, field)
    assert result is not None
    return result


def _seconds(value: Any, field: str) -> float:
    """A positive, finite number of seconds (int, float or Decimal), at most MAX_TTL_SECONDS."""
    return v.check_duration(value, field, maximum=MAX_TTL_SECONDS)


def _tree(value: Any, field: str = "tree_data") -> Any:
    if value is None:
        raise ValidationError(field, "must not be None (use {} for an empty tree)")
    return v.check_json(value, field)


def _metadata(value: Any, field: str = "metadata") -> dict[str, Any]:
    result = v.check_json_object(value, field)
    assert result is not None
    return result


class SessionRepository(Repository):
    """Session trees: create (with expiry), read, list, update, merge metadata, expire, clean up."""

    __slots__ = ()

    async def create(
        self,
        tree_data: Any = None,
        current_branch: str | None = None,
        metadata: dict[str, Any] | None = None,
        expires_at: dt.datetime | None = None,
        *,
        ttl_seconds: float | None = None,
        id: uuid.UUID | str | None = None,
    ) -> Session:
        """Insert a session; ConflictError if the id exists.

        Expiry: ``expires_at``, or ``ttl_seconds`` after the DB clock's now (not both); neither = never.
        """
        session_id = v.check_uuid(id, "id", optional=True) or new_id()
        tree = {} if tree_data is None else _tree(tree_data)
        branch = v.check_text(current_branch, "current_branch", optional=True)
        meta = {} if metadata is None else _metadata(metadata)
        expires = v.check_timestamp(expires_at, "expires_at", optional=True)
        ttl = None if ttl_seconds is None else _seconds(ttl_seconds, "ttl_seconds")
        if expires is not None and ttl is not None:
            raise ValidationError("ttl_seconds", "give either expires_at or ttl_seconds, not both")
        args = (session_id, tree, branch, meta, expires, ttl)

        async def insert(con: Connection, attempt: int) -> Session:
            row = await con.fetchrow(INSERT_SESSION, *args)
            if row is None:
                if attempt > 1:  # our own row, written by an attempt whose answer was lost
                    row = await con.fetchrow(SELECT_SESSION_ANY, session_id)
                    ours = {"tree_data": args[1], "current_branch": args[2]}
                    if row is not None and not written_by_us(row, ours):
                        row = None  # another session already had this id
                if row is None:
                    raise ConflictError(f"session {session_id} already exists", constraint="sessions_pkey")
            return Session(*row)

        return await self.db.run(insert, retry=True)

    async def find_by_id(self, id: uuid.UUID | str) -> Session | None:
        """The session with this id, or None if it does not exist or has expired (DB clock)."""
        row = await self.db.fetchrow(SELECT_SESSION, _id(id), retry=True)
        return Session(*row) if row is not None else None

    async def list(
        self,
        include_expired: bool = False,
        limit: int | None = None,
        offset: int | None = None,
        order_by: str = "created_at",
        order_direction: str = "desc",
    ) -> builtins.list[Session]:
        """Sessions (live only unless include_expired) by created_at, updated_at or expires_at, then id."""
        inc = v.check_bool(include_expired, "include_expired")
        lim = v.check_limit(limit)
        off = v.check_offset(offset)
        order = v.check_order(order_by, SESSION_ORDER_COLUMNS, default="created_at")
        direction = v.check_direction(order_direction)
        rows = await self.db.fetch(_list_sql(inc, order, direction), lim, off, retry=True)
        return [Session(*r) for r in rows]

    async def count(self, include_expired: bool = False) -> int:
        """Number of sessions (live only unless ``include_expired``)."""
        inc = v.check_bool(include_expired, "include_expired")
        return int(await self.db.fetchval(COUNT_ALL if inc else COUNT_LIVE, retry=True))

    async def exists(self, id: uuid.UUID | str) -> bool:
        """Whether a live (not expired) session with this id exists."""
        return bool(await self.db.fetchval(SESSION_EXISTS, _id(id), retry=True))

    async def update(
        self,
        id: uuid.UUID | str,
        *,
        tree_data: Any = UNSET,
        current_branch: str | Unset | None = UNSET,
        metadata: dict[str, Any] | Unset = UNSET,
        expires_at: dt.datetime | Unset | None = UNSET,
    ) -> Session | None:
        """Set the given fields (``current_branch``/``expires_at`` None clear them; metadata is replaced).

        None if the session does not exist or has expired.
        """
        session_id = _id(id)
        columns: builtins.list[str] = []
        values: builtins.list[Any] = []
        if tree_data is not UNSET:
            columns.append("tree_data")
            values.append(_tree(tree_data))
        if current_branch is not UNSET:
            columns.append("current_branch")
            values.append(v.check_text(current_branch, "current_branch", optional=True))
        if metadata is not UNSET:
            columns.append("metadata")
            values.append(_metadata(metadata))
        if expires_at is not UNSET:
            columns.append("expires_at")
            values.append(v.check_timestamp(expires_at, "expires_at", optional=True))
        if not columns:
            return await self.find_by_id(session_id)
        row = await self.db.fetchrow(_update_sql(tuple(columns)), session_id, *values, retry=True)
        return Session(*row) if row is not None else None

    async def update_tree_data(
        self, id: uuid.UUID | str, tree_data: Any, current_branch: str | None = None
    ) -> Session | None:
        """Replace the tree; also move to ``current_branch`` when given (None leaves the branch as is)."""
        session_id = _id(id)
        tree = _tree(tree_data)
        branch = v.check_text(current_branch, "current_branch", optional=True)
        row = await self.db.fetchrow(UPDATE_TREE_DATA, session_id, tree, branch, retry=True)
        return Session(*row) if row is not None else None

    async def merge_metadata(self, id: uuid.UUID | str, patch: dict[str, Any]) -> Session | None:
        """Merge ``patch`` into the metadata atomically (top-level keys, ``metadata || patch``).

        Concurrent merges of different keys all survive. None if the session is missing or expired.
        """
        session_id = _id(id)
        p = _metadata(patch, "patch")
        # A shallow merge is idempotent, so a retry after a lost answer cannot change the result.
        row = await self.db.fetchrow(MERGE_METADATA, session_id, p, retry=True)
        return Session(*row) if row is not None else None

    async def find_by_branch(
        self, branch: str, limit: int | None = None, offset: int | None = None
    ) -> builtins.list[Session]:
        """Live sessions whose current_branch is ``branch``, most recently updated first (ties by id)."""
        b = v.check_text(branch, "branch")
        lim = v.check_limit(limit)
        off = v.check_offset(offset)
        rows = await self.db.fetch(FIND_BY_BRANCH, b, lim, off, retry=True)
        return [Session(*r) for r in rows]

    async def extend_expiration(self, id: uuid.UUID | str, seconds: float) -> Session | None:
        """Push a live session's expiry ``seconds`` (> 0) past the later of its expiry and now (DB clock).

        A session that never expired gets ``now() + seconds``. None if missing or already expired.
        """
        session_id = _id(id)
        secs = _seconds(seconds, "seconds")
        # Not retried: a second application would extend twice.
        row = await self.db.fetchrow(EXTEND_EXPIRATION, session_id, secs, retry=False)
        return Session(*row) if row is not None else None

    async def cleanup_expired(self) -> int:
        """Delete every expired session (DB clock); the number deleted."""
        status = await self.db.execute(DELETE_EXPIRED, retry=True)
        return int(status.rsplit(" ", 1)[-1])

    async def delete(self, id: uuid.UUID | str) -> bool:
        """Delete a session, expired or not. True if a row was deleted."""
        return await self.db.fetchval(DELETE_SESSION, _id(id), retry=True) is not None

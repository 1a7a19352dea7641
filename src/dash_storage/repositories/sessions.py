"""SessionRepository: session trees with optional expiry.

Expiry is judged by the database clock: a session whose ``expires_at <= now()`` is gone for every
read and update here (find_by_id / exists / list / count / find_by_branch skip it, updates return
None) until ``cleanup_expired`` deletes it. ``expires_at`` NULL means the session never expires.
"""

from __future__ import annotations

import builtins
import datetime as dt
import uuid
from typing import Any

from dash_storage import sql
from dash_storage.core import validation as v
from dash_storage.core.errors import ValidationError
from dash_storage.core.ids import new_id
from dash_storage.core.models import UNSET, Session, Unset
from dash_storage.repositories.base import ListReads, Repository, given

__all__ = ["MAX_TTL_SECONDS", "SESSION_ORDER_COLUMNS", "SessionRepository", "statements"]

#: Longest ttl / extension accepted (about 100 years).
MAX_TTL_SECONDS = 100 * 366 * 86_400
#: Public ``order_by`` names of ``list`` -> SQL column, the same name (a fixed allow-list, never input).
SESSION_ORDER_COLUMNS = {column: column for column in ("created_at", "updated_at", "expires_at")}

# The statements, in the order of the methods that send them.
_Q = sql.load("sessions")
INSERT_SESSION = _Q["insert"]
SELECT_SESSION_ANY = _Q["find_any"]
SELECT_SESSION = _Q["find_by_id"]
_LISTS = ListReads(_Q, "part_list", SESSION_ORDER_COLUMNS)
#: The reads of list() per (order column, direction): of live sessions, and of all.
LIST_LIVE_SESSIONS = _LISTS.form("list_live_by", "part_live")
LIST_ALL_SESSIONS = _LISTS.form("list_all_by")
#: Every statement composed here, by name: ``statements()`` (the statement registry PREPAREs each).
statements = _LISTS.statements
COUNT_LIVE = _Q["count_live"]
COUNT_ALL = _Q["count_all"]
SESSION_EXISTS = _Q["exists"]
UPDATE_SESSION = _Q["update"]
UPDATE_TREE_DATA = _Q["update_tree_data"]
MERGE_METADATA = _Q["merge_metadata"]
FIND_BY_BRANCH = _Q["find_by_branch"]
EXTEND_EXPIRATION = _Q["extend_expiration"]
DELETE_EXPIRED = _Q["delete_expired"]
DELETE_SESSION = _Q["delete"]


def _seconds(value: Any, field: str) -> float:
    """A positive, finite number of seconds (int, float or Decimal), at most MAX_TTL_SECONDS."""
    return v.check_duration(value, field, maximum=MAX_TTL_SECONDS)


def _tree(value: Any, field: str = "tree_data") -> Any:
    if value is None:
        raise ValidationError(field, "must not be None (use {} for an empty tree)")
    return v.check_json(value, field)


def _metadata(value: Any, field: str = "metadata") -> dict[str, Any]:
    return v.check_json_object(value, field)


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
        ours = {"tree_data": tree, "current_branch": branch}
        return await self._create(Session, INSERT_SESSION, SELECT_SESSION_ANY, args, ours, "session")

    async def find_by_id(self, id: uuid.UUID | str) -> Session | None:
        """The session with this id, or None if it does not exist or has expired (DB clock)."""
        return await self._one(Session, SELECT_SESSION, v.check_uuid(id, "id"), replica=True)

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
        reads = LIST_ALL_SESSIONS if inc else LIST_LIVE_SESSIONS
        return await self._many(Session, reads[order, direction], lim, off)

    async def count(self, include_expired: bool = False) -> int:
        """Number of sessions (live only unless ``include_expired``)."""
        inc = v.check_bool(include_expired, "include_expired")
        return int(await self.db.fetchval(COUNT_ALL if inc else COUNT_LIVE, retry=True, replica=True))

    async def exists(self, id: uuid.UUID | str) -> bool:
        """Whether a live (not expired) session with this id exists."""
        return bool(await self.db.fetchval(SESSION_EXISTS, v.check_uuid(id, "id"), retry=True, replica=True))

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
        session_id = v.check_uuid(id, "id")
        fields = (
            given(tree_data, _tree),
            given(current_branch, lambda x: v.check_text(x, "current_branch", optional=True)),
            given(metadata, _metadata),
            given(expires_at, lambda x: v.check_timestamp(x, "expires_at", optional=True)),
        )
        return await self._update(Session, UPDATE_SESSION, SELECT_SESSION, session_id, *fields)

    async def update_tree_data(
        self, id: uuid.UUID | str, tree_data: Any, current_branch: str | None = None
    ) -> Session | None:
        """Replace the tree; also move to ``current_branch`` when given (None leaves the branch as is)."""
        session_id = v.check_uuid(id, "id")
        tree = _tree(tree_data)
        branch = v.check_text(current_branch, "current_branch", optional=True)
        return await self._one(Session, UPDATE_TREE_DATA, session_id, tree, branch)

    async def merge_metadata(self, id: uuid.UUID | str, patch: dict[str, Any]) -> Session | None:
        """Merge ``patch`` into the metadata atomically (top-level keys, ``metadata || patch``).

        Concurrent merges of different keys all survive. None if the session is missing or expired.
        """
        session_id = v.check_uuid(id, "id")
        p = _metadata(patch, "patch")
        # A shallow merge is idempotent, so a retry after a lost answer cannot change the result.
        return await self._one(Session, MERGE_METADATA, session_id, p)

    async def find_by_branch(
        self, branch: str, limit: int | None = None, offset: int | None = None
    ) -> builtins.list[Session]:
        """Live sessions whose current_branch is ``branch``, most recently updated first (ties by id)."""
        b = v.check_text(branch, "branch")
        lim = v.check_limit(limit)
        off = v.check_offset(offset)
        return await self._many(Session, FIND_BY_BRANCH, b, lim, off)

    async def extend_expiration(self, id: uuid.UUID | str, seconds: float) -> Session | None:
        """Push a live session's expiry ``seconds`` (> 0) past the later of its expiry and now (DB clock).

        A session that never expired gets ``now() + seconds``. None if missing or already expired.
        """
        session_id = v.check_uuid(id, "id")
        secs = _seconds(seconds, "seconds")
        # Not retried: a second application would extend twice.
        return await self._one(Session, EXTEND_EXPIRATION, session_id, secs, retry=False)

    async def cleanup_expired(self) -> int:
        """Delete every expired session (DB clock); the number deleted."""
        status = await self.db.execute(DELETE_EXPIRED, retry=True)
        return int(status.rsplit(" ", 1)[-1])

    async def delete(self, id: uuid.UUID | str) -> bool:
        """Delete a session, expired or not. True if a row was deleted."""
        return await self.db.fetchval(DELETE_SESSION, v.check_uuid(id, "id"), retry=True) is not None

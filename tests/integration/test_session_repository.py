"""SessionRepository against a real PostgreSQL: expiry by the database clock, atomic merges, bad input."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from dash_storage import ConflictError, Database, ValidationError
from dash_storage.core.ids import new_id
from dash_storage.core.models import Session
from dash_storage.repositories.sessions import SessionRepository
from tests.factories import snapshot

UTC = dt.UTC


async def db_time(db: Database, offset: dt.timedelta = dt.timedelta(0)) -> dt.datetime:
    """The database clock, shifted by ``offset``."""
    value: dt.datetime = await db.fetchval("SELECT clock_timestamp() + $1::interval", offset)
    return value


async def _expired(db: Database, repo: SessionRepository, **fields: Any) -> Session:
    return await repo.create(expires_at=await db_time(db, dt.timedelta(seconds=-1)), **fields)


async def test_create_defaults_and_find(db: Database) -> None:
    repo = SessionRepository(db)
    session = await repo.create()
    assert isinstance(session, Session)
    assert (session.tree_data, session.current_branch, session.metadata, session.expires_at) == (
        {},
        None,
        {},
        None,
    )
    assert session.id.version == 7
    assert await repo.find_by_id(session.id) == session
    assert await repo.find_by_id(str(session.id)) == session


async def test_create_with_fields_and_honoured_id(db: Database) -> None:
    repo = SessionRepository(db)
    given = uuid.uuid4()
    tree = {"root": {"children": [{"id": 1, "text": "ü"}]}}
    when = dt.datetime(2999, 1, 1, tzinfo=UTC)
    session = await repo.create(tree, "main", {"user": "u1"}, when, id=given)
    assert (session.id, session.tree_data, session.current_branch) == (given, tree, "main")
    assert (session.metadata, session.expires_at) == ({"user": "u1"}, when)
    row = await db.fetchrow("SELECT tree_data, current_branch, metadata FROM sessions WHERE id = $1", given)
    assert tuple(row) == (tree, "main", {"user": "u1"})
    with pytest.raises(ConflictError):
        await repo.create(id=given)
    assert await repo.count() == 1
    # tree_data may be any JSON value, not only an object.
    assert (await repo.create([1, "two"])).tree_data == [1, "two"]


async def test_ttl_is_computed_by_the_database(db: Database) -> None:
    repo = SessionRepository(db)
    session = await repo.create(ttl_seconds=90)
    assert session.expires_at is not None
    # created_at and expires_at come from the same now() of one statement.
    assert session.expires_at - session.created_at == dt.timedelta(seconds=90)
    fractional = await repo.create(ttl_seconds=1.5)
    assert fractional.expires_at - fractional.created_at == dt.timedelta(seconds=1.5)  # type: ignore[operator]


async def test_expired_session_is_gone_for_reads_and_updates(db: Database) -> None:
    repo = SessionRepository(db)
    live = await repo.create(current_branch="b", metadata={"k": 1})
    expired = await _expired(db, repo, current_branch="b", metadata={"k": 1})
    assert await repo.find_by_id(expired.id) is None
    assert await repo.exists(expired.id) is False
    assert await repo.exists(live.id) is True
    assert [s.id for s in await repo.find_by_branch("b")] == [live.id]
    assert [s.id for s in await repo.list()] == [live.id]
    assert {s.id for s in await repo.list(include_expired=True)} == {live.id, expired.id}
    assert (await repo.count(), await repo.count(include_expired=True)) == (1, 2)
    before = await snapshot(db)
    assert await repo.update(expired.id, current_branch="c") is None
    assert await repo.update(expired.id, expires_at=None) is None
    assert await repo.update(expired.id) is None
    assert await repo.update_tree_data(expired.id, {"x": 1}) is None
    assert await repo.merge_metadata(expired.id, {"y": 2}) is None
    assert await repo.extend_expiration(expired.id, 3600) is None
    assert await snapshot(db) == before


async def test_ttl_expiry_follows_the_database_clock(db: Database) -> None:
    repo = SessionRepository(db)
    session = await repo.create(ttl_seconds=1)
    assert await repo.find_by_id(session.id) == session  # one second is far away for one round trip
    # Wait until the database clock (not ours) has passed expires_at.
    for _ in range(100):
        if await db.fetchval("SELECT clock_timestamp() > $1", session.expires_at):
            break
        await asyncio.sleep(0.05)
    assert await repo.find_by_id(session.id) is None
    assert await repo.cleanup_expired() == 1
    assert await db.fetchval("SELECT count(*) FROM sessions") == 0


async def test_cleanup_expired_deletes_only_expired(db: Database) -> None:
    repo = SessionRepository(db)
    forever = await repo.create()
    later = await repo.create(ttl_seconds=3600)
    for _ in range(3):
        await _expired(db, repo)
    assert await repo.cleanup_expired() == 3
    assert await repo.cleanup_expired() == 0
    assert {r["id"] for r in await db.fetch("SELECT id FROM sessions")} == {forever.id, later.id}


async def test_list_order_ties_and_paging(db: Database) -> None:
    ids = sorted(new_id() for _ in range(5))
    expires = ["2999-01-01Z", None, "2998-01-01Z", None, "2999-01-01Z"]
    for sid, exp in zip(ids, expires, strict=True):
        await db.execute(
            "INSERT INTO sessions (id, created_at, expires_at) "
            "VALUES ($1, '2024-01-01Z', $2::text::timestamptz)",
            sid,
            exp,
        )
    repo = SessionRepository(db)
    assert [s.id for s in await repo.list()] == ids[::-1]
    assert [s.id for s in await repo.list(order_direction="asc")] == ids
    by_expiry = await repo.list(order_by="expires_at", order_direction="asc")
    assert [s.id for s in by_expiry] == [ids[2], ids[0], ids[4], ids[1], ids[3]]  # NULL (never) last
    pages = [await repo.list(limit=2, offset=o) for o in (0, 2, 4)]
    assert [s.id for p in pages for s in p] == ids[::-1]
    await db.execute("UPDATE sessions SET current_branch = 'x' WHERE id = $1", ids[1])
    assert (await repo.list(order_by="updated_at"))[0].id == ids[1]


async def test_update_partial(db: Database) -> None:
    repo = SessionRepository(db)
    session = await repo.create({"a": 1}, "main", {"m": 1}, ttl_seconds=3600)
    updated = await repo.update(session.id, current_branch="dev")
    assert updated is not None
    assert (updated.tree_data, updated.current_branch, updated.metadata) == ({"a": 1}, "dev", {"m": 1})
    assert updated.expires_at == session.expires_at
    when = dt.datetime(2999, 6, 1, tzinfo=UTC)
    updated = await repo.update(
        str(session.id), tree_data={"b": 2}, current_branch=None, metadata={"n": 2}, expires_at=when
    )
    assert updated is not None
    assert (updated.tree_data, updated.current_branch, updated.metadata) == ({"b": 2}, None, {"n": 2})
    assert updated.expires_at == when
    never = await repo.update(session.id, expires_at=None)
    assert never is not None and never.expires_at is None
    assert await repo.update(session.id) == never
    assert await repo.update(uuid.uuid4(), current_branch="x") is None


async def test_update_tree_data_keeps_branch_unless_given(db: Database) -> None:
    repo = SessionRepository(db)
    session = await repo.create({"v": 1}, "main")
    kept = await repo.update_tree_data(session.id, {"v": 2})
    assert kept is not None and (kept.tree_data, kept.current_branch) == ({"v": 2}, "main")
    moved = await repo.update_tree_data(session.id, [], "feature")
    assert moved is not None and (moved.tree_data, moved.current_branch) == ([], "feature")
    assert await repo.update_tree_data(uuid.uuid4(), {}) is None


async def test_merge_metadata(db: Database) -> None:
    repo = SessionRepository(db)
    session = await repo.create(metadata={"keep": 1, "replace": "old", "nested": {"a": 1}})
    merged = await repo.merge_metadata(session.id, {"replace": "new", "added": [1], "nested": {"b": 2}})
    assert merged is not None
    assert merged.metadata == {"keep": 1, "replace": "new", "added": [1], "nested": {"b": 2}}  # shallow
    assert await repo.merge_metadata(session.id, {}) == await repo.find_by_id(session.id)
    assert await repo.merge_metadata(uuid.uuid4(), {"x": 1}) is None


async def test_concurrent_merges_keep_every_key(db: Database) -> None:
    repo = SessionRepository(db)
    session = await repo.create(metadata={"base": True})
    results = await asyncio.gather(*(repo.merge_metadata(session.id, {f"k{i}": i}) for i in range(20)))
    assert all(r is not None for r in results)
    final = await repo.find_by_id(session.id)
    assert final is not None
    assert final.metadata == {"base": True, **{f"k{i}": i for i in range(20)}}


async def test_find_by_branch_is_deterministic(db: Database) -> None:
    ids = sorted(new_id() for _ in range(4))
    # One statement: every row gets the same updated_at, so only the id breaks the tie.
    await db.execute(
        "INSERT INTO sessions (id, current_branch) SELECT unnest($1::uuid[]), 'b'",
        ids,
    )
    await db.execute("INSERT INTO sessions (current_branch) VALUES ('other'), (NULL)")
    repo = SessionRepository(db)
    assert [s.id for s in await repo.find_by_branch("b")] == ids[::-1]
    assert [s.id for s in await repo.find_by_branch("b", limit=2, offset=1)] == ids[::-1][1:3]
    await repo.merge_metadata(ids[0], {"touched": True})  # most recently updated comes first
    assert (await repo.find_by_branch("b"))[0].id == ids[0]
    assert await repo.find_by_branch("nope") == []


async def test_extend_expiration(db: Database) -> None:
    repo = SessionRepository(db)
    session = await repo.create(ttl_seconds=60)
    extended = await repo.extend_expiration(session.id, 30)
    assert extended is not None and session.expires_at is not None
    assert extended.expires_at == session.expires_at + dt.timedelta(seconds=30)
    never = await repo.create()
    limited = await repo.extend_expiration(str(never.id), 10.5)
    assert limited is not None and limited.expires_at is not None
    # Starts from the database's now() of the extending statement.
    assert limited.expires_at - limited.updated_at == dt.timedelta(seconds=10.5)
    assert await repo.extend_expiration(uuid.uuid4(), 10) is None


async def test_delete(db: Database) -> None:
    repo = SessionRepository(db)
    session = await repo.create()
    expired = await _expired(db, repo)
    assert await repo.delete(session.id) is True
    assert await repo.delete(session.id) is False
    assert await repo.delete(expired.id) is True  # the row is removed even though it had expired
    assert await db.fetchval("SELECT count(*) FROM sessions") == 0


Call = Callable[[SessionRepository, uuid.UUID], Awaitable[Any]]
AWARE = dt.datetime(2999, 1, 1, tzinfo=UTC)

BAD_INPUT: list[tuple[str, Call, str]] = [
    ("create id", lambda r, i: r.create(id="sess-1"), "id"),
    ("create tree NaN", lambda r, i: r.create({"x": float("nan")}), "tree_data"),
    ("create tree bytes", lambda r, i: r.create(b"{}"), "tree_data"),
    ("create branch long", lambda r, i: r.create(current_branch="b" * 256), "current_branch"),
    ("create branch type", lambda r, i: r.create(current_branch=1), "current_branch"),  # type: ignore[arg-type]
    ("create metadata list", lambda r, i: r.create(metadata=[1]), "metadata"),  # type: ignore[arg-type]
    ("create metadata str", lambda r, i: r.create(metadata="{}"), "metadata"),  # type: ignore[arg-type]
    ("create expires naive", lambda r, i: r.create(expires_at=dt.datetime(2999, 1, 1)), "expires_at"),
    ("create expires str", lambda r, i: r.create(expires_at="2999-01-01"), "expires_at"),  # type: ignore[arg-type]
    ("create ttl zero", lambda r, i: r.create(ttl_seconds=0), "ttl_seconds"),
    ("create ttl negative", lambda r, i: r.create(ttl_seconds=-5), "ttl_seconds"),
    ("create ttl NaN", lambda r, i: r.create(ttl_seconds=float("nan")), "ttl_seconds"),
    ("create ttl str", lambda r, i: r.create(ttl_seconds="60"), "ttl_seconds"),  # type: ignore[arg-type]
    ("create ttl bool", lambda r, i: r.create(ttl_seconds=True), "ttl_seconds"),
    ("create ttl huge", lambda r, i: r.create(ttl_seconds=1e12), "ttl_seconds"),
    ("create ttl and expires", lambda r, i: r.create(expires_at=AWARE, ttl_seconds=5), "ttl_seconds"),
    ("find_by_id", lambda r, i: r.find_by_id("nope"), "id"),
    ("list include_expired", lambda r, i: r.list(include_expired="yes"), "include_expired"),  # type: ignore[arg-type]
    ("list limit", lambda r, i: r.list(limit=0), "limit"),
    ("list offset", lambda r, i: r.list(offset=-1), "offset"),
    ("list order_by", lambda r, i: r.list(order_by="tree_data"), "order_by"),
    ("list direction", lambda r, i: r.list(order_direction="random()"), "order_direction"),
    ("count include_expired", lambda r, i: r.count(include_expired=1), "include_expired"),  # type: ignore[arg-type]
    ("exists id", lambda r, i: r.exists(""), "id"),
    ("update id", lambda r, i: r.update("x", current_branch="b"), "id"),
    ("update tree None", lambda r, i: r.update(i, tree_data=None), "tree_data"),
    ("update tree bad", lambda r, i: r.update(i, tree_data={"a": {1, 2}}), "tree_data"),
    ("update branch long", lambda r, i: r.update(i, current_branch="b" * 256), "current_branch"),
    ("update metadata None", lambda r, i: r.update(i, metadata=None), "metadata"),  # type: ignore[arg-type]
    ("update metadata list", lambda r, i: r.update(i, current_branch="ok", metadata=[]), "metadata"),  # type: ignore[arg-type]
    ("update expires naive", lambda r, i: r.update(i, expires_at=dt.datetime(2030, 1, 1)), "expires_at"),
    ("tree id", lambda r, i: r.update_tree_data("x", {}), "id"),
    ("tree None", lambda r, i: r.update_tree_data(i, None), "tree_data"),
    ("tree branch type", lambda r, i: r.update_tree_data(i, {}, 5), "current_branch"),  # type: ignore[arg-type]
    ("merge id", lambda r, i: r.merge_metadata("x", {}), "id"),
    ("merge patch list", lambda r, i: r.merge_metadata(i, [("a", 1)]), "patch"),  # type: ignore[arg-type]
    ("merge patch None", lambda r, i: r.merge_metadata(i, None), "patch"),  # type: ignore[arg-type]
    ("merge patch str", lambda r, i: r.merge_metadata(i, '{"a": 1}'), "patch"),  # type: ignore[arg-type]
    ("merge patch NUL", lambda r, i: r.merge_metadata(i, {"a": "\x00"}), "patch"),
    ("branch None", lambda r, i: r.find_by_branch(None), "branch"),  # type: ignore[arg-type]
    ("branch long", lambda r, i: r.find_by_branch("b" * 256), "branch"),
    ("branch limit", lambda r, i: r.find_by_branch("b", limit=-1), "limit"),
    ("extend id", lambda r, i: r.extend_expiration("x", 10), "id"),
    ("extend zero", lambda r, i: r.extend_expiration(i, 0), "seconds"),
    ("extend negative", lambda r, i: r.extend_expiration(i, -10), "seconds"),
    ("extend inf", lambda r, i: r.extend_expiration(i, float("inf")), "seconds"),
    ("extend str", lambda r, i: r.extend_expiration(i, "10"), "seconds"),  # type: ignore[arg-type]
    ("delete id", lambda r, i: r.delete(None), "id"),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(("call", "field"), [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
async def test_bad_input_is_rejected_and_changes_nothing(db: Database, call: Call, field: str) -> None:
    repo = SessionRepository(db)
    session = await repo.create({"t": 1}, "main", {"m": 1}, ttl_seconds=3600)
    before = await snapshot(db)
    with pytest.raises(ValidationError) as err:
        await call(repo, session.id)
    assert err.value.field == field
    assert field in str(err.value)
    assert await snapshot(db) == before

"""Legacy rows → batches of PostgreSQL records: swarms (with their budgets), agents and events.

Each converter takes rows as the reader returns them (rowid first, then the columns of
:data:`~dash_storage.legacy.reader.LEGACY_COLUMNS`), maps ids and statuses, repairs what can be
repaired and rejects what cannot, all recorded on the :class:`~dash_storage.legacy.report.Batch`.
References are resolved against ``swarms`` / ``agents``: legacy id → uuid (None: known missing).

A required time that cannot be read (a swarm's ``created_at``, an agent's ``spawned_at``, an
event's ``timestamp``) becomes :data:`~dash_storage.legacy.values.UNREADABLE_TIME` (1970-01-01Z),
and its original text is kept in the row: ``config["legacy_created_at"]``,
``metadata["legacy_spawned_at"]``, ``payload["_legacy_timestamp"]``.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, Final

import orjson

from dash_storage.core.models import EntityType, Severity
from dash_storage.legacy.mapping import (
    AgentRef,
    SwarmRef,
    budget_uuid,
    legacy_uuid,
    map_agent_status,
    map_swarm_status,
    status_label,
)
from dash_storage.legacy.report import Batch, Reject, RowRepairs
from dash_storage.legacy.values import (
    BIGINT_MAX,
    INT_MAX,
    NOT_JSON,
    NOT_OBJECT,
    NUL_REMOVED,
    id_label,
    id_problem,
    int_column,
    json_column,
    json_object,
    json_value,
    jsonb_text,
    optional_time,
    parse_time,
    raw,
    required_time,
    strip_nul,
    text_value,
    to_money,
    unreadable_time,
)

__all__ = ["EVENT_TYPE_DEFAULT", "convert_agents", "convert_events", "convert_swarms"]

EVENT_TYPE_DEFAULT: Final = "legacy.unknown"
_ENTITY_TYPES: Final = frozenset(e.value for e in EntityType)
_SEVERITIES: Final[Mapping[str, str]] = {
    **{s.value: s.value for s in Severity},
    "warn": "warning",
    "fatal": "critical",
    "err": "error",
    "trace": "debug",
}
_LOSSY: Final = "text that was not valid UTF-8: bad bytes replaced with U+FFFD"


def _repair(fix: RowRepairs | None, batch: Batch, lid: str, field: str, action: str) -> RowRepairs:
    """Record a repair of an event; its row's RowRepairs is made on the first (most events have none)."""
    fix = fix if fix is not None else RowRepairs(batch, "events", lid)
    fix.add(field, action)
    return fix


# -- swarms -----------------------------------------------------------------------------------------


def convert_swarms(rows: list[tuple[Any, ...]], lossy: set[int]) -> Batch:
    """A batch of swarm records (and their budgets); ``lossy``: rowids read with bad UTF-8."""
    batch = Batch("swarms")
    for (
        rowid,
        lid,
        name,
        status,
        config,
        agents,
        created_at,
        completed_at,
        allocated,
        consumed,
        metrics,
    ) in rows:
        batch.read += 1
        if not isinstance(lid, str) or not lid:
            batch.rejects.append(Reject("swarms", id_label(lid), id_problem(lid)))
            continue
        fix = RowRepairs(batch, "swarms", lid)
        if lossy and rowid in lossy:
            fix.add("*", _LOSSY)
        sid = legacy_uuid("swarms", lid)
        name_text = text_value(name, "name", fix)
        if not name_text:
            name_text = lid
            fix.add("name", "missing name; the legacy id is used")
        new_status = map_swarm_status(status)
        batch.mappings[("swarms", f"{status_label(status)}→{new_status}")] += 1
        cfg = json_object(config, "config", fix, null={})
        cfg["legacy_id"] = lid
        if agents is not None:
            cfg["legacy_agents"] = json_value(agents, "agents", fix)
        if metrics is not None:
            cfg["legacy_metrics"] = json_value(metrics, "metrics", fix)
        created = required_time(created_at, "created_at", fix, keep=cfg, key="legacy_created_at")
        cfg_text = jsonb_text(cfg, "config", fix)
        completed = optional_time(completed_at, "completed_at", fix)
        batch.records.append((sid, name_text, cfg_text, new_status, created, completed))
        batch.ids.append(sid)
        batch.new_refs[lid] = sid
        if fix.count:
            batch.repaired += 1
        _convert_budget(batch, lid, sid, allocated, consumed)
    return batch


def _convert_budget(batch: Batch, lid: str, sid: uuid.UUID, allocated: Any, consumed: Any) -> None:
    if allocated is None and consumed is None:
        return  # the legacy swarm had no budget
    batch.budget_read += 1
    fix = RowRepairs(batch, "budgets", lid)
    alloc, alloc_note, alloc_err = to_money(allocated)
    cons, cons_note, cons_err = to_money(consumed)
    if alloc_err or cons_err:
        reason = f"budget_allocated {alloc_err}" if alloc_err else f"budget_consumed {cons_err}"
        batch.budget_rejects.append(Reject("budgets", lid, reason))
        return
    if alloc_note:
        fix.add("allocated", alloc_note)
    if cons_note:
        fix.add("consumed", cons_note)
    if alloc is None:
        alloc = Decimal(0)
    if cons is None:
        cons = Decimal(0)
    if cons > alloc:
        fix.add("allocated", f"consumed {cons} exceeded allocated {alloc}; allocated raised to {cons}")
        alloc = cons
    batch.budgets.append((budget_uuid(lid), sid, alloc, cons))
    if fix.count:
        batch.budget_repaired += 1


# -- agents -----------------------------------------------------------------------------------------


def convert_agents(rows: list[tuple[Any, ...]], swarms: Mapping[str, SwarmRef], lossy: set[int]) -> Batch:
    """A batch of agent records; an agent whose swarm is not in ``swarms`` is rejected."""
    batch = Batch("agents")
    for row in rows:
        (
            rowid,
            lid,
            label,
            status,
            model,
            task,
            spawned_at,
            completed_at,
            runtime,
            pause_time,
            paused_by,
            swarm_key,
            parent_id,
            child_ids,
            context,
            code,
            reasoning,
            retry_count,
            max_retries,
            last_error,
            budget_limit,
            safety_boundaries,
            metadata,
        ) = row
        batch.read += 1
        if not isinstance(lid, str) or not lid:
            batch.rejects.append(Reject("agents", id_label(lid), id_problem(lid)))
            continue
        if not isinstance(swarm_key, str) or not swarm_key:
            batch.rejects.append(Reject("agents", lid, "agent has no swarm_id (agents.swarm_id is NOT NULL)"))
            continue
        swarm_uuid = swarms.get(swarm_key)
        if swarm_uuid is None:
            batch.rejects.append(Reject("agents", lid, f"swarm {swarm_key!r} not found"))
            continue
        fix = RowRepairs(batch, "agents", lid)
        if lossy and rowid in lossy:
            fix.add("*", _LOSSY)
        aid = legacy_uuid("agents", lid)
        new_status, lifecycle = map_agent_status(status)
        batch.mappings[("agents", f"{status_label(status)}→{new_status}")] += 1
        batch.mappings[("agents.lifecycle_state", f"{status_label(status)}→{lifecycle}")] += 1
        meta = json_object(metadata, "metadata", fix, null={})
        meta["legacy_id"] = lid
        if parent_id is not None and parent_id != "":
            meta["legacy_parent_id"] = raw(parent_id)
        if child_ids is not None:
            children = json_value(child_ids, "child_ids", fix)
            if children != []:
                meta["legacy_child_ids"] = children
        spawned = required_time(spawned_at, "spawned_at", fix, keep=meta, key="legacy_spawned_at")
        meta_text = jsonb_text(meta, "metadata", fix)
        runtime_value = int_column(runtime, "runtime", fix, default=0, maximum=BIGINT_MAX)
        retries = int_column(retry_count, "retry_count", fix, default=0, maximum=INT_MAX)
        max_retry = int_column(max_retries, "max_retries", fix, default=3, maximum=INT_MAX)
        limit, limit_note, limit_err = to_money(budget_limit)
        if limit_err:
            fix.add("budget_limit", f"{limit_err}; set to NULL")
            limit = None
        elif limit_note:
            fix.add("budget_limit", limit_note)
        batch.records.append(
            (
                aid,
                swarm_uuid,
                text_value(label, "label", fix),
                new_status,
                lifecycle,
                text_value(model, "model", fix),
                text_value(task, "task", fix),
                json_column(context, "context", fix),
                json_column(code, "code", fix),
                json_column(reasoning, "reasoning", fix),
                json_column(safety_boundaries, "safety_boundaries", fix),
                spawned,
                optional_time(completed_at, "completed_at", fix),
                optional_time(pause_time, "pause_time", fix),
                text_value(paused_by, "paused_by", fix),
                runtime_value,
                retries,
                max_retry,
                text_value(last_error, "last_error", fix),
                limit,
                meta_text,
            )
        )
        batch.ids.append(aid)
        batch.new_refs[lid] = (aid, swarm_uuid)
        if fix.count:
            batch.repaired += 1
    return batch


# -- events -----------------------------------------------------------------------------------------


def convert_events(
    rows: list[tuple[Any, ...]],
    batch: Batch,
    swarms: Mapping[str, SwarmRef],
    agents: Mapping[str, AgentRef],
    lossy: set[int],
) -> None:
    """Add event records to ``batch`` (called on slices of one fetched batch; the hot loop)."""
    records = batch.records
    ids = batch.ids
    rejects = batch.rejects
    loads = orjson.loads
    orjson_dumps = orjson.dumps
    decode_error = orjson.JSONDecodeError
    parse_iso = dt.datetime.fromisoformat
    utc = dt.UTC
    severities = _SEVERITIES
    entity_types = _ENTITY_TYPES
    repaired = 0
    for rowid, lid, ts, event_type, source, payload, agent_key, swarm_key in rows:
        if lid.__class__ is not str or not lid:
            rejects.append(Reject("events", id_label(lid), id_problem(lid)))
            continue
        fix: RowRepairs | None = None
        if lossy and rowid in lossy:
            fix = _repair(fix, batch, lid, "*", _LOSSY)
        # swarm and agent
        swarm_uuid: uuid.UUID | None = None
        if swarm_key is not None and swarm_key != "":
            swarm_uuid = swarms.get(swarm_key)
            if swarm_uuid is None:
                rejects.append(Reject("events", lid, f"swarm {swarm_key!r} not found"))
                continue
        agent_uuid: uuid.UUID | None = None
        missing_agent: str | None = None
        if agent_key is not None and agent_key != "":
            agent = agents.get(agent_key)
            if agent is None:
                missing_agent = raw(agent_key)
                fix = _repair(
                    fix, batch, lid, "agent_id", f"agent {missing_agent!r} not found; agent_id set to NULL"
                )
            else:
                agent_uuid = agent[0]
                if swarm_uuid is None:
                    swarm_uuid = agent[1]
                    fix = _repair(
                        fix, batch, lid, "swarm_id", "missing swarm_id; taken from the event's agent"
                    )
        if swarm_uuid is None:
            rejects.append(Reject("events", lid, "event has no swarm_id and no known agent to take it from"))
            continue
        # payload (always an object), source → entity_type
        if payload is None:
            body: dict[str, Any] = {}
        else:
            try:
                value = loads(payload)
            except decode_error:
                value = {"_legacy_raw": raw(payload)}
                fix = _repair(fix, batch, lid, "payload", NOT_JSON)
            if value.__class__ is dict:
                body = value
            else:
                body = {"_legacy_value": value}
                fix = _repair(fix, batch, lid, "payload", NOT_OBJECT)
        entity_type = "agent" if agent_key else "system"
        if source is not None:
            try:
                src = loads(source)
            except decode_error:
                src = {"_legacy_raw": raw(source)}
                fix = _repair(fix, batch, lid, "source", NOT_JSON)
            else:
                if src.__class__ is dict:
                    kind = src.get("type")
                    if kind.__class__ is str:
                        kind = kind.lower()
                        if kind in entity_types:
                            entity_type = kind
            body["_legacy_source"] = src
        if missing_agent is not None:
            body["_legacy_agent_id"] = missing_agent
        # timestamp
        when: dt.datetime
        try:
            when = parse_iso(ts)
            if when.tzinfo is None:
                when = when.replace(tzinfo=utc)
        except (TypeError, ValueError):
            parsed = parse_time(ts)  # epoch seconds / milliseconds
            if parsed is not None:
                when = parsed
            else:
                fix = fix if fix is not None else RowRepairs(batch, "events", lid)
                when = unreadable_time(ts, "timestamp", fix, keep=body, key="_legacy_timestamp")
        severity = "info"
        level = body.get("severity") or body.get("level")
        if level.__class__ is str:
            severity = severities.get(level.lower(), "info")
        # Cannot fail: everything in body came from orjson.loads or is a str from SQLite.
        body_text = orjson_dumps(body).decode()
        if "\\u0000" in body_text:
            body_text = orjson_dumps(strip_nul(body)).decode()
            fix = _repair(fix, batch, lid, "payload", NUL_REMOVED)
        # type
        if event_type.__class__ is not str or not event_type:
            fix = _repair(fix, batch, lid, "event_type", f"missing event type; set to {EVENT_TYPE_DEFAULT!r}")
            event_type = EVENT_TYPE_DEFAULT
        elif "\x00" in event_type:
            event_type = event_type.replace("\x00", "")
            fix = _repair(fix, batch, lid, "event_type", NUL_REMOVED)
        event_uuid = legacy_uuid("events", lid)
        records.append(
            (event_uuid, swarm_uuid, agent_uuid, event_type, body_text, when, entity_type, severity)
        )
        ids.append(event_uuid)
        if fix is not None:
            repaired += 1
    batch.read += len(rows)
    batch.repaired += repaired

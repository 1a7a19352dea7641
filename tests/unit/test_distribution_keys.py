"""Every statement the library sends either names the swarm it works on, or is marked global here.

Sharding by swarm (docs/SCALING.md: Citus, with swarm_id as the distribution column) routes a
statement to one node only when it pins swarm_id: an equality on it, or, for an INSERT, a value for
it in the row. Everything else fans out to every node. This test keeps that visible: each statement
of the SQL registry that touches a swarm-scoped table must pin the swarm, or match an entry of
GLOBAL, which says why it does not. A new statement that does neither fails here, so the choice is
made when the statement is written, not discovered when the data are distributed.
"""

from __future__ import annotations

import fnmatch
import re

from tests.integration.test_sql_registry import named_statements

#: Tables that would be distributed by swarm (swarms by its own id).
SWARM_SCOPED = {"swarms", "agents", "events", "budgets", "budget_ledger", "sessions"}
_TABLE = re.compile(r"\b(?:FROM|JOIN|INTO|UPDATE|TABLE)\s+(?:ONLY\s+)?([a-z_]+)", re.IGNORECASE)
_PINS_SWARM = re.compile(r"\bswarm_id\s*=\s*(?:\$\d|ANY\b|[a-z_.]*id\b)", re.IGNORECASE)
_PINS_SWARM_ID = re.compile(r"\b(?:[a-z]\.)?id\s*=\s*\$\d", re.IGNORECASE)
_INSERTS_SWARM = re.compile(r"\bINSERT\s+INTO\s+\w+\s*\([^)]*\bswarm_id\b", re.IGNORECASE | re.DOTALL)
_INSERTS_SWARM_ID = re.compile(r"\bINSERT\s+INTO\s+swarms\s*\(\s*id\b", re.IGNORECASE)

#: (pattern of "file:name", why the statement does not pin a swarm). Reads across swarms are global
#: by design; lookups by a row's own id would need the swarm (or a lookup of it) once distributed.
GLOBAL: list[tuple[str, str]] = [
    ("agents:find_by_id", "by agent id: the API takes no swarm; distributed, a lookup of the swarm"),
    ("agents:update", "by agent id (as find_by_id)"),
    ("agents:transition", "by agent id (as find_by_id)"),
    ("agents:increment_retry*", "by agent id (as find_by_id)"),
    ("agents:lock", "by agent id (as find_by_id)"),
    ("agents:delete", "by agent id (as find_by_id)"),
    ("agents:count_all", "every swarm: a fleet-wide count"),
    ("agents:count_by_status", "every swarm: a fleet-wide count"),
    ("agents:count_where", "every swarm: a fleet-wide count"),
    ("agents:list_by_*", "every swarm: a fleet-wide listing"),
    ("agents:list_where_by_*", "every swarm: a fleet-wide listing"),
    ("events:select_missing_agent", "error path after a failed batch: which agent id is missing"),
    ("events:select_event_by_id*", "by event id: the API takes no swarm"),
    ("events:select_events_by_ids", "by event ids, on the retry path of a batch"),
    ("events:select_events(*", "a filter without swarm_id: a read across swarms"),
    ("events:count_events(*", "a filter without swarm_id: a count across swarms"),
    ("events:select_stats_24h", "every swarm: the dashboard view"),
    ("budgets:find_by_id", "by budget id: the API takes no swarm"),
    ("budgets:find_by_scope", "by (scope_type, scope_id): project budgets belong to no swarm"),
    ("budgets:update", "by budget id (as find_by_id)"),
    ("budgets:delete", "by budget id (as find_by_id)"),
    ("budgets:lock", "by budget id (as find_by_id)"),
    ("budgets:reset", "by budget id (as find_by_id)"),
    ("budgets:delete_ledger", "by budget id; budget_ledger has no swarm_id yet (docs/SCALING.md)"),
    ("budgets:consume*", "by budget id; budget_ledger has no swarm_id yet (docs/SCALING.md)"),
    ("budgets:list_by_*", "every swarm: a fleet-wide listing"),
    ("budgets:list_of_scope_by_*", "by scope: project budgets belong to no swarm"),
    ("sessions:*", "sessions belong to no swarm: a table of their own, not distributed by swarm"),
    ("swarms:list*", "every swarm: the list of swarms"),
    ("swarms:count*", "every swarm: a count of swarms"),
    ("swarms:find_by_name", "by name: names are not unique per node, every swarm is searched"),
    ("events:select_missing_swarm", "error path after a failed batch: which swarm id is missing"),
    ("stream:*", "the event stream is one ordered log of every swarm"),
    ("partitions:*", "partitions, rollups and maintenance of the whole log"),
]


def _tables(text: str) -> set[str]:
    body = re.sub(r"--[^\n]*", "", text)
    return {t.lower() for t in _TABLE.findall(body)} & SWARM_SCOPED


def _pins_swarm(text: str, tables: set[str]) -> bool:
    body = re.sub(r"--[^\n]*", "", text)
    if _PINS_SWARM.search(body) or _INSERTS_SWARM.search(body):
        return True
    # swarms is distributed by its own id
    return tables == {"swarms"} and bool(_PINS_SWARM_ID.search(body) or _INSERTS_SWARM_ID.search(body))


def _global_reason(name: str) -> str | None:
    return next((why for pattern, why in GLOBAL if fnmatch.fnmatchcase(name, pattern)), None)


def test_every_statement_pins_its_swarm_or_is_marked_global() -> None:
    unmarked = [
        name
        for name, text in named_statements()
        if (tables := _tables(text)) and not _pins_swarm(text, tables) and _global_reason(name) is None
    ]
    assert not unmarked, "pin swarm_id, or add to GLOBAL with the reason:\n" + "\n".join(unmarked)


def test_every_global_mark_is_used() -> None:
    names = [name for name, _ in named_statements()]
    unused = [pattern for pattern, _ in GLOBAL if not any(fnmatch.fnmatchcase(n, pattern) for n in names)]
    assert not unused, f"GLOBAL entries that match no statement: {unused}"


def test_the_hot_swarm_scoped_statements_pin_their_swarm() -> None:
    """What most calls send is routable to one node once distributed."""
    statements = dict(named_statements())
    for name in (
        "agents:insert",
        "agents:find_by_swarm",
        "budgets:insert",
        "budgets:find_by_swarm",
        "events:insert_event",
        "events:insert_events",
        "events:select_events(swarm_id, types, since) ASC",
        "swarms:insert",
        "swarms:find_by_id",
    ):
        assert name in statements, name
        assert _pins_swarm(statements[name], _tables(statements[name])), name

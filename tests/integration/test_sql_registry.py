"""Every named statement of every ``sql/*.sql`` file against the real, migrated schema.

The server PREPAREs each one (parse, name resolution, type checks of every parameter; nothing
runs), and the statements that hand back table rows or view rows return the columns of their
record in its field order, since the repositories build records positionally (``Swarm(*row)``).

The test walks whatever files exist (``sql.files()``), so a new file is covered the day it is
added. Names starting with ``part_`` are fragments, not statements: a repository composes them
into complete statements, and lists those (``statements()`` of its module) for this test.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Sequence

import asyncpg

from dash_storage import sql
from dash_storage.core.database import Database
from dash_storage.core.models import (
    Agent,
    AgentActivity,
    Budget,
    Event,
    EventTypeStats,
    LedgerEntry,
    Session,
    Swarm,
    SwarmSummary,
)

#: Modules that compose statements from ``part_*`` fragments, each with a ``statements()`` that
#: lists every statement it can send (name -> SQL), by the file whose fragments it uses.
COMPOSERS = {
    "events": "dash_storage.repositories.event_filters",
    "agents": "dash_storage.repositories.agents",
    "budgets": "dash_storage.repositories.budgets",
    "sessions": "dash_storage.repositories.sessions",
    "swarms": "dash_storage.repositories.swarms",
    "stream": "dash_storage.stream.follow",
}
#: The records built positionally from rows, with their fields in order.
RECORDS: dict[str, tuple[str, ...]] = {
    cls.__name__: tuple(cls._fields) for cls in (Swarm, Agent, Event, Session, Budget, LedgerEntry)
} | {
    cls.__name__: tuple(f.name for f in dataclasses.fields(cls))
    for cls in (SwarmSummary, AgentActivity, EventTypeStats)
}


def named_statements() -> list[tuple[str, str]]:
    """("file:name", SQL) of every statement of every file, composed ones included."""
    found = []
    for file in sql.files():
        queries = sql.load(file)
        found += [(f"{file}:{name}", queries[name]) for name in queries if not name.startswith("part_")]
        if file in COMPOSERS and any(name.startswith("part_") for name in queries):
            composed = importlib.import_module(COMPOSERS[file]).statements()
            found += [(f"{file}:{name}", text) for name, text in composed.items()]
    return found


#: Records made from a slice of the row that runs to its end (``make_event(Event, row[1:])``),
#: which no count of fields checks: their columns must be the last of the result.
TAIL_RECORDS = frozenset({"Event"})


def record_mismatches(columns: Sequence[str]) -> list[str]:
    """Where ``columns`` (a statement's result) starts a record (its first three fields) without
    going on with the rest of that record's fields, in order (and, for ``TAIL_RECORDS``, without
    ending there)."""
    problems = []
    for record, fields in RECORDS.items():
        for i in range(len(columns)):
            if tuple(columns[i : i + 3]) != fields[:3]:
                continue
            got = tuple(columns[i:] if record in TAIL_RECORDS else columns[i : i + len(fields)])
            if got != fields:
                problems.append(
                    f"columns {i}.. start a {record} but are {list(columns[i:])}, not {list(fields)}"
                )
    return problems


def test_every_file_has_statements() -> None:
    files = sql.files()
    assert {"agents", "budgets", "sessions", "swarms"} <= set(files)
    for file in files:
        assert len(sql.load(file)) > 0, f"sql/{file}.sql holds no statement"
    names = [name for name, _ in named_statements()]
    assert len(names) == len(set(names))
    assert {"swarms:update", "agents:transition", "budgets:consume", "budgets:consume_batch"} <= set(names)
    # the composed reads of list(), e.g.
    assert {"agents:list_in_swarm_by_label_desc", "sessions:list_live_by_expires_at_asc"} <= set(names)


async def test_every_statement_prepares_and_returns_its_records_columns(db: Database) -> None:
    failures = []
    async with db.acquire() as con:
        for where, text in named_statements():
            try:
                statement = await con.prepare(text)
            except asyncpg.PostgresError as exc:
                failures.append(f"{where}: {type(exc).__name__}: {exc}")
                continue
            columns = [a.name for a in statement.get_attributes()]
            failures += [f"{where}: {problem}" for problem in record_mismatches(columns)]
    assert not failures, "\n".join(failures)


def test_the_column_check_catches_a_reordered_record() -> None:
    swarm = list(RECORDS["Swarm"])
    assert record_mismatches(["granted", *swarm]) == []
    swapped = [*swarm[:3], swarm[4], swarm[3], *swarm[5:]]
    assert record_mismatches(swapped)
    assert record_mismatches(swarm[:-1])  # a column missing at the end
    event = list(RECORDS["Event"])
    assert record_mismatches(["inserted", *event]) == []
    assert record_mismatches([*event, "inserted"])  # an Event is the end of its row

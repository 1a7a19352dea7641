"""Every SQL statement the library sends, kept as SQL in the ``.sql`` files beside this module.

One file per table or concern (``swarms.sql``, ``budgets.sql``, ...). Each statement starts with a
line ``-- name: NAME``; the comment lines right after it describe it, and the statement runs to the
next ``-- name:`` line. A reviewer reads SQL as SQL, and a test walks every statement by name to
PREPARE it against the real schema (and to EXPLAIN the hot ones).

    from dash_storage import sql

    Q = sql.load("swarms")
    await db.fetchrow(Q["find_by_id"], swarm_id)

A name that is not in the file fails at import time of the module that asks for it, not at the
first call.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources

__all__ = ["Queries", "Query", "files", "load"]

_NAME = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$")


@dataclass(frozen=True, slots=True)
class Query:
    file: str
    name: str
    text: str
    doc: str


class Queries(Mapping[str, str]):
    """The statements of one file: ``queries["name"]`` is the SQL text."""

    def __init__(self, file: str, queries: dict[str, Query]) -> None:
        self.file = file
        self._queries = queries

    def __getitem__(self, name: str) -> str:
        try:
            return self._queries[name].text
        except KeyError:
            raise KeyError(f"no statement named {name!r} in sql/{self.file}.sql") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._queries)

    def __len__(self) -> int:
        return len(self._queries)

    def query(self, name: str) -> Query:
        self[name]  # the same error for a missing name
        return self._queries[name]


def _parse(file: str, text: str) -> dict[str, Query]:
    queries: dict[str, Query] = {}
    name: str | None = None
    doc: list[str] = []
    body: list[str] = []

    def flush() -> None:
        if name is None:
            return
        statement = "\n".join(body).strip().rstrip(";").strip()
        if not statement:
            raise ValueError(f"sql/{file}.sql: statement {name!r} is empty")
        queries[name] = Query(file, name, statement, " ".join(doc).strip())

    for line in text.splitlines():
        match = _NAME.match(line.strip())
        if match:
            flush()
            name, doc, body = match.group(1), [], []
            if name in queries:
                raise ValueError(f"sql/{file}.sql: statement {name!r} is defined twice")
        elif name is not None and not body and line.strip().startswith("--"):
            doc.append(line.strip()[2:].strip())
        elif name is not None:
            body.append(line)
    flush()
    return queries


@cache
def load(file: str) -> Queries:
    """The named statements of ``sql/<file>.sql``."""
    text = resources.files(__package__).joinpath(f"{file}.sql").read_text(encoding="utf-8")
    return Queries(file, _parse(file, text))


def files() -> list[str]:
    """The names of every ``.sql`` file here (without the suffix)."""
    return sorted(
        p.name.removesuffix(".sql") for p in resources.files(__package__).iterdir() if p.name.endswith(".sql")
    )

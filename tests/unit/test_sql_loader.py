"""The loader of ``sql/*.sql``: how a file is split into named statements, and its errors; and how
the reads of ``list`` are composed from a file's ``part_*`` fragments (``base.ListReads``)."""

from __future__ import annotations

import importlib

import pytest

from dash_storage import sql
from dash_storage.repositories.base import ListReads
from dash_storage.sql import Queries, _parse

FILE = """-- A header: not part of any statement.

-- name: first
-- Its description,
-- on two lines.
SELECT 1
FROM t;

-- name: second
SELECT 2 -- a comment inside the statement stays
WHERE x = $1
"""


def test_a_file_splits_into_named_statements_with_their_descriptions() -> None:
    queries = _parse("demo", FILE)
    assert list(queries) == ["first", "second"]
    assert queries["first"].text == "SELECT 1\nFROM t"  # the trailing semicolon is dropped
    assert queries["first"].doc == "Its description, on two lines."
    assert queries["second"].text == "SELECT 2 -- a comment inside the statement stays\nWHERE x = $1"
    assert queries["second"].doc == ""
    assert (queries["first"].file, queries["first"].name) == ("demo", "first")


def test_a_name_defined_twice_is_refused_naming_file_and_name() -> None:
    text = "-- name: same\nSELECT 1;\n-- name: other\nSELECT 2;\n-- name: same\nSELECT 3;\n"
    with pytest.raises(ValueError, match=r"sql/demo\.sql: statement 'same' is defined twice"):
        _parse("demo", text)


@pytest.mark.parametrize(
    "text",
    [
        "-- name: hollow\n-- only a description\n\n-- name: next\nSELECT 1;\n",
        "-- name: first\nSELECT 1;\n-- name: hollow\n;\n",
        "-- name: last\n",
    ],
    ids=["description only", "a lone semicolon", "nothing at the end of the file"],
)
def test_an_empty_statement_is_refused_naming_it(text: str) -> None:
    with pytest.raises(ValueError, match=r"sql/demo\.sql: statement '(hollow|last)' is empty"):
        _parse("demo", text)


def test_a_missing_name_says_which_file_was_searched() -> None:
    queries = Queries("demo", _parse("demo", FILE))
    with pytest.raises(KeyError, match=r"no statement named 'thrid' in sql/demo\.sql"):
        queries["thrid"]
    with pytest.raises(KeyError, match=r"no statement named 'thrid' in sql/demo\.sql"):
        queries.query("thrid")
    assert queries.query("first").doc == "Its description, on two lines."
    assert len(queries) == 2 and "second" in queries


def test_only_lowercase_identifiers_name_statements() -> None:
    # "-- name: Bad-Name" is not a name line, so it is taken as part of the description.
    queries = _parse("demo", "-- name: good\n-- name: Bad-Name\nSELECT 1;\n")
    assert list(queries) == ["good"]
    assert queries["good"].doc == "name: Bad-Name"


def test_every_shipped_file_loads() -> None:
    for file in sql.files():
        queries = sql.load(file)
        assert sql.load(file) is queries  # read once
        for name in queries:
            assert not queries[name].rstrip().endswith(";"), f"{file}:{name}"


PARTS = """-- name: part_start
SELECT a FROM t;
-- name: part_count
SELECT count(*) FROM t;
-- name: part_x
x = $3;
-- name: part_y
(y = $4 OR y IS NULL);
-- name: part_page
z = $2;
"""


def test_list_reads_compose_start_conditions_and_order() -> None:
    reads = ListReads(Queries("demo", _parse("demo", PARTS)), "part_start", {"newest": "created_at"})
    plain = reads.form("list_by")
    both = reads.form("list_xy_by", "part_x", "part_y")
    assert (
        plain["created_at", "DESC"] == "SELECT a FROM t\nORDER BY created_at DESC, id DESC LIMIT $1 OFFSET $2"
    )
    assert both["created_at", "ASC"] == (
        "SELECT a FROM t\nWHERE x = $3\n  AND (y = $4 OR y IS NULL)\n"
        "ORDER BY created_at ASC, id ASC LIMIT $1 OFFSET $2"
    )
    assert reads.statements() == {
        "list_by_created_at_asc": plain["created_at", "ASC"],
        "list_by_created_at_desc": plain["created_at", "DESC"],
        "list_xy_by_created_at_asc": both["created_at", "ASC"],
        "list_xy_by_created_at_desc": both["created_at", "DESC"],
    }
    assert reads.parts == {"part_start", "part_x", "part_y"}


def test_list_reads_compose_the_count_of_a_form_without_the_page_parameters() -> None:
    reads = ListReads(Queries("demo", _parse("demo", PARTS)), "part_start", {"newest": "created_at"})
    count = reads.count("count_xy", "part_count", "part_x", "part_y")
    assert count == "SELECT count(*) FROM t\nWHERE x = $1\n  AND (y = $2 OR y IS NULL)"
    assert reads.statements() == {"count_xy": count}
    assert reads.parts == {"part_start", "part_count", "part_x", "part_y"}
    with pytest.raises(ValueError, match=r"a condition of sql/demo\.sql uses \$2, a page parameter"):
        reads.count("count_page", "part_count", "part_page")


def test_list_reads_refuse_a_name_twice_and_a_column_that_is_not_a_plain_name() -> None:
    queries = Queries("demo", _parse("demo", PARTS))
    reads = ListReads(queries, "part_start", {"newest": "created_at"})
    reads.form("list_by")
    with pytest.raises(
        ValueError, match=r"statement 'list_by_created_at_asc' of sql/demo\.sql is composed twice"
    ):
        reads.form("list_by", "part_x")
    with pytest.raises(ValueError, match=r"order column 'created_at DESC' of sql/demo\.sql is not a plain"):
        ListReads(queries, "part_start", {"newest": "created_at DESC"})
    with pytest.raises(KeyError, match="part_z"):
        reads.form("list_z_by", "part_z")


@pytest.mark.parametrize("file", ["agents", "budgets", "sessions", "swarms"])
def test_every_fragment_of_a_repository_file_is_composed_into_a_statement(file: str) -> None:
    queries = sql.load(file)
    composed = importlib.import_module(f"dash_storage.repositories.{file}").statements()
    parts = [name for name in queries if name.startswith("part_")]
    assert parts and composed
    for name in parts:
        assert any(queries[name] in text for text in composed.values()), f"{file}:{name} is in no statement"

"""The statements of find_by_filter and count, composed from the named parts of sql/events.sql."""

from __future__ import annotations

import datetime as dt
import itertools
import re
import uuid

import pytest

from dash_storage import sql
from dash_storage.core.errors import DashStorageError, ValidationError
from dash_storage.repositories.event_filters import (
    FILTERS,
    ORDERS,
    PARTS,
    check_filters,
    count_sql,
    select_sql,
    statements,
)

EVENTS = sql.load("events")
PARAMETER = re.compile(r"\$(\d+)")
SWARM = uuid.UUID("01930000-0000-7000-8000-000000000001")
UTC = dt.UTC


def parameters(text: str) -> list[int]:
    return sorted({int(n) for n in PARAMETER.findall(text)})


def test_the_parts_are_the_files() -> None:
    assert {name for name in EVENTS if name.startswith("part_")} == PARTS


def test_every_variant_is_listed_once() -> None:
    found = statements()
    assert len(found) == 2 ** len(FILTERS) * (1 + len(ORDERS) * 2)
    assert len(set(found.values())) == len(found)
    assert found["count_events()"] == "SELECT count(*) FROM events"


@pytest.mark.parametrize("k", range(len(FILTERS) + 1))
def test_parameters_are_numbered_in_order(k: int) -> None:
    """The limit is $1, then one parameter per filter given in FILTERS order, then the cursor's two:
    the order find_by_filter passes its values in."""
    for filters in itertools.combinations(FILTERS, k):
        assert parameters(count_sql(filters)) == list(range(1, k + 1))
        for order, after in itertools.product(ORDERS, (False, True)):
            text = select_sql(filters, order, after)
            assert parameters(text) == list(range(1, k + 2 + (2 if after else 0)))
            for i, name in enumerate(filters):
                condition = EVENTS[f"part_{name}"].replace("$1", f"${i + 2}")
                assert condition in text
            assert text.endswith(f'ORDER BY "timestamp" {order}, id {order} LIMIT $1')
            if after:
                sign = ">" if order == "ASC" else "<"
                assert f'("timestamp", id) {sign} (${k + 2}, ${k + 3})' in text


def test_no_variant_makes_a_filter_optional_in_sql() -> None:
    """Only the filters given appear, each a plain condition (an index can serve it)."""
    for name, text in statements().items():
        assert "IS NULL" not in text.upper(), name
        assert " OR " not in text.upper(), name
    assert " WHERE " not in select_sql((), "ASC", False)


@pytest.mark.parametrize(
    ("filters", "order"),
    [
        (("nope",), "ASC"),
        (("since", "swarm_id"), "ASC"),  # not in FILTERS order: the parameters would be misnumbered
        (("swarm_id", "swarm_id"), "ASC"),
        (("swarm_id",), "asc"),
        (("swarm_id",), "SIDEWAYS"),
    ],
)
def test_a_variant_that_does_not_exist_is_refused(filters: tuple[str, ...], order: str) -> None:
    with pytest.raises(DashStorageError):
        select_sql(filters, order, False)


def test_check_filters_gives_the_names_and_values_in_order() -> None:
    since = dt.datetime(2026, 1, 1, tzinfo=UTC)
    got = check_filters(str(SWARM), None, ("a", "b"), None, "error", since, None)
    assert got == (("swarm_id", "types", "severity", "since"), [SWARM, ["a", "b"], "error", since])
    assert check_filters(None, None, None, None, None, None, None) == ((), [])


def test_no_types_matches_nothing_but_is_still_validated() -> None:
    assert check_filters(SWARM, None, [], None, None, None, None) is None
    with pytest.raises(ValidationError) as caught:
        check_filters("bad", None, [], None, None, None, None)
    assert caught.value.field == "swarm_id"


@pytest.mark.parametrize(
    ("field", "arguments"),
    [
        ("swarm_id", ("x", None, None, None, None, None, None)),
        ("agent_id", (None, 3, None, None, None, None, None)),
        ("types", (None, None, "agent.step", None, None, None, None)),  # a string, not a list
        ("types", (None, None, ["ok", ""], None, None, None, None)),
        ("entity_type", (None, None, None, "robot", None, None, None)),
        ("severity", (None, None, None, None, "loud", None, None)),
        ("since", (None, None, None, None, None, dt.datetime(2026, 1, 1), None)),
        ("until", (None, None, None, None, None, None, "tomorrow")),
    ],
)
def test_each_bad_filter_is_named(field: str, arguments: tuple[object, ...]) -> None:
    with pytest.raises(ValidationError) as caught:
        check_filters(*arguments)
    assert caught.value.field == field


def test_the_batch_inserts_share_their_insert() -> None:
    # The first attempt's INSERT (inside WITH, handing back now()) is the retry's, but for the
    # retry's ON CONFLICT and RETURNING clauses.
    first, retry = EVENTS["insert_events"], EVENTS["insert_events_retry"]
    head, tail = "WITH written AS (", ") SELECT now()"
    words = " ".join(first.split())
    assert words.startswith(head) and words.endswith(tail)
    insert = words[len(head) : -len(tail)].strip()
    assert " ".join(retry.split('ON CONFLICT (id, "timestamp") DO NOTHING', 1)[0].split()) == insert

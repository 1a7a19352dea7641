"""The legacy value converters (``dash_storage.legacy.values``), without a server.

What the old store kept (anything SQLite accepted) and what PostgreSQL gets: readable timestamps in
every format the old app wrote, the documented fallback for unreadable ones, JSON repaired into
something jsonb takes, money and integers kept in range, and a repair noted for every change.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest

from dash_storage.legacy import values
from dash_storage.legacy.report import Batch, Repair, RowRepairs
from dash_storage.legacy.values import BIGINT_MAX, INT_MAX, NOT_JSON, NOT_OBJECT, NUL_REMOVED, UNREADABLE_TIME

UTC = dt.UTC
INSTANT = dt.datetime(2025, 1, 27, 17, 46, 40, tzinfo=UTC)  # 1738000000 s after the epoch


def repairs() -> tuple[RowRepairs, list[Repair]]:
    """A row's repair collector, and the list its repairs land in."""
    batch = Batch("agents")
    return RowRepairs(batch, "agents", "a-1"), batch.repairs


def notes(found: list[Repair]) -> list[tuple[str, str]]:
    return [(r.field, r.action) for r in found]


# -- timestamps -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2025-01-27T17:46:40Z", INSTANT),
        ("2025-01-27T17:46:40.000Z", INSTANT),  # JavaScript's toISOString()
        ("2025-01-27T18:46:40+01:00", INSTANT),
        ("2025-01-27T17:46:40", INSTANT),  # no offset: UTC
        ("2025-01-27 17:46:40", INSTANT),
        ("2025-01-27", dt.datetime(2025, 1, 27, tzinfo=UTC)),
        (1738000000, INSTANT),  # epoch seconds
        (1738000000.25, INSTANT + dt.timedelta(milliseconds=250)),
        (1738000000000, INSTANT),  # epoch milliseconds (JavaScript's Date.now())
        ("1738000000", INSTANT),  # epoch seconds stored as text
        (" 1738000000000 ", INSTANT),
        (0, dt.datetime(1970, 1, 1, tzinfo=UTC)),
    ],
)
def test_readable_timestamps(value: Any, expected: dt.datetime) -> None:
    parsed = values.parse_time(value)
    assert parsed == expected
    assert parsed is not None and parsed.utcoffset() is not None


@pytest.mark.parametrize(
    "value",
    [None, "", "   ", "soon", "last tuesday", "32/13/2025", "NaN", "-5", "1e9", "12:00", True, b"2025",
     float("nan"), float("inf"), 10**30, [], {}],
)  # fmt: skip
def test_unreadable_timestamps_are_none(value: Any) -> None:
    assert values.parse_time(value) is None


def test_an_unreadable_required_time_becomes_the_epoch_and_keeps_its_text() -> None:
    fix, found = repairs()
    kept: dict[str, Any] = {"other": 1}
    when = values.required_time("last tuesday", "spawned_at", fix, keep=kept, key="legacy_spawned_at")
    assert when == UNREADABLE_TIME == dt.datetime(1970, 1, 1, tzinfo=UTC)
    assert kept == {"other": 1, "legacy_spawned_at": "last tuesday"}
    [(field, action)] = notes(found)
    assert field == "spawned_at"
    assert "'last tuesday'" in action and "1970-01-01T00:00:00Z" in action and "now()" not in action
    assert fix.count == 1


def test_a_missing_required_time_becomes_the_epoch_with_nothing_to_keep() -> None:
    fix, found = repairs()
    kept: dict[str, Any] = {}
    assert (
        values.required_time(None, "created_at", fix, keep=kept, key="legacy_created_at") == UNREADABLE_TIME
    )
    assert kept == {}
    assert [r.field for r in found] == ["created_at"]


def test_a_readable_required_time_needs_no_repair() -> None:
    fix, found = repairs()
    kept: dict[str, Any] = {}
    assert values.required_time(1738000000000, "timestamp", fix, keep=kept, key="k") == INSTANT
    assert kept == {} and found == [] and fix.count == 0


def test_optional_times_become_null_when_unreadable() -> None:
    fix, found = repairs()
    assert values.optional_time(None, "completed_at", fix) is None
    assert values.optional_time("", "completed_at", fix) is None
    assert found == []  # NULL and empty text are simply absent
    assert values.optional_time("2025-01-27T17:46:40Z", "completed_at", fix) == INSTANT
    assert values.optional_time("soon", "pause_time", fix) is None
    assert notes(found) == [("pause_time", "unreadable timestamp 'soon'; set to NULL")]


# -- JSON -------------------------------------------------------------------------------------------


def test_json_that_does_not_parse_is_kept_as_raw_text() -> None:
    fix, found = repairs()
    assert values.json_value("{not json", "context", fix) == {"_legacy_raw": "{not json"}
    assert values.json_value(b'{"a": 1}', "context", fix) == {"a": 1}
    assert notes(found) == [("context", NOT_JSON)]


def test_a_column_that_needs_an_object_wraps_any_other_value() -> None:
    fix, found = repairs()
    default = {"from": "default"}
    made = values.json_object(None, "metadata", fix, null=default)
    assert made == default and made is not default  # a copy: callers add keys to it
    assert values.json_object('{"a": [1]}', "metadata", fix, null={}) == {"a": [1]}
    assert values.json_object("[1, 2]", "metadata", fix, null={}) == {"_legacy_value": [1, 2]}
    assert values.json_object('"text"', "metadata", fix, null={}) == {"_legacy_value": "text"}
    assert values.json_object("oops", "metadata", fix, null={}) == {"_legacy_raw": "oops"}
    assert notes(found) == [("metadata", NOT_OBJECT), ("metadata", NOT_OBJECT), ("metadata", NOT_JSON)]


def test_a_nullable_json_column_keeps_null_and_any_json_value() -> None:
    fix, found = repairs()
    assert values.json_column(None, "code", fix) is None
    assert values.json_column("[1, 2]", "code", fix) == "[1,2]"
    assert values.json_column("7", "code", fix) == "7"
    assert values.json_column("bad", "code", fix) == '{"_legacy_raw":"bad"}'
    assert notes(found) == [("code", NOT_JSON)]


def test_nul_characters_are_removed_everywhere_jsonb_would_refuse_them() -> None:
    nested = {"k\x00ey": ["a\x00b", {"c": "\x00"}], "n": 1, "none": None}
    assert values.strip_nul(nested) == {"key": ["ab", {"c": ""}], "n": 1, "none": None}
    assert values.dumps(nested) == ('{"key":["ab",{"c":""}],"n":1,"none":null}', True)
    assert values.dumps({"clean": "text"}) == ('{"clean":"text"}', False)
    fix, found = repairs()
    assert values.json_column('{"t": "a\\u0000b"}', "reasoning", fix) == '{"t":"ab"}'
    assert notes(found) == [("reasoning", NUL_REMOVED)]


# -- text, ids --------------------------------------------------------------------------------------


def test_text_columns_take_any_value_as_text_without_nul() -> None:
    fix, found = repairs()
    assert values.text_value(None, "label", fix) is None
    assert values.text_value("plain", "label", fix) == "plain"
    assert values.text_value(42, "label", fix) == "42"
    assert values.text_value(b"ok \xff!", "label", fix) == "ok \ufffd!"
    assert values.text_value("a\x00b", "label", fix) == "ab"
    assert notes(found) == [
        ("label", "int value converted to text"),
        ("label", "bytes value converted to text"),
        ("label", NUL_REMOVED),
    ]


def test_ids_that_cannot_be_used_are_described() -> None:
    assert values.id_problem(None) == values.id_problem("") == "missing id"
    assert values.id_problem(b"\x01") == "id is not text (bytes)"
    assert values.id_problem(7) == "id is not text (int)"
    assert values.id_label(None) is None
    assert values.id_label(b"\x01") == "\x01"
    assert values.id_label(7) == "7"


def test_values_in_notes_are_cut_to_sixty_characters() -> None:
    assert values.show("short") == "'short'"
    long = values.show("x" * 100)
    assert len(long) == 60 and long.endswith("...")


# -- money and integers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "amount", "note"),
    [
        (None, None, None),
        (0.1, Decimal("0.1"), None),  # the float's shortest text, not its binary expansion
        (12, Decimal(12), None),
        ("12.50", Decimal("12.50"), None),
        (
            1.23456789012345,
            Decimal("1.2345678901"),
            "1.23456789012345 rounded to 10 decimal places (1.2345678901)",
        ),
        (-3.5, Decimal(0), "negative amount -3.5 set to 0"),
    ],
)
def test_money(value: Any, amount: Decimal | None, note: str | None) -> None:
    assert values.to_money(value) == (amount, note, None)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (True, "is not a number (True)"),
        ("cheap", "is not a number ('cheap')"),
        (float("inf"), "is not a finite number (inf)"),
        (float("nan"), "is not a finite number (nan)"),
        ("NaN", "is not a finite number ('NaN')"),
        (1e14, "100000000000000.0 is too large (at most 10^14)"),
    ],
)
def test_money_that_cannot_be_kept_is_a_reject(value: Any, reason: str) -> None:
    assert values.to_money(value) == (None, None, reason)


@pytest.mark.parametrize(
    ("value", "expected", "note"),
    [
        (None, 3, None),
        (5, 5, None),
        ("7", 7, None),
        (2.0, 2, None),
        (2.6, 3, "2.6 rounded to 3"),
        (-2, 0, "negative value -2 set to 0"),
        (1e12, INT_MAX, f"1000000000000 above {INT_MAX}; capped"),
        ("long", 3, "'long' is not a number; set to 3"),
        (float("nan"), 3, "nan is not finite; set to 3"),
    ],
)
def test_integers(value: Any, expected: int, note: str | None) -> None:
    assert values.to_int(value, 3, INT_MAX) == (expected, note)


def test_an_integer_column_records_its_note() -> None:
    fix, found = repairs()
    assert values.int_column("long", "runtime", fix, default=0, maximum=BIGINT_MAX) == 0
    assert values.int_column(2**70, "runtime", fix, default=0, maximum=BIGINT_MAX) == BIGINT_MAX
    assert values.int_column(4, "runtime", fix, default=0, maximum=BIGINT_MAX) == 4
    assert [r.field for r in found] == ["runtime", "runtime"] and fix.count == 2

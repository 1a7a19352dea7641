"""core.validation: what each check accepts (in the form the driver wants), what it refuses, and
that every refusal is a ValidationError naming the field."""

from __future__ import annotations

import datetime as dt
import math
import uuid
from decimal import Decimal
from typing import Any

import pytest

from dash_storage.core import validation as v
from dash_storage.core.errors import DashStorageError, ValidationError

UID = uuid.UUID("0190a0b0-0000-7000-8000-000000000001")


def refused(field: str, match: str = "") -> Any:
    """``pytest.raises`` for a ValidationError on ``field`` whose message matches ``match``."""
    return pytest.raises(ValidationError, match=rf"^invalid {field}: .*{match}")


# -- required and optional ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "check",
    [
        lambda x, **kw: v.check_uuid(x, "f", **kw),
        lambda x, **kw: v.check_text(x, "f", **kw),
        lambda x, **kw: v.check_choice(x, {"a"}, "f", **kw),
        lambda x, **kw: v.check_int(x, "f", **kw),
        lambda x, **kw: v.check_money(x, "f", **kw),
        lambda x, **kw: v.check_timestamp(x, "f", **kw),
        lambda x, **kw: v.check_json(x, "f", **kw),
    ],
    ids=["uuid", "text", "choice", "int", "money", "timestamp", "json"],
)
def test_none_is_refused_unless_optional(check: Any) -> None:
    with refused("f", "is required"):
        check(None)
    assert check(None, optional=True) is None


def test_a_required_json_object_refuses_none_by_its_type() -> None:
    with refused("config", "must be a JSON object \\(dict\\), got NoneType"):
        v.check_json_object(None, "config")
    assert v.check_json_object(None, "config", optional=True) is None


def test_validation_errors_are_dash_storage_errors_and_value_errors() -> None:
    with pytest.raises(ValidationError) as info:
        v.check_int("7", "count")
    assert isinstance(info.value, DashStorageError) and isinstance(info.value, ValueError)
    assert (info.value.field, info.value.problem) == ("count", "must be an integer, got str")


# -- uuid ---------------------------------------------------------------------------------------------


def test_uuid_accepts_a_uuid_or_its_text() -> None:
    assert v.check_uuid(UID, "id") is UID
    assert v.check_uuid(str(UID), "id") == UID
    assert v.check_uuid(str(UID).upper(), "id") == UID


@pytest.mark.parametrize("bad", ["not-a-uuid", "", 12, UID.bytes, "0" * 65, [str(UID)]])
def test_uuid_refuses_anything_else_showing_the_value(bad: Any) -> None:
    with refused("swarm_id", "must be a UUID, got "):
        v.check_uuid(bad, "swarm_id")


def test_a_long_value_is_shown_shortened() -> None:
    with pytest.raises(ValidationError) as info:
        v.check_uuid("x" * 500, "id")
    assert info.value.problem.endswith("...") and len(info.value.problem) < 100


def test_a_value_whose_repr_fails_is_still_reported() -> None:
    class Hostile:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    with refused("id", "got <Hostile>"):
        v.check_uuid(Hostile(), "id")


def test_uuid_list_checks_every_element() -> None:
    assert v.check_uuid_list([UID, str(UID)], "ids") == [UID, UID]
    assert v.check_uuid_list((), "ids") == []
    with refused("ids", "must be a list of UUIDs"):
        v.check_uuid_list(str(UID), "ids")  # a string is iterable, but not a list of UUIDs
    with refused("ids", "must be a UUID"):
        v.check_uuid_list([UID, "nope"], "ids")


# -- text ---------------------------------------------------------------------------------------------


def test_text_length_bound_is_inclusive() -> None:
    assert v.check_text("x" * v.SHORT_TEXT, "name") == "x" * v.SHORT_TEXT
    with refused("name", f"is {v.SHORT_TEXT + 1} characters long, the maximum is {v.SHORT_TEXT}"):
        v.check_text("x" * (v.SHORT_TEXT + 1), "name")
    assert v.check_text("x" * 1000, "task", max_length=v.LONG_TEXT) == "x" * 1000


def test_text_refuses_what_postgres_cannot_store() -> None:
    with refused("name", "must not contain NUL characters"):
        v.check_text("a\x00b", "name")
    with refused("name", "must not contain a lone surrogate"):
        v.check_text("a\ud800b", "name")
    assert v.check_text("Zürich ✓ 日本", "name") == "Zürich ✓ 日本"


def test_empty_text_is_refused_only_when_asked() -> None:
    assert v.check_text("", "label") == ""
    assert v.check_text(" \x1c", "label") == " \x1c"
    for blank in ("", "  \t", "\x1c\x1f", "\u2003 "):  # ASCII and not (str.strip's whitespace)
        with refused("name", "must not be empty"):
            v.check_text(blank, "name", allow_empty=False)
    assert v.check_text(" a ", "name", allow_empty=False) == " a "
    with refused("name", "must be a string, got int"):
        v.check_text(5, "name")
    with refused("name", "must be a string, got bytes"):
        v.check_text(b"a", "name")


def test_a_str_subclass_is_accepted_as_it_is() -> None:
    class Name(str):
        pass

    name = Name("agent.step")
    assert v.check_text(name, "types", allow_empty=False) is name
    with refused("types", "must not contain NUL characters"):
        v.check_text(Name("a\x00"), "types")


# -- choices, integers, booleans -----------------------------------------------------------------------


def test_choice_names_the_allowed_values_in_order() -> None:
    assert v.check_choice("b", {"b", "a"}, "status") == "b"
    with refused("status", "must be one of a, b, got 'c'"):
        v.check_choice("c", {"b", "a"}, "status")
    with refused("status", "must be one of a, b, got 1"):
        v.check_choice(1, {"b", "a"}, "status")


def test_int_bounds_are_inclusive_and_reported() -> None:
    assert v.check_int(0, "n") == 0
    assert v.check_int(v.BIGINT_MAX, "n") == v.BIGINT_MAX
    assert v.check_int(5, "n", minimum=5, maximum=5) == 5
    with refused("n", "must be between 0 and 9223372036854775807, got -1"):
        v.check_int(-1, "n")
    with refused("n", f"got {v.BIGINT_MAX + 1}"):
        v.check_int(v.BIGINT_MAX + 1, "n")
    with refused("retries", f"must be between 0 and {v.INT_MAX}"):
        v.check_int(v.INT_MAX + 1, "retries", maximum=v.INT_MAX)


@pytest.mark.parametrize("bad", [True, False, 1.0, "1", Decimal(1)])
def test_int_refuses_bools_and_other_numbers(bad: Any) -> None:
    with refused("n", "must be an integer"):
        v.check_int(bad, "n")


def test_bool_is_strict() -> None:
    assert v.check_bool(False, "flag") is False
    with refused("flag", "must be true or false, got int"):
        v.check_bool(0, "flag")


# -- money ----------------------------------------------------------------------------------------------


def test_money_takes_the_decimal_a_float_prints_not_its_binary_expansion() -> None:
    assert v.check_money(0.1, "cost") == Decimal("0.1")
    assert v.check_money(3, "cost") == Decimal(3)
    assert v.check_money(" 2.50 ", "cost") == Decimal("2.50")
    assert v.check_money(Decimal("1e-10"), "cost") == Decimal("1e-10")


def test_money_is_never_rounded() -> None:
    assert v.check_money("0.0000000001", "cost") == Decimal("0.0000000001")  # 10 places
    assert v.check_money("1.50000000000000", "cost") == Decimal("1.5")  # zeros are not precision
    with refused("cost", "has more than 10 decimal places \\(1E-11\\); amounts are never rounded"):
        v.check_money("0.00000000001", "cost")
    with refused("cost", "has more than 10 decimal places"):
        v.check_money(Decimal("2.00000000005"), "cost")


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ("-0.01", "must not be negative, got -0.01"),
        ("1e14", "must be below 1E\\+14, got 1E\\+14"),
        (math.inf, "must be a finite number, got inf"),
        (math.nan, "must be a finite number, got nan"),
        (Decimal("NaN"), "must be a finite number, got NaN"),
        ("Infinity", "must be a finite number"),
        ("1,5", "must be a number, got '1,5'"),
        ("1" * 65, "must be a number, got str"),
        (True, "must be a number, got bool"),
        ([1], "must be a number, got list"),
    ],
)
def test_money_refusals(bad: Any, problem: str) -> None:
    with refused("allocated", problem):
        v.check_money(bad, "allocated")


def test_money_just_below_the_bound_passes() -> None:
    assert v.check_money("99999999999999.9999999999", "allocated") == Decimal("99999999999999.9999999999")


# -- timestamps ------------------------------------------------------------------------------------------


def test_an_aware_time_in_another_zone_becomes_the_same_instant_in_utc() -> None:
    t = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=-20)))
    utc = v.check_timestamp(t, "at")
    assert utc == t and utc.utcoffset() == dt.timedelta(0)
    same = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
    assert v.check_timestamp(same, "at") is same


def test_naive_and_unrepresentable_times_are_refused() -> None:
    with refused("at", "must be timezone-aware"):
        v.check_timestamp(dt.datetime(2026, 1, 1), "at")
    with refused("at", "must be a datetime, got date"):
        v.check_timestamp(dt.date(2026, 1, 1), "at")
    year_one = dt.datetime(1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=5)))
    with refused("at", "is out of range in UTC"):
        v.check_timestamp(year_one, "at")  # would be stored BC


def test_a_time_zone_that_raises_is_a_validation_error() -> None:
    class Broken(dt.tzinfo):
        def utcoffset(self, d: dt.datetime | None) -> dt.timedelta:
            raise ValueError("broken zone")

    with refused("at", "has an invalid time zone: broken zone"):
        v.check_timestamp(dt.datetime(2026, 1, 1, tzinfo=Broken()), "at")


# -- JSON -------------------------------------------------------------------------------------------------


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


def test_json_depth_limit_is_exact() -> None:
    assert v.check_json(nested(v.MAX_JSON_DEPTH), "payload") is not None
    with refused("payload", f"is nested deeper than {v.MAX_JSON_DEPTH} levels"):
        v.check_json(nested(v.MAX_JSON_DEPTH + 1), "payload")


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ({1: "a"}, "has a non-string key 1"),
        ({"a": [1.0, math.nan]}, "holds a non-finite number \\(nan\\)"),
        ({"big": 2**64}, "holds an integer outside the 64-bit range"),
        ({"s": "a\x00"}, "holds a string with NUL characters"),
        ({"k\x00": 1}, "holds a string with NUL characters"),
        ({"s": {1, 2}}, "holds a set, which is not JSON"),
        ({"when": dt.date(2026, 1, 1)}, "holds a date, which is not JSON"),
    ],
)
def test_json_refuses_what_is_not_json(bad: Any, problem: str) -> None:
    with refused("payload", problem):
        v.check_json(bad, "payload")


def test_json_size_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(v, "MAX_JSON_BYTES", 100)
    assert v.check_json({"a": "x" * 50}, "payload") is not None
    with refused("payload", "is larger than 100 bytes"):
        v.check_json({"a": "x" * 200}, "payload")
    with refused("payload", "is larger than 100 bytes"):
        v.check_json(list(range(50)), "payload")  # many small values count too


def test_json_accepts_scalars_and_tuples_as_is() -> None:
    assert v.check_json("text", "payload") == "text"
    assert v.check_json((1, "a", None, True), "payload") == (1, "a", None, True)


def test_json_object_is_a_copy_of_a_dict() -> None:
    original = {"a": 1}
    copy = v.check_json_object(original, "metadata")
    assert copy == original and copy is not original
    with refused("metadata", "must be a JSON object \\(dict\\), got list"):
        v.check_json_object([("a", 1)], "metadata")


# -- durations, paging, ordering -------------------------------------------------------------------------


def test_duration_bounds() -> None:
    assert v.check_duration(1, "ttl", maximum=10) == 1.0
    assert v.check_duration(Decimal("10"), "ttl", maximum=10) == 10.0
    assert v.check_duration(0, "wait", maximum=10, allow_zero=True) == 0.0
    with refused("ttl", "must be a finite number in \\(0, 10\\], got 0"):
        v.check_duration(0, "ttl", maximum=10)
    with refused("ttl", "got 10.5"):
        v.check_duration(10.5, "ttl", maximum=10)
    with refused("wait", "in \\[0, 10\\], got -1"):
        v.check_duration(-1, "wait", maximum=10, allow_zero=True)


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        (True, "must be a number, got bool"),
        ("5", "must be a number, got str"),
        (math.nan, "must be a finite number in"),
        (Decimal("sNaN"), "must be a finite number, got sNaN"),
        (10**400, "got a 1329-bit integer"),
    ],
)
def test_duration_refusals_never_raise_anything_else(bad: Any, problem: str) -> None:
    with refused("ttl", problem):
        v.check_duration(bad, "ttl", maximum=10)


def test_limit_and_offset() -> None:
    assert v.check_limit(None) == v.DEFAULT_LIMIT
    assert v.check_limit(None, default=5) == 5
    assert v.check_limit(v.MAX_LIMIT) == v.MAX_LIMIT
    with refused("limit", f"must be between 1 and {v.MAX_LIMIT}, got 0"):
        v.check_limit(0)
    with refused("limit", f"got {v.MAX_LIMIT + 1}"):
        v.check_limit(v.MAX_LIMIT + 1)
    with refused("limit", "must be an integer, got bool"):
        v.check_limit(True)
    with refused("limit", "must be an integer, got float"):
        v.check_limit(5.0)
    assert v.check_offset(None) == 0
    with refused("offset", "got -1"):
        v.check_offset(-1)


def test_order_maps_public_names_to_columns_from_the_allow_list_only() -> None:
    allowed = {"newest": "created_at", "name": "name"}
    assert v.check_order(None, allowed, default="newest") == "created_at"
    assert v.check_order("name", allowed, default="newest") == "name"
    with refused("order_by", "must be one of name, newest, got 'created_at; DROP TABLE swarms'"):
        v.check_order("created_at; DROP TABLE swarms", allowed, default="newest")


def test_direction() -> None:
    assert v.check_direction(None) == "DESC"
    assert v.check_direction("asc") == "ASC"
    assert v.check_direction("Desc") == "DESC"
    with refused("order_direction", "must be 'asc' or 'desc', got 'up'"):
        v.check_direction("up")

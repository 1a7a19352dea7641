"""Input checks that run before any SQL. Each raises ValidationError naming the field.

Values that pass are returned in the form the driver wants (UUID, Decimal, int, aware datetime).
A value is required unless ``optional=True`` is passed: then None passes as None. The overloads
tell the type checker which: without ``optional=True`` the result is never None.
"""

from __future__ import annotations

import datetime as dt
import math
import uuid
from collections.abc import Collection, Iterable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, overload

from dash_storage.core.errors import ValidationError

__all__ = [
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_LIMIT",
    "check_bool",
    "check_choice",
    "check_duration",
    "check_int",
    "check_json",
    "check_json_object",
    "check_limit",
    "check_money",
    "check_offset",
    "check_text",
    "check_timestamp",
    "check_uuid",
]

DEFAULT_LIMIT = 100
MAX_LIMIT = 10_000
MAX_JSON_DEPTH = 64
MAX_JSON_BYTES = 16 * 1024 * 1024
MONEY_SCALE = 10  # decimal places the money columns hold (see the schema's precision checks)
MONEY_MAX = Decimal("1e14")
BIGINT_MAX = 2**63 - 1
INT_MAX = 2**31 - 1

# Lengths for TEXT columns. PostgreSQL TEXT is unbounded; these bounds are the API's contract.
SHORT_TEXT = 255
LONG_TEXT = 1_000_000


@overload
def check_uuid(value: Any, field: str, *, optional: Literal[False] = False) -> uuid.UUID: ...
@overload
def check_uuid(value: Any, field: str, *, optional: bool) -> uuid.UUID | None: ...
def check_uuid(value: Any, field: str, *, optional: bool = False) -> uuid.UUID | None:
    if value is None:
        if optional:
            return None
        raise ValidationError(field, "is required")
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str) and len(value) <= 64:
        try:
            return uuid.UUID(value)
        except ValueError:
            pass
    raise ValidationError(field, f"must be a UUID, got {_show(value)}")


@overload
def check_text(
    value: Any,
    field: str,
    *,
    max_length: int = ...,
    optional: Literal[False] = False,
    allow_empty: bool = ...,
) -> str: ...
@overload
def check_text(
    value: Any, field: str, *, max_length: int = ..., optional: bool, allow_empty: bool = ...
) -> str | None: ...
def check_text(
    value: Any, field: str, *, max_length: int = SHORT_TEXT, optional: bool = False, allow_empty: bool = True
) -> str | None:
    if type(value) is str and len(value) <= max_length and value.isascii() and "\x00" not in value:
        # The usual text, on the path of every write and read: only emptiness can be wrong with it.
        if allow_empty or (value and not value.isspace()):
            return value
        raise ValidationError(field, "must not be empty")
    if value is None:
        if optional:
            return None
        raise ValidationError(field, "is required")
    if not isinstance(value, str):
        raise ValidationError(field, f"must be a string, got {type(value).__name__}")
    if len(value) > max_length:
        raise ValidationError(field, f"is {len(value)} characters long, the maximum is {max_length}")
    if not allow_empty and not value.strip():
        raise ValidationError(field, "must not be empty")
    _check_chars(value, field, "must not contain")
    return value


def _check_chars(value: str, field: str, verb: str) -> None:
    """Reject what PostgreSQL text cannot hold: NUL, and lone surrogates (not encodable as UTF-8)."""
    if "\x00" in value:
        raise ValidationError(field, f"{verb} NUL characters (PostgreSQL cannot store them)")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValidationError(
                field, f"{verb} a lone surrogate ({value[exc.start]!r}): it is not valid Unicode text"
            ) from None


@overload
def check_choice(
    value: Any, allowed: Collection[str], field: str, *, optional: Literal[False] = False
) -> str: ...
@overload
def check_choice(value: Any, allowed: Collection[str], field: str, *, optional: bool) -> str | None: ...
def check_choice(value: Any, allowed: Collection[str], field: str, *, optional: bool = False) -> str | None:
    if value is None:
        if optional:
            return None
        raise ValidationError(field, "is required")
    if not isinstance(value, str) or value not in allowed:
        raise ValidationError(field, f"must be one of {', '.join(sorted(allowed))}, got {_show(value)}")
    return str(value)


@overload
def check_int(
    value: Any, field: str, *, minimum: int = ..., maximum: int = ..., optional: Literal[False] = False
) -> int: ...
@overload
def check_int(
    value: Any, field: str, *, minimum: int = ..., maximum: int = ..., optional: bool
) -> int | None: ...
def check_int(
    value: Any, field: str, *, minimum: int = 0, maximum: int = BIGINT_MAX, optional: bool = False
) -> int | None:
    if value is None:
        if optional:
            return None
        raise ValidationError(field, "is required")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(field, f"must be an integer, got {type(value).__name__}")
    if value < minimum or value > maximum:
        raise ValidationError(field, f"must be between {minimum} and {maximum}, got {value}")
    return value


def check_bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise ValidationError(field, f"must be true or false, got {type(value).__name__}")
    return value


@overload
def check_money(value: Any, field: str, *, optional: Literal[False] = False) -> Decimal: ...
@overload
def check_money(value: Any, field: str, *, optional: bool) -> Decimal | None: ...
def check_money(value: Any, field: str, *, optional: bool = False) -> Decimal | None:
    """A non-negative amount with at most 10 decimal places. Finer values are rejected, not rounded."""
    if value is None:
        if optional:
            return None
        raise ValidationError(field, "is required")
    if isinstance(value, bool):
        raise ValidationError(field, "must be a number, got bool")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError(field, f"must be a finite number, got {value}")
        value = Decimal(repr(value))  # the shortest decimal that round-trips, not the binary expansion
    elif isinstance(value, int):
        value = Decimal(value)
    elif isinstance(value, str) and len(value) <= 64:
        try:
            value = Decimal(value.strip())
        except InvalidOperation:
            raise ValidationError(field, f"must be a number, got {_show(value)}") from None
    elif not isinstance(value, Decimal):
        raise ValidationError(field, f"must be a number, got {type(value).__name__}")
    assert isinstance(value, Decimal)
    if not value.is_finite():
        raise ValidationError(field, f"must be a finite number, got {value}")
    if value < 0:
        raise ValidationError(field, f"must not be negative, got {value}")
    if value >= MONEY_MAX:
        raise ValidationError(field, f"must be below {MONEY_MAX:E}, got {value}")
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)
    if -exponent > MONEY_SCALE:  # maybe only trailing zeros (1.00000000000): look again without them
        exponent = value.normalize().as_tuple().exponent
        assert isinstance(exponent, int)
    if -exponent > MONEY_SCALE:
        raise ValidationError(
            field, f"has more than {MONEY_SCALE} decimal places ({value}); amounts are never rounded"
        )
    return value


@overload
def check_timestamp(value: Any, field: str, *, optional: Literal[False] = False) -> dt.datetime: ...
@overload
def check_timestamp(value: Any, field: str, *, optional: bool) -> dt.datetime | None: ...
def check_timestamp(value: Any, field: str, *, optional: bool = False) -> dt.datetime | None:
    if value is None:
        if optional:
            return None
        raise ValidationError(field, "is required")
    if not isinstance(value, dt.datetime):
        raise ValidationError(field, f"must be a datetime, got {type(value).__name__}")
    try:
        offset = value.utcoffset()
    except (ValueError, TypeError, OverflowError) as exc:  # a tzinfo that answers nonsense
        raise ValidationError(field, f"has an invalid time zone: {exc}") from None
    if offset is None:
        raise ValidationError(field, "must be timezone-aware (e.g. datetime.now(timezone.utc))")
    if offset:
        # Normalised to UTC: the same instant, in a form every path can send. PostgreSQL refuses
        # text offsets beyond ±15:59 that Python allows (up to ±23:59), and a time whose UTC
        # equivalent falls outside years 1..9999 cannot be sent at all (year 1 minus an offset
        # would be stored BC, a value no read could return).
        try:
            return value.astimezone(dt.UTC)
        except OverflowError:
            raise ValidationError(field, f"is out of range in UTC, got {_show(value)}") from None
    return value


def check_json(value: Any, field: str, *, optional: bool = False) -> Any:
    """A JSON-serialisable value: bounded depth and size, finite numbers, no NUL in strings."""
    if value is None:
        if optional:
            return None
        raise ValidationError(field, "is required")
    budget = [MAX_JSON_BYTES]
    _walk(value, field, 0, budget)
    return value


@overload
def check_json_object(value: Any, field: str, *, optional: Literal[False] = False) -> dict[str, Any]: ...
@overload
def check_json_object(value: Any, field: str, *, optional: bool) -> dict[str, Any] | None: ...
def check_json_object(value: Any, field: str, *, optional: bool = False) -> dict[str, Any] | None:
    if value is None and optional:
        return None
    if not isinstance(value, dict):
        raise ValidationError(field, f"must be a JSON object (dict), got {type(value).__name__}")
    check_json(value, field)
    return dict(value)


def _walk(value: Any, field: str, depth: int, budget: list[int]) -> None:
    if depth > MAX_JSON_DEPTH:
        raise ValidationError(field, f"is nested deeper than {MAX_JSON_DEPTH} levels")
    budget[0] -= 8
    if budget[0] < 0:
        raise ValidationError(field, f"is larger than {MAX_JSON_BYTES} bytes")
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        if abs(value) > BIGINT_MAX:
            raise ValidationError(field, "holds an integer outside the 64-bit range")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError(field, f"holds a non-finite number ({value})")
        return
    if isinstance(value, str):
        budget[0] -= len(value)
        if budget[0] < 0:
            raise ValidationError(field, f"is larger than {MAX_JSON_BYTES} bytes")
        _check_chars(value, field, "holds a string with")
        return
    if isinstance(value, dict):  # other Mapping types are not JSON-serialisable by the driver's codec
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValidationError(field, f"has a non-string key {_show(key)}")
            _walk(key, field, depth + 1, budget)
            _walk(item, field, depth + 1, budget)
        return
    if isinstance(value, list | tuple):
        for item in value:
            _walk(item, field, depth + 1, budget)
        return
    raise ValidationError(field, f"holds a {type(value).__name__}, which is not JSON")


def check_duration(value: Any, field: str, *, maximum: float, allow_zero: bool = False) -> float:
    """A finite number (int, float or Decimal, not bool) in ``(0, maximum]`` (``[0, ...]`` with
    ``allow_zero``), as float. Huge ints and signalling NaNs are rejected, never raised raw."""
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        raise ValidationError(field, f"must be a number, got {type(value).__name__}")
    if isinstance(value, Decimal) and not value.is_finite():
        raise ValidationError(field, f"must be a finite number, got {value}")
    bounds = f"{'[0' if allow_zero else '(0'}, {maximum}]"
    if isinstance(value, int) and abs(value) > 2**63:  # float() of a huge int overflows
        raise ValidationError(field, f"must be in {bounds}, got a {value.bit_length()}-bit integer")
    number = float(value)
    low_ok = number >= 0 if allow_zero else number > 0
    if not math.isfinite(number) or not low_ok or number > maximum:
        raise ValidationError(field, f"must be a finite number in {bounds}, got {_show(value)}")
    return number


def check_limit(
    value: Any, field: str = "limit", *, default: int = DEFAULT_LIMIT, maximum: int = MAX_LIMIT
) -> int:
    if type(value) is int and 0 < value <= maximum:
        return value
    if value is None:
        return default
    return check_int(value, field, minimum=1, maximum=maximum)


def check_offset(value: Any, field: str = "offset") -> int:
    if value is None:
        return 0
    return check_int(value, field, minimum=0, maximum=BIGINT_MAX)


def check_order(value: Any, allowed: Mapping[str, str], field: str = "order_by", *, default: str) -> str:
    """Map a public ordering name to its SQL column from a fixed list (never paste input into SQL)."""
    if value is None:
        return allowed[default]
    if not isinstance(value, str) or value not in allowed:
        raise ValidationError(field, f"must be one of {', '.join(sorted(allowed))}, got {_show(value)}")
    return allowed[value]


def check_direction(value: Any, field: str = "order_direction") -> str:
    if value is None:
        return "DESC"
    if isinstance(value, str) and value.upper() in ("ASC", "DESC"):
        return value.upper()
    raise ValidationError(field, f"must be 'asc' or 'desc', got {_show(value)}")


def check_uuid_list(values: Any, field: str) -> list[uuid.UUID]:
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise ValidationError(field, "must be a list of UUIDs")
    return [check_uuid(v, field) for v in values]


def _show(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:  # an object whose repr raises still gets a ValidationError, not that error
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."

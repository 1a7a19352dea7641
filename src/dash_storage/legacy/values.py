"""Legacy column values → values PostgreSQL accepts: JSON, timestamps, money, integers, text.

The old store kept whatever it was given. These converters read it leniently and, where a value
has to change, record a repair on the row (:class:`~dash_storage.legacy.report.RowRepairs`):

* JSON that does not parse is kept as ``{"_legacy_raw": "<text>"}``; valid JSON that must be an
  object but is not is kept as ``{"_legacy_value": <value>}``; NUL characters are removed (jsonb
  cannot hold them).
* Timestamps are ISO-8601 (no offset = UTC) or epoch seconds/milliseconds; None if unreadable.
  A column that may be NULL becomes NULL; one that may not (a swarm's ``created_at``, an agent's
  ``spawned_at``, an event's ``timestamp``) gets :data:`UNREADABLE_TIME`, 1970-01-01T00:00:00Z,
  never the import's now(): now() would make those rows the newest of all, while the epoch sorts
  them first, and one query (``WHERE "timestamp" = '1970-01-01Z'``) finds them. The text that could
  not be read is kept beside the row (see ``legacy.convert``) and the repair names the value used.
* Money (REAL) becomes ``Decimal(str(x))`` with at most 10 decimal places; negative → 0.
"""

from __future__ import annotations

import datetime as dt
import math
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any, Final

import orjson

from dash_storage.legacy.report import RowRepairs

__all__ = [
    "BIGINT_MAX",
    "INT_MAX",
    "NOT_JSON",
    "NOT_OBJECT",
    "NUL_REMOVED",
    "UNREADABLE_TIME",
    "UNREADABLE_TIME_ACTION",
    "dumps",
    "id_label",
    "id_problem",
    "int_column",
    "json_column",
    "json_object",
    "json_value",
    "jsonb_text",
    "loads",
    "optional_time",
    "parse_time",
    "raw",
    "required_time",
    "show",
    "strip_nul",
    "text_value",
    "to_int",
    "to_money",
    "unreadable_time",
]

_MONEY_QUANTUM: Final = Decimal(1).scaleb(-10)
_MONEY_MAX: Final = Decimal("1e14")
INT_MAX: Final = 2**31 - 1
BIGINT_MAX: Final = 2**63 - 1
#: What a legacy timestamp nobody can read becomes in a NOT NULL column: the Unix epoch, so that
#: such rows sort first (not as the newest, as now() would) and are found with one equality test.
UNREADABLE_TIME: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
#: The repair recorded for such a timestamp (after the unreadable value).
UNREADABLE_TIME_ACTION: Final = "set to 1970-01-01T00:00:00Z (the fallback for unreadable times)"
#: The repairs recorded for JSON text that does not parse, JSON that is not the object a column
#: needs, and text whose NUL characters were removed.
NOT_JSON: Final = "not JSON; kept as {'_legacy_raw': text}"
NOT_OBJECT: Final = "not a JSON object; kept as {'_legacy_value': value}"
NUL_REMOVED: Final = "NUL characters removed"


# -- pure helpers -----------------------------------------------------------------------------------


def parse_time(value: Any) -> dt.datetime | None:
    """An aware datetime from ISO-8601 text or epoch seconds/milliseconds; None if unreadable."""
    try:
        if isinstance(value, str):
            try:
                parsed = dt.datetime.fromisoformat(value)
            except ValueError:
                text = value.strip()
                if not text or not text.replace(".", "", 1).isdigit():
                    return None
                return _from_epoch(float(text))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            return _from_epoch(float(value))
        else:
            return None
    except (ValueError, OverflowError, OSError):
        return None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=dt.UTC)
    return parsed


def _from_epoch(seconds: float) -> dt.datetime | None:
    if not math.isfinite(seconds):
        return None
    if seconds > 1e11:  # milliseconds (JavaScript's Date.now())
        seconds /= 1000.0
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


def loads(value: Any) -> tuple[Any, bool]:
    """(decoded JSON, True) or (the raw value, False) when it is not JSON text."""
    if isinstance(value, str | bytes):
        try:
            return orjson.loads(value), True
        except orjson.JSONDecodeError:
            return value, False
    return value, False


def raw(value: Any) -> str:
    """Any legacy value as text (bytes decoded as UTF-8, bad bytes replaced)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def strip_nul(value: Any) -> Any:
    """``value`` (decoded JSON) with NUL characters removed from every string (jsonb rejects them)."""
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, list):
        return [strip_nul(v) for v in value]
    if isinstance(value, dict):
        return {strip_nul(k): strip_nul(v) for k, v in value.items()}
    return value


def dumps(value: Any) -> tuple[str, bool]:
    """JSON text PostgreSQL's jsonb accepts, and whether NULs had to be removed."""
    text = orjson.dumps(value).decode()
    if "\\u0000" in text:
        return orjson.dumps(strip_nul(value)).decode(), True
    return text, False


def to_money(value: Any) -> tuple[Decimal | None, str | None, str | None]:
    """Legacy REAL money → (amount, repair note, reject reason); amount None for NULL.

    The amount is a Decimal with at most 10 decimal places, at least 0 and below 10^14.
    """
    if value is None:
        return None, None, None
    if isinstance(value, bool):
        return None, None, f"is not a number ({value!r})"
    try:
        if isinstance(value, float):
            if not math.isfinite(value):
                return None, None, f"is not a finite number ({value!r})"
            amount = Decimal(str(value))
        elif isinstance(value, int):
            amount = Decimal(value)
        else:
            amount = Decimal(raw(value).strip())
    except (InvalidOperation, ValueError):
        return None, None, f"is not a number ({raw(value)[:40]!r})"
    if not amount.is_finite():
        return None, None, f"is not a finite number ({raw(value)[:40]!r})"
    note = None
    if amount.as_tuple().exponent < -10:  # type: ignore[operator]
        rounded = amount.quantize(_MONEY_QUANTUM, rounding=ROUND_HALF_EVEN)
        note = f"{amount} rounded to 10 decimal places ({rounded})"
        amount = rounded
    if amount < 0:
        note = f"negative amount {amount} set to 0"
        amount = Decimal(0)
    if amount >= _MONEY_MAX:
        return None, None, f"{amount} is too large (at most 10^14)"
    return amount, note, None


def to_int(value: Any, default: int, maximum: int) -> tuple[int, str | None]:
    """(integer, repair note) for a legacy INTEGER column."""
    if value is None:
        return default, None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            return default, f"{raw(value)[:40]!r} is not a number; set to {default}"
        if not math.isfinite(as_float):
            return default, f"{value!r} is not finite; set to {default}"
        number = round(as_float)
        if number != as_float:
            return max(0, min(number, maximum)), f"{value!r} rounded to {max(0, min(number, maximum))}"
    if number < 0:
        return 0, f"negative value {number} set to 0"
    if number > maximum:
        return maximum, f"{number} above {maximum}; capped"
    return number, None


# -- column converters that record their repairs ----------------------------------------------------


def show(value: Any) -> str:
    """A value for a repair note: its repr, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def id_label(value: Any) -> str | None:
    """A legacy id as the report shows it (also one that is not text)."""
    return None if value is None else raw(value)


def id_problem(value: Any) -> str:
    """Why a legacy id cannot be used."""
    if value is None or value == "":
        return "missing id"
    return f"id is not text ({type(value).__name__})"


def text_value(value: Any, field: str, fix: RowRepairs) -> str | None:
    """A nullable text column: non-text values converted to text, NUL characters removed."""
    if value is None:
        return None
    text: str
    if isinstance(value, str):
        text = value
    else:
        fix.add(field, f"{type(value).__name__} value converted to text")
        text = raw(value)
    if "\x00" in text:
        fix.add(field, NUL_REMOVED)
        text = text.replace("\x00", "")
    return text


def json_value(value: Any, field: str, fix: RowRepairs) -> Any:
    """Decoded JSON; text that is not JSON is wrapped as ``{"_legacy_raw": text}``."""
    decoded, ok = loads(value)
    if not ok:
        fix.add(field, NOT_JSON)
        return {"_legacy_raw": raw(value)}
    return decoded


def json_object(value: Any, field: str, fix: RowRepairs, *, null: dict[str, Any]) -> dict[str, Any]:
    """A JSON object (a copy of ``null`` for NULL); any other JSON value is wrapped as ``_legacy_value``."""
    if value is None:
        return dict(null)
    decoded = json_value(value, field, fix)
    if isinstance(decoded, dict):
        return decoded
    fix.add(field, NOT_OBJECT)
    return {"_legacy_value": decoded}


def jsonb_text(value: Any, field: str, fix: RowRepairs) -> str:
    """``value`` (decoded JSON) as text jsonb accepts; NUL characters removed are a repair."""
    text, nul = dumps(value)
    if nul:
        fix.add(field, NUL_REMOVED)
    return text


def json_column(value: Any, field: str, fix: RowRepairs) -> str | None:
    """A nullable JSONB column: NULL stays NULL, any JSON value is kept, bad JSON is wrapped."""
    if value is None:
        return None
    return jsonb_text(json_value(value, field, fix), field, fix)


def int_column(value: Any, field: str, fix: RowRepairs, *, default: int, maximum: int) -> int:
    """An INTEGER column: :func:`to_int`, its note recorded as a repair."""
    number, note = to_int(value, default, maximum)
    if note:
        fix.add(field, note)
    return number


def unreadable_time(
    value: Any, field: str, fix: RowRepairs, *, keep: dict[str, Any], key: str
) -> dt.datetime:
    """:data:`UNREADABLE_TIME` for a NOT NULL timestamp ``value`` that cannot be read: the repair
    (naming the value and the time used) is recorded, and the text is kept in ``keep[key]``
    (a NULL leaves nothing to keep)."""
    fix.add(field, f"unreadable timestamp {show(value)}; {UNREADABLE_TIME_ACTION}")
    if value is not None:
        keep[key] = raw(value)
    return UNREADABLE_TIME


def required_time(value: Any, field: str, fix: RowRepairs, *, keep: dict[str, Any], key: str) -> dt.datetime:
    """A NOT NULL timestamp column: the time, or :func:`unreadable_time` for a value that cannot
    be read."""
    parsed = parse_time(value)
    if parsed is None:
        return unreadable_time(value, field, fix, keep=keep, key=key)
    return parsed


def optional_time(value: Any, field: str, fix: RowRepairs) -> dt.datetime | None:
    """A nullable timestamp column: unreadable values become NULL (and are reported)."""
    if value is None or value == "":
        return None
    parsed = parse_time(value)
    if parsed is None:
        fix.add(field, f"unreadable timestamp {show(value)}; set to NULL")
    return parsed

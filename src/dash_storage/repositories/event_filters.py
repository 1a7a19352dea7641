"""The filters of ``find_by_filter`` and ``count``: their validation, and the statements they read with.

Each set of filters given gets a statement of its own, composed from the ``part_*`` fragments of
``sql/events.sql``: only the conditions of the filters given, each a plain comparison. A single
statement for every combination (``$1 IS NULL OR swarm_id = $1``) would let the server's generic
plan, which a pooled prepared statement settles on, lose the (swarm_id, timestamp, id) and
(agent_id, timestamp, id) indexes. The variants are finite (``FILTERS`` subsets, two orders, with
or without a cursor) and ``statements()`` lists every one, so that a test can PREPARE them all.

Parameters: a select takes the limit as $1, then the values of the filters given, in ``FILTERS``
order, then the cursor (timestamp, id); a count takes only the filter values.
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import re
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, TypedDict

from dash_storage import sql
from dash_storage.core import validation as v
from dash_storage.core.errors import DashStorageError, ValidationError
from dash_storage.repositories.event_input import ENTITY_TYPES, SEVERITIES

__all__ = [
    "FILTERS",
    "ORDERS",
    "PARTS",
    "EventFilters",
    "check_filters",
    "count_sql",
    "select_sql",
    "statements",
]

#: The filters, in the order of their parameters.
FILTERS = ("swarm_id", "agent_id", "types", "entity_type", "severity", "since", "until")
ORDERS = ("ASC", "DESC")


class EventFilters(TypedDict, total=False):
    """The filters of ``find_by_filter`` and ``count`` (``FILTERS``); each may be left out."""

    swarm_id: uuid.UUID | str | None
    agent_id: uuid.UUID | str | None
    types: Sequence[str] | None
    entity_type: str | None
    severity: str | None
    since: dt.datetime | None
    until: dt.datetime | None


_Q = sql.load("events")
_SELECT = _Q["part_select_events"]
_COUNT = _Q["part_count_events"]
_CONDITIONS = {name: _Q[f"part_{name}"] for name in FILTERS}
_AFTER = {"ASC": _Q["part_after_asc"], "DESC": _Q["part_after_desc"]}
_ORDER_BY = {"ASC": _Q["part_order_asc"], "DESC": _Q["part_order_desc"]}
#: The names of the fragments composed here (every ``part_*`` of sql/events.sql).
PARTS = frozenset(
    ["part_select_events", "part_count_events", *(f"part_{n}" for n in FILTERS)]
    + [f"part_after_{o.lower()}" for o in ORDERS]
    + [f"part_order_{o.lower()}" for o in ORDERS]
)
_PARAMETER = re.compile(r"\$(\d+)")
# The names of the filters given, by a mask with bit k set when FILTERS[k] is given.
_GIVEN = tuple(
    tuple(name for k, name in enumerate(FILTERS) if mask >> k & 1) for mask in range(1 << len(FILTERS))
)


def check_filters(
    swarm_id: Any = None,
    agent_id: Any = None,
    types: Any = None,
    entity_type: Any = None,
    severity: Any = None,
    since: Any = None,
    until: Any = None,
) -> tuple[tuple[str, ...], list[Any]] | None:
    """Validate the filters: (the names of those given, in ``FILTERS`` order; their values), or
    None when nothing can match (``types=[]``).

    This runs before every read of the log, so it stays lean: a filter left out costs one test,
    and a list or tuple of types skips the general iterable check.
    """
    values: list[Any] = []
    mask = 0
    if swarm_id is not None:
        values.append(v.check_uuid(swarm_id, "swarm_id"))
        mask = 1
    if agent_id is not None:
        values.append(v.check_uuid(agent_id, "agent_id"))
        mask |= 2
    type_list: list[str] | None = None
    if types is not None:
        if type(types) is not list and type(types) is not tuple:
            if isinstance(types, str | bytes) or not isinstance(types, Iterable):
                raise ValidationError("types", "must be a list of event types")
        type_list = [v.check_text(t, "types", allow_empty=False) for t in types]
        if len(type_list) > v.MAX_LIMIT:
            raise ValidationError("types", f"holds more than {v.MAX_LIMIT} types")
        values.append(type_list)
        mask |= 4
    if entity_type is not None:
        values.append(v.check_choice(entity_type, ENTITY_TYPES, "entity_type"))
        mask |= 8
    if severity is not None:
        values.append(v.check_choice(severity, SEVERITIES, "severity"))
        mask |= 16
    if since is not None:
        values.append(v.check_timestamp(since, "since"))
        mask |= 32
    if until is not None:
        values.append(v.check_timestamp(until, "until"))
        mask |= 64
    if type_list is not None and not type_list:
        return None
    return _GIVEN[mask], values


@functools.cache
def select_sql(filters: tuple[str, ...], order: str, after: bool) -> str:
    """The read of ``find_by_filter``: the events matching ``filters`` (names of ``FILTERS``, in that
    order), ordered by (timestamp, id) ``order`` ("ASC"/"DESC"), after a cursor if ``after``."""
    if order not in ORDERS:
        raise DashStorageError(f"no event order {order!r}; one of {ORDERS}")
    conditions = _conditions(filters, 2)
    if after:
        conditions.append(_numbered(_AFTER[order], 2 + len(filters)))
    return _SELECT + _where(conditions) + "\n" + _ORDER_BY[order]


@functools.cache
def count_sql(filters: tuple[str, ...]) -> str:
    """The read of ``count``: the number of events matching ``filters`` (as for ``select_sql``)."""
    return _COUNT + _where(_conditions(filters, 1))


def statements() -> dict[str, str]:
    """Every statement composed here, by a descriptive name, e.g.
    ``select_events(swarm_id, types) DESC after`` or ``count_events()``."""
    found: dict[str, str] = {}
    for k in range(len(FILTERS) + 1):
        for filters in itertools.combinations(FILTERS, k):
            names = ", ".join(filters)
            found[f"count_events({names})"] = count_sql(filters)
            for order, after in itertools.product(ORDERS, (False, True)):
                key = f"select_events({names}) {order}{' after' if after else ''}"
                found[key] = select_sql(filters, order, after)
    return found


def _conditions(filters: tuple[str, ...], first: int) -> list[str]:
    positions = [_position(name) for name in filters]
    if positions != sorted(set(positions)):
        raise DashStorageError(f"event filters {filters} are not distinct names in the order of {FILTERS}")
    return [_numbered(_CONDITIONS[name], first + i) for i, name in enumerate(filters)]


def _position(name: str) -> int:
    try:
        return FILTERS.index(name)
    except ValueError:
        raise DashStorageError(f"no event filter {name!r}; one of {FILTERS}") from None


def _numbered(part: str, first: int) -> str:
    """``part`` with its parameters $1, $2, ... renumbered from ``first``."""
    return _PARAMETER.sub(lambda m: f"${int(m.group(1)) + first - 1}", part)


def _where(conditions: list[str]) -> str:
    return (" WHERE " + " AND ".join(conditions)) if conditions else ""

"""The ``--since`` value of ``dash-db events``: an ISO timestamp or a duration back from now."""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal

__all__ = ["parse_since"]

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
_MAX_SECONDS = 100 * 366 * 86_400  # a century: further back than any event, still a valid datetime
_EXAMPLES = "e.g. 15m, 2h, 1d, 2026-01-31 or 2026-01-31T09:30:00+01:00"


def parse_since(text: str) -> dt.datetime | dt.timedelta:
    """An aware datetime (timestamps without an offset are UTC), or how far back from now.

    Durations are a number and one unit: s, m, h, d or w (``15m``, ``2h``, ``1.5d``). Anything else
    is a ValueError whose message says what is accepted.
    """
    value = text.strip()
    match = _DURATION.match(value.lower())
    if match:
        seconds = Decimal(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        if seconds > _MAX_SECONDS:
            raise ValueError(f"{text!r} is more than a century back; {_EXAMPLES}")
        return dt.timedelta(seconds=float(seconds))
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither an ISO timestamp nor a duration (a number and s, m, h, d or w); {_EXAMPLES}"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)

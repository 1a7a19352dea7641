"""The start-up check that POSTGRES_POOLER says what really sits in front of PostgreSQL.

Behind a transaction-mode pooler each transaction may run on another server connection, so what a
session leaves on the server (named prepared statements, ``SET``, advisory locks, ``LISTEN``, TEMP
tables) is gone in the next transaction, or is found by another client. A wrong POSTGRES_POOLER
does not fail at once: it fails later and at random, under load, as "prepared statement does not
exist" or a lock that is never released. So when a pool opens on a server, this check spends a few
round trips to find out, and refuses with one ConfigurationError that says what to set.

What it looks at:

* A pooler in between: the process id the server reports (``pg_backend_pid()``) differs from the
  one announced at login, which a pooler makes up itself (it routes cancel requests by it). A
  direct connection, or a TCP proxy that only forwards bytes, announces the server's own.
* Pooling by transaction: the pool's connection runs a statement on server process P; a second
  client connection then opens a transaction. If that transaction runs on P, or the pool's
  connection then runs elsewhere than P, server connections move between clients between
  transactions. A session pooler can do neither. PgBouncer hands out the server connection used
  last first (its default), so the second connection gets P and the answer is immediate; a pooler
  that chooses otherwise may leave the check undecided, which it then says.
* Prepared statements carried across (POSTGRES_POOLER_PREPARED_STATEMENTS): the pool's statement is
  a named prepared statement; run again after the switch, it either works (the pooler prepared it
  on the new server connection) or fails with "prepared statement does not exist".
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import asyncpg

from dash_storage.core import driver
from dash_storage.core.config import Settings
from dash_storage.core.errors import ConfigurationError

__all__ = ["PoolerCheck", "check_pooler"]

log = logging.getLogger("dash_storage")

# The pool's side of the probe (a statement of its own, so that it is prepared afresh, by name
# where the settings keep named statements) and the second connection's side.
_PROBE_SQL = "SELECT pg_backend_pid() AS pid /* dash-storage pooler check */"
_OTHER_SQL = "SELECT pg_backend_pid()"

OpenOther = Callable[[], Awaitable["asyncpg.Connection[asyncpg.Record]"]]


@dataclass(frozen=True, slots=True)
class PoolerCheck:
    """What the start-up check found (``dash-db doctor`` shows it).

    ``pooled``: a pooler sits between (the announced process id is not the server's).
    ``by_transaction``: server connections were seen moving between clients between transactions
    (True), never can (False: no pooler), or the check could not make them move (None).
    ``statements_carried``: a named prepared statement survived the move (None when not tried).
    ``checked``: whether it tried to make them move (not with POSTGRES_POOLER=transaction and the
    statement cache off, which is right behind any pooler).
    """

    pooled: bool
    by_transaction: bool | None
    statements_carried: bool | None = None
    checked: bool = True

    def describe(self) -> str:
        if not self.pooled:
            return "none seen (the server's process id is the one announced at login)"
        if not self.checked:
            return "a pooler sits in front of the server (its pool mode was not checked: not needed)"
        how = {
            True: "pools by transaction",
            False: "keeps one server connection per client",
            None: "did not move server connections while checked",
        }[self.by_transaction]
        text = f"a pooler sits in front of the server; it {how}"
        if self.statements_carried is not None:
            text += "; it carries prepared statements" if self.statements_carried else "; it drops them"
        return text


async def check_pooler(con: Any, settings: Settings, open_other: OpenOther) -> PoolerCheck:
    """Check ``con`` (a pooled connection) against POSTGRES_POOLER; raise ConfigurationError on a
    mismatch. ``open_other`` opens a second client connection to the same place (closed here)."""
    mode = settings.postgres_pooler
    pid = await con.fetchval(_PROBE_SQL)
    pooled = pid != con.get_server_pid()
    if mode == "transaction" and not settings.named_statements:
        # Unnamed statements and no session state on pooled connections: right behind any pooler,
        # and on a direct server too. Nothing more to check.
        return PoolerCheck(pooled=pooled, by_transaction=None if pooled else False, checked=False)
    if not pooled:
        if mode != "none":
            log.info("POSTGRES_POOLER=%s, but the connection reaches the server directly", mode)
        return PoolerCheck(pooled=False, by_transaction=False)
    moved, carried = await _moved(
        con, pid, open_other, named=settings.named_statements, wait=settings.connection_timeout_s
    )
    found = PoolerCheck(pooled=True, by_transaction=moved, statements_carried=carried)
    if mode == "none":
        raise ConfigurationError(_unset_message(found), variable="POSTGRES_POOLER")
    if mode == "session" and moved:
        raise ConfigurationError(
            "POSTGRES_POOLER=session, but the pooler in front of the server pools by transaction "
            "(it moved a server connection from one client to another between transactions): set "
            "POSTGRES_POOLER=transaction, and DATABASE_DIRECT_URL to the server itself for migrations "
            "and LISTEN; or set the pooler's pool_mode to session",
            variable="POSTGRES_POOLER",
        )
    if mode == "transaction" and carried is False:
        raise ConfigurationError(
            "POSTGRES_POOLER_PREPARED_STATEMENTS=true, but the pooler in front of the server does not "
            "carry prepared statements from one server connection to another (a statement prepared "
            "in one transaction did not exist in the next, on another server process). It takes "
            "PgBouncer 1.21 or later with max_prepared_statements above 0; otherwise set "
            "POSTGRES_POOLER_PREPARED_STATEMENTS=false",
            variable="POSTGRES_POOLER_PREPARED_STATEMENTS",
        )
    if mode == "transaction" and moved is None:
        log.warning(
            "POSTGRES_POOLER_PREPARED_STATEMENTS=true: the start-up check could not make the pooler "
            "move this connection to another server process, so it could not confirm that the "
            "pooler carries prepared statements"
        )
    return found


def _unset_message(found: PoolerCheck) -> str:
    seen = (
        "it pools by transaction (it moved a server connection from one client to another between "
        "transactions), so set POSTGRES_POOLER=transaction, and DATABASE_DIRECT_URL to the server "
        "itself for migrations and LISTEN"
        if found.by_transaction
        else "set POSTGRES_POOLER=session if it keeps one server connection per client connection "
        "(PgBouncer pool_mode=session), POSTGRES_POOLER=transaction if it pools by transaction"
    )
    return (
        "POSTGRES_POOLER is none (the default), but the connection goes through a connection pooler "
        "(the server's process id is not the one announced at login, as with PgBouncer): " + seen
    )


async def _moved(
    con: Any, pid: int, open_other: OpenOther, *, named: bool, wait: float
) -> tuple[bool | None, bool | None]:
    """Whether server connections move between clients between transactions (True, or None when
    none was seen to), and, when ``con`` keeps named statements and moved, whether its prepared
    statement came along. A pooler with no server connection free within ``wait`` seconds (say,
    every one held by this pool in session mode) leaves it undecided rather than stalled."""
    other = await open_other()
    try:
        try:
            await other.execute("BEGIN", timeout=wait)
            took_ours = await other.fetchval(_OTHER_SQL, timeout=wait) == pid
        except TimeoutError:
            log.info("pooler check: no server connection free for a second client; not checked")
            return None, None
        try:
            # The statement prepared above, sent again while the other client holds its transaction.
            now = await con.fetchval(_PROBE_SQL, timeout=wait)
        except TimeoutError:
            con.terminate()  # its cancelled wait may leave it half-way: the pool replaces it
            log.info("pooler check: no server connection came free for the pool; not checked")
            return (True if took_ours else None), None
        except asyncpg.PostgresError as exc:
            if not driver.message_is_missing_statement(exc):
                raise
            return True, False
        finally:
            with suppress(Exception):  # ended cleanly, the pooler keeps its server connection
                await other.execute("ROLLBACK", timeout=wait)
    finally:
        other.terminate()
    moved = took_ours or now != pid
    return (True if moved else None), (True if moved and named else None)

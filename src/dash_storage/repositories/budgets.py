"""BudgetRepository: budgets, their consumption ledger, and usage reports.

Consumption is ONE statement (``CONSUME``): it locks the budget row, checks the idempotency key,
checks headroom (cost against ``allocated``, tokens against ``max_tokens``), writes the
``budget_ledger`` row and updates the counters, all atomically. Concurrent consumes of one budget
serialize on the row lock; the table's CHECK constraints are the last line of defence, so
``consumed`` can never exceed ``allocated`` nor ``used_tokens`` exceed ``max_tokens``.

Hot budgets: by default concurrent consumes of the SAME budget within one process (one Database)
are combined into one statement and one commit (``budget_batcher.CONSUME_BATCH``), judged greedily
in arrival order: each is granted if it fits the headroom the grants before it left, and one that
does not fit leaves that headroom to later, smaller ones. A caller alone sends ``CONSUME`` at once.
``BudgetRepository(db, combine=False)`` sends every consume on its own instead. See
``budget_batcher`` for the details.

Idempotency: every consume carries a key (generated when the caller gives none), so a retry after a
lost connection answers instead of charging twice. A repeated key answers ``DUPLICATE`` (granted)
without charging again; a repeated key with different amounts is a ConflictError. Only granted
charges are recorded: an ``INSUFFICIENT`` answer leaves no trace, so the same key may be granted
later if the budget grows.

Semantics of the limits: reaching a limit exactly is allowed. ``max_tokens`` NULL means unlimited
(up to BIGINT's range: a charge past it is INSUFFICIENT, not an error), 0 means zero tokens (a
charge with ``tokens=0`` still passes the token check). ``allocated`` 0 means no money: only
``cost=0`` charges pass. "Exceeded" means no headroom left: ``consumed >= allocated`` or
``used_tokens >= max_tokens``.

Percent used (``percent_used``, and the SQL function ``dash_budget_percentage`` the views use: one
definition, kept equal by the tests): ``part / whole * 100`` rounded DOWN to 2 decimals, computed
exactly, so it reads 100.00 exactly when no headroom is left (99.999 % used shows 99.99, not a
rounded-up 100.00 while a charge could still pass). A ``whole`` of 0 reads 100.00: a zero
allocation (or ``max_tokens`` 0) has no headroom at all, so it is "100 % used" and exceeded from
the start, like an allocation spent to the last cent. Unlimited tokens have no percentage (None).
"""

from __future__ import annotations

import builtins
import functools
import math
import uuid
from decimal import Decimal
from fractions import Fraction
from typing import Any

import asyncpg

from dash_storage.core import validation as v
from dash_storage.core.database import Connection, Database
from dash_storage.core.errors import ConflictError, NotFoundError, ValidationError
from dash_storage.core.ids import new_id
from dash_storage.core.models import (
    BUDGET_COLUMNS,
    UNSET,
    Budget,
    BudgetUsage,
    ConsumeResult,
    ConsumeStatus,
    Currency,
    ScopeType,
    SwarmBudgetSummary,
    Unset,
)
from dash_storage.repositories.base import Repository, written_by_us
from dash_storage.repositories.budget_batcher import (  # the consume statements live there
    CONSUME,
    CONSUME_BATCH,
    SELECT_LEDGER_BY_KEY,
    SELECT_LEDGER_BY_KEYS,
    ConsumeRequest,
    combiner_for,
    consume_one,
)

__all__ = [
    "BUDGET_ORDER_COLUMNS",
    "CONSUME",
    "CONSUME_BATCH",
    "SELECT_LEDGER_BY_KEY",
    "SELECT_LEDGER_BY_KEYS",
    "BudgetRepository",
    "percent_used",
]

SCOPE_TYPES = frozenset(s.value for s in ScopeType)
CURRENCIES = frozenset(c.value for c in Currency)
#: Public ``order_by`` names of ``list`` -> SQL column (a fixed allow-list, never input).
BUDGET_ORDER_COLUMNS = {
    "created_at": "created_at",
    "updated_at": "updated_at",
    "allocated": "allocated",
    "consumed": "consumed",
}
#: Columns ``update`` may set, in the order their parameters are numbered.
UPDATABLE_COLUMNS = ("allocated", "currency", "max_tokens")
_FULL = Decimal("100.00")

# Idempotent create: a retried attempt finds its own row instead of inserting a second one.
INSERT_BUDGET = f"""
INSERT INTO budgets (id, swarm_id, scope_type, scope_id, allocated, currency, max_tokens)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (id) DO NOTHING
RETURNING {BUDGET_COLUMNS}
"""  # noqa: S608
# One budget by primary key.
SELECT_BUDGET_BY_ID = f"SELECT {BUDGET_COLUMNS} FROM budgets WHERE id = $1"  # noqa: S608
# The budget of one scope (unique).
SELECT_BUDGET_BY_SCOPE = f"""
SELECT {BUDGET_COLUMNS} FROM budgets WHERE scope_type = $1 AND scope_id = $2
"""  # noqa: S608
# Every budget of a swarm, swarm scope first, then oldest first.
SELECT_BUDGETS_BY_SWARM = f"""
SELECT {BUDGET_COLUMNS} FROM budgets WHERE swarm_id = $1
ORDER BY scope_type <> 'swarm', created_at, id LIMIT $2
"""  # noqa: S608
# Template of list(): {where}, {order}, {direction} are filled only from fixed fragments in code.
LIST_BUDGETS_TEMPLATE = f"""
SELECT {BUDGET_COLUMNS} FROM budgets{{where}}
ORDER BY {{order}} {{direction}}, id {{direction}} LIMIT $1 OFFSET $2
"""  # noqa: S608
# Template of update(): {assignments} is built from the fixed column list UPDATABLE_COLUMNS.
UPDATE_BUDGET_TEMPLATE = f"""
UPDATE budgets SET {{assignments}} WHERE id = $1 RETURNING {BUDGET_COLUMNS}
"""  # noqa: S608
# Delete one budget (its ledger cascades).
DELETE_BUDGET = "DELETE FROM budgets WHERE id = $1 RETURNING 1"
# reset_consumption step 1: lock the budget so no consume commits between the next two statements.
LOCK_BUDGET = "SELECT 1 FROM budgets WHERE id = $1 FOR UPDATE"
# reset_consumption step 2: forget the budget's ledger (it must keep summing to the counters).
DELETE_LEDGER = "DELETE FROM budget_ledger WHERE budget_id = $1"
# reset_consumption step 3: zero the counters.
RESET_BUDGET = f"""
UPDATE budgets SET consumed = 0, used_tokens = 0 WHERE id = $1 RETURNING {BUDGET_COLUMNS}
"""  # noqa: S608
# Totals of a swarm's budgets; max_tokens is NULL (unlimited) when any of them is unlimited, and
# when there is no budget at all (nothing limits the tokens; 0 would mean "no tokens allowed").
SELECT_SWARM_SUMMARY = """
SELECT count(*),
       COALESCE(sum(allocated), 0),
       COALESCE(sum(consumed), 0),
       CASE WHEN count(*) = 0 OR bool_or(max_tokens IS NULL) THEN NULL ELSE sum(max_tokens) END,
       COALESCE(sum(used_tokens), 0)
FROM budgets WHERE swarm_id = $1
"""


@functools.lru_cache(maxsize=64)
def _list_sql(scope: bool, swarm: bool, order: str, direction: str) -> str:
    parts = []
    n = 3
    if scope:
        parts.append(f"scope_type = ${n}")
        n += 1
    if swarm:
        parts.append(f"swarm_id = ${n}")
    where = (" WHERE " + " AND ".join(parts)) if parts else ""
    return LIST_BUDGETS_TEMPLATE.format(where=where, order=order, direction=direction)


@functools.lru_cache(maxsize=64)
def _update_sql(columns: tuple[str, ...]) -> str:
    assert all(c in UPDATABLE_COLUMNS for c in columns)
    assignments = ", ".join(f"{c} = ${i}" for i, c in enumerate(columns, start=2))
    return UPDATE_BUDGET_TEMPLATE.format(assignments=assignments)


def _id(value: Any, field: str = "id") -> uuid.UUID:
    result = v.check_uuid(value, field)
    assert result is not None
    return result


def _choice(value: Any, allowed: frozenset[str], field: str) -> str:
    result = v.check_choice(value, allowed, field)
    assert result is not None
    return result


def _money(value: Any, field: str) -> Decimal:
    result = v.check_money(value, field)
    assert result is not None
    return result


def _tokens(value: Any, field: str = "tokens") -> int:
    result = v.check_int(value, field, minimum=0)
    assert result is not None
    return result


def _key(value: Any) -> str:
    if value is None:
        return str(new_id())
    result = v.check_text(value, "idempotency_key", allow_empty=False)
    assert result is not None
    return result


def percent_used(part: Decimal, whole: Decimal) -> Decimal:
    """``part`` as a percentage of ``whole``, rounded down to 2 decimals (exactly, whatever the
    digits); a zero ``whole`` is fully used (100.00). The SQL function ``dash_budget_percentage``
    of the views computes the same."""
    if whole == 0:
        return _FULL
    hundredths = math.floor(Fraction(part) * 10_000 / Fraction(whole))
    return Decimal(hundredths).scaleb(-2)


def _usage(b: Budget) -> BudgetUsage:
    return BudgetUsage(
        budget_id=b.id,
        tokens=b.used_tokens,
        cost=b.consumed,
        percentage_tokens=None
        if b.max_tokens is None
        else percent_used(Decimal(b.used_tokens), Decimal(b.max_tokens)),
        percentage_cost=percent_used(b.consumed, b.allocated),
        remaining_tokens=None if b.max_tokens is None else b.max_tokens - b.used_tokens,
        remaining_cost=b.allocated - b.consumed,
        is_exceeded=_exceeded(b),
    )


def _exceeded(b: Budget) -> bool:
    """No headroom left: all the money is spent, or all the tokens are."""
    return b.consumed >= b.allocated or (b.max_tokens is not None and b.used_tokens >= b.max_tokens)


class BudgetRepository(Repository):
    """Budgets per scope (swarm, agent, project): create, read, update, consume, report, reset.

    ``combine`` (default True): concurrent consumes of one budget on the same Database are sent
    together, one statement and one commit per batch (see the module docstring). False sends each
    consume as its own statement.
    """

    __slots__ = ("_combine",)

    def __init__(self, db: Database | None = None, *, combine: bool = True) -> None:
        super().__init__(db)
        self._combine = combine

    async def create(
        self,
        scope_type: str,
        scope_id: uuid.UUID | str,
        *,
        swarm_id: uuid.UUID | str | None = None,
        allocated: Decimal | int | float | str = 0,
        currency: str = "USD",
        max_tokens: int | None = None,
        id: uuid.UUID | str | None = None,
    ) -> Budget:
        """Insert a budget. A swarm-scope budget belongs to its swarm (``swarm_id`` defaults to, and
        must equal, ``scope_id``). Raises NotFoundError naming the swarm if it does not exist,
        ConflictError if the id or scope exists.
        """
        budget_id = v.check_uuid(id, "id", optional=True) or new_id()
        scope = _choice(scope_type, SCOPE_TYPES, "scope_type")
        sid = _id(scope_id, "scope_id")
        swarm = v.check_uuid(swarm_id, "swarm_id", optional=True)
        if scope == ScopeType.SWARM:
            if swarm is None:
                swarm = sid
            elif swarm != sid:
                raise ValidationError("swarm_id", "must equal scope_id for a swarm-scope budget")
        args = (
            budget_id,
            swarm,
            scope,
            sid,
            _money(allocated, "allocated"),
            _choice(currency, CURRENCIES, "currency"),
            v.check_int(max_tokens, "max_tokens", optional=True),
        )

        async def insert(con: Connection, attempt: int) -> Budget:
            try:
                row = await con.fetchrow(INSERT_BUDGET, *args)
            except asyncpg.ForeignKeyViolationError as exc:  # budgets.swarm_id: the only reference
                raise NotFoundError("swarm", swarm) from exc
            if row is None:
                if attempt > 1:  # our own row, written by an attempt whose answer was lost
                    row = await con.fetchrow(SELECT_BUDGET_BY_ID, budget_id)
                    ours = {"scope_type": args[2], "scope_id": args[3]}
                    if row is not None and not written_by_us(row, ours):
                        row = None  # another budget already had this id
                if row is None:
                    raise ConflictError(f"budget {budget_id} already exists", constraint="budgets_pkey")
            return Budget(*row)

        return await self.db.run(insert, retry=True)

    async def find_by_id(self, id: uuid.UUID | str) -> Budget | None:
        """The budget with this id, or None."""
        row = await self.db.fetchrow(SELECT_BUDGET_BY_ID, _id(id), retry=True)
        return Budget(*row) if row is not None else None

    async def find_by_scope(self, scope_type: str, scope_id: uuid.UUID | str) -> Budget | None:
        """The budget of a scope (there is at most one), or None."""
        scope = _choice(scope_type, SCOPE_TYPES, "scope_type")
        row = await self.db.fetchrow(SELECT_BUDGET_BY_SCOPE, scope, _id(scope_id, "scope_id"), retry=True)
        return Budget(*row) if row is not None else None

    async def find_by_swarm_id(
        self, swarm_id: uuid.UUID | str, limit: int | None = None
    ) -> builtins.list[Budget]:
        """A swarm's budgets: the swarm-scope one first, then the others oldest first."""
        sid = _id(swarm_id, "swarm_id")
        rows = await self.db.fetch(SELECT_BUDGETS_BY_SWARM, sid, v.check_limit(limit), retry=True)
        return [Budget(*r) for r in rows]

    async def list(
        self,
        scope_type: str | None = None,
        swarm_id: uuid.UUID | str | None = None,
        limit: int | None = None,
        offset: int | None = None,
        order_by: str = "created_at",
        order_direction: str = "desc",
    ) -> builtins.list[Budget]:
        """Budgets, optionally of one scope type and/or swarm, ordered by created_at, updated_at,
        allocated or consumed, then id."""
        scope = v.check_choice(scope_type, SCOPE_TYPES, "scope_type", optional=True)
        swarm = v.check_uuid(swarm_id, "swarm_id", optional=True)
        lim = v.check_limit(limit)
        off = v.check_offset(offset)
        order = v.check_order(order_by, BUDGET_ORDER_COLUMNS, default="created_at")
        direction = v.check_direction(order_direction)
        args: builtins.list[Any] = [lim, off]
        if scope is not None:
            args.append(scope)
        if swarm is not None:
            args.append(swarm)
        sql = _list_sql(scope is not None, swarm is not None, order, direction)
        rows = await self.db.fetch(sql, *args, retry=True)
        return [Budget(*r) for r in rows]

    async def update(
        self,
        id: uuid.UUID | str,
        *,
        allocated: Decimal | int | float | str | Unset = UNSET,
        currency: str | Unset = UNSET,
        max_tokens: int | Unset | None = UNSET,
    ) -> Budget | None:
        """Change the allocation, currency or token limit (None = unlimited); None if no such budget.

        An allocation below what is already consumed (or a token limit below the tokens already
        used) is a ValidationError naming ``allocated`` (``max_tokens``); checked atomically.
        """
        budget_id = _id(id)
        values: dict[str, Any] = {}
        if allocated is not UNSET:
            values["allocated"] = _money(allocated, "allocated")
        if currency is not UNSET:
            values["currency"] = _choice(currency, CURRENCIES, "currency")
        if max_tokens is not UNSET:
            values["max_tokens"] = v.check_int(max_tokens, "max_tokens", optional=True)
        if not values:
            return await self.find_by_id(budget_id)
        columns = tuple(c for c in UPDATABLE_COLUMNS if c in values)
        try:
            row = await self.db.fetchrow(
                _update_sql(columns), budget_id, *(values[c] for c in columns), retry=True
            )
        except ValidationError as exc:
            if exc.field == "budgets_consumed_within_allocated_check":
                raise ValidationError(
                    "allocated", f"{values['allocated']} is below the amount already consumed"
                ) from exc.__cause__
            if exc.field == "budgets_used_tokens_within_max_check":
                raise ValidationError(
                    "max_tokens", f"{values['max_tokens']} is below the tokens already used"
                ) from exc.__cause__
            raise
        return Budget(*row) if row is not None else None

    async def delete(self, id: uuid.UUID | str) -> bool:
        """Delete a budget and its ledger; False if there was none.

        Retried on a lost connection (deleting twice is harmless); if the first attempt's answer was
        lost after it committed, the retry answers False although this call deleted the budget.
        """
        return await self.db.fetchval(DELETE_BUDGET, _id(id), retry=True) is not None

    async def try_consume(
        self,
        budget_id: uuid.UUID | str,
        tokens: int,
        cost: Decimal | int | float | str,
        idempotency_key: str | None = None,
    ) -> ConsumeResult:
        """Charge ``tokens`` and ``cost`` if both fit, atomically, once per ``idempotency_key``.

        Answers GRANTED (charged now), DUPLICATE (this key was charged before: nothing charged
        again), INSUFFICIENT (does not fit: nothing charged or recorded) or NOT_FOUND. Safe to retry;
        a key reused with different amounts raises ConflictError.
        """
        req = ConsumeRequest(
            _id(budget_id, "budget_id"),
            _tokens(tokens),
            _money(cost, "cost"),
            _key(idempotency_key),
            new_id(),
        )
        if self._combine:
            return await combiner_for(self.db).consume(req)
        return await consume_one(self.db, req)

    async def consume_budget(
        self,
        budget_id: uuid.UUID | str,
        tokens: int,
        cost: Decimal | int | float | str,
        idempotency_key: str | None = None,
    ) -> bool:
        """``try_consume`` answering only whether the charge stands (granted now or before).

        False means insufficient budget OR no such budget; use ``try_consume`` to tell them apart.
        """
        result = await self.try_consume(budget_id, tokens, cost, idempotency_key)
        return result.granted

    async def add_usage(
        self,
        budget_id: uuid.UUID | str,
        tokens: int,
        cost: Decimal | int | float | str,
        idempotency_key: str | None = None,
    ) -> Budget:
        """Record usage that must be booked, returning the updated budget; raises instead of answering.

        The same guarded, idempotent statement as ``try_consume`` (the schema forbids consumed above
        allocated, so usage beyond the limits cannot be recorded): NotFoundError if there is no
        budget, ConflictError if the usage does not fit the remaining headroom (nothing recorded).
        """
        result = await self.try_consume(budget_id, tokens, cost, idempotency_key)
        if result.status is ConsumeStatus.NOT_FOUND:
            raise NotFoundError("budget", result.budget_id)
        budget = result.budget
        assert budget is not None
        if result.status is ConsumeStatus.INSUFFICIENT:
            constraint = (
                "budgets_consumed_within_allocated_check"
                if budget.consumed + _money(cost, "cost") > budget.allocated
                else "budgets_used_tokens_within_max_check"
            )
            raise ConflictError(
                f"usage of {tokens} tokens / {cost} {budget.currency} exceeds the headroom of budget "
                f"{budget.id} (remaining {budget.allocated - budget.consumed}"
                + ("" if budget.max_tokens is None else f", {budget.max_tokens - budget.used_tokens} tokens")
                + ")",
                constraint=constraint,
            )
        return budget

    async def get_usage(self, budget_id: uuid.UUID | str) -> BudgetUsage | None:
        """Tokens and cost used, percentages, remaining amounts and is_exceeded; None if no budget."""
        budget = await self.find_by_id(_id(budget_id, "budget_id"))
        return _usage(budget) if budget is not None else None

    async def get_usage_by_scope(self, scope_type: str, scope_id: uuid.UUID | str) -> BudgetUsage | None:
        """``get_usage`` of the budget of a scope; None if the scope has no budget."""
        budget = await self.find_by_scope(scope_type, scope_id)
        return _usage(budget) if budget is not None else None

    async def is_exceeded(self, budget_id: uuid.UUID | str) -> bool | None:
        """True when no headroom is left (consumed >= allocated, or used_tokens >= max_tokens);
        None if there is no such budget."""
        budget = await self.find_by_id(_id(budget_id, "budget_id"))
        return _exceeded(budget) if budget is not None else None

    async def get_swarm_budget_summary(self, swarm_id: uuid.UUID | str) -> SwarmBudgetSummary:
        """Totals over every budget of a swarm (all scopes; amounts are summed as-is, whatever their
        currency). ``max_tokens`` is None (unlimited) if any budget is unlimited, and for a swarm
        without budgets (``budgets`` 0: nothing limits it), whose money figures are 0."""
        sid = _id(swarm_id, "swarm_id")
        row = await self.db.fetchrow(SELECT_SWARM_SUMMARY, sid, retry=True)
        assert row is not None
        count, allocated, consumed, max_tokens, used_tokens = row
        return SwarmBudgetSummary(
            swarm_id=sid,
            budgets=int(count),
            allocated=allocated,
            consumed=consumed,
            remaining=allocated - consumed,
            max_tokens=None if max_tokens is None else int(max_tokens),
            used_tokens=int(used_tokens),
        )

    async def reset_consumption(self, budget_id: uuid.UUID | str) -> Budget | None:
        """Zero ``consumed`` and ``used_tokens`` and delete the budget's ledger, in one transaction
        (the ledger keeps summing to the counters); None if there is no such budget.

        The idempotency keys go with the ledger: a consume retried with an old key after the reset
        is charged again.
        """
        bid = _id(budget_id, "budget_id")

        async def reset(con: Connection, attempt: int) -> Budget | None:
            # Lock first: a consume committing between the DELETE and the UPDATE would otherwise
            # be zeroed while its ledger row survives.
            if await con.fetchval(LOCK_BUDGET, bid) is None:
                return None
            await con.execute(DELETE_LEDGER, bid)
            row = await con.fetchrow(RESET_BUDGET, bid)
            return Budget(*row) if row is not None else None

        return await self.db.run(reset, retry=True, transaction=True)

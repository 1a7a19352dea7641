"""BudgetRepository: budgets, their consumption ledger, and usage reports.

Consumption is ONE statement (``CONSUME``): one guarded UPDATE checks the idempotency key and the
headroom (cost against ``allocated``, tokens against ``max_tokens``) and updates the counters, and
the ``budget_ledger`` row is written with it, all atomically. A consume that is refused takes no
lock and writes nothing; concurrent grants of one budget serialize on the row lock the UPDATE takes
(each judged on the one before it); the table's CHECK constraints are the last line of defence, so
``consumed`` can never exceed ``allocated`` nor ``used_tokens`` exceed ``max_tokens``.

Hot budgets: by default concurrent consumes of the SAME budget within one process (one Database)
are combined into one statement and one commit (``budget_batcher.CONSUME_BATCH``), judged greedily
in arrival order: each is granted if it fits the headroom the grants before it left, and one that
does not fit leaves that headroom to later, smaller ones. A caller alone sends ``CONSUME`` at once.
``BudgetRepository(db, combine=False)`` sends every consume on its own instead; its concurrent
consumes of one budget take turns in the process (``budget_turns``). See ``budget_batcher`` for the
details.

Idempotency: every consume carries a key (generated when the caller gives none), so a retry after a
lost connection answers instead of charging twice. A key generated for the call cannot be in the
ledger before it is first sent, so that first try skips the look-up (``CONSUME_NEW``); every retry
looks it up. A repeated key answers ``DUPLICATE`` (granted)
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
import math
import uuid
from decimal import Decimal
from fractions import Fraction
from typing import Any

from dash_storage import sql
from dash_storage.core import validation as v
from dash_storage.core.database import Connection, Database
from dash_storage.core.errors import ConflictError, NotFoundError, ValidationError
from dash_storage.core.ids import new_id
from dash_storage.core.models import (
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
from dash_storage.repositories.base import ListReads, Repository, given, values_of
from dash_storage.repositories.budget_batcher import (
    CONSUME,
    CONSUME_BATCH,
    CONSUME_NEW,
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
    "CONSUME_NEW",
    "SELECT_LEDGER_BY_KEY",
    "SELECT_LEDGER_BY_KEYS",
    "BudgetRepository",
    "percent_used",
    "statements",
]

SCOPE_TYPES = values_of(ScopeType)
CURRENCIES = values_of(Currency)
#: Public ``order_by`` names of ``list`` -> SQL column, the same name (a fixed allow-list, never input).
BUDGET_ORDER_COLUMNS = {column: column for column in ("created_at", "updated_at", "allocated", "consumed")}
_FULL = Decimal("100.00")

# The statements, in the order of the methods that send them (the consume statements are used by
# budget_batcher).
_Q = sql.load("budgets")
INSERT_BUDGET = _Q["insert"]
SELECT_BUDGET_BY_ID = _Q["find_by_id"]
SELECT_BUDGET_BY_SCOPE = _Q["find_by_scope"]
SELECT_BUDGETS_BY_SWARM = _Q["find_by_swarm"]
_LISTS = ListReads(_Q, "part_list", BUDGET_ORDER_COLUMNS)
#: The reads of list() per (order column, direction): of every budget, of one scope type, and of
#: one swarm.
LIST_BUDGETS = _LISTS.form("list_by")
LIST_BUDGETS_OF_SCOPE = _LISTS.form("list_of_scope_by", "part_of_scope")
LIST_BUDGETS_IN_SWARM = _LISTS.form("list_in_swarm_by", "part_in_swarm")
#: Every statement composed here, by name: ``statements()`` (the statement registry PREPAREs each).
statements = _LISTS.statements
UPDATE_BUDGET = _Q["update"]
DELETE_BUDGET = _Q["delete"]
SELECT_SWARM_SUMMARY = _Q["swarm_summary"]
LOCK_BUDGET = _Q["lock"]
DELETE_LEDGER = _Q["delete_ledger"]
RESET_BUDGET = _Q["reset"]


def _scope(value: Any) -> str:
    return v.check_choice(value, SCOPE_TYPES, "scope_type")


def _currency(value: Any) -> str:
    return v.check_choice(value, CURRENCIES, "currency")


def _key(value: Any, ledger_id: uuid.UUID) -> str:
    """The idempotency key of a consume: the caller's, else one made for the call (the text of its
    ledger row's id, as unique as that id)."""
    if value is None:
        return str(ledger_id)
    return v.check_text(value, "idempotency_key", allow_empty=False)


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
        scope = _scope(scope_type)
        sid = v.check_uuid(scope_id, "scope_id")
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
            v.check_money(allocated, "allocated"),
            _currency(currency),
            v.check_int(max_tokens, "max_tokens", optional=True),
        )
        ours = {"scope_type": scope, "scope_id": sid}
        # budgets.swarm_id is the only reference
        return await self._create(
            Budget, INSERT_BUDGET, SELECT_BUDGET_BY_ID, args, ours, "budget", {"swarm": swarm}
        )

    async def find_by_id(self, id: uuid.UUID | str) -> Budget | None:
        """The budget with this id, or None."""
        return await self._one(Budget, SELECT_BUDGET_BY_ID, v.check_uuid(id, "id"), replica=True)

    async def find_by_scope(self, scope_type: str, scope_id: uuid.UUID | str) -> Budget | None:
        """The budget of a scope (there is at most one), or None."""
        scope = _scope(scope_type)
        sid = v.check_uuid(scope_id, "scope_id")
        return await self._one(Budget, SELECT_BUDGET_BY_SCOPE, scope, sid, replica=True)

    async def find_by_swarm_id(
        self, swarm_id: uuid.UUID | str, limit: int | None = None
    ) -> builtins.list[Budget]:
        """A swarm's budgets: the swarm-scope one first, then the others oldest first."""
        sid = v.check_uuid(swarm_id, "swarm_id")
        return await self._many(Budget, SELECT_BUDGETS_BY_SWARM, sid, v.check_limit(limit))

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
        if swarm is None and scope is None:
            return await self._many(Budget, LIST_BUDGETS[order, direction], lim, off)
        if swarm is None:
            return await self._many(Budget, LIST_BUDGETS_OF_SCOPE[order, direction], lim, off, scope)
        return await self._many(Budget, LIST_BUDGETS_IN_SWARM[order, direction], lim, off, scope, swarm)

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
        budget_id = v.check_uuid(id, "id")
        new_allocated = given(allocated, lambda x: v.check_money(x, "allocated"))
        new_currency = given(currency, _currency)
        new_max_tokens = given(max_tokens, lambda x: v.check_int(x, "max_tokens", optional=True))
        try:
            return await self._update(
                Budget,
                UPDATE_BUDGET,
                SELECT_BUDGET_BY_ID,
                budget_id,
                new_allocated,
                new_currency,
                new_max_tokens,
            )
        except ValidationError as exc:
            if exc.field == "budgets_consumed_within_allocated_check":
                raise ValidationError(
                    "allocated", f"{new_allocated[1]} is below the amount already consumed"
                ) from exc.__cause__
            if exc.field == "budgets_used_tokens_within_max_check":
                raise ValidationError(
                    "max_tokens", f"{new_max_tokens[1]} is below the tokens already used"
                ) from exc.__cause__
            raise

    async def delete(self, id: uuid.UUID | str) -> bool:
        """Delete a budget and its ledger; False if there was none.

        Retried on a lost connection (deleting twice is harmless); if the first attempt's answer was
        lost after it committed, the retry answers False although this call deleted the budget.
        """
        return await self.db.fetchval(DELETE_BUDGET, v.check_uuid(id, "id"), retry=True) is not None

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
        ledger_id = new_id()
        req = ConsumeRequest(
            v.check_uuid(budget_id, "budget_id"),
            v.check_int(tokens, "tokens", minimum=0),
            v.check_money(cost, "cost"),
            _key(idempotency_key, ledger_id),
            ledger_id,
            fresh=idempotency_key is None,
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
                if budget.consumed + v.check_money(cost, "cost") > budget.allocated
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
        budget = await self.find_by_id(v.check_uuid(budget_id, "budget_id"))
        return _usage(budget) if budget is not None else None

    async def get_usage_by_scope(self, scope_type: str, scope_id: uuid.UUID | str) -> BudgetUsage | None:
        """``get_usage`` of the budget of a scope; None if the scope has no budget."""
        budget = await self.find_by_scope(scope_type, scope_id)
        return _usage(budget) if budget is not None else None

    async def is_exceeded(self, budget_id: uuid.UUID | str) -> bool | None:
        """True when no headroom is left (consumed >= allocated, or used_tokens >= max_tokens);
        None if there is no such budget."""
        budget = await self.find_by_id(v.check_uuid(budget_id, "budget_id"))
        return _exceeded(budget) if budget is not None else None

    async def get_swarm_budget_summary(self, swarm_id: uuid.UUID | str) -> SwarmBudgetSummary:
        """Totals over every budget of a swarm (all scopes; amounts are summed as-is, whatever their
        currency). ``max_tokens`` is None (unlimited) if any budget is unlimited, and for a swarm
        without budgets (``budgets`` 0: nothing limits it), whose money figures are 0."""
        sid = v.check_uuid(swarm_id, "swarm_id")
        row = await self.db.fetchrow(SELECT_SWARM_SUMMARY, sid, retry=True, replica=True)
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
        bid = v.check_uuid(budget_id, "budget_id")

        async def reset(con: Connection, attempt: int) -> Budget | None:
            # Lock first: a consume committing between the DELETE and the UPDATE would otherwise
            # be zeroed while its ledger row survives.
            if await con.fetchval(LOCK_BUDGET, bid) is None:
                return None
            await con.execute(DELETE_LEDGER, bid)
            row = await con.fetchrow(RESET_BUDGET, bid)
            return Budget(*row) if row is not None else None

        return await self.db.run(reset, retry=True, transaction=True)

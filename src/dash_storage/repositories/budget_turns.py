"""Turns for the one-statement consumes of one budget, within one Database.

Concurrent grants of one budget serialize on its row lock, whatever the client does. Sent all at
once (fifty agents on one budget with ``combine=False``), they leave one server process per pooled
connection waiting on that lock, each woken in turn to check its condition again: that costs the
server more than the grants themselves, and it holds those connections idle, away from every
other query of the process. So the consumes of one budget take turns: at most ``IN_FLIGHT`` of
them are sent at once (one charging, the next already waiting at the lock so that it follows
without a round trip), and the others wait in the process, in arrival order. Every consume is
still its own statement and its own commit; turns change only when each one is sent.

A consume that does not fit the budget as the latest answer of this Database showed it goes
without a turn: it will most likely be refused, and a refusal takes no lock, so the refusals of an
exhausted budget go in parallel. That guess only schedules: the server judges every consume, so
one whose budget grew meanwhile (a reset, a larger allocation) is granted all the same (it then
waits for the row lock, as it would without turns).
"""

from __future__ import annotations

import asyncio
import uuid
import weakref
from collections import deque

from dash_storage.core.database import Database
from dash_storage.core.models import Budget

__all__ = ["IN_FLIGHT", "BudgetTurns", "turns_for"]

#: Consumes of one budget sent at once by one Database.
IN_FLIGHT = 2
#: Budgets whose latest state is remembered at the most (a hint: forgetting it costs one turn).
_MAX_SEEN = 10_000


class _Line:
    """The consumes of one budget: how many are out, and the callers waiting for a turn."""

    __slots__ = ("out", "waiting")

    def __init__(self) -> None:
        self.out = 0
        self.waiting: deque[asyncio.Future[None]] = deque()


class BudgetTurns:
    """The turns of every budget consumed through one Database (see the module docstring)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._lines: dict[uuid.UUID, _Line] = {}
        self._seen: dict[uuid.UUID, Budget] = {}

    def seen(self, budget_id: uuid.UUID) -> Budget | None:
        """The budget as the latest consume answer showed it, if one did."""
        return self._seen.get(budget_id)

    def saw(self, budget_id: uuid.UUID, budget: Budget | None) -> None:
        """Remember the budget as an answer showed it (None: there is no such budget)."""
        if budget is None:
            self._seen.pop(budget_id, None)
            return
        if len(self._seen) >= _MAX_SEEN and budget_id not in self._seen:
            self._seen.clear()
        self._seen[budget_id] = budget

    async def take(self, budget_id: uuid.UUID) -> None:
        """Wait for a turn to send a consume of this budget; ``give_back`` it once answered."""
        line = self._lines.get(budget_id)
        if line is None:
            line = self._lines[budget_id] = _Line()
        if line.out < IN_FLIGHT:
            line.out += 1
            return
        turn: asyncio.Future[None] = self.loop.create_future()
        line.waiting.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.cancelled():
                try:
                    line.waiting.remove(turn)
                except ValueError:
                    pass  # already passed over
            else:  # handed the turn just as the caller gave up: pass it on
                self.give_back(budget_id)
            raise

    def give_back(self, budget_id: uuid.UUID) -> None:
        """End a turn taken with ``take``: the first caller still waiting gets it."""
        line = self._lines[budget_id]
        while line.waiting:
            turn = line.waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        line.out -= 1
        if not line.out:
            del self._lines[budget_id]


#: The turns of each Database, as long as it exists (weak keys: they keep no Database alive).
_TURNS: weakref.WeakKeyDictionary[Database, BudgetTurns] = weakref.WeakKeyDictionary()


def turns_for(db: Database) -> BudgetTurns:
    """The turns of ``db`` on the running event loop (one per Database, shared by repositories)."""
    turns = _TURNS.get(db)
    if turns is None or turns.loop is not asyncio.get_running_loop():
        turns = _TURNS[db] = BudgetTurns()
    return turns

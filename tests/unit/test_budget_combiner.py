"""The budget combiner without a server: how queued consumes are batched, and how each caller's
answer is read back from a batch (greedy in arrival order, the budget as it stood at its turn).

The statements themselves are proved against PostgreSQL in tests/integration/test_hot_budgets.py.
Here a stand-in Database answers them the way the SQL does (one budget, a ledger of keys), so the
Python side can be driven precisely: which requests share a batch, in which order they are sent,
and what every caller gets back.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import uuid
import weakref
from decimal import Decimal
from typing import Any

import pytest

from dash_storage.core.errors import ConflictError
from dash_storage.core.models import Budget, ConsumeStatus
from dash_storage.core.retry import RetryPolicy
from dash_storage.repositories import budget_batcher as bb
from dash_storage.repositories.budget_batcher import ConsumeRequest, combiner_for, consume_many

BUDGET = uuid.UUID("0190a0b0-0000-7000-8000-00000000b0d9")
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
T1 = dt.datetime(2026, 1, 1, 0, 0, 1, tzinfo=dt.UTC)


def request(tokens: int, cost: str, key: str, budget: uuid.UUID = BUDGET) -> ConsumeRequest:
    return ConsumeRequest(budget, tokens, Decimal(cost), key, uuid.uuid4())


def budget(allocated: str, consumed: str = "0", max_tokens: int | None = None, used: int = 0) -> Budget:
    return Budget(
        BUDGET,
        None,
        "project",
        BUDGET,
        Decimal(allocated),
        Decimal(consumed),
        "USD",
        max_tokens,
        used,
        T0,
        T0,
    )


class FakeDatabase:
    """Answers the consume statements for one budget as the SQL does: greedy in the order of the
    arrays, a key already in the ledger answers from its row. ``hold`` keeps a statement in
    flight until it is set, so that callers can queue behind it."""

    def __init__(self, state: Budget | None) -> None:
        self.state = state
        self.ledger: dict[str, tuple[uuid.UUID, int, Decimal]] = {}
        self.sent: list[tuple[str, list[str]]] = []  # (statement, keys in the order sent)
        self.policy = RetryPolicy(attempts=0, delay=0.0)
        self.telemetry = None  # as a Database without telemetry
        self.hold: asyncio.Event | None = None

    async def fetchrow(self, query: str, *args: Any, retry: bool = False) -> Any:
        if self.hold is not None:
            await self.hold.wait()
        if query in (bb.CONSUME, bb.CONSUME_NEW):
            return self._one(*args)
        if query == bb.SELECT_BUDGET_BY_ID:
            self.sent.append(("read", []))
            return self.state
        assert query == bb.CONSUME_BATCH
        return self._batch(*args)

    async def run(self, fn: Any, *, retry: bool = False, transaction: bool = False) -> Any:
        """``fn`` on a stand-in connection whose statements this Database answers, as a first try."""
        return await fn(self, 1)

    async def fetch(self, query: str, *args: Any, retry: bool = False) -> list[Any]:
        assert query == bb.SELECT_LEDGER_BY_KEYS
        return [(k, *self.ledger[k]) for k in args[1] if k in self.ledger]

    def _charge(self, key: str, tokens: int, cost: Decimal, ledger_id: uuid.UUID) -> str:
        assert self.state is not None
        if key in self.ledger:
            return "p"
        if not bb._fits(self.state, tokens, cost):
            return "i"
        self.ledger[key] = (ledger_id, tokens, cost)
        self.state = self.state._replace(
            consumed=self.state.consumed + cost, used_tokens=self.state.used_tokens + tokens, updated_at=T1
        )
        return "c"

    def _one(self, bid: uuid.UUID, tokens: int, cost: Decimal, key: str, lid: uuid.UUID) -> Any:
        self.sent.append(("consume", [key]))
        if self.state is None:
            return None
        prior = self.ledger.get(key, (None, None, None))
        mark = self._charge(key, tokens, cost, lid)
        return (mark == "c", True, *prior, *self.state)

    def _batch(
        self, bid: uuid.UUID, tokens: list[str], costs: list[str], keys: list[str], lids: list[str]
    ) -> Any:
        self.sent.append(("consume_batch", list(keys)))
        if self.state is None:
            return None
        before = self.state
        priors = [self.ledger[k] for k in keys if k in self.ledger]
        marks = "".join(
            self._charge(k, int(t), Decimal(c), uuid.UUID(lid))
            for t, c, k, lid in zip(tokens, costs, keys, lids, strict=True)
        )
        charged = self.state is not before
        return (
            *before,
            *(
                (self.state.consumed, self.state.used_tokens, self.state.updated_at)
                if charged
                else (None,) * 3
            ),
            True,
            marks,
            *([[str(p[i]) for p in priors] for i in range(3)] if priors else (None,) * 3),
        )


# -- how the queue forms batches ------------------------------------------------------------------


def queue_of(*requests: ConsumeRequest) -> bb._Queue:
    q = bb._Queue()
    q.pending = list(requests)
    return q


def test_a_batch_holds_each_key_once_in_arrival_order() -> None:
    a, b, a_again, a_other, c = (
        request(1, "1", "a"),
        request(2, "2", "b"),
        request(1, "1", "a"),  # same key, same amounts: rides along with a
        request(5, "5", "a"),  # same key, other amounts: waits until a is settled
        request(3, "3", "c"),
    )
    q = queue_of(a, b, a_again, a_other, c)
    assert q.take() == [a, b, c]
    assert a.copies == [a_again]
    assert q.pending == [a_other] and q.size == 3
    assert q.take() == [a_other] and q.pending == []


def test_a_batch_is_capped_and_the_rest_keeps_its_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bb, "MAX_BATCH", 3)
    requests = [request(1, "1", f"k{i}") for i in range(7)]
    q = queue_of(*requests)
    assert q.take() == requests[:3]
    assert q.take() == requests[3:6]
    assert q.take() == requests[6:]


async def test_a_caller_cancelled_while_queued_is_left_out() -> None:
    gone, stays = request(1, "1", "gone"), request(1, "1", "stays")
    gone.waiter = asyncio.get_running_loop().create_future()
    gone.waiter.cancel()
    q = queue_of(gone, stays)
    assert q.take() == [stays] and q.pending == []


# -- how a batch's answer reaches each caller ---------------------------------------------------------


async def test_greedy_in_arrival_order_each_answer_with_the_budget_at_its_turn() -> None:
    db = FakeDatabase(budget("10.00", max_tokens=100))
    big, too_big, small, too_many_tokens, last = (
        request(10, "6.00", "big"),
        request(10, "5.00", "too_big"),  # 6 + 5 > 10: refused, leaves the headroom to later ones
        request(10, "3.00", "small"),
        request(500, "0.50", "too_many_tokens"),
        request(10, "1.00", "last"),  # fits exactly: a limit may be reached
    )
    batch = [big, too_big, small, too_many_tokens, last]
    await consume_many(db, BUDGET, batch)  # type: ignore[arg-type]
    assert db.sent == [("consume_batch", ["big", "too_big", "small", "too_many_tokens", "last"])]
    statuses = [r.answer().status for r in batch]
    assert statuses == ["granted", "insufficient", "granted", "insufficient", "granted"]
    seen = [(r.answer().budget.consumed, r.answer().budget.used_tokens) for r in batch]  # type: ignore[union-attr]
    assert seen == [
        (Decimal("6.00"), 10),
        (Decimal("6.00"), 10),
        (Decimal("9.00"), 20),
        (Decimal("9.00"), 20),
        (Decimal("10.00"), 30),
    ]
    # Refusals before any grant keep the budget's own updated_at; after a grant they see the new one.
    assert too_big.answer().budget.updated_at == T1  # type: ignore[union-attr]


async def test_a_key_already_in_the_ledger_answers_duplicate_or_conflict() -> None:
    db = FakeDatabase(budget("10.00"))
    ours = uuid.uuid4()
    db.ledger = {"seen": (uuid.uuid4(), 1, Decimal("1")), "changed": (uuid.uuid4(), 1, Decimal("1"))}
    db.ledger["mine"] = (ours, 2, Decimal("2"))
    seen, changed, mine = request(1, "1", "seen"), request(9, "9", "changed"), request(2, "2", "mine")
    mine.ledger_id = ours  # a retried batch meeting its own row from the lost attempt
    await consume_many(db, BUDGET, [seen, changed, mine])  # type: ignore[arg-type]
    assert seen.answer().status is ConsumeStatus.DUPLICATE
    with pytest.raises(ConflictError, match=r"'changed' was already used .* \(tokens=1, cost=1\)"):
        changed.answer()
    assert mine.answer().status is ConsumeStatus.GRANTED
    assert db.state is not None and db.state.consumed == 0  # nothing charged again


async def test_a_missing_budget_answers_not_found_to_every_request() -> None:
    batch = [request(1, "1", "a"), request(1, "1", "b")]
    await consume_many(FakeDatabase(None), BUDGET, batch)  # type: ignore[arg-type]
    assert [r.answer().status for r in batch] == ["not_found", "not_found"]


async def test_a_charge_raced_by_another_process_is_read_back_and_later_refusals_judged_again() -> None:
    """The walk counted a charge whose key another process had just committed (mark 'r'): that
    request answers from the other row, and refusals after it are left for the next batch, since
    the headroom they were judged against was never really spent."""
    rival = (uuid.uuid4(), 4, Decimal("4"))
    row = (*budget("10.00"), Decimal("4"), 4, T1, True, "cri", None, None, None)
    first, raced, refused = request(4, "4", "first"), request(4, "4", "raced"), request(4, "4", "refused")

    class Scripted(FakeDatabase):
        async def fetchrow(self, query: str, *args: Any, retry: bool = False) -> Any:
            return row

    db = Scripted(None)
    db.ledger = {"raced": rival}
    await consume_many(db, BUDGET, [first, raced, refused])  # type: ignore[arg-type]
    assert first.answer().status is ConsumeStatus.GRANTED
    assert raced.answer().status is ConsumeStatus.DUPLICATE
    assert not refused.settled  # judged again in the next batch


# -- the combiner: who leads, who waits, who goes together -------------------------------------------


async def test_a_lone_caller_sends_the_one_statement_consume_at_once() -> None:
    db = FakeDatabase(budget("10.00"))
    result = await combiner_for(db).consume(request(1, "1.00", "alone"))  # type: ignore[arg-type]
    assert result.status is ConsumeStatus.GRANTED
    assert db.sent == [("consume", ["alone"])]


async def test_callers_arriving_during_a_statement_go_together_in_arrival_order() -> None:
    db = FakeDatabase(budget("10.00"))
    db.hold = asyncio.Event()
    combiner = combiner_for(db)  # type: ignore[arg-type]
    amounts = ["4.00", "7.00", "3.00", "3.00", "1.00"]
    calls = []
    for i, cost in enumerate(amounts):
        calls.append(asyncio.ensure_future(combiner.consume(request(1, cost, f"k{i}"))))
        await asyncio.sleep(0)  # each call reaches the queue before the next one starts
    db.hold.set()
    results = await asyncio.gather(*calls)
    # The first went alone; the four that queued behind it went as one batch, judged in order.
    assert db.sent == [("consume", ["k0"]), ("consume_batch", ["k1", "k2", "k3", "k4"])]
    assert [r.status for r in results] == ["granted", "insufficient", "granted", "granted", "insufficient"]
    assert (combiner.batches, combiner.requests) == (2, 5)


async def test_a_repeated_call_rides_along_and_is_answered_as_a_repeat() -> None:
    db = FakeDatabase(budget("10.00"))
    db.hold = asyncio.Event()
    combiner = combiner_for(db)  # type: ignore[arg-type]
    first = asyncio.ensure_future(combiner.consume(request(1, "1.00", "lead")))
    await asyncio.sleep(0)
    calls = [asyncio.ensure_future(combiner.consume(request(1, "2.00", "twice"))) for _ in range(2)]
    calls.append(asyncio.ensure_future(combiner.consume(request(1, "2.00", "other"))))
    await asyncio.sleep(0)
    db.hold.set()
    await first
    results = await asyncio.gather(*calls)
    assert db.sent[1] == ("consume_batch", ["twice", "other"])  # the repeat is not sent
    assert [r.status for r in results] == ["granted", "duplicate", "granted"]
    assert db.state is not None and db.state.consumed == Decimal("5.00")


async def test_one_combiner_per_database_and_it_keeps_none_alive() -> None:
    db = FakeDatabase(budget("1"))
    assert combiner_for(db) is combiner_for(db)  # type: ignore[arg-type]
    other = FakeDatabase(budget("1"))
    assert combiner_for(other) is not combiner_for(db)  # type: ignore[arg-type]
    await combiner_for(db).consume(request(1, "1", "k"))  # type: ignore[arg-type]
    ref = weakref.ref(db)
    del db
    gc.collect()
    assert ref() is None

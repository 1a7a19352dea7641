"""Budget consumption: the one-statement consume, and the combiner for hot budgets.

One conditional UPDATE per call is bound by one commit (one WAL flush) per call: a budget that many
agents spend from at once tops out at a few thousand charges per second. The :class:`ConsumeCombiner`
removes that bound inside one process: concurrent consumes of the SAME budget are sent as ONE
statement (``CONSUME_BATCH``) and ONE commit, which grants them in order while headroom lasts.

How requests combine (no timers): the first caller for a budget becomes its *leader* and sends
what is queued for that budget; while that statement is in flight, new callers for the budget
queue up and wait. When the answer is back, every caller of the batch gets its own result and the
first queued caller (if any) leads the next batch. A single caller therefore sends its consume at
once, and its batch of one runs the plain one-statement ``CONSUME``. (After a batch of several,
the next leader yields to the event loop once before taking its batch, so that the callers just
answered can queue again and go together instead of one early riser going alone.) Each budget has
its own queue: budgets never share a batch, and a missing budget answers NOT_FOUND to its own
callers only.

Order ("in order while headroom lasts", greedy in arrival order): requests are judged in the order
their calls were made (the order they reached the queue), batch after batch, exactly as if they
had been sent one at a time in that order. Each request whose charge (cost against
``allocated``, tokens against ``max_tokens``) fits the headroom left after the grants before it is
GRANTED; one that does not fit is INSUFFICIENT and charges nothing, so later, smaller requests of
the same batch may still be granted. A key already in the ledger answers DUPLICATE (or
ConflictError for different amounts) and charges nothing. Each answer carries the budget as it
stands at that request's turn (after its own charge if granted).

Idempotency inside a batch: a batch holds each idempotency key once. A call repeating a queued
key with the same amounts rides along with the first one and gets its answer as a repeat
(GRANTED -> DUPLICATE; otherwise the same status); a call repeating a queued key with different
amounts waits for a later batch, where it meets the first call's ledger row (ConflictError) or its
absence, as it would one at a time.

Safety does not depend on combining: the row lock taken by each statement and the table's CHECK
constraints remain the arbiter, across processes too (combining only happens inside one process,
per Database). A transient failure re-sends the whole batch once, with the same idempotency keys
and the same client-generated ledger ids, so a batch whose answer was lost after COMMIT is
recognised (our own ledger rows) and nothing is charged twice. If that fails too, the batch
breaks up: each of its callers retries its own request alone with the one-statement ``CONSUME``
(same key, same ledger id) under the configured retry policy, exactly as without combining, so a
flaky connection never holds a whole batch of callers hostage to one retry loop; for the next
SOLO_PAUSE seconds that Database's consumes are then not combined at all. (Arrival order is not
kept across such a failure.)

One documented imprecision: if another process commits a charge under the SAME idempotency key
while a batch waits for the row lock, the batch's snapshot cannot see it, so the walk counts that
request as a new charge (the ledger's unique index then refuses its row, and after a fresh look-up
it answers DUPLICATE). The requests after it that the walk refused are judged again in the next
batch, since they may fit after all; those it granted stay granted. In that race the order can
bend (a later request may be granted before an earlier one), the limits never do.
"""

from __future__ import annotations

import asyncio
import uuid
import weakref
from decimal import Decimal
from typing import Any

from dash_storage import sql
from dash_storage.core.database import Connection, Database, Record
from dash_storage.core.errors import ConflictError, DatabaseUnavailableError, is_transient
from dash_storage.core.models import Budget, ConsumeResult, ConsumeStatus
from dash_storage.core.retry import RetryPolicy, retry_call
from dash_storage.repositories.budget_turns import BudgetTurns, turns_for

__all__ = [
    "BATCH_RETRIES",
    "CONSUME",
    "CONSUME_BATCH",
    "CONSUME_NEW",
    "MAX_BATCH",
    "SELECT_LEDGER_BY_KEY",
    "SELECT_LEDGER_BY_KEYS",
    "SOLO_PAUSE",
    "ConsumeCombiner",
    "ConsumeRequest",
    "combiner_for",
    "consume_many",
    "consume_one",
]

# The statements (in sql/budgets.sql, next to the other budget SQL, which describes them).
_Q = sql.load("budgets")
#: One consume in one statement.
CONSUME = _Q["consume"]
#: ``CONSUME`` for a key that cannot be in the ledger yet (generated for the call, never sent).
CONSUME_NEW = _Q["consume_new"]
#: A batch of consumes of one budget in one statement, granted greedily in arrival order.
CONSUME_BATCH = _Q["consume_batch"]
#: The ledger row of one idempotency key.
SELECT_LEDGER_BY_KEY = _Q["ledger_by_key"]
#: The ledger rows of several keys.
SELECT_LEDGER_BY_KEYS = _Q["ledger_by_keys"]
#: One budget, as it stands (the refusal of a fresh request that cannot fit: see consume_one).
SELECT_BUDGET_BY_ID = _Q["find_by_id"]

#: Most requests sent in one statement. The greedy walk costs a few microseconds per request
#: (more for long batches), so a cap keeps the row lock short; the rest go in the next batch.
MAX_BATCH = 500
#: Retries of a whole batch after a transient failure, before its requests are retried one by one.
BATCH_RETRIES = 1
#: Seconds without combining after a batch broke up: while connections keep failing, independent
#: retries (as without combining) get through more often than one batch retried by one caller.
SOLO_PAUSE = 1.0
#: Budgets remembered as hot at the most (see ConsumeCombiner._hot).
_MAX_HOT = 10_000


class ConsumeRequest:
    """One validated consume on its way to the database, and (once answered) its outcome."""

    __slots__ = (
        "alone",
        "budget_id",
        "copies",
        "cost",
        "error",
        "fresh",
        "key",
        "ledger_id",
        "result",
        "tokens",
        "waiter",
    )

    def __init__(
        self,
        budget_id: uuid.UUID,
        tokens: int,
        cost: Decimal,
        key: str,
        ledger_id: uuid.UUID,
        *,
        fresh: bool = False,
    ):
        self.budget_id = budget_id
        self.tokens = tokens
        self.cost = cost
        self.key = key
        #: The key cannot be in the ledger: generated for this call, and the request not sent yet.
        #: Cleared when it is first sent (whatever comes back, an earlier try may have written it).
        self.fresh = fresh
        #: Chosen before the first attempt, so a retry recognises its own ledger row.
        self.ledger_id = ledger_id
        self.result: ConsumeResult | None = None
        self.error: BaseException | None = None
        #: Its batch failed transiently (twice): the caller retries this request on its own.
        self.alone = False
        #: Calls with the same key and amounts that ride along with this one (answered as repeats).
        self.copies: list[ConsumeRequest] = []
        #: Resolved when the request is answered (False) or its caller must lead a batch (True).
        self.waiter: asyncio.Future[bool] | None = None

    @property
    def settled(self) -> bool:
        """Answered, failed, or handed back to its caller to retry alone."""
        return self.result is not None or self.error is not None or self.alone

    def answer(self) -> ConsumeResult:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    def _settle(self, status: ConsumeStatus, budget: Budget | None) -> None:
        self.result = ConsumeResult(status, self.budget_id, self.key, budget)

    def _conflict(self, tokens: int, cost: Decimal) -> ConflictError:
        return ConflictError(
            f"idempotency_key {self.key!r} was already used on budget {self.budget_id} for a different "
            f"charge (tokens={tokens}, cost={cost})",
            constraint=_LEDGER_UNIQUE,
        )

    def _repeat_of(self, prior_id: Any, tokens: int, cost: Decimal, budget: Budget) -> None:
        """Answer from the ledger row that already holds this request's key."""
        if tokens != self.tokens or cost != self.cost:
            self.error = self._conflict(tokens, cost)
        elif prior_id == self.ledger_id:
            # Our own row, written by an attempt whose answer was lost: this call's grant.
            self._settle(ConsumeStatus.GRANTED, budget)
        else:
            self._settle(ConsumeStatus.DUPLICATE, budget)

    def _answer_copies(self) -> None:
        for copy in self.copies:
            copy.error = self.error
            copy.alone = self.alone
            if self.result is not None:
                status = self.result.status
                if status is ConsumeStatus.GRANTED:
                    status = ConsumeStatus.DUPLICATE
                copy._settle(status, self.result.budget)


#: bigint's largest value: the token limit of an unlimited budget, as in the statements.
_BIGINT_MAX = 9223372036854775807
_LEDGER_UNIQUE = "budget_ledger_idempotency_unique"


def _fits(b: Budget, tokens: int, cost: Decimal) -> bool:
    """The headroom check of the statements, in Python."""
    limit = _BIGINT_MAX if b.max_tokens is None else b.max_tokens
    return b.consumed + cost <= b.allocated and b.used_tokens + tokens <= limit


#: How many times a consume is sent again when its answer was unsure (see consume_one).
_ASK_AGAIN = 3


async def consume_one(db: Database, req: ConsumeRequest) -> ConsumeResult:
    """Charge one request with the one-statement ``CONSUME`` (see BudgetRepository.try_consume).

    The statement judges the request on its snapshot, without locking the budget unless it
    charges. Two answers are unsure, and the request is then sent again (with a fresh snapshot,
    the same key and ledger id, so it can never charge twice): a refusal although the budget it
    saw had room (a concurrent change refused it, and may be a same-key charge), and the unique
    index refusing the ledger row (a same-key charge committed meanwhile; nothing was applied).

    A fresh request (its key generated for this call, never sent) goes as ``CONSUME_NEW``, which
    skips the ledger look-up, until anything might have written its key: from a retry on (a lost
    attempt may have charged it; the look-up then finds that charge, ours by its ledger id) or a
    refusal by the unique index, it is ``CONSUME``.

    The consumes of one budget take turns (``budget_turns``), except one that does not fit the
    budget as the latest answer showed it (most likely refused, which takes no lock): see
    ``_without_turn``.
    """
    turns = turns_for(db)
    bid = req.budget_id
    if _no_room(turns, req):
        return await _without_turn(db, req, turns)
    await turns.take(bid)
    if _no_room(turns, req):  # it ran out while we waited
        turns.give_back(bid)
        return await _without_turn(db, req, turns)
    try:
        return await _consume(db, req, turns)
    finally:
        turns.give_back(bid)


def _no_room(turns: BudgetTurns, req: ConsumeRequest) -> bool:
    """The latest answer showed the budget without room for ``req``."""
    seen = turns.seen(req.budget_id)
    return seen is not None and not _fits(seen, req.tokens, req.cost)


async def _without_turn(db: Database, req: ConsumeRequest, turns: BudgetTurns) -> ConsumeResult:
    """A consume that the latest answer showed cannot fit, sent without a turn.

    A fresh request's key cannot be in the ledger, so a plain read of the budget is enough to
    refuse it: like the consume statement, it judges the request on a committed state, takes no
    lock and writes nothing, and it costs both sides less. If the budget has room after all (it
    grew meanwhile), the request is charged as usual, in its turn. Any other request may meet its
    key in the ledger, which only the consume statement looks up.
    """
    if not req.fresh:
        return await _consume(db, req, turns)
    bid = req.budget_id
    row = await db.fetchrow(SELECT_BUDGET_BY_ID, bid, retry=True)
    if row is None:
        turns.saw(bid, None)
        return ConsumeResult(ConsumeStatus.NOT_FOUND, bid, req.key)
    budget = Budget(*row)
    turns.saw(bid, budget)
    if not _fits(budget, req.tokens, req.cost):
        return ConsumeResult(ConsumeStatus.INSUFFICIENT, bid, req.key, budget)
    await turns.take(bid)
    try:
        return await _consume(db, req, turns)
    finally:
        turns.give_back(bid)


async def _consume(db: Database, req: ConsumeRequest, turns: BudgetTurns) -> ConsumeResult:
    """``consume_one`` once its turn came (or without one)."""
    bid, tok, amount, key, lid = req.budget_id, req.tokens, req.cost, req.key, req.ledger_id
    fresh, req.fresh = req.fresh, False

    async def send(con: Connection, attempt: int) -> Record | None:
        nonlocal fresh
        if attempt > 1:
            fresh = False
        return await con.fetchrow(CONSUME_NEW if fresh else CONSUME, bid, tok, amount, key, lid)

    for ask in range(_ASK_AGAIN + 1):
        try:
            row = await db.run(send, retry=True)
        except ConflictError as exc:
            if exc.constraint != _LEDGER_UNIQUE or ask == _ASK_AGAIN:
                raise
            fresh = False
            continue
        if row is None:
            turns.saw(bid, None)
            return ConsumeResult(ConsumeStatus.NOT_FOUND, bid, key)
        granted, settled, prior_id, prior_tokens, prior_cost = row[:5]
        budget = Budget(*row[5:])
        turns.saw(bid, budget)
        if granted:
            return ConsumeResult(ConsumeStatus.GRANTED, bid, key, budget)
        if prior_id is not None:
            req._repeat_of(prior_id, prior_tokens, prior_cost, budget)
            return req.answer()
        if settled and not _fits(budget, tok, amount):
            break
    return ConsumeResult(ConsumeStatus.INSUFFICIENT, bid, key, budget)


#: The columns of a Budget, which start the answer of CONSUME_BATCH.
_NB = len(Budget._fields)


async def consume_many(db: Database, budget_id: uuid.UUID, batch: list[ConsumeRequest]) -> None:
    """Charge a batch of requests (distinct keys, arrival order) for one budget in one statement,
    setting each request's result or error. A transient failure is retried BATCH_RETRIES times,
    then raised.

    A request may be left unanswered (no result, no error): it was refused only because the walk
    counted a charge that another process had already made under the same key (see the module
    docstring); nothing was charged for it, and the caller judges it again in the next batch.
    """
    for r in batch:
        r.fresh = False  # from now on its key may be in the ledger
    args = (
        budget_id,
        [str(r.tokens) for r in batch],
        [str(r.cost) for r in batch],
        [r.key for r in batch],
        [str(r.ledger_id) for r in batch],
    )
    policy = RetryPolicy(
        min(BATCH_RETRIES, db.policy.attempts), db.policy.delay, db.policy.max_delay, db.policy.observer
    )
    row = await retry_call(
        lambda _: db.fetchrow(CONSUME_BATCH, *args, retry=False), policy, what="consume batch"
    )
    if row is None:
        for r in batch:
            r._settle(ConsumeStatus.NOT_FOUND, None)
        return
    before = Budget(*row[:_NB])
    after_updated_at, settled, marks = row[_NB + 2 : _NB + 5]
    prior_ids, prior_tokens, prior_costs = row[_NB + 5 :]
    # Keys that may hide a charge committed by another process while we waited for the row lock:
    # those the unique index refused ('r'), and, if the row changed after our snapshot, every
    # refused one (the single-statement CONSUME does the same). Read them with a fresh snapshot.
    unsure = [r.key for r, m in zip(batch, marks, strict=True) if m == "r" or (m == "i" and not settled)]
    again: dict[str, Any] = {}
    if unsure:
        rows = await db.fetch(SELECT_LEDGER_BY_KEYS, budget_id, unsure, retry=True)
        again = {x[0]: x[1:] for x in rows}
    # Replay the walk to give each request the budget as it stood at its turn.
    consumed, used, updated_at = before.consumed, before.used_tokens, before.updated_at
    p = 0
    raced = False  # a phantom charge was counted: later refusals are judged again
    for r, mark in zip(batch, marks, strict=True):
        if mark == "c":
            consumed, used, updated_at = consumed + r.cost, used + r.tokens, after_updated_at
        state = before._replace(consumed=consumed, used_tokens=used, updated_at=updated_at)
        if mark == "c":
            r._settle(ConsumeStatus.GRANTED, state)
        elif mark == "p":
            r._repeat_of(uuid.UUID(prior_ids[p]), int(prior_tokens[p]), Decimal(prior_costs[p]), state)
            p += 1
        elif r.key in again:
            prior_id, tokens, cost = again[r.key]
            r._repeat_of(prior_id, tokens, cost, state)
            raced = raced or mark == "r"
        elif mark == "r":
            raced = True  # its rival row is gone again (a reset): judge it again
        elif not raced:
            r._settle(ConsumeStatus.INSUFFICIENT, state)


class _Queue:
    """The requests waiting for one budget; exists while a leader is at work for it."""

    __slots__ = ("pending", "size")

    def __init__(self) -> None:
        self.pending: list[ConsumeRequest] = []
        self.size = 0  # of the last batch sent

    def take(self) -> list[ConsumeRequest]:
        """The next batch: queued requests in arrival order, each key once, at most MAX_BATCH.

        A request repeating a key of the batch with the same amounts rides along with the first
        (in its ``copies``); with other amounts it stays queued, to be judged after the first.
        Requests whose caller was cancelled while queued are dropped.
        """
        batch: list[ConsumeRequest] = []
        rest: list[ConsumeRequest] = []
        first: dict[str, ConsumeRequest] = {}
        for r in self.pending:
            if r.waiter is not None and r.waiter.cancelled():
                continue  # its caller is gone (it would drop itself from the queue)
            if len(batch) >= MAX_BATCH:
                rest.append(r)
                continue
            same = first.get(r.key)
            if same is None:
                first[r.key] = r
                batch.append(r)
            elif same.tokens == r.tokens and same.cost == r.cost:
                same.copies.append(r)
            else:
                rest.append(r)  # same key, other amounts: judged after the first one is settled
        self.pending = rest
        self.size = len(batch)
        return batch


class ConsumeCombiner:
    """Combines concurrent consumes of the same budget, within one process and one Database.

    Get it with :func:`combiner_for`; every BudgetRepository on the same Database shares it.
    It refers to its Database only weakly (the registry of combiners must keep no Database
    alive); each call holds the Database it works on for as long as it runs.
    """

    def __init__(self, db: Database) -> None:
        self._db = weakref.ref(db)
        self.loop = asyncio.get_running_loop()
        self._queues: dict[uuid.UUID, _Queue] = {}
        # Budgets whose last batch held several requests: their next leader yields once before
        # taking its batch, so that callers woken by that batch can join it (else a lone early
        # riser would go alone, followed by everyone else).
        self._hot: set[uuid.UUID] = set()
        self._rescues: set[asyncio.Task[None]] = set()
        self._solo_until = 0.0  # loop time until which consumes are sent alone (after a breakup)
        #: Batches sent and requests they carried (for tests and benchmarks).
        self.batches = 0
        self.requests = 0

    async def consume(self, req: ConsumeRequest) -> ConsumeResult:
        """Queue ``req`` behind the budget's current batch, or lead a batch now; its own answer."""
        db = self._db()
        if db is None:  # only a caller that holds no Database could get here
            raise DatabaseUnavailableError("the Database of this budget combiner no longer exists")
        q = self._queues.get(req.budget_id)
        if q is None and self._solo_until and self.loop.time() < self._solo_until:
            return await consume_one(db, req)
        if q is None:
            q = self._queues[req.budget_id] = _Queue()
            q.pending.append(req)
            return await self._lead(db, q, req)
        q.pending.append(req)
        req.waiter = self.loop.create_future()
        try:
            lead = await req.waiter
        except asyncio.CancelledError:
            self._abandon(q, req)
            raise
        if lead:
            return await self._lead(db, q, req)
        if req.alone:
            return await self._solo(db, req)
        return req.answer()

    async def _lead(self, db: Database, q: _Queue, req: ConsumeRequest) -> ConsumeResult:
        if req.budget_id in self._hot:
            self._hot.discard(req.budget_id)
            try:
                await asyncio.sleep(0)
            except asyncio.CancelledError:
                q.pending.remove(req)
                self._hand_over(q, req.budget_id)
                raise
        while not req.settled:
            batch = q.take()
            try:
                await self._send(db, req.budget_id, batch)
            except asyncio.CancelledError:
                # Our caller gave up mid-statement; the others in the batch still need answers.
                # The statement may or may not have committed: re-sending it (same keys, same
                # ledger ids) settles that either way.
                task = asyncio.create_task(self._rescue(db, q, req.budget_id, batch))
                self._rescues.add(task)
                task.add_done_callback(self._rescues.discard)
                raise
            self._deliver(q, batch, req)  # req unanswered: it heads the queue again, lead on
        self._hand_over(q, req.budget_id)
        if req.alone:
            return await self._solo(db, req)
        return req.answer()

    async def _solo(self, db: Database, req: ConsumeRequest) -> ConsumeResult:
        """Retry one request of a failed batch on its own (same key, same ledger id)."""
        await asyncio.sleep(db.policy.backoff(1))  # not all of the batch at the same instant
        return await consume_one(db, req)

    async def _rescue(
        self, db: Database, q: _Queue, budget_id: uuid.UUID, batch: list[ConsumeRequest]
    ) -> None:
        try:
            await self._send(db, budget_id, batch)
        finally:
            self._deliver(q, batch, None)
            self._hand_over(q, budget_id)

    def _deliver(self, q: _Queue, batch: list[ConsumeRequest], leader: ConsumeRequest | None) -> None:
        """Wake the callers answered in ``batch``; put the unanswered ones back at the head of the
        queue, in order (the leader's own request too; requests whose caller is gone are dropped)."""
        unanswered: list[ConsumeRequest] = []
        for r in batch:
            if not r.settled:
                if r is leader or r.waiter is not None:
                    unanswered.append(r)
                unanswered.extend(r.copies)
                r.copies = []
                continue
            r._answer_copies()
            for w in (r, *r.copies):
                if w.waiter is not None and not w.waiter.done():
                    w.waiter.set_result(False)
        if unanswered:
            q.pending[:0] = unanswered

    async def _send(self, db: Database, budget_id: uuid.UUID, batch: list[ConsumeRequest]) -> None:
        """Run the batch and record every request's answer; never raises but CancelledError."""
        self.batches += 1
        self.requests += len(batch)
        if db.telemetry is not None:
            db.telemetry.consume_batch(len(batch))
        for r in batch:  # a rescue re-sends a batch that may hold answers of a cancelled attempt
            r.result = r.error = None
            r.alone = False
        try:
            if len(batch) == 1:
                only = batch[0]
                try:
                    only.result = await consume_one(db, only)
                except ConflictError as exc:
                    only.error = exc
            else:
                await consume_many(db, budget_id, batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            breakup = len(batch) > 1 and is_transient(exc)
            if breakup:
                self._solo_until = self.loop.time() + SOLO_PAUSE
            for r in batch:
                if breakup:
                    r.alone = True
                else:
                    r.error = exc

    def _hand_over(self, q: _Queue, budget_id: uuid.UUID) -> None:
        """Ask the first queued caller to lead the next batch; forget the queue if there is none."""
        while q.pending:
            nxt = q.pending[0]
            assert nxt.waiter is not None
            if not nxt.waiter.done():
                nxt.waiter.set_result(True)
                return
            del q.pending[0]  # cancelled while queued
        del self._queues[budget_id]
        if q.size > 1:
            if len(self._hot) >= _MAX_HOT:
                self._hot.clear()  # only a hint: forgetting it costs one small batch
            self._hot.add(budget_id)

    def _abandon(self, q: _Queue, req: ConsumeRequest) -> None:
        """The caller of ``req`` was cancelled while waiting."""
        assert req.waiter is not None
        if req in q.pending:
            q.pending.remove(req)
            if req.waiter.done() and not req.waiter.cancelled() and req.waiter.result():
                self._hand_over(q, req.budget_id)  # it had just been asked to lead: pass it on
        # else its batch is in flight: the leader answers it into the void.


#: The combiner of each Database. The keys are weak and a combiner refers to its Database only
#: weakly, so an entry lives exactly as long as its Database and keeps none alive.
_COMBINERS: weakref.WeakKeyDictionary[Database, ConsumeCombiner] = weakref.WeakKeyDictionary()


def combiner_for(db: Database) -> ConsumeCombiner:
    """The combiner of ``db`` on the running event loop (one per Database, shared by repositories)."""
    combiner = _COMBINERS.get(db)
    if combiner is None or combiner.loop is not asyncio.get_running_loop():
        combiner = _COMBINERS[db] = ConsumeCombiner(db)
    return combiner

"""A mixed workload for fault tests, and the check that nothing it was told succeeded got lost.

Concurrent tasks (32 by default) each own one agent and cycle through six operations: an event
(``EventRepository.create``), a batch of five (``create_many``), a budget charge with an idempotency
key (``BudgetRepository.try_consume``), an agent update (``update``: absolute values, retried), a
status change (``update_status``, retried) and ``increment_retry`` (relative, never retried). Every
operation's outcome is kept; :meth:`Workload.verify` then reads the database with a calm connection
and counts, per operation kind, what returned success but is missing (lost), what is stored more
often than asked (duplicated), and failures that were not DashStorageError (raw driver errors).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import asyncpg

from dash_storage.core.database import Database
from dash_storage.core.errors import DashStorageError
from dash_storage.core.ids import new_id
from dash_storage.core.models import ConsumeStatus
from dash_storage.repositories.agents import AgentRepository
from dash_storage.repositories.budgets import BudgetRepository
from dash_storage.repositories.events import EventRepository
from tests.reliability import record_counts

__all__ = ["KILL_POOL", "Outcome", "Report", "Workload", "assert_recovered", "terminate_loop"]

KINDS = ("event", "batch", "consume", "update", "status", "retry")
BATCH = 5
COST = Decimal("0.01")
STATUSES = ("blocked", "running")  # both may follow either: a toggle is always a valid transition

# Every pooled connection of the library on the current database (the admin connection running it
# has no 'dash-storage' application_name, so it survives).
KILL_POOL = """
SELECT count(*) FROM (
    SELECT pg_terminate_backend(pid) FROM pg_stat_activity
    WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name = 'dash-storage'
) AS killed
"""


@dataclass
class Outcome:
    """One operation: what it was, what it returned or raised."""

    kind: str
    task: int
    seq: int
    token: str
    ids: list[uuid.UUID] = field(default_factory=list)
    target: str | None = None
    result: Any = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Report:
    operations: int = 0
    succeeded: int = 0
    lost: int = 0
    duplicated: int = 0
    raw_errors: int = 0
    applied_after_error: int = 0  # raised, yet applied (an answer lost after commit): allowed
    settled: int = 0  # consumes that raised and were asked again after the fault
    errors: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def error_summary(self, top: int = 3) -> str:
        return ", ".join(f"{n} {name}" for name, n in self.errors.most_common(top)) or "none"

    def assert_clean(self) -> None:
        """Nothing that returned success was lost or doubled, no raw driver error, some succeeded."""
        assert self.problems == [], self.problems[:10]
        assert (self.lost, self.duplicated, self.raw_errors) == (0, 0, 0), self
        assert self.succeeded > 0

    def outcome_notes(self) -> str:
        """What failed, and what was applied or settled although its call raised."""
        return (
            f"failed: {self.error_summary()}; {self.applied_after_error} applied though their answer "
            f"was lost, {self.settled} charges re-asked"
        )

    def record(self, fault: str, notes: str) -> None:
        """This report as a "connection faults" row of RELIABILITY.md."""
        record_counts("connection faults", fault, self, notes)


async def assert_recovered(db: Database) -> None:
    """The same pool serves again: health check ok, nothing in use or waiting."""
    health = await db.health_check()
    assert health.ok, health.error
    stats = db.stats()
    assert (stats.in_use, stats.waiting) == (0, 0), stats
    assert stats.size <= stats.max


class Workload:
    """:meth:`setup` (calm), :meth:`run` (while a fault is active), then :meth:`verify` (calm)."""

    def __init__(
        self,
        db: Database,
        *,
        tasks: int = 32,
        ops_per_task: int = 30,
        seconds: float = 4.0,
        charges: int | None = None,
    ) -> None:
        self.db = db
        self.tasks = tasks
        self.ops_per_task = ops_per_task
        self.seconds = seconds
        self.outcomes: list[Outcome] = []
        self.swarm_id = new_id()
        self.agent_ids: list[uuid.UUID] = []
        self.budget_id: uuid.UUID | None = None
        consumes = sum(
            1 for t in range(tasks) for i in range(ops_per_task) if KINDS[(t + i) % 6] == "consume"
        )
        # Room for ``charges`` charges (default: 60% of them), so the limit is reached, and must
        # hold, while the fault is active.
        self.allocated = COST * (charges if charges is not None else max(1, int(consumes * 0.6)))
        self.max_tokens = consumes  # one token per charge: the token limit is never the binding one

    async def setup(self, db: Database) -> None:
        """Create the swarm, one agent per task and the budget (on a calm ``db``)."""
        await db.execute("INSERT INTO swarms (id, name) VALUES ($1, 'faults')", self.swarm_id, retry=True)
        agents = AgentRepository(db)
        for t in range(self.tasks):
            agent = await agents.create(self.swarm_id, label=f"task-{t}", status="running")
            self.agent_ids.append(agent.id)
        budget = await BudgetRepository(db).create(
            "swarm", self.swarm_id, allocated=self.allocated, max_tokens=self.max_tokens
        )
        self.budget_id = budget.id

    # -- running --------------------------------------------------------------------------------

    async def run(self) -> list[Outcome]:
        """Every task runs its operations until done or ``seconds`` have passed."""
        deadline = time.monotonic() + self.seconds
        await asyncio.gather(*(self._task(t, deadline) for t in range(self.tasks)))
        return self.outcomes

    async def _task(self, t: int, deadline: float) -> None:
        flips = 0
        for i in range(self.ops_per_task):
            if time.monotonic() > deadline:
                return
            out = Outcome(KINDS[(t + i) % 6], t, i, f"t{t}-{i}")
            if out.kind == "status":
                out.target = STATUSES[flips % 2]
                flips += 1
            try:
                out.result = await self._call(out, self.agent_ids[t])
            except Exception as exc:
                out.error = exc
            self.outcomes.append(out)

    async def _call(self, out: Outcome, agent: uuid.UUID) -> Any:
        events, agents = EventRepository(self.db), AgentRepository(self.db)
        assert self.budget_id is not None
        match out.kind:
            case "event":
                out.ids = [new_id()]
                payload = {"op": out.token}
                return await events.create(
                    self.swarm_id, "faults.event", agent_id=agent, payload=payload, id=out.ids[0]
                )
            case "batch":
                out.ids = [new_id() for _ in range(BATCH)]
                return await events.create_many(
                    {"swarm_id": self.swarm_id, "type": "faults.batch", "agent_id": agent,
                     "payload": {"op": out.token, "n": n}, "id": event_id}
                    for n, event_id in enumerate(out.ids)
                )  # fmt: skip
            case "consume":
                budgets = BudgetRepository(self.db)
                return await budgets.try_consume(self.budget_id, 1, COST, idempotency_key=out.token)
            case "update":
                return await agents.update(agent, label=out.token, metadata={"seq": out.seq})
            case "status":
                assert out.target is not None
                return await agents.update_status(agent, out.target)
            case _:
                return await agents.increment_retry(agent)

    # -- checking -------------------------------------------------------------------------------

    async def verify(self, calm: Database) -> Report:
        """Count lost / duplicated / raw errors; re-ask failed charges; check the budget's books."""
        rep = Report(operations=len(self.outcomes))
        for out in self.outcomes:
            if out.ok:
                rep.succeeded += 1
            else:
                assert out.error is not None
                rep.errors[f"{type(out.error).__name__} ({out.kind})"] += 1
                if not isinstance(out.error, DashStorageError):
                    rep.raw_errors += 1
                    rep.problems.append(f"raw error from {out.kind}: {out.error!r}")
        await self._check_events(calm, rep)
        await self._check_agents(calm, rep)
        await self._check_budget(calm, rep)
        return rep

    async def _check_events(self, calm: Database, rep: Report) -> None:
        rows = await calm.fetch(
            "SELECT id, payload->>'op' AS op FROM events WHERE swarm_id = $1", self.swarm_id, retry=True
        )
        stored_ids = {r["id"] for r in rows}
        per_op = Counter(r["op"] for r in rows)
        known: set[str] = set()
        for out in self.outcomes:
            if out.kind not in ("event", "batch"):
                continue
            known.add(out.token)
            stored = per_op.get(out.token, 0)
            if stored > len(out.ids):
                rep.duplicated += stored - len(out.ids)
            if out.kind == "batch" and stored not in (0, BATCH):
                rep.problems.append(f"batch {out.token} half-written: {stored} of {BATCH}")
            if out.ok:
                events = [out.result] if out.kind == "event" else out.result
                returned = [e.id for e in events]
                if returned != out.ids:
                    rep.problems.append(f"{out.token}: returned {returned}, expected {out.ids}")
                rep.lost += sum(1 for i in out.ids if i not in stored_ids)
            elif stored:
                rep.applied_after_error += 1
        strangers = set(per_op) - known
        if strangers:
            rep.problems.append(f"events nobody wrote: {sorted(strangers)[:5]}")

    async def _check_agents(self, calm: Database, rep: Report) -> None:
        rows = await calm.fetch(
            "SELECT id, status, retry_count, metadata FROM agents WHERE swarm_id = $1",
            self.swarm_id,
            retry=True,
        )
        by_id = {r["id"]: r for r in rows}
        for t, agent in enumerate(self.agent_ids):
            row = by_id[agent]
            mine = [o for o in self.outcomes if o.task == t]
            # increment_retry: never retried, so stored = successes + some of the failures.
            incs = [o for o in mine if o.kind == "retry"]
            ok = sum(1 for o in incs if o.ok)
            failed = len(incs) - ok
            rep.lost += max(0, ok - row["retry_count"])
            rep.duplicated += max(0, row["retry_count"] - ok - failed)
            rep.applied_after_error += max(0, min(failed, row["retry_count"] - ok))
            # update and update_status: the last success, or a later attempt that raised.
            for kind, stored in (("update", (row["metadata"] or {}).get("seq")), ("status", row["status"])):
                ops = [o for o in mine if o.kind == kind]
                last_ok = max((k for k, o in enumerate(ops) if o.ok), default=None)
                value = (lambda o: o.seq) if kind == "update" else (lambda o: o.target)
                allowed = {value(o) for o in ops[(last_ok or 0) :] if not o.ok}
                if last_ok is None:
                    allowed.add(None if kind == "update" else "running")
                else:
                    allowed.add(value(ops[last_ok]))
                if stored not in allowed:
                    rep.lost += 1
                    rep.problems.append(
                        f"agent {t} {kind}: stored {stored!r}, allowed {sorted(map(str, allowed))}"
                    )

    async def _check_budget(self, calm: Database, rep: Report) -> None:
        consumes = [o for o in self.outcomes if o.kind == "consume"]
        granted = {o.token for o in consumes if o.ok and o.result.granted}
        for o in consumes:
            if o.ok and o.result.status not in (ConsumeStatus.GRANTED, ConsumeStatus.INSUFFICIENT):
                rep.problems.append(f"consume {o.token} answered {o.result.status}")
        raised = [o.token for o in consumes if not o.ok]
        keys, cost, tokens, consumed, used = await self._books(calm)
        rep.lost += len(granted - keys)
        if not keys <= granted | set(raised):
            rep.problems.append(
                f"charged keys nobody was granted: {sorted(keys - granted - set(raised))[:5]}"
            )
        rep.applied_after_error += len(keys & set(raised))
        # Asking again, with the same keys, settles every charge whose answer was lost.
        budgets = BudgetRepository(calm)
        assert self.budget_id is not None
        for key in raised:
            again = await budgets.try_consume(self.budget_id, 1, COST, idempotency_key=key)
            if again.granted:
                granted.add(key)
            rep.settled += 1
        keys, cost, tokens, consumed, used = await self._books(calm)
        if keys != granted:
            rep.problems.append(f"ledger keys {len(keys)} != granted {len(granted)}")
        if not (consumed == cost == COST * len(granted) and used == tokens == len(granted)):
            rep.problems.append(f"books: consumed {consumed}, ledger {cost}, granted {len(granted)}")
        if consumed > self.allocated or used > self.max_tokens:
            rep.problems.append(
                f"overspent: {consumed} of {self.allocated}, {used} of {self.max_tokens} tokens"
            )

    async def _books(self, calm: Database) -> tuple[set[str], Decimal, int, Decimal, int]:
        entries = await calm.fetch(
            "SELECT idempotency_key, cost, tokens FROM budget_ledger WHERE budget_id = $1",
            self.budget_id,
            retry=True,
        )
        row = await calm.fetchrow(
            "SELECT consumed, used_tokens FROM budgets WHERE id = $1", self.budget_id, retry=True
        )
        assert row is not None
        if len(entries) != len({e["idempotency_key"] for e in entries}):
            raise AssertionError("a key charged twice")
        cost = sum((e["cost"] for e in entries), Decimal(0))
        return {e["idempotency_key"] for e in entries}, cost, sum(e["tokens"] for e in entries), *row


@contextlib.asynccontextmanager
async def terminate_loop(
    admin: asyncpg.Connection, interval: float, *, calm: tuple[float, float] | None = None
) -> AsyncIterator[list[int]]:
    """While inside, terminate every pooled 'dash-storage' connection of ``admin``'s database every
    ``interval`` seconds. Yields a one-item list: how many were terminated so far.

    ``calm=(every, length)``: after each ``every`` seconds of killing, kill nothing for ``length``
    seconds. Work that needs several round trips and a fresh connection (a COPY in a transaction)
    may never fit between two kills on a busy machine; a calm spell lets it through, so such a test
    checks what was acknowledged instead of finding nothing acknowledged at all.
    """
    killed = [0]
    stop = asyncio.Event()

    async def pause(seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)

    async def loop() -> None:
        clock = asyncio.get_running_loop().time
        next_calm = clock() + calm[0] if calm else float("inf")
        while not stop.is_set():
            killed[0] += int(await admin.fetchval(KILL_POOL))
            await pause(interval)
            if calm and clock() >= next_calm:
                await pause(calm[1])
                next_calm = clock() + calm[0]

    task = asyncio.create_task(loop())
    try:
        yield killed
    finally:
        stop.set()
        await task

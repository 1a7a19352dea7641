"""Records (immutable, typed) and the value sets of every enumerated column.

The table records (Swarm, Agent, Event, Session, Budget, LedgerEntry) are ``NamedTuple``s: typed,
immutable, and four times cheaper to build than frozen dataclasses, which matters when a query
returns hundreds of rows. Their fields are in the order of ``<RECORD>_COLUMNS``, so repositories
select exactly those columns and build records positionally (``Swarm(*row)``). ``record._asdict()``
gives a dict. Derived results (summaries, usage) are frozen dataclasses.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from decimal import Decimal
from enum import Enum, StrEnum
from typing import Any, Final, Literal, NamedTuple

__all__ = [
    "AGENT_COLUMNS",
    "BUDGET_COLUMNS",
    "EVENT_COLUMNS",
    "LEDGER_COLUMNS",
    "SESSION_COLUMNS",
    "SWARM_COLUMNS",
    "UNSET",
    "Agent",
    "AgentActivity",
    "AgentStatus",
    "Budget",
    "BudgetUsage",
    "ConsumeResult",
    "ConsumeStatus",
    "Currency",
    "EntityType",
    "Event",
    "EventStats",
    "EventTypeStats",
    "LedgerEntry",
    "LifecycleState",
    "ScopeType",
    "Session",
    "Severity",
    "Swarm",
    "SwarmBudgetSummary",
    "SwarmStatus",
    "SwarmSummary",
    "Unset",
]


class SwarmStatus(StrEnum):
    CREATING = "creating"
    ACTIVE = "active"
    SCALING = "scaling"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    DESTROYED = "destroyed"


class AgentStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    BLOCKED = "blocked"
    KILLED = "killed"


class LifecycleState(StrEnum):
    INITIALIZING = "initializing"
    SPAWNING = "spawning"
    RUNNING = "running"
    PAUSING = "pausing"
    PAUSED = "paused"
    RESUMING = "resuming"
    COMPLETING = "completing"
    FAILED = "failed"
    CLEANING_UP = "cleaning_up"
    DESTROYED = "destroyed"


class EntityType(StrEnum):
    AGENT = "agent"
    TASK = "task"
    SYSTEM = "system"


class Severity(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"


class ScopeType(StrEnum):
    SWARM = "swarm"
    AGENT = "agent"
    PROJECT = "project"


class Currency(StrEnum):
    USD = "USD"
    EUR = "EUR"
    GBP = "GBP"
    CAD = "CAD"


JSON = Any  # a JSON value as decoded by orjson (dict, list, str, int, float, bool, None)


class _Unset(Enum):
    """Marks an ``update`` argument that was not given (None means "set to NULL")."""

    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = _Unset.UNSET
Unset = Literal[_Unset.UNSET]


class Swarm(NamedTuple):
    id: uuid.UUID
    name: str
    config: dict[str, JSON]
    status: str
    created_at: dt.datetime
    updated_at: dt.datetime
    completed_at: dt.datetime | None


class Agent(NamedTuple):
    id: uuid.UUID
    swarm_id: uuid.UUID
    label: str | None
    status: str
    lifecycle_state: str
    model: str | None
    task: str | None
    config: dict[str, JSON]
    context: JSON | None
    code: JSON | None
    reasoning: JSON | None
    safety_boundaries: JSON | None
    spawned_at: dt.datetime
    updated_at: dt.datetime
    completed_at: dt.datetime | None
    pause_time: dt.datetime | None
    paused_by: str | None
    runtime: int
    retry_count: int
    max_retries: int
    last_error: str | None
    budget_limit: Decimal | None
    metadata: dict[str, JSON]


class Event(NamedTuple):
    id: uuid.UUID
    swarm_id: uuid.UUID
    agent_id: uuid.UUID | None
    type: str
    payload: JSON
    timestamp: dt.datetime
    correlation_id: str | None
    parent_event_id: uuid.UUID | None
    entity_type: str
    severity: str


class Session(NamedTuple):
    id: uuid.UUID
    tree_data: JSON
    current_branch: str | None
    metadata: dict[str, JSON]
    created_at: dt.datetime
    updated_at: dt.datetime
    expires_at: dt.datetime | None


class Budget(NamedTuple):
    id: uuid.UUID
    swarm_id: uuid.UUID | None
    scope_type: str
    scope_id: uuid.UUID
    allocated: Decimal
    consumed: Decimal
    currency: str
    max_tokens: int | None
    used_tokens: int
    created_at: dt.datetime
    updated_at: dt.datetime


class LedgerEntry(NamedTuple):
    id: uuid.UUID
    budget_id: uuid.UUID
    tokens: int
    cost: Decimal
    idempotency_key: str
    created_at: dt.datetime


def _columns(cls: type[tuple[Any, ...]]) -> str:
    names: tuple[str, ...] = cls._fields  # type: ignore[attr-defined]
    return ", ".join(n if n != "timestamp" else '"timestamp"' for n in names)


SWARM_COLUMNS = _columns(Swarm)
AGENT_COLUMNS = _columns(Agent)
EVENT_COLUMNS = _columns(Event)
SESSION_COLUMNS = _columns(Session)
BUDGET_COLUMNS = _columns(Budget)
LEDGER_COLUMNS = _columns(LedgerEntry)


# -- derived records ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SwarmSummary:
    """One row of the ``swarm_summary`` view."""

    id: uuid.UUID
    name: str
    status: str
    created_at: dt.datetime
    running_agents: int
    total_agents: int
    budget_allocated: Decimal  # 0 when the swarm has no swarm-scope budget
    budget_consumed: Decimal
    budget_percentage: Decimal | None  # None when the swarm has no swarm-scope budget


@dataclass(frozen=True, slots=True)
class AgentActivity:
    """One row of the ``agent_activity`` view."""

    id: uuid.UUID
    swarm_id: uuid.UUID
    swarm_name: str
    label: str | None
    status: str
    lifecycle_state: str
    model: str | None
    spawned_at: dt.datetime
    completed_at: dt.datetime | None
    duration_seconds: Decimal
    retry_count: int
    runtime: int


@dataclass(frozen=True, slots=True)
class EventTypeStats:
    """One row of the ``event_stats_24h`` view."""

    event_type: str
    event_count: int
    unique_agents: int
    unique_swarms: int
    first_event: dt.datetime
    last_event: dt.datetime


@dataclass(frozen=True, slots=True)
class EventStats:
    """``EventRepository.get_stats(hours)``: totals over a window, from one consistent query."""

    hours: float
    total: int
    by_type: dict[str, int]
    by_severity: dict[str, int]  # every severity, zero-filled


class ConsumeStatus(StrEnum):
    GRANTED = "granted"
    DUPLICATE = "duplicate"  # same idempotency key seen before: the first answer is repeated
    INSUFFICIENT = "insufficient"  # not enough headroom (cost or tokens): nothing charged
    NOT_FOUND = "not_found"


@dataclass(frozen=True, slots=True)
class ConsumeResult:
    """What ``BudgetRepository.try_consume`` did. ``granted`` is the yes/no answer of ``consume_budget``."""

    status: ConsumeStatus
    budget_id: uuid.UUID
    idempotency_key: str
    budget: Budget | None = None

    @property
    def granted(self) -> bool:
        return self.status in (ConsumeStatus.GRANTED, ConsumeStatus.DUPLICATE)


@dataclass(frozen=True, slots=True)
class BudgetUsage:
    budget_id: uuid.UUID
    tokens: int
    cost: Decimal
    percentage_tokens: Decimal | None  # None when tokens are unlimited
    percentage_cost: Decimal  # rounded down to 2 decimals; 100.00 exactly when no money is left
    remaining_tokens: int | None  # None when tokens are unlimited
    remaining_cost: Decimal
    is_exceeded: bool  # no headroom left (cost or tokens)


@dataclass(frozen=True, slots=True)
class SwarmBudgetSummary:
    swarm_id: uuid.UUID
    budgets: int
    allocated: Decimal
    consumed: Decimal
    remaining: Decimal
    max_tokens: int | None  # None (unlimited) when any budget is unlimited, or there is none
    used_tokens: int

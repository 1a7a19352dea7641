"""How legacy ids and statuses map to the new ones: the UUIDv5 namespace and the status maps.

A legacy id that already parses as a UUID is kept; any other string becomes
``uuid5(LEGACY_NAMESPACE, "<table>:<id>")``. Statuses are compared lower-cased and trimmed; values
in neither map go to conservative defaults (not running, not final), so a person decides.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from typing import Any, Final, TypeAlias

from dash_storage.core import driver
from dash_storage.core.models import AgentStatus, LifecycleState, SwarmStatus

__all__ = [
    "AGENT_STATUS_DEFAULT",
    "AGENT_STATUS_MAP",
    "LEGACY_NAMESPACE",
    "NULL_LABEL",
    "SWARM_STATUS_DEFAULT",
    "SWARM_STATUS_MAP",
    "AgentRef",
    "SwarmRef",
    "budget_uuid",
    "legacy_uuid",
    "map_agent_status",
    "map_swarm_status",
    "status_label",
]

#: The namespace of every legacy UUIDv5. NEVER change it: a second import would duplicate everything.
LEGACY_NAMESPACE: Final = uuid.UUID("b2970b88-b228-4032-b6d6-06af2462ec82")

# Legacy status spellings, grouped by where they go (compared lower-cased and trimmed).
_SWARM_ALIASES: Final[Mapping[str, tuple[str, ...]]] = {
    "creating": ("starting", "initializing", "pending", "created", "new"),
    "active": ("running",),
    "scaling": ("scaling_up", "scaling_down"),
    "paused": ("idle", "stopped", "suspended"),
    "completed": ("complete", "done", "finished", "success", "succeeded"),
    "failed": ("error", "errored", "crashed", "aborted"),
    "destroyed": ("killed", "terminated", "cancelled", "canceled", "deleted"),
}
_AGENT_ALIASES: Final[Mapping[tuple[str, str], tuple[str, ...]]] = {
    ("pending", "initializing"): ("pending", "idle", "created", "new", "queued", "initializing", "starting"),
    ("pending", "spawning"): ("spawning", "spawned"),
    ("running", "running"): ("running", "active", "working", "busy"),
    ("running", "resuming"): ("resuming",),
    ("running", "completing"): ("completing",),
    ("paused", "paused"): ("paused",),
    ("paused", "pausing"): ("pausing",),
    ("blocked", "paused"): ("blocked", "waiting"),
    ("completed", "destroyed"): ("completed", "complete", "done", "finished", "success", "succeeded"),
    ("failed", "failed"): ("failed", "error", "errored", "crashed", "timeout", "timed_out"),
    ("killed", "destroyed"): ("killed", "terminated", "stopped", "cancelled", "canceled", "aborted"),
    ("killed", "cleaning_up"): ("killing",),
}

#: Legacy swarm status (lower-cased, trimmed) → new status.
SWARM_STATUS_MAP: Final[Mapping[str, str]] = {
    **{s.value: s.value for s in SwarmStatus},
    **{old: new for new, olds in _SWARM_ALIASES.items() for old in olds},
}
#: Where a swarm status in neither set goes: not running, not final; a person decides.
SWARM_STATUS_DEFAULT: Final = "paused"

#: Legacy agent status (lower-cased, trimmed) → (new status, lifecycle_state).
AGENT_STATUS_MAP: Final[Mapping[str, tuple[str, str]]] = {
    old: new for new, olds in _AGENT_ALIASES.items() for old in olds
}
#: Where an agent status in neither set goes: not runnable, not final; a person decides.
AGENT_STATUS_DEFAULT: Final = ("blocked", "paused")

#: How a NULL legacy status is shown in the report's status mappings.
NULL_LABEL: Final = "(null)"

assert {s.value for s in AgentStatus} <= set(AGENT_STATUS_MAP)
assert all(
    s in {a.value for a in AgentStatus} and ls in {lc.value for lc in LifecycleState}
    for s, ls in AGENT_STATUS_MAP.values()
)
assert set(SWARM_STATUS_MAP.values()) <= {s.value for s in SwarmStatus}

#: A referenced swarm: its uuid, or None when it is known to be missing.
SwarmRef: TypeAlias = uuid.UUID | None
#: A referenced agent: (agent uuid, its swarm's uuid), or None when it is known to be missing.
AgentRef: TypeAlias = tuple[uuid.UUID, uuid.UUID] | None

_NS_SHA1: Final = hashlib.sha1(LEGACY_NAMESPACE.bytes, usedforsecurity=False)
# asyncpg's own uuid.UUID subclass: built in C, and encoded by asyncpg without a detour.
_FastUUID: Final = driver.uuid_from_bytes()


def legacy_uuid(table: str, legacy_id: str) -> uuid.UUID:
    """The PostgreSQL id of a legacy row: the id itself if it parses as a UUID, else
    ``uuid5(LEGACY_NAMESPACE, f"{table}:{legacy_id}")``. ``table``: swarms, agents or events."""
    if 32 <= len(legacy_id) <= 45:
        try:
            return _FastUUID(uuid.UUID(legacy_id).bytes)
        except ValueError:
            pass
    return _uuid5(f"{table}:{legacy_id}")


def _uuid5(name: str) -> uuid.UUID:
    # Equal to uuid.uuid5(LEGACY_NAMESPACE, name); the namespace is hashed once.
    h = _NS_SHA1.copy()
    h.update(name.encode("utf-8", "surrogatepass"))
    raw = bytearray(h.digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x50  # version 5
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    return _FastUUID(bytes(raw))


def budget_uuid(swarm_legacy_id: str) -> uuid.UUID:
    """The id of the budget made from a legacy swarm's budget columns."""
    return _uuid5(f"budget:{swarm_legacy_id}")


def map_swarm_status(value: Any) -> str:
    """The new swarm status for a legacy one (see SWARM_STATUS_MAP)."""
    if isinstance(value, str):
        return SWARM_STATUS_MAP.get(value.strip().lower(), SWARM_STATUS_DEFAULT)
    return SWARM_STATUS_DEFAULT


def map_agent_status(value: Any) -> tuple[str, str]:
    """The new (status, lifecycle_state) for a legacy agent status (see AGENT_STATUS_MAP)."""
    if isinstance(value, str):
        return AGENT_STATUS_MAP.get(value.strip().lower(), AGENT_STATUS_DEFAULT)
    return AGENT_STATUS_DEFAULT


def status_label(value: Any) -> str:
    """A legacy status as the report's status mappings show it."""
    return NULL_LABEL if value is None else str(value)

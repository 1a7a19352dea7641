"""Repositories that report a span per call: used only for a Database that has telemetry.

``Repository.__init__`` switches an instance to the traced subclass of its class when its Database
has telemetry; every other instance keeps its plain class and runs the original methods, with
nothing in between. The traced subclass overrides every public coroutine method with a wrapper that
runs the original inside a span (``DatabaseTelemetry.call``); it adds no state, so the switch keeps
the instance as it is (``isinstance`` still holds for the plain class).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from dash_storage.core.otel import Operation

__all__ = ["COLLECTIONS", "collection_of", "traced_class"]

C = TypeVar("C", bound=type)

#: The table each repository is about: ``db.collection.name`` of its spans.
COLLECTIONS = {
    "SwarmRepository": "swarms",
    "AgentRepository": "agents",
    "SessionRepository": "sessions",
    "BudgetRepository": "budgets",
    "EventRepository": "events",
}
#: Public coroutine methods that are not repository calls: opening the pool.
_NOT_TRACED = frozenset({"initialize"})

_TRACED: dict[type, type] = {}


def collection_of(cls: type) -> str:
    """The table of a repository class (of the nearest known repository it derives from)."""
    for klass in cls.__mro__:
        if klass.__name__ in COLLECTIONS:
            return COLLECTIONS[klass.__name__]
    return cls.__name__.removesuffix("Repository").lower() or cls.__name__.lower()


def traced_class(cls: C) -> C:
    """The subclass of ``cls`` whose public coroutine methods each run inside a span (made once)."""
    traced = _TRACED.get(cls)
    if traced is None:
        if cls in _TRACED.values():
            return cls  # already traced
        collection = collection_of(cls)
        members: dict[str, Any] = {
            "__slots__": (),
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
        }
        for name in dir(cls):
            if name.startswith("_") or name in _NOT_TRACED:
                continue
            method = inspect.getattr_static(cls, name)
            if inspect.iscoroutinefunction(method):
                members[name] = _traced(method, Operation(name, collection))
        traced = _TRACED[cls] = type(cls.__name__, (cls,), members)
    return traced  # type: ignore[return-value]


def _traced(
    method: Callable[..., Coroutine[Any, Any, Any]], op: Operation
) -> Callable[..., Coroutine[Any, Any, Any]]:
    @functools.wraps(method)
    async def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        probe = self.db.telemetry
        if probe is None:  # the shared default Database was replaced by one without telemetry
            return await method(self, *args, **kwargs)
        return await probe.call(op, method(self, *args, **kwargs))

    return call

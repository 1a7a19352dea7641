"""What is transient, and the backoff policy for retrying it.

One policy, applied once: a call is retried by the outermost layer that asked for retries, never by
two layers wrapped around each other (a retried query around a retried connect would multiply
the attempts and the waits). An error that already went through a retry loop carries
``retries_exhausted`` and is never retried again by an outer one.

Written by hand rather than with tenacity: the fast path (first attempt succeeds) must cost no more
than a ``try`` block, because it wraps every repository call.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from dash_storage.core.errors import (
    DashStorageError,
    connection_lost,
    is_driver_error,
    is_retryable,
    is_transient,
    map_error,
)

__all__ = ["RetryPolicy", "exhausted", "is_transient", "retry_call"]

T = TypeVar("T")
log = logging.getLogger("dash_storage.core.retry")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``attempts`` retries after the first try, exponential backoff with full jitter.

    The n-th retry waits a random time in ``[delay * 2**(n-1) / 2, delay * 2**(n-1)]``, capped at
    ``max_delay``.
    """

    attempts: int = 3
    delay: float = 1.0
    max_delay: float = 30.0
    #: Told of every retry: ``observer(what, attempt that failed, its error, wait before the next)``
    #: (a Database with telemetry counts them; None costs nothing, and the first try never calls it).
    observer: Callable[[str, int, BaseException, float], None] | None = field(default=None, compare=False)

    def backoff(self, retry_number: int) -> float:
        ceiling = min(self.max_delay, self.delay * (2 ** (retry_number - 1)))
        return random.uniform(ceiling / 2, ceiling)  # jitter, not security


async def retry_call(
    op: Callable[[int], Awaitable[T]],
    policy: RetryPolicy,
    *,
    what: str = "database call",
    failed: Exception | None = None,
) -> T:
    """Run ``op(attempt)`` and retry it on transient failures per ``policy``.

    ``op`` receives the attempt number (1 for the first try) so that an idempotent write can tell
    a retry from a first try. Non-transient errors, timeouts and errors that an inner retry loop
    already gave up on are raised at once; every error leaves as a DashStorageError with the
    driver's exception as its cause. The first retry after a lost connection goes without delay.

    ``failed``: the first try already ran outside (a caller's fast path, which skips this loop
    while nothing fails) and raised this; the loop goes on from there as if ``op(1)`` had raised it.
    """
    attempt = 1
    while True:
        try:
            if failed is not None:
                first, failed = failed, None
                raise first
            return await op(attempt)
        except Exception as exc:
            if attempt > policy.attempts or not is_retryable(exc) or exhausted(exc):
                err = exc if isinstance(exc, DashStorageError) or not is_driver_error(exc) else map_error(exc)
                if isinstance(err, DashStorageError) and attempt > policy.attempts:
                    err.retries_exhausted = True
                if err is exc:
                    raise
                raise err from exc
            wait = 0.0 if attempt == 1 and connection_lost(exc) else policy.backoff(attempt)
            log.warning(
                "%s failed (%s), retry %d/%d in %.3fs",
                what,
                type(exc).__name__,
                attempt,
                policy.attempts,
                wait,
            )
            if policy.observer is not None:
                policy.observer(what, attempt, exc, wait)
            if wait:
                await asyncio.sleep(wait)
            attempt += 1


def exhausted(exc: BaseException) -> bool:
    """True when ``exc`` comes out of a retry loop that already spent the policy's attempts."""
    return bool(getattr(exc, "retries_exhausted", False))

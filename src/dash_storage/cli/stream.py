"""``dash-db events --follow`` and ``dash-db relay``: the event log as it commits."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import uuid
from typing import Annotated, Any

import typer

from dash_storage.cli.common import console, json_text, run
from dash_storage.core.database import Database
from dash_storage.core.models import Event
from dash_storage.stream import Follower, Relay

__all__ = ["follow_events", "relay"]


def _stop_on_signals(stop: asyncio.Event) -> None:
    """Ctrl-C and SIGTERM end the loop cleanly (the current write finishes, the cursor is saved)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not on every platform
            loop.add_signal_handler(sig, stop.set)


def _line(event: Event) -> str:
    agent = str(event.agent_id) if event.agent_id is not None else "-"
    payload = json_text(event.payload)
    return (
        f"{event.timestamp.isoformat()}  {event.type}  {event.severity}  {event.entity_type}  "
        f"swarm={event.swarm_id}  agent={agent}  {payload}"
    )


def follow_events(
    *,
    swarm_id: uuid.UUID | None,
    agent_id: uuid.UUID | None,
    types: list[str] | None,
    severity: str | None,
    after: str | None,
    from_start: bool,
    limit: int | None,
    json_out: bool,
) -> None:
    """Print events as they commit until Ctrl-C (or ``limit`` events); JSON lines with ``json_out``."""

    async def main() -> int:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        shown = 0
        async with Database() as db:
            follower = Follower(
                db, swarm_id=swarm_id, agent_id=agent_id, types=types, after=after, from_start=from_start
            )
            async with follower:
                events = follower.__aiter__()
                while not stop.is_set():
                    nxt = asyncio.ensure_future(events.__anext__())
                    stopped = asyncio.ensure_future(stop.wait())
                    done, _ = await asyncio.wait({nxt, stopped}, return_when=asyncio.FIRST_COMPLETED)
                    stopped.cancel()
                    if nxt not in done:
                        nxt.cancel()
                        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                            await nxt
                        break
                    event = nxt.result()
                    if severity is not None and event.severity != severity:
                        continue
                    if json_out:
                        record: dict[str, Any] = {**event._asdict(), "cursor": follower.cursor}
                        sys.stdout.write(json_text(record) + "\n")
                    else:
                        sys.stdout.write(_line(event) + "\n")
                    sys.stdout.flush()
                    shown += 1
                    if limit is not None and shown >= limit:
                        break
                if not json_out and stop.is_set():
                    console.print(f"stopped; resume with --after {follower.cursor}", highlight=False)
        return shown

    run(main())


def relay(
    once: Annotated[
        bool, typer.Option("--once", help="Relay what has committed so far, then exit (for cron or tests).")
    ] = False,
    name: Annotated[
        str, typer.Option(help="Name of this relay's saved place in PostgreSQL (relay:NAME).")
    ] = "redis",
    prefix: Annotated[
        str, typer.Option(help="Stream names: PREFIX:events and PREFIX:events:SWARM_ID.")
    ] = "dash",
    maxlen: Annotated[
        int, typer.Option(min=0, help="Trim each stream to about this many entries (0: keep all).")
    ] = 1_000_000,
    json_out: Annotated[bool, typer.Option("--json", help="Print the run's counts as JSON.")] = False,
) -> None:
    """Copy the event stream into Redis Streams (REDIS_URL), exactly once, until Ctrl-C."""

    async def main() -> dict[str, Any]:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        async with Database() as db:
            r = Relay(db, name=name, prefix=prefix, maxlen=maxlen)
            if not once:
                console.print(
                    f"relaying to {r.keys.all} and {r.keys.swarm('<swarm_id>')}; Ctrl-C stops",
                    highlight=False,
                )
            stats = await r.run(once=once, stop=stop)
        return {
            "relayed": stats.relayed,
            "replayed": stats.replayed,
            "batches": stats.batches,
            "redis_outages": stats.redis_outages,
            "cursor": stats.cursor,
        }

    result = run(main())
    if json_out:
        sys.stdout.write(json_text(result, indent=True) + "\n")
    else:
        console.print(
            f"relayed {result['relayed']} events ({result['replayed']} already in Redis); "
            f"cursor {result['cursor']}",
            highlight=False,
        )

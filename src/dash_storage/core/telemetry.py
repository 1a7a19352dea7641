"""``Telemetry``: OpenTelemetry spans and metrics for a Database (the optional extra ``dash-storage[otel]``).

``Database(..., telemetry=Telemetry(tracer_provider=..., meter_provider=...))`` turns them on for that
Database; DASH_OTEL=1 turns them on, with OpenTelemetry's global providers, for every Database built
from the settings (``Database()``, ``get_database()``, the ``dash-db`` commands).

This module loads nothing of OpenTelemetry by itself: building a ``Telemetry`` does (through
``core.otel``). A program that never builds one never imports ``opentelemetry``, and a Database without
telemetry runs exactly the code it runs when the extra is not installed: its repositories are plain
instances, and the hooks in the Database, the budget combiner, the EventWriter, the Follower and the
Relay are a ``None`` check on paths that are not per call (a retry, a replay, a batch, a page).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dash_storage.core.errors import ConfigurationError, ValidationError

if TYPE_CHECKING:
    from dash_storage.core.database import Database
    from dash_storage.core.otel import DatabaseTelemetry, Instruments

__all__ = ["INSTALL_HINT", "Telemetry"]

INSTALL_HINT = "pip install 'dash-storage[otel]' (and an SDK to export with, e.g. opentelemetry-sdk)"


class Telemetry:
    """Where a Database sends its spans and metrics.

    ``tracer_provider`` / ``meter_provider``: OpenTelemetry providers (e.g. the SDK's
    ``TracerProvider`` and ``MeterProvider``); None uses the global ones (``trace.set_tracer_provider``,
    ``metrics.set_meter_provider``), also when they are set later. ``query_text=True`` adds the text of
    the statements to each span as ``db.query.text``: parameterized SQL (``$1``, ``$2``), never the
    values. One Telemetry may serve several Databases.

    Raises ConfigurationError if OpenTelemetry is not installed.
    """

    __slots__ = ("_instruments", "query_text")

    def __init__(
        self, tracer_provider: Any = None, meter_provider: Any = None, *, query_text: bool = False
    ) -> None:
        if not isinstance(query_text, bool):
            raise ValidationError("query_text", f"must be True or False, got {query_text!r:.80}")
        for name, provider, method in (
            ("tracer_provider", tracer_provider, "get_tracer"),
            ("meter_provider", meter_provider, "get_meter"),
        ):
            if provider is not None and not callable(getattr(provider, method, None)):
                kind = type(provider).__name__
                raise ValidationError(name, f"must be an OpenTelemetry provider ({method}()), got {kind}")
        try:
            from dash_storage.core import otel
        except ImportError as exc:
            if not (exc.name or "").startswith("opentelemetry"):
                raise
            raise ConfigurationError(
                f"OpenTelemetry is not installed: {INSTALL_HINT}", variable="DASH_OTEL"
            ) from exc
        self.query_text = query_text
        self._instruments: Instruments = otel.Instruments(tracer_provider, meter_provider)

    def __repr__(self) -> str:
        return f"<Telemetry query_text={self.query_text}>"

    def bind(self, db: Database) -> DatabaseTelemetry:
        """What ``db`` reports through (called by the Database itself)."""
        from dash_storage.core.otel import DatabaseTelemetry

        return DatabaseTelemetry(self._instruments, db, query_text=self.query_text)

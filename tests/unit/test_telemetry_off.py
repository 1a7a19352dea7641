"""Telemetry off costs nothing: no OpenTelemetry module is imported, and without the extra installed
turning it on fails with a clear error. Each check runs in a fresh interpreter (subprocess), since
this test process may have imported OpenTelemetry already."""

from __future__ import annotations

import json

from tests.fresh_python import run_fresh


def test_without_telemetry_nothing_of_opentelemetry_is_imported() -> None:
    done = run_fresh(
        """
        import json, sys
        import dash_storage
        from dash_storage import (AgentRepository, BudgetRepository, Database, EventRepository,
                                  EventWriter, SessionRepository, SwarmRepository, Telemetry)
        from dash_storage.cli.main import app
        from dash_storage.stream import Follower, Relay

        db = Database(postgres_host="db.invalid")  # never connected
        classes = (AgentRepository, BudgetRepository, EventRepository, SessionRepository, SwarmRepository)
        repos = [cls(db) for cls in classes] + [cls() for cls in classes]  # given, and the default
        EventWriter(db), Follower(db), Relay(db, "redis://localhost:6379/0")
        print(json.dumps({
            "plain": [type(r) is cls for r, cls in zip(repos, classes * 2)],
            "telemetry": db.telemetry is None and db.policy.observer is None,
            "otel": sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry"),
        }))
        """,
        POSTGRES_HOST="db.invalid",
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["otel"] == []
    assert out["telemetry"] is True
    assert out["plain"] == [True] * 10


BLOCKED = """
import sys
sys.modules["opentelemetry"] = None  # as if the extra were not installed
from dash_storage import Database, Telemetry
from dash_storage.core.errors import ConfigurationError
"""


def test_without_the_extra_telemetry_says_what_to_install() -> None:
    done = run_fresh(
        BLOCKED
        + """
try:
    Telemetry()
except ConfigurationError as exc:
    print(exc.variable, exc)
"""
    )
    assert done.returncode == 0, done.stderr
    variable, message = done.stdout.split(" ", 1)
    assert variable == "DASH_OTEL"
    assert message.startswith("OpenTelemetry is not installed: pip install 'dash-storage[otel]'")


def test_dash_otel_without_the_extra_fails_naming_the_variable() -> None:
    done = run_fresh(
        BLOCKED
        + """
try:
    Database(postgres_host="db.invalid")
except ConfigurationError as exc:
    print(exc.variable)
""",
        DASH_OTEL="1",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "DASH_OTEL"

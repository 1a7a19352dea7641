"""Run a Python script in a fresh interpreter (a subprocess of this test run), from the project
root and without the caller's DASH_OTEL* settings: for checks about what an import loads, which
this test process may have loaded already."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

__all__ = ["run_fresh"]

ROOT = Path(__file__).resolve().parents[1]


def run_fresh(script: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` (dedented) with ``env`` added; its output is captured as text."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DASH_OTEL")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

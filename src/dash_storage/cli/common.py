"""Shared pieces of the dash-db commands: the console, JSON output, running a coroutine."""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import sys
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import orjson
import typer
from rich.console import Console

from dash_storage.errors import DashStorageError, scrub

T = TypeVar("T")

console = Console()
err_console = Console(stderr=True)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop where available (faster than the default asyncio loop)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        return asyncio.run(coro)
    return uvloop.run(coro)


def _default(value: Any) -> Any:
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, uuid.UUID | Path):
        return str(value)
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    raise TypeError


def print_json(data: Any) -> None:
    """Machine-readable output on stdout (decimals as strings so no precision is lost)."""
    text = orjson.dumps(data, default=_default, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode()
    sys.stdout.write(scrub(text) + "\n")


def fail(message: str, code: int = 1) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {scrub(message)}", highlight=False)
    return typer.Exit(code)


def guard(exc: DashStorageError) -> typer.Exit:
    return fail(str(exc))

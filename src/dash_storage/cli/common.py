"""Shared pieces of the dash-db commands: the consoles, JSON output, running a coroutine, errors."""

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

from dash_storage.core.errors import scrub

T = TypeVar("T")

# Width for output that does not go to a terminal (a pipe, a file, a CI log): there is no screen
# to fit, and fitting 80 columns would cut ids and numbers, so lines are as long as their content.
UNLIMITED_WIDTH = 100_000


def _console(*, stderr: bool) -> Console:
    console = Console(stderr=stderr)
    if not console.is_terminal:
        console.width = UNLIMITED_WIDTH
    return console


console = _console(stderr=False)
err_console = _console(stderr=True)


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


def json_text(data: Any, *, indent: bool = False) -> str:
    """``data`` as JSON text (decimals as strings so no precision is lost)."""
    option = orjson.OPT_NON_STR_KEYS | (orjson.OPT_INDENT_2 if indent else 0)
    return orjson.dumps(data, default=_default, option=option).decode()


def print_json(data: Any) -> None:
    """Machine-readable output on stdout."""
    sys.stdout.write(scrub(json_text(data, indent=True)) + "\n")


def fail(message: str, code: int = 1) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {scrub(message)}", highlight=False)
    return typer.Exit(code)


def usage_error(option: str, message: str) -> typer.BadParameter:
    """A bad value for ``option``: exit 2, with the option named in the message."""
    return typer.BadParameter(message, param_hint=option)

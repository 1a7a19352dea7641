"""Tables for a person to read: ids, numbers and timestamps are never cut, text wraps.

Cells are plain text (never Rich markup, so a payload holding ``[red]`` prints as is); JSON values
(payloads, metadata, trees) print as JSON, ``None`` as ``-``.
"""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from rich.segment import Segments
from rich.table import Table
from rich.text import Text

from dash_storage.cli.common import console, json_text

__all__ = ["Kind", "cell", "kind_of", "new_table", "print_table"]

# Text columns wrap, but not narrower than this (a narrower column is unreadable).
TEXT_MIN_WIDTH = 16

# "id": kept on one line (a UUID, a file name, a timestamp); "number": the same, right-aligned;
# "text": wraps. Where a terminal is too narrow even so, a value folds onto the next line rather
# than being shortened with an ellipsis.
Kind = Literal["id", "number", "text"]


def new_table(title: str, columns: Sequence[tuple[str, Kind]]) -> Table:
    table = Table(title=title)
    for name, kind in columns:
        table.add_column(
            name,
            no_wrap=kind != "text",
            overflow="fold",
            justify="right" if kind == "number" else "left",
        )
    return table


def kind_of(values: Iterable[Any]) -> Kind:
    """The kind of a column from its values (the first one that is not None decides)."""
    for value in values:
        if value is None:
            continue
        if isinstance(value, bool):
            return "text"
        if isinstance(value, int | float | decimal.Decimal):
            return "number"
        if isinstance(value, uuid.UUID | dt.datetime | dt.date):
            return "id"
        return "text"
    return "text"


def cell(value: Any) -> Text:
    if value is None:
        return Text("-")
    if isinstance(value, dt.datetime):
        return Text(value.strftime("%Y-%m-%d %H:%M:%S"))
    if isinstance(value, dict | list):
        return Text(json_text(value))
    return Text(str(value))


def print_table(table: Table) -> None:
    """Print ``table`` on stdout, never cutting an id or number column.

    When those columns (plus the text columns at a readable minimum) need more than the terminal's
    width, the table is printed wider and the terminal wraps the lines: nothing is lost.
    """
    needed = _needed_width(table) if console.is_terminal else 0
    if needed <= console.width:
        console.print(table)
        return
    options = console.options.update_width(needed)
    console.print(Segments(console.render(table, options)), crop=False)


def _needed_width(table: Table) -> int:
    total = 1  # the left border
    for column in table.columns:
        widest = max(
            [console.measure(column.header).maximum, *(console.measure(c).maximum for c in column.cells)]
        )
        total += (widest if column.no_wrap else min(widest, TEXT_MIN_WIDTH)) + 3  # padding, border
    return total

"""Command classes that keep ``--help`` readable.

Typer labels every option with its Python type, so plain flags read ``--json <bool>`` as if they
took a value, and it writes a required argument as ``{path}`` in the usage line. These classes
show flags bare and arguments as ``PATH`` (``[PATH]`` when optional), the way shells document them.
"""

from __future__ import annotations

from typing import Any

from typer.core import TyperCommand, TyperGroup

__all__ = ["DashCommand", "DashGroup"]


def _bare_flags(params: list[Any]) -> list[Any]:
    for param in params:
        # An empty metavar shows no value placeholder next to the flag.
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


def _usage(params: list[Any], ctx: Any, options_metavar: str | None) -> list[str]:
    pieces = [options_metavar] if options_metavar else []
    for param in params:
        if param.param_type_name != "argument":
            pieces.extend(param.get_usage_pieces(ctx))
            continue
        name = (param.metavar or param.name or "arg").upper()
        if param.nargs != 1:
            name += "..."
        pieces.append(name if param.required else f"[{name}]")
    return pieces


class DashCommand(TyperCommand):
    """A command whose help shows flags without a type and arguments in capitals."""

    def get_params(self, ctx: Any) -> Any:
        return _bare_flags(list(super().get_params(ctx)))

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return _usage(self.get_params(ctx), ctx, self.options_metavar)


class DashGroup(TyperGroup):
    """A command group with the same help conventions as :class:`DashCommand`."""

    def get_params(self, ctx: Any) -> Any:
        return _bare_flags(list(super().get_params(ctx)))

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = _usage(self.get_params(ctx), ctx, self.options_metavar)
        if self.subcommand_metavar:
            pieces.append(self.subcommand_metavar)
        return pieces

"""The README's code examples run, unchanged, against the real test database."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from dash_storage import Database, reset_database

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples() -> None:
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)))
async def test_readme_example_runs(db: Database, index: int, capsys: pytest.CaptureFixture[str]) -> None:
    source = "async def __example():\n" + textwrap.indent(BLOCKS[index], "    ") + "\n    return locals()\n"
    namespace: dict[str, object] = {}
    exec(compile(source, f"README.md[python block {index}]", "exec"), namespace)
    try:
        local_vars = await namespace["__example"]()  # type: ignore[operator]
    finally:
        await reset_database()  # the first example uses the shared default pool
    assert isinstance(local_vars, dict) and local_vars
    if "success" in local_vars:
        assert local_vars["success"] is True
        assert local_vars["usage"].percentage_cost > 0
        assert str(local_vars["result"].status) == "granted"
    if "recent" in local_vars:
        assert {e.type for e in local_vars["recent"]} == {"agent.spawned", "agent.completed"}
    capsys.readouterr()

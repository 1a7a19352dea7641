"""``python -m dash_storage`` is ``dash-db``."""

from dash_storage.cli.main import run

run()

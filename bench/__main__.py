"""``python -m bench [NAME ...]``: run the benchmarks and rewrite their sections of BENCHMARKS.md.

Needs a PostgreSQL: the configured server (POSTGRES_HOST / DATABASE_URL), else the embedded one.
Each benchmark creates and drops its own scratch database.
"""

from __future__ import annotations

import importlib
import re
import sys

from bench.common import ROOT
from dash_storage.cli.common import run

BENCHES = {
    "repositories": "bench.repositories",
    "import": "bench.import_sqlite",
    "hot-budget": "bench.hot_budget",
    "queries": "bench.queries",
    "ingest": "bench.ingest",
    "stream": "bench.stream",
    "fanout": "bench.fanout",
    "single-row": "bench.repositories:run_single_row",
    "budget-exhausted": "bench.hot_budget:run_exhausted",
    "budget-growth": "bench.hot_budget:run_growth",
    "pooler": "bench.pooler",
    "telemetry": "bench.telemetry",
    "partitions": "bench.partitions",
    "replicas": "bench.replicas",
}
DOC = ROOT / "BENCHMARKS.md"
HEADER = """# Benchmarks

Every figure here is produced by `make bench` (`python -m bench`) and compares dash-storage with raw
asyncpg (or raw COPY) doing the same work in the same run, on the same machine. Re-running rewrites the
section of each benchmark. Tests never assert timings; these numbers are the proof of the speed targets.
"""


def write_section(name: str, text: str) -> None:
    doc = DOC.read_text() if DOC.exists() else HEADER
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{text.rstrip()}\n{end}"
    if start in doc:
        doc = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _m: block, doc, flags=re.S)
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(doc)


def main(argv: list[str]) -> None:
    names = argv or list(BENCHES)
    for name in names:
        if name not in BENCHES:
            raise SystemExit(f"unknown benchmark {name!r}; choose from {', '.join(BENCHES)}")
        target, _, function = BENCHES[name].partition(":")
        module = importlib.import_module(target)
        print(f"== {name}", flush=True)
        text = run(getattr(module, function or "run")())
        write_section(name, text)
        print(text)


if __name__ == "__main__":
    main(sys.argv[1:])

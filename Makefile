# Every target bootstraps .venv by itself: a fresh clone needs only `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-pooler soak reliability lint typecheck unit bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dash-db demo

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

# The whole suite: lint, types, then every test against a real PostgreSQL (the configured server,
# else an embedded one) and the end-to-end tests on the embedded server. The fault loops (tests
# marked soak) run at a small size here. Writes no tracked file.
test: lint typecheck
	$(BIN)/python -m pytest

# The integration tests again through a real PgBouncer in front of the same server (Debian's package,
# installed when missing; started on a free port and stopped afterwards): once with pool_mode=session,
# once with pool_mode=transaction. POSTGRES_POOLER says which; DATABASE_DIRECT_URL names the server for
# migrations, advisory locks and LISTEN. Tests about the server itself (killed server processes, fault
# proxies) are skipped there, each with its reason. Both runs go, then it fails if either failed.
test-pooler: $(STAMP)
	@status=0; for mode in session transaction; do \
		$(BIN)/python -m bench.pgbouncer $$mode -- $(BIN)/python -m pytest tests/integration || status=1; \
	done; exit $$status

# The fault loops at full size (DASH_SOAK=1): the same checks on several times the operations.
soak: $(STAMP)
	DASH_SOAK=1 $(BIN)/python -m pytest -m soak

# Runs every test marked reliability and, if all of them pass, rewrites RELIABILITY.md from what
# they recorded. (DASH_SOAK=1 make reliability records the fault loops at full size.)
reliability: $(STAMP)
	$(BIN)/python -m pytest -m reliability --reliability-report=RELIABILITY.md

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build src/*.egg-info

"""POSTGRES_POOLER, POSTGRES_POOLER_PREPARED_STATEMENTS and DATABASE_DIRECT_URL: values, checks,
what they change in the connection arguments, and the direct URL's password kept secret."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dash_storage.core.config import load_settings
from dash_storage.core.database import Database
from dash_storage.core.errors import ConfigurationError, scrub

VARS = [name for name in os.environ if name.startswith(("POSTGRES_", "DATABASE_", "DASH_"))]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No configuration in the environment, and a working directory without .env."""
    for var in VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_default_is_no_pooler(clean_env: Path) -> None:
    s = load_settings(postgres_host="db")
    assert s.postgres_pooler == "none"
    assert s.postgres_pooler_prepared_statements is False
    assert s.database_direct_url is None
    assert s.named_statements
    assert "statement_cache_size" not in s.connect_kwargs()
    assert s.direct_connect_kwargs() is None


@pytest.mark.parametrize("given", ["session", " Session ", "TRANSACTION", "none"])
def test_modes_are_read_in_any_case(clean_env: Path, monkeypatch: pytest.MonkeyPatch, given: str) -> None:
    monkeypatch.setenv("POSTGRES_HOST", "db")
    monkeypatch.setenv("POSTGRES_POOLER", given)
    assert load_settings().postgres_pooler == given.strip().lower()


@pytest.mark.parametrize("given", ["statement", "pgbouncer", "yes", ""])
def test_an_unknown_mode_names_the_variable(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, given: str
) -> None:
    monkeypatch.setenv("POSTGRES_HOST", "db")
    with pytest.raises(ConfigurationError) as info:
        load_settings(postgres_pooler=given)
    assert info.value.variable == "POSTGRES_POOLER"
    assert "none, session, transaction" in str(info.value)


def test_transaction_mode_turns_the_statement_cache_off(clean_env: Path) -> None:
    s = load_settings(postgres_host="pooler", postgres_port=6432, postgres_pooler="transaction")
    assert not s.named_statements
    assert s.session_state_needs_direct
    assert s.connect_kwargs()["statement_cache_size"] == 0
    # Named statements are kept when the pooler is said to carry them.
    carried = load_settings(
        postgres_host="pooler", postgres_pooler="transaction", postgres_pooler_prepared_statements=True
    )
    assert carried.named_statements
    assert "statement_cache_size" not in carried.connect_kwargs()


def test_session_mode_keeps_named_statements_and_session_state(clean_env: Path) -> None:
    s = load_settings(postgres_host="pooler", postgres_pooler="session")
    assert s.named_statements
    assert not s.session_state_needs_direct
    assert "statement_cache_size" not in s.connect_kwargs()


@pytest.mark.parametrize("mode", ["none", "session"])
def test_prepared_statements_setting_only_goes_with_transaction_mode(clean_env: Path, mode: str) -> None:
    with pytest.raises(ConfigurationError, match="POSTGRES_POOLER_PREPARED_STATEMENTS only applies"):
        load_settings(postgres_host="db", postgres_pooler=mode, postgres_pooler_prepared_statements=True)


def test_a_pooler_needs_a_server(clean_env: Path) -> None:
    with pytest.raises(ConfigurationError, match="POSTGRES_POOLER=transaction needs a server"):
        load_settings(postgres_pooler="transaction")
    with pytest.raises(ConfigurationError, match="DATABASE_DIRECT_URL is set but no server is"):
        load_settings(database_direct_url="postgresql://u:pw@db:5432/x")


def test_direct_url_is_checked_like_database_url(clean_env: Path) -> None:
    for bad, problem in [
        ("mysql://u@h/x", "must start with"),
        ("postgresql://u@h:99999/x", "port that is not a number"),
        ("postgresql://u@h/x?sslmode=sometimes", "sslmode must be one of"),
    ]:
        with pytest.raises(ConfigurationError) as info:
            load_settings(postgres_host="pooler", database_direct_url=bad)
        assert info.value.variable == "DATABASE_DIRECT_URL"
        assert problem in str(info.value)


def test_direct_connect_kwargs(clean_env: Path) -> None:
    s = load_settings(
        postgres_host="pooler",
        postgres_db="app",
        postgres_pooler="transaction",
        database_direct_url="postgresql://admin:s3cret-direct@db:5433/",
    )
    kwargs = s.direct_connect_kwargs()
    assert kwargs is not None
    assert kwargs["dsn"] == "postgresql://admin:s3cret-direct@db:5433/"
    # No database in the URL: the pooled connections' database; the statement cache stays on.
    assert kwargs["database"] == "app"
    assert "statement_cache_size" not in kwargs
    assert s.direct_connect_kwargs(database="postgres")["database"] == "postgres"  # type: ignore[index]
    named = load_settings(postgres_host="pooler", database_direct_url="postgresql://u@db/other")
    assert "database" not in named.direct_connect_kwargs()  # type: ignore[operator]


def test_direct_url_password_is_secret(clean_env: Path) -> None:
    s = load_settings(postgres_host="pooler", database_direct_url="postgresql://admin:s3cret-direct@db/x")
    assert "s3cret-direct" not in repr(s)
    assert "s3cret-direct" not in str(s.describe())
    # (Only the end: another test's password "postgres" may be registered, and hidden, too.)
    assert s.describe()["DATABASE_DIRECT_URL"].endswith("://admin:***@db/x")
    assert scrub("login failed for s3cret-direct") == "login failed for ***"


def test_where_connect_goes_is_named(clean_env: Path) -> None:
    db = Database(
        postgres_host="pooler",
        postgres_port=6432,
        postgres_pooler="transaction",
        database_direct_url="postgresql://u@db.internal:5433/x",
    )
    assert db.describe_target() == "pooler:6432 (POSTGRES_HOST / POSTGRES_PORT)"
    assert db.describe_target(direct=True) == "db.internal:5433 (DATABASE_DIRECT_URL)"
    assert db.can_hold_session
    assert not Database(postgres_host="pooler", postgres_pooler="transaction").can_hold_session
    assert Database(postgres_host="pooler", postgres_pooler="session").can_hold_session


async def test_session_work_behind_a_transaction_pooler_needs_the_direct_url(clean_env: Path) -> None:
    """Refused before any connection is tried: no server is needed to see the setting is missing."""
    db = Database(postgres_host="pooler.invalid", postgres_pooler="transaction")
    with pytest.raises(ConfigurationError) as info:
        await db.connect()
    assert info.value.variable == "DATABASE_DIRECT_URL"
    assert "POSTGRES_POOLER=transaction" in str(info.value)


def test_env_example_lists_the_pooler_variables_with_their_defaults(clean_env: Path) -> None:
    example = (Path(__file__).resolve().parents[2] / ".env.example").read_text()
    listed = dict(line.split("=", 1) for line in example.splitlines() if line and not line.startswith("#"))
    assert listed["POSTGRES_POOLER"] == "none"
    assert listed["POSTGRES_POOLER_PREPARED_STATEMENTS"] == "false"
    assert listed["DATABASE_DIRECT_URL"] == ""

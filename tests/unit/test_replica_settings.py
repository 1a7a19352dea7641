"""DATABASE_READ_URL, DATABASE_READ_MAX_LAG, DATABASE_READ_WAIT and POSTGRES_TCP_KEEPALIVES_*: parsed,
checked, and their secrets hidden."""

from __future__ import annotations

import pytest

from dash_storage.core.config import load_settings
from dash_storage.core.errors import ConfigurationError, scrub

SERVER = {"postgres_host": "db.example"}


def test_one_or_several_read_urls() -> None:
    s = load_settings(**SERVER, database_read_url=" postgresql://r1/dash , postgres://u@r2:6432/, ")
    assert s.read_urls == ["postgresql://r1/dash", "postgres://u@r2:6432/"]
    # Without a database name, the primary's database.
    assert s.read_connect_kwargs(s.read_urls[1])["database"] == s.database_name()
    assert "database" not in s.read_connect_kwargs(s.read_urls[0])
    assert load_settings(**SERVER).read_urls == []


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("mysql://r1/dash", "DATABASE_READ_URL: URL 1 must start with "),
        ("postgresql://r1/dash,http://r2", "DATABASE_READ_URL: URL 2 must start with "),
        ("postgresql://r1:99999/dash", "DATABASE_READ_URL: URL 1 has a port that is not a number"),
        (" , ", "DATABASE_READ_URL: must name at least one "),
    ],
)
def test_bad_read_urls_are_named(value: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as caught:
        load_settings(**SERVER, database_read_url=value)
    assert caught.value.variable == "DATABASE_READ_URL"


def test_read_urls_need_a_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POSTGRES_HOST", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    with pytest.raises(ConfigurationError, match="DATABASE_READ_URL is set but no server is"):
        load_settings(database_read_url="postgresql://r1/dash")


def test_read_url_passwords_are_hidden() -> None:
    s = load_settings(**SERVER, database_read_url="postgresql://u:replica-secret-1@r1/d,postgresql://r2/d")
    shown = s.describe()["DATABASE_READ_URL"]
    assert "replica-secret-1" not in shown and "r2" in shown
    assert "replica-secret-1" not in repr(s)
    assert scrub("failed: replica-secret-1") == "failed: ***"


@pytest.mark.parametrize(
    ("overrides", "variable"),
    [
        ({"database_read_max_lag": 0}, "DATABASE_READ_MAX_LAG"),
        ({"database_read_wait": -1}, "DATABASE_READ_WAIT"),
        ({"postgres_tcp_keepalives_idle": 0}, "POSTGRES_TCP_KEEPALIVES_IDLE"),
        ({"postgres_tcp_keepalives_count": 1000}, "POSTGRES_TCP_KEEPALIVES_COUNT"),
    ],
)
def test_bad_numbers_are_named(overrides: dict[str, int], variable: str) -> None:
    with pytest.raises(ConfigurationError, match=variable):
        load_settings(**SERVER, **overrides)


def test_keepalives_default_to_the_system() -> None:
    assert load_settings().tcp_keepalives == (None, None, None)
    s = load_settings(postgres_tcp_keepalives_idle=10, postgres_tcp_keepalives_count=3)
    assert s.tcp_keepalives == (10, None, 3)

"""Settings: defaults, sources, validation messages, secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from dash_storage.core.config import Settings, load_settings
from dash_storage.core.errors import ConfigurationError, DatabaseUnavailableError, map_error, scrub

VARS = [
    "POSTGRES_HOST",
    "POSTGRES_PORT",
    "POSTGRES_DB",
    "POSTGRES_USER",
    "POSTGRES_PASSWORD",
    "POSTGRES_SSL",
    "POSTGRES_SSL_ROOT_CERT",
    "POSTGRES_MIN_POOL_SIZE",
    "POSTGRES_MAX_POOL_SIZE",
    "POSTGRES_CONNECTION_TIMEOUT",
    "POSTGRES_IDLE_TIMEOUT",
    "POSTGRES_COMMAND_TIMEOUT",
    "POSTGRES_RETRY_ATTEMPTS",
    "POSTGRES_RETRY_DELAY",
    "DATABASE_URL",
    "DASH_DATA_DIR",
    "DASH_MIGRATIONS_DIR",
    "REDIS_URL",
]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No configuration in the environment, and a working directory without .env."""
    for var in VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_defaults(clean_env: Path) -> None:
    s = load_settings()
    assert s.postgres_host is None
    assert s.target == "embedded"
    assert (s.postgres_port, s.postgres_db, s.postgres_user) == (5432, "dash", "dash")
    assert s.postgres_password.get_secret_value() == "dash"
    assert s.postgres_ssl == "disable"
    assert (s.postgres_min_pool_size, s.postgres_max_pool_size) == (2, 20)
    assert (s.postgres_connection_timeout, s.postgres_idle_timeout) == (5000, 30000)
    assert (s.postgres_retry_attempts, s.postgres_retry_delay) == (3, 1000)
    assert s.database_url is None
    assert s.dash_migrations_dir is None
    assert s.redis_url.get_secret_value() == "redis://localhost:6379/0"
    assert s.dash_data_dir.name == "dash-storage"


def test_every_spec_variable_is_a_setting() -> None:
    names = {n.upper() for n in Settings.model_fields}
    assert set(VARS) <= names


def test_env_file_is_read_and_environment_wins(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (clean_env / ".env").write_text("POSTGRES_HOST=db.example\nPOSTGRES_PORT=6543\nPOSTGRES_DB=fromfile\n")
    monkeypatch.setenv("POSTGRES_DB", "fromenv")
    s = load_settings()
    assert s.postgres_host == "db.example"
    assert s.postgres_port == 6543
    assert s.postgres_db == "fromenv"
    assert s.target == "server"


def test_database_url_selects_server(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:pw@h:5433/x")
    s = load_settings()
    assert s.target == "server"
    assert s.database_name() == "x"
    assert s.connect_kwargs()["dsn"] == "postgresql://u:pw@h:5433/x"


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("POSTGRES_PORT", "abc"),
        ("POSTGRES_PORT", "70000"),
        ("POSTGRES_SSL", "sometimes"),
        ("POSTGRES_SSL", "prefer"),
        ("POSTGRES_MIN_POOL_SIZE", "-1"),
        ("POSTGRES_CONNECTION_TIMEOUT", "soon"),
        ("POSTGRES_RETRY_ATTEMPTS", "many"),
        ("DATABASE_URL", "mysql://x@y/z"),
        ("DASH_MIGRATIONS_DIR", "/definitely/not/here"),
    ],
)
def test_bad_value_names_the_variable(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, var: str, value: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    assert info.value.variable == var
    assert var in str(info.value)


def test_max_pool_below_min_is_rejected(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTGRES_MIN_POOL_SIZE", "10")
    monkeypatch.setenv("POSTGRES_MAX_POOL_SIZE", "5")
    with pytest.raises(ConfigurationError, match="POSTGRES_MAX_POOL_SIZE"):
        load_settings()


@pytest.mark.parametrize(
    ("value", "mode"),
    [
        ("true", "verify-full"),
        ("false", "disable"),
        ("require", "require"),
        ("verify-ca", "verify-ca"),
        ("VERIFY-FULL", "verify-full"),
    ],
)
def test_ssl_modes(clean_env: Path, monkeypatch: pytest.MonkeyPatch, value: str, mode: str) -> None:
    import ssl

    monkeypatch.setenv("POSTGRES_SSL", value)
    s = load_settings()
    assert s.postgres_ssl == mode
    ctx = s.ssl_context()
    if mode == "disable":
        assert ctx is False
    else:
        assert isinstance(ctx, ssl.SSLContext)
        assert ctx.check_hostname is (mode == "verify-full")
        assert ctx.verify_mode == (ssl.CERT_NONE if mode == "require" else ssl.CERT_REQUIRED)


def test_password_never_shown(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "s3cr3t-Pa55-word"
    monkeypatch.setenv("POSTGRES_PASSWORD", secret)
    monkeypatch.setenv("DATABASE_URL", f"postgresql://me:{secret}@db.example:5432/dash")
    monkeypatch.setenv("REDIS_URL", f"redis://:{secret}@cache:6379/0")
    s = load_settings()
    assert secret not in repr(s)
    assert secret not in str(s)
    assert secret not in str(s.describe())
    assert secret not in str(s.model_dump())
    # Any message built by the package is scrubbed, even if a driver put the secret in it.
    err = DatabaseUnavailableError(
        f"could not connect with password {secret} to postgresql://me:{secret}@x/y"
    )
    assert secret not in str(err)
    assert secret not in scrub(f"postgresql://me:{secret}@x/y")


def test_building_settings_registers_their_secrets_for_every_error(clean_env: Path) -> None:
    """The password is hidden from the moment a Settings object holding it exists, also in a
    driver's own message that quotes it outside any URL (what map_error turns into our errors)."""
    password, in_url, in_redis = "pw-Settings-4711", "url-Secret-0815", "redis-Secret-2342"
    assert scrub(f"login {password} {in_url} {in_redis}") == f"login {password} {in_url} {in_redis}"
    Settings(
        postgres_password=password,
        database_url=f"postgresql://me:{in_url}@db.example/dash",
        redis_url=f"redis://:{in_redis}@cache:6379/0",
    )
    driver_said = OSError(f"connect as me with password {password} ({in_url}, {in_redis}) refused")
    mapped = map_error(driver_said, context="opening the pool")
    assert isinstance(mapped, DatabaseUnavailableError)
    for text in (str(mapped), repr(mapped), scrub(f"login {password} {in_url} {in_redis}")):
        assert password not in text and in_url not in text and in_redis not in text
    assert "refused" in str(mapped) and "***" in str(mapped)


def test_bad_password_url_is_not_echoed(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "leaky-Pa55"
    monkeypatch.setenv("DATABASE_URL", f"mysql://me:{secret}@db/x")
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    assert secret not in str(info.value)
    assert info.value.__cause__ is None


def test_env_example_lists_every_variable_with_its_default(clean_env: Path) -> None:
    example = (Path(__file__).resolve().parents[2] / ".env.example").read_text()
    listed = {line.split("=", 1)[0] for line in example.splitlines() if line and not line.startswith("#")}
    assert set(VARS) <= listed
    (clean_env / ".env").write_text(example)
    from_file = load_settings()
    (clean_env / ".env").unlink()
    defaults = load_settings()
    assert from_file.describe() == defaults.describe()

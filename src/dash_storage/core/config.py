"""Settings, read once from the environment and a ``.env`` file in the working directory.

The environment wins over ``.env``. Every value is validated when the settings are built; a bad
value raises :class:`~dash_storage.core.errors.ConfigurationError` naming the variable. Secrets
(POSTGRES_PASSWORD, DATABASE_URL, REDIS_URL credentials) never appear in ``repr()`` or messages.
"""

from __future__ import annotations

import datetime as dt
import re
import ssl as ssl_module
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import platformdirs
from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic import ValidationError as PydanticValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from dash_storage.core.errors import ConfigurationError, register_secret, scrub

__all__ = ["POOLER_MODES", "SSL_MODES", "Settings", "load_settings"]

SSL_MODES = ("disable", "require", "verify-ca", "verify-full")
_SSL_ALIASES = {
    "false": "disable",
    "0": "disable",
    "no": "disable",
    "off": "disable",
    "true": "verify-full",
    "1": "verify-full",
    "yes": "verify-full",
    "on": "verify-full",
}

#: sslmode values a DATABASE_URL may carry (libpq's list; asyncpg applies them when POSTGRES_SSL is off).
URL_SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")

Target = Literal["server", "embedded"]

#: POSTGRES_POOLER: what sits between dash-storage and PostgreSQL. ``none``: nothing (or a plain
#: TCP proxy); ``session``: a pooler that gives each client connection one server connection for its
#: whole life (PgBouncer pool_mode=session); ``transaction``: a pooler that may hand each
#: transaction to a different server connection (PgBouncer pool_mode=transaction).
POOLER_MODES = ("none", "session", "transaction")
Pooler = Literal["none", "session", "transaction"]


def _check_ca_file(path: Path, prefix: str = "") -> None:
    """A readable PEM file of CA certificates (else the first connect would fail with a raw error)."""
    if not path.is_file():
        raise ValueError(f"{prefix}must be an existing file")
    try:
        ssl_module.create_default_context(cafile=str(path))
    except (ssl_module.SSLError, OSError, ValueError):
        raise ValueError(f"{prefix}must be a readable PEM file of CA certificates") from None


def _check_dsn(url: str, env_ssl_mode: str) -> None:
    """A PostgreSQL URL the driver can use, whose sslmode does not contradict POSTGRES_SSL."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError("must start with postgresql:// or postgres://")
    try:
        parts.port  # noqa: B018 - parsing it is the check; the driver would raise a raw ValueError
    except ValueError:
        raise ValueError("has a port that is not a number between 0 and 65535") from None
    # TLS: an sslmode in the URL must be a libpq mode, and must not contradict POSTGRES_SSL
    # (which would otherwise silently replace it, e.g. verify-full in the URL by require).
    url_mode = _url_param(url, "sslmode")
    if url_mode is not None:
        if url_mode not in URL_SSL_MODES:
            raise ValueError(f"sslmode must be one of {', '.join(URL_SSL_MODES)}")
        if env_ssl_mode != "disable" and url_mode != env_ssl_mode:
            raise ValueError(
                f"sslmode={url_mode} contradicts POSTGRES_SSL={env_ssl_mode}; set one of them, or the same "
                "mode in both"
            )
    root_cert = _url_param(url, "sslrootcert")
    if root_cert is not None:
        _check_ca_file(Path(root_cert), "sslrootcert ")


def _url_param(url: str, name: str) -> str | None:
    """The last value of a query parameter of a DSN (as the driver reads it), or None."""
    values = parse_qs(urlsplit(url).query).get(name)
    return values[-1] if values else None


def _split_urls(value: str) -> list[str]:
    """The URLs of a comma-separated list (blank entries ignored)."""
    return [part.strip() for part in value.split(",") if part.strip()]


_DURATION = re.compile(r"^\s*(\d{1,6})\s*([hdw])\s*$")
_DURATION_UNITS = {"h": dt.timedelta(hours=1), "d": dt.timedelta(days=1), "w": dt.timedelta(weeks=1)}


def parse_duration(value: str, name: str) -> dt.timedelta:
    """A length of time written as a whole number of hours, days or weeks: "12h", "30d", "2w"."""
    match = _DURATION.match(value) if isinstance(value, str) else None
    if match is None or int(match.group(1)) == 0:
        examples = "such as 12h, 30d or 2w"
        raise ValueError(
            f"{name} must be a positive whole number of hours, days or weeks {examples}, not {value!r}"
        )
    return int(match.group(1)) * _DURATION_UNITS[match.group(2)]


class Settings(BaseSettings):
    """Every configuration variable of dash-storage, with its default."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        env_ignore_empty=True,
        case_sensitive=False,
        frozen=True,
        hide_input_in_errors=True,
    )

    postgres_host: str | None = None
    postgres_port: int = Field(5432, ge=1, le=65535)
    postgres_db: str = Field("dash", min_length=1, max_length=63)
    postgres_user: str = Field("dash", min_length=1, max_length=63)
    postgres_password: SecretStr = SecretStr("dash")
    postgres_ssl: str = "false"
    postgres_ssl_root_cert: Path | None = None
    postgres_min_pool_size: int = Field(2, ge=0, le=1000)
    postgres_max_pool_size: int = Field(20, ge=1, le=1000)
    postgres_connection_timeout: int = Field(5000, ge=1, le=3_600_000)
    postgres_idle_timeout: int = Field(30000, ge=0, le=86_400_000)
    postgres_command_timeout: int = Field(30000, ge=0, le=86_400_000)
    postgres_retry_attempts: int = Field(3, ge=0, le=100)
    postgres_retry_delay: int = Field(1000, ge=0, le=600_000)
    database_url: SecretStr | None = None
    postgres_pooler: Pooler = "none"
    postgres_pooler_prepared_statements: bool = False
    database_direct_url: SecretStr | None = None
    #: Read replicas (one URL, or several separated by commas) for the reads the repositories mark
    #: read-only; see ``core.replicas``.
    database_read_url: SecretStr | None = None
    #: A replica whose replay lags more than this many seconds is left aside until it catches up.
    database_read_max_lag: float = Field(5.0, gt=0, le=86_400)
    #: How long (ms) a read waits for a replica to replay this process's own last write before it
    #: goes to the primary instead.
    database_read_wait: int = Field(50, ge=0, le=60_000)
    #: TCP keepalive of every connection to PostgreSQL (seconds; unset: the system's): idle time
    #: before the first probe, time between probes, probes lost before the connection is dropped.
    postgres_tcp_keepalives_idle: int | None = Field(None, ge=1, le=32_767)
    postgres_tcp_keepalives_interval: int | None = Field(None, ge=1, le=32_767)
    postgres_tcp_keepalives_count: int | None = Field(None, ge=1, le=127)
    dash_data_dir: Path = Field(default_factory=lambda: Path(platformdirs.user_data_dir("dash-storage")))
    dash_migrations_dir: Path | None = None
    #: OpenTelemetry spans and metrics for every Database built from these settings, through the
    #: global providers (needs the extra dash-storage[otel]); ``db.query.text`` on the spans too.
    dash_otel: bool = False
    dash_otel_query_text: bool = False
    redis_url: SecretStr = SecretStr("redis://localhost:6379/0")
    #: How much time one partition of the event log spans ("1d", "6h", "7d": whole hours, 1 hour
    #: to 366 days); applies to partitions created from then on.
    dash_event_partition_size: str = "1d"
    #: Events older than this go, a whole partition at a time, when ``dash-db maintain`` or
    #: ``dash-db prune`` runs ("30d", "12h", "2w"); unset keeps everything.
    dash_event_retention: str | None = None

    @field_validator("dash_event_partition_size")
    @classmethod
    def _check_partition_size(cls, value: str) -> str:
        size = parse_duration(value, "DASH_EVENT_PARTITION_SIZE")
        if size < dt.timedelta(hours=1) or size > dt.timedelta(days=366) or size.total_seconds() % 3600:
            raise ValueError("DASH_EVENT_PARTITION_SIZE must be a whole number of hours from 1h to 366d")
        return value

    @field_validator("dash_event_retention")
    @classmethod
    def _check_retention(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value, "DASH_EVENT_RETENTION")
        return value

    @property
    def event_partition_size(self) -> dt.timedelta:
        return parse_duration(self.dash_event_partition_size, "DASH_EVENT_PARTITION_SIZE")

    @property
    def event_retention(self) -> dt.timedelta | None:
        if self.dash_event_retention is None:
            return None
        return parse_duration(self.dash_event_retention, "DASH_EVENT_RETENTION")

    @field_validator("postgres_ssl")
    @classmethod
    def _check_ssl(cls, value: str) -> str:
        mode = _SSL_ALIASES.get(value.strip().lower(), value.strip().lower())
        if mode not in SSL_MODES:
            raise ValueError(f"must be true, false or one of {', '.join(SSL_MODES)}")
        return mode

    @field_validator("database_url", "database_direct_url")
    @classmethod
    def _check_url(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is not None:
            _check_dsn(value.get_secret_value(), info.data.get("postgres_ssl", "disable"))
        return value

    @field_validator("database_read_url")
    @classmethod
    def _check_read_urls(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is not None:
            urls = _split_urls(value.get_secret_value())
            if not urls:
                raise ValueError("must name at least one postgresql:// URL (several: separated by commas)")
            for number, url in enumerate(urls, 1):
                try:
                    _check_dsn(url, info.data.get("postgres_ssl", "disable"))
                except ValueError as exc:
                    raise ValueError(f"URL {number} {exc}") from None
        return value

    @field_validator("postgres_pooler", mode="before")
    @classmethod
    def _check_pooler(cls, value: object) -> object:
        mode = value.strip().lower() if isinstance(value, str) else value
        if mode not in POOLER_MODES:
            raise ValueError(f"must be one of {', '.join(POOLER_MODES)}")
        return mode

    @field_validator("dash_migrations_dir")
    @classmethod
    def _check_migrations_dir(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError("must be an existing directory")
        return value

    @field_validator("postgres_ssl_root_cert")
    @classmethod
    def _check_root_cert(cls, value: Path | None) -> Path | None:
        if value is not None:
            _check_ca_file(value)
        return value

    @model_validator(mode="after")
    def _check_pool(self) -> Settings:
        if self.postgres_max_pool_size < self.postgres_min_pool_size:
            raise ValueError(
                f"POSTGRES_MAX_POOL_SIZE ({self.postgres_max_pool_size}) is below "
                f"POSTGRES_MIN_POOL_SIZE ({self.postgres_min_pool_size})"
            )
        return self

    @model_validator(mode="after")
    def _check_pooler_settings(self) -> Settings:
        if self.target == "embedded":
            # The embedded server is reached on its own Unix socket: there is no pooler to describe.
            if self.postgres_pooler != "none":
                raise ValueError(
                    f"POSTGRES_POOLER={self.postgres_pooler} needs a server: set POSTGRES_HOST / "
                    "POSTGRES_PORT or DATABASE_URL to the pooler's address (the embedded server has none)"
                )
            if self.database_read_url is not None:
                raise ValueError(
                    "DATABASE_READ_URL is set but no server is: set POSTGRES_HOST or DATABASE_URL to the "
                    "primary too (the embedded server has no replicas)"
                )
            if self.database_direct_url is not None:
                raise ValueError(
                    "DATABASE_DIRECT_URL is set but no server is: set POSTGRES_HOST or DATABASE_URL too "
                    "(DATABASE_DIRECT_URL is the way around a pooler, not the server itself)"
                )
        if self.postgres_pooler_prepared_statements and self.postgres_pooler != "transaction":
            raise ValueError(
                "POSTGRES_POOLER_PREPARED_STATEMENTS only applies to POSTGRES_POOLER=transaction "
                f"(now {self.postgres_pooler}, where prepared statements are always used)"
            )
        return self

    @model_validator(mode="after")
    def _register_secrets(self) -> Settings:
        """Hand every secret of these settings to the error scrubber as soon as they are valid.

        From then on no DashStorageError, log line or CLI output built by the package can show
        them, not even a driver message that quotes one: the settings are where the password
        comes in, so they are where it is registered, before anything can connect with it.
        """
        for secret in self._secrets():
            register_secret(secret)
        return self

    def _secrets(self) -> list[str | None]:
        """POSTGRES_PASSWORD and the passwords inside DATABASE_URL, DATABASE_DIRECT_URL and REDIS_URL."""
        urls = [
            u.get_secret_value() for u in (self.database_url, self.database_direct_url, self.redis_url) if u
        ]
        return [self.postgres_password.get_secret_value()] + [
            urlsplit(url).password for url in urls + self.read_urls
        ]

    # -- derived values -------------------------------------------------------------------------

    @property
    def target(self) -> Target:
        """``server`` when DATABASE_URL or POSTGRES_HOST names a server, else ``embedded``."""
        return "server" if (self.database_url is not None or self.postgres_host) else "embedded"

    @property
    def connection_timeout_s(self) -> float:
        return self.postgres_connection_timeout / 1000.0

    @property
    def idle_timeout_s(self) -> float:
        return self.postgres_idle_timeout / 1000.0

    @property
    def command_timeout_s(self) -> float | None:
        """Longest wait for a statement's answer on a pooled connection; None (0) means no limit."""
        return self.postgres_command_timeout / 1000.0 if self.postgres_command_timeout else None

    @property
    def retry_delay_s(self) -> float:
        return self.postgres_retry_delay / 1000.0

    @property
    def migrations_dir(self) -> Path | None:
        return self.dash_migrations_dir

    @property
    def named_statements(self) -> bool:
        """Whether pooled connections may keep prepared statements on the server between calls.

        Not behind a transaction-mode pooler (the next transaction may run on another server
        connection, where the statement does not exist), unless POSTGRES_POOLER_PREPARED_STATEMENTS
        says the pooler carries them (PgBouncer 1.21+ with max_prepared_statements > 0).
        """
        return self.postgres_pooler != "transaction" or self.postgres_pooler_prepared_statements

    @property
    def session_state_needs_direct(self) -> bool:
        """Whether session state (advisory locks, LISTEN) needs DATABASE_DIRECT_URL: behind a
        transaction-mode pooler a session's state stays on a server connection the next
        transaction may not get."""
        return self.postgres_pooler == "transaction"

    def ssl_context(self, *, direct: bool = False) -> ssl_module.SSLContext | bool:
        """The ``ssl`` argument for asyncpg: False, or a context that verifies as the mode says.

        verify-full checks the chain and the host name, verify-ca the chain only, against
        POSTGRES_SSL_ROOT_CERT (else the ``sslrootcert`` of DATABASE_URL, or of DATABASE_DIRECT_URL
        for a ``direct`` connection, else the system's CAs).
        require encrypts without verifying, unless a root certificate is given: then, as in libpq,
        it verifies the chain like verify-ca.
        """
        mode = self.postgres_ssl
        if mode == "disable":
            return False
        cafile = self._root_cert(self.database_direct_url if direct else self.database_url)
        ctx = ssl_module.create_default_context(cafile=cafile)
        if mode == "require" and cafile is None:
            # libpq semantics: encrypt, do not verify (chosen explicitly by the user).
            ctx.check_hostname = False
            ctx.verify_mode = ssl_module.CERT_NONE
        elif mode in ("require", "verify-ca"):
            ctx.check_hostname = False
            ctx.verify_mode = ssl_module.CERT_REQUIRED
        return ctx

    def _root_cert(self, url: SecretStr | None) -> str | None:
        if self.postgres_ssl_root_cert is not None:
            return str(self.postgres_ssl_root_cert)
        if url is not None:
            return _url_param(url.get_secret_value(), "sslrootcert")
        return None

    def connect_kwargs(self, *, database: str | None = None) -> dict[str, Any]:
        """Keyword arguments for ``asyncpg.connect``/``create_pool`` for the configured server."""
        kwargs: dict[str, Any] = {"timeout": self.connection_timeout_s}
        if not self.named_statements:
            # asyncpg then re-sends each statement's text with its parameters in one message
            # sequence (unnamed statements), which a transaction-mode pooler keeps on one server.
            kwargs["statement_cache_size"] = 0
        if self.database_url is not None:
            kwargs["dsn"] = self.database_url.get_secret_value()
            if self.postgres_ssl != "disable":
                kwargs["ssl"] = self.ssl_context()
            if database:
                kwargs["database"] = database
            return kwargs
        kwargs.update(
            host=self.postgres_host,
            port=self.postgres_port,
            user=self.postgres_user,
            password=self.postgres_password.get_secret_value(),
            database=database or self.postgres_db,
            ssl=self.ssl_context(),
        )
        return kwargs

    def direct_connect_kwargs(self, *, database: str | None = None) -> dict[str, Any] | None:
        """Keyword arguments for ``asyncpg.connect`` to DATABASE_DIRECT_URL (None when it is not set).

        A URL without a database name reaches the database the pooled connections use.
        """
        if self.database_direct_url is None:
            return None
        url = self.database_direct_url.get_secret_value()
        kwargs: dict[str, Any] = {"timeout": self.connection_timeout_s, "dsn": url}
        if self.postgres_ssl != "disable":
            kwargs["ssl"] = self.ssl_context(direct=True)
        if database or not urlsplit(url).path.lstrip("/"):
            kwargs["database"] = database or self.database_name()
        return kwargs

    @property
    def read_urls(self) -> list[str]:
        """The replica URLs of DATABASE_READ_URL, in order (empty: every read goes to the primary)."""
        return _split_urls(self.database_read_url.get_secret_value()) if self.database_read_url else []

    def read_connect_kwargs(self, url: str) -> dict[str, Any]:
        """Keyword arguments for ``asyncpg.connect``/``create_pool`` to one replica URL. A URL without
        a database name reaches the database the primary's connections use."""
        kwargs: dict[str, Any] = {"timeout": self.connection_timeout_s, "dsn": url}
        if not self.named_statements:
            kwargs["statement_cache_size"] = 0
        if self.postgres_ssl != "disable":
            kwargs["ssl"] = self.ssl_context()
        if not urlsplit(url).path.lstrip("/"):
            kwargs["database"] = self.database_name()
        return kwargs

    @property
    def tcp_keepalives(self) -> tuple[int | None, int | None, int | None]:
        """POSTGRES_TCP_KEEPALIVES_IDLE, _INTERVAL, _COUNT (None: the system's value)."""
        return (
            self.postgres_tcp_keepalives_idle,
            self.postgres_tcp_keepalives_interval,
            self.postgres_tcp_keepalives_count,
        )

    def database_name(self) -> str:
        if self.database_url is not None:
            path = urlsplit(self.database_url.get_secret_value()).path.lstrip("/")
            return path or self.postgres_db
        return self.postgres_db

    def describe(self) -> dict[str, str]:
        """Every setting as text for display, with secrets hidden."""
        out: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                raw = value.get_secret_value()
                urls = ("database_url", "database_direct_url", "database_read_url", "redis_url")
                text = scrub(raw) if name in urls else ("***" if raw else "")
            elif value is None:
                text = "-"
            else:
                text = str(value)
            out[name.upper()] = text
        return out

    def __repr_args__(self) -> Any:
        # SecretStr already hides itself; scrub the rest in case a secret is embedded elsewhere.
        for key, value in super().__repr_args__():
            yield key, (scrub(value) if isinstance(value, str) else value)


def load_settings(**overrides: Any) -> Settings:
    """Build and validate the settings; raise ConfigurationError naming the first bad variable."""
    try:
        return Settings(**overrides)
    except PydanticValidationError as exc:
        problems = []
        first: str | None = None
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ()) if p != "__root__"]
            var = loc[0].upper() if loc else None
            first = first or var
            msg = err.get("msg", "invalid value").removeprefix("Value error, ")
            problems.append(f"{var}: {msg}" if var else msg)
        raise ConfigurationError("invalid configuration: " + "; ".join(problems), variable=first) from None

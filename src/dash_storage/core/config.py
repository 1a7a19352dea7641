"""Settings, read once from the environment and a ``.env`` file in the working directory.

The environment wins over ``.env``. Every value is validated when the settings are built; a bad
value raises :class:`~dash_storage.core.errors.ConfigurationError` naming the variable. Secrets
(POSTGRES_PASSWORD, DATABASE_URL, REDIS_URL credentials) never appear in ``repr()`` or messages.
"""

from __future__ import annotations

import ssl as ssl_module
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import platformdirs
from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic import ValidationError as PydanticValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from dash_storage.core.errors import ConfigurationError, register_secret, scrub

__all__ = ["SSL_MODES", "Settings", "load_settings"]

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


def _check_ca_file(path: Path, prefix: str = "") -> None:
    """A readable PEM file of CA certificates (else the first connect would fail with a raw error)."""
    if not path.is_file():
        raise ValueError(f"{prefix}must be an existing file")
    try:
        ssl_module.create_default_context(cafile=str(path))
    except (ssl_module.SSLError, OSError, ValueError):
        raise ValueError(f"{prefix}must be a readable PEM file of CA certificates") from None


def _url_param(url: str, name: str) -> str | None:
    """The last value of a query parameter of a DSN (as the driver reads it), or None."""
    values = parse_qs(urlsplit(url).query).get(name)
    return values[-1] if values else None


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
    dash_data_dir: Path = Field(default_factory=lambda: Path(platformdirs.user_data_dir("dash-storage")))
    dash_migrations_dir: Path | None = None
    redis_url: SecretStr = SecretStr("redis://localhost:6379/0")

    @field_validator("postgres_ssl")
    @classmethod
    def _check_ssl(cls, value: str) -> str:
        mode = _SSL_ALIASES.get(value.strip().lower(), value.strip().lower())
        if mode not in SSL_MODES:
            raise ValueError(f"must be true, false or one of {', '.join(SSL_MODES)}")
        return mode

    @field_validator("database_url")
    @classmethod
    def _check_url(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is None:
            return None
        url = value.get_secret_value()
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
            env_mode = info.data.get("postgres_ssl", "disable")
            if env_mode != "disable" and url_mode != env_mode:
                raise ValueError(
                    f"sslmode={url_mode} contradicts POSTGRES_SSL={env_mode}; set one of them, or the same "
                    "mode in both"
                )
        root_cert = _url_param(url, "sslrootcert")
        if root_cert is not None:
            _check_ca_file(Path(root_cert), "sslrootcert ")
        return value

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
        """POSTGRES_PASSWORD and the passwords inside DATABASE_URL and REDIS_URL."""
        urls = (self.database_url, self.redis_url)
        return [self.postgres_password.get_secret_value()] + [
            urlsplit(url.get_secret_value()).password for url in urls if url is not None
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

    def ssl_context(self) -> ssl_module.SSLContext | bool:
        """The ``ssl`` argument for asyncpg: False, or a context that verifies as the mode says.

        verify-full checks the chain and the host name, verify-ca the chain only, against
        POSTGRES_SSL_ROOT_CERT (else the ``sslrootcert`` of DATABASE_URL, else the system's CAs).
        require encrypts without verifying, unless a root certificate is given: then, as in libpq,
        it verifies the chain like verify-ca.
        """
        mode = self.postgres_ssl
        if mode == "disable":
            return False
        cafile = self._root_cert()
        ctx = ssl_module.create_default_context(cafile=cafile)
        if mode == "require" and cafile is None:
            # libpq semantics: encrypt, do not verify (chosen explicitly by the user).
            ctx.check_hostname = False
            ctx.verify_mode = ssl_module.CERT_NONE
        elif mode in ("require", "verify-ca"):
            ctx.check_hostname = False
            ctx.verify_mode = ssl_module.CERT_REQUIRED
        return ctx

    def _root_cert(self) -> str | None:
        if self.postgres_ssl_root_cert is not None:
            return str(self.postgres_ssl_root_cert)
        if self.database_url is not None:
            return _url_param(self.database_url.get_secret_value(), "sslrootcert")
        return None

    def connect_kwargs(self, *, database: str | None = None) -> dict[str, Any]:
        """Keyword arguments for ``asyncpg.connect``/``create_pool`` for the configured server."""
        kwargs: dict[str, Any] = {"timeout": self.connection_timeout_s}
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
                text = scrub(raw) if name in ("database_url", "redis_url") else ("***" if raw else "")
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

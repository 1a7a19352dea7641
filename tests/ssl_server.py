"""A throwaway PostgreSQL 15 cluster with TLS on, for the transport and secrets tests.

The embedded server is built without OpenSSL, so this uses the Debian binaries
(/usr/lib/postgresql/15/bin). It runs as the OS user ``postgres`` (initdb refuses root), listens on
127.0.0.1 only, on a free port, with a socket directory of its own, and accepts only TLS
connections with a password (scram-sha-256). Certificates are made here with the ``openssl`` CLI:

- ``ca.crt``: a self-signed test CA; ``server.crt`` is signed by it, CN and SAN ``localhost``
  (so host ``localhost`` matches and ``127.0.0.1`` does not);
- ``other-ca.crt``: an unrelated CA that signed nothing the server uses.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")
OS_USER = "postgres"
USER = "dash_tls"


@dataclass(frozen=True)
class TlsCluster:
    port: int
    user: str
    password: str
    ca: Path
    other_ca: Path
    root: Path


def unavailable_reason() -> str | None:
    """Why the cluster cannot be started here, or None."""
    for tool in ("initdb", "pg_ctl", "postgres"):
        if not (PG_BIN / tool).exists():
            return f"PostgreSQL 15 Debian binaries not found ({PG_BIN / tool} is missing)"
    if shutil.which("openssl") is None:
        return "the openssl command-line tool is not installed"
    if shutil.which("runuser") is None or os.geteuid() != 0:
        return "needs root and runuser to start a cluster as the OS user postgres"
    try:
        pwd.getpwnam(OS_USER)
    except KeyError:
        return "there is no OS user 'postgres' to run the cluster"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(*args: str | Path, cwd: Path | None = None, as_postgres: bool = False) -> None:
    cmd = [str(a) for a in args]
    if as_postgres:
        cmd = ["runuser", "-u", OS_USER, "--", *cmd]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")


def make_certificates(directory: Path) -> None:
    """ca.key/ca.crt, server.key/server.crt (signed by ca, CN/SAN localhost), other-ca.crt."""
    ossl = "openssl"
    for ca in ("ca", "other-ca"):
        _run(
            ossl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", f"/CN=dash-storage test {ca}", "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=directory,
        )  # fmt: skip
    _run(
        ossl, "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
        "-keyout", "server.key", "-out", "server.csr", cwd=directory,
    )  # fmt: skip
    (directory / "server.ext").write_text(
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
    )
    _run(
        ossl, "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "server.ext", "-out", "server.crt", cwd=directory,
    )  # fmt: skip


@contextmanager
def tls_cluster(password: str) -> Iterator[TlsCluster]:
    """Start the cluster (superuser ``dash_tls`` with ``password``); stop it and remove its files after."""
    root = Path(tempfile.mkdtemp(prefix="dash_test_tls_"))
    pgdata = root / "pgdata"
    port = _free_port()
    started = False
    try:
        make_certificates(root)
        pwfile = root / "pwfile"
        pwfile.write_text(password + "\n")
        uid, gid = pwd.getpwnam(OS_USER).pw_uid, pwd.getpwnam(OS_USER).pw_gid
        os.chown(root, uid, gid)
        for item in root.iterdir():
            os.chown(item, uid, gid)
        _run(
            PG_BIN / "initdb", "-D", pgdata, "-U", USER, "--pwfile", pwfile, "-A", "scram-sha-256",
            "--no-sync", as_postgres=True,
        )  # fmt: skip
        for name in ("server.crt", "server.key"):
            shutil.copy(root / name, pgdata / name)
            os.chown(pgdata / name, uid, gid)
        os.chmod(pgdata / "server.key", 0o600)
        with open(pgdata / "postgresql.conf", "a") as conf:
            conf.write(
                f"\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{root}'\n"
                "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n"
                "fsync = off\nshared_buffers = 16MB\nmax_connections = 20\n"
            )
        # TLS only: a plain connection is refused, so a successful connect proves encryption.
        (pgdata / "pg_hba.conf").write_text(
            "local all all scram-sha-256\n"
            "hostssl all all 127.0.0.1/32 scram-sha-256\n"
            "hostnossl all all 127.0.0.1/32 reject\n"
        )
        _run(
            PG_BIN / "pg_ctl", "-D", pgdata, "-l", root / "server.log", "-w", "-t", "60", "start",
            as_postgres=True,
        )  # fmt: skip
        started = True
        yield TlsCluster(port, USER, password, root / "ca.crt", root / "other-ca.crt", root)
    finally:
        if started:
            _run(PG_BIN / "pg_ctl", "-D", pgdata, "-m", "immediate", "-w", "stop", as_postgres=True)
        shutil.rmtree(root, ignore_errors=True)

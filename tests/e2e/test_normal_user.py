"""The embedded default also works for an ordinary (non-root) user.

CI runs as root, so this test installs the package for the unprivileged ``nobody`` user with the
system Python (root's own interpreter lives in a private home), then runs ``dash-db`` as that user:
the embedded server starts under the user's own data dir, migrations apply, and it stops again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.embedded

ROOT = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = Path("/usr/bin/python3")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="needs root to switch to another user")
@pytest.mark.skipif(
    not SYSTEM_PYTHON.exists() or shutil.which("runuser") is None, reason="needs /usr/bin/python3 and runuser"
)
def test_embedded_server_as_an_unprivileged_user() -> None:
    # Not pytest's tmp_path: root's pytest folder is private; the other user must reach this one.
    tmp_path = Path(tempfile.mkdtemp(prefix="dash-normal-user-"))
    try:
        _install_and_run_as_nobody(tmp_path)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _install_and_run_as_nobody(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    # Wheels of the project and its dependencies, from root's pip cache (no extra downloads), built
    # by the interpreter that installs them when it has pip: dependencies chosen by environment
    # markers (such as python_full_version) must be the ones that interpreter needs.
    has_pip = subprocess.run([SYSTEM_PYTHON, "-m", "pip", "--version"], capture_output=True, check=False)
    builder = str(SYSTEM_PYTHON) if has_pip.returncode == 0 else sys.executable
    subprocess.run(
        [builder, "-m", "pip", "wheel", "--quiet", "-w", str(wheels), str(ROOT)],
        check=True,
        timeout=600,
    )
    home = tmp_path / "home"
    home.mkdir()
    shutil.chown(home, "nobody")
    tmp_path.chmod(0o755)
    wheels.chmod(0o755)
    script = (
        f"cd {home} && {SYSTEM_PYTHON} -m venv venv && "
        f"venv/bin/pip install --quiet --no-index --find-links {wheels} dash-storage && "
        "venv/bin/dash-db doctor --json > doctor.json && venv/bin/dash-db migrate && "
        "venv/bin/dash-db migrate status --json > status.json && venv/bin/dash-db down --json > down.json"
    )
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PIP_NO_CACHE_DIR": "1"}
    done = subprocess.run(
        [str(shutil.which("runuser")), "-u", "nobody", "--", "env", f"HOME={home}", "bash", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    outputs = {p.name: p.read_text() for p in home.glob("*.json")}
    assert done.returncode == 0, (done.stdout, done.stderr, outputs)
    import json

    doctor = json.loads((home / "doctor.json").read_text())
    assert doctor["target"] == "embedded" and doctor["connected"] is True
    assert doctor["settings"]["DASH_DATA_DIR"].startswith(str(home))
    assert {m["state"] for m in json.loads((home / "status.json").read_text())} == {"applied"}
    assert json.loads((home / "down.json").read_text())["stopped"] is True
    pgdata = home / ".local" / "share" / "dash-storage" / "pgdata"
    assert pgdata.is_dir() and pgdata.stat().st_uid == home.stat().st_uid

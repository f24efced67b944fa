"""A private PostgreSQL cluster for the tests: Debian's server binaries, a temporary directory,
127.0.0.1 on a free port, password authentication (so that the password reference is really
used), stopped and removed afterwards.  Skipped, with the reason, where the binaries are not
installed (``apt-get install postgresql``; ``.ci/run`` does it)."""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@dataclass
class Cluster:
    port: int
    password: str
    password_file: Path

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=herder dbname=postgres"

    def connect(self) -> Any:
        import psycopg

        return psycopg.connect(self.dsn, password=self.password, autocommit=True)

    def terminate(self, application_name: str = "herder") -> int:
        """End every session of ``application_name`` as a database restart would."""
        with self.connect() as admin:
            rows = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s AND pid <> pg_backend_pid()",
                (application_name,),
            ).fetchall()
        return len(rows)


def _bin_dir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(found[-1]) if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    bin_dir = _bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    as_user: list[str] = []
    owner = None
    if os.geteuid() == 0:
        # initdb refuses to run as root: run the server as Debian's postgres user.
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run the server as")
        as_user = ["runuser", "-u", "postgres", "--"]
    base = Path(tempfile.mkdtemp(prefix="herder-pg-"))
    password = secrets.token_urlsafe(16)
    pwfile = base / "pw"
    pwfile.write_text(password + "\n")
    if owner is not None:
        os.chown(base, owner.pw_uid, owner.pw_gid)
        os.chown(pwfile, owner.pw_uid, owner.pw_gid)
    os.chmod(pwfile, 0o600)
    data = base / "data"
    port = _free_port()

    def run(*args: str) -> None:
        subprocess.run([*as_user, *args], check=True, capture_output=True, timeout=120)

    run(
        f"{bin_dir}/initdb",
        "-D",
        str(data),
        "-A",
        "scram-sha-256",
        "-U",
        "herder",
        f"--pwfile={pwfile}",
    )
    run(
        f"{bin_dir}/pg_ctl",
        "-D",
        str(data),
        "-o",
        f"-h 127.0.0.1 -p {port} -k {base}",
        "-l",
        str(base / "log"),
        "-w",
        "start",
    )
    try:
        yield Cluster(port, password, pwfile)
    finally:
        subprocess.run(
            [*as_user, f"{bin_dir}/pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def schema_name() -> str:
    """A schema of its own for each test: every test starts on an empty queue."""
    return f"t_{secrets.token_hex(6)}"


@pytest.fixture
def pg_password(pg_cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> str:
    """The name of the environment variable holding the password."""
    monkeypatch.setenv("HERDER_TEST_PG_PASSWORD", pg_cluster.password)
    return "HERDER_TEST_PG_PASSWORD"


@pytest.fixture
def pg_params(
    pg_cluster: Cluster, pg_password: str, schema_name: str
) -> Callable[..., dict[str, Any]]:
    """``queue.backend_parameters`` for the test cluster and the test's schema."""

    def make(**extra: Any) -> dict[str, Any]:
        return {
            "dsn": pg_cluster.dsn,
            "password": {"env": pg_password},
            "schema_name": schema_name,
            "connect_timeout": 5,
            **extra,
        }

    return make

"""Two `herder serve` on one PostgreSQL queue, end to end: one dispatches, the other serves the
API and waits; a container submitted to the standby runs on the leader; when the leader is
SIGKILLed the standby takes the dispatch lock and runs the next one.

Each server is a separate process with its own data directory and simulated cloud (the ``sim``
driver, in memory), driven through the CLI as a person would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

HERDER = [sys.executable, "-m", "herder.app.cli"]

CONFIG = """
cluster_id: pgsb1
cloud:
  driver: sim
  driver_parameters: {{seed: 1, boot_delay: [0.2, 0.5]}}
  deploy_public_key: false
  poll_interval: 0.5s
  probe_interval: 0.5s
  sync_interval: 1s
  timeout_idle: 30s
containers:
  stale_lock_timeout: 2s
instance_types:
  small: {{vcpus: 2, ram: 4GiB, price: 0.1}}
queue:
  backend: postgres
  backend_parameters:
    dsn: "{dsn}"
    password: {{env: {password_env}}}
    schema_name: {schema}
    standby: true
    lease: 1s
api:
  listen: 127.0.0.1:0
  management_token: standby-test-token
"""


class Server:
    """A running `herder serve` and the CLI pointed at it."""

    def __init__(self, tmp_path: Path, name: str, config: str, env: dict[str, str]) -> None:
        self.data_dir = tmp_path / name
        self.config = tmp_path / f"{name}.yaml"
        self.config.write_text(config)
        self.log_path = tmp_path / f"{name}.log"
        self.env = {**env, "HERDER_DATA_DIR": str(self.data_dir)}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        client_file = self.data_dir / "client.json"
        client_file.unlink(missing_ok=True)  # left by an earlier life of this server
        args = [*HERDER, "serve", "--config", str(self.config)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args, env=self.env, stdout=log, stderr=log, start_new_session=True
            )
        self.wait_for(client_file.exists, "the API to start")
        info = json.loads(client_file.read_text())
        self.env["HERDER_SERVER"] = info["url"]
        self.env["HERDER_MANAGEMENT_TOKEN"] = info["token"]

    def wait_for(self, ready: Callable[[], bool], what: str, timeout: float = 30) -> float:
        """Poll ``ready`` (this is a test of separate processes); the seconds it took."""
        start = time.monotonic()
        while not ready():
            assert self.proc is not None and self.proc.poll() is None, self.log()
            assert time.monotonic() - start < timeout, f"waited for {what}:\n{self.log()}"
            time.sleep(0.05)
        return time.monotonic() - start

    def log(self) -> str:
        return self.log_path.read_text()

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*HERDER, *args], env=self.env, capture_output=True, text=True, timeout=120
        )


@pytest.fixture
def servers(
    tmp_path: Path, pg_params: Callable[..., dict[str, Any]], pg_password: str
) -> Iterator[tuple[Server, Server]]:
    params = pg_params()
    config = CONFIG.format(
        dsn=params["dsn"], password_env=pg_password, schema=params["schema_name"]
    )
    env = dict(os.environ)
    pair = (Server(tmp_path, "a", config, env), Server(tmp_path, "b", config, env))
    try:
        yield pair
    finally:
        for server in pair:
            if server.proc is not None and server.proc.poll() is None:
                os.killpg(server.proc.pid, signal.SIGKILL)
                server.proc.wait(timeout=30)


def test_the_standby_serves_the_api_then_takes_over(
    servers: tuple[Server, Server], pg_cluster: Any
) -> None:
    leader, standby = servers
    leader.start()
    leader.wait_for(lambda: "holding the dispatch lock" in leader.log(), "the lock")
    standby.start()
    standby.wait_for(lambda: "standby: waiting" in standby.log(), "the standby")

    first = standby.cli("submit", "--wait", "--", "echo", "one")
    assert first.returncode == 0, first.stdout + first.stderr + standby.log()
    assert "holding the dispatch lock" not in standby.log()
    assert "echo one" in leader.log() or "one" in first.stdout

    assert leader.proc is not None
    os.killpg(leader.proc.pid, signal.SIGKILL)
    took = standby.wait_for(
        lambda: "holding the dispatch lock" in standby.log(), "the takeover", timeout=20
    )
    print(f"takeover after {took:.1f}s")  # reported with -s
    second = standby.cli("submit", "--wait", "--", "echo", "two")
    assert second.returncode == 0, second.stdout + second.stderr + standby.log()
    items = json.loads(standby.cli("containers", "--json").stdout)
    assert sorted(c["state"] for c in items) == ["Complete", "Complete"]
    assert pg_cluster.password not in leader.log() + standby.log()


def test_a_dispatcher_that_loses_the_database_stops_at_once(
    servers: tuple[Server, Server], pg_cluster: Any
) -> None:
    """The dispatch lock's connection is cut (as a database restart or a network cut would):
    the dispatcher halts and exits with the reason, and the standby takes over."""
    leader, standby = servers
    leader.start()
    leader.wait_for(lambda: "holding the dispatch lock" in leader.log(), "the lock")
    standby.start()
    standby.wait_for(lambda: "standby: waiting" in standby.log(), "the standby")
    assert pg_cluster.terminate("herder-dispatch-lock") == 2  # the holder's and the waiter's
    assert leader.proc is not None
    assert leader.proc.wait(timeout=30) == 1
    log = leader.log()
    assert "lost the dispatch lock" in log and "stopping dispatching at once" in log
    assert "start herder again to wait as the standby" in log
    standby.wait_for(lambda: "holding the dispatch lock" in standby.log(), "the takeover")
    done = standby.cli("submit", "--wait", "--", "echo", "after")
    assert done.returncode == 0, done.stdout + done.stderr + standby.log()

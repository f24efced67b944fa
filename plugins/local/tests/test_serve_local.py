"""`herder serve` with `dispatcher: local`, end to end: no SSH, no cloud driver.

`herder serve` runs as a separate process with its own data directory and is driven through
the CLI, as a person would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

HERDER = [sys.executable, "-m", "herder.app.cli"]

CONFIG = """
cluster_id: loc01
dispatcher: local
dispatcher_parameters:
  vcpus: 2
  ram: 2GiB
  state_dir: {state_dir}
  probe_interval: 0.2s
  poll_period: 5s
cloud:
  deploy_public_key: false
containers:
  runtime_engine: process
queue:
  path: {db}
api:
  listen: 127.0.0.1:0
  management_token: local-secret-token
"""


class Server:
    """A running `herder serve` and the CLI pointed at it."""

    def __init__(self, tmp_path: Path) -> None:
        self.data_dir = tmp_path / "data"
        self.config = tmp_path / "herder.yaml"
        self.config.write_text(
            CONFIG.format(state_dir=tmp_path / "runner", db=tmp_path / "herder.db")
        )
        self.log_path = tmp_path / "serve.log"
        self.env = {**os.environ, "HERDER_DATA_DIR": str(self.data_dir)}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        client_file = self.data_dir / "client.json"
        client_file.unlink(missing_ok=True)
        args = [*HERDER, "serve", "--config", str(self.config), "--listen", "127.0.0.1:0"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args, env=self.env, stdout=log, stderr=log, start_new_session=True
            )
        deadline = time.monotonic() + 30
        while not client_file.exists():
            assert self.proc.poll() is None, self.log_path.read_text()
            assert time.monotonic() < deadline, self.log_path.read_text()
            time.sleep(0.05)
        info = json.loads(client_file.read_text())
        self.env["HERDER_SERVER"] = info["url"]
        self.env["HERDER_MANAGEMENT_TOKEN"] = info["token"]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*HERDER, *args], env=self.env, capture_output=True, text=True, timeout=120
        )

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    server = Server(tmp_path)
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.stop(signal.SIGKILL)


def test_serve_local_runs_containers_to_completion(server: Server) -> None:
    result = server.cli("submit", "--wait", "--", "sh", "-c", "echo hello local; exit 3")
    assert result.returncode == 3, result
    assert "hello local" in result.stdout + result.stderr
    ok = server.cli("submit", "--wait", "--", "sh", "-c", "echo fine")
    assert ok.returncode == 0, ok
    items = json.loads(server.cli("containers", "--json").stdout)
    outcomes = sorted((c["state"], c["exit_code"]) for c in items)
    assert outcomes == [("Complete", 0), ("Complete", 3)]
    log = server.log_path.read_text()
    assert "dispatcher local" in log
    assert "ssh" not in log.lower()
    assert server.stop() == 0


def test_serve_local_has_no_instance_routes(server: Server) -> None:
    result = server.cli("instances", "--json")
    assert result.returncode != 0


def wait_for_state(server: Server, uuid: str, state: str, seconds: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + seconds
    while True:
        ctr: dict[str, object] = json.loads(server.cli("containers", "--json").stdout)
        found = [c for c in ctr if c["uuid"] == uuid]  # type: ignore[index]
        if found and found[0]["state"] == state:
            return found[0]  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, found
        time.sleep(0.1)


def test_containers_survive_a_restart_of_serve(server: Server) -> None:
    uuid = server.cli("submit", "--", "sh", "-c", "sleep 1; echo survived; exit 4").stdout.strip()
    wait_for_state(server, uuid, "Running")
    assert server.stop() == 0
    server.start()  # takes the Running container up again and collects its exit
    done = wait_for_state(server, uuid, "Complete")
    assert done["exit_code"] == 4
    assert "survived" in server.cli("logs", uuid).stdout

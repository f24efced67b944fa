"""End to end: ``herder serve`` with the libcloud bridge over libcloud's dummy provider runs a
container (each dummy node is backed by an SSH server on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CONFIG = """
cluster_id: lcdum
containers:
  runtime_engine: process
cloud:
  driver: libcloud
  driver_parameters:
    provider: dummy
    key: {{env: HERDER_TEST_DUMMY_ACCOUNT}}
  deploy_runner_directory: {tmp}/runner-bin
  probe_interval: 0.2s
  sync_interval: 0.5s
  timeout_idle: 1s
  timeout_booting: 30s
queue:
  path: {tmp}/herder.db
api:
  listen: 127.0.0.1:{port}
  management_token: libcloud-token-for-tests
instance_types:
  small:
    provider_type: "1"
    vcpus: 1
    ram: 1GiB
    price: 0.01
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/api/v1/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _herder(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "herder.app.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_herder_plugins_lists_the_libcloud_driver() -> None:
    result = _herder("plugins", "--json", env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    names = {p["name"] for p in json.loads(result.stdout)}
    assert "libcloud" in names


def test_herder_serve_runs_a_container_on_the_dummy_provider(tmp_path: Path) -> None:
    port = _free_port()
    config = tmp_path / "herder.yaml"
    config.write_text(CONFIG.format(tmp=tmp_path, port=port))
    data = tmp_path / "data"
    url = f"http://127.0.0.1:{port}"
    environ = {
        **os.environ,
        "HERDER_DATA_DIR": str(data),
        "HERDER_SERVER": url,
        "HERDER_MANAGEMENT_TOKEN": "libcloud-token-for-tests",
        "HERDER_TEST_DUMMY_ACCOUNT": "0",
    }
    check = _herder("config", "check", str(config), env=environ)
    assert check.returncode == 0, check.stdout + check.stderr
    log_path = tmp_path / "serve.log"
    log = open(log_path, "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "herder.app.cli",
            "--log-format",
            "json",
            "serve",
            "--config",
            str(config),
            "--data-dir",
            str(data),
        ],
        env=environ,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not _healthy(url):
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "herder serve did not start"
            time.sleep(0.1)
        result = _herder(
            "submit",
            "--wait",
            "--vcpus",
            "1",
            "--ram",
            "256MiB",
            "--",
            "sh",
            "-c",
            "echo hello-from-libcloud; exit 3",
            env=environ,
            timeout=90,
        )
        assert result.returncode == 3, result.stdout + result.stderr + log_path.read_text()
        assert "hello-from-libcloud" in result.stdout + result.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()

"""The driver authors' kit, end to end: the template package, as a third party would use it.

A copy of ``examples/herder-driver-example`` is installed into a fresh virtual environment
(which sees the workspace's packages through a ``.pth`` file, so nothing is downloaded and the
workspace environment is not changed).  Then, with that environment's Python: ``herder plugins``
lists the driver, a configuration selecting it validates, the template's own tests (the
conformance suite) pass, and ``herder serve`` runs a container on an instance of the driver.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "examples" / "herder-driver-example"

CONFIG = """
cluster_id: kit01
containers:
  runtime_engine: process
cloud:
  driver: example
  driver_parameters:
    max_instances: 2
  deploy_runner_directory: {tmp}/runner-bin
  probe_interval: 0.2s
  sync_interval: 0.5s
  timeout_idle: 1s
  timeout_booting: 30s
queue:
  path: {tmp}/herder.db
api:
  listen: 127.0.0.1:{port}
  management_token: kit-token-for-tests
instance_types:
  small:
    provider_type: ex.small
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


class Env:
    """A virtual environment with the template installed; runs commands with its Python."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.python = root / "bin" / "python"

    def run(
        self,
        *args: str,
        cwd: Path | None = None,
        timeout: float = 60,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.python), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            env=env,
        )

    def herder(self, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return self.run("-m", "herder.app.cli", *args, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Env, Path]]:
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is needed to install the template package")
    tmp = tmp_path_factory.mktemp("kit")
    package = tmp / "herder-driver-example"
    shutil.copytree(TEMPLATE, package, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    env_root = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env_root)
    env = Env(env_root)
    site = env.run("-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    workspace_site = sysconfig.get_paths()["purelib"]
    Path(site.stdout.strip(), "workspace.pth").write_text(
        f"import site; site.addsitedir({workspace_site!r})\n"
    )
    command = [uv, "pip", "install", "--python", str(env.python), "--no-deps", str(package)]
    # The build backend is normally in uv's cache already (the workspace is built with it);
    # only if it is not is the index asked.
    install = subprocess.run([*command, "--offline"], capture_output=True, text=True, timeout=120)
    if install.returncode != 0:
        install = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    yield env, package


def test_herder_plugins_lists_the_installed_driver(kit: tuple[Env, Path]) -> None:
    env, _ = kit
    result = env.herder("plugins", "--json")
    assert result.returncode == 0, result.stderr
    plugins = {p["name"]: p for p in json.loads(result.stdout)}
    example = plugins["example"]
    assert example["distribution"] == "herder-driver-example"
    assert example["version"] == "0.1.0"
    assert [(r["kind"], r["name"]) for r in example["registrations"]] == [("driver", "example")]
    # The workspace itself does not have it: the install went into the new environment only.
    here = subprocess.run(
        [sys.executable, "-m", "herder.app.cli", "plugins", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "example" not in {p["name"] for p in json.loads(here.stdout)}


def test_a_config_selecting_the_driver_validates(kit: tuple[Env, Path], tmp_path: Path) -> None:
    env, _ = kit
    good = tmp_path / "good.yaml"
    good.write_text(CONFIG.format(tmp=tmp_path, port=_free_port()))
    result = env.herder("config", "check", str(good))
    assert result.returncode == 0, result.stdout + result.stderr
    bad = tmp_path / "bad.yaml"
    text = CONFIG.format(tmp=tmp_path, port=_free_port())
    bad.write_text(text.replace("max_instances: 2", "max_instance: 2"))
    result = env.herder("config", "check", str(bad))
    assert result.returncode != 0
    assert "max_instance" in result.stdout + result.stderr


def test_the_template_passes_the_conformance_suite(kit: tuple[Env, Path]) -> None:
    env, package = kit
    result = env.run(
        "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", cwd=package, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " failed" not in result.stdout and "passed" in result.stdout
    # Capabilities the example does not declare are skipped, with the reason, not failed.
    assert "does not declare the 'capacity_errors' capability" in result.stdout


def test_herder_serve_runs_a_container_on_the_driver(kit: tuple[Env, Path], tmp_path: Path) -> None:
    env, _ = kit
    port = _free_port()
    config = tmp_path / "herder.yaml"
    config.write_text(CONFIG.format(tmp=tmp_path, port=port))
    data = tmp_path / "data"
    url = f"http://127.0.0.1:{port}"
    environ = {
        **os.environ,
        "HERDER_DATA_DIR": str(data),
        "HERDER_SERVER": url,
        "HERDER_MANAGEMENT_TOKEN": "kit-token-for-tests",
    }
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [
            str(env.python),
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
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "herder serve did not start"
            time.sleep(0.1)
        result = env.herder(
            "submit",
            "--wait",
            "--vcpus",
            "1",
            "--ram",
            "256MiB",
            "--",
            "sh",
            "-c",
            "echo hello-from-example; exit 3",
            env=environ,
            timeout=60,
        )
        assert result.returncode == 3, result.stdout + result.stderr
        assert "hello-from-example" in result.stdout + result.stderr
        serve_log = (tmp_path / "serve.log").read_text()
        assert "example instance ex-" in serve_log
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()

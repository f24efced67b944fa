"""`herder serve` on the loopback driver, reaching its instances through a bastion.

The bastion is herder's in-process SSH server run by this test (a separate process from the
dispatcher), forwarding ``direct-tcpip`` channels; it records every destination it was asked
for, so the test sees each instance connection go through it.  It then goes away and comes back
on the same port with the same host key, and work resumes.
"""

from __future__ import annotations

import getpass
import json
import os
import signal
import time
from pathlib import Path

from herder.ssh.server import LocalSSHServer, generate_key, generate_key_file

from .test_serve_loopback import Server, _cleanup_runner_processes, _submit, _wait_final

CONFIG = """
cluster_id: e2eb1
containers:
  dispatch_private_key: {key}
cloud:
  driver: loopback
  driver_parameters:
    max_instances: 2
    state_dir: {state_dir}
  deploy_runner_directory: {state_dir}/runner-bin
  probe_interval: 0.3s
  sync_interval: 1s
  timeout_idle: 30s
  timeout_booting: 60s
  ssh:
    bastion_host: 127.0.0.1
    bastion_port: {port}
    bastion_host_key: {host_key}
    connect_timeout: 10s
    keepalive_interval: 5s
    bastion_retry_max: 2s
queue:
  path: {db}
api:
  listen: 127.0.0.1:0
  management_token: e2e-secret-token-{marker}
instance_types:
  local:
    vcpus: 2
    ram: 2GiB
    price: 0.1
"""


def _forward_on_loopback(host: str, port: int) -> tuple[str, int] | None:
    return (host, port) if host.startswith("127.") else None


def test_containers_run_through_a_bastion_that_goes_away_and_comes_back(
    tmp_path: Path,
) -> None:
    marker = f"m{os.getpid()}x{time.monotonic_ns()}"
    key = tmp_path / "dispatch_key"
    _, public = generate_key_file(key)
    host_key, host_key_line = generate_key()
    bastion = LocalSSHServer(host_key, [public], forward_to=_forward_on_loopback)
    bastion.start()
    port = int(bastion.address.rsplit(":", 1)[1])
    config = tmp_path / "herder.yaml"
    config.write_text(
        CONFIG.format(
            key=key,
            state_dir=tmp_path / "loopback",
            port=port,
            host_key=host_key_line,
            db=tmp_path / "herder.db",
            marker=marker,
        )
    )
    server = Server(tmp_path / "data", config, tmp_path / "serve.log")
    try:
        server.start()
        out = tmp_path / "out"
        out.mkdir()
        uuids = [_submit(server, "sh", "-c", f"echo {i} > {out}/{i} # {marker}") for i in range(3)]
        states = _wait_final(server, uuids, timeout=180)
        assert {s["state"] for s in states.values()} == {"Complete"}, states
        assert sorted(p.name for p in out.iterdir()) == ["0", "1", "2"]
        assert bastion.connections_accepted == 1  # one shared connection for every instance
        assert bastion.forwarded, "no instance connection went through the bastion"

        bastion.stop()
        later = _submit(server, "sh", "-c", f"echo later > {out}/later # {marker}")
        deadline = time.monotonic() + 60
        # The bastion's failure shows in the log and in the status of the instances behind it.
        while not (
            any(
                f"127.0.0.1:{port}" in m and "next attempt" in m
                for m in (str(line.get("message", "")) for line in server.log_lines())
            )
            and any(
                f"bastion {getpass.getuser()}@127.0.0.1:{port}" in i["probe_error"]
                for i in json.loads(server.cli("instances", "--json").stdout)
            )
        ):
            assert time.monotonic() < deadline, server.log_path.read_text()[-3000:]
            time.sleep(0.3)

        bastion = LocalSSHServer(host_key, [public], port=port, forward_to=_forward_on_loopback)
        bastion.start()
        states = _wait_final(server, [later], timeout=120)
        assert states[later]["state"] == "Complete", states
        assert (out / "later").read_text() == "later\n"
        assert bastion.connections_accepted >= 1
        assert server.stop() == 0
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.stop(signal.SIGKILL)
        bastion.stop()
        _cleanup_runner_processes(marker)

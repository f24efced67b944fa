"""SSH at scale: what N connected, idle instances cost the dispatcher's SSH path.

    uv run python benchmarks/ssh_scale.py --instances 250
    uv run python benchmarks/ssh_scale.py --instances 1000 --measure 30

The instances live in a *separate* process (``ssh_scale.py serve``, started by the script): one
paramiko SSH server per instance on 127.0.0.1, each with its own host key and runner directory,
whose ``herder-runner --serve`` is emulated in that process (a thread answering the resident
runner protocol: ``--list`` says "nothing running").  So the figures measure herder alone.

This process plays the dispatcher's SSH path with herder's real classes: per instance one
:class:`~herder.ssh.executor.SSHExecutor` (one connection, the host key verified against the
instance's own) and one :class:`~herder.worker.runner_client.RunnerClient` holding the resident
runner stream; then ``--list`` probes at ``--probe-interval`` (10 s, the default), spread
evenly, at most ``--max-probes-per-second`` (sized for N: N / interval x 1.2), on a pool of
``--probe-threads`` threads as the runtime's pool would.  It reports:

* ``connect``: seconds until every instance is connected, verified and its resident runner
  answered a first ``--list`` (what a restart must do before all are adopted and probed), with
  ``--connect-threads`` in parallel;
* RSS and threads of this process before and after, per instance;
* CPU (user+system) per wall second while idle and probing, as % of one core.

Not covered yet: the pool, scheduler and queue (the full ``Dispatcher``) above the SSH path,
and a bastion in between.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from herder import runner_protocol
from herder.cloud import HostKey, HostKeyMismatch, Instance, RemoteRunner
from herder.config import Config
from herder.runtime import VirtualRuntime
from herder.ssh.executor import SSHExecutor
from herder.ssh.server import (
    ExecRequest,
    Handler,
    LocalSSHServer,
    generate_key,
    generate_key_file,
)
from herder.worker.runner_client import RunnerClient

RUNNER = "herder-runner"

# --------------------------------------------------------------------------- the instances


def emulated_runner(directory: Path) -> Handler:
    """A handler: ``--serve`` answers every verb with "nothing here"; anything else succeeds."""

    def handle(request: ExecRequest) -> int:
        if not request.command.endswith("--serve"):
            return 0
        buffer = b""
        while True:
            data = request.read_stdin()
            if not data:
                return 0
            buffer += data
            while b"\n" in buffer:
                line, _, buffer = buffer.partition(b"\n")
                req = json.loads(line)
                empty = base64.b64encode(b"").decode()
                answer = {"id": req["id"], "status": 0, "stdout": empty, "stderr": empty}
                request.write_stdout(json.dumps(answer).encode() + b"\n")

    directory.mkdir(parents=True, exist_ok=True)
    return handle


def serve(count: int, workdir: Path, authorized: str, ready: Path) -> None:
    """Start ``count`` instances, write their addresses and host keys, then wait for stdin EOF."""
    logging.disable(logging.CRITICAL)
    servers, listing = [], []
    for i in range(count):
        host_key, host_line = generate_key()
        server = LocalSSHServer(
            host_key, [authorized], emulated_runner(workdir / f"i{i}" / "runner"), strip_sudo=True
        )
        server.start()
        servers.append(server)
        listing.append({"address": server.address, "host_key": host_line})
    tmp = ready.with_suffix(".tmp")
    tmp.write_text(json.dumps(listing))
    tmp.rename(ready)
    sys.stdin.read()  # the parent closes our stdin when it is done
    os._exit(0)  # tearing 2,000 servers down one by one measures nothing


# --------------------------------------------------------------------------- the dispatcher side


class BenchInstance(Instance):
    def __init__(self, index: int, address: str, host_line: str) -> None:
        self._id = f"i-{index}"
        self._address = address
        self._blob = base64.b64decode(host_line.split()[1])

    @property
    def id(self) -> str:
        return self._id

    @property
    def provider_type(self) -> str:
        return "bench"

    @property
    def address(self) -> str:
        return self._address

    @property
    def remote_user(self) -> str:
        return "root"

    @property
    def tags(self) -> dict[str, str]:
        return {}

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def destroy(self) -> None:
        pass

    def verify_host_key(self, key: HostKey, remote: RemoteRunner) -> None:
        if key.blob != self._blob:
            raise HostKeyMismatch(f"host key of {self._id} does not match")


def proc_status() -> tuple[int, int]:
    """(RSS in KiB, threads) of this process, from /proc."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]), int(fields["Threads"])


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="mode")
    srv = sub.add_parser("serve")
    srv.add_argument("--instances", type=int, required=True)
    srv.add_argument("--dir", type=Path, required=True)
    srv.add_argument("--authorized", required=True)
    srv.add_argument("--ready", type=Path, required=True)
    ap.add_argument("--instances", type=int, default=250)
    ap.add_argument("--probe-interval", type=float, default=10.0)
    ap.add_argument("--max-probes-per-second", type=float, default=0.0, help="0: N/interval x1.2")
    ap.add_argument("--probe-threads", type=int, default=16)
    ap.add_argument("--connect-threads", type=int, default=32)
    ap.add_argument("--measure", type=float, default=30.0, help="seconds of idle probing measured")
    args = ap.parse_args()
    if args.mode == "serve":
        serve(args.instances, args.dir, args.authorized, args.ready)
        return
    logging.disable(logging.WARNING)
    n = args.instances
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        key = work / "id_ed25519"
        _, public = generate_key_file(key)
        ready = work / "ready.json"
        proc = subprocess.Popen(  # noqa: S603 -- this script, by its own path
            [
                sys.executable,
                __file__,
                "serve",
                "--instances",
                str(n),
                "--dir",
                str(work),
                "--authorized",
                public,
                "--ready",
                str(ready),
            ],
            stdin=subprocess.PIPE,
        )
        try:
            while not ready.exists():
                if proc.poll() is not None:
                    raise SystemExit("the instance server process died")
                time.sleep(0.2)
            run(args, key, json.loads(ready.read_text()))
        finally:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(timeout=60)


def run(args: argparse.Namespace, key: Path, listing: list[dict[str, str]]) -> None:
    n = len(listing)
    config = Config.model_validate(
        {"containers": {"dispatch_private_key": str(key)}, "cloud": {"timeout_command": 60}}
    )
    runtime = VirtualRuntime()
    rss0, threads0 = proc_status()
    clients: list[RunnerClient] = []
    executors: list[SSHExecutor] = []
    for i, item in enumerate(listing):
        executor = SSHExecutor(BenchInstance(i, item["address"], item["host_key"]), config, runtime)
        executors.append(executor)
        clients.append(
            RunnerClient(
                executor,
                command=RUNNER,
                remote_user=lambda: "root",
                resident=True,
                now=time.monotonic,
                name=f"runner-{i}",
            )
        )
    argv = runner_protocol.list_argv()

    def probe(client: RunnerClient) -> bool:
        try:
            return client.call(argv, None, 60).ok and client.resident
        except Exception:
            return False

    start = time.monotonic()
    with ThreadPoolExecutor(args.connect_threads) as pool:
        connected = sum(pool.map(probe, clients))
    connect_time = time.monotonic() - start
    rss1, threads1 = proc_status()

    rate = args.max_probes_per_second or n / args.probe_interval * 1.2
    spacing = max(args.probe_interval / n, 1.0 / rate)
    failures = 0
    probes = 0

    def done(ok: bool) -> None:
        nonlocal failures
        if not ok:
            failures += 1

    with ThreadPoolExecutor(args.probe_threads) as pool:
        cpu0, wall0 = cpu_seconds(), time.monotonic()
        next_at = wall0
        while time.monotonic() - wall0 < args.measure:
            client = clients[probes % n]
            pool.submit(probe, client).add_done_callback(lambda f: done(f.result()))
            probes += 1
            next_at += spacing
            time.sleep(max(0.0, next_at - time.monotonic()))
        cpu1, wall1 = cpu_seconds(), time.monotonic()
    rss2, threads2 = proc_status()
    idle_cpu = (cpu1 - cpu0) / (wall1 - wall0)
    print(
        json.dumps(
            {
                "instances": n,
                "connected": connected,
                "connect_seconds": round(connect_time, 1),
                "rss_before_mib": round(rss0 / 1024, 1),
                "rss_connected_mib": round(rss1 / 1024, 1),
                "rss_after_probing_mib": round(rss2 / 1024, 1),
                "rss_per_instance_kib": round((rss2 - rss0) / n, 1),
                "threads_before": threads0,
                "threads_connected": threads1,
                "threads_per_instance": round((threads1 - threads0) / n, 2),
                "threads_after_probing": threads2,
                "probes": probes,
                "probe_failures": failures,
                "probes_per_second": round(probes / (wall1 - wall0), 1),
                "cpu_percent_of_one_core": round(100 * idle_cpu, 1),
            }
        )
    )
    for client in clients:
        client.close()
    for executor in executors:
        executor.close()


if __name__ == "__main__":
    main()

"""SSH at scale: what N connected, idle instances cost the dispatcher.

    uv run python benchmarks/ssh_scale.py --instances 2000 --pool --measure 60
    uv run python benchmarks/ssh_scale.py --instances 2000 --pool --bastion --measure 60
    uv run python benchmarks/ssh_scale.py --instances 1000 --measure 30     # the bare SSH path

The instances live in a *separate* process (``ssh_scale.py serve``, started by the script): one
asyncssh server on one event loop listening for every instance on 127.0.0.1, each with its own
host key and runner directory, whose ``herder-runner --serve`` is emulated there (answering the
resident runner protocol: ``--list`` says "nothing running"; other commands read their stdin
and succeed).  So the figures measure herder alone.  ``--bastion`` adds a jump host to that
process, and herder reaches every instance through it (``cloud.ssh.bastion_*``).

``--pool`` is a dispatcher restarted with every instance already there: herder's
:class:`~herder.engine.worker.pool.Pool` on a :class:`~herder.runtime.ThreadRuntime`, with
``SSHExecutor`` for each instance, lists them, adopts them (connect, verify the host key, boot
probe, runner md5 check and install, resident runner, ``--list``) at the default
``probe_interval`` with ``max_probes_per_second`` sized for them (N / interval x 1.2), then
stays idle with them for ``--measure`` seconds.  It reports the seconds until every instance
is idle (adopted and probed) and the CPU that took, then idle RSS, threads, ``--list`` probes
per second and CPU as % of one core.

Without ``--pool``, the bare SSH path: per instance one
:class:`~herder.ssh.executor.SSHExecutor` and one
:class:`~herder.engine.worker.runner_client.RunnerClient` holding the resident runner stream; then
``--list`` probes of every instance every ``--probe-interval``, spread evenly, on
``--probe-threads`` threads.  ``connect`` is the seconds until every instance answered a first
``--list`` with ``--connect-threads`` in parallel.

Not covered: the scheduler and queue above the pool (``probing_cost.py`` measures those).
"""

from __future__ import annotations

import argparse
import asyncio
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

import asyncssh
from prometheus_client import CollectorRegistry

from herder.agent import protocol as runner_protocol
from herder.config import Config
from herder.engine.worker.interfaces import NullReporter
from herder.engine.worker.pool import Pool
from herder.engine.worker.runner_client import RunnerClient
from herder.model import InstanceType, WorkerState
from herder.plugin.cloud import (
    CloudError,
    HostKey,
    HostKeyMismatch,
    Instance,
    InstanceSet,
    RemoteRunner,
)
from herder.runtime import ThreadRuntime, VirtualRuntime
from herder.ssh.executor import SSHExecutor
from herder.ssh.server import generate_key_file

RUNNER = "herder-runner"
SET_ID = "bench-is000-000000000000001"
POOL_TAGS = {
    "HerderInstanceSetID": SET_ID,
    "HerderInstanceType": "bench",
    "HerderIdleBehavior": "run",
}

# --------------------------------------------------------------------------- the instances


async def _runner(process: asyncssh.SSHServerProcess[bytes]) -> None:
    """One command on an instance: ``--serve`` answers every verb with "nothing here" until
    EOF; anything else (an install, an md5 check) reads its stdin and succeeds."""
    command = process.command or ""
    try:
        if command.endswith("--serve"):
            empty = base64.b64encode(b"").decode()
            while line := await process.stdin.readline():
                req = json.loads(line)
                answer = {"id": req["id"], "status": 0, "stdout": empty, "stderr": empty}
                process.stdout.write(json.dumps(answer).encode() + b"\n")
        else:
            await process.stdin.read()
    except (asyncssh.Error, OSError, ValueError):
        pass
    process.exit(0)


class _JumpHost(asyncssh.SSHServer):
    """The bastion: lets its (authenticated) client open direct-tcpip channels anywhere."""

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> bool:
        return True


async def _serve(count: int, workdir: Path, authorized: str, ready: Path, bastion: bool) -> None:
    allowed = asyncssh.import_authorized_keys(authorized + "\n")
    listing: list[dict[str, str]] = []
    for i in range(count):
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        (workdir / f"i{i}" / "runner").mkdir(parents=True)
        server = await asyncssh.create_server(
            asyncssh.SSHServer,
            "127.0.0.1",
            0,
            server_host_keys=[host_key],
            authorized_client_keys=allowed,
            process_factory=_runner,
            encoding=None,
            keepalive_interval=0,
        )
        port = server.sockets[0].getsockname()[1]
        line = host_key.export_public_key().decode().split()
        listing.append({"address": f"127.0.0.1:{port}", "host_key": " ".join(line[:2])})
    if bastion:
        jump_key = asyncssh.generate_private_key("ssh-ed25519")
        jump = await asyncssh.create_server(
            _JumpHost,
            "127.0.0.1",
            0,
            server_host_keys=[jump_key],
            authorized_client_keys=allowed,
        )
        port = jump.sockets[0].getsockname()[1]
        line = jump_key.export_public_key().decode().split()
        listing.append({"bastion": f"127.0.0.1:{port}", "host_key": " ".join(line[:2])})
    tmp = ready.with_suffix(".tmp")
    tmp.write_text(json.dumps(listing))
    tmp.rename(ready)
    # The parent closes our stdin when it is done.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


def serve(count: int, workdir: Path, authorized: str, ready: Path, bastion: bool) -> None:
    """Serve ``count`` instances (and a bastion) from one asyncio SSH server process.

    One event loop for all of them, no thread per connection: 2,000 instances then cost this
    process little enough that the machine's cores stay with the dispatcher being measured (a
    thread-per-connection server, paramiko's, fell behind at 2,000 on two shared cores).
    """
    logging.disable(logging.CRITICAL)
    asyncio.run(_serve(count, workdir, authorized, ready, bastion))
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
        return dict(POOL_TAGS)

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
    srv.add_argument("--bastion", action="store_true")
    ap.add_argument("--instances", type=int, default=250)
    ap.add_argument("--probe-interval", type=float, default=10.0)
    ap.add_argument("--max-probes-per-second", type=float, default=0.0, help="0: N/interval x1.2")
    ap.add_argument("--probe-threads", type=int, default=16)
    ap.add_argument("--connect-threads", type=int, default=32)
    ap.add_argument("--measure", type=float, default=30.0, help="seconds of idle probing measured")
    ap.add_argument(
        "--bastion", action="store_true", help="reach every instance through one jump host"
    )
    ap.add_argument(
        "--pool",
        action="store_true",
        help="run herder's pool (a restarted dispatcher adopting every instance) instead of "
        "the bare SSH path",
    )
    ap.add_argument("--idle-probe-interval", type=float, default=None, help="pool mode")
    ap.add_argument("--adopt-timeout", type=float, default=300.0, help="pool mode")
    args = ap.parse_args()
    if args.mode == "serve":
        serve(args.instances, args.dir, args.authorized, args.ready, args.bastion)
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
                *(["--bastion"] if args.bastion else []),
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


class BenchInstanceSet(InstanceSet):
    """The cloud of a dispatcher restarted with every instance already there."""

    def __init__(self, instances: list[Instance]) -> None:
        self._instances = instances

    def create(
        self,
        instance_type: InstanceType,
        image_id: str,
        tags: Mapping[str, str],
        init_command: str,
        public_key: str | None,
    ) -> Instance:
        raise CloudError("the benchmark creates no instances")

    def instances(self, tags: Mapping[str, str]) -> list[Instance]:
        return list(self._instances)


def run_pool(args: argparse.Namespace, config: Config, instances: list[Instance]) -> None:
    """A restarted dispatcher's pool adopting every instance, then idle with them."""
    n = len(instances)
    runtime = ThreadRuntime()
    registry = CollectorRegistry()
    pool = Pool(
        runtime=runtime,
        instance_set=BenchInstanceSet(instances),
        executor_factory=lambda instance: SSHExecutor(instance, config, runtime),
        config=config,
        instance_types=config.build_instance_types(),
        instance_set_id=SET_ID,
        reporter=NullReporter(),
        runner_data=b"#!/bin/sh\n# the benchmark's runner: the instance side emulates it\n",
        registry=registry,
    )

    def probes() -> float:
        name = "herder_instances_run_probe_duration_seconds_count"
        return registry.get_sample_value(name, {"outcome": "success"}) or 0.0

    rss0, threads0 = proc_status()
    cpu0, start = cpu_seconds(), time.monotonic()
    pool.start()
    idle, peak_threads = 0, threads0
    while idle < n and time.monotonic() - start < args.adopt_timeout:
        time.sleep(0.5)  # a benchmark watching a real clock; no test depends on it
        idle = pool.count_workers().get(WorkerState.IDLE, 0)
        peak_threads = max(peak_threads, proc_status()[1])
    adopt_seconds, adopt_cpu = time.monotonic() - start, cpu_seconds() - cpu0
    rss1, threads1 = proc_status()
    time.sleep(5.0)  # the last adoptions' follow-ups
    probes0, cpu0, wall0 = probes(), cpu_seconds(), time.monotonic()
    time.sleep(args.measure)
    probes1, cpu1, wall1 = probes(), cpu_seconds(), time.monotonic()
    rss2, threads2 = proc_status()
    print(
        json.dumps(
            {
                "mode": "pool",
                "instances": n,
                "bastion": args.bastion,
                "adopted": idle,
                "adopt_seconds": round(adopt_seconds, 1),
                "adopt_cpu_seconds": round(adopt_cpu, 1),
                "peak_threads_while_adopting": peak_threads,
                "rss_before_mib": round(rss0 / 1024, 1),
                "rss_adopted_mib": round(rss1 / 1024, 1),
                "rss_after_idle_mib": round(rss2 / 1024, 1),
                "rss_per_instance_kib": round((rss2 - rss0) / n, 1),
                "threads_adopted": threads1,
                "threads_per_instance": round((threads2 - threads0) / n, 2),
                "probes_per_second": round((probes1 - probes0) / (wall1 - wall0), 1),
                "cpu_percent_of_one_core": round(100 * (cpu1 - cpu0) / (wall1 - wall0), 1),
            }
        )
    )
    pool.stop()
    runtime.shutdown()


def run(args: argparse.Namespace, key: Path, listing: list[dict[str, str]]) -> None:
    cloud: dict[str, object] = {"timeout_command": 60}
    if listing and "bastion" in listing[-1]:
        jump = listing.pop()
        host, port = jump["bastion"].rsplit(":", 1)
        cloud["ssh"] = {
            "bastion_host": host,
            "bastion_port": int(port),
            "bastion_host_key": jump["host_key"],
            "connect_timeout": 60,
        }
    n = len(listing)
    rate = args.max_probes_per_second or n / args.probe_interval * 1.2
    cloud.update(
        probe_interval=args.probe_interval,
        max_probes_per_second=rate,
        timeout_idle=3600,  # idle instances stay: the point is to measure them idle
        max_instances=0,
    )
    if args.idle_probe_interval is not None:
        cloud["idle_probe_interval"] = args.idle_probe_interval
    config = Config.model_validate(
        {
            "containers": {"dispatch_private_key": str(key)},
            "cloud": cloud,
            "instance_types": {
                "bench": {"provider_type": "bench", "vcpus": 1, "ram": "1GiB", "price": 0.1}
            },
        }
    )
    if args.pool:
        instances: list[Instance] = [
            BenchInstance(i, item["address"], item["host_key"]) for i, item in enumerate(listing)
        ]
        run_pool(args, config, instances)
        return
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
            end = wall0 + args.measure
            time.sleep(max(0.0, min(next_at, end) - time.monotonic()))
        cpu1, wall1 = cpu_seconds(), time.monotonic()
    rss2, threads2 = proc_status()
    idle_cpu = (cpu1 - cpu0) / (wall1 - wall0)
    print(
        json.dumps(
            {
                "instances": n,
                "bastion": args.bastion,
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

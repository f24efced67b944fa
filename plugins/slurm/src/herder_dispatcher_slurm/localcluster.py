"""A private Slurm cluster on this machine: slurmctld and one or more slurmd, in a directory.

Used by the plugin's tests and by the Slurm comparison benchmark, so that both start Slurm the
same way.  Debian's packages (``slurmctld slurmd slurm-client munge``) build slurmd so that
several can run on one host, each with ``-N <node>`` and its own port; that is how a cluster of
``nodes`` nodes fits on one machine.  There is no systemd to lean on: munged is started here when
it is not running (as user ``munge``, with ``/run/munge`` created first), and every daemon
started here is stopped again by :meth:`LocalSlurm.stop`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import IO

INSTALL_HINT = (
    "install Debian's packages: apt-get install -y --no-install-recommends "
    "slurmctld slurmd slurm-client munge"
)
REQUIRED_COMMANDS = ("slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "munged")

# Without these, slurmctld schedules on its own timers (a pass every minute or so, batches
# held back by batch_sched_delay), and a run of short jobs mostly measures those idle intervals.
TUNED_SCHEDULER_PARAMETERS = (
    "sched_min_interval=0,batch_sched_delay=0,default_queue_depth=1000,"
    "sched_interval=1,bf_interval=1"
)

_CONF = """\
ClusterName={cluster}
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmctldPort={ctl_port}
SlurmdPort={first_node_port}
AuthType=auth/munge
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool-%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
{scheduler_parameters}ReturnToService=2
MinJobAge={min_job_age}
MaxJobCount={max_job_count}
MaxArraySize={max_array_size}
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SlurmdParameters=config_overrides
{node_lines}
PartitionName=main Nodes={node_list} Default=YES State=UP
"""


class SlurmSetupError(RuntimeError):
    """Slurm cannot be started here; the message says what is missing and how to fix it."""


def missing_prerequisites() -> str | None:
    """Why a private Slurm cannot run here (not root, packages missing), or None if it can."""
    missing = [c for c in REQUIRED_COMMANDS if shutil.which(c) is None]
    if missing:
        return f"{', '.join(missing)} not found; {INSTALL_HINT}"
    if os.geteuid() != 0:
        return "a private Slurm needs root (slurmd runs jobs as their user; munged needs su)"
    if not Path("/etc/munge/munge.key").exists():
        return "/etc/munge/munge.key is missing; create it with mungekey (package munge)"
    return None


def tool(*argv: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run a fixed system program (found on PATH) with fixed arguments; its output as text."""
    exe = shutil.which(argv[0]) or argv[0]
    return subprocess.run(  # noqa: S603 - fixed programs, no shell
        [exe, *argv[1:]],
        capture_output=True,
        text=True,
        check=check,
    )


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now (all held open until all are found)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def munge_running() -> bool:
    return tool("pgrep", "-x", "munged").returncode == 0


def start_munge() -> int | None:
    """Start munged as user munge if none runs; its pid when started here, else None."""
    if munge_running():
        return None
    run_dir = Path("/run/munge")
    run_dir.mkdir(exist_ok=True)
    for d in (run_dir, Path("/var/lib/munge"), Path("/var/log/munge")):
        if d.exists():
            shutil.chown(d, "munge", "munge")
    tool("su", "munge", "-s", "/bin/sh", "-c", "/usr/sbin/munged", check=True)
    return int((run_dir / "munged.pid").read_text())


class LocalSlurm:
    """slurmctld and ``nodes`` slurmd (n1, n2, ...) in the foreground, configured in ``directory``.

    Use as a context manager, or call :meth:`start` and (always) :meth:`stop`.  While it runs,
    ``SLURM_CONF`` in this process's environment points at its slurm.conf, so the Slurm client
    commands (sbatch, squeue, ...) talk to it; :meth:`stop` restores the previous value.
    """

    def __init__(
        self,
        directory: Path,
        *,
        nodes: int = 1,
        cpus_per_node: int = 2,
        real_memory_mb: int = 2000,
        scheduler_parameters: str = TUNED_SCHEDULER_PARAMETERS,
        min_job_age: int = 300,
        max_jobs: int = 10000,
        cluster_name: str = "herdertest",
    ) -> None:
        self.dir = directory
        self.nodes = nodes
        self.node_names = [f"n{i}" for i in range(1, nodes + 1)]
        self.conf = directory / "slurm.conf"
        self._settings = {
            "cluster": cluster_name,
            # Slurm rejects an empty value: "" means no line, i.e. Slurm's defaults.
            "scheduler_parameters": (
                f"SchedulerParameters={scheduler_parameters}\n" if scheduler_parameters else ""
            ),
            "min_job_age": min_job_age,
            "max_job_count": max(10000, max_jobs),
            "max_array_size": max(1001, max_jobs + 1),
        }
        self._cpus = cpus_per_node
        self._memory = real_memory_mb
        self._procs: list[subprocess.Popen[bytes]] = []
        self._munged_pid: int | None = None
        self._log: IO[bytes] | None = None
        self._old_conf: str | None = None
        self._env_set = False

    def write_conf(self) -> None:
        """slurm.conf with free ports: one NodeName line per node, since each needs its own."""
        ctl_port, *node_ports = free_ports(1 + self.nodes)
        node_lines = "\n".join(
            f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
            f"CPUs={self._cpus} RealMemory={self._memory}"
            for name, port in zip(self.node_names, node_ports, strict=True)
        )
        node_list = self.node_names[0] if self.nodes == 1 else f"n[1-{self.nodes}]"
        self.conf.write_text(
            _CONF.format(
                dir=self.dir,
                ctl_port=ctl_port,
                first_node_port=node_ports[0],
                node_lines=node_lines,
                node_list=node_list,
                **self._settings,
            )
        )

    def start(self, timeout: float = 60.0) -> None:
        """Start munge if needed, the daemons, and wait until every node is idle.

        On any failure (Ctrl-C included) whatever was started is stopped before the error
        propagates, since a caller's ``with`` block never reaches ``__exit__`` then.
        """
        problem = missing_prerequisites()
        if problem:
            raise SlurmSetupError(problem)
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> None:
        (self.dir / "state").mkdir(parents=True, exist_ok=True)
        self.write_conf()
        self._munged_pid = start_munge()
        self._old_conf = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(self.conf)
        self._env_set = True
        self._log = open(self.dir / "daemons.log", "ab")  # noqa: SIM115 - closed by stop()
        conf = str(self.conf)
        ctld, slurmd = shutil.which("slurmctld") or "slurmctld", shutil.which("slurmd") or "slurmd"
        argvs = [[ctld, "-D", "-f", conf]]
        argvs += [[slurmd, "-D", "-f", conf, "-N", name] for name in self.node_names]
        for argv in argvs:
            # A session of their own: Ctrl-C in the terminal reaches only this process, whose
            # stop() then shuts the daemons down in order.
            self._procs.append(
                subprocess.Popen(  # noqa: S603 - the Slurm daemons, no shell
                    argv,
                    stdout=self._log,
                    stderr=self._log,
                    start_new_session=True,
                )
            )
        self.wait_idle(timeout)

    def idle_nodes(self) -> int:
        out = tool("sinfo", "--noheader", "--Node", "--format=%N %T").stdout
        return len({line.split()[0] for line in out.splitlines() if line.endswith(" idle")})

    def wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.idle_nodes() < self.nodes:
            dead = [p.args for p in self._procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                what = (
                    f"Slurm daemons exited: {dead}"
                    if dead
                    else f"Slurm nodes not idle after {timeout:.0f} s"
                )
                raise SlurmSetupError(f"{what}; end of their logs:\n{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, lines: int = 20) -> str:
        text = ""
        for name in ("slurmctld.log", "daemons.log"):
            path = self.dir / name
            if path.exists():
                text += "".join(path.read_text(errors="replace").splitlines(True)[-lines:])
        return text

    def stop(self) -> None:
        """Stop every daemon started here (munged too, if it was started here); idempotent."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()
        if self._munged_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._munged_pid, 15)
            self._munged_pid = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._env_set:
            if self._old_conf is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = self._old_conf
            self._env_set = False

    def __enter__(self) -> LocalSlurm:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

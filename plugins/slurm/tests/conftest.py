"""A one-node Slurm cluster on this machine, started for the tests that need a real Slurm."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SLURM_CONF = """\
ClusterName=herdertest
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmctldPort={ctl_port}
SlurmdPort={d_port}
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
SchedulerParameters=sched_min_interval=0,batch_sched_delay=0,sched_interval=1,bf_interval=1
ReturnToService=2
MinJobAge=300
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SlurmdParameters=config_overrides
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={node_port} CPUs=2 RealMemory=2000
PartitionName=main Nodes=n1 Default=YES State=UP
"""


def _munge_running() -> bool:
    return subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """slurmctld and one slurmd (2 CPUs, 2000 MB) in the foreground; SLURM_CONF points at them."""
    if os.geteuid() != 0 or not all(
        shutil.which(p) for p in ("slurmctld", "slurmd", "sbatch", "munged")
    ):
        pytest.skip("needs root and Debian's slurmctld, slurmd, slurm-client and munge")
    d = tmp_path_factory.mktemp("slurm")
    (d / "state").mkdir()
    base = 20000 + os.getpid() % 20000
    conf = d / "slurm.conf"
    conf.write_text(SLURM_CONF.format(dir=d, ctl_port=base, d_port=base + 1, node_port=base + 2))
    started: list[subprocess.Popen[bytes]] = []
    munged_pid: int | None = None
    if not _munge_running():
        Path("/run/munge").mkdir(exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["su", "munge", "-s", "/bin/sh", "-c", "/usr/sbin/munged"], check=True)
        munged_pid = int(Path("/run/munge/munged.pid").read_text())
    old_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    log = open(d / "daemons.log", "ab")  # noqa: SIM115 - closed at teardown
    try:
        for argv in (["slurmctld", "-D", "-f", str(conf)],
                     ["slurmd", "-D", "-f", str(conf), "-N", "n1"]):
            started.append(subprocess.Popen(argv, stdout=log, stderr=log))
        deadline = time.monotonic() + 60
        while "idle" not in subprocess.run(
            ["sinfo", "--noheader", "--format=%T"], capture_output=True, text=True
        ).stdout:
            assert time.monotonic() < deadline, (d / "slurmctld.log").read_text()
            time.sleep(0.2)
        yield d
    finally:
        for proc in started:
            proc.terminate()
        for proc in started:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if munged_pid is not None:
            os.kill(munged_pid, 15)
        log.close()
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf

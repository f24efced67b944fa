"""The ``slurm`` dispatcher: each container is a Slurm batch job named by its uuid.

Slurm does the queueing and placement; this module locks containers, submits them with
``sbatch``, follows them with one ``squeue`` per probe, stops them with ``scancel`` and records
the outcome.  The job script writes the command's exit code to the work directory, because
``sacct`` needs Slurm accounting, which small clusters often run without; ``scontrol show job``
(which remembers a job for ``MinJobAge``) is the fallback when the file is missing.

Slurm job states map to herder's as: PENDING/CONFIGURING → Locked, RUNNING/COMPLETING →
Running, gone from ``squeue`` → Complete with the recorded exit code; gone with no exit code
recorded → back to the queue (the run was lost, e.g. the node failed).
"""

from __future__ import annotations

import logging
import re
import shlex
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from pydantic import Field

from herder.config import Config, Duration, Size
from herder.dispatch import Job, ProbingBackend, ProbingParameters
from herder.model import Container, ContainerState, InstanceType
from herder.queue.base import QueueError
from herder.runtime import Runtime

log = logging.getLogger(__name__)

INSTANCE_TYPE = "slurm"
COMMAND_TIMEOUT = 60.0
MiB = 1 << 20
RUNNING_STATES = frozenset({"RUNNING", "COMPLETING"})
LOST_STATES = frozenset({"NODE_FAIL", "BOOT_FAIL", "PREEMPTED", "REQUEUED", "DEADLINE"})


class SlurmParameters(ProbingParameters):
    """``dispatcher_parameters`` of the slurm dispatcher."""

    partition: str = Field("", description='"": the default partition')
    sbatch_args: list[str] = Field(default_factory=list, description="extra sbatch arguments")
    work_dir: str = Field("", description='"": <queue.path dir>/slurm; nodes must see it')
    vcpus: int = Field(0, ge=0, description="the largest job's CPUs; 0: ask sinfo")
    ram: Size = Field(0, ge=0, description="the largest job's memory; 0: ask sinfo")
    probe_interval: Duration = Field(2.0, gt=0, description="how often squeue is read")
    max_jobs: int | None = Field(None, ge=1, description="containers submitted at once")


class SlurmError(Exception):
    """A Slurm command failed."""


@dataclass(frozen=True)
class SlurmJob:
    job_id: str
    state: str


def run_command(*argv: str, stdin: bytes = b"") -> str:
    proc = subprocess.run(  # noqa: S603 - fixed Slurm programs, no shell
        list(argv), input=stdin, capture_output=True, timeout=COMMAND_TIMEOUT, check=False
    )
    if proc.returncode != 0:
        message = proc.stderr.decode(errors="replace").strip()
        raise SlurmError(f"{argv[0]}: {message or f'exit status {proc.returncode}'}")
    return proc.stdout.decode(errors="replace")


class Slurm:
    """The Slurm command-line tools."""

    def submit(self, name: str, script: Path, args: list[str]) -> str:
        out = run_command("sbatch", "--parsable", f"--job-name={name}", *args, str(script))
        return out.strip().split(";")[0]

    def jobs(self) -> dict[str, SlurmJob]:
        """Job name → job, for every job Slurm still lists."""
        out = run_command("squeue", "--noheader", "--format=%i|%j|%T")
        jobs = {}
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3:
                jobs[parts[1]] = SlurmJob(parts[0], parts[2])
        return jobs

    def cancel(self, job_id: str) -> None:
        run_command("scancel", job_id)

    def exit_code(self, job_id: str) -> int | None:
        """The exit code Slurm remembers for a finished job, if it still does."""
        try:
            out = run_command("scontrol", "show", "job", job_id)
        except SlurmError:
            return None
        state = re.search(r"\bJobState=(\w+)", out)
        if state is not None and state.group(1) in LOST_STATES:
            return None  # the command did not end by itself: its exit code means nothing
        m = re.search(r"\bExitCode=(\d+):(\d+)", out)
        if m is None:
            return None
        code, signum = int(m.group(1)), int(m.group(2))
        return 128 + signum if signum else code

    def largest_node(self) -> tuple[int, int]:
        """CPUs and bytes of memory of the largest node."""
        out = run_command("sinfo", "--noheader", "--format=%c %m")
        best = (0, 0)
        for line in out.splitlines():
            cpus, mem = (re.sub(r"\D", "", f) or "0" for f in line.split()[:2])
            best = max(best, (int(cpus), int(mem) * MiB))
        return best


def job_script(container: Container, work_dir: Path) -> str:
    """A POSIX shell script that runs the command and records its exit code atomically."""
    spec = container.spec
    lines = ["#!/bin/sh"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in spec.environment]
    lines.append(f"cd {shlex.quote(spec.cwd or str(work_dir))} || exit 1")
    lines.append(" ".join(shlex.quote(a) for a in spec.command))
    exit_file = shlex.quote(str(work_dir / f"{container.uuid}.exit"))
    lines.append("code=$?")
    lines.append(f'echo "$code" > {exit_file}.tmp && mv {exit_file}.tmp {exit_file}')
    lines.append('exit "$code"')
    return "\n".join(lines) + "\n"


class SlurmBackend(ProbingBackend):
    """Locks containers and runs each as a Slurm job."""

    parameters_model = SlurmParameters
    params: SlurmParameters

    def __init__(
        self,
        config: Config,
        parameters: Mapping[str, Any],
        *,
        runtime: Runtime,
        registry: CollectorRegistry | None = None,
    ) -> None:
        super().__init__(config, parameters, runtime=runtime, registry=registry)
        self.work_dir = Path(
            self.params.work_dir or Path(config.queue.path).resolve().parent / "slurm"
        )
        self.slurm = Slurm()
        self._job_ids: dict[str, str] = {}

    def instance_types(self) -> dict[str, InstanceType]:
        """The largest node: a container bigger than every node is cancelled at submission."""
        vcpus, ram = self.params.vcpus, self.params.ram
        if not vcpus or not ram:
            node_vcpus, node_ram = self.slurm.largest_node()
            vcpus, ram = vcpus or node_vcpus, ram or node_ram
        return {INSTANCE_TYPE: InstanceType(INSTANCE_TYPE, INSTANCE_TYPE, vcpus, ram, 1 << 50)}

    def _prepare(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)

    def _dispatcher_limits(self) -> dict[str, Any]:
        return {"max_concurrent": self.params.max_jobs}

    # ---- one container

    def _run(self, job: Job) -> None:
        """Submit the container, unless Slurm already has it (a restart) or it has finished."""
        job.updates.take()
        existing = self.slurm.jobs().get(job.uuid)
        if existing is not None:
            log.info("%s is Slurm job %s already: following it", job.uuid, existing.job_id)
            job_id = existing.job_id
        elif self._exit_file(job.uuid).exists():
            job_id = ""  # finished while herder was stopped: the probe collects it
        elif job.container.state is ContainerState.LOCKED:
            job_id = self._submit(job.container)
        else:
            job.retry("the Slurm job is gone and recorded no exit code")
            return
        with self._lock:
            self._job_ids[job.uuid] = job_id
        self._follow(job)

    def _submit(self, ctr: Container) -> str:
        script = self.work_dir / f"{ctr.uuid}.sh"
        script.write_text(job_script(ctr, self.work_dir))
        self._exit_file(ctr.uuid).unlink(missing_ok=True)
        args = [f"--output={self.work_dir / ctr.uuid}.log", "--open-mode=truncate"]
        rc = ctr.runtime_constraints
        if rc.vcpus:
            args.append(f"--cpus-per-task={rc.vcpus}")
        if rc.ram:
            args.append(f"--mem={max(1, -(-rc.ram // MiB))}M")  # 0 would mean "all of it"
        if self.params.partition:
            args.append(f"--partition={self.params.partition}")
        job_id = self.slurm.submit(ctr.uuid, script, [*args, *self.params.sbatch_args])
        log.info("submitted %s as Slurm job %s", ctr.uuid, job_id)
        return job_id

    def _exit_file(self, uuid: str) -> Path:
        return self.work_dir / f"{uuid}.exit"

    def _stop_job(self, uuid: str) -> None:
        """scancel the container's job."""
        with self._lock:
            job_id = self._job_ids.get(uuid, "")
        if job_id:
            try:
                self.slurm.cancel(job_id)
            except SlurmError as exc:
                log.warning("cannot cancel Slurm job %s of %s: %s", job_id, uuid, exc)

    # ---- following jobs

    def _probe_once(self) -> None:
        """One squeue for every job: mark starts, collect ends."""
        try:
            listed = self.slurm.jobs()
        except (SlurmError, OSError, subprocess.SubprocessError) as exc:
            log.warning("cannot read the Slurm queue: %s", exc)
            listed = None
        with self._lock:
            followed = list(self._job_ids.items())
        for uuid, job_id in followed if listed is not None else ():
            current = listed.get(uuid) if listed is not None else None
            if current is None:
                self._collect(uuid, job_id)
            elif current.state in RUNNING_STATES:
                self._mark_running(uuid, current.job_id)
        with self._lock:
            busy = bool(self._job_ids)
        if busy:
            self._probe_again()

    def _mark_running(self, uuid: str, job_id: str) -> None:
        with self._lock:
            job = self._jobs.get(uuid)
        if job is not None and job.updates.latest.state is ContainerState.LOCKED:
            try:
                job.set_running(f"slurm-job-{job_id}", INSTANCE_TYPE)
            except QueueError as exc:
                log.debug("not marking %s running: %s", uuid, exc)

    def _collect(self, uuid: str, job_id: str) -> None:
        """The job left Slurm's queue: record its exit code and log, or give it back."""
        with self._lock:
            self._job_ids.pop(uuid, None)
            self._jobs.pop(uuid, None)
        queue = self.dispatcher.queue if self.dispatcher else None
        ctr = queue.get(uuid) if queue else None
        if queue is None or ctr is None:
            return
        code = self._recorded_exit(uuid, job_id)
        log_file = self.work_dir / f"{uuid}.log"
        try:
            if log_file.exists() and ctr.state is not ContainerState.COMPLETE:
                queue.append_log(uuid, log_file.read_bytes())
            if ctr.state.final:
                pass
            elif code is None:
                queue.retry(uuid, f"Slurm job {job_id} ended without recording an exit code")
            else:
                if ctr.state is ContainerState.LOCKED:
                    queue.set_running(uuid, f"slurm-job-{job_id}", INSTANCE_TYPE)
                queue.finish(uuid, code)
        except QueueError as exc:
            log.warning("cannot record the end of %s: %s", uuid, exc)
        for suffix in (".sh", ".log", ".exit"):
            (self.work_dir / f"{uuid}{suffix}").unlink(missing_ok=True)

    def _recorded_exit(self, uuid: str, job_id: str) -> int | None:
        try:
            return int(self._exit_file(uuid).read_text().strip())
        except (OSError, ValueError):
            pass
        return self.slurm.exit_code(job_id) if job_id else None

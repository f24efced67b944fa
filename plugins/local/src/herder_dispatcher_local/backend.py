"""The ``local`` dispatcher: runs containers on the dispatcher's own host.

Process supervision is not re-implemented here: each container runs under herder's runner agent
(``herder/agent/herder_runner.py``, the program the cloud engine copies to instances), called
as a local subprocess with a private state directory.  The agent detaches a supervisor per
container, records its exit code and log on disk and runs it with docker or podman when asked or
present, so a container survives a restart of ``herder serve`` and its result is collected
afterwards.  This module decides what to start and when (through :class:`herder.dispatch.
Dispatcher`), probes the agent for exits and records them in the queue.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from pydantic import Field

from herder.agent import PROGRAM
from herder.agent.protocol import (
    ListResult,
    config_document,
    login_environment,
    parse_list_output,
)
from herder.config import Config, Size
from herder.dispatch import Job, ProbingBackend, ProbingParameters
from herder.model import Container, ContainerState, InstanceType
from herder.queue.base import QueueError
from herder.runtime import Runtime

log = logging.getLogger(__name__)

INSTANCE_TYPE = "local"
RUNNER = PROGRAM
RUNNER_TIMEOUT = 60.0


class LocalParameters(ProbingParameters):
    """``dispatcher_parameters`` of the local dispatcher."""

    vcpus: int = Field(0, ge=0, description="CPUs containers may use; 0: the host's count")
    ram: Size = Field(0, ge=0, description="memory containers may use; 0: the host's memory")
    state_dir: str = Field("", description='runner state; "": <queue.path dir>/local-runner')


class AgentCallError(Exception):
    """The runner agent refused or failed a request."""


class LocalAgent:
    """herder's runner agent on this host, with a private state directory."""

    def __init__(self, state_dir: Path, runtime_engine: str) -> None:
        self.state_dir = state_dir
        self.runtime_engine = runtime_engine

    def call(self, *args: str, stdin: bytes = b"") -> bytes:
        argv = [sys.executable, "-I", str(RUNNER), f"--state-dir={self.state_dir}", *args]
        # A login's environment only: nothing of the dispatcher's (its token, credentials)
        # reaches the agent or, through it, the containers.
        proc = subprocess.run(  # noqa: S603 - fixed program, arguments checked by the agent
            argv,
            input=stdin,
            capture_output=True,
            timeout=RUNNER_TIMEOUT,
            check=False,
            env=login_environment(),
        )
        if proc.returncode != 0:
            message = proc.stderr.decode(errors="replace").strip()
            raise AgentCallError(message or f"exit status {proc.returncode}")
        return proc.stdout

    def detach(self, container: Container, instance_type: InstanceType) -> bool:
        """Start the container; False if it already runs (a start from before a restart)."""
        doc = config_document(container, instance_type, self.runtime_engine)
        try:
            self.call(
                f"--runtime-engine={self.runtime_engine}",
                "--detach",
                "--stdin-config",
                container.uuid,
                stdin=doc,
            )
        except AgentCallError as exc:
            if "already running" in str(exc):
                return False
            raise
        return True

    def list(self, cluster_id: str) -> ListResult:
        return parse_list_output(self.call("--list").decode(errors="replace"), cluster_id)

    def kill(self, uuid: str, signum: int = signal.SIGTERM) -> None:
        self.call(f"--kill={int(signum)}", uuid)

    def log(self, uuid: str) -> bytes:
        return self.call("--log", uuid)

    def forget(self, uuid: str) -> None:
        self.call("--forget", uuid)


def host_capacity() -> tuple[int, int]:
    """CPUs and bytes of memory of this host."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return os.cpu_count() or 1, int(ram)


class LocalBackend(ProbingBackend):
    """Takes containers from the queue while they fit this host, and runs them here."""

    parameters_model = LocalParameters
    params: LocalParameters

    def __init__(
        self,
        config: Config,
        parameters: Mapping[str, Any],
        *,
        runtime: Runtime,
        registry: CollectorRegistry | None = None,
    ) -> None:
        super().__init__(config, parameters, runtime=runtime, registry=registry)
        host_vcpus, host_ram = host_capacity()
        self.vcpus = self.params.vcpus or host_vcpus
        self.ram = self.params.ram or host_ram
        state_dir = self.params.state_dir or str(
            Path(config.queue.path).resolve().parent / "local-runner"
        )
        self.runner = LocalAgent(Path(state_dir), config.containers.runtime_engine)
        self._type = InstanceType(INSTANCE_TYPE, INSTANCE_TYPE, self.vcpus, self.ram)
        self._started: set[str] = set()  # known to the runner: absence from --list means lost

    def instance_type(self) -> InstanceType:
        """The host as the one type containers are sized against."""
        Path(self.runner.state_dir).mkdir(parents=True, exist_ok=True)
        disk = shutil.disk_usage(self.runner.state_dir).free
        return InstanceType(INSTANCE_TYPE, INSTANCE_TYPE, self.vcpus, self.ram, disk)

    def instance_types(self) -> dict[str, InstanceType]:
        return {INSTANCE_TYPE: self.instance_type()}

    # ---- lifecycle

    def _prepare(self) -> None:
        self._type = self.instance_type()

    def _dispatcher_limits(self) -> dict[str, Any]:
        return {"can_run": self._fits}

    # ---- capacity

    def _fits(self, ctr: Container) -> bool:
        """Lock only what this host can run beside what it already runs."""
        assert self.dispatcher is not None
        held = self.dispatcher.held()
        vcpus = sum(c.runtime_constraints.vcpus for c in held) + ctr.runtime_constraints.vcpus
        ram = sum(c.runtime_constraints.ram for c in held) + ctr.runtime_constraints.ram
        return vcpus <= self.vcpus and ram <= self.ram

    # ---- one container

    def _run(self, job: Job) -> None:
        """Start the container (unless it already runs from before a restart) and watch it."""
        job.updates.take()  # the first record is job.container
        ctr = job.container
        if ctr.state is ContainerState.LOCKED:
            if not self.runner.detach(ctr, self._type):
                log.info("%s already runs here: taking it up", ctr.uuid)
            job.set_running("localhost", INSTANCE_TYPE)
        with self._lock:
            self._started.add(job.uuid)
        self._follow(job)

    def _stop_job(self, uuid: str) -> None:
        try:
            self.runner.kill(uuid)
        except AgentCallError as exc:
            log.warning("cannot stop %s: %s", uuid, exc)

    # ---- probing for exits

    def _probe_once(self) -> None:
        """Collect exits; give back containers whose runner is gone; probe again later."""
        try:
            result = self.runner.list(self.config.cluster_id)
        except (AgentCallError, OSError, subprocess.SubprocessError) as exc:
            log.warning("cannot list local containers: %s", exc)
            result = None
        if result is not None:
            for uuid, code in result.exited.items():
                self._collect(uuid, code)
            for uuid, (side, message) in result.failed.items():
                self._collect(uuid, None, side, message)
            self._retry_lost(set(result.running) | set(result.exited) | set(result.failed))
        with self._lock:
            busy = bool(self._jobs) or (result is not None and bool(result.running))
        if busy:
            self._probe_again()

    def _collect(self, uuid: str, code: int | None, side: str = "", message: str = "") -> None:
        """Record an exit: log, then exit code, then let the runner forget it.

        ``code`` is None for a container the runner could not start: it is retried when this
        machine was at fault (``side`` instance; the attempts cap ends it), else cancelled,
        with the runtime's ``message`` either way, never as an exit code.
        """
        with self._lock:
            job = self._jobs.pop(uuid, None)
            self._started.discard(uuid)
        queue = self.dispatcher.queue if self.dispatcher else None
        if queue is None:
            return
        ctr = queue.get(uuid)
        try:
            if ctr is not None and ctr.state is not ContainerState.COMPLETE:
                data = self.runner.log(uuid)  # a cancelled container's log is kept too
                if data:
                    queue.append_log(uuid, data)
                if ctr.state.final:
                    pass
                elif code is not None:
                    queue.finish(uuid, code)
                elif side == "instance":
                    queue.retry(uuid, f"this machine could not start the container: {message}")
                else:
                    queue.cancel(uuid, f"the container could not be started: {message}")
            elif job is None and ctr is None:
                log.info("forgetting %s: unknown to the queue", uuid)
            self.runner.forget(uuid)
        except (AgentCallError, QueueError) as exc:
            log.warning("cannot collect the exit of %s: %s", uuid, exc)

    def _retry_lost(self, seen: set[str]) -> None:
        """A started container the runner no longer knows died without a result."""
        with self._lock:
            lost = [self._jobs[u] for u in self._started - seen if u in self._jobs]
        for job in lost:
            with self._lock:
                self._jobs.pop(job.uuid, None)
                self._started.discard(job.uuid)
            try:
                job.retry("the local runner lost the container (no exit code recorded)")
            except QueueError as exc:
                log.debug("not retrying %s: %s", job.uuid, exc)

"""An in-process herder on the loopback driver, for the latency and throughput benchmarks.

The same wiring as ``herder serve`` (a :class:`~herder.engine.cloud_engine.CloudEngine` on a
:class:`~herder.runtime.ThreadRuntime`, the SQLite queue, real SSH to loopback instances, the
deployed runner agent), without the API server, so that a benchmark submits to the queue
directly and sees every state change through :meth:`ContainerQueue.observe`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from herder.config import Config
from herder.engine.cloud_engine import CloudEngine, public_key_from_private
from herder.model import Container, ContainerSpec, ContainerState, WorkerState
from herder.plugin.executor import Executor
from herder.runtime import ThreadRuntime
from herder.ssh.executor import SSHExecutor
from herder.ssh.server import generate_key_file


class Bench:
    """A running dispatcher in a private directory, and the times its containers changed state."""

    def __init__(
        self,
        *,
        instances: int,
        vcpus: int,
        probe_interval: float,
        timeout_idle: float = 600.0,
        extra_cloud: dict[str, Any] | None = None,
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="herder-bench-"))
        key = self.dir / "id_ed25519"
        generate_key_file(key)
        os.chmod(key, 0o600)
        self.marker = f"hb{os.getpid()}x{time.monotonic_ns()}"
        config = Config.model_validate(
            {
                "cluster_id": "bench",
                "containers": {"dispatch_private_key": str(key), "runtime_engine": "process"},
                "cloud": {
                    "driver": "loopback",
                    "driver_parameters": {
                        "max_instances": instances,
                        "state_dir": str(self.dir / "loopback"),
                    },
                    "deploy_runner_directory": str(self.dir / "runner-bin"),
                    "probe_interval": probe_interval,
                    "sync_interval": 1.0,
                    "timeout_idle": timeout_idle,
                    "timeout_booting": 60.0,
                    "max_instances": instances,
                    **(extra_cloud or {}),
                },
                "queue": {"path": str(self.dir / "herder.db")},
                "instance_types": {
                    "local": {
                        "vcpus": vcpus,
                        "ram": "64GiB",
                        "included_scratch": "1GiB",
                        "price": 0.1,
                    },
                },
            }
        )
        self.config = config
        self.runtime = ThreadRuntime()
        self.executors: list[Executor] = []
        self.times: dict[tuple[str, ContainerState], float] = {}
        self.finished = 0
        self._cond = threading.Condition()
        self.dispatcher = CloudEngine(
            config,
            runtime=self.runtime,
            public_key=public_key_from_private(str(key)),
            executor_factory=self._executor,
        )
        self.dispatcher.queue.observe(self._observe)

    def _executor(self, instance: Any) -> Executor:
        ex = SSHExecutor(instance, self.config, self.runtime)
        self.executors.append(ex)
        return ex

    def _observe(self, old: Container | None, new: Container) -> None:
        now = time.perf_counter()
        with self._cond:
            self.times.setdefault((new.uuid, new.state), now)
            if new.state.final:
                self.finished += 1
            self._cond.notify_all()

    def start(self) -> None:
        self.dispatcher.start()

    def submit(self, *command: str) -> tuple[str, float]:
        """Submit one container; its UUID and the time just before the submission."""
        t0 = time.perf_counter()
        c = self.dispatcher.queue.submit(
            ContainerSpec(command=(*command,), runtime="process", name=self.marker)
        )
        return c.uuid, t0

    def wait(self, pred: Callable[[], bool], timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("benchmark condition not reached")
                self._cond.wait(min(left, 0.05))

    def idle_workers(self) -> int:
        return self.dispatcher.pool.count_workers().get(WorkerState.IDLE, 0)

    def wait_idle(self, n: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.idle_workers() < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n} idle workers not reached")
            time.sleep(0.002)

    def state_time(self, uuid: str, state: ContainerState) -> float | None:
        with self._cond:
            return self.times.get((uuid, state))

    def close(self) -> None:
        """Stop (the loopback SSH servers stop with the instance set) and remove every file."""
        self.dispatcher.stop()
        self.runtime.shutdown()
        shutil.rmtree(self.dir, ignore_errors=True)

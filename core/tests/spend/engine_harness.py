"""The whole engine on the sim driver and the virtual clock, for spend-control tests.

Unlike ``run_simulation`` it lets a test look at instances and containers mid-run, submit at
chosen moments, and act as an operator.
"""

from __future__ import annotations

import random
from typing import Any

from herder.config import Config
from herder.engine.cloud_engine import CloudEngine
from herder.model import (
    Container,
    ContainerSpec,
    InstanceView,
    RuntimeConstraints,
    SchedulingParameters,
    WorkerState,
)
from herder.runtime import VirtualRuntime
from herder.testing.sim import SimDriver
from herder.testing.sim_stats import SimStats

GiB = 1024**3


def sim_config(types: dict[str, Any] | None = None, **cloud: Any) -> Config:
    """A sim cloud with short timeouts; ``cloud`` keys override the ``cloud`` section."""
    params = {"seed": 5, "boot_delay": 5, **cloud.pop("driver_parameters", {})}
    queue_path = cloud.pop("queue_path", ":memory:")
    return Config.model_validate(
        {
            "cluster_id": "spend",
            "cloud": {
                "driver": "sim",
                "driver_parameters": params,
                "poll_interval": "1s",
                "probe_interval": "1s",
                "max_probes_per_second": 100,
                "sync_interval": "5s",
                "timeout_idle": "10s",
                "timeout_shutdown": "5s",
                "max_cloud_ops_per_second": 0,
                "max_concurrent_instance_create_ops": 4,
                **cloud,
            },
            "queue": {"path": queue_path},
            "instance_types": types or {"c4": {"vcpus": 4, "ram": "16GiB", "price": 1.0}},
        }
    )


class Engine:
    """One dispatcher on a sim cloud; time moves only through :meth:`run_for`."""

    def __init__(
        self,
        config: Config,
        *,
        driver: SimDriver | None = None,
        runtime: VirtualRuntime | None = None,
        seed: int = 1,
        **kwargs: Any,
    ) -> None:
        """Pass the ``driver`` and ``runtime`` of a stopped engine to restart on its cloud."""
        self.runtime = runtime or VirtualRuntime(strict=True)
        self.start = self.runtime.now()
        self.driver = driver or SimDriver()
        self.disp = CloudEngine(
            config,
            runtime=self.runtime,
            driver=self.driver,
            uuid_random_bytes=random.Random(seed).randbytes,
            rng=random.Random("1:pool"),
            **kwargs,
        )
        self.disp.start()

    @property
    def stats(self) -> SimStats:
        return self.driver.stats

    @property
    def elapsed(self) -> float:
        return self.runtime.now() - self.start

    def submit(
        self,
        seconds: float,
        *,
        vcpus: int = 1,
        ram: int = GiB,
        name: str = "",
        max_run_time: float = 0.0,
        exit_code: int = 0,
    ) -> str:
        spec = ContainerSpec(
            command=("sim", str(seconds), str(exit_code)),
            runtime_constraints=RuntimeConstraints(vcpus=vcpus, ram=ram),
            scheduling_parameters=SchedulingParameters(max_run_time=max_run_time),
            name=name,
        )
        return self.disp.queue.submit(spec).uuid

    def run_for(self, seconds: float, step: float = 1.0) -> None:
        end = self.runtime.now() + seconds
        while self.runtime.now() < end:
            self.runtime.advance(min(step, end - self.runtime.now()))

    def run_until(self, elapsed: float) -> None:
        """Run until ``elapsed`` seconds after the engine's start."""
        self.run_for(max(0.0, self.start + elapsed - self.runtime.now()))

    def run_until_done(self, uuids: list[str], limit: float = 6 * 3600) -> None:
        end = self.runtime.now() + limit
        while self.runtime.now() < end:
            if all(self.container(u).state.final for u in uuids):
                return
            self.runtime.advance(1.0)
        raise AssertionError("containers not final in time")

    def container(self, uuid: str) -> Container:
        ctr = self.disp.queue.get(uuid)
        assert ctr is not None
        return ctr

    def instances(self) -> list[InstanceView]:
        """Instances that exist (no pending creates, none shut down)."""
        return [
            v
            for v in self.disp.pool.instances()
            if v.instance and v.worker_state != WorkerState.SHUTDOWN
        ]

    def instance_of(self, uuid: str) -> str:
        return self.container(uuid).instance_id

    def status(self, uuid: str) -> str:
        """The container's scheduling status as of the last pass."""
        for item in self.disp.scheduler.snapshot():
            if item.entry.container.uuid == uuid:
                return item.scheduling_status
        return ""

    def stop(self, *, keep_runtime: bool = False) -> None:
        self.disp.stop()
        if not keep_runtime:
            self.runtime.shutdown()

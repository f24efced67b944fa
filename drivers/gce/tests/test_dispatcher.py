"""herder's engine with the gce driver against the fake Compute API.

The fake's instances cannot be logged in to (the executor never dials): the engine must create
and tag instances for a queued container, list them, and destroy them when they do not boot
within ``timeout_booting``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from herder.config import Config
from herder.engine.cloud_engine import CloudEngine
from herder.executor import ExecResult, Executor, ExecutorError
from herder.model import ContainerSpec, RuntimeConstraints
from herder.runtime import VirtualRuntime

from .conftest import IMAGE
from .fake_compute import FakeCompute

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "gce.yaml"


class Unreachable(Executor):
    def execute(
        self,
        command: str,
        stdin: bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        raise ExecutorError("connection refused")

    def set_target(self, instance: Any) -> None:
        pass

    def close(self) -> None:
        pass


def config(base_params: dict[str, Any]) -> Config:
    """The example configuration, pointed at the fake."""
    data = yaml.safe_load(EXAMPLE.read_text())
    data["containers"]["dispatch_private_key"] = ""
    data["cloud"]["driver_parameters"].update(base_params)
    data["cloud"].update(
        image_id=IMAGE,
        timeout_booting="30s",
        probe_interval="1s",
        poll_interval="1s",
        sync_interval="5s",
        timeout_shutdown="5s",
        deploy_public_key=False,
        deploy_runner=False,
        max_cloud_ops_per_second=0,
    )
    data["queue"] = {"path": ":memory:"}
    return Config.model_validate(data)


def test_engine_creates_tags_lists_and_destroys_instances(
    fake: FakeCompute, base_params: dict[str, Any]
) -> None:
    runtime = VirtualRuntime(strict=False)
    registry = CollectorRegistry()
    dispatcher = CloudEngine(
        config(base_params),
        runtime=runtime,
        registry=registry,
        executor_factory=lambda instance: Unreachable(),
    )
    try:
        dispatcher.start()
        dispatcher.queue.submit(
            ContainerSpec(
                command=("true",), runtime_constraints=RuntimeConstraints(vcpus=1, ram=1 << 30)
            )
        )
        runtime.advance(5)
        assert fake.instances, "no instance was created for the queued container"
        (zone, name), data = next(iter(fake.instances.items()))
        tags = json.loads(fake.metadata(zone, name)["herder-tags"])
        assert tags["HerderInstanceSetID"] == dispatcher.instance_set_id
        assert tags["HerderInstanceType"] == "e2-standard-2"
        assert data["labels"]["team"] == "data"
        assert data["machineType"].endswith("/machineTypes/e2-standard-2")
        assert (
            registry.get_sample_value(
                "herder_gce_instance_creates_total", {"zone": zone, "outcome": "success"}
            )
            >= 1
        )
        assert fake.calls("GET", r"/aggregated/instances$"), "the engine never listed"
        runtime.advance(60)
        assert (zone, name) not in fake.instances
        assert fake.calls("DELETE", rf"/instances/{name}$")
    finally:
        dispatcher.stop()
        runtime.shutdown()

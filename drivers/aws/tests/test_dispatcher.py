"""herder's engine with the aws driver against the EC2 emulator.

The emulator's instances cannot be logged in to, so the executor always fails to connect: the
engine must create and tag instances for a queued container, list them, and destroy them when
they do not boot within ``timeout_booting``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from herder.config import Config
from herder.dispatcher import CloudEngine
from herder.executor import ExecResult, Executor, ExecutorError
from herder.model import ContainerSpec, RuntimeConstraints
from herder.runtime import VirtualRuntime

from .conftest import IMAGE

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "aws.yaml"


class Unreachable(Executor):
    def execute(self, command: str, stdin: bytes | None = None,
                env: Mapping[str, str] | None = None, timeout: float | None = None) -> ExecResult:
        raise ExecutorError("connection refused")

    def set_target(self, instance: Any) -> None:
        pass

    def close(self) -> None:
        pass


def config() -> Config:
    data = yaml.safe_load(EXAMPLE.read_text())
    data["containers"]["dispatch_private_key"] = ""
    data["cloud"]["driver_parameters"] = {
        "region": "us-east-1", "resource_tags": {"Project": "herder"}}
    data["cloud"].update(image_id=IMAGE, timeout_booting="30s", probe_interval="1s",
                         poll_interval="1s", sync_interval="5s", timeout_shutdown="5s",
                         deploy_public_key=False, deploy_runner=False,
                         max_cloud_ops_per_second=0)
    data["queue"] = {"path": ":memory:"}
    return Config.model_validate(data)


def test_engine_creates_tags_lists_and_destroys_instances(ec2: Any) -> None:
    runtime = VirtualRuntime(strict=False)
    registry = CollectorRegistry()
    dispatcher = CloudEngine(config(), runtime=runtime, registry=registry,
                            executor_factory=lambda instance: Unreachable())
    try:
        dispatcher.start()
        dispatcher.queue.submit(ContainerSpec(
            command=("true",), runtime_constraints=RuntimeConstraints(vcpus=1, ram=1 << 30)))
        runtime.advance(5)
        reply = ec2.describe_instances()
        instances = [i for r in reply["Reservations"] for i in r["Instances"]]
        assert instances, "no instance was created for the queued container"
        first = instances[0]
        tags = {t["Key"]: t["Value"] for t in first["Tags"]}
        assert tags["HerderInstanceSetID"] == dispatcher.instance_set_id
        assert tags["HerderInstanceType"] == "m5.large"
        assert tags["Project"] == "herder"
        assert first["State"]["Name"] == "running"
        assert registry.get_sample_value(
            "herder_ec2_instance_starts_total", {"subnet_id": "", "success": "true"}) >= 1
        runtime.advance(60)
        state = ec2.describe_instances(InstanceIds=[first["InstanceId"]])
        assert state["Reservations"][0]["Instances"][0]["State"]["Name"] == "terminated"
    finally:
        dispatcher.stop()
        runtime.shutdown()

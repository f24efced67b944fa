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
from herder.engine.cloud_engine import CloudEngine
from herder.executor import ExecResult, Executor, ExecutorError
from herder.model import ContainerSpec, RuntimeConstraints
from herder.runtime import VirtualRuntime

from .conftest import IMAGE

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "aws.yaml"


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


def config() -> Config:
    data = yaml.safe_load(EXAMPLE.read_text())
    data["containers"]["dispatch_private_key"] = ""
    data["cloud"]["driver_parameters"] = {
        "region": "us-east-1",
        "resource_tags": {"Project": "herder"},
    }
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


def test_engine_creates_tags_lists_and_destroys_instances(ec2: Any) -> None:
    runtime = VirtualRuntime(strict=False)
    registry = CollectorRegistry()
    dispatcher = CloudEngine(
        config(),
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
        reply = ec2.describe_instances()
        instances = [i for r in reply["Reservations"] for i in r["Instances"]]
        assert instances, "no instance was created for the queued container"
        first = instances[0]
        tags = {t["Key"]: t["Value"] for t in first["Tags"]}
        assert tags["HerderInstanceSetID"] == dispatcher.instance_set_id
        assert tags["HerderInstanceType"] == "m5.large"
        assert tags["Project"] == "herder"
        assert first["State"]["Name"] == "running"
        assert (
            registry.get_sample_value(
                "herder_ec2_instance_starts_total", {"subnet_id": "", "success": "true"}
            )
            >= 1
        )
        runtime.advance(60)
        state = ec2.describe_instances(InstanceIds=[first["InstanceId"]])
        assert state["Reservations"][0]["Instances"][0]["State"]["Name"] == "terminated"
    finally:
        dispatcher.stop()
        runtime.shutdown()


def test_engine_stops_short_of_a_full_vcpu_quota_and_names_it(ec2: Any, monkeypatch: Any) -> None:
    # moto's Service Quotas knows only VPC quotas: answer the standard vCPU quota as AWS does.
    from moto.servicequotas.models import ServiceQuotasBackend

    def get_service_quota(self: Any, service_code: str, quota_code: str) -> dict[str, Any]:
        assert service_code == "ec2"
        return {
            "ServiceCode": "ec2",
            "QuotaCode": quota_code,
            "QuotaName": "Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances",
            "Value": 4.0,
        }

    monkeypatch.setattr(ServiceQuotasBackend, "get_service_quota", get_service_quota)
    # Someone else's instance already takes 2 of the 4 vCPUs: room for one m5.large.
    ec2.run_instances(ImageId=IMAGE, MinCount=1, MaxCount=1, InstanceType="m5.large")
    cfg = config()
    params = {**cfg.cloud.driver_parameters, "quota_codes": {"standard": "L-1216C47A"}}
    cfg = cfg.model_copy(
        update={
            "cloud": cfg.cloud.model_copy(
                update={"driver_parameters": params, "timeout_booting": 600.0}
            )
        }
    )
    runtime = VirtualRuntime(strict=False)
    dispatcher = CloudEngine(
        cfg,
        runtime=runtime,
        registry=CollectorRegistry(),
        executor_factory=lambda instance: Unreachable(),
    )
    try:
        dispatcher.start()
        uuids = [
            dispatcher.queue.submit(
                ContainerSpec(
                    command=("true",), runtime_constraints=RuntimeConstraints(vcpus=2, ram=1 << 30)
                )
            ).uuid
            for _ in range(2)
        ]
        runtime.advance(5)
        ours = [v for v in dispatcher.pool.instances() if v.instance_type == "m5.large"]
        assert len(ours) == 1  # the second would overflow the quota: not even tried
        statuses = dispatcher.scheduler.snapshot()
        waiting = [s.scheduling_status for s in statuses if s.entry.container.uuid in uuids]
        assert any(
            "Cloud quota full: Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) "
            "instances (L-1216C47A): 4 of 4 vcpus in use, type m5.large needs 2" in s
            for s in waiting
        ), waiting
        (quota,) = dispatcher.quota_states()
        # Read before herder's create; the create counts as pending until the next read.
        assert (quota.quota.usage, quota.pending, quota.herder, quota.wanted) == (2, 2, 2, 2)
    finally:
        dispatcher.stop()
        runtime.shutdown()

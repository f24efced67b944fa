"""The conformance suite against the EC2 emulator, through the real boto3 client.

Quota, capacity and rate-limit errors cannot happen in the emulator, so the hooks make the
emulated RunInstances fail with AWS's own error codes (the backend raises them exactly as EC2
sends them: an HTTP 400 with the code and message).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest
from herder_driver_aws.driver import AWSDriver
from moto.ec2.exceptions import EC2ClientError
from moto.ec2.models.instances import InstanceBackend

from herder.cloud import Instance
from herder.model import GPUSpec, InstanceType
from herder.testing.conformance import *  # noqa: F403  (collects TestDriverConformance)
from herder.testing.conformance import BootRecord, ConformanceHarness, ConformanceTarget

ON_DEMAND = InstanceType(
    name="m5.large", provider_type="m5.large", vcpus=2, ram=8 << 30, price=0.096
)
SPOT = InstanceType(
    name="m5.large.spot",
    provider_type="m5.large",
    vcpus=2,
    ram=8 << 30,
    price=0.04,
    preemptible=True,
)
GPU = InstanceType(
    name="g5.xlarge",
    provider_type="g5.xlarge",
    vcpus=4,
    ram=16 << 30,
    price=1.006,
    gpu=GPUSpec(stack="cuda", device_count=1, vram=24 << 30),
)


def _failing_run(code: str, message: str) -> Any:
    def run_instances(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise EC2ClientError(code, message)

    return run_instances


def _boot_record(ec2: Any) -> Any:
    """What EC2 was told: the instance's user data and its key pair's public key."""

    def hook(h: ConformanceHarness, instance: Instance) -> BootRecord:
        attr = ec2.describe_instance_attribute(InstanceId=instance.id, Attribute="userData")
        user_data = base64.b64decode(attr["UserData"].get("Value", "")).decode()
        reply = ec2.describe_instances(InstanceIds=[instance.id])
        key_name = reply["Reservations"][0]["Instances"][0].get("KeyName")
        keys: list[str] = []
        if key_name:
            pairs = ec2.describe_key_pairs(KeyNames=[key_name], IncludePublicKey=True)
            keys = [p.get("PublicKey", "") for p in pairs["KeyPairs"]]
        return BootRecord(init_command=user_data, public_keys=keys)

    return hook


@pytest.fixture
def conformance_target(
    ec2: Any, monkeypatch: pytest.MonkeyPatch, client_tokens: dict[str, Any]
) -> Iterator[ConformanceTarget]:
    def provoke(code: str, message: str) -> Any:
        def hook(h: ConformanceHarness) -> None:
            with monkeypatch.context() as m:
                m.setattr(InstanceBackend, "run_instances", _failing_run(code, message))
                h.create()

        return hook

    # moto's Service Quotas knows only VPC quotas: answer EC2's vCPU quotas as AWS does.
    from moto.servicequotas.models import ServiceQuotasBackend

    original = ServiceQuotasBackend.get_service_quota

    def get_service_quota(self: Any, service_code: str, quota_code: str) -> dict[str, Any]:
        if service_code == "ec2":
            return {
                "ServiceCode": "ec2",
                "QuotaCode": quota_code,
                "QuotaName": quota_code,
                "Value": 64.0,
            }
        return original(self, service_code, quota_code)

    monkeypatch.setattr(ServiceQuotasBackend, "get_service_quota", get_service_quota)
    yield ConformanceTarget(
        driver=AWSDriver(),
        params={"region": "us-east-1"},
        image_id="ami-12c6146b",
        instance_types=[ON_DEMAND, SPOT, GPU],
        provoke_quota_error=provoke("InstanceLimitExceeded", "You have requested more instances"),
        provoke_capacity_error=provoke(
            "InsufficientInstanceCapacity", "We currently do not have sufficient m5.large capacity"
        ),
        provoke_rate_limit_error=provoke("RequestLimitExceeded", "Request limit exceeded."),
        boot_record=_boot_record(ec2),
        strict=True,
    )

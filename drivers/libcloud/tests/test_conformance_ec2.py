"""herder's conformance suite, strict, through libcloud's EC2 driver (the ``ec2`` preset),
against moto's in-process EC2 emulator (``mock_aws`` intercepts libcloud's HTTP calls, so
nothing leaves the process).

Emulator quirks, compensated here for the test's duration only: moto answers in the EC2 XML
namespace without libcloud's trailing ``/`` (every listing would be quietly empty), and puts
that namespace on error replies too, which EC2 does not (libcloud would find no error code).
libcloud's default SigV2 signing, which moto routes elsewhere, the preset itself replaces.
Quota, capacity and rate-limit errors are made by the emulated RunInstances failing with EC2's
own error codes.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import boto3
import libcloud.compute.drivers.ec2 as libcloud_ec2
import pytest
from herder_driver_libcloud.driver import LibcloudDriver
from moto import mock_aws
from moto.ec2.exceptions import EC2ClientError
from moto.ec2.models.instances import InstanceBackend

from herder.cloud import Instance
from herder.model import GPUSpec, InstanceType
from herder.testing.conformance import *  # noqa: F403  (collects TestDriverConformance)
from herder.testing.conformance import BootRecord, ConformanceHarness, ConformanceTarget

REGION = "us-east-1"
IMAGE = "ami-12c6146b"
SMALL = InstanceType(name="m5.large", provider_type="m5.large", vcpus=2, ram=8 << 30)
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
MOTO_NAMESPACE = "http://ec2.amazonaws.com/doc/2016-11-15"


@pytest.fixture
def ec2(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setattr(libcloud_ec2, "NAMESPACE", MOTO_NAMESPACE)
    parse_error = libcloud_ec2.EC2Response.parse_error

    def as_ec2_sends_it(self: Any) -> Any:
        self.body = self.body.replace(f' xmlns="{MOTO_NAMESPACE}"', "")
        return parse_error(self)

    monkeypatch.setattr(libcloud_ec2.EC2Response, "parse_error", as_ec2_sends_it)
    with mock_aws():
        yield boto3.client("ec2", region_name=REGION)


def _failing_run(code: str, message: str) -> Any:
    def run_instances(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise EC2ClientError(code, message)

    return run_instances


def _boot_record(ec2: Any) -> Any:
    def hook(h: ConformanceHarness, instance: Instance) -> BootRecord:
        attr = ec2.describe_instance_attribute(InstanceId=instance.id, Attribute="userData")
        script = base64.b64decode(attr["UserData"].get("Value", "")).decode()
        keys = [
            line.split("echo ", 1)[1].split(" >>", 1)[0].strip("'")
            for line in script.splitlines()
            if line.startswith("echo ")
        ]
        return BootRecord(init_command=script, public_keys=keys)

    return hook


@pytest.fixture
def conformance_target(
    ec2: Any, monkeypatch: pytest.MonkeyPatch, client_tokens: dict[str, Any]
) -> ConformanceTarget:
    def provoke(code: str, message: str) -> Any:
        def hook(h: ConformanceHarness) -> None:
            with monkeypatch.context() as m:
                m.setattr(InstanceBackend, "run_instances", _failing_run(code, message))
                h.create()

        return hook

    return ConformanceTarget(
        driver=LibcloudDriver(),
        params={
            "provider": "ec2",
            "key": {"env": "AWS_ACCESS_KEY_ID"},
            "secret": {"env": "AWS_SECRET_ACCESS_KEY"},
            "options": {"region": REGION},
        },
        image_id=IMAGE,
        instance_types=[SMALL, SPOT, GPU],
        provoke_quota_error=provoke("InstanceLimitExceeded", "You have requested more instances"),
        provoke_capacity_error=provoke(
            "InsufficientInstanceCapacity", "We currently do not have sufficient m5.large capacity"
        ),
        provoke_rate_limit_error=provoke("RequestLimitExceeded", "Request limit exceeded."),
        boot_record=_boot_record(ec2),
        strict=True,
    )


def test_a_preemptible_type_is_a_spot_instance_at_its_price(ec2: Any) -> None:
    from herder.cloud import DriverContext

    driver = LibcloudDriver()
    params = driver.validate_parameters(
        {
            "provider": "ec2",
            "key": {"env": "AWS_ACCESS_KEY_ID"},
            "secret": {"env": "AWS_SECRET_ACCESS_KEY"},
            "options": {"region": REGION},
        }
    )
    iset = driver.instance_set(params, DriverContext(instance_set_id="spot-test"))
    requests: list[dict[str, Any]] = []
    original = InstanceBackend.run_instances

    def recording(self: Any, *args: Any, **kwargs: Any) -> Any:
        requests.append(kwargs)
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(InstanceBackend, "run_instances", recording)
        spot = iset.create(SPOT, IMAGE, {"HerderInstanceSetID": "spot-test"}, "true", None)
        on_demand = iset.create(SMALL, IMAGE, {"HerderInstanceSetID": "spot-test"}, "true", None)
    lifecycle = {
        i["InstanceId"]: i.get("InstanceLifecycle", "on-demand")
        for r in ec2.describe_instances()["Reservations"]
        for i in r["Instances"]
    }
    assert lifecycle == {spot.id: "spot", on_demand.id: "on-demand"}
    assert requests[0]["instance_market_options"] == "spot"
    assert not requests[1]["instance_market_options"]

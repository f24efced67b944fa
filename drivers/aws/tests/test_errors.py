"""Error classification (SPEC §16.2 wrapError), with botocore's real error shapes (Stubber)."""

from __future__ import annotations

from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from herder_driver_aws.driver import AWSDriver, AWSInstanceSet
from herder_driver_aws.errors import THROTTLE_CODES, AWSError, Backoff, is_subnet_specific

from herder.cloud import CapacityError, DriverContext, QuotaError, RateLimitError
from herder.model import InstanceType
from herder.runtime import VirtualRuntime

SMALL = InstanceType(name="small", provider_type="m5.large", vcpus=2, ram=8 << 30)
OWNER = {"HerderInstanceSetID": "x"}


def stubbed(runtime: VirtualRuntime | None = None) -> tuple[AWSInstanceSet, Stubber]:
    client = boto3.client("ec2", region_name="us-east-1")
    params = AWSDriver.validate_parameters({"region": "us-east-1"})
    iset = AWSInstanceSet(
        params,  # type: ignore[arg-type]
        DriverContext(instance_set_id="x", runtime=runtime),
        client=client,
    )
    return iset, Stubber(client)


def fail(stub: Stubber, op: str, code: str, message: str = "m") -> None:
    stub.add_client_error(
        op, service_error_code=code, service_message=message, http_status_code=400
    )


def create(iset: AWSInstanceSet) -> Any:
    return iset.create(SMALL, "ami-1", OWNER, "", None)


@pytest.mark.parametrize("code", sorted(THROTTLE_CODES))
def test_throttle_codes_are_rate_limits_with_growing_backoff(code: str) -> None:
    runtime = VirtualRuntime()
    iset, stub = stubbed(runtime)
    waits = []
    with stub:
        for _ in range(3):
            fail(stub, "run_instances", code)
            with pytest.raises(RateLimitError) as info:
                create(iset)
            waits.append(info.value.earliest_retry - runtime.now())
    assert waits == [1.0, 2.5, 4.75]
    runtime.shutdown()


@pytest.mark.parametrize(
    "code",
    [
        "InstanceLimitExceeded",
        "InsufficientAddressCapacity",
        "InsufficientFreeAddressesInSubnet",
        "InsufficientVolumeCapacity",
        "MaxSpotInstanceCountExceeded",
    ],
)
def test_quota_codes_are_quota_errors(code: str) -> None:
    iset, stub = stubbed()
    with stub:
        fail(stub, "run_instances", code)
        with pytest.raises(QuotaError, match=code):
            create(iset)


@pytest.mark.parametrize(
    ("code", "message", "type_specific", "group_specific"),
    [
        ("VcpuLimitExceeded", "You have requested more vCPU capacity", False, True),
        ("InsufficientInstanceCapacity", "no m5.large capacity", True, False),
        ("Unsupported", "Your requested instance type (m5.large) is not supported", True, False),
    ],
)
def test_capacity_codes(code: str, message: str, type_specific: bool, group_specific: bool) -> None:
    iset, stub = stubbed()
    with stub:
        fail(stub, "run_instances", code, message)
        with pytest.raises(CapacityError) as info:
            create(iset)
    assert (info.value.instance_type_specific, info.value.quota_group_specific) == (
        type_specific,
        group_specific,
    )


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("Unsupported", "The feature is not supported"),
        ("InvalidAMIID.NotFound", "The image id '[ami-1]' does not exist"),
        ("UnauthorizedOperation", "You are not authorized"),
    ],
)
def test_other_errors_keep_the_aws_code_and_message(code: str, message: str) -> None:
    iset, stub = stubbed()
    with stub:
        fail(stub, "run_instances", code, message)
        with pytest.raises(AWSError) as info:
            create(iset)
    assert info.value.code == code and message in str(info.value)
    assert not isinstance(info.value, CapacityError | QuotaError | RateLimitError)


def test_list_errors_are_classified_with_their_own_backoff() -> None:
    runtime = VirtualRuntime()
    iset, stub = stubbed(runtime)
    with stub:
        fail(stub, "run_instances", "RequestLimitExceeded")
        with pytest.raises(RateLimitError):
            create(iset)
        fail(stub, "describe_instances", "RequestLimitExceeded")
        with pytest.raises(RateLimitError) as info:
            iset.instances(OWNER)
    assert info.value.earliest_retry - runtime.now() == 1.0
    runtime.shutdown()


def test_quota_and_capacity_answers_reset_the_backoff() -> None:
    """Unlike Arvados (SPEC §19 item 34): any non-throttle answer means calls get through."""
    runtime = VirtualRuntime()
    iset, stub = stubbed(runtime)
    with stub:
        for code in (
            "RequestLimitExceeded",
            "RequestLimitExceeded",
            "InstanceLimitExceeded",
            "RequestLimitExceeded",
        ):
            fail(stub, "run_instances", code)
            with pytest.raises((RateLimitError, QuotaError)) as info:
                create(iset)
    assert isinstance(info.value, RateLimitError)
    assert info.value.earliest_retry - runtime.now() == 1.0
    runtime.shutdown()


def test_backoff_is_capped_at_a_minute() -> None:
    backoff = Backoff()
    delays = [backoff.grow() for _ in range(20)]
    assert delays[0] == 1.0 and max(delays) == 60.0 and delays[-1] == 60.0


@pytest.mark.parametrize(
    ("code", "message", "specific"),
    [
        ("InvalidSubnetID.NotFound", "", True),
        ("InsufficientInstanceCapacity", "", True),
        ("InsufficientVolumeCapacity", "", True),
        ("Unsupported", "anything", True),
        ("InvalidParameterValue", "Invalid value for image", False),
        ("InvalidParameterValue", "the subnet subnet-1 is full", True),
        ("InvalidParameterCombination", "not sufficient free Ipv6 addresses", True),
        ("InstanceLimitExceeded", "", False),
    ],
)
def test_subnet_specific_errors(code: str, message: str, specific: bool) -> None:
    assert is_subnet_specific(code, message) is specific

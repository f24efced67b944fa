"""Quota headroom on AWS: Service Quotas limits (botocore Stubber: moto does not answer
GetServiceQuota for EC2) with usage counted from the emulated account's instances (moto)."""

from __future__ import annotations

from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from herder_driver_aws.driver import AWSDriver, AWSInstanceSet
from herder_driver_aws.params import AWSParameters

from herder.cloud import Capability, DriverContext, Quota, QuotaUnit, RateLimitError

from .conftest import IMAGE, REGION


def quota_reply(code: str, name: str, value: float) -> dict[str, Any]:
    return {"Quota": {"ServiceCode": "ec2", "QuotaCode": code, "QuotaName": name, "Value": value}}


def make_set(ec2: Any, **params: Any) -> tuple[AWSInstanceSet, Stubber]:
    validated = AWSDriver.validate_parameters({"region": REGION, **params})
    assert isinstance(validated, AWSParameters)
    quotas_client = boto3.client("service-quotas", region_name=REGION)
    iset = AWSInstanceSet(
        validated, DriverContext(instance_set_id="x"), client=ec2, quotas_client=quotas_client
    )
    return iset, Stubber(quotas_client)


def test_the_driver_declares_quota_headroom() -> None:
    params = AWSDriver.validate_parameters({"region": REGION})
    assert Capability.QUOTA_HEADROOM in AWSDriver().capabilities_for(params)


def test_quotas_read_limits_from_service_quotas_and_count_every_instance_of_the_account(
    ec2: Any,
) -> None:
    # Someone else's instances count too: the quota is the account's.
    ec2.run_instances(ImageId=IMAGE, MinCount=2, MaxCount=2, InstanceType="m5.xlarge")
    ec2.run_instances(ImageId=IMAGE, MinCount=1, MaxCount=1, InstanceType="g4dn.xlarge")
    gone = ec2.run_instances(ImageId=IMAGE, MinCount=1, MaxCount=1, InstanceType="c5.large")
    ec2.terminate_instances(InstanceIds=[gone["Instances"][0]["InstanceId"]])
    iset, stub = make_set(
        ec2,
        quota_codes={"standard": "L-1216C47A", "g": "L-DB2E81BA", "standard-spot": "L-34B43A08"},
    )
    stub.add_response(
        "get_service_quota",
        quota_reply("L-DB2E81BA", "Running On-Demand G and VT instances", 8.0),
        {"ServiceCode": "ec2", "QuotaCode": "L-DB2E81BA"},
    )
    stub.add_response(
        "get_service_quota",
        quota_reply("L-1216C47A", "Running On-Demand Standard instances", 32.0),
        {"ServiceCode": "ec2", "QuotaCode": "L-1216C47A"},
    )
    stub.add_client_error(
        "get_service_quota",
        service_error_code="NoSuchResourceException",
        service_message="not in this region",
    )
    with stub:
        quotas = iset.quotas()
    stub.assert_no_pending_responses()
    assert quotas == [
        Quota(
            group="g",
            name="L-DB2E81BA",
            limit=8.0,
            usage=4.0,
            unit=QuotaUnit.VCPUS,
            description="Running On-Demand G and VT instances",
        ),
        Quota(
            group="standard",
            name="L-1216C47A",
            limit=32.0,
            usage=8.0,
            unit=QuotaUnit.VCPUS,
            description="Running On-Demand Standard instances",
        ),
    ]


def test_a_throttled_quota_read_is_a_rate_limit_error(ec2: Any) -> None:
    iset, stub = make_set(ec2, quota_codes={"standard": "L-1216C47A"})
    stub.add_client_error(
        "get_service_quota",
        service_error_code="TooManyRequestsException",
        service_message="slow down",
    )
    with stub, pytest.raises(RateLimitError):
        iset.quotas()


def test_p5_instances_count_under_the_p_quota_with_the_default_tables(ec2: Any) -> None:
    """AWS has no P5 quota: a P5 instance uses "Running On-Demand P instances" (L-417A185B)
    with the P4s, and herder asks Service Quotas for no other P code."""
    ec2.run_instances(ImageId=IMAGE, MinCount=1, MaxCount=1, InstanceType="p5.48xlarge")
    ec2.run_instances(ImageId=IMAGE, MinCount=1, MaxCount=1, InstanceType="p4d.24xlarge")
    iset, stub = make_set(ec2)  # the default groups and codes
    asked: list[str] = []
    for group, code in sorted(iset.params.quota_codes.items()):
        asked.append(code)
        if group == "p":
            stub.add_response(
                "get_service_quota",
                quota_reply(code, "Running On-Demand P instances", 384.0),
                {"ServiceCode": "ec2", "QuotaCode": code},
            )
        else:
            stub.add_client_error(
                "get_service_quota",
                service_error_code="NoSuchResourceException",
                service_message="left out of this test",
            )
    with stub:
        quotas = iset.quotas()
    stub.assert_no_pending_responses()
    assert asked.count("L-417A185B") == 1 and "p5" not in iset.params.quota_codes
    assert [(q.group, q.name, q.limit, q.usage) for q in quotas] == [
        ("p", "L-417A185B", 384.0, 192.0 + 96.0)  # p5.48xlarge, p4d.24xlarge
    ]

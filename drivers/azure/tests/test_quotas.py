"""Quota headroom on Azure: vCPU quotas per VM family and for spot from compute usage.list,
against the fake ARM server."""

from __future__ import annotations

from typing import Any

import pytest
from herder_driver_azure.driver import AzureDriver

from herder.cloud import Capability, QuotaUnit, RateLimitError
from herder.model import InstanceType

from .fakearm import FakeARM

D4S = InstanceType(name="d4s", provider_type="Standard_D4s_v3", vcpus=4, ram=16 << 30)
D4S_SPOT = InstanceType(
    name="d4s.spot", provider_type="Standard_D4s_v3", vcpus=4, ram=16 << 30, preemptible=True
)


def usage(value: str, label: str, current: int, limit: int) -> dict[str, Any]:
    return {
        "name": {"value": value, "localizedValue": label},
        "currentValue": current,
        "limit": limit,
        "unit": "Count",
    }


def test_the_driver_declares_quota_headroom() -> None:
    assert Capability.QUOTA_HEADROOM in AzureDriver.capabilities


def test_family_and_spot_quotas_come_from_usage_list_in_the_groups_sizes_have(
    fake: FakeARM, make_set: Any
) -> None:
    fake.usages["westeurope"] = [
        usage("availabilitySets", "Availability Sets", 0, 2500),
        usage("cores", "Total Regional vCPUs", 12, 100),
        usage("standardDSv3Family", "Standard DSv3 Family vCPUs", 8, 10),
        usage("lowPriorityCores", "Total Regional Low-priority vCPUs", 0, 20),
    ]
    iset = make_set()
    quotas = iset.quotas()
    assert [(q.name, q.group, q.limit, q.usage, q.unit, q.description) for q in quotas] == [
        (
            "standardDSv3Family",
            "standardDSv3Family",
            10.0,
            8.0,
            QuotaUnit.VCPUS,
            "Standard DSv3 Family vCPUs",
        ),
        (
            "lowPriorityCores",
            "lowPriority",
            20.0,
            0.0,
            QuotaUnit.VCPUS,
            "Total Regional Low-priority vCPUs",
        ),
    ]
    assert iset.quota_group(D4S) == "standardDSv3Family"
    assert iset.quota_group(D4S_SPOT) == "lowPriority"
    assert fake.calls("GET", "/locations/westeurope/usages")


def test_a_throttled_usage_read_is_a_rate_limit_error(fake: FakeARM, make_set: Any) -> None:
    fake.fail("GET", "/usages", 429, "TooManyRequests", "slow down", {"Retry-After": "5"})
    with pytest.raises(RateLimitError):
        make_set().quotas()

"""Quota headroom on GCE: the region's quotas from regions.get on the fake Compute API."""

from __future__ import annotations

from typing import Any

import pytest
from herder_driver_gce.driver import GCEDriver

from herder.cloud import Capability, Quota, QuotaUnit, RateLimitError
from herder.model import GPUSpec, InstanceType

from .fake_compute import Failure, FakeCompute

E2 = InstanceType(name="e2", provider_type="e2-standard-4", vcpus=4, ram=16 << 30)
N2_SPOT = InstanceType(
    name="n2s", provider_type="n2-standard-4", vcpus=4, ram=16 << 30, preemptible=True
)
T4 = InstanceType(
    name="t4",
    provider_type="n1-standard-8",
    vcpus=8,
    ram=30 << 30,
    gpu=GPUSpec(stack="cuda", device_count=2, hardware_target="7.5"),
)


def test_the_driver_declares_quota_headroom() -> None:
    assert Capability.QUOTA_HEADROOM in GCEDriver.capabilities


def test_quotas_are_the_regions_cpu_and_gpu_quotas_in_the_groups_types_have(
    fake: FakeCompute, make_set: Any
) -> None:
    fake.region_quotas["us-central1"] = [
        {"metric": "CPUS", "limit": 24.0, "usage": 20.0},
        {"metric": "N2_CPUS", "limit": 100.0, "usage": 0.0},
        {"metric": "PREEMPTIBLE_CPUS", "limit": 8.0, "usage": 8.0},
        {"metric": "NVIDIA_T4_GPUS", "limit": 4.0, "usage": 1.0},
        {"metric": "IN_USE_ADDRESSES", "limit": 8.0, "usage": 1.0},
    ]
    iset = make_set()
    quotas = iset.quotas()
    assert [(q.name, q.group, q.limit, q.usage, q.unit) for q in quotas] == [
        ("CPUS", "cpus", 24.0, 20.0, QuotaUnit.VCPUS),
        ("N2_CPUS", "n2_cpus", 100.0, 0.0, QuotaUnit.VCPUS),
        ("PREEMPTIBLE_CPUS", "preemptible_cpus", 8.0, 8.0, QuotaUnit.VCPUS),
        ("NVIDIA_T4_GPUS", "nvidia_t4_gpus", 4.0, 1.0, QuotaUnit.GPUS),
    ]
    by_group = {q.group: q for q in quotas}
    assert iset.quota_group(E2) == "cpus"
    t4 = by_group[iset.quota_group(T4)]
    assert isinstance(t4, Quota) and t4.need(T4) == 2  # GPUs, not vCPUs
    assert iset.quota_group(N2_SPOT) == "preemptible_n2_cpus"  # no such quota: not checked
    assert fake.calls("GET", r"/regions/us-central1$")


def test_a_rate_limited_quota_read_is_a_rate_limit_error(fake: FakeCompute, make_set: Any) -> None:
    fake.region_quotas["us-central1"] = []
    fake.fail("region", Failure(403, "rateLimitExceeded", "Rate Limit Exceeded"))
    with pytest.raises(RateLimitError):
        make_set().quotas()

"""herder's conformance suite against the fake ARM API, through the real Azure clients.

The fake makes the typed errors happen as Azure does: a quota refusal and an allocation
failure of the VM create (the latter in its long-running operation), and a 429 with
``Retry-After``.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from herder_driver_azure.driver import AzureDriver

from herder.cloud import Instance
from herder.model import GPUSpec, InstanceType
from herder.testing.conformance import *  # noqa: F403  (collects TestDriverConformance)
from herder.testing.conformance import BootRecord, ConformanceHarness, ConformanceTarget

from .conftest import base_params
from .fakearm import FakeARM

ON_DEMAND = InstanceType(
    name="Standard_D2s_v5", provider_type="Standard_D2s_v5", vcpus=2, ram=8 << 30, price=0.096
)
SPOT = InstanceType(
    name="Standard_D2s_v5.spot",
    provider_type="Standard_D2s_v5",
    vcpus=2,
    ram=8 << 30,
    price=0.03,
    preemptible=True,
)
GPU = InstanceType(
    name="Standard_NC4as_T4_v3",
    provider_type="Standard_NC4as_T4_v3",
    vcpus=4,
    ram=28 << 30,
    price=0.526,
    gpu=GPUSpec(stack="cuda", device_count=1, vram=16 << 30),
)


@pytest.fixture
def conformance_target(fake: FakeARM, secret_file: Path) -> ConformanceTarget:
    def quota(h: ConformanceHarness) -> None:
        fake.fail(
            "PUT",
            "/virtualMachines/",
            409,
            "OperationNotAllowed",
            "Operation could not be completed as it results in exceeding approved "
            "Total Regional Cores quota.",
        )
        h.create()

    def capacity(h: ConformanceHarness) -> None:
        fake.fail_next_create(
            "AllocationFailed",
            "Allocation failed. We do not have "
            "sufficient capacity for the requested VM size in this region.",
        )
        h.create()

    def rate_limit(h: ConformanceHarness) -> None:
        fake.fail(
            "PUT", "/networkInterfaces/", 429, "TooManyRequests", "throttled", {"Retry-After": "17"}
        )
        h.create()

    def boot_record(h: ConformanceHarness, instance: Instance) -> BootRecord:
        # The fake boots nothing: read the custom data and SSH keys the VM was created with.
        name: Any = getattr(instance, "name", instance.id.rsplit("/", 1)[-1])
        profile = fake.vm(str(name))["properties"]["osProfile"]
        keys = profile.get("linuxConfiguration", {}).get("ssh", {}).get("publicKeys", [])
        return BootRecord(
            init_command=base64.b64decode(profile.get("customData", "")).decode(),
            public_keys=[k.get("keyData", "") for k in keys],
        )

    fake.usages["westeurope"] = [
        {
            "name": {"value": "standardDSv5Family", "localizedValue": "Standard DSv5 Family vCPUs"},
            "currentValue": 0,
            "limit": 64,
            "unit": "Count",
        },
        {
            "name": {"value": "lowPriorityCores", "localizedValue": "Low-priority vCPUs"},
            "currentValue": 0,
            "limit": 64,
            "unit": "Count",
        },
    ]
    return ConformanceTarget(
        driver=AzureDriver(),
        params=base_params(fake, secret_file),
        image_id="Debian:debian-12:12-gen2:latest",
        instance_types=[ON_DEMAND, SPOT, GPU],
        provoke_quota_error=quota,
        provoke_capacity_error=capacity,
        provoke_rate_limit_error=rate_limit,
        boot_record=boot_record,
        strict=True,
    )

"""Run herder's conformance suite against the example driver.

``from herder.testing.conformance import *`` brings in the suite's tests; the
``conformance_target`` fixture says what to test them on.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from herder.cloud import Instance
from herder.model import InstanceType
from herder.ssh.server import generate_key_file
from herder.testing.conformance import *  # noqa: F403
from herder.testing.conformance import BootRecord, ConformanceHarness, ConformanceTarget

from herder_driver_example.driver import ExampleDriver, cloud_for

MAX_INSTANCES = 4


def provoke_quota(harness: ConformanceHarness) -> None:
    """Create one instance more than the account allows: the driver must raise QuotaError."""
    for _ in range(MAX_INSTANCES + 1):
        harness.create()


def boot_record(harness: ConformanceHarness, instance: Instance) -> BootRecord:
    """What the provider was told to run at first boot and to let log in.

    A fake cloud boots no real VM, so the suite asks it; against a real cloud, give
    ``private_key_path`` and the suite logs in and reads what the init command wrote.
    """
    account = harness.target.validated_params().model_dump()["account"]
    vm = cloud_for(account).vms[instance.id]
    return BootRecord(init_command=vm.init_command, public_keys=vm.authorized_keys)


@pytest.fixture
def conformance_target(tmp_path: Path) -> ConformanceTarget:
    key = tmp_path / "id_ed25519"
    generate_key_file(key)
    return ConformanceTarget(
        driver=ExampleDriver(),
        # A fresh account per test, so one test's instances never count against another's.
        params={"account": uuid.uuid4().hex, "max_instances": MAX_INSTANCES},
        instance_types=[InstanceType(name="small", provider_type="ex.small", vcpus=1, ram=1 << 30)],
        private_key_path=str(key),
        max_instances=MAX_INSTANCES,
        boot_timeout=20,
        provoke_quota_error=provoke_quota,
        boot_record=boot_record,
        strict=True,  # fail, not skip, what the suite cannot check
    )

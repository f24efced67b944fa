"""The conformance suite against the loopback driver: real SSH servers on this host.

Each instance set gets its own state directory (one set per directory is the loopback rule);
commands run through herder's SSH executor with a key made for the test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from herder_driver_loopback.driver import LoopbackDriver, LoopbackParameters

from herder.cloud import DriverContext, InstanceSet
from herder.model import InstanceType
from herder.ssh.server import generate_key_file
from herder.testing.conformance import *  # noqa: F403  (collects TestDriverConformance)
from herder.testing.conformance import ConformanceHarness, ConformanceTarget

SMALL = InstanceType(name="small", provider_type="lb.small", vcpus=1, ram=1 << 30)
MAX_INSTANCES = 4


@pytest.fixture
def conformance_target(tmp_path: Path) -> ConformanceTarget:
    key_path = tmp_path / "id_ed25519"
    generate_key_file(key_path)

    def instance_set(context: DriverContext) -> InstanceSet:
        params = LoopbackParameters(
            state_dir=str(tmp_path / context.instance_set_id), max_instances=MAX_INSTANCES
        )
        return LoopbackDriver().instance_set(params, context)

    def provoke_quota(h: ConformanceHarness) -> None:
        for _ in range(MAX_INSTANCES + 1):
            h.create()

    return ConformanceTarget(
        driver=LoopbackDriver(),
        params={"state_dir": str(tmp_path / "default"), "max_instances": MAX_INSTANCES},
        instance_types=[SMALL],
        instance_set_factory=instance_set,
        private_key_path=str(key_path),
        max_instances=MAX_INSTANCES,
        boot_timeout=20.0,
        provoke_quota_error=provoke_quota,
    )


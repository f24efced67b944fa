"""The conformance suite against the loopback driver: real SSH servers on this host.

Each instance set gets its own state directory (one set per directory is the loopback rule);
commands run through herder's SSH executor with a key made for the test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from herder_driver_loopback.driver import (
    INIT_COMMAND_FILE,
    RECORD_FILE,
    LoopbackDriver,
    LoopbackInstance,
    LoopbackParameters,
)

from herder.cloud import DriverContext, Instance, InstanceSet
from herder.model import InstanceType
from herder.ssh.server import generate_key_file
from herder.testing.conformance import *  # noqa: F403  (collects TestDriverConformance)
from herder.testing.conformance import BootRecord, ConformanceHarness, ConformanceTarget

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

    def boot_record(h: ConformanceHarness, instance: Instance) -> BootRecord:
        # The loopback host is this machine: the driver keeps the init command (it never runs
        # it; its host keys are checked instead) and authorizes the key in its record.
        assert isinstance(instance, LoopbackInstance)
        record = json.loads((instance.directory / RECORD_FILE).read_text())
        return BootRecord(
            init_command=(instance.directory / INIT_COMMAND_FILE).read_text(),
            public_keys=record["authorized_keys"],
        )

    return ConformanceTarget(
        driver=LoopbackDriver(),
        params={"state_dir": str(tmp_path / "default"), "max_instances": MAX_INSTANCES},
        instance_types=[SMALL],
        instance_set_factory=instance_set,
        private_key_path=str(key_path),
        max_instances=MAX_INSTANCES,
        boot_timeout=20.0,
        provoke_quota_error=provoke_quota,
        boot_record=boot_record,
        strict=True,
    )

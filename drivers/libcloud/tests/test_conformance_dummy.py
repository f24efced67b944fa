"""herder's conformance suite, strict, against libcloud's dummy driver (the ``dummy`` preset).

The dummy numbers its nodes 1, 2, 3 and gives a number back after a destroy; the preset gives
each node an id of its own, which the suite's id checks hold it to.  It boots nothing, so the
suite reads the first-boot script the bridge left on the fake node (``boot_record``); each
node is backed by an SSH server on 127.0.0.1, so the suite also logs in with herder's executor.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from herder_driver_libcloud.driver import LibcloudDriver, LibcloudInstance

from herder.cloud import Instance
from herder.model import InstanceType
from herder.ssh.server import generate_key_file
from herder.testing.conformance import *  # noqa: F403  (collects TestDriverConformance)
from herder.testing.conformance import BootRecord, ConformanceHarness, ConformanceTarget

SMALL = InstanceType(name="small", provider_type="1", vcpus=1, ram=128 << 20)


def boot_record(h: ConformanceHarness, instance: Instance) -> BootRecord:
    assert isinstance(instance, LibcloudInstance)
    script = str(instance.node.extra["herder_user_data"])
    keys = [
        line.split("echo ", 1)[1].split(" >>", 1)[0].strip("'")
        for line in script.splitlines()
        if line.startswith("echo ")
    ]
    return BootRecord(init_command=script, public_keys=keys)


@pytest.fixture
def conformance_target(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> ConformanceTarget:
    # A fake cloud of its own per test (the dummy's "credentials" name it).
    account = f"DUMMY_{uuid.uuid4().hex}"
    monkeypatch.setenv(account, "0")
    key = tmp_path / "id_ed25519"
    generate_key_file(key)
    return ConformanceTarget(
        driver=LibcloudDriver(),
        params={"provider": "dummy", "key": {"env": account}},
        instance_types=[SMALL],
        private_key_path=str(key),
        boot_timeout=20.0,
        boot_record=boot_record,
        strict=True,
    )

"""herder's conformance suite against the fake Compute API, through the real compute_v1 clients.

Every instance of the fake has the address of one local SSH server (paramiko, in process), and
the fake publishes that server's host key as the instance's guest attributes, so the suite
logs in through herder's own SSH executor, and the key is accepted because GCE vouches for it.
That also holds the driver to ``host_key_verification``: a made-up key must be refused.  (On
GCE the guest agent publishes them a few seconds into the boot; until then the driver leaves
the check to the instance secret, which is why the driver itself does not declare it.)
Quota, capacity and rate-limit errors are queued in the fake with GCE's own codes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from herder_driver_gce.driver import GCEDriver

from herder.cloud import Instance
from herder.model import GPUSpec, InstanceType
from herder.ssh.server import LocalSSHServer, generate_key, generate_key_file
from herder.testing.conformance import *  # noqa: F403  (collects TestDriverConformance)
from herder.testing.conformance import BootRecord, ConformanceHarness, ConformanceTarget

from .conftest import IMAGE, ZONES
from .fake_compute import Failure, FakeCompute

ON_DEMAND = InstanceType(
    name="e2-standard-2", provider_type="e2-standard-2", vcpus=2, ram=8 << 30, price=0.067
)
SPOT = InstanceType(
    name="e2-standard-2.spot",
    provider_type="e2-standard-2",
    vcpus=2,
    ram=8 << 30,
    price=0.02,
    preemptible=True,
)
GPU = InstanceType(
    name="g2-standard-4",
    provider_type="g2-standard-4",
    vcpus=4,
    ram=16 << 30,
    price=0.71,
    gpu=GPUSpec(stack="cuda", hardware_target="8.9", device_count=1, vram=24 << 30),
)


@pytest.fixture
def ssh_server(fake: FakeCompute, tmp_path: Path) -> Iterator[tuple[LocalSSHServer, str]]:
    """A local SSH server standing in for every instance: its address and host key are what
    the fake reports; it lets in herder's key only.  Yields it and the private key's path."""
    host_key, _ = generate_key()
    key_path = tmp_path / "id_ed25519"
    _, public = generate_key_file(key_path)
    server = LocalSSHServer(host_key, [public], strip_sudo=True)
    server.start()
    host, _port = server.address.rsplit(":", 1)
    fake.address = host
    fake.host_key = host_key.get_base64()
    try:
        yield server, str(key_path)
    finally:
        server.stop()


@pytest.fixture
def conformance_target(
    fake: FakeCompute, base_params: dict[str, Any], ssh_server: tuple[LocalSSHServer, str]
) -> ConformanceTarget:
    server, key_path = ssh_server

    def provoke(failure: Failure, times: int = 1) -> Callable[[ConformanceHarness], None]:
        def hook(h: ConformanceHarness) -> None:
            fake.fail("insert", failure, times=times)
            h.create()

        return hook

    def boot_record(h: ConformanceHarness, instance: Instance) -> BootRecord:
        # The one local SSH server runs no startup script: read what GCE was given instead.
        zone = next(z for z, name in fake.instances if name == instance.id)
        metadata = fake.metadata(zone, instance.id)
        keys = [
            line.split(":", 1)[1]
            for line in metadata.get("ssh-keys", "").splitlines()
            if ":" in line
        ]
        return BootRecord(init_command=metadata.get("startup-script", ""), public_keys=keys)

    fake.region_quotas["us-central1"] = [
        {"metric": "CPUS", "limit": 64.0, "usage": 0.0},
        {"metric": "PREEMPTIBLE_CPUS", "limit": 64.0, "usage": 0.0},
    ]
    return ConformanceTarget(
        driver=GCEDriver(),
        params=base_params,
        image_id=IMAGE,
        instance_types=[ON_DEMAND, SPOT, GPU],
        capabilities=GCEDriver.capabilities | {"host_key_verification"},
        private_key_path=key_path,
        ssh_port=int(server.address.rsplit(":", 1)[1]),
        boot_timeout=30.0,
        provoke_quota_error=provoke(
            Failure(
                403,
                "QUOTA_EXCEEDED",
                "Quota 'INSTANCES' exceeded.  Limit: 24.0 in region us-central1.",
                in_operation=True,
            )
        ),
        provoke_capacity_error=provoke(
            Failure(
                503,
                "ZONE_RESOURCE_POOL_EXHAUSTED",
                "The zone does not have enough resources available to fulfill the request.",
                in_operation=True,
            ),
            times=len(ZONES),
        ),
        provoke_rate_limit_error=provoke(Failure(429, "rateLimitExceeded", "Rate Limit Exceeded")),
        boot_record=boot_record,
        strict=True,
    )

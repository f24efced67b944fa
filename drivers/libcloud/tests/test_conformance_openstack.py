"""herder's conformance suite, strict, through libcloud's OpenStack driver (the ``openstack``
preset: tags as server metadata) against a fake of the Compute API on 127.0.0.1.

Quota and rate-limit errors are queued in the fake with Nova's own status codes and messages.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from herder_driver_libcloud.driver import LibcloudDriver

from herder.cloud import Instance
from herder.model import InstanceType
from herder.testing.conformance import *  # noqa: F403  (collects TestDriverConformance)
from herder.testing.conformance import BootRecord, ConformanceHarness, ConformanceTarget

from .fake_nova import FakeNova

SMALL = InstanceType(name="small", provider_type="m1.small", vcpus=1, ram=2 << 30)


@pytest.fixture
def nova(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeNova]:
    monkeypatch.setenv("OS_USERNAME", "herder")
    monkeypatch.setenv("OS_PASSWORD", "not-a-real-password")
    monkeypatch.setenv("OS_TOKEN", "not-a-real-token")
    fake = FakeNova()
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def conformance_target(nova: FakeNova) -> ConformanceTarget:
    def boot_record(h: ConformanceHarness, instance: Instance) -> BootRecord:
        script = nova.user_data[instance.id]
        keys = [line.split("echo ", 1)[1].split(" >>", 1)[0].strip("'")
                for line in script.splitlines() if line.startswith("echo ")]
        return BootRecord(init_command=script, public_keys=keys)

    def provoke(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
        def hook(h: ConformanceHarness) -> None:
            nova.fail_next_create(status, body, headers)
            h.create()

        return hook

    return ConformanceTarget(
        driver=LibcloudDriver(),
        params={
            "provider": "openstack",
            "key": {"env": "OS_USERNAME"},
            "secret": {"env": "OS_PASSWORD"},
            "options": {
                "ex_force_auth_version": "3.x_password",
                "ex_force_auth_url": "http://127.0.0.1:1",
                "ex_force_base_url": nova.base_url,
                "ex_tenant_name": "tenant",
                "secure": False,
            },
            "secret_options": {"ex_force_auth_token": {"env": "OS_TOKEN"}},
        },
        image_id="debian-12",
        instance_types=[SMALL],
        provoke_quota_error=provoke(403, {"forbidden": {
            "message": "Quota exceeded for instances: Requested 1, but already used 10 of 10 "
                       "instances", "code": 403}}),
        provoke_rate_limit_error=provoke(
            429, {"overLimit": {"message": "Rate limit exceeded", "code": 429}},
            {"Retry-After": "5"},
        ),
        boot_record=boot_record,
        strict=True,
    )

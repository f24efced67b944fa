"""herder's conformance suite, strict, through libcloud's OpenStack driver (the ``openstack``
preset: tags as server metadata) against a fake of the Compute API on 127.0.0.1.

Quota and rate-limit errors are queued in the fake with Nova's own status codes and messages;
a capacity error the way Nova reports it, after accepting the create: the server turns ERROR
with the fault "No valid host was found".
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from herder_driver_libcloud.driver import LibcloudDriver, LibcloudInstanceSet, LibcloudParameters

from herder.cloud import CapacityError, CloudError, DriverContext, Instance, QuotaError
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


def openstack_params(nova: FakeNova, **extra: Any) -> dict[str, Any]:
    return {
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
        "poll_interval": 0,
        **extra,
    }


NO_VALID_HOST = "No valid host was found. There are not enough hosts available."


@pytest.fixture
def conformance_target(nova: FakeNova) -> ConformanceTarget:
    def boot_record(h: ConformanceHarness, instance: Instance) -> BootRecord:
        script = nova.user_data[instance.id]
        keys = [
            line.split("echo ", 1)[1].split(" >>", 1)[0].strip("'")
            for line in script.splitlines()
            if line.startswith("echo ")
        ]
        return BootRecord(init_command=script, public_keys=keys)

    def provoke(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
        def hook(h: ConformanceHarness) -> None:
            nova.fail_next_create(status, body, headers)
            h.create()

        return hook

    def capacity(h: ConformanceHarness) -> None:
        nova.fault_next_create(NO_VALID_HOST)  # accepted, then ERROR: Nova's way
        h.create()

    return ConformanceTarget(
        driver=LibcloudDriver(),
        params=openstack_params(nova),
        image_id="debian-12",
        instance_types=[SMALL],
        provoke_quota_error=provoke(
            403,
            {
                "forbidden": {
                    "message": "Quota exceeded for instances: Requested 1, but already used "
                    "10 of 10 instances",
                    "code": 403,
                }
            },
        ),
        provoke_capacity_error=capacity,
        provoke_rate_limit_error=provoke(
            429,
            {"overLimit": {"message": "Rate limit exceeded", "code": 429}},
            {"Retry-After": "5"},
        ),
        boot_record=boot_record,
        strict=True,
    )


class FakeClock:
    """Time that passes only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def placing_set(nova: FakeNova, clock: FakeClock, **extra: Any) -> LibcloudInstanceSet:
    params = LibcloudDriver.validate_parameters(openstack_params(nova, poll_interval="2s", **extra))
    assert isinstance(params, LibcloudParameters)
    return LibcloudInstanceSet(
        params, DriverContext(instance_set_id="placing"), clock=clock, sleep=clock.sleep
    )


OWNER = {"HerderInstanceSetID": "placing"}


@pytest.mark.parametrize(
    ("fault", "expected", "type_specific"),
    [
        (NO_VALID_HOST, CapacityError, True),
        (
            "Exceeded maximum number of retries. Exhausted all hosts available for retrying "
            "build failures for instance x. No valid host was found.",
            CapacityError,
            True,
        ),
        (
            "Quota exceeded for cores: Requested 4, but already used 20 of 20 cores",
            QuotaError,
            False,
        ),
        (
            "Build of instance x aborted: Flavor's disk is too small for requested image.",
            CloudError,
            False,
        ),
    ],
)
def test_a_server_that_turns_error_after_the_create_is_classified_and_destroyed(
    nova: FakeNova, fault: str, expected: type[CloudError], type_specific: bool
) -> None:
    clock = FakeClock()
    nova.build_reads = 3  # BUILD/scheduling for three more reads, then ERROR
    nova.fault_next_create(fault)
    with pytest.raises(CloudError) as info:
        placing_set(nova, clock).create(SMALL, "debian-12", OWNER, "true", None)
    assert type(info.value) is expected
    assert fault in str(info.value)
    if isinstance(info.value, CapacityError):
        assert info.value.instance_type_specific is type_specific
    assert nova.servers == {}  # no broken node left behind
    assert clock.sleeps == [2.0, 2.0, 2.0]


def test_a_placed_server_is_returned_once_it_leaves_scheduling(nova: FakeNova) -> None:
    clock = FakeClock()
    nova.build_reads = 2
    iset = placing_set(nova, clock)
    instance = iset.create(SMALL, "debian-12", OWNER, "true", None)
    assert [i.id for i in iset.instances(OWNER)] == [instance.id]
    assert nova.servers[instance.id]["status"] == "ACTIVE"
    assert clock.sleeps == [2.0, 2.0]


def test_a_server_still_scheduling_at_the_timeout_is_returned_as_it_is(nova: FakeNova) -> None:
    clock = FakeClock()
    nova.build_reads = 1000
    instance = placing_set(nova, clock, placement_timeout="10s").create(
        SMALL, "debian-12", OWNER, "true", None
    )
    assert nova.servers[instance.id]["status"] == "BUILD"
    assert clock.now == 10.0 and len(clock.sleeps) == 5

"""The bridge's own rules: error tables per preset, thread safety, presets and parameters."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest
from herder_driver_libcloud.driver import (
    LibcloudDriver,
    LibcloudInstanceSet,
    LibcloudParameters,
    first_boot_script,
)
from herder_driver_libcloud.errors import EC2_ERRORS, NO_ERRORS, OPENSTACK_ERRORS, classify
from herder_driver_libcloud.presets import PRESETS, TagStrategy
from libcloud.common.exceptions import BaseHTTPError, RateLimitReachedError
from pydantic import ValidationError

from herder.cloud import (
    Capability,
    CapacityError,
    CloudError,
    DriverContext,
    QuotaError,
    RateLimitError,
)

NOW = 1_000_000.0

# (table, exception, expected type, instance_type_specific, earliest_retry)
ERROR_CASES: list[tuple[Any, BaseException, type[CloudError] | None, bool, float | None]] = [
    (
        NO_ERRORS,
        RateLimitReachedError(headers={"retry-after": "7"}),
        RateLimitError,
        False,
        NOW + 7,
    ),
    (
        NO_ERRORS,
        BaseHTTPError(429, "Too Many Requests", {"Retry-After": "3"}),
        RateLimitError,
        False,
        NOW + 3,
    ),
    (NO_ERRORS, BaseHTTPError(429, "slow down"), RateLimitError, False, NOW + 10),
    (NO_ERRORS, BaseHTTPError(400, "InstanceLimitExceeded: too many"), None, False, None),
    (
        EC2_ERRORS,
        BaseHTTPError(400, "InstanceLimitExceeded: You have requested more"),
        QuotaError,
        False,
        None,
    ),
    (EC2_ERRORS, BaseHTTPError(400, "VcpuLimitExceeded: vCPU limit"), QuotaError, False, None),
    (
        EC2_ERRORS,
        BaseHTTPError(500, "InsufficientInstanceCapacity: no m5.large"),
        CapacityError,
        True,
        None,
    ),
    (
        EC2_ERRORS,
        BaseHTTPError(503, "RequestLimitExceeded: Request limit exceeded."),
        RateLimitError,
        False,
        NOW + 10,
    ),
    (EC2_ERRORS, BaseHTTPError(400, "InvalidAMIID.NotFound: no such image"), None, False, None),
    (
        OPENSTACK_ERRORS,
        BaseHTTPError(413, "Quota exceeded for instances: Requested 1"),
        QuotaError,
        False,
        None,
    ),
    (
        OPENSTACK_ERRORS,
        Exception("500 No valid host was found. There are not enough hosts"),
        CapacityError,
        True,
        None,
    ),
    (
        OPENSTACK_ERRORS,
        BaseHTTPError(413, "overLimit: Rate limit exceeded"),
        RateLimitError,
        False,
        NOW + 10,
    ),
    (OPENSTACK_ERRORS, BaseHTTPError(404, "Flavor not found"), None, False, None),
]


@pytest.mark.parametrize(("table", "exc", "expected", "type_specific", "retry"), ERROR_CASES)
def test_errors_are_classified_per_preset(
    table: Any,
    exc: BaseException,
    expected: type[CloudError] | None,
    type_specific: bool,
    retry: float | None,
) -> None:
    typed = classify(exc, table, clock=lambda: NOW)
    if expected is None:
        assert typed is None
        return
    assert type(typed) is expected
    if isinstance(typed, CapacityError):
        assert typed.instance_type_specific == type_specific
    if isinstance(typed, RateLimitError):
        assert typed.earliest_retry == retry


class RacyNodeDriver:
    """A libcloud-like driver keeping per-request state on the object, as libcloud's
    connections do: two threads inside one object at once see each other's request."""

    def __init__(self, rendezvous: threading.Barrier) -> None:
        self.rendezvous = rendezvous
        self.action = ""

    def list_nodes(self) -> list[Any]:
        me = threading.current_thread().name
        self.action = me
        self.rendezvous.wait(timeout=10)  # both threads are now mid-request
        if self.action != me:
            raise AssertionError(f"request of {me} answered as {self.action}'s")
        return []


def test_concurrent_calls_never_share_a_libcloud_driver_object() -> None:
    rendezvous = threading.Barrier(2)
    params = LibcloudParameters(provider="ec2")
    iset = LibcloudInstanceSet(
        params, DriverContext(instance_set_id="x"), factory=lambda: RacyNodeDriver(rendezvous)
    )
    errors: list[BaseException] = []

    def lister() -> None:
        try:
            iset.instances({})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=lister, name=f"t{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert errors == []


def test_a_provider_without_a_tested_preset_warns_naming_what_is_untested(
    caplog: pytest.LogCaptureFixture,
) -> None:
    params = LibcloudParameters(provider="vultr")
    with caplog.at_level(logging.WARNING):
        LibcloudInstanceSet(params, DriverContext(instance_set_id="x"), factory=object)
    assert "'vultr' has no tested preset" in caplog.text
    assert "not classified" in caplog.text
    assert "no spot, GPU types or idempotent creates" in caplog.text


def test_capabilities_come_from_the_preset() -> None:
    driver = LibcloudDriver()
    assert Capability.QUOTA_ERRORS in driver.capabilities_for(LibcloudParameters(provider="ec2"))
    assert driver.capabilities_for(LibcloudParameters(provider="vultr")) == frozenset()
    ec2 = driver.capabilities_for(LibcloudParameters(provider="ec2"))
    assert {Capability.SPOT, Capability.GPU} <= ec2
    openstack = driver.capabilities_for(LibcloudParameters(provider="openstack"))
    assert Capability.SPOT not in openstack and Capability.GPU not in openstack


def test_every_tested_preset_keeps_tags_in_the_provider() -> None:
    for preset in PRESETS.values():
        if preset.tags is TagStrategy.FAKE_NODE:
            assert preset.process_wide, "node tags are only 'in the cloud' for a shared fake"


def test_parameters_take_secrets_by_reference_only() -> None:
    with pytest.raises(ValidationError, match="by reference"):
        LibcloudParameters.model_validate({"provider": "ec2", "secret": "AKIA-plain"})
    with pytest.raises(ValidationError, match="unknown libcloud provider 'ec3'"):
        LibcloudParameters.model_validate({"provider": "ec3"})


def test_the_first_boot_script_authorizes_the_key_then_runs_the_command() -> None:
    script = first_boot_script("echo hi", "ssh-ed25519 AAAA x@y", "admin")
    lines = script.splitlines()
    assert lines[0] == "#!/bin/sh" and lines[-1] == "echo hi"
    assert "echo 'ssh-ed25519 AAAA x@y' >>/home/admin/.ssh/authorized_keys" in script
    assert "authorized_keys" not in first_boot_script("echo hi", None, "root")


TYPES = (
    "instance_types:\n"
    "  m5.large: {vcpus: 2, ram: 8GiB}\n"
    "  m5.large.spot: {provider_type: m5.large, vcpus: 2, ram: 8GiB, preemptible: true}\n"
    "  g5.xlarge: {vcpus: 4, ram: 16GiB, gpu: {stack: cuda, device_count: 1, vram: 24GiB}}\n"
)


@pytest.mark.parametrize(
    ("provider", "refused"),
    [
        ("ec2", set()),
        ("openstack", {"instance_types.m5.large.spot.preemptible", "instance_types.g5.xlarge.gpu"}),
        ("dummy", {"instance_types.m5.large.spot.preemptible", "instance_types.g5.xlarge.gpu"}),
    ],
)
def test_config_check_takes_spot_and_gpu_capabilities_from_the_preset(
    tmp_path: Any, provider: str, refused: set[str]
) -> None:
    from herder.config import check_config
    from herder.plugins import Plugins

    path = tmp_path / "herder.yaml"
    path.write_text(
        f"cloud: {{driver: libcloud, driver_parameters: {{provider: {provider}}}}}\n" + TYPES
    )
    assert {p.key for p in check_config(path, Plugins.load())} == refused


def test_a_preemptible_type_is_never_made_on_demand_by_a_preset_without_spot() -> None:
    from herder.model import InstanceType

    iset = LibcloudInstanceSet(
        LibcloudParameters(provider="openstack"),
        DriverContext(instance_set_id="x"),
        factory=lambda: None,
    )
    spot = InstanceType(name="s", provider_type="m1", vcpus=1, ram=1 << 30, preemptible=True)
    with pytest.raises(CloudError, match="cannot create preemptible"):
        iset.create(spot, "image-1", {}, "true", None)


class _RecordingProvider:
    """A libcloud driver object that records what create_node was asked."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def list_sizes(self) -> list[Any]:
        from libcloud.compute.base import NodeSize

        return [NodeSize("m5.large", "m5.large", 8192, 0, 0, 0.1, self)]

    def create_node(self, **kwargs: Any) -> Any:
        from libcloud.compute.base import Node
        from libcloud.compute.types import NodeState

        self.calls.append(kwargs)
        return Node(
            f"i-{len(self.calls)}",
            kwargs["name"],
            NodeState.PENDING,
            [],
            [],
            self,
            extra={"instance_type": "m5.large", "tags": dict(kwargs["ex_metadata"])},
        )


def test_the_ec2_preset_asks_for_spot_with_the_type_price_as_maximum() -> None:
    from herder.model import InstanceType

    provider = _RecordingProvider()
    iset = LibcloudInstanceSet(
        LibcloudParameters(provider="ec2"),
        DriverContext(instance_set_id="x"),
        factory=lambda: provider,
    )
    spot = InstanceType(
        name="s", provider_type="m5.large", vcpus=2, ram=8 << 30, price=0.04, preemptible=True
    )
    iset.create(spot, "ami-1", {}, "true", None)
    iset.create(
        InstanceType(name="d", provider_type="m5.large", vcpus=2, ram=8 << 30),
        "ami-1",
        {},
        "true",
        None,
    )
    assert provider.calls[0]["ex_spot"] is True and provider.calls[0]["ex_spot_max_price"] == 0.04
    assert "ex_spot" not in provider.calls[1] and "ex_spot_max_price" not in provider.calls[1]


@pytest.mark.parametrize(
    ("table", "fault", "expected", "type_specific"),
    [
        (
            OPENSTACK_ERRORS,
            {
                "code": 500,
                "message": "No valid host was found. There are not enough hosts available.",
            },
            CapacityError,
            True,
        ),
        (OPENSTACK_ERRORS, {"code": 403, "message": "Quota exceeded for ram"}, QuotaError, False),
        (
            OPENSTACK_ERRORS,
            {"code": 500, "message": "Unexpected error while running command"},
            CloudError,
            False,
        ),
        (OPENSTACK_ERRORS, None, CloudError, False),
        (NO_ERRORS, {"code": 500, "message": "No valid host was found."}, CloudError, False),
        (EC2_ERRORS, {"message": "InsufficientInstanceCapacity"}, CapacityError, True),
    ],
)
def test_faults_of_nodes_that_went_to_error_are_classified_per_preset(
    table: Any, fault: Any, expected: type[CloudError], type_specific: bool
) -> None:
    from herder_driver_libcloud.errors import classify_fault

    error = classify_fault(fault, table)
    assert type(error) is expected
    assert "went to ERROR" in str(error)
    if isinstance(error, CapacityError):
        assert error.instance_type_specific is type_specific


def test_the_ec2_preset_sends_a_hash_of_the_create_key_as_client_token() -> None:
    import hashlib

    from herder.model import InstanceType

    provider = _RecordingProvider()  # no list_nodes: the token alone makes the create safe
    iset = LibcloudInstanceSet(
        LibcloudParameters(provider="ec2"),
        DriverContext(instance_set_id="x"),
        factory=lambda: provider,
    )
    small = InstanceType(name="d", provider_type="m5.large", vcpus=2, ram=8 << 30)
    iset.create(small, "ami-1", {"HerderInstanceSecret": "k" * 40}, "true", None)
    iset.create(small, "ami-1", {}, "true", None)
    assert provider.calls[0]["ex_clienttoken"] == hashlib.sha256(b"k" * 40).hexdigest()
    assert "ex_clienttoken" not in provider.calls[1]

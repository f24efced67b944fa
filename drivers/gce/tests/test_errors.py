"""The error table: each GCE error, in the shape the real client raises it, becomes the right
herder error, whether GCE answers it synchronously (HTTP error) or in the insert's operation."""

from __future__ import annotations

from typing import Any

import pytest
from google.api_core import exceptions as gexc
from google.cloud import compute_v1
from herder_driver_gce.driver import compute_clients
from herder_driver_gce.errors import (
    Backoff,
    GCEError,
    classify,
    is_family_quota,
    operation_error,
    quota_metric,
)
from herder_driver_gce.params import GCEParameters

from herder.cloud import CapacityError, DriverContext, QuotaError, RateLimitError
from herder.model import InstanceType
from herder.runtime import VirtualRuntime

from .conftest import IMAGE, OWNER, SET_ID, ZONES
from .fake_compute import Failure, FakeCompute

SMALL = InstanceType(name="small", provider_type="n2-standard-2", vcpus=2, ram=8 << 30)
ZONE_MSG = (
    "The zone 'projects/proj/zones/us-central1-a' does not have enough resources "
    "available to fulfill the request.  Try a different zone, or try again later."
)

#: (reason, HTTP status, message, expected class, type-specific, group-specific)
TABLE: list[tuple[str, int, str, type[Exception], bool, bool]] = [
    ("ZONE_RESOURCE_POOL_EXHAUSTED", 503, ZONE_MSG, CapacityError, True, False),
    (
        "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS",
        503,
        ZONE_MSG + " '(resource type:compute)'.",
        CapacityError,
        True,
        False,
    ),
    (
        "REGION_RESOURCE_POOL_EXHAUSTED",
        503,
        "The region 'us-central1' does not have enough resources available to fulfill the request.",
        CapacityError,
        True,
        False,
    ),
    (
        "RESOURCE_POOL_EXHAUSTED",
        503,
        "There are not enough resources available.",
        CapacityError,
        True,
        False,
    ),
    (
        "GPU_STOCKOUT",
        503,
        "The zone does not have enough GPUs available.",
        CapacityError,
        True,
        False,
    ),
    (
        "QUOTA_EXCEEDED",
        403,
        "Quota 'N2_CPUS' exceeded.  Limit: 24.0 in region us-central1.",
        CapacityError,
        False,
        True,
    ),
    (
        "quotaExceeded",
        403,
        "Quota 'NVIDIA_T4_GPUS' exceeded.  Limit: 1.0 in region us-central1.",
        CapacityError,
        False,
        True,
    ),
    (
        "QUOTA_EXCEEDED",
        403,
        "Quota 'PREEMPTIBLE_NVIDIA_T4_GPUS' exceeded.  Limit: 0.0 in region us-central1.",
        CapacityError,
        False,
        True,
    ),
    (
        "QUOTA_EXCEEDED",
        403,
        "Quota 'CPUS' exceeded.  Limit: 72.0 in region us-central1.",
        QuotaError,
        False,
        False,
    ),
    (
        "quotaExceeded",
        403,
        "Quota 'INSTANCES' exceeded.  Limit: 24.0 in region us-central1.",
        QuotaError,
        False,
        False,
    ),
    ("QUOTA_EXCEEDED", 403, "Quota exceeded.", QuotaError, False, False),
]


@pytest.mark.parametrize("in_operation", [False, True], ids=["http", "operation"])
@pytest.mark.parametrize(
    ("reason", "status", "message", "kind", "type_specific", "group_specific"),
    TABLE,
    ids=[row[0] + ":" + row[2][:14] for row in TABLE],
)
def test_error_table(
    fake: FakeCompute,
    make_set: Any,
    in_operation: bool,
    reason: str,
    status: int,
    message: str,
    kind: type[Exception],
    type_specific: bool,
    group_specific: bool,
) -> None:
    fake.fail("insert", Failure(status, reason, message, in_operation=in_operation), times=3)
    with pytest.raises(kind) as info:
        make_set().create(SMALL, IMAGE, OWNER, "", None)
    if isinstance(info.value, CapacityError):
        assert info.value.instance_type_specific is type_specific
        assert info.value.quota_group_specific is group_specific
    assert reason in str(info.value)
    assert type(info.value) is kind  # raised directly, never wrapped


def test_quota_metric_from_operation_error_details(fake: FakeCompute, make_set: Any) -> None:
    """Operations name the quota in errorDetails.quotaInfo, too, not only in the message."""
    fake.fail(
        "insert",
        Failure(
            403,
            "QUOTA_EXCEEDED",
            "Quota exceeded for this region.",
            in_operation=True,
            quota_metric="C3_CPUS",
        ),
    )
    with pytest.raises(CapacityError) as info:
        make_set().create(SMALL, IMAGE, OWNER, "", None)
    assert info.value.quota_group_specific


@pytest.mark.parametrize(
    "failure",
    [
        Failure(429, "rateLimitExceeded", "Rate Limit Exceeded"),
        Failure(403, "rateLimitExceeded", "Rate Limit Exceeded", domain="usageLimits"),
        Failure(403, "userRateLimitExceeded", "User Rate Limit Exceeded", domain="usageLimits"),
        Failure(
            403,
            "quotaExceeded",
            "Quota exceeded for quota metric 'Queries' and limit "
            "'Queries per minute' of service 'compute.googleapis.com'",
            domain="usageLimits",
        ),
        Failure(
            403,
            "RESOURCE_OPERATION_RATE_EXCEEDED",
            "Operation rate exceeded for resource",
            in_operation=True,
        ),
    ],
    ids=["429", "403-rate", "403-user-rate", "403-per-minute", "operation-rate"],
)
def test_rate_limits_back_off_from_the_injected_clock(
    fake: FakeCompute, make_set: Any, failure: Failure
) -> None:
    runtime = VirtualRuntime(strict=False)
    try:
        runtime.advance(1000.0)
        now = runtime.now()
        iset = make_set(DriverContext(instance_set_id=SET_ID, runtime=runtime))
        fake.fail("insert", failure, times=3)
        delays = []
        for _ in range(3):
            with pytest.raises(RateLimitError) as info:
                iset.create(SMALL, IMAGE, OWNER, "", None)
            delays.append(info.value.earliest_retry - now)
        assert delays == [1.0, 2.5, 4.75]
        assert len(fake.inserted()) == 3  # a rate limit is not zonal: no failover
        iset.create(SMALL, IMAGE, OWNER, "", None)  # success resets the back-off
        fake.fail("insert", failure)
        with pytest.raises(RateLimitError) as info:
            iset.create(SMALL, IMAGE, OWNER, "", None)
        assert info.value.earliest_retry == now + 1.0
    finally:
        runtime.shutdown()


def test_retry_after_header_is_honoured(fake: FakeCompute, make_set: Any) -> None:
    runtime = VirtualRuntime(strict=False)
    try:
        iset = make_set(DriverContext(instance_set_id=SET_ID, runtime=runtime))
        fake.fail("insert", Failure(429, "rateLimitExceeded", "slow down", retry_after=30))
        with pytest.raises(RateLimitError) as info:
            iset.create(SMALL, IMAGE, OWNER, "", None)
        assert info.value.earliest_retry == runtime.now() + 30
    finally:
        runtime.shutdown()


def test_listing_has_its_own_back_off(fake: FakeCompute, make_set: Any) -> None:
    runtime = VirtualRuntime(strict=False)
    try:
        iset = make_set(DriverContext(instance_set_id=SET_ID, runtime=runtime))
        fake.fail(
            "aggregatedList", Failure(429, "rateLimitExceeded", "Rate Limit Exceeded"), times=2
        )
        for expected in (1.0, 2.5):
            with pytest.raises(RateLimitError) as info:
                iset.instances(OWNER)
            assert info.value.earliest_retry == runtime.now() + expected
        fake.fail("insert", Failure(429, "rateLimitExceeded", "Rate Limit Exceeded"))
        with pytest.raises(RateLimitError) as info:
            iset.create(SMALL, IMAGE, OWNER, "", None)
        assert info.value.earliest_retry == runtime.now() + 1.0  # creates back off apart
        assert iset.instances(OWNER) == []
    finally:
        runtime.shutdown()


@pytest.mark.parametrize("in_operation", [False, True], ids=["http", "operation"])
def test_other_errors_keep_their_code_and_message(
    fake: FakeCompute, make_set: Any, in_operation: bool
) -> None:
    fake.fail(
        "insert",
        Failure(
            400,
            "invalid",
            "Invalid value for field 'resource.disks[0].initializeParams.sourceImage': 'nope'.",
            in_operation=in_operation,
        ),
    )
    with pytest.raises(GCEError) as info:
        make_set().create(SMALL, IMAGE, OWNER, "", None)
    assert info.value.status == 400 and info.value.code == "invalid"
    assert "sourceImage" in str(info.value) and "(insert)" in str(info.value)


def test_listing_errors_are_classified(fake: FakeCompute, make_set: Any) -> None:
    fake.fail(
        "aggregatedList",
        Failure(
            403, "forbidden", "Required 'compute.instances.list' permission for 'projects/proj'"
        ),
    )
    with pytest.raises(GCEError, match=r"403 forbidden: Required 'compute\.instances\.list'"):
        make_set().instances(OWNER)


def test_set_tags_errors_are_classified(fake: FakeCompute, make_set: Any) -> None:
    iset = make_set()
    instance = iset.create(SMALL, IMAGE, OWNER, "", None)
    fake.fail("setMetadata", Failure(429, "rateLimitExceeded", "Rate Limit Exceeded"))
    with pytest.raises(RateLimitError):
        instance.set_tags({**OWNER, "IdleBehavior": "drain"})
    fake.fail(
        "setMetadata", Failure(400, "invalid", "Metadata has duplicate keys", in_operation=True)
    )
    with pytest.raises(GCEError, match="duplicate keys"):
        instance.set_tags({**OWNER, "IdleBehavior": "drain"})


def test_operation_errors_read_as_extended_operation_reports_them(
    fake: FakeCompute, base_params: dict[str, Any]
) -> None:
    """google-api-core's ExtendedOperation.result() and the driver's operation_error give the
    same exception for one failed operation, so one classification holds for both."""
    params = GCEParameters.model_validate(base_params)
    client, _ = compute_clients(params)
    fake.fail(
        "insert",
        Failure(
            403,
            "QUOTA_EXCEEDED",
            "Quota 'N2_CPUS' exceeded.  Limit: 8.0 in region us-central1.",
            in_operation=True,
        ),
        times=2,
    )
    request = {
        "project": "proj",
        "zone": ZONES[0],
        "instance_resource": compute_v1.Instance(name="x", machine_type="m"),
    }
    with pytest.raises(gexc.GoogleAPICallError) as info:
        client.insert(**request).result()  # the fake answers DONE: no polling happens
    raw = client.insert_unary(**request)
    mine = operation_error(raw)
    assert mine is not None
    assert type(mine) is type(info.value) is gexc.Forbidden
    assert [e.code for e in mine.errors] == [e.code for e in info.value.errors]
    a = classify(info.value, Backoff(), 0.0)
    b = classify(mine, Backoff(), 0.0)
    assert type(a) is type(b) is CapacityError and str(a) == str(b)
    client.transport.close()


def test_operation_error_none_for_success() -> None:
    assert operation_error(compute_v1.Operation(status="DONE")) is None


@pytest.mark.parametrize(
    ("metric", "family"),
    [
        ("N2_CPUS", True),
        ("A2_CPUS", True),
        ("NVIDIA_T4_GPUS", True),
        ("PREEMPTIBLE_CPUS", True),
        ("CPUS", False),
        ("CPUS_ALL_REGIONS", False),
        ("GPUS_ALL_REGIONS", False),
        ("INSTANCES", False),
        ("SSD_TOTAL_GB", False),
    ],
)
def test_family_quotas(metric: str, family: bool) -> None:
    assert is_family_quota(metric) is family


def test_quota_metric_in_plain_message() -> None:
    exc = gexc.Forbidden("Quota 'C2_CPUS' exceeded.  Limit: 0.0 in region us-central1.")
    assert quota_metric(exc) == "C2_CPUS"

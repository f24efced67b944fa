"""Error classification, table-tested with the real exception shapes.

Every row goes through the real clients against the fake ARM API: a synchronous refusal of
the create (azure-core raises ``ResourceExistsError`` for every 409, ``HttpResponseError``
otherwise) or an accepted create whose long-running operation ends ``Failed`` (the error is
in the operation's final poll, answered with status 200).
"""

from __future__ import annotations

import email.utils
from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError, ResourceExistsError
from herder_driver_azure.errors import AzureError, classify, error_codes, retry_after

from herder.cloud import CapacityError, QuotaError, RateLimitError
from herder.model import InstanceType
from herder.runtime import VirtualRuntime

from .conftest import OWNER_KEY, SET_ID
from .fakearm import FakeARM

SMALL = InstanceType(name="small", provider_type="Standard_D2s_v5", vcpus=2, ram=8 << 30)
OWNER = {OWNER_KEY: SET_ID}
IMAGE = "Debian:debian-12:12-gen2:latest"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl x"

FAMILY = (
    "Operation could not be completed as it results in exceeding approved "
    "standardDSv5Family Cores quota. Additional details - Deployment Model: Resource "
    "Manager, Location: westeurope, Current Limit: 10, Current Usage: 10, Additional "
    "Required: 2, (Minimum) New Limit Required: 12."
)
REGIONAL = (
    "Operation could not be completed as it results in exceeding approved Total "
    "Regional Cores quota. Additional details - Location: westeurope, Current Limit: 100"
)
SPOT = (
    "Operation could not be completed as it results in exceeding approved Total Regional "
    "Low-priority vCPUs quota."
)
LOW_PRIORITY = "Operation results in exceeding quota limits of LowPriorityCores. Maximum allowed: 0"

TYPE = "type"
GROUP = "group"

#: (status, code, message) → the error herder gets.
TABLE: list[tuple[int, str, str, type[Exception], str]] = [
    (
        409,
        "AllocationFailed",
        "Allocation failed. We do not have sufficient capacity",
        CapacityError,
        TYPE,
    ),
    (409, "ZonalAllocationFailed", "Allocation failed in zone 1", CapacityError, TYPE),
    (
        409,
        "OverconstrainedAllocationRequest",
        "Allocation failed. VM(s) with the following constraints cannot be allocated",
        CapacityError,
        TYPE,
    ),
    (
        409,
        "OverconstrainedZonalAllocationRequest",
        "constraints cannot be allocated in zone",
        CapacityError,
        TYPE,
    ),
    (
        409,
        "SkuNotAvailable",
        "The requested size for resource is currently not available",
        CapacityError,
        TYPE,
    ),
    (409, "OperationNotAllowed", FAMILY, CapacityError, GROUP),
    (409, "OperationNotAllowed", SPOT, CapacityError, GROUP),
    (409, "OperationNotAllowed", LOW_PRIORITY, CapacityError, GROUP),
    (409, "OperationNotAllowed", REGIONAL, QuotaError, ""),
    (400, "QuotaExceeded", "Regional quota exceeded for public IP addresses", QuotaError, ""),
    (
        409,
        "OperationNotAllowed",
        "The operation is not allowed while the VM is deallocating",
        AzureError,
        "",
    ),
    (
        400,
        "InvalidParameter",
        "The value of parameter imageReference.sku is invalid",
        AzureError,
        "",
    ),
    (
        404,
        "ImageNotFound",
        "The platform image 'Debian:x:y:latest' is not available",
        AzureError,
        "",
    ),
    (
        403,
        "AuthorizationFailed",
        "The client does not have authorization to perform action",
        AzureError,
        "",
    ),
]


def _check(
    error: BaseException, expected: type[Exception], scope: str, code: str, message: str
) -> None:
    assert type(error) is expected, repr(error)
    assert code in str(error) and message[:30] in str(error)
    if isinstance(error, CapacityError):
        assert error.instance_type_specific is (scope == TYPE)
        assert error.quota_group_specific is (scope == GROUP)
    if isinstance(error, AzureError):
        assert error.code == code


@pytest.mark.parametrize(("status", "code", "message", "expected", "scope"), TABLE)
def test_synchronous_refusals(
    fake: FakeARM,
    make_set: Any,
    status: int,
    code: str,
    message: str,
    expected: type[Exception],
    scope: str,
) -> None:
    fake.fail("PUT", "/virtualMachines/", status, code, message)
    with pytest.raises(expected) as info:
        make_set().create(SMALL, IMAGE, OWNER, "", KEY)
    _check(info.value, expected, scope, code, message)
    cause = info.value.__cause__
    assert isinstance(cause, HttpResponseError)
    assert isinstance(cause, ResourceExistsError) is (status == 409)


@pytest.mark.parametrize(("status", "code", "message", "expected", "scope"), TABLE)
def test_failed_long_running_operations(
    fake: FakeARM,
    make_set: Any,
    status: int,
    code: str,
    message: str,
    expected: type[Exception],
    scope: str,
) -> None:
    """An operation's final poll may say Retry-After: that is no rate limit."""
    fake.polls = 0
    fake.operation_retry_after = "5"
    fake.fail_next_create(code, message)
    with pytest.raises(expected) as info:
        make_set().create(SMALL, IMAGE, OWNER, "", KEY)
    _check(info.value, expected, scope, code, message)
    assert fake.of_kind("vm") == {} and fake.of_kind("nic") == {}


def test_codes_nested_in_details_count(fake: FakeARM, make_set: Any) -> None:
    fake.fail_next_create(
        "ResourceOperationFailure",
        "The resource operation completed with terminal provisioning state 'Failed'.",
        details=[{"code": "OverconstrainedAllocationRequest", "message": "cannot be allocated"}],
    )
    with pytest.raises(CapacityError) as info:
        make_set().create(SMALL, IMAGE, OWNER, "", KEY)
    assert info.value.instance_type_specific


# --------------------------------------------------------------------------- rate limits


def _http_date(epoch: float) -> str:
    return email.utils.formatdate(epoch, usegmt=True)


@pytest.mark.parametrize(
    ("status", "headers", "wait"),
    [
        (429, {"Retry-After": "7"}, 7.0),
        (429, {}, 20.0),
        (429, {"Retry-After": _http_date(1_900_000_030), "Date": _http_date(1_900_000_000)}, 30.0),
        (429, {"Retry-After": "soon"}, 20.0),
        (503, {"Retry-After": "3"}, 3.0),
        (409, {"Retry-After": "11"}, 11.0),
    ],
)
def test_rate_limits_wait_what_azure_says_on_the_drivers_clock(
    fake: FakeARM, make_set: Any, status: int, headers: dict[str, str], wait: float
) -> None:
    runtime = VirtualRuntime()
    iset = make_set(runtime=runtime)
    fake.fail("PUT", "/virtualMachines/", status, "TooManyRequests", "slow down", headers)
    with pytest.raises(RateLimitError) as info:
        iset.create(SMALL, IMAGE, OWNER, "", KEY)
    assert info.value.earliest_retry == runtime.now() + wait
    runtime.shutdown()


def test_a_server_error_without_retry_after_is_no_rate_limit(fake: FakeARM, make_set: Any) -> None:
    fake.fail("PUT", "/virtualMachines/", 500, "InternalServerError", "oops")
    with pytest.raises(AzureError, match="InternalServerError"):
        make_set().create(SMALL, IMAGE, OWNER, "", KEY)


def test_sdk_retries_are_off_so_herder_sees_the_429(fake: FakeARM, make_set: Any) -> None:
    fake.fail("GET", r"/virtualMachines$", 429, "SubscriptionRequestsThrottled", "", times=1)
    with pytest.raises(RateLimitError):
        make_set().instances(OWNER)
    assert len(fake.calls("GET", r"/virtualMachines$")) == 1


@pytest.mark.parametrize(
    ("method", "path", "call"),
    [
        ("GET", r"/networkInterfaces$", "list"),
        ("GET", r"/virtualMachines$", "list"),
        ("PATCH", r"/virtualMachines/", "tags"),
        ("DELETE", r"/virtualMachines/", "destroy"),
        ("PUT", r"/networkInterfaces/", "create"),
    ],
)
def test_every_call_classifies_its_errors(
    fake: FakeARM, make_set: Any, method: str, path: str, call: str
) -> None:
    iset = make_set()
    instance = iset.create(SMALL, IMAGE, OWNER, "", KEY) if call in ("tags", "destroy") else None
    fake.fail(method, path, 429, "TooManyRequests", "", {"Retry-After": "2"})
    with pytest.raises(RateLimitError):
        if call == "list":
            iset.instances(OWNER)
        elif call == "tags":
            assert instance is not None
            instance.set_tags(OWNER)
        elif call == "destroy":
            assert instance is not None
            instance.destroy()
        else:
            iset.create(SMALL, IMAGE, OWNER, "", KEY)


# --------------------------------------------------------------------------- the helpers


def test_classify_passes_typed_errors_and_plain_failures_through() -> None:
    quota = QuotaError("q")
    assert classify(quota, 0.0) is quota
    refused = ConnectionRefusedError("refused")
    assert classify(refused, 0.0) is refused
    assert error_codes(refused) == [("", "refused")]
    assert retry_after(refused) is None


def test_error_without_an_arm_body_keeps_the_message() -> None:
    error = classify(
        HttpResponseError(message="Operation returned an invalid status 'Bad'"), 0.0, "list"
    )
    assert isinstance(error, AzureError) and error.code == ""
    assert "invalid status" in str(error) and "(list)" in str(error)

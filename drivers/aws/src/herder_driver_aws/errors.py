"""How EC2 errors become herder's typed errors (SPEC §16.2 ``wrapError``).

herder's pool reacts differently to each kind: a :class:`~herder.cloud.RateLimitError` pauses
every cloud call until its ``earliest_retry``, a :class:`~herder.cloud.QuotaError` stops
creating until an instance goes away, and a :class:`~herder.cloud.CapacityError` marks one
instance type (or its quota group) unavailable for a while.  Everything else is an ordinary
failure, passed on with its AWS code and message so the log says what AWS said.
"""

from __future__ import annotations

import re

from botocore.exceptions import ClientError

from herder.cloud import (
    CapacityError,
    CloudError,
    QuotaError,
    RateLimitError,
    ThrottleBackoff,
)

#: Codes AWS uses when it throttles a caller (botocore's own list plus EC2's).
THROTTLE_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "TransactionInProgressException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "LimitExceededException",
        "RequestThrottled",
        "SlowDown",
        "PriorRequestNotComplete",
        "EC2ThrottledException",
    }
)

#: Codes meaning "this account cannot have more right now", whatever the type.
QUOTA_CODES = frozenset(
    {
        "InstanceLimitExceeded",
        "InsufficientAddressCapacity",
        "InsufficientFreeAddressesInSubnet",
        "InsufficientVolumeCapacity",
        "MaxSpotInstanceCountExceeded",
    }
)

#: The vCPU limit is per instance family (quota group), not per account.
QUOTA_GROUP_CAPACITY_CODE = "VcpuLimitExceeded"
#: AWS has no more of this instance type (in this availability zone).
TYPE_CAPACITY_CODE = "InsufficientInstanceCapacity"

_SUBNET_MESSAGE = re.compile(r" subnet |sufficient free [Ii]pv[46] addresses")


class AWSError(CloudError):
    """An EC2 error herder has no special reaction to; carries the AWS code and message."""

    def __init__(self, code: str, message: str, operation: str = "") -> None:
        where = f" ({operation})" if operation else ""
        super().__init__(f"{code}: {message}{where}")
        self.code = code
        self.aws_message = message
        self.operation = operation


def error_code(exc: BaseException) -> tuple[str, str]:
    """The AWS error code and message of ``exc`` (``("", str(exc))`` for non-AWS errors)."""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return str(err.get("Code", "")), str(err.get("Message", ""))
    return "", str(exc)


def is_subnet_specific(code: str, message: str) -> bool:
    """True if another subnet might succeed where this one failed (SPEC §16.2).

    ``InsufficientInstanceCapacity`` counts: capacity is per availability zone, and subnets
    live in zones.
    """
    if "Subnet" in code:
        return True
    if code in {"InsufficientInstanceCapacity", "InsufficientVolumeCapacity", "Unsupported"}:
        return True
    return "InvalidParameter" in code and bool(_SUBNET_MESSAGE.search(message))


def is_capacity_error(code: str, message: str) -> bool:
    """True if ``code`` becomes a :class:`CapacityError` (preferred when reporting failover)."""
    return code in {QUOTA_GROUP_CAPACITY_CODE, TYPE_CAPACITY_CODE} or (
        code == "Unsupported" and "requested instance type" in message
    )


#: The shared growing back-off for throttled calls (one per kind of call).
Backoff = ThrottleBackoff


def classify(exc: BaseException, backoff: Backoff, now: float, operation: str = "") -> Exception:
    """The exception to raise for ``exc``, an error from a create or list call.

    Typed errors are returned as themselves (never wrapping), because herder's pool checks
    the exception's own class.
    """
    if isinstance(exc, CloudError):
        return exc
    code, message = error_code(exc)
    if code in THROTTLE_CODES:
        delay = backoff.grow()
        return RateLimitError(f"{code}: {message}", earliest_retry=now + delay)
    backoff.reset()
    if code in QUOTA_CODES:
        return QuotaError(f"{code}: {message}")
    if code == QUOTA_GROUP_CAPACITY_CODE:
        return CapacityError(f"{code}: {message}", quota_group_specific=True)
    if is_capacity_error(code, message):
        return CapacityError(f"{code}: {message}", instance_type_specific=True)
    if code:
        return AWSError(code, message, operation)
    return exc if isinstance(exc, Exception) else CloudError(str(exc))

"""Classifying libcloud's errors into herder's typed errors, per provider.

libcloud has few error types: most provider errors arrive as ``BaseHTTPError`` (an HTTP status
and a message) or a plain ``Exception`` whose message holds the provider's error code.  What
means "quota" or "no capacity" is the provider's vocabulary, so each preset has its own table of
message markers; HTTP 429 and libcloud's ``RateLimitReachedError`` mean "rate limit" everywhere.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from herder.cloud import CapacityError, CloudError, QuotaError, RateLimitError

#: Seconds to wait after a rate limit that names no retry time.
DEFAULT_RETRY_AFTER = 10.0


@dataclass(frozen=True)
class ErrorTable:
    """The markers (substrings of the error message) of one provider's error vocabulary."""

    quota: tuple[str, ...] = ()
    #: capacity markers that concern only the requested instance type
    capacity_type: tuple[str, ...] = ()
    #: capacity markers that concern every type
    capacity_any: tuple[str, ...] = ()
    rate_limit: tuple[str, ...] = ()


EC2_ERRORS = ErrorTable(
    quota=("InstanceLimitExceeded", "VcpuLimitExceeded", "MaxSpotInstanceCountExceeded"),
    capacity_type=("InsufficientInstanceCapacity", "InsufficientHostCapacity"),
    capacity_any=("InsufficientCapacity",),
    rate_limit=("RequestLimitExceeded", "Throttling"),
)

OPENSTACK_ERRORS = ErrorTable(
    quota=("Quota exceeded", "QuotaError", "quota exceeded"),
    capacity_type=("No valid host was found",),
    rate_limit=("overLimit", "Rate limit exceeded"),
)

NO_ERRORS = ErrorTable()


def _status(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None)
    return code if isinstance(code, int) else None


def _retry_at(exc: BaseException, now: float) -> float:
    """Epoch seconds from the error's ``retry_after`` (seconds) or Retry-After header."""
    after = getattr(exc, "retry_after", None)
    if not after:
        headers = getattr(exc, "headers", None) or {}
        after = {str(k).lower(): v for k, v in dict(headers).items()}.get("retry-after")
    try:
        seconds = float(after) if after else DEFAULT_RETRY_AFTER
    except (TypeError, ValueError):
        seconds = DEFAULT_RETRY_AFTER
    return now + max(seconds, 0.0)


def classify(
    exc: BaseException, table: ErrorTable, clock: Callable[[], float] = time.time
) -> CloudError | None:
    """herder's typed error for ``exc`` under ``table``, or None for an ordinary failure."""
    from libcloud.common.exceptions import RateLimitReachedError

    text = f"{getattr(exc, 'message', '') or ''} {exc}"
    if isinstance(exc, RateLimitReachedError) or _status(exc) == 429:
        return RateLimitError(f"rate limited: {text.strip()}", _retry_at(exc, clock()))
    if any(marker in text for marker in table.rate_limit):
        return RateLimitError(f"rate limited: {text.strip()}", _retry_at(exc, clock()))
    if any(marker in text for marker in table.quota):
        return QuotaError(text.strip())
    if any(marker in text for marker in table.capacity_type):
        return CapacityError(text.strip(), instance_type_specific=True)
    if any(marker in text for marker in table.capacity_any):
        return CapacityError(text.strip())
    return None


def classify_fault(fault: Any, table: ErrorTable) -> CloudError:
    """herder's error for a node the provider accepted and then put in ERROR, from the fault
    it reports (OpenStack: ``{"code": 500, "message": "No valid host was found. ..."}``).

    Capacity and quota markers count as at create time (Nova's "No valid host was found" is
    its capacity error, reported after the create call returned); anything else is an
    ordinary failure naming the fault.
    """
    fault = fault if isinstance(fault, dict) else {}
    message = str(fault.get("message") or "no fault reported")
    code = fault.get("code")
    text = f"{code} {message}" if code else message
    if any(marker in text for marker in table.quota):
        return QuotaError(f"node went to ERROR: {text}")
    if any(marker in text for marker in table.capacity_type):
        return CapacityError(f"node went to ERROR: {text}", instance_type_specific=True)
    if any(marker in text for marker in table.capacity_any):
        return CapacityError(f"node went to ERROR: {text}")
    return CloudError(f"node went to ERROR: {text}")

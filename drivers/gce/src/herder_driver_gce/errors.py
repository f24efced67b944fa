"""How Compute Engine errors become herder's typed errors.

herder's pool reacts differently to each kind: a :class:`~herder.cloud.RateLimitError` pauses
every cloud call until its ``earliest_retry``, a :class:`~herder.cloud.QuotaError` stops
creating until an instance goes away, and a :class:`~herder.cloud.CapacityError` marks one
instance type (or its quota group) unavailable for a while.  Everything else is an ordinary
failure, passed on with GCE's code and message so the log says what GCE said.

GCE reports a failure in one of two places, and both must be read the same way:

* **Synchronously**, as an HTTP error.  google-api-core raises a ``GoogleAPICallError``
  subclass (``Forbidden``, ``ServiceUnavailable``, ``TooManyRequests``, ...) whose ``errors``
  are the JSON ``error.errors`` objects: dicts with a ``reason`` (``quotaExceeded``,
  ``rateLimitExceeded``, ``ZONE_RESOURCE_POOL_EXHAUSTED``...).
* **In the operation**: an insert can be accepted (HTTP 200) and fail later; the finished
  Operation then carries ``error.errors[].code`` (``ZONE_RESOURCE_POOL_EXHAUSTED``,
  ``QUOTA_EXCEEDED``...) and ``http_error_status_code``.  google-api-core's
  ``ExtendedOperation.result()`` turns that into ``from_http_status(http_error_status_code,
  http_error_message, errors=error.errors)``, so the ``errors`` are ``compute_v1.Errors``
  messages with a ``code``.  :func:`operation_error` builds exactly that exception, so one
  :func:`classify` serves both.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from google.api_core import exceptions as gexc

from herder.cloud import (
    CapacityError,
    CloudError,
    QuotaError,
    RateLimitError,
    ThrottleBackoff,
)

#: GCE has no more of this machine type (or its GPUs) in this zone right now.
STOCKOUT_CODES = frozenset(
    {
        "ZONE_RESOURCE_POOL_EXHAUSTED",
        "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS",
        "REGION_RESOURCE_POOL_EXHAUSTED",
        "RESOURCE_POOL_EXHAUSTED",
        "GPU_STOCKOUT",
    }
)
#: Stockouts of a whole region: other zones of it are no better.
REGION_STOCKOUT_CODES = frozenset({"REGION_RESOURCE_POOL_EXHAUSTED"})
#: A quota of the project (the operation form, then the HTTP form).
QUOTA_CODES = frozenset({"QUOTA_EXCEEDED", "quotaExceeded"})
#: GCE refuses calls for a while.
RATE_LIMIT_CODES = frozenset(
    {
        "rateLimitExceeded",
        "userRateLimitExceeded",
        "RATE_LIMIT_EXCEEDED",
        "RESOURCE_OPERATION_RATE_EXCEEDED",
    }
)
#: Quotas that count everything, whatever the machine family: hitting one blocks every type.
PROJECT_WIDE_QUOTAS = frozenset(
    {
        "CPUS",
        "CPUS_ALL_REGIONS",
        "INSTANCES",
        "IN_USE_ADDRESSES",
        "DISKS_TOTAL_GB",
        "SSD_TOTAL_GB",
        "LOCAL_SSD_TOTAL_GB",
        "GPUS_ALL_REGIONS",
    }
)
#: Per-family quotas: ``N2_CPUS``, ``PREEMPTIBLE_NVIDIA_T4_GPUS``, ``A2_CPUS``...
_FAMILY_QUOTA = re.compile(r"[A-Z0-9_]+_(CPUS|GPUS)")
_QUOTA_IN_MESSAGE = re.compile(r"Quota '([A-Z0-9_]+)' exceeded")
#: An API request quota (requests per minute) is a rate limit, whatever its reason says.
_REQUEST_QUOTA = re.compile(r"per (minute|second|100 seconds)|[Rr]ate [Ll]imit")


class GCEError(CloudError):
    """A Compute Engine error herder has no special reaction to; keeps GCE's code and message."""

    def __init__(self, status: int | None, code: str, message: str, operation: str = "") -> None:
        where = f" ({operation})" if operation else ""
        head = " ".join(str(p) for p in (status, code) if p)
        super().__init__(f"{head}: {message}{where}" if head else f"{message}{where}")
        self.status = status
        self.code = code
        self.gce_message = message
        self.operation = operation


def _field(item: Any, *names: str) -> str:
    """A string field of a dict (HTTP errors) or a proto message (operation errors)."""
    for name in names:
        value = item.get(name) if isinstance(item, dict) else getattr(item, name, None)
        if value:
            return str(value)
    return ""


def error_codes(exc: BaseException) -> list[str]:
    """Every reason/code in ``exc``'s error list, in order (``[]`` for other exceptions)."""
    if not isinstance(exc, gexc.GoogleAPICallError):
        return []
    codes = [_field(item, "reason", "code") for item in exc.errors or ()]
    if exc.reason:  # ErrorInfo of newer APIs
        codes.append(exc.reason)
    return [c for c in codes if c]


def error_message(exc: BaseException) -> str:
    """The most telling message: the first error's own, else the exception's."""
    if isinstance(exc, gexc.GoogleAPICallError):
        for item in exc.errors or ():
            message = _field(item, "message")
            if message:
                return message
        return str(exc.message)
    return str(exc)


def quota_metric(exc: BaseException) -> str:
    """The quota ``exc`` says was exceeded (``N2_CPUS``), or ``""`` if it does not say."""
    if isinstance(exc, gexc.GoogleAPICallError):
        for item in exc.errors or ():
            found = _QUOTA_IN_MESSAGE.search(_field(item, "message"))
            if found:
                return found.group(1)
            for detail in _details(item):
                info = getattr(detail, "quota_info", None)
                metric = getattr(info, "metric_name", "") if info else ""
                if metric:  # compute.googleapis.com/n2_cpus
                    return str(metric).rsplit("/", 1)[-1].upper()
    found = _QUOTA_IN_MESSAGE.search(str(exc))
    return found.group(1) if found else ""


def _details(item: Any) -> Iterable[Any]:
    details = getattr(item, "error_details", None)
    return list(details) if details else []


def is_family_quota(metric: str) -> bool:
    """Whether ``metric`` counts one machine family or GPU kind (not the whole project)."""
    return bool(_FAMILY_QUOTA.fullmatch(metric)) and metric not in PROJECT_WIDE_QUOTAS


def status_code(exc: BaseException) -> int | None:
    if isinstance(exc, gexc.GoogleAPICallError) and exc.code is not None:
        return int(exc.code)
    return None


def is_stockout(exc: BaseException) -> bool:
    return any(c in STOCKOUT_CODES for c in error_codes(exc))


def is_zone_specific(exc: BaseException) -> bool:
    """Whether another zone of the region might succeed where this one failed.

    Zonal stockouts, and a machine or accelerator type this zone does not offer, are; a region
    stockout and everything else (quota, bad request, permission) are not.
    """
    codes = set(error_codes(exc))
    if codes & REGION_STOCKOUT_CODES:
        return False
    if codes & STOCKOUT_CODES:
        return True
    message = error_message(exc)
    return status_code(exc) in (400, 404) and bool(
        re.search(r"(does not exist|not available|not supported) in zone", message)
    )


def is_rate_limit(exc: BaseException) -> bool:
    if isinstance(exc, gexc.TooManyRequests):
        return True
    codes = set(error_codes(exc))
    if codes & RATE_LIMIT_CODES:
        return True
    return bool(codes & QUOTA_CODES) and bool(_REQUEST_QUOTA.search(error_message(exc)))


def is_precondition_failed(exc: BaseException) -> bool:
    """A stale fingerprint: someone changed the instance between our read and our write."""
    return isinstance(exc, gexc.PreconditionFailed) or "conditionNotMet" in error_codes(exc)


def is_not_found(exc: BaseException) -> bool:
    return isinstance(exc, gexc.NotFound)


def operation_error(operation: Any) -> gexc.GoogleAPICallError | None:
    """The exception a finished ``compute_v1.Operation`` reports, or None if it succeeded.

    The same one ``ExtendedOperation.result()`` raises: a ``GoogleAPICallError`` subclass for
    ``http_error_status_code`` whose ``errors`` are the operation's ``error.errors``.
    """
    errors = list(operation.error.errors) if operation.error else []
    status = int(operation.http_error_status_code or 0)
    message = str(operation.http_error_message or "")
    if not errors and not status:
        return None
    if not message:
        message = "; ".join(f"{e.code}: {e.message}" for e in errors) or "operation failed"
    exc: gexc.GoogleAPICallError = gexc.from_http_status(  # type: ignore[no-untyped-call]
        status or 500, message, response=operation, errors=errors
    )
    return exc


def retry_after(exc: BaseException) -> float:
    """Seconds a ``Retry-After`` header asks for, or 0."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if not headers:
        return 0.0
    try:
        return max(0.0, float(headers.get("Retry-After", 0)))
    except (TypeError, ValueError):
        return 0.0


#: The shared growing back-off for throttled calls (one per kind of call).
Backoff = ThrottleBackoff


def classify(exc: BaseException, backoff: Backoff, now: float, operation: str = "") -> Exception:
    """The exception to raise for ``exc``, an error from an API call or an operation.

    Typed errors are returned as themselves, never wrapped: herder's pool checks the
    exception's own class.
    """
    if isinstance(exc, CloudError):
        return exc
    codes = error_codes(exc)
    message = error_message(exc)
    summary = f"{codes[0] if codes else status_code(exc)}: {message}"
    if is_rate_limit(exc):
        delay = max(backoff.grow(), retry_after(exc))
        return RateLimitError(summary, earliest_retry=now + delay)
    backoff.reset()
    if is_stockout(exc):
        return CapacityError(summary, instance_type_specific=True)
    if set(codes) & QUOTA_CODES:
        metric = quota_metric(exc)
        if metric and is_family_quota(metric):
            return CapacityError(summary, quota_group_specific=True)
        return QuotaError(summary)
    if isinstance(exc, gexc.GoogleAPICallError):
        return GCEError(status_code(exc), codes[0] if codes else "", message, operation)
    return exc if isinstance(exc, Exception) else CloudError(str(exc))

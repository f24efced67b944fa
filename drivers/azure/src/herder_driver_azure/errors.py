"""How Azure errors become herder's typed errors (SPEC §16.3, improved).

herder's pool reacts differently to each kind: a :class:`~herder.cloud.RateLimitError` pauses
every cloud call until its ``earliest_retry``, a :class:`~herder.cloud.QuotaError` stops
creating until an instance goes away, and a :class:`~herder.cloud.CapacityError` marks one VM
size (or its quota group) unavailable for a while.  Everything else is an ordinary failure,
passed on as :class:`AzureError` with Azure's code and message so the log says what Azure said.

Where the code is: azure-core raises :class:`~azure.core.exceptions.HttpResponseError` (or a
subclass: every 409 becomes ``ResourceExistsError``, every 404 ``ResourceNotFoundError``), for
a synchronous refusal as for a long-running operation that ended ``Failed``; either way the ARM
error body is in ``exc.error`` (code, message, nested details).  So this module branches on the
codes, never on the exception class.

What it improves on Arvados' Azure driver, and why:

* A 429 without ``Retry-After`` waits 20 s instead of crashing (SPEC §19 item 31).
* Allocation failures are capacity errors for the VM size, so herder tries another size
  instead of retrying the same one (Arvados never reports capacity, SPEC §19 item 32).
* A quota error for one VM family (or for spot vCPUs) is a capacity error of that quota group,
  so other families are still tried; only account-wide quotas stop all creates.
* ``Retry-After`` only counts on error replies: a failed long-running operation's final poll
  may carry one, and that must not turn an allocation failure into a rate limit.
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Iterator
from typing import Any

from azure.core.exceptions import HttpResponseError

from herder.cloud import CapacityError, CloudError, QuotaError, RateLimitError

#: Wait this long after a 429 that does not say how long (Arvados' default).
DEFAULT_RETRY_AFTER = 20.0

#: Azure has no room for this VM size here right now.
CAPACITY_CODES = frozenset(
    {
        "AllocationFailed",
        "ZonalAllocationFailed",
        "OverconstrainedAllocationRequest",
        "OverconstrainedZonalAllocationRequest",
        "SkuNotAvailable",
    }
)
#: The subscription may not have more (of something) in this region.
QUOTA_CODES = frozenset({"QuotaExceeded", "ResourceQuotaExceeded"})
#: A refusal that is a quota error only when its message talks about a quota.
QUOTA_IF_MESSAGE_CODES = frozenset({"OperationNotAllowed"})

_QUOTA_MESSAGE = re.compile(r"quota", re.IGNORECASE)
#: "exceeding approved standardDSv3Family Cores quota": one VM family's vCPUs.
_FAMILY_QUOTA = re.compile(r"\b\w+Family\b.{0,20}?\b(?:cores|vcpus?)\b", re.IGNORECASE)
#: "LowPriorityCores quota" / "Total Regional Low-priority vCPUs quota": spot vCPUs.
_SPOT_QUOTA = re.compile(r"low[- ]?priority", re.IGNORECASE)


class AzureError(CloudError):
    """An Azure error herder has no special reaction to; carries Azure's code and message."""

    def __init__(self, code: str, message: str, operation: str = "", status: int = 0) -> None:
        where = f" ({operation})" if operation else ""
        super().__init__(f"{code}: {message}{where}" if code else f"{message}{where}")
        self.code = code
        self.azure_message = message
        self.operation = operation
        self.status = status


def _walk(error: Any) -> Iterator[tuple[str, str]]:
    """(code, message) of an ARM error and of its nested details, outermost first."""
    if error is None:
        return
    yield str(getattr(error, "code", "") or ""), str(getattr(error, "message", "") or "")
    for detail in getattr(error, "details", None) or []:
        yield from _walk(detail)


def error_codes(exc: BaseException) -> list[tuple[str, str]]:
    """Every (code, message) an exception carries; ``[("", str(exc))]`` when it has none."""
    found = [(c, m) for c, m in _walk(getattr(exc, "error", None)) if c or m]
    if not found:
        message = getattr(exc, "message", None) or str(exc)
        found = [("", str(message))]
    return found


def retry_after(exc: BaseException) -> float | None:
    """Seconds to wait, if ``exc`` is Azure throttling: a 429, or any error reply that says
    ``Retry-After`` (seconds, or an HTTP date read against the reply's own ``Date``, so that
    a skewed local clock does not matter).  None for anything else."""
    response = getattr(exc, "response", None)
    status = getattr(exc, "status_code", None) or getattr(response, "status_code", 0) or 0
    if response is None or status < 400:
        return None
    headers = response.headers
    value = headers.get("Retry-After") or headers.get("retry-after")
    if value is None:
        return DEFAULT_RETRY_AFTER if status == 429 else None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return DEFAULT_RETRY_AFTER
    try:
        served = email.utils.parsedate_to_datetime(headers.get("Date", "")).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        served = time.time()
    return max(0.0, when - served)


def classify(exc: BaseException, now: float, operation: str = "") -> Exception:
    """The exception to raise for ``exc``, an error from an Azure call.

    Typed errors are returned as themselves (never wrapped), because herder's pool checks the
    exception's own class.  ``now`` is the driver's clock, for ``earliest_retry``.
    """
    if isinstance(exc, CloudError):
        return exc
    codes = error_codes(exc)
    code, message = codes[0]
    text = f"{code}: {message}" if code else message
    delay = retry_after(exc)
    if delay is not None:
        return RateLimitError(f"{text} (retry in {delay:g}s)", earliest_retry=now + delay)
    for inner, inner_message in codes:
        if inner in CAPACITY_CODES:
            return CapacityError(f"{inner}: {inner_message}", instance_type_specific=True)
    for inner, inner_message in codes:
        quota = inner in QUOTA_CODES or (
            inner in QUOTA_IF_MESSAGE_CODES and _QUOTA_MESSAGE.search(inner_message)
        )
        if not quota:
            continue
        if _FAMILY_QUOTA.search(inner_message) or _SPOT_QUOTA.search(inner_message):
            return CapacityError(f"{inner}: {inner_message}", quota_group_specific=True)
        return QuotaError(f"{inner}: {inner_message}")
    if isinstance(exc, HttpResponseError) or code:
        status = getattr(exc, "status_code", None) or 0
        return AzureError(code, message, operation, status)
    return exc if isinstance(exc, Exception) else CloudError(str(exc))

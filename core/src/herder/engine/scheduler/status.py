"""The ``scheduling_status`` texts people see for a waiting container (SPEC §9.5).

The texts are Arvados' own, word for word (note the two spaces after full stops): scripts and
dashboards that parse them keep working.  herder adds five that Arvados cannot say: herder's own
instance cap (Arvados reports it as the cloud's limits), a pause after failed boots, a spend
budget that forbids new instances (``cloud.budget``), a cloud quota the driver reports full
(``quota_headroom``), named, and the containers one submitted with ``--after`` waits for.

A pass records a small :class:`Status` value and the text is only formatted when someone asks
for it, so that a pass over 100,000 waiting containers does not format 100,000 strings nobody
reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from herder.model import ContainerState
from herder.queue.base import QueueEntry

PREPARING = "Container is allocated to an instance and preparing to run."
PRIORITY_ZERO = (
    "This container will not be scheduled to run because its priority is 0 and state is {}."
)
SUPERVISOR_LIMIT = (
    "Waiting in workflow queue at position {}.  "
    "Cluster is at capacity and cannot start any new workflows right now."
)
WAITING_PREVIOUS_ATTEMPT = "Waiting for previous container attempt to exit."
WAITING_NEW_INSTANCE = "Waiting for a {} instance to boot and be ready to accept work."
WAITING_INSTANCE_TYPE = (
    "Waiting in queue at position {}.  Cluster is at capacity for all eligible instance types "
    "({}) and cannot start a new instance right now."
)
CLOUD_LIMITS = (
    "Waiting in queue at position {}.  "
    "Cluster is at cloud account limits and cannot start any new instances right now."
)
CLUSTER_CAPACITY = (
    "Waiting in queue at position {}.  "
    "Cluster is at capacity and cannot start any new instances right now."
)
MAX_INSTANCES = (
    "Waiting in queue at position {}.  "
    "Cluster is at its configured instance limit (cloud.max_instances: {}) and cannot start "
    "any new instances right now."
)
WAITING_DEPENDENCIES = (
    "This container will not be scheduled to run until {} complete with exit code 0 "
    "(submitted with --after)."
)
BOOT_BACKOFF = (
    "Waiting in queue at position {}.  "
    "{} instances of type {} failed to boot in a row; next try in {}; see herder cloudtest."
)

BUDGET = "Waiting in queue at position {}.  Cloud budget reached: {}."
QUOTA_FULL = "Waiting in queue at position {}.  Cloud quota full: {}."


class StatusKind(StrEnum):
    """Each kind's value is its text template."""

    PREPARING = PREPARING
    PRIORITY_ZERO = PRIORITY_ZERO
    SUPERVISOR_LIMIT = SUPERVISOR_LIMIT
    WAITING_PREVIOUS_ATTEMPT = WAITING_PREVIOUS_ATTEMPT
    WAITING_NEW_INSTANCE = WAITING_NEW_INSTANCE
    WAITING_INSTANCE_TYPE = WAITING_INSTANCE_TYPE
    CLOUD_LIMITS = CLOUD_LIMITS
    CLUSTER_CAPACITY = CLUSTER_CAPACITY
    MAX_INSTANCES = MAX_INSTANCES
    BOOT_BACKOFF = BOOT_BACKOFF
    BUDGET = BUDGET
    QUOTA_FULL = QUOTA_FULL
    WAITING_DEPENDENCIES = WAITING_DEPENDENCIES


def _some(uuids: tuple[str, ...]) -> str:
    """The first few of ``uuids``, and how many more, for a line people read."""
    shown = ", ".join(uuids[:3])
    return shown + (f" and {len(uuids) - 3} more" if len(uuids) > 3 else "")


@dataclass(frozen=True, slots=True)
class Status:
    """A status decided by a pass, formatted on demand.

    ``position`` is the queue position for the "Waiting in ... position" texts; ``detail`` is the
    instance type name, the container state, the eligible type names, the instance limit, or
    (for a boot back-off) the failure count, the type name and the time left, formatted.
    """

    kind: StatusKind
    position: int = 0
    detail: str | tuple[str, ...] = ""

    def text(self) -> str:
        kind = self.kind
        if kind in (StatusKind.PREPARING, StatusKind.WAITING_PREVIOUS_ATTEMPT):
            return kind.value
        if kind in (StatusKind.WAITING_NEW_INSTANCE, StatusKind.PRIORITY_ZERO):
            return kind.value.format(self.detail)
        if kind is StatusKind.WAITING_INSTANCE_TYPE:
            names = self.detail if isinstance(self.detail, tuple) else (self.detail,)
            return kind.value.format(self.position, ", ".join(names))
        if kind in (StatusKind.MAX_INSTANCES, StatusKind.BUDGET, StatusKind.QUOTA_FULL):
            return kind.value.format(self.position, self.detail)
        if kind is StatusKind.BOOT_BACKOFF:
            return kind.value.format(self.position, *self.detail)
        if kind is StatusKind.WAITING_DEPENDENCIES:
            uuids = self.detail if isinstance(self.detail, tuple) else (self.detail,)
            return kind.value.format(_some(uuids))
        return kind.value.format(self.position)


STATUS_PREPARING = Status(StatusKind.PREPARING)
STATUS_WAITING_PREVIOUS_ATTEMPT = Status(StatusKind.WAITING_PREVIOUS_ATTEMPT)


@dataclass(slots=True)
class SchedEntry:
    """One queue entry as the API shows it: the entry plus its scheduling status."""

    entry: QueueEntry
    scheduling_status: str


def dependency_status(waiting_for: list[str]) -> Status:
    """The status of a container held by ``after`` until ``waiting_for`` complete."""
    return Status(StatusKind.WAITING_DEPENDENCIES, detail=tuple(waiting_for))


def is_waiting(state: ContainerState) -> bool:
    """Queued and Locked containers are the ones that wait for the scheduler."""
    return state is ContainerState.QUEUED or state is ContainerState.LOCKED

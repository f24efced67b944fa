"""The domain records every part of herder shares: instance types, containers, workers' views.

These are plain slotted dataclasses, not pydantic models: the scheduler holds one record per
queued container and must stay small and fast with 100,000 of them.  Configuration files are
validated by the pydantic models in :mod:`herder.config`, which build these records.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from herder.names import ARRAY_ID_ENV as ARRAY_ID_ENV
from herder.names import ARRAY_ID_RE as ARRAY_ID_RE
from herder.names import ARRAY_INDEX_ENV as ARRAY_INDEX_ENV
from herder.names import CLUSTER_ID_RE as CLUSTER_ID_RE
from herder.names import CONTAINER_UUID_RE as CONTAINER_UUID_RE
from herder.names import ContainerState as ContainerState
from herder.names import is_array_id as is_array_id
from herder.names import is_container_uuid as is_container_uuid

# A container image reference, in the grammar of the OCI distribution spec (docker and podman
# use it): ``[registry[:port]/]path[:tag][@algorithm:hex]``.  Checked where a container enters
# herder, so that a value like ``--privileged`` or ``-v/:/host`` is refused with a 400 rather than
# reaching an engine's command line.  Written without look-arounds: the same pattern is the
# ``image`` field's ``pattern`` in the OpenAPI document.
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*(?::[0-9]+)?"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME = rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
IMAGE_REFERENCE_PATTERN = rf"^(?:{_NAME}(?::{_TAG})?(?:@{_DIGEST})?)?$"


@functools.cache
def _image_reference_re() -> re.Pattern[str]:
    # Compiled on first use: the command-line client imports this module at every start.
    return re.compile(IMAGE_REFERENCE_PATTERN)


def is_image_reference(text: str) -> bool:
    """Whether ``text`` is an image reference (or empty: no image)."""
    return _image_reference_re().fullmatch(text) is not None


# --------------------------------------------------------------------------- instance types


@dataclass(frozen=True, slots=True)
class GPUSpec:
    """GPU hardware of an instance type (all zero/empty for a type without GPUs)."""

    stack: str = ""  # "", "cuda" or "rocm"
    driver_version: str = ""
    hardware_target: str = ""  # CUDA compute capability or ROCm target
    device_count: int = 0
    vram: int = 0  # bytes per device


@dataclass(frozen=True, slots=True)
class Billing:
    """How a cloud bills an instance's time: in ``increment`` seconds, at least ``minimum``.

    Per-second billing with a one-minute minimum (most clouds today) is ``Billing(1, 60)``;
    hourly billing is ``Billing(3600, 3600)``.  The engine uses it to keep an idle instance
    whose time is already paid for (see :meth:`paid_until`), and to compute spend.
    """

    increment: float = 1.0
    minimum: float = 0.0

    def billed_seconds(self, lifetime: float) -> float:
        """Seconds charged for an instance that lived ``lifetime`` seconds."""
        if lifetime <= 0:
            return 0.0
        inc = self.increment if self.increment > 0 else 1.0
        # A hair of tolerance: 3600.0000001 s of an hourly instance is one hour, not two.
        units = math.ceil(lifetime / inc - 1e-9)
        return max(self.minimum, units * inc)

    def paid_until(self, age: float) -> float:
        """The age at which the time already charged for runs out (>= ``age``).

        An instance is charged for the increment it is in as soon as it starts it, so the
        increment being used is paid for to its end.
        """
        inc = self.increment if self.increment > 0 else 1.0
        end = math.ceil(max(0.0, age) / inc) * inc
        if end <= age:
            end += inc  # on the boundary: the next increment starts now
        return max(self.minimum, end)

    def cost(self, lifetime: float, price_per_hour: float) -> float:
        return self.billed_seconds(lifetime) * price_per_hour / 3600.0

    @property
    def per_second(self) -> bool:
        return self.increment <= 1.0


PER_SECOND = Billing()


@dataclass(frozen=True, slots=True)
class InstanceType:
    """One configured instance type (SPEC §8.1): what herder may ask a cloud for."""

    name: str
    provider_type: str
    vcpus: int
    ram: int
    included_scratch: int = 0
    added_scratch: int = 0
    price: float = 0.0
    preemptible: bool = False
    gpu: GPUSpec = field(default_factory=GPUSpec)
    #: How the cloud bills this type (from the configuration, else the driver).  Per second
    #: unless told otherwise.  Not in :meth:`to_json`: the runner agent has no use for it.
    billing: Billing = PER_SECOND

    @property
    def scratch(self) -> int:
        """Usable scratch space: the instance's own disk plus any volume herder adds."""
        return self.included_scratch + self.added_scratch

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "provider_type": self.provider_type,
            "vcpus": self.vcpus,
            "ram": self.ram,
            "included_scratch": self.included_scratch,
            "added_scratch": self.added_scratch,
            "scratch": self.scratch,
            "price": self.price,
            "preemptible": self.preemptible,
            "gpu": {
                "stack": self.gpu.stack,
                "driver_version": self.gpu.driver_version,
                "hardware_target": self.gpu.hardware_target,
                "device_count": self.gpu.device_count,
                "vram": self.gpu.vram,
            },
        }


# --------------------------------------------------------------------------- containers


@dataclass(frozen=True, slots=True)
class GPURequest:
    """GPUs a container needs (SPEC §8.4)."""

    stack: str = ""  # "", "cuda" or "rocm"
    device_count: int = 0
    driver_version: str = ""
    hardware_target: tuple[str, ...] = ()
    vram: int = 0


@dataclass(frozen=True, slots=True)
class RuntimeConstraints:
    vcpus: int = 1
    ram: int = 0
    scratch: int = 0
    gpu: GPURequest = field(default_factory=GPURequest)


@dataclass(frozen=True, slots=True)
class SchedulingParameters:
    preemptible: bool = False
    max_run_time: float = 0.0  # seconds; 0 means no limit
    supervisor: bool = False


@dataclass(frozen=True, slots=True)
class ContainerSpec:
    """What a user submits.  The queue turns it into a :class:`Container` with a UUID."""

    command: tuple[str, ...]
    image: str = ""
    environment: tuple[tuple[str, str], ...] = ()
    cwd: str = ""
    runtime: str = ""  # "" (engine if present), "docker", "podman" or "process"
    runtime_constraints: RuntimeConstraints = field(default_factory=RuntimeConstraints)
    scheduling_parameters: SchedulingParameters = field(default_factory=SchedulingParameters)
    priority: int = 1
    name: str = ""
    #: Containers that must complete with exit code 0 before this one may run (``--after``).
    after: tuple[str, ...] = ()
    #: when the runner pulls the image: "if-not-present", "always", "never"; "" for the
    #: configured default (``containers.pull_policy``)
    pull_policy: str = ""
    #: Free-form ``key=value`` labels, sorted by key, for the submitter's own bookkeeping: cost
    #: reports group by them (``herder costs``).  herder gives them no other meaning.
    labels: tuple[tuple[str, str], ...] = ()


#: The image pull policies a container (or ``containers.pull_policy``) may name.
PULL_POLICIES = ("if-not-present", "always", "never")


@dataclass(frozen=True, slots=True)
class Attempt:
    """One dispatch of a container: where it ran, when, and how that ended.

    ``outcome`` is ``running`` while the attempt lasts, then ``complete`` (the program exited,
    ``exit_code`` says how), ``retried`` (the runner or its instance was lost, or the instance
    could not start it: ``reason`` says which), ``unlocked`` (it never started there) or
    ``cancelled``.  ``started_at`` is None for an attempt that never started.
    """

    number: int
    instance_id: str = ""
    instance_type: str = ""
    started_at: float | None = None
    ended_at: float | None = None
    outcome: str = "running"
    reason: str = ""
    exit_code: int | None = None
    cost: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "instance_id": self.instance_id,
            "instance_type": self.instance_type,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "outcome": self.outcome,
            "reason": self.reason,
            "exit_code": self.exit_code,
            "cost": self.cost,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Attempt:
        return cls(
            number=int(data["number"]),
            instance_id=str(data.get("instance_id", "")),
            instance_type=str(data.get("instance_type", "")),
            started_at=data.get("started_at"),
            ended_at=data.get("ended_at"),
            outcome=str(data.get("outcome", "running")),
            reason=str(data.get("reason", "")),
            exit_code=data.get("exit_code"),
            cost=float(data.get("cost", 0.0)),
        )


@dataclass(frozen=True, slots=True)
class Container:
    """A container record as the queue holds it.

    Records are immutable: the queue replaces a record on every change, so a snapshot handed to
    the scheduler or the API never changes under its reader.
    """

    uuid: str
    state: ContainerState
    priority: int
    spec: ContainerSpec
    created_at: float
    locked_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    lock_count: int = 0
    exit_code: int | None = None
    runtime_status: tuple[tuple[str, str], ...] = ()  # e.g. (("error", "..."),)
    instance_id: str = ""
    instance_type: str = ""
    cost: float = 0.0
    #: The array this container belongs to (``submit --count``); "" when it is on its own.
    array_id: str = ""
    #: Every dispatch attempt, oldest first (see :class:`Attempt`).
    attempt_history: tuple[Attempt, ...] = ()

    # Convenience accessors used all over the engine.
    @property
    def runtime_constraints(self) -> RuntimeConstraints:
        return self.spec.runtime_constraints

    @property
    def scheduling_parameters(self) -> SchedulingParameters:
        return self.spec.scheduling_parameters

    def status(self, key: str) -> str:
        for k, v in self.runtime_status:
            if k == key:
                return v
        return ""


@dataclass(slots=True)
class InstanceResources:
    """Resources of an instance, or needed by a container (SPEC §8.2, §8.5).

    ``shared_vcpu_used`` records that a container asking for 0 VCPUs was placed here: all such
    containers share one VCPU, so the instance must keep at least one VCPU free for them.
    """

    vcpus: int = 0
    ram: int = 0
    scratch: int = 0
    gpus: int = 0
    gpu_vram: int = 0
    shared_vcpu_used: bool = False

    @classmethod
    def of_type(cls, it: InstanceType) -> InstanceResources:
        return cls(it.vcpus, it.ram, it.scratch, it.gpu.device_count, it.gpu.vram)

    def accommodates(self, need: InstanceResources) -> bool:
        return (
            self.vcpus >= need.vcpus
            and self.ram >= need.ram
            and self.scratch >= need.scratch
            and self.gpus >= need.gpus
            and self.gpu_vram >= need.gpu_vram
            and self.vcpus > 0
            and (not self.shared_vcpu_used or self.vcpus > need.vcpus)
        )

    def sub(self, need: InstanceResources) -> InstanceResources:
        return InstanceResources(
            self.vcpus - need.vcpus,
            self.ram - need.ram,
            self.scratch - need.scratch,
            self.gpus - need.gpus,
            self.gpu_vram - need.gpu_vram,
            self.shared_vcpu_used or need.vcpus == 0,
        )

    def copy(self) -> InstanceResources:
        return InstanceResources(
            self.vcpus, self.ram, self.scratch, self.gpus, self.gpu_vram, self.shared_vcpu_used
        )


# --------------------------------------------------------------------------- workers


class WorkerState(StrEnum):
    """SPEC §3.1."""

    UNKNOWN = "unknown"  # not created by this process, no successful boot probe yet
    BOOTING = "booting"  # created by us, not ready yet
    IDLE = "idle"
    RUNNING = "running"  # at least one runner
    SHUTDOWN = "shutdown"  # destroy requested; watched only until it disappears


class IdleBehavior(StrEnum):
    RUN = "run"  # run containers, shut down after the idle timeout
    HOLD = "hold"  # never shut down automatically, start nothing new
    DRAIN = "drain"  # shut down as soon as idle, start nothing new


class DrainCause(StrEnum):
    """Who or what set an instance's idle behaviour to drain (or hold), for its ``reason``.

    Only herder's own reversible causes (consolidation, the budget) are ever undone by herder;
    an operator's drain, and one whose cause is not known (set before a restart), never are.
    """

    NONE = ""
    OPERATOR = "operator"
    BROKEN = "broken"
    LIFETIME = "lifetime"
    CONSOLIDATION = "consolidation"
    BUDGET = "budget"

    @property
    def automatic_undo(self) -> bool:
        return self in (DrainCause.CONSOLIDATION, DrainCause.BUDGET)


class BootOutcome(StrEnum):
    FAILURE = "failure"
    SUCCESS = "success"
    ABORTED = "aborted"
    DISAPPEARED = "disappeared"


@dataclass(slots=True)
class InstanceView:
    """What the pool tells the scheduler, the API and the CLI about one instance (SPEC §5.6).

    A pending create has ``instance == ""`` and ``address == ""``.
    """

    instance: str
    address: str
    price: float
    instance_type: str
    provider_instance_type: str
    last_container_uuid: str
    last_busy: float
    running_container_uuids: list[str]
    worker_state: WorkerState
    idle_behavior: IdleBehavior
    state_since: float = 0.0
    last_probe: float = 0.0
    appeared: float = 0.0
    boot_outcome: str = ""
    probe_error: str = ""  # why the latest probe failed; "" once one succeeds
    #: Why the idle behaviour is what it is ("" for run, or when nobody said): people read it.
    reason: str = ""
    #: What set it (see :class:`DrainCause`); herder undoes only its own reversible causes.
    drain_cause: DrainCause = DrainCause.NONE
    #: When the billing increment the instance is in ends (epoch seconds), for types billed in
    #: increments longer than a second; 0 otherwise.  An idle instance is kept until shortly
    #: before it (``cloud.billing_shutdown_margin``).
    paid_until: float = 0.0
    #: The price per hour in force now as the driver's price history reports it (spot
    #: markets), 0 when it reports none: spend then counts at ``price``, the type's.
    market_price: float = 0.0

    @property
    def price_now(self) -> float:
        """What the instance costs per hour now: its market price if known, else its type's."""
        return self.market_price or self.price

"""What the simulated cloud counts: cloud calls, injected faults, instance time, cost, double runs.

``herder simulate`` and the engine's tests read these numbers to prove properties of a run (no
container ever ran twice at once, every fault knob fired, what the run would have cost), so the
counts are exact: each is updated under the simulated cloud's lock at the moment it happens.

A :class:`SimStats` is live: it belongs to one simulated cloud, and the time-dependent figures
(instances alive, instance-seconds, cost) are computed against that cloud when read.
"""

from __future__ import annotations

from collections import Counter
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

#: Kinds of cloud calls counted in :attr:`SimStats.calls`.
CALL_KINDS = ("create", "list", "destroy", "set_tags")
#: Outcomes of cloud calls counted in :attr:`SimStats.calls`.
CALL_OUTCOMES = ("ok", "error", "quota", "capacity", "rate_limit")

#: Every kind of fault the sim driver injects, as ``faults_injected`` counts them.
FAULT_KINDS = (
    "create_error",
    "destroy_error",
    "quota",
    "capacity",
    "rate_limit",
    "never_boot",
    "broken",
    "disappear",
    "runner_crash",
    "ssh_failure",
    "stale_lock",
)


class LiveInstances(Protocol):
    """What the statistics need from their cloud to bill instances that are still there."""

    @property
    def lock(self) -> AbstractContextManager[Any]: ...

    def now(self) -> float: ...

    def settle(self, now: float) -> None: ...

    def listed_count(self, now: float) -> int: ...

    def live_instance_time(self, now: float) -> list[tuple[str, float, float]]:
        """(instance type name, seconds billed so far, price per hour) per listed instance."""
        ...


@dataclass(frozen=True, slots=True)
class DoubleRun:
    """A container process started while another process of the same container was alive.

    ``instance_id`` is where the new copy started; ``other_instance_ids`` are the instances
    where a copy was still alive at that moment.
    """

    uuid: str
    at: float
    instance_id: str
    other_instance_ids: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid,
            "at": self.at,
            "instance_id": self.instance_id,
            "other_instance_ids": list(self.other_instance_ids),
        }


@dataclass
class SimStats:
    """Counters of one simulated cloud, shared by every instance set of one driver.

    Instance time is billed from the create call until the instance leaves the cloud's listing
    (destroyed, after the configured shutdown delay, or vanished); prices are per hour.
    """

    #: (kind, outcome) → number of calls; kinds in :data:`CALL_KINDS`.
    calls: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: fault kind → times it fired (took effect).
    faults: Counter[str] = field(default_factory=Counter)
    #: command kind ("list", "detach", "md5sum", "boot_probe", ...) → commands run.
    commands: Counter[str] = field(default_factory=Counter)
    created: int = 0
    #: instances destroyed by a destroy call (not counting ones that vanished).
    destroyed: int = 0
    #: instances that vanished on their own (the ``disappear`` fault).
    disappeared: int = 0
    peak_alive: int = 0
    container_starts: int = 0
    #: processes that ended with an exit code (any code, including timeouts and kills).
    container_completions: int = 0
    #: processes that ended without an exit code (runner crash, instance destroyed or gone).
    container_crashes: int = 0
    #: processes ended by a signal from ``--kill`` (also counted in completions).
    container_kills: int = 0
    #: ``--detach`` calls refused because the container's lock on that instance was held.
    refused_starts: int = 0
    exit_codes: Counter[int] = field(default_factory=Counter)
    double_run_details: list[DoubleRun] = field(default_factory=list)
    #: Instance time of instances that have left the cloud, by type: [seconds, cost].
    billed_gone: dict[str, list[float]] = field(default_factory=dict)
    cloud: LiveInstances | None = field(default=None, repr=False, compare=False)

    # ------------------------------------------------------------------ recording

    def bill_gone(self, type_name: str, seconds: float, price_per_hour: float) -> None:
        """Add the whole life of an instance that left the cloud (caller holds the lock)."""
        seconds = max(0.0, seconds)
        entry = self.billed_gone.setdefault(type_name, [0.0, 0.0])
        entry[0] += seconds
        entry[1] += seconds * price_per_hour / 3600.0

    # ------------------------------------------------------------------ reading

    @property
    def double_runs(self) -> int:
        return len(self.double_run_details)

    @property
    def alive(self) -> int:
        """Instances in the cloud's listing now (booting, running or shutting down)."""
        if self.cloud is None:
            return 0
        with self.cloud.lock:
            now = self.cloud.now()
            self.cloud.settle(now)
            return self.cloud.listed_count(now)

    def call_count(self, kind: str, outcome: str | None = None) -> int:
        """Calls of ``kind`` with ``outcome``, or with any outcome when it is None."""
        return sum(n for (k, o), n in self.calls.items() if k == kind and outcome in (None, o))

    def calls_summary(self) -> dict[str, dict[str, int]]:
        """kind → {outcome: calls} for every kind, listing only outcomes that happened."""
        summary: dict[str, dict[str, int]] = {kind: {} for kind in CALL_KINDS}
        for (kind, outcome), n in sorted(self.calls.items()):
            summary.setdefault(kind, {})[outcome] = n
        return summary

    def instance_seconds_by_type(self, now: float | None = None) -> dict[str, float]:
        """Instance-seconds by instance type name, live instances billed up to ``now``."""
        return {name: both[0] for name, both in self._billed(now).items()}

    def cost_by_type(self, now: float | None = None) -> dict[str, float]:
        """Cost by instance type name (price per hour × hours), up to ``now``."""
        return {name: both[1] for name, both in self._billed(now).items()}

    def instance_seconds(self, now: float | None = None) -> float:
        return sum(self.instance_seconds_by_type(now).values())

    def cost(self, now: float | None = None) -> float:
        return sum(self.cost_by_type(now).values())

    def _billed(self, now: float | None) -> dict[str, list[float]]:
        if self.cloud is None:
            return {k: list(v) for k, v in self.billed_gone.items()}
        with self.cloud.lock:
            current = self.cloud.now()
            self.cloud.settle(current)
            out = {k: list(v) for k, v in self.billed_gone.items()}
            for name, seconds, price in self.cloud.live_instance_time(
                current if now is None else now
            ):
                entry = out.setdefault(name, [0.0, 0.0])
                entry[0] += seconds
                entry[1] += seconds * price / 3600.0
            return out

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        """A JSON-ready summary as of ``now`` (for ``herder simulate`` reports)."""
        billed = self._billed(now)
        return {
            "calls": self.calls_summary(),
            "faults": dict(sorted(self.faults.items())),
            "commands": dict(sorted(self.commands.items())),
            "created": self.created,
            "destroyed": self.destroyed,
            "disappeared": self.disappeared,
            "alive": self.alive,
            "peak_alive": self.peak_alive,
            "instance_seconds": sum(v[0] for v in billed.values()),
            "instance_seconds_by_type": {k: v[0] for k, v in sorted(billed.items())},
            "cost": sum(v[1] for v in billed.values()),
            "cost_by_type": {k: v[1] for k, v in sorted(billed.items())},
            "container_starts": self.container_starts,
            "container_completions": self.container_completions,
            "container_crashes": self.container_crashes,
            "container_kills": self.container_kills,
            "refused_starts": self.refused_starts,
            "exit_codes": {str(k): v for k, v in sorted(self.exit_codes.items())},
            "double_runs": self.double_runs,
            "double_run_details": [d.to_json() for d in self.double_run_details],
        }

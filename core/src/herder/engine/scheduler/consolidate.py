"""Consolidation: when several instances are lightly used, let the ones that can empty soonest go.

Placement already packs new containers onto the busiest instance with room, but an instance
that keeps receiving the odd container never empties, and one that holds a single long
container lives as long as it does.  On a falling workload that leaves many instances each a
little used.  After each pass where nothing waits for an instance, this module drains the lightly
used instances (at most ``cloud.consolidation_threshold`` of their VCPUs in use) that can empty
soonest, keeping at least one instance that takes work: their containers run to the end, new
ones go to the others, and the drained ones shut down once empty.

Nothing is killed or moved.  The drain is herder's own (:attr:`DrainCause.CONSOLIDATION`, with
a reason people can read), so the scheduler takes the instance back by itself when a container
would otherwise need a new instance (:meth:`Placement.reclaimable`); an operator's drain or
hold is never touched, and an instance an operator drains after consolidation did is the
operator's from then on.

"Can empty soonest" is judged from what the engine knows: the latest ``max_run_time`` deadline
of the containers on it (unknown without a limit), then the fewest VCPUs and containers in use.
Instances with nothing running are left to the idle shutdown rules (which respect paid billing
increments), and booting ones to their boot.

Drains go in that order and stop at an instance demand took back less than
:data:`REDRAIN_HOLDOFF` ago: it keeps taking work for now, and draining the ones that empty later
would steer new containers onto it, the instance that empties soonest.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

from herder.engine.worker.interfaces import WorkerPool
from herder.model import DrainCause, IdleBehavior, InstanceType, InstanceView, WorkerState
from herder.queue.base import QueueEntry

#: An instance whose consolidation drain demand undid is not drained again this soon, so that
#: a trickle of containers does not flip it between drain and run on every pass.
REDRAIN_HOLDOFF = 300.0


@dataclass(frozen=True, slots=True)
class Use:
    """How one instance is used, for choosing what to drain."""

    view: InstanceView
    used_vcpus: int
    vcpus: int
    empties_at: float  # latest known deadline of its containers; inf when one has none

    @property
    def fraction(self) -> float:
        return self.used_vcpus / self.vcpus if self.vcpus else 1.0

    def sort_key(self) -> tuple[float, int, int, str]:
        return (
            self.empties_at,
            self.used_vcpus,
            len(self.view.running_container_uuids),
            self.view.instance,
        )


class Consolidator:
    """Drains lightly used instances between passes (see the module docstring)."""

    def __init__(
        self,
        *,
        pool: WorkerPool,
        instance_types: Mapping[str, InstanceType],
        threshold: float,
        logger: logging.Logger,
    ) -> None:
        self._pool = pool
        self._types = instance_types
        self._threshold = threshold
        self._log = logger
        self._reclaimed_at: dict[str, float] = {}
        self._drained_before: set[str] = set()

    @property
    def enabled(self) -> bool:
        return self._threshold > 0

    def run(
        self,
        *,
        now: float,
        entries: Mapping[str, QueueEntry],
        demand: bool,
    ) -> list[str]:
        """Drain what should go; returns the instance ids drained now.

        ``demand`` is true when a container waits for room: nothing is drained then.
        """
        if not self.enabled or demand:
            return []
        views = self._pool.instances()
        self._note_reclaimed(views, now)
        working = [
            v
            for v in views
            if v.instance
            and v.idle_behavior == IdleBehavior.RUN
            and v.worker_state in (WorkerState.IDLE, WorkerState.RUNNING)
            and v.instance_type in self._types
        ]
        if len(working) < 2:
            return []
        uses = [u for u in (self._use(v, entries) for v in working) if u and u.used_vcpus]
        if not uses:
            return []  # idle ones go by the idle rules
        # The instance that would empty last keeps taking work whatever its use: it lives
        # longest anyway, so work placed there costs least.
        keeper = max(uses, key=Use.sort_key)
        light = sorted(
            (u for u in uses if u is not keeper and u.fraction <= self._threshold),
            key=Use.sort_key,
        )
        drained = []
        for use in light:
            if now - self._reclaimed_at.get(use.view.instance, -math.inf) < REDRAIN_HOLDOFF:
                # Demand took this one back lately, so it keeps taking work for now.  Draining
                # the ones that empty later would steer new containers onto it, the one that
                # empties soonest: the opposite of consolidation.  Stop here.
                break
            reason = (
                f"consolidation: {use.used_vcpus} of {use.vcpus} VCPUs in use (at most "
                f"{self._threshold:.0%}); new containers go to other instances until work "
                "for this one returns"
            )
            if self._pool.auto_drain(use.view.instance, DrainCause.CONSOLIDATION, reason):
                self._log.info("instance %s: %s", use.view.instance, reason)
                drained.append(use.view.instance)
        return drained

    def _note_reclaimed(self, views: list[InstanceView], now: float) -> None:
        """Remember instances that were consolidation-drained and now run again (reclaimed)."""
        current = {v.instance: v for v in views}
        for instance in list(self._reclaimed_at):
            if instance not in current:
                del self._reclaimed_at[instance]
        for instance in self._drained_before:
            view = current.get(instance)
            if view is not None and view.idle_behavior == IdleBehavior.RUN:
                self._reclaimed_at[instance] = now
        self._drained_before = {
            v.instance for v in views if v.drain_cause is DrainCause.CONSOLIDATION
        }

    def _use(self, view: InstanceView, entries: Mapping[str, QueueEntry]) -> Use | None:
        it = self._types[view.instance_type]
        used = 0
        empties_at = -math.inf
        for uuid in view.running_container_uuids:
            entry = entries.get(uuid)
            if entry is None:
                return None  # size unknown: not known to be light
            used += entry.resources.vcpus
            ctr = entry.container
            limit = ctr.scheduling_parameters.max_run_time
            if limit > 0 and ctr.started_at is not None:
                empties_at = max(empties_at, ctr.started_at + limit)
            else:
                empties_at = math.inf
        return Use(view, used, it.vcpus, empties_at)

"""One scheduling pass over the queue: lock, start, create, wait (SPEC §9.5).

The pass walks the queue in scheduler order — containers that already have a runner, then Locked
before Queued, then priority, then first seen — and for each waiting container decides one thing:

* a Queued container is *locked* if there is room for it (an instance with spare resources, or
  an instance type that is not at capacity).  It never causes an instance to be created: the next
  pass sees it Locked and does that.  Locking first means a container is only ever booked once;
* a Locked container is *started* on the best instance with room, or a new instance is
  *created* for it, or it waits (instance booting, types at capacity, cloud quota reached).

``max_containers`` limits how many containers run or are being started at once.  Arvados lowers
it after API overload errors; herder has no remote API, so only the quota-driven part remains:
at the cloud quota the limit drops to the number of instances, and afterwards rises slowly (10%
above the current workload, never more than one above the last level known to fit the quota),
so that hitting the quota does not lock and unlock containers over and over until they exhaust
their dispatch attempts.

Unlike Arvados (SPEC §9.5 step 18 skips every container once the limit is reached), the limit
holds back only containers that would need a new instance.  The quota it stands for counts
instances; a container that fits on an instance that already exists needs none, so it is still
locked and started there.  Arvados mostly runs one container per instance, where the two are
the same; with several containers per instance, the instance-count limit would otherwise leave
every instance but one slot idle for as long as the pool stays at its quota.

Statuses are recorded as :class:`~herder.engine.scheduler.status.Status` values only where the pass
decides something specific; the rest ("preparing", "priority 0", "waiting at position N") are
derived when the snapshot is read (:meth:`PassResult.sched_entries`).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from herder.config import Config
from herder.engine.scheduler.ops import ContainerOps
from herder.engine.scheduler.placement import READY, Placement, Slot
from herder.engine.scheduler.queue_index import OrderItem, QueueIndex
from herder.engine.scheduler.quotas import QuotaHeadroom
from herder.engine.scheduler.status import (
    STATUS_PREPARING,
    STATUS_WAITING_PREVIOUS_ATTEMPT,
    SchedEntry,
    Status,
    StatusKind,
    dependency_status,
)
from herder.engine.worker.interfaces import BootBackoff, QuotaLimit, WorkerPool
from herder.model import ContainerState, DrainCause, InstanceType, WorkerState
from herder.queue.base import QueueEntry
from herder.queue.rules import waiting_for
from herder.units import format_duration

QUEUED = ContainerState.QUEUED
LOCKED = ContainerState.LOCKED


@dataclass(slots=True)
class PassInput:
    """What one pass looks at, read once at its start."""

    now: float
    running: dict[str, float]
    entries: dict[str, QueueEntry]
    queue_time: float
    worker_counts: dict[WorkerState, int]
    #: Why no instance may be created (the spend budget's message), or None.
    no_new_instances: str | None = None


@dataclass(slots=True)
class PassResult:
    """The outcome of one pass, kept for the API until the next one."""

    order: list[OrderItem] = field(default_factory=list)
    running: Mapping[str, float] = field(default_factory=dict)
    statuses: dict[str, Status] = field(default_factory=dict)
    next_position: int = 0
    quota_limit: QuotaLimit | None = None
    max_instances: int = 0
    allocated_not_started: int = 0
    over_quota: int = 0
    max_containers: int = 0

    def sched_entries(self) -> list[SchedEntry]:
        """The queue in scheduler order with every status formatted (SPEC §9.5 step 20).

        Containers that have a runner come first; a Queued or Locked one without a specific
        status gets the next queue position with the cloud-limits or capacity text.
        """
        running = self.running
        with_runner = sorted(
            (item for item in self.order if item[3] in running), key=lambda item: item[:4]
        )
        without = [item for item in self.order if item[3] not in running]
        reason = StatusKind.CLUSTER_CAPACITY
        if self.quota_limit is not None:
            reason = _LIMIT_STATUS[self.quota_limit]
        position = self.next_position
        out: list[SchedEntry] = []
        for item in with_runner:
            ctr = item[4].container
            waiting = ctr.state is QUEUED or ctr.state is LOCKED
            out.append(SchedEntry(item[4], STATUS_PREPARING.text() if waiting else ""))
        for item in without:
            entry = item[4]
            ctr = entry.container
            status = self.statuses.get(ctr.uuid)
            if status is not None:
                text = status.text()
            elif ctr.priority < 1:
                text = Status(StatusKind.PRIORITY_ZERO, detail=ctr.state.value).text()
            elif ctr.state is QUEUED or ctr.state is LOCKED:
                position += 1
                text = Status(reason, position, str(self.max_instances)).text()
            else:
                text = ""
            out.append(SchedEntry(entry, text))
        return out


#: The status of a container waiting behind a limit, by the limit the pool is at.
_LIMIT_STATUS = {
    QuotaLimit.CLOUD_QUOTA: StatusKind.CLOUD_LIMITS,
    QuotaLimit.MAX_INSTANCES: StatusKind.MAX_INSTANCES,
}


def _plain(entry: QueueEntry) -> bool:
    """Not a supervisor, not priority 0 and not held by ``after``: passing it over changes no
    count and no status."""
    c = entry.container
    return (
        c.priority > 0
        and not c.spec.scheduling_parameters.supervisor
        and not (c.runtime_status and waiting_for(c))
    )


class ConcurrencyLimit:
    """The dynamic limit on containers running or being started (SPEC §9.2, §9.5 steps 6-11)."""

    def __init__(self, config: Config) -> None:
        cloud = config.cloud
        self.max_containers = cloud.initial_quota_estimate or cloud.max_instances
        self.instances_within_quota = 0
        self.supervisor_fraction = cloud.supervisor_fraction

    def update(self, running: int, total_instances: int, at_quota: bool) -> None:
        if self.max_containers > 0:
            # No overload signal exists in herder, so the "quiet for a minute" branch always
            # applies: allow about 10% more than what runs now.
            self.max_containers = max(self.max_containers, running * 11 // 10 + 1)
        if 0 < self.instances_within_quota < total_instances:
            # Evidently this many instances fit the quota: raise the estimate.
            self.instances_within_quota = total_instances
        if at_quota:
            if self.max_containers == 0 or self.max_containers > total_instances:
                self.max_containers = max(1, total_instances)
            self.instances_within_quota = total_instances
        elif 0 < self.instances_within_quota < self.max_containers - 1:
            # Never go more than one above a level known to fit: otherwise each brief lapse
            # of the quota condition locks several containers that are unlocked again at the
            # next quota error, burning their dispatch attempts.
            self.max_containers = self.instances_within_quota + 1

    def max_supervisors(self) -> int:
        limit = int(self.max_containers * self.supervisor_fraction)
        if limit < 1 and self.supervisor_fraction > 0 and self.max_containers > 0:
            return 1
        return limit


class RunQueue:
    """Runs the main pass of SPEC §9.5 against the pool, recording the outcome."""

    def __init__(
        self,
        *,
        pool: WorkerPool,
        ops: ContainerOps,
        config: Config,
        instance_types: Mapping[str, InstanceType],
        logger: logging.Logger,
    ) -> None:
        self._pool = pool
        self._ops = ops
        self._types = instance_types
        self._max_per_instance = config.cloud.max_running_containers_per_instance
        self._max_instances = config.cloud.max_instances
        self._log = logger
        self.limit = ConcurrencyLimit(config)
        self.index = QueueIndex()
        #: The cloud's quotas as last read; by default none are (drivers without the method).
        self.quotas = QuotaHeadroom(
            read=None, group_of=lambda it: "", refresh_interval=0, logger=logger
        )
        self._names_cache: dict[
            tuple[int, ...], tuple[tuple[InstanceType, ...], frozenset[str], tuple[str, ...]]
        ] = {}

    def run(self, pin: PassInput) -> PassResult:
        index = self.index
        index.update(pin.entries)
        running = pin.running
        total_instances = sum(pin.worker_counts.values())
        self.limit.update(len(running), total_instances, self._pool.at_quota())
        return _Pass(self, pin, total_instances).run()

    def eligible_names(self, entry: QueueEntry) -> tuple[frozenset[str], tuple[str, ...]]:
        """The entry's eligible type names as a set (for lookups) and in order (for statuses).

        Entries hold lists of the configured InstanceType objects, and few distinct lists
        exist, so the answer is cached by the identities of the types.  The cache keeps the
        types alive, so their ids cannot be reused by other objects meanwhile.
        """
        types = entry.instance_types
        key = tuple(map(id, types))
        hit = self._names_cache.get(key)
        if hit is None:
            names = tuple(t.name for t in types)
            hit = (tuple(types), frozenset(names), names)
            if len(self._names_cache) > 10_000:
                self._names_cache.clear()
            self._names_cache[key] = hit
        return hit[1], hit[2]


class _Pass:
    """The state of one run of the main loop (``trying``, ``qpos``, over-quota lists...)."""

    def __init__(self, rq: RunQueue, pin: PassInput, total_instances: int) -> None:
        self.rq = rq
        self.pool = rq._pool
        self.ops = rq._ops
        self.log = rq._log
        self.pin = pin
        self.total_instances = total_instances
        self.max_containers = rq.limit.max_containers
        self.max_supervisors = rq.limit.max_supervisors()
        self.trying = len(pin.running)
        self.supervisors = 0
        self.qpos = 0
        self.statuses: dict[str, Status] = {}
        self.over_max_super: list[QueueEntry] = []
        self.over_quota_at = -1  # position in index.order where the over-quota list starts
        self.over_quota = 0
        self.allocated_not_started = 0
        self.at_capacity: dict[tuple[str, bool], bool] = {}
        self.backoffs: dict[str, BootBackoff | None] = {}  # by type name, for this pass
        self.quota_full: dict[str, str | None] = {}  # by type name, for this pass
        self._placement: Placement | None = None

    @property
    def placement(self) -> Placement:
        """The instances and their spare resources, built when first needed.

        A pass that only finds the concurrency limit reached never needs them, and listing
        10,000 instances is a good part of such a pass.
        """
        if self._placement is None:
            rq = self.rq
            self._placement = Placement(
                self.pool.instances(),
                rq._types,
                entries=self.pin.entries,
                max_per_instance=rq._max_per_instance,
                logger=rq._log,
            )
        return self._placement

    def saturated(self) -> bool:
        return 0 < self.max_containers <= self.trying

    def run(self) -> PassResult:
        order = self.rq.index.order
        running = self.pin.running
        entries = self.pin.entries
        # Containers with a runner come first; all they do is count as supervisors.
        with_runner = 0
        for uuid in running:
            entry = entries.get(uuid)
            if entry is not None:
                with_runner += 1
                if entry.container.scheduling_parameters.supervisor:
                    self.supervisors += 1
        seen = 0  # entries without a runner visited so far
        position = 0
        # Past the limit only containers that fit on existing instances go on (see the module
        # docstring).  Spare room only shrinks during a pass, so the walk ends when none is
        # left, and a container whose needs fit no instance at all is passed over cheaply.
        room_checked = -1
        while position < len(order):
            entry = order[position][4]
            if self.saturated():
                placement = self.placement
                if room_checked != placement.version:
                    if not placement.has_room():
                        self._count_later_supervisors(order, position)
                        break
                    room_checked = placement.version
                if _plain(entry) and not placement.fits_anywhere(entry.resources):
                    position += 1
                    continue
            uuid = entry.container.uuid
            if uuid not in running:
                seen += 1
                if not self._consider(entry):
                    self.over_quota_at = position
                    self.over_quota = len(order) - with_runner - seen + 1
                    break
            position += 1
        quota_limit = self.pool.quota_limit()
        if self.over_quota_at >= 0 or self.over_max_super:
            self._unlock_over_quota(order)
        if self.over_quota_at >= 0:
            self._shut_down_unallocated()
        return PassResult(
            order=list(order),
            running=running,
            statuses=self.statuses,
            next_position=self.qpos,
            quota_limit=quota_limit,
            max_instances=self.rq._max_instances,
            allocated_not_started=self.allocated_not_started,
            over_quota=self.over_quota + len(self.over_max_super),
            max_containers=self.max_containers,
        )

    # ---- one container

    def _consider(self, entry: QueueEntry) -> bool:
        """SPEC §9.5 steps 12-18 for a container without a runner; False stops the pass."""
        ctr = entry.container
        supervisor = ctr.scheduling_parameters.supervisor
        if supervisor:
            self.supervisors += 1
        held = waiting_for(ctr) if ctr.runtime_status else None
        if held:
            # Not locked until what it waits for has completed (the queue refuses the lock).
            self.statuses[ctr.uuid] = dependency_status(held)
            return True
        if ctr.priority < 1:
            return True  # status PRIORITY_ZERO, derived when read
        if supervisor and 0 < self.max_supervisors < self.supervisors:
            self._over_supervisor_limit(entry)
            return True
        state = ctr.state
        if state is QUEUED:
            return self._queued(entry)
        if state is LOCKED:
            return self._locked(entry)
        return True

    def _over_supervisor_limit(self, entry: QueueEntry) -> None:
        self.over_max_super.append(entry)
        self.statuses[entry.container.uuid] = Status(
            StatusKind.SUPERVISOR_LIMIT, len(self.over_max_super)
        )

    def _best(self, entry: QueueEntry) -> Slot | None:
        names, _ = self.rq.eligible_names(entry)
        return self.placement.best(entry.resources, names, entry.container.uuid)

    def _queued(self, entry: QueueEntry) -> bool:
        uuid = entry.container.uuid
        filling = self.saturated()  # beyond the limit: only onto instances that exist
        self.trying += 1
        best = self._best(entry)
        if best is None and self._reclaimable(entry) is None:
            if filling:
                return True
            if self._over_budget(entry):
                return True  # not locked: it could not use the lock
            if self.pool.at_quota():
                return False
            if self._available_type(entry) is None:
                self._say_why_no_type(entry)
                return True
        if self.pool.kill_container(uuid, "about to lock"):
            self.log.info("%s: not locking: runner from previous attempt has not exited", uuid)
            return True
        self.ops.lock(uuid)
        if best is not None:
            self.placement.allocate(best, entry.resources)
        return True

    def _locked(self, entry: QueueEntry) -> bool:
        ctr = entry.container
        uuid = ctr.uuid
        filling = self.saturated()  # beyond the limit: only onto instances that exist
        self.trying += 1
        best = self._best(entry) or self._reclaim(entry)
        if best is not None:
            self.placement.allocate(best, entry.resources)
            self._start_on(best, entry)
            return True
        if filling:
            return True
        if self._over_budget(entry):
            return True
        if self.pool.at_quota():
            return False
        it = self._available_type(entry)
        if it is None:
            if not self._say_why_no_type(entry):
                self.qpos += 1
                self.statuses[uuid] = Status(
                    StatusKind.WAITING_INSTANCE_TYPE, self.qpos, self.rq.eligible_names(entry)[1]
                )
            return True
        view = self.pool.create(it)
        if view is None:
            return True  # declined (throttled, create limit...): try again next pass
        self.rq.quotas.created(it)
        self.log.info("%s: creating new %s instance", uuid, it.name)
        self.statuses[uuid] = Status(StatusKind.WAITING_NEW_INSTANCE, detail=it.name)
        self.allocated_not_started += 1
        self.placement.add_created(view, it, entry.resources)
        return True

    def _over_budget(self, entry: QueueEntry) -> bool:
        """The budget forbids new instances: the container waits, and says why."""
        why = self.pin.no_new_instances
        if why is None:
            return False
        self.qpos += 1
        self.statuses[entry.container.uuid] = Status(StatusKind.BUDGET, self.qpos, why)
        return True

    def _reclaimable(self, entry: QueueEntry) -> Slot | None:
        names, _ = self.rq.eligible_names(entry)
        return self.placement.reclaimable(entry.resources, names)

    def _reclaim(self, entry: QueueEntry) -> Slot | None:
        """Demand returned: undo a consolidation drain rather than create an instance.

        Only consolidation's own drains are undone (the pool refuses any other cause), so an
        operator's drain stays whatever the queue holds.
        """
        slot = self._reclaimable(entry)
        if slot is None:
            return None
        if not self.pool.undo_drain(slot.view.instance, DrainCause.CONSOLIDATION):
            return None
        self.log.info(
            "%s: instance %s taken back from consolidation for it",
            entry.container.uuid,
            slot.view.instance,
        )
        self.placement.reopen(slot)
        return slot

    def _start_on(self, slot: Slot, entry: QueueEntry) -> None:
        """Start a Locked container on the instance chosen for it, or say why it waits."""
        view = slot.view
        uuid = entry.container.uuid
        waiting = Status(StatusKind.WAITING_NEW_INSTANCE, detail=view.instance_type)
        if not view.instance or view.worker_state not in READY:
            self.statuses[uuid] = waiting
            self.allocated_not_started += 1
        elif self.pool.kill_container(uuid, "about to start"):
            self.log.info("%s: not starting: runner from previous attempt has not exited", uuid)
            self.statuses[uuid] = STATUS_WAITING_PREVIOUS_ATTEMPT
        elif self.pool.start_container(view.instance, entry.container):
            self.statuses[uuid] = STATUS_PREPARING
        else:
            self.statuses[uuid] = waiting
            self.allocated_not_started += 1

    def _available_type(self, entry: QueueEntry) -> InstanceType | None:
        """The cheapest eligible type not at capacity nor paused (SPEC §9.5 step 17).

        Capacity answers are cached for the pass: if a type's capacity flag clears between a
        higher and a lower priority container, the higher one should get it next pass rather
        than the lower one now.  A type paused after failed boots is passed over only for types
        that cost no more: a boot failure is usually the image's or the network's, which a
        dearer type would not fix, so waiting is cheaper than trying.
        """
        ceiling: float | None = None
        for it in entry.instance_types:
            if ceiling is not None and it.price > ceiling:
                return None
            key = (it.provider_type, it.preemptible)
            if self.at_capacity.get(key):
                continue
            if self.pool.at_capacity(it):
                self.at_capacity[key] = True
                continue
            if self._backoff(it) is not None:
                ceiling = it.price if ceiling is None else ceiling
                continue
            if self._quota_full(it) is not None:
                continue
            return it
        return None

    def _quota_full(self, it: InstanceType) -> str | None:
        """Why the cloud's quota has no room for ``it`` (cached for the pass), or None.

        Cached like capacity: a quota that frees up between two containers of a pass should
        go to the first one next pass.  Creates of the pass are counted before the cache is
        filled, so a quota with room for one instance gets one.
        """
        if it.name not in self.quota_full:
            why = self.rq.quotas.blocking(it)
            if why is None:
                return None  # room now: asked again after a create
            self.quota_full[it.name] = why
        return self.quota_full[it.name]

    def _backoff(self, it: InstanceType) -> BootBackoff | None:
        if it.name not in self.backoffs:
            self.backoffs[it.name] = self.pool.boot_backoff(it)
        return self.backoffs[it.name]

    def _say_why_no_type(self, entry: QueueEntry) -> bool:
        """Give a container that no type can serve the boot back-off status, if that is why."""
        for it in entry.instance_types:
            backoff = self._backoff(it)
            if backoff is not None:
                self.qpos += 1
                left = format_duration(max(1.0, backoff.until - self.pin.now))
                self.statuses[entry.container.uuid] = Status(
                    StatusKind.BOOT_BACKOFF, self.qpos, (str(backoff.failures), it.name, left)
                )
                return True
        for it in entry.instance_types:
            why = self.quota_full.get(it.name)
            if why is not None:
                self.rq.quotas.want(it)
                self.qpos += 1
                self.statuses[entry.container.uuid] = Status(StatusKind.QUOTA_FULL, self.qpos, why)
                return True
        return False

    # ---- after the loop

    def _count_later_supervisors(self, order: list[OrderItem], position: int) -> None:
        """Once the limit is reached nothing else can start, but supervisors still count.

        Every remaining Queued/Locked container would just be skipped, so only supervisors are
        visited: they are counted, and those beyond the supervisor limit get its status (and
        are unlocked, as in Arvados).
        """
        if position >= len(order):
            return
        supervisors = self.rq.index.supervisors
        start = bisect.bisect_left(supervisors, order[position][:4])
        running = self.pin.running
        for item in supervisors[start:]:
            entry = item[4]
            ctr = entry.container
            if ctr.uuid in running:
                continue
            self.supervisors += 1
            if ctr.priority >= 1 and 0 < self.max_supervisors < self.supervisors:
                self._over_supervisor_limit(entry)

    def _unlock_over_quota(self, order: list[OrderItem]) -> None:
        """SPEC §9.5 step 21: give back locks that cannot be used soon.

        The first over-quota container stays locked while any instance exists, however many
        containers are over quota: when the quota clears it is next in line, and unlocking it on
        every pass would burn its dispatch attempts.  (Arvados meant this but unlocked it when it
        was the only one over quota, SPEC §19.1 item 2.)  With no instance at all, the quota
        evidently never lets it run, so it is unlocked and eventually cancelled, not starved.
        """
        running = self.pin.running
        unlock = [e for e in self.over_max_super if e.container.state is LOCKED]
        start = self.over_quota_at
        if start >= 0:
            if self.total_instances > 0:
                start += 1
            # Locked containers sort before Queued ones, so the Locked ones over quota are a
            # run starting at the first over-quota position.
            while start < len(order) and order[start][0] == 0:
                unlock.append(order[start][4])
                start += 1
        for entry in unlock:
            uuid = entry.container.uuid
            if uuid in running:
                continue  # already preparing on an instance: let it run
            self.ops.unlock(uuid, "pool capacity is used by higher priority containers")

    def _shut_down_unallocated(self) -> None:
        """SPEC §9.5 step 22: at quota, instances with nothing to do make room for others."""
        for slot in self.placement.empty_slots():
            if slot.view.instance:  # a pending create has no id yet; the pool would refuse
                self.pool.shutdown(slot.view.instance)

"""Where a container would run: the instances of one pass and their spare resources.

SPEC §9.5 steps 1, 2, 5 and 16 describe the rule: instances sorted by price (then VCPUs, RAM,
scratch descending, then instance id), each with the resources its type has left after the
containers already on it; a container goes to the first eligible instance with room, replaced by
a later one with strictly more containers (pack onto busy instances, so that idle ones can shut
down), or by a later ready one while the current choice is still booting.

Arvados scans every instance for every container.  With 10,000 instances and tens of thousands
of containers per pass that is far too slow, so this module keeps the same answer with less
work:

* instances are grouped in *buckets* of equal sort position (same price, VCPUs, RAM, scratch);
  inside a bucket they are in instance-id order, so walking the buckets in order walks the
  instances in Arvados' order;
* a container only looks at buckets holding one of its eligible types;
* instances that can take nothing more (no VCPUs left, container limit reached, not usable) are
  dropped from their bucket's scan list;
* a bucket is skipped, and a scan stops early, when no instance in it could replace the current
  choice (none has more containers, and none is ready while the choice is booting);
* "nothing fits" is remembered per (needs, types) for the rest of the pass, until an instance is
  added (spare resources only shrink during a pass).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterable, Mapping

from herder.model import (
    DrainCause,
    IdleBehavior,
    InstanceResources,
    InstanceType,
    InstanceView,
    WorkerState,
)
from herder.queue.base import QueueEntry

#: States in which an instance can be given a container (SPEC §9.5 step 16).
USABLE = frozenset(
    {WorkerState.UNKNOWN, WorkerState.RUNNING, WorkerState.BOOTING, WorkerState.IDLE}
)
#: States in which an instance can start a container right now.
READY = frozenset({WorkerState.IDLE, WorkerState.RUNNING})

BucketKey = tuple[float, int, int, int]
NeedsKey = tuple[int, int, int, int, int, frozenset[str]]


class Slot:
    """One instance during one pass: its view and what is left on it."""

    __slots__ = ("bucket", "count", "free", "id_key", "open", "ready", "type_name", "view")

    def __init__(
        self, view: InstanceView, type_name: str, free: InstanceResources, id_key: tuple[str, int]
    ) -> None:
        self.view = view
        self.type_name = type_name
        self.free = free
        #: containers on the instance, including ones allocated earlier in this pass
        self.count = len(view.running_container_uuids)
        self.ready = view.worker_state in READY
        self.id_key = id_key
        self.open = False
        self.bucket: Bucket | None = None


class Bucket:
    """Instances that sort equally except for their id, with counters for skipping."""

    __slots__ = (
        "closed",
        "count_hist",
        "key",
        "max_count",
        "ready_open",
        "slots",
        "start",
        "type_names",
    )

    def __init__(self, key: BucketKey) -> None:
        self.key = key
        self.slots: list[Slot] = []  # open slots (and some closed ones, dropped lazily)
        self.start = 0  # slots before this index are closed
        self.type_names: set[str] = set()
        self.count_hist: dict[int, int] = {}  # container count -> open slots with that count
        self.max_count = -1
        self.ready_open = 0
        self.closed = 0

    def may_beat(self, best: Slot) -> bool:
        """Could any open slot here replace ``best`` in the fold of SPEC §9.5 step 16?"""
        return self.max_count > best.count or (not best.ready and self.ready_open > 0)

    def track(self, slot: Slot) -> None:
        self.count_hist[slot.count] = self.count_hist.get(slot.count, 0) + 1
        if slot.count > self.max_count:
            self.max_count = slot.count
        if slot.ready:
            self.ready_open += 1

    def untrack(self, slot: Slot, count: int) -> None:
        left = self.count_hist[count] - 1
        if left:
            self.count_hist[count] = left
        else:
            del self.count_hist[count]
            if count == self.max_count:
                self.max_count = max(self.count_hist, default=-1)
        if slot.ready:
            self.ready_open -= 1

    def first_open(self) -> int:
        """Index of the first slot that may be open.

        Instances fill up in scan order, so closed slots gather at the front: skipping them
        once here keeps every later scan from walking over them again.  Closed slots
        elsewhere are dropped when they make up half the list.
        """
        slots = self.slots
        if self.closed > 16 and self.closed * 2 > len(slots):
            self.slots = slots = [s for s in slots if s.open]
            self.closed = 0
            self.start = 0
        i = self.start
        n = len(slots)
        while i < n and not slots[i].open:
            i += 1
        self.start = i
        return i


class Placement:
    """The instances of one pass, their spare resources, and the best-instance choice."""

    def __init__(
        self,
        views: Iterable[InstanceView],
        instance_types: Mapping[str, InstanceType],
        *,
        entries: Mapping[str, QueueEntry],
        max_per_instance: int = 0,
        logger: logging.Logger | None = None,
    ) -> None:
        """``entries`` is the queue snapshot: it gives the needs of containers on instances."""
        self._types = instance_types
        self._max_per_instance = max_per_instance
        self._log = logger or logging.getLogger(__name__)
        self.slots: list[Slot] = []
        self._buckets: dict[BucketKey, Bucket] = {}
        self._bucket_keys: list[BucketKey] = []  # sorted
        self._route_cache: dict[frozenset[str], list[Bucket]] = {}
        self._nothing_fits: set[NeedsKey] = set()
        self._new_seq = 0
        #: bumped whenever an allocation changes the spare resources
        self.version = 0
        self._fits_anywhere: dict[tuple[int, int, int, int, int], bool] = {}
        #: instances drained by consolidation (usually none): demand may take them back
        self._drained: list[Slot] = []
        for seq, view in enumerate(views):
            slot = Slot(view, view.instance_type, self._spare(view, entries), (view.instance, seq))
            self.slots.append(slot)
            self._file(slot, at_front=False)
            if view.drain_cause is DrainCause.CONSOLIDATION:
                self._drained.append(slot)
        for bucket in self._buckets.values():
            bucket.slots.sort(key=lambda s: s.id_key)

    # ---- building

    def _spare(self, view: InstanceView, entries: Mapping[str, QueueEntry]) -> InstanceResources:
        """The type's resources minus the containers on the instance (SPEC §9.5 steps 2 and 5).

        A container the queue does not know has an unknown size, so the instance is taken to be
        full.  Unlike Arvados (SPEC §19.1 item 3) the needs come from the queue entry itself, so
        nothing is under-counted.
        """
        it = self._types.get(view.instance_type)
        if it is None:
            return InstanceResources()
        free = InstanceResources.of_type(it)
        for uuid in view.running_container_uuids:
            entry = entries.get(uuid)
            if entry is None:
                return InstanceResources()
            free = free.sub(entry.resources)
        return free

    def _bucket_key(self, slot: Slot) -> BucketKey:
        it = self._types[slot.type_name]
        return (slot.view.price, -it.vcpus, -it.ram, -it.scratch)

    def _can_take_more(self, slot: Slot) -> bool:
        view = slot.view
        return (
            slot.free.vcpus > 0
            and view.worker_state in USABLE
            and view.idle_behavior == IdleBehavior.RUN
            and (self._max_per_instance <= 0 or slot.count < self._max_per_instance)
        )

    def _file(self, slot: Slot, *, at_front: bool) -> None:
        """Put an open slot into its bucket (instances of unknown types never take work)."""
        if slot.type_name not in self._types or not self._can_take_more(slot):
            return
        key = self._bucket_key(slot)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = Bucket(key)
            bisect.insort(self._bucket_keys, key)
            self._route_cache.clear()
        if slot.type_name not in bucket.type_names:
            bucket.type_names.add(slot.type_name)
            self._route_cache.clear()
        slot.open = True
        slot.bucket = bucket
        if at_front:
            bucket.slots.insert(0, slot)
            bucket.start = 0
        else:
            bucket.slots.append(slot)
        bucket.track(slot)

    def _route(self, names: frozenset[str]) -> list[Bucket]:
        """Buckets holding one of ``names``, in instance sort order."""
        route = self._route_cache.get(names)
        if route is None:
            route = [
                b
                for b in (self._buckets[k] for k in self._bucket_keys)
                if not b.type_names.isdisjoint(names)
            ]
            self._route_cache[names] = route
        return route

    # ---- instances drained by consolidation, for demand to take back

    def reclaimable(self, needs: InstanceResources, names: frozenset[str]) -> Slot | None:
        """A ready instance that consolidation drained and that has room for ``needs``.

        Work that would otherwise need a new instance goes there instead: the drain was only
        meant for as long as nothing needed the instance.  The fullest one is taken, as
        :meth:`best` would.
        """
        found: Slot | None = None
        for slot in self._drained:
            view = slot.view
            if (
                view.drain_cause is not DrainCause.CONSOLIDATION
                or view.idle_behavior != IdleBehavior.DRAIN
                or view.worker_state not in READY
                or slot.type_name not in names
                or not slot.free.accommodates(needs)
            ):
                continue
            if found is None or slot.count > found.count:
                found = slot
        return found

    def reopen(self, slot: Slot) -> None:
        """The instance takes work again (its drain was undone): file it for the pass."""
        slot.view.idle_behavior = IdleBehavior.RUN
        slot.view.drain_cause = DrainCause.NONE
        slot.view.reason = ""
        self.version += 1
        self._nothing_fits.clear()
        self._fits_anywhere.clear()
        self._file(slot, at_front=False)

    # ---- the per-container questions

    def best(self, needs: InstanceResources, names: frozenset[str], uuid: str = "") -> Slot | None:
        """The instance a container with these needs and eligible types should go to, if any.

        Same answer as Arvados' scan over all instances (SPEC §9.5 step 16).
        """
        cache_key = (needs.vcpus, needs.ram, needs.scratch, needs.gpus, needs.gpu_vram, names)
        if cache_key in self._nothing_fits:
            return None
        best: Slot | None = None
        for bucket in self._route(names):
            if best is not None and not bucket.may_beat(best):
                continue
            start = bucket.first_open()
            slots = bucket.slots
            for i in range(start, len(slots)):
                slot = slots[i]
                if not slot.open or slot.type_name not in names:
                    continue
                if not slot.free.accommodates(needs):
                    self._check_idle_fits(slot, needs, uuid)
                    continue
                if best is None or slot.count > best.count or (not best.ready and slot.ready):
                    best = slot
                    if not bucket.may_beat(best):
                        break
        if best is None:
            self._nothing_fits.add(cache_key)
        return best

    def _check_idle_fits(self, slot: Slot, needs: InstanceResources, uuid: str) -> None:
        """An idle, empty instance of an eligible type always fits; say so loudly if not."""
        if slot.count == 0 and slot.view.worker_state == WorkerState.IDLE:
            self._log.info(
                "BUG? insufficient resources on idle instance %s type %s for container %s: "
                "free %s needs %s",
                slot.view.instance,
                slot.type_name,
                uuid,
                slot.free,
                needs,
            )

    def allocate(self, slot: Slot, needs: InstanceResources) -> None:
        """Book ``needs`` on ``slot`` for the rest of the pass."""
        self.version += 1
        old_count = slot.count
        slot.free = slot.free.sub(needs)
        slot.count = old_count + 1
        bucket = slot.bucket
        if not slot.open or bucket is None:
            return
        bucket.untrack(slot, old_count)
        if self._can_take_more(slot):
            bucket.track(slot)
        else:
            slot.open = False
            bucket.closed += 1

    def add_created(self, view: InstanceView, it: InstanceType, needs: InstanceResources) -> Slot:
        """A pending instance created for a container in this pass, already holding it.

        Arvados inserts it before the first instance that does not sort before it: a pending
        create has no id, so it goes first among its equals, ahead of older pending creates.
        """
        self._new_seq -= 1
        self.version += 1
        slot = Slot(view, it.name, InstanceResources.of_type(it).sub(needs), ("", self._new_seq))
        slot.count += 1
        self.slots.append(slot)
        self._file(slot, at_front=True)
        self._nothing_fits.clear()
        self._fits_anywhere.clear()
        return slot

    def fits_anywhere(self, needs: InstanceResources) -> bool:
        """Whether any instance, of any type, still has room for ``needs``.

        A cheap filter before :meth:`best`, remembered per needs like "nothing fits" in
        :meth:`best`: spare resources only shrink, until an instance is added.
        """
        key = (needs.vcpus, needs.ram, needs.scratch, needs.gpus, needs.gpu_vram)
        fits = self._fits_anywhere.get(key)
        if fits is None:
            fits = self._fits_anywhere[key] = any(
                slot.open and slot.free.accommodates(needs)
                for bucket in self._buckets.values()
                for slot in bucket.slots
            )
        return fits

    def has_room(self) -> bool:
        """Whether any instance could still take a container this pass."""
        return any(bucket.count_hist for bucket in self._buckets.values())

    def empty_slots(self) -> list[Slot]:
        """Instances left without any container, counting this pass's allocations."""
        return [s for s in self.slots if s.count == 0]

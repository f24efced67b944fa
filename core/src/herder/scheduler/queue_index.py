"""The scheduler's sorted, incrementally maintained view of the queue snapshot.

Every scheduling pass needs the queue in scheduler order (SPEC §9.5 step 4) and a few summaries
of it (what sync must look at, the oldest waiting container, counts per state and type).  Passes
run after every change, and a change touches a handful of entries, so sorting 100,000 entries
from scratch each time (about a fifth of a second in Python) would be wasted work.  Instead the
index compares each new snapshot with the previous one and re-files only the entries that
changed.

Entries are compared by identity: the queue replaces an entry object whenever the container
changes and never modifies one it has handed out (queue/base.py), so ``old is new`` means
"unchanged".  A queue that hands out fresh objects every time still works; it just pays for a
full sort.
"""

from __future__ import annotations

import bisect
from collections import Counter
from typing import Any

from herder.model import ContainerState
from herder.queue.base import QueueEntry

#: (0 if Locked else 1, -priority, first_seen_at, uuid, entry): Locked before Queued, priority
#: descending, first seen first; the uuid makes keys unique so an entry can be found by bisection.
#: "Running first" depends on the pool, not the queue, and is applied by the pass itself.
OrderItem = tuple[int, int, float, str, QueueEntry]

#: Above this many changed entries, filtering and merging beats inserting one by one.
_INCREMENTAL_LIMIT = 500


def order_item(entry: QueueEntry) -> OrderItem:
    c = entry.container
    return (
        0 if c.state is ContainerState.LOCKED else 1,
        -c.priority,
        entry.first_seen_at,
        c.uuid,
        entry,
    )


def needs_attention(entry: QueueEntry) -> bool:
    """Entries the sync step must look at even when no runner exists for them (SPEC §9.7).

    A Queued or Locked container with a positive priority and no runner needs nothing from sync,
    and those are nearly all of a long queue.
    """
    c = entry.container
    state = c.state
    return c.priority < 1 or not (state is ContainerState.QUEUED or state is ContainerState.LOCKED)


def is_waiting_for_work(entry: QueueEntry) -> bool:
    """Counted by the longest-wait metric (SPEC §9.9), unless a runner already exists."""
    c = entry.container
    state = c.state
    return c.priority > 0 and (state is ContainerState.QUEUED or state is ContainerState.LOCKED)


def count_label(entry: QueueEntry) -> tuple[str, str]:
    """(state, first eligible type) label of the queue_entries metric (SPEC §7.7).

    A container whose sizing failed has no eligible type (a Running container found after its
    types were removed from the configuration); Arvados crashed indexing the empty list (SPEC
    §19.3 item 26), herder labels it with an empty type name.
    """
    types = entry.instance_types
    return (entry.container.state.value, types[0].name if types else "")


class QueueIndex:
    """Sorted order and summaries of the latest queue snapshot."""

    def __init__(self) -> None:
        self.entries: dict[str, QueueEntry] = {}
        #: every entry, in scheduler order (without the running-first rule)
        self.order: list[OrderItem] = []
        #: supervisor entries only, same order
        self.supervisors: list[OrderItem] = []
        #: uuid -> entry for entries sync must always look at
        self.attention: dict[str, QueueEntry] = {}
        #: (created_at, uuid) of waiting entries, oldest first
        self.waiting: list[tuple[float, str]] = []
        #: (state, first type name) -> number of entries
        self.counts: Counter[tuple[str, str]] = Counter()
        self.full_rebuilds = 0

    def update(self, entries: dict[str, QueueEntry]) -> None:
        """Make the index describe ``entries`` (a snapshot the index may keep)."""
        previous = self.entries
        removed: list[QueueEntry] = []
        added: list[QueueEntry] = []
        get = previous.get
        for uuid, entry in entries.items():
            old = get(uuid)
            if old is not entry:
                if old is not None:
                    removed.append(old)
                added.append(entry)
        new_uuids = len(added) - len(removed)
        if len(previous) + new_uuids != len(entries):
            removed.extend(previous[u] for u in previous.keys() - entries.keys())
        self.entries = entries
        changes = len(removed) + len(added)
        if not changes:
            return
        if changes >= len(entries):
            self._rebuild(entries)
        elif changes > _INCREMENTAL_LIMIT:
            self._merge(removed, added)
        else:
            for entry in removed:
                self._remove(entry)
            for entry in added:
                self._add(entry)

    # ---- helpers

    def _rebuild(self, entries: dict[str, QueueEntry]) -> None:
        self.full_rebuilds += 1
        locked = ContainerState.LOCKED
        # order_item() inlined: this runs over the whole queue.
        order = [
            (
                0 if (c := e.container).state is locked else 1,
                -c.priority,
                e.first_seen_at,
                c.uuid,
                e,
            )
            for e in entries.values()
        ]
        order.sort()
        self.order = order
        self.supervisors = [
            item for item in order if item[4].container.scheduling_parameters.supervisor
        ]
        self.attention = {u: e for u, e in entries.items() if needs_attention(e)}
        waiting = [
            (e.container.created_at, u) for u, e in entries.items() if is_waiting_for_work(e)
        ]
        waiting.sort()
        self.waiting = waiting
        self.counts = Counter(count_label(e) for e in entries.values())

    def _merge(self, removed: list[QueueEntry], added: list[QueueEntry]) -> None:
        """Many changes: filter the sorted lists once and merge the new items in.

        Sorting "old items, then new items" is a merge of two sorted runs for Python's sort,
        so this costs a few passes over the list instead of one insertion per change.
        """
        gone = {e.container.uuid for e in removed}
        new_items = [order_item(e) for e in added]
        new_items.sort()
        order = [item for item in self.order if item[3] not in gone]
        order.extend(new_items)
        order.sort()
        self.order = order
        supervisors = [item for item in self.supervisors if item[3] not in gone]
        supervisors.extend(
            item for item in new_items if item[4].container.scheduling_parameters.supervisor
        )
        supervisors.sort()
        self.supervisors = supervisors
        waiting = [item for item in self.waiting if item[1] not in gone]
        waiting.extend(
            (e.container.created_at, e.container.uuid) for e in added if is_waiting_for_work(e)
        )
        waiting.sort()
        self.waiting = waiting
        attention, counts = self.attention, self.counts
        for entry in removed:
            attention.pop(entry.container.uuid, None)
            label = count_label(entry)
            counts[label] -= 1
            if counts[label] <= 0:
                del counts[label]
        for entry in added:
            if needs_attention(entry):
                attention[entry.container.uuid] = entry
            counts[count_label(entry)] += 1

    def _remove(self, entry: QueueEntry) -> None:
        item = order_item(entry)
        _discard(self.order, item)
        uuid = entry.container.uuid
        if entry.container.scheduling_parameters.supervisor:
            _discard(self.supervisors, item)
        if needs_attention(entry):
            self.attention.pop(uuid, None)
        if is_waiting_for_work(entry):
            _discard(self.waiting, (entry.container.created_at, uuid))
        label = count_label(entry)
        self.counts[label] -= 1
        if self.counts[label] <= 0:
            del self.counts[label]

    def _add(self, entry: QueueEntry) -> None:
        item = order_item(entry)
        bisect.insort(self.order, item)
        uuid = entry.container.uuid
        if entry.container.scheduling_parameters.supervisor:
            bisect.insort(self.supervisors, item)
        if needs_attention(entry):
            self.attention[uuid] = entry
        if is_waiting_for_work(entry):
            bisect.insort(self.waiting, (entry.container.created_at, uuid))
        self.counts[count_label(entry)] += 1


def _discard(items: list[Any], item: tuple[Any, ...]) -> None:
    """Remove ``item`` from the sorted list ``items``, if present.

    Order items end with the entry object, which does not compare; the probe stops at the uuid,
    which is unique, so bisection never reaches it.
    """
    probe = item[:4] if len(item) == 5 else item
    i = bisect.bisect_left(items, probe)
    if i < len(items) and items[i][: len(probe)] == probe:
        del items[i]

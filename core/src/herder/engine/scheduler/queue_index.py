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


#: The state names, looked up rather than read through the enum's ``value`` descriptor, which
#: costs more than everything else :func:`filing` does.
_STATE_NAMES = {state: state.value for state in ContainerState}
_QUEUED, _LOCKED = ContainerState.QUEUED, ContainerState.LOCKED


#: Everything the index files one entry under, as :func:`filing` computes it:
#: (item, supervisor, attention, waiting, label).  A plain tuple: a named one costs a Python
#: call to build, and this is built for every entry of the queue on a rebuild.
Filing = tuple[OrderItem, bool, bool, "tuple[float, str] | None", tuple[str, str]]


def filing(entry: QueueEntry) -> Filing:
    """File one entry: the index's rules, in one place.

    * item: the entry's place in scheduler order;
    * supervisor: listed again among the supervisors;
    * attention: sync must look at it even when no runner exists for it (SPEC §9.7), which is
      anything but a Queued or Locked container with a positive priority (nearly all of a long
      queue is that);
    * waiting: (created_at, uuid) when the longest-wait metric counts it (SPEC §9.9), else None;
    * label: (state, first eligible type) of the queue_entries metric (SPEC §7.7).  A container
      whose sizing failed has no eligible type (a Running container found after its types were
      removed from the configuration); Arvados crashed indexing the empty list (SPEC §19.3 item
      26), herder labels it with an empty type name.
    """
    c = entry.container
    state, priority, uuid = c.state, c.priority, c.uuid
    active = state is _QUEUED or state is _LOCKED
    types = entry.instance_types
    return (
        (0 if state is _LOCKED else 1, -priority, entry.first_seen_at, uuid, entry),
        c.spec.scheduling_parameters.supervisor,
        priority < 1 or not active,
        (c.created_at, uuid) if priority > 0 and active else None,
        (_STATE_NAMES[state], types[0].name if types else ""),
    )


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
        order: list[OrderItem] = []
        supervisors: list[OrderItem] = []
        attention: dict[str, QueueEntry] = {}
        waiting: list[tuple[float, str]] = []
        counts: dict[tuple[str, str], int] = {}
        for uuid, entry in entries.items():
            item, supervisor, needs_attention, waits, label = filing(entry)
            order.append(item)
            if supervisor:
                supervisors.append(item)
            if needs_attention:
                attention[uuid] = entry
            if waits is not None:
                waiting.append(waits)
            counts[label] = counts.get(label, 0) + 1
        order.sort()
        supervisors.sort()
        waiting.sort()
        self.order, self.supervisors, self.waiting = order, supervisors, waiting
        self.attention, self.counts = attention, Counter(counts)

    def _merge(self, removed: list[QueueEntry], added: list[QueueEntry]) -> None:
        """Many changes: filter the sorted lists once and merge the new items in.

        Sorting "old items, then new items" is a merge of two sorted runs for Python's sort,
        so this costs a few passes over the list instead of one insertion per change.
        """
        gone = {e.container.uuid for e in removed}
        new = [filing(e) for e in added]
        new_items = sorted(f[0] for f in new)
        order = [item for item in self.order if item[3] not in gone]
        order.extend(new_items)
        order.sort()
        self.order = order
        supervisors = [item for item in self.supervisors if item[3] not in gone]
        supervisors.extend(f[0] for f in new if f[1])
        supervisors.sort()
        self.supervisors = supervisors
        waiting = [item for item in self.waiting if item[1] not in gone]
        waiting.extend(f[3] for f in new if f[3] is not None)
        waiting.sort()
        self.waiting = waiting
        attention, counts = self.attention, self.counts
        for entry in removed:
            attention.pop(entry.container.uuid, None)
            _count_down(counts, filing(entry)[4])
        for item, _, needs_attention, _, label in new:
            if needs_attention:
                attention[item[3]] = item[4]
            counts[label] += 1

    def _remove(self, entry: QueueEntry) -> None:
        item, supervisor, needs_attention, waits, label = filing(entry)
        _discard(self.order, item)
        if supervisor:
            _discard(self.supervisors, item)
        if needs_attention:
            self.attention.pop(item[3], None)
        if waits is not None:
            _discard(self.waiting, waits)
        _count_down(self.counts, label)

    def _add(self, entry: QueueEntry) -> None:
        item, supervisor, needs_attention, waits, label = filing(entry)
        bisect.insort(self.order, item)
        if supervisor:
            bisect.insort(self.supervisors, item)
        if needs_attention:
            self.attention[item[3]] = entry
        if waits is not None:
            bisect.insort(self.waiting, waits)
        self.counts[label] += 1


def _count_down(counts: Counter[tuple[str, str]], label: tuple[str, str]) -> None:
    counts[label] -= 1
    if counts[label] <= 0:
        del counts[label]


def _discard(items: list[Any], item: tuple[Any, ...]) -> None:
    """Remove ``item`` from the sorted list ``items``, if present.

    Order items end with the entry object, which does not compare; the probe stops at the uuid,
    which is unique, so bisection never reaches it.
    """
    probe = item[:4] if len(item) == 5 else item
    i = bisect.bisect_left(items, probe)
    if i < len(items) and items[i][: len(probe)] == probe:
        del items[i]

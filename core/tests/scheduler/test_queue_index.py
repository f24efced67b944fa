"""The incrementally maintained queue order equals a full sort after any sequence of changes."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import pytest

from herder.engine.scheduler import queue_index
from herder.engine.scheduler.queue_index import QueueIndex
from herder.model import (
    Container,
    ContainerSpec,
    ContainerState,
    InstanceResources,
    InstanceType,
    SchedulingParameters,
)
from herder.queue.base import QueueEntry

T = InstanceType("t", "t", 1, 1 << 30)


def entry(rnd: random.Random, n: int) -> QueueEntry:
    spec = ContainerSpec(
        command=("true",),
        scheduling_parameters=SchedulingParameters(supervisor=rnd.random() < 0.2),
    )
    c = Container(
        f"zzzzz-dz642-{n:015d}",
        rnd.choice(list(ContainerState)),
        rnd.choice([0, 1, 1, 2, 5]),
        spec,
        float(rnd.randrange(100)),
    )
    return QueueEntry(
        c, InstanceResources(1), [T] if rnd.random() < 0.9 else [], float(rnd.randrange(50))
    )


def expected(entries: dict[str, QueueEntry]) -> list[str]:
    return [
        e.container.uuid
        for e in sorted(
            entries.values(),
            key=lambda e: (
                e.container.state is not ContainerState.LOCKED,
                -e.container.priority,
                e.first_seen_at,
                e.container.uuid,
            ),
        )
    ]


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("limit", [3, 500])  # exercise insertion and merging
def test_index_matches_full_recomputation(seed, limit, monkeypatch):
    monkeypatch.setattr(queue_index, "_INCREMENTAL_LIMIT", limit)
    rnd = random.Random(seed)
    index = QueueIndex()
    entries: dict[str, QueueEntry] = {}
    n = 0
    for _ in range(30):
        entries = dict(entries)
        for _ in range(rnd.choice([0, 1, 5, 40])):
            action = rnd.random()
            if action < 0.4 or not entries:
                n += 1
                e = entry(rnd, n)
                entries[e.container.uuid] = e
            elif action < 0.7:
                del entries[rnd.choice(sorted(entries))]
            else:
                uuid = rnd.choice(sorted(entries))
                old = entries[uuid]
                c = replace(
                    old.container,
                    state=rnd.choice(list(ContainerState)),
                    priority=rnd.choice([0, 1, 3]),
                )
                entries[uuid] = QueueEntry(c, old.resources, old.instance_types, old.first_seen_at)
        index.update(entries)
        assert [item[3] for item in index.order] == expected(entries)
        assert [item[3] for item in index.supervisors] == [
            u for u in expected(entries) if entries[u].container.scheduling_parameters.supervisor
        ]
        active = (ContainerState.QUEUED, ContainerState.LOCKED)
        assert index.attention == {
            u: e
            for u, e in entries.items()
            if e.container.priority < 1 or e.container.state not in active
        }
        assert index.waiting == sorted(
            (e.container.created_at, u)
            for u, e in entries.items()
            if e.container.priority > 0 and e.container.state in active
        )
        assert index.counts == Counter(
            (e.container.state.value, e.instance_types[0].name if e.instance_types else "")
            for e in entries.values()
        )


def test_unchanged_snapshot_costs_no_rebuild():
    rnd = random.Random(1)
    entries = {e.container.uuid: e for e in (entry(rnd, i) for i in range(2000))}
    index = QueueIndex()
    index.update(entries)
    assert index.full_rebuilds == 1
    order = index.order
    index.update(dict(entries))
    assert index.order is order
    assert index.full_rebuilds == 1

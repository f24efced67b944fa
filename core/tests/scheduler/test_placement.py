"""The indexed best-instance search gives exactly Arvados' answer (SPEC §9.5 steps 1, 5, 16).

The reference below is a direct transcription of Arvados' scan: sort every instance, walk all of
them for every container, fold.  Random pools, containers, allocations and new instances are fed
to both; every answer must match.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from herder.engine.scheduler.placement import Placement
from herder.model import (
    Container,
    ContainerSpec,
    ContainerState,
    IdleBehavior,
    InstanceResources,
    InstanceType,
    InstanceView,
    RuntimeConstraints,
    WorkerState,
)
from herder.queue.base import QueueEntry

GiB = 1 << 30

TYPES = {
    t.name: t
    for t in (
        InstanceType("one", "one", 1, 4 * GiB, price=1.0),
        InstanceType("two", "two", 2, 8 * GiB, price=2.0),
        InstanceType("twin", "twin", 2, 8 * GiB, price=2.0),  # sorts like "two"
        InstanceType("four", "four", 4, 8 * GiB, price=2.0),  # same price, more VCPUs
        InstanceType("eight", "eight", 8, 32 * GiB, price=5.0),
    )
}


@dataclass
class Ref:
    view: InstanceView
    free: InstanceResources
    count: int


def ref_key(view: InstanceView) -> tuple[float, int, int, int, str]:
    it = TYPES.get(view.instance_type)
    vcpus, ram, scratch = (it.vcpus, it.ram, it.scratch) if it else (0, 0, 0)
    return (view.price, -vcpus, -ram, -scratch, view.instance)


def ref_best(
    refs: list[Ref], needs: InstanceResources, names: frozenset[str], max_per: int
) -> Ref | None:
    best: Ref | None = None
    usable = {WorkerState.UNKNOWN, WorkerState.RUNNING, WorkerState.BOOTING, WorkerState.IDLE}
    ready = {WorkerState.IDLE, WorkerState.RUNNING}
    for r in refs:
        v = r.view
        if v.worker_state not in usable or v.idle_behavior != IdleBehavior.RUN:
            continue
        if max_per > 0 and r.count >= max_per:
            continue
        if v.instance_type not in names or not r.free.accommodates(needs):
            continue
        if (
            best is None
            or r.count > best.count
            or (best.view.worker_state not in ready and v.worker_state in ready)
        ):
            best = r
    return best


def container(uuid: str, vcpus: int) -> QueueEntry:
    spec = ContainerSpec(command=("true",), runtime_constraints=RuntimeConstraints(vcpus=vcpus))
    c = Container(uuid, ContainerState.RUNNING, 1, spec, 0.0)
    return QueueEntry(c, InstanceResources(vcpus, GiB, 0), [], 0.0)


def view(
    iid: str, type_name: str, state: WorkerState, behavior: IdleBehavior, uuids: list[str], tag: str
) -> InstanceView:
    it = TYPES.get(type_name)
    return InstanceView(
        iid, "", it.price if it else 0.0, type_name, type_name, tag, 0.0, uuids, state, behavior
    )


@pytest.mark.parametrize("seed", range(40))
def test_indexed_search_matches_full_scan(seed):
    rnd = random.Random(seed)
    max_per = rnd.choice([0, 0, 2, 3])
    entries: dict[str, QueueEntry] = {}
    views = []
    for i in range(rnd.randint(0, 40)):
        type_name = rnd.choice([*TYPES, "gone"])
        uuids = []
        for j in range(rnd.choice([0, 0, 1, 2, 3])):
            uuid = f"c-{i}-{j}"
            if rnd.random() < 0.95:
                entries[uuid] = container(uuid, rnd.choice([0, 1, 1, 2]))
            uuids.append(uuid)
        views.append(
            view(
                f"i-{rnd.randrange(10**6):06d}-{i}",
                type_name,
                rnd.choice(list(WorkerState)),
                rnd.choices(list(IdleBehavior), weights=[8, 1, 1])[0],
                uuids,
                f"tag-{i}",
            )
        )
    placement = Placement([*views], TYPES, entries=entries, max_per_instance=max_per)
    refs = [Ref(v, ref_free(v, entries), len(v.running_container_uuids)) for v in views]
    refs.sort(key=lambda r: ref_key(r.view))
    created = 0
    for step in range(150):
        needs = InstanceResources(rnd.choice([0, 0, 1, 1, 2, 3, 4]), rnd.choice([1, 6]) * GiB)
        names = frozenset(rnd.sample(sorted(TYPES), rnd.randint(1, 3)))
        got = placement.best(needs, names, f"x-{step}")
        want = ref_best(refs, needs, names, max_per)
        assert (got.view.last_container_uuid if got else None) == (
            want.view.last_container_uuid if want else None
        ), f"step {step}"
        if got is not None and want is not None and rnd.random() < 0.8:
            placement.allocate(got, needs)
            want.free = want.free.sub(needs)
            want.count += 1
        elif rnd.random() < 0.3:
            created += 1
            it = TYPES[rnd.choice(sorted(names))]
            new = view("", it.name, WorkerState.BOOTING, IdleBehavior.RUN, [], f"new-{created}")
            placement.add_created(new, it, needs)
            r = Ref(new, InstanceResources.of_type(it).sub(needs), 1)
            idx = 0
            while idx < len(refs) and ref_key(refs[idx].view) < ref_key(new):
                idx += 1
            refs.insert(idx, r)


def ref_free(v: InstanceView, entries: dict[str, QueueEntry]) -> InstanceResources:
    it = TYPES.get(v.instance_type)
    if it is None:
        return InstanceResources()
    free = InstanceResources.of_type(it)
    for uuid in v.running_container_uuids:
        if uuid not in entries:
            return InstanceResources()
        free = free.sub(entries[uuid].resources)
    return free


def test_spare_resources_after_running_containers():
    entries = {"a": container("a", 1), "b": container("b", 0)}
    v = view("i-1", "four", WorkerState.RUNNING, IdleBehavior.RUN, ["a", "b"], "t")
    p = Placement([v], TYPES, entries=entries)
    free = p.slots[0].free
    assert (free.vcpus, free.ram, free.shared_vcpu_used) == (3, 6 * GiB, True)
    unknown = view("i-2", "four", WorkerState.RUNNING, IdleBehavior.RUN, ["a", "zz"], "u")
    p = Placement([unknown], TYPES, entries=entries)
    assert p.slots[0].free == InstanceResources()

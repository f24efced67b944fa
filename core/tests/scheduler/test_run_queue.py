"""The main scheduling pass (SPEC §9.5), against the stub queue and pool in conftest.py."""

from __future__ import annotations

from herder.model import ContainerState, InstanceType, WorkerState

GiB = 1 << 30
Q = ContainerState.QUEUED
L = ContainerState.LOCKED
R = ContainerState.RUNNING

PREPARING = "Container is allocated to an instance and preparing to run."


def waiting_new(t: str) -> str:
    return f"Waiting for a {t} instance to boot and be ready to accept work."


def capacity(n: int) -> str:
    return (
        f"Waiting in queue at position {n}.  "
        "Cluster is at capacity and cannot start any new instances right now."
    )


def cloud_limits(n: int) -> str:
    return (
        f"Waiting in queue at position {n}.  "
        "Cluster is at cloud account limits and cannot start any new instances right now."
    )


def big_types() -> dict[str, InstanceType]:
    """One 4-VCPU type with plenty of RAM, so any small container is eligible for it."""
    return {"big": InstanceType("big", "big", 4, 64 * GiB, price=1.0)}


# --------------------------------------------------------------------------- ordering


def test_order_running_first_then_locked_then_priority_then_first_seen(make):
    h = make()
    h.pool.can_create = 0
    a = h.queue.add(Q, priority=5, first_seen=10.0)
    b = h.queue.add(Q, priority=5, first_seen=5.0)
    c = h.queue.add(L, priority=1)
    d = h.queue.add(Q, priority=9)
    e = h.queue.add(R, priority=1)
    h.pool.add_worker("i-1", "t1", WorkerState.RUNNING, [e])
    h.run_pass()
    assert h.order() == [e, c, d, b, a]


# --------------------------------------------------------------------------- lock, create, start


def test_queued_is_locked_never_creates_and_locked_creates_then_starts(make):
    h = make()
    x = h.queue.add(Q)
    h.run_pass()
    assert h.queue.ops("lock") == [x]
    assert h.pool.creates == []
    assert h.queue.state(x) is L
    assert h.status(x) == capacity(1)

    h.run_pass()
    assert h.pool.creates == ["t1"]
    assert h.status(x) == waiting_new("t1")
    assert h.metric("herder_containers_allocated_not_started") == 1

    h.run_pass()  # the instance is still booting: wait for it, create nothing more
    assert h.pool.creates == ["t1"]
    assert h.pool.starts == []
    assert h.status(x) == waiting_new("t1")
    assert h.metric("herder_containers_allocated_not_started") == 1

    h.pool.boot_all()
    h.run_pass()
    assert h.pool.starts == [x]
    assert h.status(x) == PREPARING
    assert h.metric("herder_containers_allocated_not_started") == 0


def test_queued_not_locked_when_nothing_fits_and_all_types_at_capacity(make):
    h = make()
    h.pool.capacity = {"t1": 0}
    x = h.queue.add(Q)
    h.run_pass()
    assert h.queue.ops("lock") == []
    assert h.status(x) == capacity(1)


def test_queued_locked_when_an_instance_has_room_even_if_type_at_capacity(make):
    h = make()
    h.pool.capacity = {"t1": 1}
    h.pool.add_worker("i-1", "t1")
    x = h.queue.add(Q)
    h.run_pass()
    assert h.queue.ops("lock") == [x]


def test_packing_with_shared_vcpu_for_zero_vcpu_containers(make):
    h = make(types=big_types())
    h.pool.add_worker("i-1", "big")
    a = h.queue.add(L, vcpus=2, priority=9)
    b = h.queue.add(L, vcpus=0, priority=8)
    c = h.queue.add(L, vcpus=1, priority=7)
    d = h.queue.add(L, vcpus=0, priority=6)
    e = h.queue.add(L, vcpus=1, priority=5)
    h.run_pass()
    # 2 + 1 VCPUs leave one VCPU, shared by the two 0-VCPU containers; e no longer fits.
    assert h.pool.starts == [a, b, c, d]
    assert h.pool.creates == ["big"]
    assert h.status(e) == waiting_new("big")


def test_container_using_all_vcpus_never_shares_with_zero_vcpu_ones(make):
    h = make(types=big_types())
    h.pool.add_worker("i-1", "big")
    z = h.queue.add(L, vcpus=0, priority=9)
    f = h.queue.add(L, vcpus=4, priority=8)
    h.run_pass()
    assert h.pool.starts == [z]
    assert h.pool.creates == ["big"]
    assert h.status(f) == waiting_new("big")


def test_max_running_containers_per_instance(make):
    h = make(types=big_types(), max_running_containers_per_instance=2)
    h.pool.add_worker("i-1", "big")
    a = h.queue.add(L, priority=3)
    b = h.queue.add(L, priority=2)
    c = h.queue.add(L, priority=1)
    h.run_pass()
    assert h.pool.starts == [a, b]
    assert h.pool.creates == ["big"]
    assert h.status(c) == waiting_new("big")


def test_containers_on_instances_use_their_resources(make):
    h = make(types=big_types())
    running = h.queue.add(R, vcpus=3)
    h.pool.add_worker("i-1", "big", WorkerState.RUNNING, [running])
    fits = h.queue.add(L, vcpus=1, priority=2)
    too_big = h.queue.add(L, vcpus=1, priority=1)
    h.run_pass()
    assert h.pool.starts == [fits]
    assert h.status(too_big) == waiting_new("big")


def test_unknown_container_on_instance_means_instance_is_full(make):
    h = make(types=big_types())
    h.pool.add_worker("i-1", "big", WorkerState.RUNNING, ["zzzzz-dz642-notinthequeue00"])
    x = h.queue.add(L)
    h.run_pass()
    assert h.pool.starts == []
    assert h.pool.creates == ["big"]
    assert h.status(x) == waiting_new("big")


# --------------------------------------------------------------------------- best instance


def test_prefers_the_busier_instance(make):
    h = make(types=big_types())
    other = h.queue.add(R)
    h.pool.add_worker("i-1", "big")
    h.pool.add_worker("i-2", "big", WorkerState.RUNNING, [other])
    y = h.queue.add(L)
    h.run_pass()
    assert y in h.pool.workers["i-2"].running_container_uuids


def test_prefers_cheaper_instance_when_equally_busy(make):
    types = {
        "cheap": InstanceType("cheap", "cheap", 4, 64 * GiB, price=1.0),
        "dear": InstanceType("dear", "dear", 4, 64 * GiB, price=1.2),
    }
    h = make(types=types)
    h.pool.add_worker("i-1", "dear")
    h.pool.add_worker("i-2", "cheap")
    y = h.queue.add(L)
    h.run_pass()
    assert y in h.pool.workers["i-2"].running_container_uuids


def test_prefers_ready_over_booting(make):
    h = make(types=big_types())
    h.pool.add_worker("i-1", "big", WorkerState.BOOTING)
    h.pool.add_worker("i-2", "big", WorkerState.IDLE)
    y = h.queue.add(L)
    h.run_pass()
    assert h.pool.starts == [y]
    assert y in h.pool.workers["i-2"].running_container_uuids


def test_busier_booting_instance_beats_idle_one_and_container_waits(make):
    h = make(types=big_types())
    other = h.queue.add(R)
    h.pool.add_worker("i-1", "big", WorkerState.IDLE)
    h.pool.add_worker("i-2", "big", WorkerState.UNKNOWN, [other])
    y = h.queue.add(L)
    h.run_pass()
    assert h.pool.starts == []
    assert h.pool.creates == []
    assert h.status(y) == waiting_new("big")
    assert h.metric("herder_containers_allocated_not_started") == 1


def test_exact_fold_ready_replaces_busier_booting_choice(make):
    # Arvados' fold: i-1 first; i-2 has more containers; i-3 is ready while i-2 is not.
    h = make(types=big_types())
    other = h.queue.add(R)
    h.pool.add_worker("i-1", "big", WorkerState.BOOTING)
    h.pool.add_worker("i-2", "big", WorkerState.UNKNOWN, [other])
    h.pool.add_worker("i-3", "big", WorkerState.IDLE)
    y = h.queue.add(L)
    h.run_pass()
    assert h.pool.starts == [y]
    assert y in h.pool.workers["i-3"].running_container_uuids


def test_instances_on_hold_or_shutting_down_get_nothing(make):
    from herder.model import IdleBehavior

    h = make(types=big_types())
    h.pool.add_worker("i-1", "big", behavior=IdleBehavior.HOLD)
    h.pool.add_worker("i-2", "big", WorkerState.SHUTDOWN)
    y = h.queue.add(L)
    h.run_pass()
    assert h.pool.starts == []
    assert h.pool.creates == ["big"]
    assert h.status(y) == waiting_new("big")


def test_several_containers_packed_onto_one_new_instance(make):
    h = make(types=big_types())
    a = h.queue.add(L, priority=3)
    b = h.queue.add(L, priority=2)
    h.run_pass()
    # b goes onto the instance just created for a instead of creating another.
    assert h.pool.creates == ["big"]
    assert h.status(a) == waiting_new("big")
    assert h.status(b) == waiting_new("big")
    assert h.metric("herder_containers_allocated_not_started") == 2


# --------------------------------------------------------------------------- capacity


def test_at_capacity_types_status_lists_eligible_types_and_continues(make):
    types = {
        "a": InstanceType("a", "pa", 2, 8 * GiB, price=1.0),
        "b": InstanceType("b", "pb", 2, 8 * GiB, price=1.2),
        "c": InstanceType("c", "pc", 1, 4 * GiB, price=0.5),
    }
    h = make(types=types)
    h.pool.capacity = {"pa": 0, "pb": 0}
    first = h.queue.add(L, vcpus=2, priority=9)
    second = h.queue.add(L, vcpus=2, priority=8)
    small = h.queue.add(L, vcpus=1, priority=7)
    later = h.queue.add(Q, vcpus=2, priority=6)
    h.run_pass()
    assert h.status(first) == (
        "Waiting in queue at position 1.  Cluster is at capacity for all eligible instance "
        "types (a, b) and cannot start a new instance right now."
    )
    assert h.status(second).startswith("Waiting in queue at position 2.  ")
    # Lower-priority containers that fit other types still get instances.
    assert h.pool.creates == ["c"]
    assert h.status(small) == waiting_new("c")
    # Generic statuses continue the numbering.
    assert h.status(later) == capacity(3)


def test_falls_back_to_next_eligible_type_when_cheapest_at_capacity(make):
    types = {
        "a": InstanceType("a", "pa", 2, 8 * GiB, price=1.0),
        "b": InstanceType("b", "pb", 2, 8 * GiB, price=1.2),
    }
    h = make(types=types)
    h.pool.capacity = {"pa": 0}
    x = h.queue.add(L, vcpus=2)
    h.run_pass()
    assert h.pool.creates == ["b"]
    assert h.status(x) == waiting_new("b")


def test_capacity_answer_is_cached_for_the_pass(make):
    h = make()
    answers = iter([True, False, False, False])
    calls = []

    def at_capacity(it):
        calls.append(it.name)
        return next(answers)

    h.pool.at_capacity = at_capacity
    first = h.queue.add(L, priority=2)
    second = h.queue.add(L, priority=1)
    h.run_pass()
    # The flag cleared after the first container looked: the second must not jump ahead.
    assert calls == ["t1"]
    assert h.pool.creates == []
    assert h.status(first).startswith("Waiting in queue at position 1.  Cluster is at capacity for")
    assert h.status(second).startswith(
        "Waiting in queue at position 2.  Cluster is at capacity for"
    )
    h.run_pass()
    assert h.pool.creates == ["t1", "t1"]


def test_declined_create_leaves_container_waiting(make):
    h = make()
    h.pool.can_create = 0
    x = h.queue.add(L)
    h.run_pass()
    assert h.pool.creates == ["t1"]
    assert h.status(x) == capacity(1)
    assert h.queue.ops("unlock") == []


# --------------------------------------------------------------------------- quota


def _at_quota_setup(make):
    """At quota with two instances: one busy, one idle t1 that the 2-VCPU containers below
    cannot use.  (With every instance busy the concurrency limit, which drops to the number of
    instances at quota, would stop the pass before any quota handling.)"""
    h = make()
    x = h.queue.add(R, priority=10)
    h.pool.add_worker("i-1", "t1", WorkerState.RUNNING, [x])
    h.pool.add_worker("i-2", "t1")
    h.pool.quota = 2
    return h


def test_at_quota_overquota_unlocks_all_but_next_in_line(make):
    h = _at_quota_setup(make)
    a = h.queue.add(L, vcpus=2, priority=5)
    b = h.queue.add(L, vcpus=2, priority=4)
    c = h.queue.add(L, vcpus=2, priority=3)
    d = h.queue.add(Q, vcpus=2, priority=9)
    h.run_pass()
    assert h.queue.ops("unlock") == [b, c]
    assert h.queue.state(a) is L
    assert h.queue.state(d) is Q
    assert [h.status(u) for u in (a, b, c, d)] == [cloud_limits(n) for n in (1, 2, 3, 4)]
    assert h.metric("herder_containers_not_allocated_over_quota") == 4
    assert h.pool.creates == []
    assert h.pool.shutdowns == ["i-2"]  # idle and unused; i-1 is busy


def test_at_quota_single_overquota_entry_stays_locked(make):
    # Arvados unlocked it on every pass (SPEC §19.1 item 2), burning its dispatch attempts.
    h = _at_quota_setup(make)
    a = h.queue.add(L, vcpus=2)
    for _ in range(3):
        h.run_pass()
    assert h.queue.ops("unlock") == []
    assert h.queue.state(a) is L
    assert h.status(a) == cloud_limits(1)


def test_at_quota_with_no_instances_unlocks_everything(make):
    h = make()
    h.pool.quota = 0
    a = h.queue.add(L, priority=2)
    b = h.queue.add(L, priority=1)
    h.run_pass()
    assert h.queue.ops("unlock") == [a, b]


def test_at_quota_queued_not_locked_when_nothing_fits(make):
    h = _at_quota_setup(make)
    x = h.queue.add(Q, vcpus=2)
    h.run_pass()
    assert h.queue.ops("lock") == []
    assert h.status(x) == cloud_limits(1)


def test_at_quota_queued_locked_when_an_instance_has_room(make):
    h = _at_quota_setup(make)
    x = h.queue.add(Q)
    h.run_pass()
    assert h.queue.ops("lock") == [x]
    assert h.pool.shutdowns == []


def test_at_quota_shuts_down_instances_without_containers(make):
    h = make()
    x = h.queue.add(R, priority=10)
    h.pool.add_worker("i-1", "t1")
    h.pool.add_worker("i-2", "t1", WorkerState.RUNNING, [x])
    h.pool.add_worker("i-3", "t1", WorkerState.BOOTING)
    h.pool.quota = 3
    l1 = h.queue.add(L, priority=9)
    h.queue.add(L, vcpus=2, priority=5)
    h.run_pass()
    assert h.pool.starts == [l1]  # idle i-1 preferred to booting i-3
    assert h.pool.shutdowns == ["i-3"]


def test_not_at_quota_nothing_is_shut_down(make):
    h = make()
    h.pool.add_worker("i-1", "t1")
    h.queue.add(L, vcpus=2)
    h.run_pass()
    assert h.pool.shutdowns == []


# --------------------------------------------------------------------------- supervisors


def test_supervisor_limit(make):
    h = make(max_instances=4)  # max containers 4, supervisor fraction 0.5 -> 2 supervisors
    s0 = h.queue.add(R, supervisor=True, priority=10)
    h.pool.add_worker("i-1", "t1", WorkerState.RUNNING, [s0])
    s1 = h.queue.add(L, supervisor=True, priority=9)
    s2 = h.queue.add(L, supervisor=True, priority=8)
    s3 = h.queue.add(Q, supervisor=True, priority=7)
    plain = h.queue.add(L, priority=1)
    h.run_pass()
    assert h.status(s2) == (
        "Waiting in workflow queue at position 1.  "
        "Cluster is at capacity and cannot start any new workflows right now."
    )
    assert h.status(s3).startswith("Waiting in workflow queue at position 2.  ")
    assert h.pool.creates == ["t1", "t1"]  # s1 and the plain container
    assert h.status(s1) == waiting_new("t1")
    assert h.status(plain) == waiting_new("t1")
    assert h.queue.ops("unlock") == [s2]  # Locked ones over the limit are given back
    assert h.queue.ops("lock") == []
    assert h.metric("herder_containers_not_allocated_over_quota") == 2


def test_supervisor_limit_is_at_least_one(make):
    h = make(max_instances=1)
    s1 = h.queue.add(L, supervisor=True, priority=2)
    s2 = h.queue.add(L, supervisor=True, priority=1)
    h.run_pass()
    assert h.status(s1) == waiting_new("t1")
    assert h.status(s2).startswith("Waiting in workflow queue at position 1.")


def test_no_supervisor_limit_without_concurrency_limit(make):
    h = make(max_instances=0)
    sups = [h.queue.add(L, supervisor=True) for _ in range(5)]
    h.run_pass()
    assert [h.status(u) for u in sups] == [waiting_new("t1")] * 5


def test_supervisors_counted_past_the_concurrency_limit(make):
    h = make(initial_quota_estimate=2, max_instances=10)  # 1 supervisor
    h.queue.add(L, priority=9)
    h.queue.add(L, priority=8)
    s1 = h.queue.add(L, supervisor=True, priority=7)
    s2 = h.queue.add(L, supervisor=True, priority=6)
    h.run_pass()
    # s1 is only skipped by the concurrency limit, but still counts as a supervisor.
    assert h.status(s1) == capacity(1)
    assert h.status(s2).startswith("Waiting in workflow queue at position 1.")
    assert h.queue.ops("unlock") == [s2]


# --------------------------------------------------------------------------- priority 0


def test_priority_zero_containers_are_not_scheduled(make):
    h = make()
    h.pool.add_worker("i-1", "t1")
    q0 = h.queue.add(Q, priority=0)
    l0 = h.queue.add(L, priority=0)
    h.run_pass()
    assert h.queue.ops("lock") == []
    assert h.pool.starts == []
    assert h.status(q0) == (
        "This container will not be scheduled to run because its priority is 0 and state is Queued."
    )
    assert h.status(l0).endswith("state is Locked.")


# --------------------------------------------------------------------------- concurrency limit


def test_initial_limit_from_quota_estimate(make):
    h = make(initial_quota_estimate=2)
    uuids = [h.queue.add(Q) for _ in range(5)]
    h.run_pass()
    assert h.queue.ops("lock") == uuids[:2]
    assert h.sched.max_containers == 2
    assert h.metric("herder_max_concurrent_containers") == 2


def test_initial_limit_is_max_instances(make):
    h = make(max_instances=3)
    uuids = [h.queue.add(Q) for _ in range(5)]
    h.run_pass()
    assert h.queue.ops("lock") == uuids[:3]


def test_limit_rises_ten_percent_above_running(make):
    h = make(types=big_types(), initial_quota_estimate=2)
    for i in range(10):
        x = h.queue.add(R)
        h.pool.add_worker(f"i-{i:02d}", "big", WorkerState.RUNNING, [x])
    h.run_pass()
    assert h.sched.max_containers == 12


def test_limit_at_quota_then_raised_slowly(make):
    h = make(types=big_types(), max_instances=100)
    for i in range(3):
        x = h.queue.add(R)
        h.pool.add_worker(f"i-{i}", "big", WorkerState.RUNNING, [x])
    h.pool.quota = 3
    h.run_pass()
    assert h.sched.max_containers == 3
    h.pool.quota = 1000
    for _ in range(2):  # more running, same instances
        x = h.queue.add(R)
        h.pool.run[x] = 0.0
    h.run_pass()
    assert h.sched.max_containers == 4  # never more than one above the known quota level
    h.pool.add_worker("i-9", "big")
    h.pool.add_worker("i-8", "big")
    h.run_pass()
    assert h.sched.max_containers == 6  # 5 instances evidently fit: 5 + 1


def test_at_quota_the_limit_holds_back_only_containers_needing_a_new_instance(make):
    """The quota counts instances: packing onto instances that exist goes on at the limit.

    Arvados skips every container once max_containers is reached (SPEC §9.5 step 18), which
    with several containers per instance leaves the spare room of a pool at quota unused.
    """
    h = make(types=big_types(), max_instances=2)
    running = []
    for i in range(2):
        x = h.queue.add(R, vcpus=1)
        running.append(x)
        h.pool.add_worker(f"i-{i}", "big", WorkerState.RUNNING, [x])
    h.pool.quota = 2
    queued = [h.queue.add(Q, vcpus=1, priority=9 - i) for i in range(8)]
    h.run_pass()
    assert h.sched.max_containers == 2  # the limit itself is Arvados' (SPEC §9.5 step 9)
    # 3 VCPUs spare on each of the two instances: six are locked, nothing is created, and the
    # two that fit nowhere stay Queued without being locked and unlocked.
    assert h.queue.ops("lock") == queued[:6]
    assert h.pool.creates == []
    assert h.queue.ops("unlock") == []
    h.run_pass()  # now Locked: started on the instances they were booked on
    assert sorted(h.pool.starts) == sorted(queued[:6])


def test_unlimited_until_quota_then_capped(make):
    h = make(max_instances=0)
    uuids = [h.queue.add(Q) for _ in range(20)]
    h.run_pass()
    assert h.queue.ops("lock") == uuids
    assert h.sched.max_containers == 0
    h.pool.quota = 0
    h.run_pass()
    assert h.sched.max_containers == 1


# --------------------------------------------------------------------------- previous attempts


def test_not_locking_while_previous_runner_exits(make):
    h = make()
    h.pool.add_worker("i-1", "t1")
    x = h.queue.add(Q)
    h.pool.lingering.add(x)
    h.run_pass()
    assert (x, "about to lock") in h.pool.kills
    assert h.queue.ops("lock") == []


def test_not_starting_while_previous_runner_exits(make):
    h = make()
    h.pool.add_worker("i-1", "t1")
    x = h.queue.add(L)
    h.pool.lingering.add(x)
    h.run_pass()
    assert (x, "about to start") in h.pool.kills
    assert h.pool.starts == []
    assert h.status(x) == "Waiting for previous container attempt to exit."


# --------------------------------------------------------------------------- statuses


def test_status_of_running_and_finished_entries(make):
    h = make()
    r = h.queue.add(R)
    h.pool.add_worker("i-1", "t1", WorkerState.RUNNING, [r])
    prep = h.queue.add(L)
    h.pool.run[prep] = 0.0
    h.run_pass()
    assert h.status(r) == ""
    assert h.status(prep) == PREPARING


def test_scale_ten_thousand_containers_on_a_thousand_instances(make):
    h = make(types=big_types(), max_instances=0)
    for i in range(1000):
        h.pool.add_worker(f"i-{i:05d}", "big")
    h.pool.can_create = 10
    uuids = [h.queue.add(L, priority=1 + (n % 7)) for n in range(10_000)]
    h.run_pass()
    statuses = {e.entry.container.uuid: e.scheduling_status for e in h.sched.snapshot()}
    assert set(statuses) == set(uuids)
    assert sum(s == PREPARING for s in statuses.values()) == 4000
    assert all(
        len(w.running_container_uuids) == 4
        for w in h.pool.workers.values()
        if w.worker_state is WorkerState.RUNNING
    )
    assert sum(s == waiting_new("big") for s in statuses.values()) == 40
    order = h.order()
    # The highest priorities got the instances, in queue order; positions continue after.
    assert {statuses[u] for u in order[:4000]} == {PREPARING}
    assert {statuses[u] for u in order[4000:4040]} == {waiting_new("big")}
    assert [statuses[u] for u in order[4040:]] == [capacity(n) for n in range(1, 5961)]
    assert h.pool.creates.count("big") == 10 + 5960


# --------------------------------------------------------------------------- limits, boot back-off


def test_herders_own_instance_limit_is_not_blamed_on_the_cloud(make):
    from herder.engine.worker.interfaces import QuotaLimit

    h = make(max_instances=1)
    h.pool.quota = 1
    h.pool.add_worker("i-1", "t8", WorkerState.RUNNING, [h.queue.add(R)])
    x = h.queue.add(Q)
    h.pool.limit_kind = QuotaLimit.MAX_INSTANCES
    h.run_pass()
    assert h.status(x) == (
        "Waiting in queue at position 1.  Cluster is at its configured instance limit "
        "(cloud.max_instances: 1) and cannot start any new instances right now."
    )
    h.pool.limit_kind = QuotaLimit.CLOUD_QUOTA
    h.run_pass()
    assert h.status(x) == cloud_limits(1)


def _backoff(h, type_name: str, failures: int, seconds: float) -> None:
    from herder.engine.worker.interfaces import BootBackoff

    h.pool.backoffs[type_name] = BootBackoff(type_name, failures, h.rt.now() + seconds)


def test_boot_backoff_holds_creates_and_says_why(make):
    h = make()
    x = h.queue.add(L)
    _backoff(h, "t1", 3, 240)
    h.run_pass()
    # The dearer types would not fix a bad image or firewall: nothing is created meanwhile.
    assert h.pool.creates == []
    assert h.status(x) == (
        "Waiting in queue at position 1.  3 instances of type t1 failed to boot in a row; "
        "next try in 4m; see herder cloudtest."
    )
    y = h.queue.add(Q)
    h.run_pass()
    assert h.queue.ops("lock") == []  # a Queued one is not locked for a type it cannot get
    assert h.status(y).startswith("Waiting in queue at position 2.  3 instances of type t1")
    del h.pool.backoffs["t1"]
    h.run_pass()
    assert h.pool.creates == ["t1"]


def test_boot_backoff_tries_a_type_that_costs_no_more(make):
    from .conftest import itype

    types = {
        t.name: t for t in (itype("a", 1, 4, 1.0), itype("b", 1, 4, 1.0), itype("c", 2, 8, 2.0))
    }
    h = make(types=types)
    x = h.queue.add(L)
    _backoff(h, "a", 1, 60)
    h.run_pass()
    assert h.pool.creates == ["b"]
    assert h.status(x) == waiting_new("b")

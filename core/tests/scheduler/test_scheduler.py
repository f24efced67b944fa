"""Start-up (pool loaded, stale locks, SPEC §9.8), wake-ups, per-container op lock (§9.4), and
metrics (§9.9, §13.3)."""

from __future__ import annotations

from herder.model import ContainerState, InstanceType, WorkerState

GiB = 1 << 30
Q = ContainerState.QUEUED
L = ContainerState.LOCKED
R = ContainerState.RUNNING


# --------------------------------------------------------------------------- start-up


def test_no_pass_before_the_pool_has_loaded(make):
    h = make()
    h.pool.is_loaded = False
    x = h.queue.add(Q)
    h.sched.start()
    h.rt.run_until_idle()
    assert h.sched.passes == 0
    assert h.queue.ops("lock") == []
    h.pool.is_loaded = True
    h.pool.notify()
    h.rt.run_until_idle()
    assert h.sched.phase == "running"
    assert h.queue.ops("lock") == [x]


def test_stale_locks_recomputed_after_the_last_probe(make):
    h = make()
    h.pool.add_worker("i-1", "t1", WorkerState.UNKNOWN)
    h.pool.add_worker("i-2", "t1")
    found = h.queue.add(L, priority=3)
    stale = h.queue.add(L, priority=2)
    waiting = h.queue.add(Q, priority=1)
    h.sched.start()
    h.rt.run_until_idle()
    assert h.sched.phase == "fixing stale locks"
    # Nothing may be locked or started while unknown workers might hold these containers.
    assert h.queue.calls == []
    assert h.pool.starts == []

    # The first probe of i-1 finds `found` preparing there; i-1 is no longer unknown.
    w = h.pool.workers["i-1"]
    w.worker_state = WorkerState.RUNNING
    w.running_container_uuids.append(found)
    h.pool.run[found] = 0.0
    h.pool.notify()
    h.rt.run_until_idle()

    # Arvados would unlock `found` too (its list predates the probe), then kill it.
    assert h.queue.ops("unlock") == [stale]
    assert h.queue.state(found) is L
    assert [k for k in h.pool.kills if k[0] == found] == []
    assert h.sched.phase == "running"
    # Scheduling then goes on as usual.
    assert waiting in h.queue.ops("lock")


def test_stale_locks_unlocked_after_timeout(make):
    h = make(containers={"stale_lock_timeout": "30s"})
    h.pool.add_worker("i-1", "t1", WorkerState.UNKNOWN)
    a = h.queue.add(L, priority=2)
    b = h.queue.add(L, priority=1)
    h.sched.start()
    h.rt.run_until_idle()
    h.rt.advance(29)
    assert h.queue.calls == []
    h.rt.advance(1)
    assert h.queue.ops("unlock")[:2] == [a, b]
    assert h.sched.phase == "running"


def test_stale_locks_timeout_uses_runners_known_at_that_time(make):
    h = make(containers={"stale_lock_timeout": "30s"})
    h.pool.add_worker("i-1", "t1", WorkerState.UNKNOWN)
    h.pool.add_worker("i-2", "t1", WorkerState.UNKNOWN)
    a = h.queue.add(L, priority=2)
    b = h.queue.add(L, priority=1)
    h.sched.start()
    h.rt.run_until_idle()
    h.rt.advance(10)
    w = h.pool.workers["i-1"]  # i-1 probed: runs a; i-2 never answers
    w.worker_state = WorkerState.RUNNING
    w.running_container_uuids.append(a)
    h.pool.run[a] = 0.0
    h.pool.notify()
    h.rt.run_until_idle()
    assert h.queue.calls == []
    h.rt.advance(20)
    assert h.queue.ops("unlock") == [b]


def test_no_unknown_workers_at_start_unlocks_nothing(make):
    h = make()
    a = h.queue.add(L)
    h.sched.start()
    h.rt.run_until_idle()
    assert h.queue.ops("unlock") == []
    assert h.pool.creates == ["t1"]  # the Locked container is simply scheduled
    assert h.queue.state(a) is L


def test_unknown_workers_but_nothing_stale_starts_at_once(make):
    h = make()
    h.pool.add_worker("i-1", "t1", WorkerState.UNKNOWN)
    x = h.queue.add(Q)
    h.sched.start()
    h.rt.run_until_idle()
    assert h.sched.phase == "running"
    assert h.queue.ops("lock") == [x]


def test_stop_ends_reactions(make):
    h = make()
    h.sched.start()
    h.rt.run_until_idle()
    passes = h.sched.passes
    h.sched.stop()
    h.queue.add(Q)
    h.rt.advance(60)
    assert h.sched.passes == passes
    assert h.queue.calls == []


def test_passes_follow_changes_without_polling(make):
    h = make()
    h.sched.start()
    h.rt.run_until_idle()
    x = h.queue.add(Q)
    h.rt.run_until_idle()
    assert h.queue.state(x) is L
    h.rt.run_until_idle()
    assert h.pool.creates == ["t1"]
    h.pool.boot_all()
    h.rt.run_until_idle()
    assert h.pool.starts == [x]


def test_safety_pass_every_poll_interval(make):
    h = make(poll_interval="5s")
    h.sched.start()
    h.rt.run_until_idle()
    before = h.sched.passes
    h.rt.advance(15)
    assert h.sched.passes == before + 3


# --------------------------------------------------------------------------- op lock


def test_operation_in_progress_defers_and_retries_after_250ms(make):
    h = make()
    h.pool.add_worker("i-1", "t1")
    h.sched.start()
    h.rt.run_until_idle()
    x = h.queue.add(Q)
    assert h.sched.ops.try_begin(x, "kill")  # e.g. a kill still running in another thread
    h.rt.run_until_idle()
    assert h.queue.ops("lock") == []
    h.sched.ops.end(x)
    h.rt.advance(0.2)
    assert h.queue.ops("lock") == []
    h.rt.advance(0.05)
    assert h.queue.ops("lock") == [x]


def test_one_operation_per_container_at_a_time(make):
    h = make()
    assert h.sched.ops.try_begin("u", "lock")
    assert not h.sched.ops.try_begin("u", "cancel")
    assert h.sched.ops.in_progress("u") == "lock"
    h.sched.ops.end("u")
    assert h.sched.ops.try_begin("u", "cancel")


def test_lock_skipped_if_no_longer_queued(make):
    h = make()
    x = h.queue.add(Q)
    h.sched.run_pass()  # decides to lock; the task has not run yet
    h.queue.set(x, state=ContainerState.CANCELLED)
    h.rt.run_until_idle()
    assert h.queue.ops("lock") == []


# --------------------------------------------------------------------------- metrics


def test_longest_wait_time(make):
    h = make()
    now = h.rt.now()
    h.queue.add(Q, created_at=now - 100)
    h.queue.add(L, created_at=now - 50)
    h.queue.add(Q, priority=0, created_at=now - 1000)  # on hold: not waiting
    prep = h.queue.add(L, created_at=now - 500)  # has a runner already
    h.pool.run[prep] = 0.0
    h.queue.add(R, created_at=now - 2000)
    h.pool.can_create = 0
    h.run_pass()
    assert h.metric("herder_containers_longest_wait_time_seconds") == 100


def test_longest_wait_time_zero_when_nothing_waits(make):
    h = make()
    h.run_pass()
    assert h.metric("herder_containers_longest_wait_time_seconds") == 0


def test_at_quota_gauge_reads_the_pool(make):
    h = make()
    assert h.metric("herder_at_quota") == 0
    h.pool.quota = 0
    assert h.metric("herder_at_quota") == 1


def test_max_concurrent_containers_gauge(make):
    h = make(max_instances=7)
    h.run_pass()
    assert h.metric("herder_max_concurrent_containers") == 7


def test_queue_entries_by_state_and_type(make):
    types = {
        "t1": InstanceType("t1", "t1", 1, 4 * GiB, price=1.0),
        "t2": InstanceType("t2", "t2", 2, 8 * GiB, price=2.0),
    }
    h = make(types=types)
    h.pool.can_create = 0
    h.queue.add(Q, priority=0)
    h.queue.add(Q, priority=0)
    h.queue.add(L, vcpus=2)
    h.run_pass()
    assert h.metric("herder_queue_entries", state="Queued", instance_type="t1") == 2
    assert h.metric("herder_queue_entries", state="Locked", instance_type="t2") == 1
    h.run_pass()  # the priority-0 Queued ones were dropped from the queue by sync
    assert h.metric("herder_queue_entries", state="Queued", instance_type="t1") == 0


def test_queue_entries_with_no_eligible_type(make):
    # A Running container whose types were removed from the configuration (SPEC §19.3 #26).
    h = make()
    x = h.queue.add(R)
    entry = h.queue._entries[x]
    entry.instance_types = []
    h.pool.add_worker("i-1", "t1", WorkerState.RUNNING, [x])
    h.run_pass()
    assert h.metric("herder_queue_entries", state="Running", instance_type="") == 1


def test_private_registry_when_none_given(make):
    from herder.engine.scheduler.scheduler import Scheduler

    h = make()
    # A second scheduler on the same objects must not clash with the first one's metrics.
    Scheduler(runtime=h.rt, queue=h.queue, pool=h.pool, config=h.config, instance_types=h.types)

"""Reconciling the queue with the pool's runners (SPEC §9.7, with herder's retry rules)."""

from __future__ import annotations

import pytest

from herder.model import ContainerState, WorkerState

Q = ContainerState.QUEUED
L = ContainerState.LOCKED
R = ContainerState.RUNNING
C = ContainerState.COMPLETE
X = ContainerState.CANCELLED


def started(make):
    """A scheduler past start-up, with no instances and nothing queued."""
    h = make()
    h.sched.start()
    h.rt.run_until_idle()
    assert h.sched.phase == "running"
    return h


# ---- Running


def test_running_without_runner_is_retried(make):
    h = make()
    x = h.queue.add(R)
    h.run_pass()
    assert h.queue.calls == [("retry", x, "not running on any worker")]
    assert h.queue.state(x) is Q


def test_running_without_runner_waits_while_workers_are_unknown(make):
    h = make()
    h.pool.add_worker("i-1", "t1", WorkerState.UNKNOWN)
    x = h.queue.add(R)
    h.run_pass()
    assert h.queue.ops("retry") == []
    assert h.queue.state(x) is R


def test_running_without_runner_past_attempt_cap_is_cancelled(make):
    h = make(max_dispatch_attempts=1)
    x = h.queue.add(R)
    h.run_pass()
    assert h.queue.state(x) is X


def test_running_after_runner_exited_is_retried(make):
    h = make()
    x = h.queue.add(R)
    h.pool.run[x] = h.rt.now() - 5  # exited 5 s ago without reporting an exit code
    h.run_pass()
    assert h.queue.calls == [("retry", x, "state=Running after crunch-run exited")]
    # The next sync sees it Queued with a runner placeholder: kill and forget that.
    h.run_pass()
    assert (x, "pool says running, but queue says state=Queued") in h.pool.kills
    assert x in h.pool.forgotten


def test_running_exit_newer_than_queue_snapshot_waits_then_retries(make):
    h = started(make)
    x = h.queue.add(R)
    h.pool.run[x] = h.rt.now()  # exit at the very time of the snapshot: it may not show yet
    h.pool.notify()
    h.rt.run_until_idle()
    assert h.queue.ops("retry") == []
    h.rt.advance(0.3)  # a recheck is scheduled without any further event
    assert h.queue.ops("retry") == [x]


def test_running_with_priority_zero_is_cancelled_then_killed(make):
    h = make()
    x = h.queue.add(R, priority=0)
    h.pool.add_worker("i-1", "t1", WorkerState.RUNNING, [x])
    h.run_pass()
    assert h.queue.calls == [("cancel", x, "cancelled: priority set to 0")]
    assert h.queue.state(x) is X
    h.run_pass()
    assert (x, "state=Cancelled") in h.pool.kills
    assert x in h.pool.forgotten


def test_running_normally_is_left_alone(make):
    h = make()
    x = h.queue.add(R)
    h.pool.add_worker("i-1", "t1", WorkerState.RUNNING, [x])
    h.run_pass()
    assert h.queue.calls == []
    assert h.pool.kills == []


# ---- max run time


def test_max_run_time_exceeded_cancels_and_kills(make):
    h = make()
    x = h.queue.add(R, max_run_time=60, started_at=h.rt.now() - 61)
    h.pool.add_worker("i-1", "t1", WorkerState.RUNNING, [x])
    h.run_pass()
    assert h.queue.calls == [("cancel", x, "max run time exceeded (1m)")]
    assert (x, "max run time exceeded (1m)") in h.pool.kills


def test_max_run_time_checked_when_it_expires(make):
    h = started(make)
    x = h.queue.add(R, max_run_time=90, started_at=h.rt.now())
    h.pool.add_worker("i-1", "t1", WorkerState.RUNNING, [x])
    h.pool.notify()
    h.rt.run_until_idle()
    h.rt.advance(89)
    assert h.queue.ops("cancel") == []
    h.rt.advance(2)  # no queue or pool event needed
    assert h.queue.calls[0] == ("cancel", x, "max run time exceeded (1m30s)")
    assert h.queue.state(x) is X
    assert x not in h.pool.run


def test_max_run_time_zero_means_no_limit(make):
    h = make()
    x = h.queue.add(R, max_run_time=0, started_at=h.rt.now() - 1e6)
    h.pool.add_worker("i-1", "t1", WorkerState.RUNNING, [x])
    h.run_pass()
    assert h.queue.calls == []


# ---- final states


@pytest.mark.parametrize("state", [C, X])
def test_finished_with_runner_is_killed_and_forgotten_by_pool(make, state):
    h = make()
    x = h.queue.add(state)
    h.pool.add_worker("i-1", "t1", WorkerState.RUNNING, [x])
    h.run_pass()
    assert h.pool.kills == [(x, f"state={state.value}")]
    assert h.pool.forgotten == [x]


@pytest.mark.parametrize("state", [C, X])
def test_finished_without_runner_is_dropped_from_queue(make, state):
    h = make()
    x = h.queue.add(state)
    h.run_pass()
    assert h.queue.ops("forget") == [x]
    assert x not in h.queue.entries()[0]


# ---- Queued


def test_queued_with_runner_is_killed(make):
    h = make()
    x = h.queue.add(Q)
    h.pool.add_worker("i-1", "t1", WorkerState.RUNNING, [x])
    h.run_pass()
    assert h.pool.kills == [(x, "pool says running, but queue says state=Queued")]
    assert h.pool.forgotten == [x]


def test_queued_priority_zero_is_dropped(make):
    h = make()
    x = h.queue.add(Q, priority=0)
    h.run_pass()
    assert h.queue.ops("forget") == [x]
    assert x not in h.queue.entries()[0]


# ---- Locked


def test_locked_after_runner_exited_is_requeued(make):
    h = make()
    x = h.queue.add(L)
    h.pool.run[x] = h.rt.now() - 1
    h.run_pass()
    assert h.queue.ops("unlock") == [x]
    assert h.queue.state(x) is Q


def test_locked_with_runner_and_priority_zero_is_killed(make):
    h = make()
    x = h.queue.add(L, priority=0)
    h.pool.add_worker("i-1", "t1", WorkerState.RUNNING, [x])
    h.run_pass()
    assert h.pool.kills == [(x, "priority=0")]
    assert h.queue.ops("unlock") == []


def test_locked_without_runner_and_priority_zero_is_requeued(make):
    h = make()
    x = h.queue.add(L, priority=0)
    h.run_pass()
    assert h.queue.ops("unlock") == [x]
    assert h.queue.state(x) is Q
    h.run_pass()  # now Queued with priority 0: dropped from the snapshot
    assert x not in h.queue.entries()[0]


def test_locked_with_runner_is_left_alone(make):
    h = make()
    x = h.queue.add(L)
    h.pool.add_worker("i-1", "t1", WorkerState.RUNNING, [x])
    h.run_pass()
    assert h.queue.calls == []
    assert h.pool.kills == []


# ---- runners the queue does not know


def test_runner_not_in_queue_is_killed(make):
    h = make()
    stray = "zzzzz-dz642-strayxxxxxxxxxx"
    h.pool.add_worker("i-1", "t1", WorkerState.RUNNING, [stray])
    h.run_pass()
    assert h.pool.kills == [(stray, "not in queue")]
    assert h.pool.forgotten == [stray]

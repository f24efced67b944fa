"""herder.dispatch.Dispatcher: the generic dispatcher's rules (SPEC §17), on a virtual clock."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest

from herder.dispatch import CloseReason, Dispatcher, Job
from herder.engine.sizing import ConfigSizer
from herder.model import Container, ContainerSpec, ContainerState, InstanceType
from herder.queue.base import Listener
from herder.queue.rules import RuleSettings
from herder.queue.sqlite import SqliteQueue
from herder.runtime import VirtualRuntime

Q, L, R = ContainerState.QUEUED, ContainerState.LOCKED, ContainerState.RUNNING
DONE, CANCELLED = ContainerState.COMPLETE, ContainerState.CANCELLED
TYPES = {"host": InstanceType("host", "host", vcpus=64, ram=1 << 40, included_scratch=1 << 40)}


class SpyQueue(SqliteQueue):
    """The SQLite queue, recording reads; it can hide containers and stay silent on changes."""

    def __init__(self, rt: VirtualRuntime, *, notify: bool = True) -> None:
        super().__init__(":memory:", RuleSettings(rt, ConfigSizer(TYPES), max_dispatch_attempts=5))
        self.notify = notify
        self.hidden: set[str] = set()
        self.list_calls: list[tuple[tuple[ContainerState, ...] | None, int, str]] = []

    def list(
        self, states: Iterable[ContainerState] | None = None, limit: int = 100, after: str = ""
    ) -> list[Container]:
        st = tuple(states) if states is not None else None
        self.list_calls.append((st, limit, after))
        return [c for c in super().list(st, limit, after) if c.uuid not in self.hidden]

    def get(self, uuid: str) -> Container | None:
        return None if uuid in self.hidden else super().get(uuid)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        if not self.notify:
            return lambda: None
        return super().subscribe(listener)


class Recorder:
    """A run function that only records the jobs it is given (event-driven style)."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self.calls: list[str] = []
        self.fail_with: Exception | None = None

    def __call__(self, job: Job) -> None:
        self.calls.append(job.uuid)
        self.jobs[job.uuid] = job
        if self.fail_with is not None:
            raise self.fail_with


@pytest.fixture
def rt() -> VirtualRuntime:
    return VirtualRuntime()


@pytest.fixture
def q(rt: VirtualRuntime):
    queue = SpyQueue(rt)
    yield queue
    queue.close()


def submit(q: SqliteQueue, priority: int = 1, vcpus: int = 1) -> str:
    from herder.model import RuntimeConstraints

    spec = ContainerSpec(
        command=("true",), priority=priority, runtime_constraints=RuntimeConstraints(vcpus=vcpus)
    )
    return q.submit(spec).uuid


def state(q: SqliteQueue, uuid: str) -> ContainerState:
    ctr = q.get(uuid)
    assert ctr is not None
    return ctr.state


def make(q: SqliteQueue, rt: VirtualRuntime, fn: Recorder, **kw: object) -> Dispatcher:
    d = Dispatcher(q, fn, runtime=rt, poll_period=kw.pop("poll_period", 60.0), **kw)  # type: ignore[arg-type]
    d.start()
    rt.run_until_idle()
    return d


# ---------------------------------------------------------------- locking


def test_locks_queued_containers_with_priority_and_calls_function_once(q, rt) -> None:
    a, held_back = submit(q), submit(q, priority=0)
    fn = Recorder()
    d = make(q, rt, fn)
    assert fn.calls == [a]
    assert fn.jobs[a].container.state is L
    assert state(q, a) is L and state(q, held_back) is Q
    d.poll()
    rt.run_until_idle()
    rt.advance(300)
    assert fn.calls == [a]  # later passes only update, never call again


def test_a_container_waiting_for_another_is_started_once_that_one_completes(q, rt) -> None:
    first = submit(q)
    waiter = q.submit(ContainerSpec(command=("true",), after=(first,))).uuid
    fn = Recorder()
    make(q, rt, fn)
    assert fn.calls == [first] and state(q, waiter) is Q
    q.set_running(first)
    q.finish(first, 0)
    rt.run_until_idle()
    assert fn.calls == [first, waiter]


def test_highest_priority_first_within_concurrency_limit(q, rt) -> None:
    low, high = submit(q, priority=1), submit(q, priority=9)
    fn = Recorder()
    make(q, rt, fn, max_concurrent=1)
    assert fn.calls == [high]
    assert state(q, low) is Q


def test_can_run_refusal_leaves_container_queued(q, rt) -> None:
    big, small = submit(q, vcpus=8), submit(q, vcpus=1)
    fn = Recorder()
    make(q, rt, fn, can_run=lambda c: c.runtime_constraints.vcpus <= 2)
    assert fn.calls == [small]
    assert state(q, big) is Q


def test_freed_capacity_is_used_at_once(q, rt) -> None:
    first, second = submit(q, priority=2), submit(q, priority=1)
    fn = Recorder()
    make(q, rt, fn, max_concurrent=1)
    assert fn.calls == [first]
    fn.jobs[first].set_running()
    fn.jobs[first].finish(0)
    rt.run_until_idle()  # no clock advance: the queue's notification starts the next pass
    assert fn.calls == [first, second]
    assert state(q, first) is DONE and state(q, second) is L


def test_reacts_to_new_submissions_without_waiting_for_poll(q, rt) -> None:
    fn = Recorder()
    make(q, rt, fn, poll_period=3600.0)
    uuid = submit(q)
    rt.run_until_idle()
    assert fn.calls == [uuid]


def test_polls_periodically_when_the_queue_cannot_notify(rt) -> None:
    q = SpyQueue(rt, notify=False)
    fn = Recorder()
    make(q, rt, fn, poll_period=10.0)
    uuid = submit(q)
    rt.run_until_idle()
    assert fn.calls == []
    rt.advance(10.0)
    assert fn.calls == [uuid]


def test_queue_reads_are_batched_by_state(q, rt) -> None:
    for _ in range(25):
        submit(q, priority=0)  # not runnable: every pass has to page through them
    fn = Recorder()
    make(q, rt, fn, batch_size=10)
    assert q.list_calls, "the dispatcher reads the queue through list()"
    assert all(limit == 10 for _s, limit, _a in q.list_calls)
    assert {states for states, _l, _a in q.list_calls} == {(L, R), (Q,)}  # never "all states"
    queued_reads = [after for states, _l, after in q.list_calls if states == (Q,)]
    assert len(queued_reads) == 3  # 10 + 10 + 5, keyset paging on uuid
    assert queued_reads[0] == "" and queued_reads[1] < queued_reads[2]


# ---------------------------------------------------------------- updates stream


def test_slow_consumer_keeps_only_the_latest_update(q, rt) -> None:
    uuid = submit(q)
    fn = Recorder()
    make(q, rt, fn)
    updates = fn.jobs[uuid].updates
    assert updates.take() is not None  # the first record
    for priority in (5, 6, 7):
        q.set_priority(uuid, priority)
        rt.run_until_idle()  # each change is pushed without waiting for the consumer
    latest = updates.take()
    assert latest is not None and latest.priority == 7
    assert updates.take() is None
    assert updates.dropped == 2


def test_unchanged_records_are_not_pushed_again(q, rt) -> None:
    uuid = submit(q)
    fn = Recorder()
    d = make(q, rt, fn)
    updates = fn.jobs[uuid].updates
    updates.take()
    d.poll()
    rt.advance(120)
    assert updates.take() is None


def test_cancellation_reaches_the_function_and_ends_tracking(q, rt) -> None:
    uuid = submit(q)
    fn = Recorder()
    d = make(q, rt, fn)
    seen: list[tuple[ContainerState, CloseReason | None]] = []
    updates = fn.jobs[uuid].updates
    updates.take()
    updates.listen(lambda: seen.append((updates.latest.state, updates.close_reason)))
    q.cancel(uuid, "by the user")
    rt.run_until_idle()
    assert seen[-1] == (CANCELLED, CloseReason.FINAL)
    assert updates.take() is not None and updates.latest.state is CANCELLED
    assert d.held() == []


def test_vanished_container_stops_tracking(q, rt) -> None:
    uuid = submit(q)
    fn = Recorder()
    d = make(q, rt, fn)
    q.hidden.add(uuid)
    d.poll()
    rt.run_until_idle()
    assert fn.jobs[uuid].updates.close_reason is CloseReason.VANISHED
    assert d.held() == []


def test_function_changes_state_and_completion_ends_tracking(q, rt) -> None:
    uuid = submit(q)
    fn = Recorder()
    d = make(q, rt, fn)
    job = fn.jobs[uuid]
    assert job.set_running().state is R
    rt.run_until_idle()
    assert [c.state for c in d.held()] == [R]
    job.finish(3)
    rt.run_until_idle()
    ctr = q.get(uuid)
    assert ctr is not None and ctr.state is DONE and ctr.exit_code == 3
    assert job.updates.close_reason is CloseReason.FINAL
    assert d.held() == []


# ---------------------------------------------------------------- retries


def test_failed_attempt_is_retried_no_sooner_than_min_retry_period(q, rt) -> None:
    uuid = submit(q)
    fn = Recorder()
    fn.fail_with = RuntimeError("no such image")
    make(q, rt, fn, min_retry_period=30.0, poll_period=3600.0)
    assert fn.calls == [uuid]
    assert state(q, uuid) is Q  # given back
    assert b"Error running container" in q.read_log(uuid)
    fn.fail_with = None
    rt.advance(29.0)
    assert fn.calls == [uuid]
    rt.advance(1.0)  # a timer wakes the dispatcher; the hour-long poll is not needed
    assert fn.calls == [uuid, uuid]
    assert state(q, uuid) is L


def test_unlock_by_the_function_releases_and_throttles(q, rt) -> None:
    uuid = submit(q)
    fn = Recorder()
    d = make(q, rt, fn, min_retry_period=5.0)
    job = fn.jobs[uuid]
    job.unlock()
    rt.run_until_idle()
    assert job.updates.close_reason is CloseReason.RELEASED
    assert d.held() == [] and fn.calls == [uuid]
    rt.advance(5.0)
    assert fn.calls == [uuid, uuid]


def test_running_container_is_retried_when_the_function_fails(q, rt) -> None:
    uuid = submit(q)

    def run(job: Job) -> None:
        job.set_running()
        raise OSError("lost it")

    d = Dispatcher(q, run, runtime=rt, min_retry_period=100.0)
    d.start()
    rt.run_until_idle()
    ctr = q.get(uuid)
    assert ctr is not None and ctr.state is Q and ctr.lock_count == 1


# ---------------------------------------------------------------- recovery


def test_restart_takes_up_locked_and_running_containers(q, rt) -> None:
    locked, running, queued = submit(q), submit(q), submit(q, priority=0)
    q.lock(locked)
    q.lock(running)
    q.set_running(running)
    fn = Recorder()
    make(q, rt, fn)
    assert sorted(fn.calls) == sorted([locked, running])
    assert fn.jobs[running].container.state is R
    lock_counts = {u: q.get(u).lock_count for u in (locked, running)}  # type: ignore[union-attr]
    assert lock_counts == {locked: 1, running: 1}  # taken up, not locked again
    assert state(q, queued) is Q


def test_stop_closes_streams_and_leaves_containers_held(q, rt) -> None:
    uuid = submit(q)
    fn = Recorder()
    d = make(q, rt, fn)
    d.stop()
    assert fn.jobs[uuid].updates.close_reason is CloseReason.SHUTDOWN
    assert state(q, uuid) is L
    fn2 = Recorder()
    make(q, rt, fn2)  # a new dispatcher on the same queue takes it up
    assert fn2.calls == [uuid]


def test_track_hands_a_final_container_over_for_cleanup(q, rt) -> None:
    uuid = submit(q)
    q.cancel(uuid, "gone")
    fn = Recorder()
    d = make(q, rt, fn)
    assert fn.calls == []
    job = d.track(uuid)
    rt.run_until_idle()
    assert job is not None and fn.calls == [uuid]
    assert job.updates.close_reason is CloseReason.FINAL
    assert d.track("zzzzz-dz642-000000000000000") is None

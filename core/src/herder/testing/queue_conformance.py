"""herder's queue conformance suite: what every container queue backend must do, as pytest tests.

The dispatcher, the API and the scheduler rely on the rules of :mod:`herder.queue.rules` (lock
needs Queued and priority > 0, the dispatch-attempt cap, final states never change, sizing at
submission, the snapshot the scheduler reads) and on each change being durable and announced.
A backend built on :class:`~herder.queue.rules.RuledQueue` gets the rules for free; this suite
checks that its storage keeps them, across a reopen too.

A backend's test module subclasses :class:`QueueConformance` (a ``Test*`` subclass is
collected) and provides a ``queue_factory`` fixture::

    import pytest
    from herder.testing.queue_conformance import QueueConformance, QueueSettings

    class TestMyQueueConformance(QueueConformance):
        @pytest.fixture
        def queue_factory(self, tmp_path):
            def make(settings: QueueSettings) -> ContainerQueue:
                return MyQueue(tmp_path / "q", settings.rules)
            return make

Each call of the factory within one test must open the *same* storage (a second call after
the first queue is closed is how the suite checks durability); each test must start empty.
A backend that keeps nothing across a reopen sets ``durable = False`` on its subclass, and the
durability tests are skipped.  The spend ledger the queue keeps (``queue.ledger``) is held to
the same: record, total and list over half-open ranges, container costs, compaction, and
(when durable) a reopen.  Every check needs only the queue's public interface, a virtual
clock, and no sleeps.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from herder.engine.sizing import ConfigSizer
from herder.model import (
    Container,
    ContainerSpec,
    ContainerState,
    InstanceType,
    RuntimeConstraints,
    SchedulingParameters,
)
from herder.queue.base import (
    ContainerNotFound,
    ContainerQueue,
    InvalidTransition,
    ListFilter,
    Sizer,
)
from herder.queue.rules import RuleSettings
from herder.runtime import VirtualRuntime
from herder.spend import (
    FOLDED,
    KEEP_MONTHS,
    ContainerCost,
    Ledger,
    SpendEntry,
    compaction_cutoff,
    period_bounds,
)

__all__ = ["QueueConformance", "QueueFactory", "QueueSettings", "conformance_types"]

GiB = 1 << 30
Q = ContainerState.QUEUED
L = ContainerState.LOCKED
R = ContainerState.RUNNING
C = ContainerState.COMPLETE
X = ContainerState.CANCELLED


def conformance_types() -> dict[str, InstanceType]:
    """Two instance types: the suite's containers fit ``small`` (cheapest) and ``large``, or
    neither when they ask for more than 64 GiB."""
    return {
        "small": InstanceType(name="small", provider_type="small", vcpus=2, ram=8 * GiB, price=0.1),
        "large": InstanceType(
            name="large", provider_type="large", vcpus=16, ram=64 * GiB, price=0.8
        ),
    }


@dataclass
class QueueSettings:
    """What a backend's factory builds its queue with; the suite chooses them per test."""

    runtime: VirtualRuntime
    instance_types: dict[str, InstanceType] = field(default_factory=conformance_types)
    cluster_id: str = "zzzzz"
    max_dispatch_attempts: int = 3
    always_use_preemptible: bool = False

    @property
    def sizer(self) -> Sizer:
        return ConfigSizer(self.instance_types)

    @property
    def rules(self) -> RuleSettings:
        """The settings as a backend's queue takes them."""
        return RuleSettings(
            runtime=self.runtime,
            sizer=self.sizer,
            cluster_id=self.cluster_id,
            max_dispatch_attempts=self.max_dispatch_attempts,
            always_use_preemptible=self.always_use_preemptible,
        )


QueueFactory = Callable[[QueueSettings], ContainerQueue]


def spec(
    *, vcpus: int = 1, ram: int = GiB, priority: int = 1, preemptible: bool = False
) -> ContainerSpec:
    return ContainerSpec(
        command=("echo", "hello"),
        image="debian",
        environment=(("A", "1"), ("SECRET", "s3cr3t")),
        runtime_constraints=RuntimeConstraints(vcpus=vcpus, ram=ram),
        scheduling_parameters=SchedulingParameters(preemptible=preemptible),
        priority=priority,
    )


def _get(queue: ContainerQueue, uuid: str) -> Container:
    c = queue.get(uuid)
    assert c is not None, f"{uuid} is not in the queue"
    return c


class _Opened:
    """The queues one test opened through the factory, closed when the test ends."""

    def __init__(self, factory: QueueFactory) -> None:
        self.factory = factory
        self.runtime = VirtualRuntime()
        self.queues: list[ContainerQueue] = []

    def open(self, **settings: Any) -> ContainerQueue:
        q = self.factory(QueueSettings(runtime=self.runtime, **settings))
        self.queues.append(q)
        return q

    def close(self) -> None:
        for q in self.queues:
            q.close()


class QueueConformance:
    """Every check of the suite, one test each.  Needs a ``queue_factory`` fixture.

    Not collected itself (its name does not start with ``Test``); subclass it as
    ``TestMyQueueConformance``.
    """

    #: False for a backend that keeps nothing once closed: the reopen tests are skipped.
    durable = True

    @pytest.fixture
    def opened(self, queue_factory: QueueFactory) -> Iterator[_Opened]:
        opened = _Opened(queue_factory)
        try:
            yield opened
        finally:
            opened.close()

    @pytest.fixture
    def queue(self, opened: _Opened) -> ContainerQueue:
        return opened.open()

    @pytest.fixture
    def rt(self, opened: _Opened) -> VirtualRuntime:
        return opened.runtime

    def _reopen(self, opened: _Opened, queue: ContainerQueue, **settings: Any) -> ContainerQueue:
        if not self.durable:
            pytest.skip("this backend keeps nothing across a reopen")
        queue.close()
        return opened.open(**settings)

    # ---- submission

    def test_submit_stores_a_queued_container(
        self, queue: ContainerQueue, rt: VirtualRuntime
    ) -> None:
        c = queue.submit(spec(priority=5))
        assert re.fullmatch(r"zzzzz-dz642-[0-9a-z]{15}", c.uuid), c.uuid
        assert (c.state, c.priority, c.lock_count, c.created_at) == (Q, 5, 0, rt.now())
        assert queue.get(c.uuid) == c
        assert _get(queue, c.uuid).spec == spec(priority=5)
        entries, _ = queue.entries()
        assert [t.name for t in entries[c.uuid].instance_types] == ["small"]
        big = queue.submit(spec(ram=32 * GiB))
        assert [t.name for t in queue.entries()[0][big.uuid].instance_types] == ["large"]
        assert big.uuid != c.uuid

    def test_invalid_submission_is_refused_and_not_stored(self, queue: ContainerQueue) -> None:
        with pytest.raises(ValueError, match="invalid container"):
            queue.submit(ContainerSpec(command=()))
        with pytest.raises(ValueError, match="priority"):
            queue.submit(spec(priority=-1))
        assert queue.list() == []
        assert queue.entries()[0] == {}

    def test_a_batch_is_stored_whole_or_not_at_all(self, queue: ContainerQueue) -> None:
        made = queue.submit_many([spec(priority=2), spec(ram=128 * GiB), spec()])
        assert [c.state for c in made] == [Q, X, Q]
        assert made[0].priority == 2
        assert {c.uuid for c in queue.list()} == {c.uuid for c in made}
        assert set(queue.entries()[0]) == {made[0].uuid, made[2].uuid}
        with pytest.raises(ValueError, match=r"item 2: .*priority") as refused:
            queue.submit_many([spec(), spec(), spec(priority=-1)])
        assert getattr(refused.value, "index", None) == 2
        assert len(queue.list()) == 3
        assert queue.submit_many([]) == []

    def test_an_array_shares_an_id_and_tells_each_member_its_index(
        self, queue: ContainerQueue
    ) -> None:
        other = queue.submit(spec())
        made = queue.submit_array(spec(priority=3), 4)
        array_id = made[0].array_id
        assert re.fullmatch(r"zzzzz-a88ay-[0-9a-z]{15}", array_id), array_id
        assert {c.array_id for c in made} == {array_id} and other.array_id == ""
        for index, c in enumerate(made):
            env = dict(c.spec.environment)
            assert env["HERDER_ARRAY_INDEX"] == str(index)
            assert env["HERDER_ARRAY_ID"] == array_id
            assert env["A"] == "1" and c.priority == 3
            assert _get(queue, c.uuid).array_id == array_id
        members = queue.newest(ListFilter(array_id=array_id))
        assert sorted(c.uuid for c in members) == sorted(c.uuid for c in made)
        queue.cancel(made[0].uuid)
        unfinished = queue.newest(ListFilter(states=(Q,), array_id=array_id))
        assert len(unfinished) == 3
        assert queue.submit_array(spec(), 2)[0].array_id != array_id
        with pytest.raises(ValueError, match="count"):
            queue.submit_array(spec(), 0)
        with pytest.raises(ValueError, match="priority"):
            queue.submit_array(spec(priority=-1), 2)
        assert len(queue.list()) == 7

    def test_negative_resources_are_refused_and_zero_vcpus_shares_one(
        self, queue: ContainerQueue
    ) -> None:
        for bad in (spec(vcpus=-1), spec(ram=-1)):
            with pytest.raises(ValueError, match="must be an integer >= 0"):
                queue.submit(bad)
        assert queue.list() == []
        # SPEC 8.5: a 0-VCPU container shares one VCPU with the other 0-VCPU containers of
        # its instance; it is a real request, not a mistake.
        light = queue.submit(spec(vcpus=0))
        assert light.state is Q
        assert queue.entries()[0][light.uuid].resources.vcpus == 0

    def test_unsatisfiable_submission_is_cancelled_at_once(self, queue: ContainerQueue) -> None:
        c = queue.submit(spec(ram=128 * GiB))
        assert c.state is X
        assert c.status("error").startswith("cannot run container")
        assert c.uuid not in queue.entries()[0]
        assert queue.get(c.uuid) == c

    def test_always_use_preemptible_marks_submissions(self, opened: _Opened) -> None:
        queue = opened.open(always_use_preemptible=True)
        types = {
            **conformance_types(),
            "small.spot": InstanceType(
                name="small.spot",
                provider_type="small",
                vcpus=2,
                ram=8 * GiB,
                price=0.03,
                preemptible=True,
            ),
        }
        queue.close()
        queue = opened.open(always_use_preemptible=True, instance_types=types)
        c = queue.submit(spec())
        assert c.scheduling_parameters.preemptible
        assert [t.name for t in queue.entries()[0][c.uuid].instance_types] == ["small.spot"]

    # ---- lock / unlock

    def test_lock_needs_queued_and_priority(
        self, queue: ContainerQueue, rt: VirtualRuntime
    ) -> None:
        held = queue.submit(spec(priority=0))
        with pytest.raises(InvalidTransition):
            queue.lock(held.uuid)
        c = queue.submit(spec())
        rt.advance(7)
        locked = queue.lock(c.uuid)
        assert (locked.state, locked.lock_count, locked.locked_at) == (L, 1, rt.now())
        with pytest.raises(InvalidTransition):
            queue.lock(c.uuid)
        assert queue.get(c.uuid) == locked

    def test_unlock_requeues_then_cancels_past_the_cap(self, queue: ContainerQueue) -> None:
        c = queue.submit(spec())
        with pytest.raises(InvalidTransition):
            queue.unlock(c.uuid)
        for attempt in (1, 2):
            queue.lock(c.uuid)
            back = queue.unlock(c.uuid)
            assert (back.state, back.lock_count, back.locked_at) == (Q, attempt, None)
        queue.lock(c.uuid)
        done = queue.unlock(c.uuid)
        assert done.state is X
        assert "max_dispatch_attempts" in done.status("error")

    def test_concurrent_locks_only_one_wins(self, queue: ContainerQueue) -> None:
        c = queue.submit(spec())
        won: list[Container] = []
        refused: list[Exception] = []
        start = threading.Barrier(4)

        def try_lock() -> None:
            start.wait()
            try:
                won.append(queue.lock(c.uuid))
            except InvalidTransition as exc:
                refused.append(exc)

        threads = [threading.Thread(target=try_lock) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and len(refused) == 3
        assert _get(queue, c.uuid).lock_count == 1

    # ---- running, finishing, retrying

    def test_running_needs_a_lock_and_repeats_harmlessly(
        self, queue: ContainerQueue, rt: VirtualRuntime
    ) -> None:
        c = queue.submit(spec())
        with pytest.raises(InvalidTransition):
            queue.set_running(c.uuid)
        queue.lock(c.uuid)
        rt.advance(3)
        running = queue.set_running(c.uuid, "i-1", "small")
        assert (running.state, running.started_at, running.instance_id, running.instance_type) == (
            R,
            rt.now(),
            "i-1",
            "small",
        )
        assert queue.set_running(c.uuid, "i-2", "large") == running

    def test_finish_records_the_exit_code_once(self, queue: ContainerQueue) -> None:
        c = queue.submit(spec())
        with pytest.raises(InvalidTransition):
            queue.finish(c.uuid, 0)
        queue.lock(c.uuid)
        queue.set_running(c.uuid)
        done = queue.finish(c.uuid, 3)
        assert (done.state, done.exit_code) == (C, 3)
        assert done.finished_at is not None
        assert queue.finish(c.uuid, 0) == done
        assert queue.cancel(c.uuid, "late") == done

    def test_retry_requeues_with_a_warning_then_cancels_past_the_cap(
        self, queue: ContainerQueue
    ) -> None:
        c = queue.submit(spec())
        with pytest.raises(InvalidTransition):
            queue.retry(c.uuid, "lost")
        for _ in range(2):
            queue.lock(c.uuid)
            queue.set_running(c.uuid, "i-1", "small")
            again = queue.retry(c.uuid, "runner lost")
            assert (again.state, again.started_at, again.instance_id) == (Q, None, "")
            assert again.status("warning") == "runner lost"
        queue.lock(c.uuid)
        done = queue.retry(c.uuid, "runner lost")
        assert done.state is X
        assert "3 dispatch attempts" in done.status("error")
        assert queue.retry(c.uuid, "again") == done

    # ---- cancel, priority, cost

    def test_cancel_from_every_unfinished_state(self, queue: ContainerQueue) -> None:
        queued = queue.submit(spec())
        locked = queue.submit(spec())
        running = queue.submit(spec())
        queue.lock(locked.uuid)
        queue.lock(running.uuid)
        queue.set_running(running.uuid)
        for c in (queued, locked, running):
            out = queue.cancel(c.uuid, "by request")
            assert (out.state, out.status("error")) == (X, "by request")
            assert out.finished_at is not None
        with pytest.raises(InvalidTransition):
            queue.lock(queued.uuid)

    def test_priority_changes_until_final(self, queue: ContainerQueue) -> None:
        c = queue.submit(spec(priority=1))
        assert queue.set_priority(c.uuid, 9).priority == 9
        with pytest.raises(ValueError):
            queue.set_priority(c.uuid, -1)
        queue.cancel(c.uuid)
        with pytest.raises(InvalidTransition):
            queue.set_priority(c.uuid, 2)

    def test_cost_accumulates(self, queue: ContainerQueue) -> None:
        c = queue.submit(spec())
        queue.add_cost(c.uuid, 0.25)
        queue.add_cost(c.uuid, 0.5)
        assert _get(queue, c.uuid).cost == 0.75
        with pytest.raises(ValueError):
            queue.add_cost(c.uuid, -1.0)

    def test_unknown_container_is_not_found(self, queue: ContainerQueue) -> None:
        uuid = "zzzzz-dz642-000000000000000"
        assert queue.get(uuid) is None
        for change in (
            lambda: queue.lock(uuid),
            lambda: queue.unlock(uuid),
            lambda: queue.set_running(uuid),
            lambda: queue.finish(uuid, 0),
            lambda: queue.retry(uuid, "x"),
            lambda: queue.cancel(uuid),
            lambda: queue.set_priority(uuid, 1),
            lambda: queue.append_log(uuid, b"x"),
            lambda: queue.read_log(uuid),
        ):
            with pytest.raises(ContainerNotFound):
                change()

    # ---- the scheduler's snapshot

    def test_forget_drops_only_final_or_held_containers(self, queue: ContainerQueue) -> None:
        queued = queue.submit(spec())
        held = queue.submit(spec(priority=0))
        done = queue.submit(spec())
        queue.cancel(done.uuid)
        for c in (queued, held, done):
            queue.forget(c.uuid)
        assert set(queue.entries()[0]) == {queued.uuid}
        assert _get(queue, done.uuid).state is X
        # A held container given a priority needs attention again.
        queue.set_priority(held.uuid, 3)
        assert queue.entries()[0][held.uuid].container.priority == 3

    def test_entries_follow_every_change(self, queue: ContainerQueue) -> None:
        c = queue.submit(spec())
        before, _ = queue.entries()
        queue.lock(c.uuid)
        after, _ = queue.entries()
        assert before[c.uuid].container.state is Q  # the caller's copy did not change
        assert after[c.uuid].container.state is L
        assert after[c.uuid].first_seen_at == before[c.uuid].first_seen_at

    # ---- notifications

    def test_listeners_see_each_change_they_are_told_about(self, queue: ContainerQueue) -> None:
        seen: list[ContainerState | None] = []
        uuid: list[str] = []

        def listener() -> None:
            if uuid:
                c = queue.get(uuid[0])
                seen.append(None if c is None else c.state)

        stop = queue.subscribe(listener)
        c = queue.submit(spec())
        uuid.append(c.uuid)
        queue.lock(c.uuid)
        queue.set_running(c.uuid)
        queue.finish(c.uuid, 0)
        stop()
        queue.submit(spec())
        assert seen == [L, R, C]

    def test_observers_get_old_and_new(self, queue: ContainerQueue) -> None:
        changes: list[tuple[ContainerState | None, ContainerState]] = []
        queue.observe(
            lambda old, new: changes.append((None if old is None else old.state, new.state))
        )
        c = queue.submit(spec())
        queue.lock(c.uuid)
        queue.cancel(c.uuid)
        queue.cancel(c.uuid)  # no change, no observation
        if changes:  # observing is optional for a queue that cannot report changes
            assert changes == [(None, Q), (Q, L), (L, X)]

    # ---- what runners report while containers run

    def test_the_pull_policy_is_stored_and_the_pull_time_recorded(
        self, opened: _Opened, queue: ContainerQueue
    ) -> None:
        c = queue.submit(replace(spec(), pull_policy="always"))
        assert _get(queue, c.uuid).spec.pull_policy == "always"
        queue.lock(c.uuid)
        queue.set_running(c.uuid, "i-1", "small")
        queue.set_status(c.uuid, "image_pull", "pulled in 2.5s")
        assert _get(queue, c.uuid).status("image_pull") == "pulled in 2.5s"
        with pytest.raises(ValueError):
            queue.set_status(c.uuid, "error", "not through here")
        done = queue.finish(c.uuid, 0)
        with pytest.raises(InvalidTransition):
            queue.set_status(c.uuid, "image_pull", "later")
        if self.durable:
            queue = self._reopen(opened, queue)
            assert _get(queue, c.uuid) == done
            assert done.spec.pull_policy == "always"

    # ---- attempts

    def test_every_attempt_is_recorded_with_its_outcome(
        self, opened: _Opened, queue: ContainerQueue, rt: VirtualRuntime
    ) -> None:
        """A container that ran twice says so, and why: each dispatch is one attempt, with
        its instance, type, times, outcome, reason, exit code and cost, kept across a reopen."""
        c = queue.submit(spec())
        queue.lock(c.uuid)
        queue.unlock(c.uuid)  # dispatched, never started
        queue.lock(c.uuid)
        t1 = rt.now()
        queue.set_running(c.uuid, "i-1", "small")
        queue.add_cost(c.uuid, 0.5)
        rt.advance(10)
        queue.retry(c.uuid, "instance i-1 disappeared")
        queue.lock(c.uuid)
        t2 = rt.now()
        queue.set_running(c.uuid, "i-2", "big")
        running = _get(queue, c.uuid).attempt_history[-1]
        assert (running.number, running.outcome, running.ended_at) == (3, "running", None)
        queue.add_cost(c.uuid, 0.25)
        rt.advance(5)
        queue.finish(c.uuid, 7)
        history = _get(queue, c.uuid).attempt_history
        assert [(a.number, a.outcome, a.instance_id, a.instance_type) for a in history] == [
            (1, "unlocked", "", ""),
            (2, "retried", "i-1", "small"),
            (3, "complete", "i-2", "big"),
        ]
        assert history[0].started_at is None
        assert (history[1].started_at, history[1].ended_at) == (t1, t1 + 10)
        assert history[1].reason == "instance i-1 disappeared" and history[1].exit_code is None
        assert (history[1].cost, history[2].cost) == (0.5, 0.25)
        assert (history[2].started_at, history[2].ended_at, history[2].exit_code) == (t2, t2 + 5, 7)
        if self.durable:
            queue = self._reopen(opened, queue)
            assert _get(queue, c.uuid).attempt_history == history

    def test_a_retry_past_the_cap_ends_the_attempt_once(self, queue: ContainerQueue) -> None:
        c = queue.submit(spec())
        for _ in range(3):  # QueueSettings.max_dispatch_attempts
            queue.lock(c.uuid)
            queue.retry(c.uuid, "instance lost")
        got = _get(queue, c.uuid)
        assert got.state is X
        assert [a.outcome for a in got.attempt_history] == ["retried"] * 3
        assert all(a.reason == "instance lost" for a in got.attempt_history)

    def test_a_cancel_ends_the_running_attempt(self, queue: ContainerQueue) -> None:
        c = queue.submit(spec())
        queue.cancel(queue.submit(spec()).uuid)  # never dispatched: no attempt
        queue.lock(c.uuid)
        queue.set_running(c.uuid, "i-1", "small")
        queue.cancel(c.uuid, "by the user")
        (attempt,) = _get(queue, c.uuid).attempt_history
        assert (attempt.outcome, attempt.reason) == ("cancelled", "by the user")
        assert attempt.ended_at is not None
        assert all(not x.attempt_history for x in queue.list(states=[X]) if x.uuid != c.uuid)

    # ---- logs, listing, counts

    def test_logs_append_and_read_by_byte_offsets(self, queue: ContainerQueue) -> None:
        c = queue.submit(spec())
        assert queue.read_log(c.uuid) == b""
        queue.append_log(c.uuid, b"hello ")
        queue.append_log(c.uuid, b"")
        queue.append_log(c.uuid, b"world\n")
        assert queue.read_log(c.uuid) == b"hello world\n"
        assert queue.read_log(c.uuid, 3, 5) == b"lo wo"
        assert queue.read_log(c.uuid, 6) == b"world\n"
        assert queue.read_log(c.uuid, 100) == b""
        assert queue.read_log(c.uuid, 2, 0) == b""
        with pytest.raises(ValueError):
            queue.read_log(c.uuid, -1)

    def test_logs_grow_while_running_and_after_a_cancel(self, queue: ContainerQueue) -> None:
        """Live logs arrive piece by piece, and a cancelled container's last lines come after
        its cancellation: both are appended, and neither is a change of the record."""
        c = queue.submit(spec())
        queue.lock(c.uuid)
        running = queue.set_running(c.uuid, "i-1", "small")
        queue.append_log(c.uuid, b"stdout one\n")
        assert queue.read_log(c.uuid) == b"stdout one\n"
        cancelled = queue.cancel(c.uuid, "stop")
        queue.append_log(c.uuid, b"stdout two\n")
        assert queue.read_log(c.uuid) == b"stdout one\nstdout two\n"
        assert queue.read_log(c.uuid, len(b"stdout one\n")) == b"stdout two\n"
        assert queue.get(c.uuid) == cancelled and running.state is R

    def test_list_pages_by_uuid_and_filters_states(self, queue: ContainerQueue) -> None:
        made = [queue.submit(spec()) for _ in range(5)]
        queue.cancel(made[0].uuid)
        uuids = sorted(c.uuid for c in made)
        assert [c.uuid for c in queue.list(limit=2)] == uuids[:2]
        assert [c.uuid for c in queue.list(limit=10, after=uuids[1])] == uuids[2:]
        assert [c.uuid for c in queue.list(states=[X])] == [made[0].uuid]
        assert queue.list(states=[]) == []
        counts = queue.counts()
        assert (counts[Q], counts[X], counts[L]) == (4, 1, 0)

    def test_newest_lists_newest_first_with_keyset_paging(
        self, queue: ContainerQueue, rt: VirtualRuntime
    ) -> None:
        made = []
        for i in range(5):
            made.append(queue.submit(spec()))
            if i != 2:  # two share a creation time: the uuid breaks the tie, descending
                rt.advance(10)
        order = sorted(made, key=lambda c: (c.created_at, c.uuid), reverse=True)
        uuids = [c.uuid for c in order]
        assert [c.uuid for c in queue.newest()] == uuids
        first = queue.newest(limit=2)
        assert [c.uuid for c in first] == uuids[:2]
        # A container submitted between two pages does not shift the next page.
        rt.advance(10)
        fresh = queue.submit(spec())
        page = queue.newest(limit=2, after=first[-1].uuid)
        assert [c.uuid for c in page] == uuids[2:4]
        assert [c.uuid for c in queue.newest(limit=10, after=page[-1].uuid)] == uuids[4:]
        assert queue.newest(limit=1)[0].uuid == fresh.uuid
        assert queue.newest(limit=0) == []
        with pytest.raises(ContainerNotFound):
            queue.newest(after="zzzzz-dz642-000000000000000")

    def test_newest_filters_by_state_and_time(
        self, queue: ContainerQueue, rt: VirtualRuntime
    ) -> None:
        old = queue.submit(spec())
        rt.advance(100)
        since = rt.now()
        mid = queue.submit(spec())
        rt.advance(1)
        new = queue.submit(spec())
        queue.cancel(mid.uuid, "stop")
        assert [c.uuid for c in queue.newest(ListFilter(since=since))] == [new.uuid, mid.uuid]
        assert [c.uuid for c in queue.newest(ListFilter(states=(Q,)))] == [new.uuid, old.uuid]
        both = ListFilter(states=(X,), since=since)
        assert [c.uuid for c in queue.newest(both)] == [mid.uuid]
        assert queue.newest(ListFilter(states=())) == []
        assert queue.newest(ListFilter(array_id="zzzzz-a88ay-000000000000000")) == []

    def test_in_line_lists_the_head_of_the_queue_in_queue_order(
        self, queue: ContainerQueue, rt: VirtualRuntime
    ) -> None:
        made = []
        for priority in (1, 5, 1, 5, 0, 3):
            made.append(queue.submit(spec(priority=priority)))
            rt.advance(1)
        low, high, low2, high2, held, mid = made
        queue.lock(low2.uuid)
        running = queue.submit(spec(priority=9))
        queue.lock(running.uuid)
        queue.set_running(running.uuid)
        order = [low2, high, high2, mid, low]
        line, total = queue.in_line()
        assert [c.uuid for c in line] == [c.uuid for c in order]
        assert total == 5
        first, total = queue.in_line(limit=2)
        assert [c.uuid for c in first] == [low2.uuid, high.uuid] and total == 5
        rest, left = queue.in_line(limit=2, after=first[-1].uuid)
        assert [c.uuid for c in rest] == [high2.uuid, mid.uuid] and left == 3
        # The cursor's container may have moved on: the page continues from where it stood.
        queue.cancel(high2.uuid)
        last, left = queue.in_line(limit=10, after=high2.uuid)
        assert [c.uuid for c in last] == [mid.uuid, low.uuid] and left == 2
        queued, total = queue.in_line([Q])
        assert [c.uuid for c in queued] == [high.uuid, mid.uuid, low.uuid] and total == 3
        assert held.uuid not in {c.uuid for c in queue.in_line(limit=100)[0]}
        with pytest.raises(ContainerNotFound):
            queue.in_line(after="zzzzz-dz642-000000000000000")
        with pytest.raises(ValueError):
            queue.in_line([R])

    # ---- dependencies (``after``)

    def test_after_holds_until_the_dependency_completes_with_0(
        self, queue: ContainerQueue, rt: VirtualRuntime
    ) -> None:
        first = queue.submit(spec())
        second = queue.submit(spec())
        held = queue.submit(replace(spec(), after=(first.uuid, second.uuid)))
        assert held.state is Q
        assert held.status("waiting_for").split() == [first.uuid, second.uuid]
        with pytest.raises(InvalidTransition, match="waits for"):
            queue.lock(held.uuid)
        self._complete(queue, first.uuid, 0)
        assert _get(queue, held.uuid).status("waiting_for") == second.uuid
        with pytest.raises(InvalidTransition):
            queue.lock(held.uuid)
        self._complete(queue, second.uuid, 0)
        released = _get(queue, held.uuid)
        assert released.state is Q and released.status("waiting_for") == ""
        assert queue.entries()[0][held.uuid].container == released
        assert queue.lock(held.uuid).state is L

    def test_after_a_failure_cancels_with_the_reason_down_the_chain(
        self, queue: ContainerQueue
    ) -> None:
        first = queue.submit(spec())
        middle = queue.submit(replace(spec(), after=(first.uuid,)))
        last = queue.submit(replace(spec(), after=(middle.uuid,)))
        other = queue.submit(spec())
        self._complete(queue, first.uuid, 3)
        middle = _get(queue, middle.uuid)
        assert middle.state is X
        assert middle.status("error") == f"dependency {first.uuid} failed with exit code 3"
        assert middle.status("waiting_for") == ""
        last = _get(queue, last.uuid)
        assert last.state is X
        assert last.status("error").startswith(f"dependency {middle.uuid} was cancelled")
        assert _get(queue, other.uuid).state is Q
        stopped = queue.submit(spec())
        waiter = queue.submit(replace(spec(), after=(stopped.uuid,)))
        queue.cancel(stopped.uuid, "operator said no")
        assert _get(queue, waiter.uuid).status("error") == (
            f"dependency {stopped.uuid} was cancelled (operator said no)"
        )

    def test_after_finished_or_unknown_containers_at_submission(
        self, queue: ContainerQueue
    ) -> None:
        ok = queue.submit(spec())
        self._complete(queue, ok.uuid, 0)
        failed = queue.submit(spec())
        self._complete(queue, failed.uuid, 1)
        free = queue.submit(replace(spec(), after=(ok.uuid,)))
        assert free.state is Q and free.status("waiting_for") == ""
        doomed = queue.submit(replace(spec(), after=(ok.uuid, failed.uuid)))
        assert doomed.state is X and f"dependency {failed.uuid} failed" in doomed.status("error")
        assert doomed.uuid not in queue.entries()[0]
        unknown = "zzzzz-dz642-000000000000000"
        stored = len(queue.list())
        with pytest.raises(ValueError, match=f"after: no container {unknown}"):
            queue.submit(replace(spec(), after=(unknown,)))
        with pytest.raises(ValueError, match=f"item 1: after: no container {unknown}"):
            queue.submit_many([spec(), replace(spec(), after=(unknown,))])
        with pytest.raises(ValueError, match="not a container uuid"):
            queue.submit(replace(spec(), after=("; rm -rf /",)))
        assert len(queue.list()) == stored

    def test_a_batch_item_waits_for_another_item_by_name(self, queue: ContainerQueue) -> None:
        first = queue.submit(spec())
        items = [
            replace(spec(), name="report", after=("align", "call")),
            replace(spec(), name="align"),
            replace(spec(), name="call", after=("align", first.uuid)),
            replace(spec(), name="align-2"),
        ]
        report, align, call, _ = queue.submit_many(items)
        assert align.state is Q and align.status("waiting_for") == ""
        assert call.spec.after == (align.uuid, first.uuid)
        assert call.status("waiting_for").split() == [align.uuid, first.uuid]
        assert report.spec.after == (align.uuid, call.uuid)
        self._complete(queue, align.uuid, 0)
        self._complete(queue, first.uuid, 0)
        assert _get(queue, call.uuid).status("waiting_for") == ""
        assert _get(queue, report.uuid).status("waiting_for") == call.uuid
        self._complete(queue, call.uuid, 2)
        failed = _get(queue, report.uuid)
        assert failed.state is X
        assert failed.status("error") == f"dependency {call.uuid} failed with exit code 2"

    def test_a_batch_item_waiting_for_an_unsatisfiable_item_is_cancelled(
        self, queue: ContainerQueue
    ) -> None:
        waiter, huge = queue.submit_many(
            [replace(spec(), after=("huge",)), replace(spec(ram=128 * GiB), name="huge")]
        )
        assert huge.state is X
        assert waiter.state is X
        assert waiter.status("error").startswith(f"dependency {huge.uuid} was cancelled")

    def test_batch_names_that_do_not_resolve_are_refused_naming_the_item(
        self, queue: ContainerQueue
    ) -> None:
        named = [replace(spec(), name=n) for n in ("a", "b", "c")]
        cases = [
            ([*named, replace(spec(), after=("d",))], 3, "'d' is not a container uuid nor"),
            ([*named, replace(spec(), name="a"), replace(spec(), after=("a",))], 4, "several"),
            (
                [
                    replace(named[0], after=("c",)),
                    replace(named[1], after=("a",)),
                    replace(named[2], after=("b",)),
                ],
                0,
                "a cycle: 'a' -> 'c' -> 'b' -> 'a'",
            ),
            ([*named[:2], replace(named[2], after=("c",))], 2, "a cycle: 'c' -> 'c'"),
        ]
        for items, index, message in cases:
            with pytest.raises(ValueError, match=re.escape(message)) as refused:
                queue.submit_many(items)
            assert (
                getattr(refused.value, "index", None),
                getattr(refused.value, "field", None),
            ) == (
                index,
                "after",
            )
            assert str(refused.value).startswith(f"item {index}: after: ")
        assert queue.list() == []
        # Names that nothing refers to may repeat, as before.
        assert len(queue.submit_many([named[0], named[0]])) == 2

    def test_an_array_may_wait_and_be_waited_for(self, queue: ContainerQueue) -> None:
        first = queue.submit(spec())
        members = queue.submit_array(replace(spec(), after=(first.uuid,)), 3)
        assert all(c.status("waiting_for") == first.uuid for c in members)
        self._complete(queue, first.uuid, 0)
        assert all(_get(queue, c.uuid).status("waiting_for") == "" for c in members)

    def test_held_containers_stay_held_across_a_reopen(
        self, opened: _Opened, queue: ContainerQueue
    ) -> None:
        first = queue.submit(spec())
        held = queue.submit(replace(spec(), after=(first.uuid,)))
        queue = self._reopen(opened, queue)
        assert _get(queue, held.uuid).status("waiting_for") == first.uuid
        self._complete(queue, first.uuid, 0)
        assert _get(queue, held.uuid).status("waiting_for") == ""

    @staticmethod
    def _complete(queue: ContainerQueue, uuid: str, exit_code: int) -> None:
        queue.lock(uuid)
        queue.set_running(uuid, "i-1", "small")
        queue.finish(uuid, exit_code)

    # ---- durability

    def test_reopen_keeps_records_logs_and_the_snapshot(
        self, opened: _Opened, queue: ContainerQueue
    ) -> None:
        queued = queue.submit(spec())
        running = queue.submit(spec())
        done = queue.submit(spec())
        queue.lock(running.uuid)
        running = queue.set_running(running.uuid, "i-9", "small")
        queue.append_log(running.uuid, b"line\n")
        done = queue.cancel(done.uuid, "stop")
        queue = self._reopen(opened, queue)
        assert queue.get(running.uuid) == running
        assert queue.get(done.uuid) == done
        assert set(queue.entries()[0]) == {queued.uuid, running.uuid}
        assert queue.read_log(running.uuid) == b"line\n"
        assert queue.lock(queued.uuid).lock_count == 1

    def test_reopen_keeps_equal_priorities_in_the_order_of_their_age(
        self, opened: _Opened, queue: ContainerQueue, rt: VirtualRuntime
    ) -> None:
        """After a restart the snapshot's first-seen times are the containers' creation times,
        so the scheduler still serves equal priorities oldest first (not in uuid order)."""
        uuids = []
        for _ in range(8):
            uuids.append(queue.submit(spec()).uuid)
            rt.advance(1.0)
        rt.advance(100.0)
        queue = self._reopen(opened, queue)
        entries = queue.entries()[0]
        by_age = sorted(uuids, key=lambda u: (entries[u].first_seen_at, u))
        assert by_age == uuids
        assert entries[uuids[0]].first_seen_at < entries[uuids[-1]].first_seen_at

    def test_reopen_cancels_what_no_longer_fits(
        self, opened: _Opened, queue: ContainerQueue
    ) -> None:
        big = queue.submit(spec(ram=32 * GiB))
        running = queue.submit(spec(ram=32 * GiB))
        queue.lock(running.uuid)
        queue.set_running(running.uuid)
        queue = self._reopen(opened, queue, instance_types={"small": conformance_types()["small"]})
        assert _get(queue, big.uuid).state is X
        assert _get(queue, running.uuid).state is R
        assert queue.entries()[0][running.uuid].instance_types == []

    # ---- the spend ledger

    #: 2026-03-15 12:00 UTC: a moment in the middle of a month, for the ledger checks.
    _MID_MARCH = 1_773_576_000.0

    def test_the_ledger_records_totals_and_lists_half_open_ranges(
        self, queue: ContainerQueue
    ) -> None:
        ledger = queue.ledger
        assert isinstance(ledger, Ledger)
        assert ledger.entries(0.0, 1e12) == [] and ledger.total(0.0, 1e12) == 0.0
        later = SpendEntry(200.0, 2.0, "i-2", "large", 150.0)
        earlier = SpendEntry(100.0, 1.0, "i-1", "small", 50.0)
        ledger.record(later)
        ledger.record(earlier)  # out of order: listed by time all the same
        ledger.record_many([SpendEntry(300.0, 0.5, "i-1", "small", 50.0)], [])
        assert ledger.entries(0.0, 1000.0) == [
            earlier,
            later,
            SpendEntry(300.0, 0.5, "i-1", "small", 50.0),
        ]
        assert ledger.total(100.0, 200.0) == 1.0  # start inclusive, end exclusive
        assert ledger.total(100.0, 200.000001) == 3.0
        assert ledger.entries(300.0, 300.0) == []
        assert ledger.total(-float("inf"), float("inf")) == 3.5

    def test_the_ledger_lists_container_costs_with_their_labels(
        self, queue: ContainerQueue
    ) -> None:
        ledger = queue.ledger
        a = ContainerCost(10.0, "zzzzz-dz642-a", "align", "small", 0.25, 0, (("project", "x"),))
        b = ContainerCost(11.0, "zzzzz-dz642-b", "", "large", 0.5, 1)
        ledger.record_container(b)
        ledger.record_container(a)
        ledger.record_many([], [ContainerCost(12.0, "zzzzz-dz642-c", "n", "small", 1.0, 0)])
        assert ledger.containers(0.0, 100.0)[:2] == [a, b]
        assert [c.uuid for c in ledger.containers(11.0, 12.0)] == ["zzzzz-dz642-b"]
        assert ledger.containers(12.0, 12.0) == []

    def test_the_ledger_survives_a_reopen(self, opened: _Opened, queue: ContainerQueue) -> None:
        entry = SpendEntry(100.0, 1.25, "i-1", "small", 50.0)
        cost = ContainerCost(120.0, "zzzzz-dz642-a", "n", "small", 0.5, 0, (("k", "v"),))
        queue.ledger.record(entry)
        queue.ledger.record_container(cost)
        queue = self._reopen(opened, queue)
        assert queue.ledger.entries(0.0, 1000.0) == [entry]
        assert queue.ledger.containers(0.0, 1000.0) == [cost]

    def test_compaction_folds_old_spend_per_month_and_type_and_drops_old_costs(
        self, queue: ContainerQueue
    ) -> None:
        ledger = queue.ledger
        now = self._MID_MARCH
        cutoff = compaction_cutoff(now)
        month, month_end = period_bounds(cutoff - 1, "month")  # the newest month folded
        assert period_bounds(cutoff, "month")[0] == cutoff  # whole months are kept
        assert cutoff < now - KEEP_MONTHS * 28 * 86400
        old = [
            SpendEntry(month + 10, 1.0, "i-1", "small", month),
            SpendEntry(month + 20, 2.0, "i-2", "small", month),
            SpendEntry(month + 30, 4.0, "i-3", "large", month),
        ]
        kept = SpendEntry(cutoff + 5, 8.0, "i-4", "small", cutoff)
        old_cost = ContainerCost(month + 40, "zzzzz-dz642-a", "n", "small", 0.5, 0)
        new_cost = ContainerCost(cutoff + 40, "zzzzz-dz642-b", "n", "small", 0.5, 0)
        ledger.record_many([*old, kept], [old_cost, new_cost])
        assert ledger.compact(now) == 2  # three entries became two, one cost dropped
        assert sorted(ledger.entries(0.0, cutoff), key=lambda e: e.instance_type) == [
            SpendEntry(month, 4.0, FOLDED, "large", month),
            SpendEntry(month, 3.0, FOLDED, "small", month),
        ]
        assert ledger.total(month, month_end) == 7.0  # the month still totals right
        assert ledger.entries(cutoff, float("inf")) == [kept]
        assert ledger.containers(0.0, float("inf")) == [new_cost]
        assert ledger.compact(now) == 0  # nothing new to fold: nothing changes
        assert ledger.total(0.0, float("inf")) == 15.0

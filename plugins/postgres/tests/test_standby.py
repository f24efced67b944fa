"""The dispatch lock of a standby pair, on a real PostgreSQL: one holder at a time, the standby
takes over when the holder lets go or dies, and a holder that loses its connection is told at
once."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from herder_queue_postgres.backend import PostgresBackend, PostgresParameters
from herder_queue_postgres.leader import PostgresDispatchLock

from herder.engine.sizing import ConfigSizer
from herder.queue.backend import QueueContext
from herder.queue.base import ContainerQueue, QueueError
from herder.runtime import VirtualRuntime
from herder.testing.queue_conformance import conformance_types

LEASE = 1.0


@pytest.fixture
def locks() -> Iterator[list[PostgresDispatchLock]]:
    made: list[PostgresDispatchLock] = []
    yield made
    for lock in made:
        lock.release()


@pytest.fixture
def backend_for(
    pg_params: Callable[..., dict[str, Any]],
) -> Callable[..., tuple[PostgresBackend, PostgresParameters, QueueContext]]:
    def make(**extra: Any) -> tuple[PostgresBackend, PostgresParameters, QueueContext]:
        backend = PostgresBackend()
        params = backend.validate_parameters(pg_params(**extra))
        assert isinstance(params, PostgresParameters)
        context = QueueContext(runtime=VirtualRuntime(), sizer=ConfigSizer(conformance_types()))
        return backend, params, context

    return make


@pytest.fixture
def new_lock(
    backend_for: Callable[..., tuple[PostgresBackend, PostgresParameters, QueueContext]],
    locks: list[PostgresDispatchLock],
) -> Callable[[], PostgresDispatchLock]:
    def make() -> PostgresDispatchLock:
        backend, params, context = backend_for(standby=True, lease=LEASE)
        lock = backend.dispatch_lock(params, context)
        assert isinstance(lock, PostgresDispatchLock)
        locks.append(lock)
        return lock

    return make


def _wait_in_thread(
    lock: PostgresDispatchLock, stop: threading.Event, on_lost: Callable[[str], None]
) -> tuple[threading.Thread, threading.Event]:
    got = threading.Event()

    def run() -> None:
        if lock.acquire(stop, on_lost):
            got.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, got


def test_one_holder_and_the_standby_takes_over_on_release(
    new_lock: Callable[[], PostgresDispatchLock],
) -> None:
    stop = threading.Event()
    leader, standby = new_lock(), new_lock()
    assert leader.acquire(stop, lambda reason: None)
    thread, got = _wait_in_thread(standby, stop, lambda reason: None)
    assert not got.wait(3 * LEASE), "the standby took a lock that was held"
    leader.release()
    assert got.wait(10), "the standby did not take the released lock"
    thread.join(5)


def test_a_waiting_standby_stops_when_asked(new_lock: Callable[[], PostgresDispatchLock]) -> None:
    stop = threading.Event()
    leader, standby = new_lock(), new_lock()
    assert leader.acquire(stop, lambda reason: None)
    waiting = threading.Event()
    thread, got = _wait_in_thread(standby, waiting, lambda reason: None)
    waiting.set()
    thread.join(10)
    assert not thread.is_alive() and not got.is_set()


def test_a_holder_that_loses_its_connection_is_told_and_the_standby_takes_over(
    new_lock: Callable[[], PostgresDispatchLock], pg_cluster: Any
) -> None:
    stop = threading.Event()
    leader, standby = new_lock(), new_lock()
    lost = threading.Event()
    reasons: list[str] = []

    def on_lost(reason: str) -> None:
        reasons.append(reason)
        lost.set()

    assert leader.acquire(stop, on_lost)
    thread, got = _wait_in_thread(standby, stop, lambda reason: None)
    assert pg_cluster.terminate("herder-dispatch-lock") >= 1
    assert lost.wait(10), "the holder was not told that it lost the lock"
    assert "lost the dispatch lock" in reasons[0]
    assert got.wait(10), "the standby did not take over"
    thread.join(5)


def test_standby_queues_are_shared_and_the_lock_excludes_an_exclusive_queue(
    backend_for: Callable[..., tuple[PostgresBackend, PostgresParameters, QueueContext]],
    new_lock: Callable[[], PostgresDispatchLock],
) -> None:
    """Two standby herders open the queue side by side; the lock they contend for is the one
    an exclusive (no standby) queue holds, so the two kinds never both dispatch."""
    queues: list[ContainerQueue] = []
    try:
        for _ in range(2):
            backend, params, context = backend_for(standby=True, lease=LEASE)
            queues.append(backend.open(params, context))
        lock = new_lock()
        assert lock.acquire(threading.Event(), lambda reason: None)
        backend, params, context = backend_for()
        with pytest.raises(QueueError, match="in use by another herder"):
            backend.open(params, context)
    finally:
        for q in queues:
            q.close()


def test_the_standby_totals_the_spend_the_leader_booked(
    backend_for: Callable[..., tuple[PostgresBackend, PostgresParameters, QueueContext]],
    new_lock: Callable[[], PostgresDispatchLock],
) -> None:
    """Spend lives in the database: what the leader books, the standby (and `herder costs` on
    any host) totals, so a takeover neither forgets the period's spend nor overruns a budget."""
    from herder.spend import ContainerCost, SpendEntry

    queues: list[ContainerQueue] = []
    try:
        for _ in range(2):
            backend, params, context = backend_for(standby=True, lease=LEASE)
            queues.append(backend.open(params, context))
        leader, standby = queues
        lock = new_lock()
        assert lock.acquire(threading.Event(), lambda reason: None)
        leader.ledger.record(SpendEntry(1000.0, 1.5, "i-1", "small", 900.0))
        leader.ledger.record_container(ContainerCost(1010.0, "zzzzz-dz642-a", "n", "small", 0.2, 0))
        assert standby.ledger.total(0.0, 2000.0) == 1.5
        assert [c.uuid for c in standby.ledger.containers(0.0, 2000.0)] == ["zzzzz-dz642-a"]
        # The leader goes; the standby takes over and books on top of the leader's spend.
        leader.close()
        lock.release()
        standby.ledger.record(SpendEntry(1100.0, 0.5, "i-2", "small", 1050.0))
        assert standby.ledger.total(0.0, 2000.0) == 2.0
        # Read with no queue opened at all, as `herder costs` does on another host.
        offline = backend.read_ledger(params, "")
        assert offline.total(0.0, 2000.0) == 2.0
        assert [e.instance_id for e in offline.entries(0.0, 2000.0)] == ["i-1", "i-2"]
    finally:
        for q in queues:
            q.close()

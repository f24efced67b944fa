"""herder.dispatch.Updates and Throttle: the one-slot stream and the retry period."""

from __future__ import annotations

import threading

from herder.dispatch import CloseReason, Throttle, Updates
from herder.model import Container, ContainerSpec, ContainerState
from herder.runtime import VirtualRuntime


def record(priority: int, state: ContainerState = ContainerState.LOCKED) -> Container:
    return Container(
        uuid="zzzzz-dz642-aaaaaaaaaaaaaaa",
        state=state,
        priority=priority,
        spec=ContainerSpec(command=("true",)),
        created_at=0.0,
    )


def test_push_replaces_an_unread_record_and_never_blocks() -> None:
    u = Updates(record(1))
    for p in range(2, 1000):
        u.push(record(p))
    assert u.take() == record(999)
    assert u.take() is None
    assert u.dropped == 998


def test_close_delivers_the_final_record_then_ignores_pushes() -> None:
    u = Updates(record(1))
    u.take()
    u.close(CloseReason.FINAL, record(1, ContainerState.CANCELLED))
    u.push(record(5))
    assert u.closed and u.close_reason is CloseReason.FINAL
    taken = u.take()
    assert taken is not None and taken.state is ContainerState.CANCELLED
    u.close(CloseReason.VANISHED)  # idempotent
    assert u.close_reason is CloseReason.FINAL


def test_listen_fires_at_once_for_a_pending_record() -> None:
    u = Updates(record(1))
    calls: list[int] = []
    u.listen(lambda: calls.append(1))
    assert calls == [1]
    u.take()
    u.push(record(2))
    assert calls == [1, 1]


def test_wait_wakes_a_thread_consumer() -> None:
    u = Updates(record(1))
    u.take()
    got: list[Container | None] = []
    t = threading.Thread(target=lambda: got.append(u.wait(timeout=30)))
    t.start()
    u.push(record(2))
    t.join(timeout=30)
    assert got == [record(2)]
    u.close(CloseReason.SHUTDOWN)
    assert u.wait(timeout=30) is None  # closed: returns at once


def test_throttle_allows_one_attempt_per_hold_period() -> None:
    rt = VirtualRuntime()
    th = Throttle(rt, 10.0)
    assert th.check("a")
    assert not th.check("a")
    assert th.next_allowed("a") == rt.now() + 10.0
    rt.advance(10.0)
    assert th.check("a")
    rt.advance(5.0)
    th.failed("a")  # a failure restarts the period
    rt.advance(9.0)
    assert not th.check("a")
    rt.advance(1.0)
    assert th.check("a")
    assert Throttle(rt, 0.0).check("a") and Throttle(rt, 0.0).check("a")

import threading

import pytest

from herder.runtime import ThreadRuntime, VirtualRuntime


def test_virtual_runtime_runs_tasks_in_due_order_and_jumps_the_clock():
    rt = VirtualRuntime(start=100.0)
    seen: list[tuple[str, float]] = []
    rt.call_later(10, lambda: seen.append(("b", rt.now())))
    rt.call_later(5, lambda: seen.append(("a", rt.now())))
    rt.spawn(lambda: seen.append(("now", rt.now())))
    assert seen == []  # nothing runs until the owner drives the clock
    rt.run_until_idle()
    assert seen == [("now", 100.0)]
    rt.advance(20)
    assert seen == [("now", 100.0), ("a", 105.0), ("b", 110.0)]
    assert rt.now() == 120.0


def test_virtual_runtime_cancelled_timer_never_runs():
    rt = VirtualRuntime()
    hit = []
    handle = rt.call_later(1, lambda: hit.append(1))
    handle.cancel()
    rt.advance(5)
    assert hit == []


def test_virtual_runtime_strict_mode_raises_task_errors():
    rt = VirtualRuntime()
    rt.spawn(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        rt.run_until_idle()


def test_virtual_runtime_lenient_mode_logs_and_continues():
    rt = VirtualRuntime(strict=False)
    hit = []
    rt.spawn(lambda: 1 / 0)
    rt.spawn(lambda: hit.append(1))
    rt.run_until_idle()
    assert hit == [1]


def test_virtual_runtime_detects_runaway_loops():
    rt = VirtualRuntime()

    def again() -> None:
        rt.spawn(again)

    rt.spawn(again)
    with pytest.raises(RuntimeError, match="runaway"):
        rt.run_until_idle(max_tasks=100)


def test_trigger_coalesces_a_burst_into_one_run():
    rt = VirtualRuntime()
    runs = []
    trig = rt.trigger(lambda: runs.append(rt.now()))
    for _ in range(10):
        trig.fire()
    rt.run_until_idle()
    assert len(runs) == 1


def test_trigger_fired_while_running_runs_once_more():
    rt = VirtualRuntime()
    runs = []

    def fn() -> None:
        runs.append(len(runs))
        if len(runs) == 1:
            trig.fire()  # a change arrives while the function runs
            trig.fire()

    trig = rt.trigger(fn)
    trig.fire()
    rt.run_until_idle()
    assert runs == [0, 1]


def test_thread_runtime_runs_tasks_and_timers():
    rt = ThreadRuntime(max_workers=2)
    try:
        done = threading.Event()
        timer_done = threading.Event()
        rt.spawn(done.set)
        rt.call_later(0.01, timer_done.set)
        assert done.wait(5)
        assert timer_done.wait(5)
    finally:
        rt.shutdown()

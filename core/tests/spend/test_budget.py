"""cloud.budget: soft and hard spend limits per period, spend kept across restarts."""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_harness import Engine, sim_config
from prometheus_client import generate_latest

from herder.model import ContainerState, DrainCause, IdleBehavior
from herder.queue.sqlite import read_ledger
from herder.spend import (
    MemoryLedger,
    SpendEntry,
    SpendTracker,
    format_period_end,
    period_bounds,
)

# The virtual clock starts at 2023-11-14 22:13:20 UTC: the day ends 6400 s later.
DAY_LEFT = 6400.0
BIG = 4  # VCPUs: a container this big never shares the instance of a running one


def budget(**keys: object) -> dict[str, object]:
    return {"budget": {"period": "day", **keys}}


def test_period_bounds_and_their_end_in_words():
    t = 1_700_000_000.0
    assert period_bounds(t, "day") == (1_699_920_000.0, 1_700_006_400.0)
    assert period_bounds(t, "hour") == (1_699_999_200.0, 1_700_002_800.0)
    _start, end = period_bounds(t, "month")
    assert format_period_end(end, "month") == "2023-12-01 00:00 UTC"
    assert format_period_end(period_bounds(t, "day")[1], "day") == "00:00 UTC"
    assert format_period_end(period_bounds(t, "hour")[1], "hour") == "23:00 UTC"
    with pytest.raises(ValueError, match="unknown period"):
        period_bounds(t, "week")


def test_soft_limit_crossed_mid_period_stops_new_instances_until_the_period_ends():
    eng = Engine(sim_config(**budget(soft_limit=0.5)))
    first = eng.submit(3 * 3600, name="first")
    eng.run_for(600)
    early = eng.submit(60, vcpus=BIG, name="early")  # under the limit: gets its own instance
    eng.run_for(60)
    assert eng.container(early).state == ContainerState.RUNNING
    eng.run_for(40 * 60)  # one instance at 1.0/h: 0.5 is passed by now
    late = eng.submit(60, vcpus=BIG, name="late")
    eng.run_for(30)
    created = eng.stats.created
    status = eng.status(late)
    assert status.startswith(
        "Waiting in queue at position 1.  Cloud budget reached: spend this day "
    )
    assert status.endswith(" of 0.50; no new instances until 00:00 UTC.")
    spent = float(status.split("spend this day ")[1].split(" of")[0])
    assert 0.5 <= spent < 1.0
    assert eng.container(late).state == ContainerState.QUEUED  # not even locked
    # Running work is not disturbed, and nothing is created while over the soft limit.
    eng.run_until(DAY_LEFT - 60)
    assert eng.stats.created == created
    assert eng.container(first).state == ContainerState.RUNNING
    # The day ends: spend starts from 0 again and the container gets its instance.
    eng.run_until_done([late])
    assert eng.elapsed >= DAY_LEFT
    assert eng.container(late).exit_code == 0
    metrics = generate_latest(eng.disp.registry).decode()
    assert 'herder_spend_limit{limit="soft"} 0.5' in metrics
    assert 'herder_spend_limit_reached{limit="soft"} 0.0' in metrics
    assert 'herder_spend_period{period="day"}' in metrics
    eng.stop()


def test_hard_limit_drains_every_instance_and_lets_containers_finish():
    eng = Engine(sim_config(**budget(hard_limit=0.5)))
    running = eng.submit(3600, name="running")
    eng.run_for(35 * 60)
    instance = eng.instance_of(running)
    (view,) = [v for v in eng.instances() if v.instance == instance]
    assert view.idle_behavior == IdleBehavior.DRAIN
    assert view.drain_cause == DrainCause.BUDGET
    assert view.reason.startswith("cloud budget hard limit: spend this day 0.5")
    metrics = generate_latest(eng.disp.registry).decode()
    assert 'herder_spend_limit_reached{limit="hard"} 1.0' in metrics
    waiting = eng.submit(60, name="waiting")
    eng.run_for(30)
    assert "Cloud budget reached" in eng.status(waiting)
    eng.run_until_done([running], limit=3600)
    assert eng.container(running).exit_code == 0  # finished, not stopped
    eng.run_for(60)
    assert eng.stats.alive == 0  # shut down once empty
    eng.run_until_done([waiting])  # the next day
    assert eng.elapsed >= DAY_LEFT
    eng.stop()


def test_hard_limit_with_stop_cancels_running_containers_saying_why():
    eng = Engine(sim_config(**budget(soft_limit=0.2, hard_limit=0.5, on_hard_limit="stop")))
    running = eng.submit(3600, name="running")
    eng.run_for(35 * 60)
    ctr = eng.container(running)
    assert ctr.state == ContainerState.CANCELLED
    assert "stopped by the cloud budget's hard limit (spend this day 0.5" in ctr.status("error")
    assert "cloud.budget.on_hard_limit: stop" in ctr.status("error")
    eng.run_for(120)
    assert eng.stats.alive == 0
    eng.stop()


def test_budget_drains_are_undone_when_the_period_rolls_over():
    eng = Engine(sim_config(**budget(hard_limit=0.5)))
    held = eng.submit(3 * 3600, name="long")
    eng.run_for(35 * 60)
    instance = eng.instance_of(held)
    other = eng.disp.pool.instances()
    assert [v.drain_cause for v in other if v.instance == instance] == [DrainCause.BUDGET]
    eng.run_until(DAY_LEFT + 30)
    (view,) = [v for v in eng.instances() if v.instance == instance]
    assert view.idle_behavior == IdleBehavior.RUN and view.drain_cause == DrainCause.NONE
    eng.stop()


def test_spend_survives_a_restart_and_a_changed_budget_applies(tmp_path: Path):
    queue = str(tmp_path / "herder.db")
    config = sim_config(**budget(soft_limit=5.0), queue_path=queue)
    eng = Engine(config)
    running = eng.submit(3 * 3600, name="long")
    eng.run_for(30 * 60)
    eng.stop(keep_runtime=True)
    booked = read_ledger(queue)  # the queue file keeps the spend
    start, end = period_bounds(eng.runtime.now(), "day")
    assert 0.45 < booked.total(start, end) <= 0.5
    assert not (tmp_path / "herder-spend.jsonl").exists()

    # Restarted with a lower limit: the period's spend is remembered, so it applies at once,
    # and the adopted instance is billed from its start, not a second time.
    lower = sim_config(**budget(soft_limit=0.6), queue_path=queue)
    again = Engine(lower, driver=eng.driver, runtime=eng.runtime, seed=2)
    again.run_for(20 * 60)
    assert again.container(running).state == ContainerState.RUNNING
    state = again.disp.budget.last
    assert state is not None and state.soft_reached
    # The cloud's own bill for the one instance, and herder's, agree.
    assert state.spent == pytest.approx(again.stats.cost(), rel=0.02)
    late = again.submit(60, vcpus=BIG)
    again.run_for(10)
    assert "Cloud budget reached: spend this day 0.8" in again.status(late)
    again.stop()


def test_tracker_books_increments_when_they_begin():
    from herder.model import Billing, IdleBehavior, InstanceType, InstanceView, WorkerState

    hourly = InstanceType("h", "h", 1, 1, price=2.0, billing=Billing(3600, 3600))
    ledger = MemoryLedger()
    tracker = SpendTracker(ledger, {"h": hourly}, 0.0)
    view = InstanceView(
        "i-1", "", 2.0, "h", "h", "", 0.0, [], WorkerState.IDLE, IdleBehavior.RUN, appeared=100.0
    )
    tracker.update(100.0, [view])
    assert ledger.total(0, 10_000) == 2.0  # the first hour, charged as it begins
    tracker.update(3600.0, [view])
    assert ledger.total(0, 10_000) == 2.0
    tracker.update(3701.0, [view])
    assert ledger.total(0, 10_000) == 4.0
    tracker.update(3800.0, [])  # gone: nothing more
    assert [e.amount for e in ledger.entries(0, 10_000)] == [2.0, 2.0]
    assert all(isinstance(e, SpendEntry) for e in ledger.entries(0, 10_000))


def test_budget_keys_are_checked_with_their_key_path():
    from herder.config import config_from_data

    _, problems = config_from_data(
        {
            "cloud": {
                "budget": {
                    "period": "week",
                    "soft_limit": 5,
                    "hard_limit": 2,
                    "on_hard_limit": "kill",
                }
            }
        }
    )
    assert [(p.key, p.message) for p in problems] == [
        ("cloud.budget.period", "invalid budget period 'week': expected hour, day or month"),
        ("cloud.budget.hard_limit", "must not be below soft_limit (5), got 2"),
        ("cloud.budget.on_hard_limit", "invalid action 'kill': expected finish or stop"),
    ]


def test_a_budget_drain_is_still_undone_after_a_restart(tmp_path: Path):
    keys = budget(hard_limit=0.5)
    config = sim_config(**keys, queue_path=str(tmp_path / "herder.db"))
    eng = Engine(config)
    held = eng.submit(3 * 3600, name="long")
    eng.run_for(35 * 60)
    instance = eng.instance_of(held)
    eng.stop(keep_runtime=True)
    assert eng.driver.cloud is not None
    (vm,) = [v for v in eng.driver.cloud.all_vms() if v.id == instance]
    assert vm.tags["HerderDrainCause"] == "budget"

    again = Engine(config, driver=eng.driver, runtime=eng.runtime, seed=2)
    again.run_for(60)
    (view,) = [v for v in again.instances() if v.instance == instance]
    assert view.idle_behavior == IdleBehavior.DRAIN and view.drain_cause == DrainCause.BUDGET
    again.run_for(eng.start + DAY_LEFT + 30 - again.runtime.now())  # the next day begins
    (view,) = [v for v in again.instances() if v.instance == instance]
    assert view.idle_behavior == IdleBehavior.RUN
    assert again.container(held).state == ContainerState.RUNNING
    again.stop()

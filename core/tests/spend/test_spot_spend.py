"""Spend at the price in force: a spot price that moves reprices only the time after the move."""

from __future__ import annotations

import math

import pytest
from engine_harness import Engine, sim_config

from herder.model import (
    PER_SECOND,
    Billing,
    IdleBehavior,
    InstanceType,
    InstanceView,
    WorkerState,
)
from herder.spend import MemoryLedger, SpendTracker

HOURLY = Billing(3600, 3600)


def tracker(billing: Billing = PER_SECOND) -> SpendTracker:
    it = InstanceType(
        "spot", "p.spot", vcpus=2, ram=1, price=1.0, preemptible=True, billing=billing
    )
    return SpendTracker(MemoryLedger(), {"spot": it}, now=0.0)


def view(market: float) -> InstanceView:
    return InstanceView(
        instance="i-1",
        address="",
        price=1.0,
        instance_type="spot",
        provider_instance_type="p.spot",
        last_container_uuid="",
        last_busy=0.0,
        running_container_uuids=[],
        worker_state=WorkerState.RUNNING,
        idle_behavior=IdleBehavior.RUN,
        appeared=0.0,
        market_price=market,
    )


def total(t: SpendTracker) -> float:
    return t.spent(0.0, math.inf, 0.0)


def test_a_moving_spot_price_reprices_only_the_time_after_the_move():
    t = tracker()
    t.update(0.0, [view(0.5)])
    t.update(3600.0, [view(0.5)])
    t.update(3600.0, [view(2.0)])  # the market moves after one hour at 0.5
    t.update(7200.0, [view(2.0)])
    t.update(7300.0, [])  # gone: its books close at the last time it was seen
    assert total(t) == pytest.approx(0.5 + 2.0)


def test_without_a_market_price_spend_counts_at_the_types_price():
    t = tracker()
    t.update(0.0, [view(0.0)])
    t.update(1800.0, [view(0.0)])
    t.update(1900.0, [])
    assert total(t) == pytest.approx(0.5)


def test_an_hour_already_billed_keeps_its_price_when_the_market_moves_within_it():
    t = tracker(HOURLY)
    t.update(0.0, [view(0.5)])  # the first hour is billed at once, at 0.5
    t.update(1800.0, [view(3.0)])  # moves mid-hour: the next hour costs 3.0
    t.update(5400.0, [view(3.0)])
    t.update(5500.0, [])
    assert total(t) == pytest.approx(0.5 + 3.0)


def test_instances_report_the_price_in_force_from_their_price_history():
    eng = Engine(sim_config(driver_parameters={"price_history": True}))
    eng.submit(600)
    eng.run_for(30)
    (v,) = [v for v in eng.instances() if v.instance]
    assert v.market_price == 1.0 and v.price_now == 1.0
    eng.stop()

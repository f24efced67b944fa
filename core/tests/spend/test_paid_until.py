"""An instance billed in increments says until when its current increment is paid."""

from __future__ import annotations

import pytest
from engine_harness import Engine, sim_config

from herder.model import WorkerState


def test_an_idle_instance_says_until_when_its_hour_is_paid():
    hourly = {"billing_increment": 3600, "billing_minimum": 3600}
    eng = Engine(sim_config(driver_parameters=hourly))
    ctr = eng.submit(60)
    eng.run_for(600)
    (view,) = eng.instances()
    assert view.instance == eng.instance_of(ctr)
    assert view.worker_state == WorkerState.IDLE  # kept: its hour is paid
    assert view.paid_until == pytest.approx(view.appeared + 3600)
    eng.stop()


def test_per_second_instances_say_nothing():
    eng = Engine(sim_config())
    eng.submit(600)
    eng.run_for(60)
    (view,) = eng.instances()
    assert view.paid_until == 0.0
    eng.stop()

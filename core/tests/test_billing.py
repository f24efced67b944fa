"""Billing-aware idle shutdown (issue 20): the engine on the sim driver, on the virtual clock."""

from __future__ import annotations

from typing import Any

import pytest

from herder.config import Config
from herder.model import Billing, ContainerSpec, RuntimeConstraints
from herder.tools.simulate import PlannedContainer, run_simulation


def test_billed_seconds_round_up_to_the_increment_and_the_minimum():
    hourly = Billing(3600, 3600)
    assert hourly.billed_seconds(1) == 3600
    assert hourly.billed_seconds(3600) == 3600
    assert hourly.billed_seconds(3601) == 7200
    per_second = Billing(1, 60)
    assert per_second.billed_seconds(10) == 60
    assert per_second.billed_seconds(90.2) == 91
    assert Billing().billed_seconds(0) == 0


def test_paid_until_is_the_end_of_the_increment_in_use():
    hourly = Billing(3600, 3600)
    assert hourly.paid_until(0) == 3600
    assert hourly.paid_until(1800) == 3600
    assert hourly.paid_until(3600) == 7200  # a new hour has begun
    assert Billing(1, 60).paid_until(10) == 60
    assert Billing(1, 60).paid_until(100.5) == 101


def sim_config(*, cloud_billing: float, type_billing: str | None = None, **cloud: Any) -> Config:
    """The sim cloud billing in ``cloud_billing`` second steps; the engine is told
    ``type_billing`` by the type's config key (None: it asks the driver)."""
    small: dict[str, Any] = {"vcpus": 2, "ram": "4GiB", "price": 1.0}
    if type_billing is not None:
        small["billing_increment"] = type_billing
    return Config.model_validate(
        {
            "cluster_id": "bill1",
            "cloud": {
                "driver": "sim",
                "driver_parameters": {
                    "seed": 3,
                    "boot_delay": 5,
                    "billing_increment": cloud_billing,
                    "billing_minimum": cloud_billing,
                },
                "poll_interval": "1s",
                "probe_interval": "1s",
                "max_probes_per_second": 100,
                "sync_interval": "5s",
                "timeout_idle": "10s",
                "timeout_shutdown": "5s",
                "max_cloud_ops_per_second": 0,
                "max_concurrent_instance_create_ops": 4,
                **cloud,
            },
            "instance_types": {"small": small},
        }
    )


def spaced_workload(gap: float = 1200.0, n: int = 3, run: float = 300.0) -> list[PlannedContainer]:
    """One small container every ``gap`` seconds: each finds the previous one's instance idle."""
    return [
        PlannedContainer(
            i * gap,
            ContainerSpec(
                command=("sim", str(run), "0"),
                runtime_constraints=RuntimeConstraints(vcpus=1, ram=1024**3),
                name=f"c{i}",
            ),
            False,
        )
        for i in range(n)
    ]


def _run(config: Config) -> dict[str, Any]:
    summary = run_simulation(config, spaced_workload(), max_sim_time=6 * 3600).summary
    assert summary["containers"]["by_final_state"] == {"Complete (exit 0)": 3}, summary
    assert summary["instances"]["left_behind"] == 0, summary
    return summary


def test_hourly_billing_keeps_a_paid_idle_instance_and_costs_less():
    hours = 1
    # Today's behaviour: the engine believes in per-second billing (the type says so), shuts
    # each instance down after timeout_idle, and every container pays for a fresh hour.
    unaware = _run(sim_config(cloud_billing=3600 * hours, type_billing="1s"))
    # The driver states hourly billing: the idle instance waits for the next container.
    aware = _run(sim_config(cloud_billing=3600 * hours))
    assert unaware["instances"]["created"] == 3
    assert aware["instances"]["created"] == 1
    assert unaware["cost"]["total"] == pytest.approx(3.0)
    assert aware["cost"]["total"] == pytest.approx(1.0)
    # Waits do not suffer: the kept instance is ready when the next container comes.
    assert aware["queue_wait_seconds"]["mean"] <= unaware["queue_wait_seconds"]["mean"]


def test_the_instance_is_shut_down_just_before_its_paid_hour_ends():
    summary = _run(sim_config(cloud_billing=3600, billing_shutdown_margin="2m"))
    # Billed one hour only: destroyed before the second hour began.
    assert summary["cost"]["instance_hours"] == pytest.approx(1.0)
    assert summary["instances"]["destroyed"] == 1


def test_per_second_billing_is_todays_idle_timeout():
    told = _run(sim_config(cloud_billing=1, type_billing="1s"))
    from_driver = _run(sim_config(cloud_billing=1))
    assert told["instances"] == from_driver["instances"]
    assert told["cost"] == from_driver["cost"]
    assert from_driver["instances"]["created"] == 3  # idle 10 s, then gone, each time


def test_type_keys_win_over_the_driver():
    config = sim_config(cloud_billing=3600, type_billing="1m")
    from herder.engine.cloud_engine import with_driver_billing
    from herder.testing.sim import SimDriver

    driver = SimDriver()
    params = driver.validate_parameters(config.cloud.driver_parameters)
    types = with_driver_billing(config, driver, params, config.build_instance_types())
    assert types["small"].billing == Billing(60, 60)
    config = sim_config(cloud_billing=3600)
    types = with_driver_billing(config, driver, params, config.build_instance_types())
    assert types["small"].billing == Billing(3600, 3600)


def test_billing_keys_are_checked_with_their_key_path():
    from herder.config import config_from_data

    _, problems = config_from_data(
        {"instance_types": {"small": {"vcpus": 1, "ram": "1GiB", "billing_increment": "100ms"}}}
    )
    assert [(p.key, p.message) for p in problems] == [
        ("instance_types.small.billing_increment", "must be at least 1s, got 100ms")
    ]
    config, problems = config_from_data(
        {"instance_types": {"big": {"vcpus": 1, "ram": "1GiB", "billing_increment": "1h"}}}
    )
    assert config is not None and not problems
    assert config.build_instance_types()["big"].billing == Billing(3600, 3600)

"""The engine end to end on the simulated cloud: what `herder simulate` proves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from herder.app.cli import main
from herder.config import load_config
from herder.testing.sim_stats import FAULT_KINDS
from herder.tools.simulate import WorkloadOptions, generate_workload, run_simulation

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SIM_YAML = str(EXAMPLES / "sim.yaml")


def _simulate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict]:
    status = main(["simulate", "--config", SIM_YAML, "--json", *args])
    out = capsys.readouterr().out
    return status, json.loads(out)


def test_plain_simulation_completes_everything(capsys):
    status, summary = _simulate(capsys, "--containers", "60", "--fail-fraction", "0.1")
    ctrs = summary["containers"]
    assert status == 0, summary
    assert ctrs["not_final"] == 0
    assert ctrs["double_runs"] == 0
    assert ctrs["unexpected_failures"] == 0
    # With a reliable cloud nothing is cancelled: the workload's failures exit non-zero.
    assert ctrs["by_final_state"].get("Cancelled", 0) == 0
    assert ctrs["by_final_state"].get("Complete (exit non-zero)", 0) == ctrs["meant_to_fail"]
    assert summary["instances"]["left_behind"] == 0
    assert summary["instances"]["created"] >= 1
    assert summary["cost"]["total"] > 0
    assert summary["time"]["finished"]


def test_simulation_with_every_fault(capsys):
    """The acceptance run: all faults on, everything still ends, nothing runs twice."""
    status, summary = _simulate(capsys, "--containers", "200", "--faults")
    ctrs = summary["containers"]
    assert ctrs["not_final"] == 0, summary
    assert ctrs["double_runs"] == 0
    assert summary["instances"]["left_behind"] == 0
    # Every container is Complete, or Cancelled with a reason.
    assert "(no reason)" not in ctrs["cancel_reasons"]
    assert ctrs["unexpected_failures"] == 0
    # Each injected fault kind actually fired.
    faults = summary["faults_injected"]
    for kind in FAULT_KINDS:
        assert faults.get(kind, 0) > 0, (kind, faults)
    assert status == 0


def test_quota_and_capacity_errors_do_not_cause_a_create_storm():
    config = load_config(SIM_YAML)
    workload = generate_workload(
        WorkloadOptions(containers=150, seed=7, min_duration=60, max_duration=300),
        config.build_instance_types(),
    )
    result = run_simulation(
        config,
        workload,
        fault_overrides={
            "seed": 7,
            "quota_max_instances": 5,
            "capacity_error_rate": 0.3,
            "capacity_error_scope": "instance_type",
        },
    )
    s = result.summary
    assert s["containers"]["not_final"] == 0, s
    assert s["containers"]["by_final_state"].get("Cancelled", 0) == 0, s
    assert s["containers"]["double_runs"] == 0
    assert s["instances"]["peak"] <= 5
    creates = s["cloud_calls"]["create"]
    assert creates.get("quota", 0) > 0 and creates.get("capacity", 0) > 0
    # After a quota error the pool waits for an instance to go away, and after a capacity error
    # it waits a minute for that type: refused creates stay a small share of all attempts over
    # the simulated hours, instead of one per scheduling pass.
    refused = creates.get("quota", 0) + creates.get("capacity", 0)
    sim_minutes = s["time"]["simulated_seconds"] / 60
    assert refused <= sim_minutes * len(config.instance_types) + 10, (refused, sim_minutes)
    assert s["instances"]["left_behind"] == 0


def test_simulate_reports_bad_flags(capsys):
    assert main(["simulate", "--config", SIM_YAML, "--max-time", "soon"]) == 2
    assert "--max-time" in capsys.readouterr().err


def test_one_seed_gives_the_same_run_in_separate_processes():
    """Every draw comes from the seed (the pool's included), whatever the string hash seed."""
    import os
    import subprocess
    import sys

    def run(hash_seed: str) -> dict:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "herder.app.cli",
                "simulate",
                "--config",
                SIM_YAML,
                "--json",
                "--containers",
                "60",
                "--faults",
                "--seed",
                "5",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
        )
        summary = json.loads(out.stdout)
        del summary["time"]["wall_seconds"]
        return summary

    first, second = run("1"), run("2")
    assert first == second
    assert first["instances"]["created"] > 0


def test_summary_explains_what_it_ran_and_leaves_out_empty_rows(capsys):
    from herder.tools.simulate import format_summary

    _, summary = _simulate(capsys, "--containers", "60", "--faults")
    assert summary["cloud"] == {"simulated": "sim", "configured_driver": "sim"}
    inst = summary["instances"]
    assert inst["disappeared"] == inst["created"] - inst["destroyed"] - inst["left_behind"]
    summary["cloud_calls"]["set_tags"] = {}
    summary["cloud"]["configured_driver"] = "aws"
    text = format_summary(summary)
    assert "stood in for driver 'aws'" in text
    assert "set_tags" not in text
    if inst["disappeared"]:
        assert f"{inst['disappeared']} disappeared without being destroyed" in text

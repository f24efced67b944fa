"""The short form of the sim chaos run: every fault on, the dispatcher SIGKILLed three times.

The long form (1,000 containers) is ``uv run python tests/chaos/sim_chaos.py``; see README.md.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import invariants
from sim_chaos import (
    LARGE_CAPACITY,
    REQUIRED_FAULTS,
    ChaosOptions,
    choose_seed,
    early_fates,
    run,
)

from herder.queue.rules import RuleSettings
from herder.testing.sim_store import ProcessRecord


def test_seed_choice_gives_every_instance_fault_early() -> None:
    seed = choose_seed(1)
    fates = early_fates(seed)
    assert fates[:LARGE_CAPACITY] == [""] * LARGE_CAPACITY  # the first wave's instances
    assert sorted(f for f in fates if f) == ["broken", "disappear", "never_boot"]
    assert choose_seed(seed) == seed


def test_short_chaos_run_keeps_every_invariant(tmp_path: Path) -> None:
    options = ChaosOptions(
        containers=120,
        kills=3,
        seed=choose_seed(1),
        timeout=150.0,
        workdir=tmp_path / "run",
        # destroy errors and stale locks are rolled once per destroy and per exit, so a short
        # run may miss them; the long form requires them too.
        required_faults=REQUIRED_FAULTS,
        quiet=True,
    )
    report = run(options)
    assert report.ok, report.text()
    shutil.rmtree(report.workdir, ignore_errors=True)


# --------------------------------------------------------------------------- the checks themselves


def _queue_file(path: Path) -> list[str]:
    """A queue file with one container of each kind: Complete, Running, Cancelled with and
    without a reason."""
    from herder.engine.sizing import ConfigSizer
    from herder.model import ContainerSpec, InstanceType
    from herder.queue.sqlite import SqliteQueue
    from herder.runtime import VirtualRuntime

    small = InstanceType("small", "a.small", vcpus=2, ram=4 << 30)
    queue = SqliteQueue(
        str(path),
        RuleSettings(VirtualRuntime(), ConfigSizer({"small": small}), cluster_id="chaos"),
    )
    done, running, explained, silent = (
        queue.submit(ContainerSpec(command=("true",))).uuid for _ in range(4)
    )
    for uuid in (done, running):
        queue.lock(uuid)
        queue.set_running(uuid, "sim-1", "small")
    queue.finish(done, 0)
    queue.cancel(explained, "no longer wanted")
    queue.cancel(silent)
    queue.close()
    return [done, running, explained, silent]


def test_every_container_final_names_the_stuck_and_the_unexplained(tmp_path: Path) -> None:
    done, running, _, silent = _queue_file(tmp_path / "q.db")
    _, ok, detail = invariants.every_container_final(tmp_path / "q.db", expected=4)
    assert not ok
    assert f"{running} Running" in detail and f"{silent} Cancelled without a reason" in detail
    assert done not in detail
    _, ok, detail = invariants.every_container_final(tmp_path / "q.db", expected=5)
    assert "4 containers in the queue, 5 submitted" in detail


def test_queue_integrity_of_a_sound_file(tmp_path: Path) -> None:
    _queue_file(tmp_path / "q.db")
    assert invariants.queue_integrity(tmp_path / "q.db")[1:] == (True, "ok")


def test_overlapping_runs_are_found_and_touching_ones_are_not() -> None:
    ok_runs = [("a", 0.0, 1.0), ("a", 1.0, 2.0), ("b", 0.5, 3.0)]
    assert invariants.no_overlapping_runs(ok_runs)[1]
    _, ok, detail = invariants.no_overlapping_runs([*ok_runs, ("a", 0.0, 5.0)])
    assert not ok and "a started at" in detail
    # A short run inside a long one that an earlier run covers too.
    assert not invariants.no_overlapping_runs([("c", 0, 10), ("c", 1, 2), ("c", 3, 4)])[1]


def test_exit_codes_must_come_from_a_run(tmp_path: Path) -> None:
    done, *_ = _queue_file(tmp_path / "q.db")
    run_ok = ProcessRecord(1000, done, "sim-1", 0.0, 1.0, 0, "exit")
    assert invariants.exit_codes_are_real(tmp_path / "q.db", [run_ok])[1]
    other = ProcessRecord(1000, done, "sim-1", 0.0, 1.0, 3, "exit")
    _, ok, detail = invariants.exit_codes_are_real(tmp_path / "q.db", [other])
    assert not ok and f"{done} exit 0" in detail
    assert not invariants.exit_codes_are_real(tmp_path / "q.db", [])[1]


def test_faults_injected_names_the_missing_kinds() -> None:
    _, ok, detail = invariants.faults_injected({"quota": 2}, ["quota", "broken"])
    assert not ok and detail.endswith("never fired: broken")
    assert invariants.faults_injected({"quota": 2}, ["quota"])[1]

"""The loopback chaos suite, short form: ``herder serve`` SIGKILLed and restarted and SSH servers
taken down under it, with real SSH and real processes (the long form: ``loopback_chaos.py``).

The harness's own bookkeeping (run records, intervals, the report) is tested first, so that a
passing chaos run means the invariants held, not that the checks saw nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loopback_chaos  # a sibling module, found through the path above
from invariants import no_overlapping_runs
from loopback_chaos import ChaosOptions, ChaosReport, intervals, read_runs

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc and needs date +%N"
)


# --------------------------------------------------------------------------- bookkeeping


def test_runs_pair_each_start_with_its_end_and_skip_a_line_being_written(tmp_path: Path) -> None:
    log = tmp_path / "runs.log"
    log.write_text(
        "start c1 1000000000 11\n"
        "start c2 1500000000 12\n"
        "end c1 2000000000 exit\n"
        "start c1 3000000000 13\n"
        "end c1 4000000000 signal\n"
        "end c2 25"  # the last line, still being appended
    )
    runs = read_runs(log)
    assert [(r.start_ns, r.end_ns, r.why) for r in runs["c1"]] == [
        (1_000_000_000, 2_000_000_000, "exit"),
        (3_000_000_000, 4_000_000_000, "signal"),
    ]
    assert [(r.start_ns, r.end_ns) for r in runs["c2"]] == [(1_500_000_000, None)]
    assert read_runs(tmp_path / "missing") == {}


def test_a_run_without_an_end_overlaps_any_later_run_of_the_same_container(
    tmp_path: Path,
) -> None:
    log = tmp_path / "runs.log"
    log.write_text("start c1 1000000000 11\nstart c1 9000000000 12\nend c1 9500000000 exit\n")
    uuids = {"c1": "chaos-dz642-000000000000001"}
    spans = list(intervals(read_runs(log), uuids))
    assert [u for u, _, _ in spans] == [uuids["c1"]] * 2
    _, ok, detail = no_overlapping_runs(spans)
    assert not ok and "1 overlaps" in detail


def test_sequential_runs_do_not_overlap(tmp_path: Path) -> None:
    log = tmp_path / "runs.log"
    log.write_text(
        "start c1 1000000000 11\nend c1 2000000000 signal\n"
        "start c1 2000000000 12\nend c1 3000000000 exit\n"
        "start c2 1000000000 13\n"  # the last run of c2, SIGKILLed: nothing follows it
    )
    _, ok, detail = no_overlapping_runs(intervals(read_runs(log), {}))
    assert ok, detail


def test_the_report_fails_when_any_check_fails_and_says_which() -> None:
    report = ChaosReport(
        ChaosOptions(containers=3, seed=5),
        {"dispatcher SIGKILLs": 1},
        [("a", True, "fine"), ("b", False, "2 stuck")],
        elapsed=1.0,
    )
    assert not report.ok
    text = report.format()
    assert "PASS  a: fine" in text and "FAIL  b: 2 stuck" in text
    assert "dispatcher SIGKILLs 1" in text and text.endswith("result: FAIL")


def test_command_line_defaults_scale_with_the_run() -> None:
    argv = ["--containers", "100", "--kills", "3", "--seed", "9"]
    options, keep = loopback_chaos.parse_args(argv)
    assert (options.containers, options.kills, options.seed, keep) == (100, 3, 9, False)
    assert options.outages == 6 and options.cancels == 5


# --------------------------------------------------------------------------- the run


def test_short_chaos_run_keeps_every_invariant(tmp_path: Path) -> None:
    options = ChaosOptions(containers=32, kills=2, outages=3, cancels=2, seed=20260)
    report = loopback_chaos.run_chaos(options, tmp_path / "run")
    assert report.ok, report.format()
    assert report.faults["dispatcher SIGKILLs"] == 2
    assert report.faults["SSH outages"] == 3

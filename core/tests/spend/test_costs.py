"""Cost reports (`herder costs`, Dispatcher.cost_report): sums agree with what was billed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from engine_harness import Engine, sim_config

from herder.app.cli import main
from herder.costs import build_report
from herder.spend import ContainerCost, SpendEntry, period_bounds

DAY = 86400.0


def _run(tmp_path: Path) -> tuple[Engine, list[str], Path]:
    queue = tmp_path / "q.db"
    eng = Engine(sim_config(queue_path=str(queue)))
    uuids = [
        eng.submit(600, name="align"),
        eng.submit(300, name="align"),
        eng.submit(900, vcpus=4, name="index"),
    ]
    eng.run_until_done(uuids)
    eng.run_for(120)  # every instance idle, shut down and gone
    return eng, uuids, queue


def test_report_sums_equal_the_per_container_costs_and_the_bill(tmp_path: Path):
    eng, uuids, _ = _run(tmp_path)
    report = eng.disp.cost_report("day", periods=2)
    ctrs = [eng.container(u) for u in uuids]
    assert report.containers.finished == 3
    assert report.containers.total == pytest.approx(sum(c.cost for c in ctrs))
    assert report.containers.per_container == pytest.approx(sum(c.cost for c in ctrs) / 3)
    assert report.containers.by_name["index"] == pytest.approx(ctrs[2].cost)
    assert report.containers.by_name["align"] == pytest.approx(ctrs[0].cost + ctrs[1].cost)
    # What the instances cost, as herder books it, is what the simulated cloud bills, give or
    # take the end: herder closes an instance's books at the first listing without it, so it
    # may count up to one sync interval (5 s at 1.0/h) more per instance, never less.
    bill = eng.stats.cost()
    assert bill <= report.total <= bill + eng.stats.created * 5 / 3600
    assert report.by_instance_type == {"c4": pytest.approx(report.total)}
    assert [b.label for b in report.by_period] == ["2023-11-13", "2023-11-14"]
    assert report.by_period[0].spent == 0.0
    state = eng.disp.budget_state()
    assert state.period == "day" and state.spent == pytest.approx(report.total)
    eng.stop()


def test_costs_command_reads_the_queues_ledger(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    eng, _uuids, queue = _run(tmp_path)
    expected = eng.disp.cost_report("day", periods=7)
    eng.stop()
    args = ["costs", "--queue-file", str(queue), "--until", "2023-11-15"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total"] == pytest.approx(expected.total)
    assert [p["period"] for p in out["by_period"]][-1] == "2023-11-14"
    assert len(out["by_period"]) == 7
    assert out["containers"]["finished"] == 3
    assert out["containers"]["total"] == pytest.approx(expected.containers.total)
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "2023-11-14" in text and f"total {expected.total:.4f}" in text
    assert "finished containers: 3" in text and "index" in text


def test_costs_command_without_a_queue_file_says_so(tmp_path: Path, capsys):
    assert main(["costs", "--queue-file", str(tmp_path / "none.db")]) == 1
    assert "no spend recorded yet" in capsys.readouterr().err


def test_buckets_by_hour_and_month():
    start, _ = period_bounds(1_700_000_000.0, "day")
    entries = [SpendEntry(start + h * 3600 + 5, 1.0, "i", "t", start) for h in range(3)]
    costs = [ContainerCost(start + 10, "u", "n", "t", 0.25, 0)]
    hourly = build_report(entries, costs, period="hour", since=start, until=start + 3 * 3600)
    assert [b.spent for b in hourly.by_period] == [1.0, 1.0, 1.0]
    assert hourly.by_period[0].label == "2023-11-14 00:00"
    monthly = build_report(entries, costs, period="month", since=start, until=start + DAY)
    assert [(b.label, b.spent) for b in monthly.by_period] == [("2023-11", 3.0)]
    assert monthly.containers.per_container == 0.25


def test_cost_by_label_counts_each_container_under_each_of_its_labels():
    start, _ = period_bounds(1_700_000_000.0, "day")
    costs = [
        ContainerCost(start + 10, "a", "n", "t", 0.25, 0, (("project", "x"), ("team", "y"))),
        ContainerCost(start + 20, "b", "n", "t", 0.5, 0, (("project", "x"),)),
        ContainerCost(start + 30, "c", "n", "t", 1.0, 0),
    ]
    report = build_report([], costs, period="day", since=start, until=start + DAY)
    assert report.containers.by_label == {"": 1.0, "project=x": 0.75, "team=y": 0.25}
    assert report.to_json()["containers"]["by_label"] == report.containers.by_label


def test_labels_reach_the_ledger_and_come_back(tmp_path: Path):
    from herder.queue.sqlite import SqliteQueue, read_ledger
    from herder.runtime import VirtualRuntime
    from herder.testing.queue_conformance import QueueSettings

    settings = QueueSettings(runtime=VirtualRuntime())
    path = str(tmp_path / "q.db")
    queue = SqliteQueue(path, settings.rules)
    queue.ledger.record_container(ContainerCost(10.0, "a", "n", "t", 0.25, 0, (("project", "x"),)))
    queue.ledger.record_container(ContainerCost(11.0, "b", "n", "t", 0.5, 0))
    queue.close()
    back = read_ledger(path).containers(0.0, 100.0)
    assert [c.labels for c in back] == [(("project", "x"),), ()]

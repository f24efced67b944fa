"""``herder simulate --compare A.yaml B.yaml``: one workload, two configurations, side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from herder.app.cli import main


def _config(tmp_path: Path, name: str, *, engine_knows_hourly: bool) -> str:
    small: dict[str, Any] = {"vcpus": 2, "ram": "4GiB", "price": 1.0}
    if not engine_knows_hourly:
        small["billing_increment"] = "1s"  # today's behaviour: idle timeout alone
    data = {
        "cluster_id": "cmp01",
        "cloud": {
            "driver": "sim",
            "driver_parameters": {
                "seed": 1,
                "boot_delay": 5,
                "billing_increment": 3600,
                "billing_minimum": 3600,
            },
            "poll_interval": "1s",
            "probe_interval": "1s",
            "max_probes_per_second": 100,
            "sync_interval": "5s",
            "timeout_idle": "10s",
            "timeout_shutdown": "5s",
            "max_cloud_ops_per_second": 0,
        },
        "queue": {"path": str(tmp_path / f"{name}.db")},
        "instance_types": {"small": small},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture
def files(tmp_path: Path) -> tuple[str, str, str]:
    workload = tmp_path / "spaced.yaml"
    workload.write_text(
        yaml.safe_dump(
            [
                {"command": ["sim", "300", "0"], "vcpus": 1, "ram": "1GiB", "at": f"{i * 20}m"}
                for i in range(3)
            ]
        )
    )
    a = _config(tmp_path, "today", engine_knows_hourly=False)
    b = _config(tmp_path, "hourly", engine_knows_hourly=True)
    return a, b, str(workload)


def test_compare_runs_the_same_workload_through_both(files, capsys):
    a, b, workload = files
    status = main(["simulate", "--compare", a, b, "--workload", workload, "--json"])
    out = json.loads(capsys.readouterr().out)
    assert status == 0
    assert out["comparison"]["configurations"] == ["today.yaml", "hourly.yaml"]
    rows = {r["figure"]: r for r in out["comparison"]["rows"]}
    assert rows["cost"]["values"] == {"today.yaml": 3.0, "hourly.yaml": 1.0}
    assert rows["cost"]["change_percent"] == pytest.approx(-66.7)
    assert rows["instances created"]["values"] == {"today.yaml": 3, "hourly.yaml": 1}
    assert rows["makespan (s)"]["values"]["today.yaml"] > 2400  # the last comes at 40 min
    for summary in out["summaries"].values():
        assert summary["containers"]["submitted"] == 3


def test_compare_prints_a_table(files, capsys):
    a, b, workload = files
    assert main(["simulate", "--compare", a, b, "--workload", workload]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["today.yaml", "hourly.yaml", "change"]
    cost = next(line for line in lines if line.startswith("cost"))
    assert cost.split() == ["cost", "3.0000", "1.0000", "-66.7%"]
    assert any(line.startswith("instance-hours") for line in lines)
    assert any(line.startswith("queue wait mean (s)") for line in lines)


def test_compare_and_config_exclude_each_other(files, capsys):
    a, b, workload = files
    assert main(["simulate", "--config", a, "--compare", a, b, "--workload", workload]) == 2
    assert "drop --config" in capsys.readouterr().err

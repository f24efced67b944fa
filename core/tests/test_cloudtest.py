"""``herder cloudtest`` against the sim driver (in memory) and the loopback driver (real SSH).

Every test checks that the instance cloudtest created is gone afterwards, whether the run
passed, failed on purpose, or was interrupted.
"""

from __future__ import annotations

import getpass
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from herder.app.cli import main
from herder.config import Config
from herder.model import InstanceType
from herder.plugin.bootprobe import BootProbe
from herder.plugin.cloud import DriverContext, Instance
from herder.plugin.executor import Executor
from herder.ssh.bastion import close_shared_bastions
from herder.ssh.server import LocalSSHServer, generate_key, generate_key_file
from herder.testing.sim import SimDriver, SimParameters
from herder.tools.cloudtest import (
    DEFAULT_INSTANCE_SET_ID,
    STEP_NAMES,
    CloudTest,
    CloudtestError,
    choose_instance_type,
)

TYPES = {
    "big": {"vcpus": 4, "ram": "8GiB", "price": 0.4},
    "small": {"vcpus": 1, "ram": "1GiB", "price": 0.1},
}


def sim_config(**cloud: Any) -> Config:
    return Config.model_validate(
        {
            "cluster_id": "ctest",
            "cloud": {
                "driver": "sim",
                "driver_parameters": {"boot_delay": 0.05, "runner_missing": True},
                "probe_interval": "0.01s",
                "sync_interval": "0.01s",
                "timeout_booting": "5s",
                **cloud,
            },
            "instance_types": TYPES,
        }
    )


def sim_listing(driver: SimDriver, set_id: str = DEFAULT_INSTANCE_SET_ID) -> list[Instance]:
    observer = driver.instance_set(SimParameters(), DriverContext(instance_set_id="observer"))
    return observer.instances({"HerderInstanceSetID": set_id})


def run(config: Config, driver: SimDriver | None = None, **kwargs: Any) -> Any:
    test = CloudTest(config, driver=driver or SimDriver(), **kwargs)
    return test.run()


def statuses(report: Any) -> dict[str, str]:
    return {s.name: s.status for s in report.steps}


# --------------------------------------------------------------------------- sim


def test_every_step_passes_on_sim_and_the_instance_is_gone() -> None:
    driver = SimDriver()
    report = run(sim_config(), driver)
    assert report.ok, report.to_json()
    assert list(statuses(report)) == list(STEP_NAMES)
    assert set(statuses(report).values()) == {"ok"}
    assert report.instance_type == "small"  # the cheapest by default
    assert report.instance_id
    assert sim_listing(driver) == []
    # The runner was deployed as the pool does it, then --list ran.
    deploy = next(s for s in report.steps if s.name == "deploy runner")
    assert deploy.detail.startswith("installed ")
    assert all(s.duration >= 0 for s in report.steps)


def test_a_failing_boot_probe_fails_the_run_and_still_destroys() -> None:
    driver = SimDriver()
    report = run(sim_config(boot_probe_command="false"), driver, timeout=0.3)
    assert not report.ok
    st = statuses(report)
    assert st["ssh"] == "ok" and st["boot probe"] == "FAILED"
    assert st["deploy runner"] == st["runner --list"] == "skipped"
    assert st["destroy"] == st["gone"] == "ok"
    assert "boot probe did not succeed" in next(
        s.detail for s in report.steps if s.name == "boot probe"
    )
    assert sim_listing(driver) == []


def test_a_missing_runner_fails_the_list_step_and_still_destroys() -> None:
    driver = SimDriver()
    config = sim_config(deploy_runner=False)
    report = run(config, driver)
    st = statuses(report)
    assert st["deploy runner"] == "ok" and st["runner --list"] == "FAILED", report.to_json()
    assert st["gone"] == "ok" and not report.ok
    assert sim_listing(driver) == []


def test_a_failing_command_fails_the_run() -> None:
    driver = SimDriver()
    report = run(sim_config(), driver, command="exit 4")
    assert statuses(report)["command"] == "FAILED" and not report.ok
    assert sim_listing(driver) == []


class _InterruptingProbe(BootProbe):
    def probe(self, executor: Executor, instance: Instance) -> tuple[bool, str]:
        raise KeyboardInterrupt


def test_an_interrupt_still_destroys_the_instance() -> None:
    driver = SimDriver()
    report = run(sim_config(), driver, boot_probe=_InterruptingProbe())
    assert report.interrupted and not report.ok
    st = statuses(report)
    assert st["boot probe"] == "FAILED" and st["destroy"] == "ok" and st["gone"] == "ok"
    assert sim_listing(driver) == []


def test_existing_test_instances_are_refused_without_destroy_existing() -> None:
    driver = SimDriver()
    params = SimParameters(boot_delay=0.0)
    leftover_set = driver.instance_set(params, DriverContext(instance_set_id="x"))
    small = InstanceType(name="small", provider_type="small", vcpus=1, ram=1 << 30)
    leftover = leftover_set.create(
        small, "", {"HerderInstanceSetID": DEFAULT_INSTANCE_SET_ID}, "", None
    )
    report = run(sim_config(), driver)
    st = statuses(report)
    assert st["existing instances"] == "FAILED" and st["create"] == "skipped"
    assert "--destroy-existing" in report.steps[1].detail
    assert [i.id for i in sim_listing(driver)] == [leftover.id]  # not touched

    report = run(sim_config(), driver, destroy_existing=True)
    assert report.ok, report.to_json()
    assert leftover.id in report.steps[1].detail
    assert sim_listing(driver) == []


def test_instances_of_other_instance_sets_are_never_touched() -> None:
    driver = SimDriver()
    other = driver.instance_set(SimParameters(), DriverContext(instance_set_id="prod"))
    small = InstanceType(name="small", provider_type="small", vcpus=1, ram=1 << 30)
    keep = other.create(small, "", {"HerderInstanceSetID": "prod"}, "", None)
    report = run(sim_config(), driver, destroy_existing=True)
    assert report.ok
    assert [i.id for i in sim_listing(driver, "prod")] == [keep.id]


def test_tags_are_checked_and_include_resource_tags_and_the_pid() -> None:
    driver = SimDriver()
    test = CloudTest(sim_config(resource_tags={"team": "infra"}), driver=driver)
    tags = test.expected_tags()
    assert tags["team"] == "infra" and "HerderCloudTestPID" in tags
    assert tags["HerderInstanceType"] == "small"
    assert test.run().ok


def test_a_create_error_fails_at_create_and_leaves_nothing() -> None:
    driver = SimDriver()
    config = sim_config(driver_parameters={"create_error_rate": 1.0, "boot_delay": 0})
    report = run(config, driver)
    st = statuses(report)
    assert st["create"] == "FAILED" and st["destroy"] == "skipped"
    assert sim_listing(driver) == []


def test_choose_instance_type() -> None:
    types = Config.model_validate({"instance_types": TYPES}).build_instance_types()
    assert choose_instance_type(types, None).name == "small"
    assert choose_instance_type(types, "big").name == "big"
    with pytest.raises(CloudtestError, match="'huge' is not configured"):
        choose_instance_type(types, "huge")
    with pytest.raises(CloudtestError, match="no instance types are configured"):
        choose_instance_type({}, None)


def test_cli_json_report_and_exit_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "herder.yaml"
    doc = sim_config().model_dump(mode="json")
    config.write_text(yaml.safe_dump(doc))
    status = main(
        ["cloudtest", "--config", str(config), "--json", "--data-dir", str(tmp_path / "data")]
    )
    out = json.loads(capsys.readouterr().out)
    assert status == 0, out
    assert out["ok"] and [s["step"] for s in out["steps"]] == list(STEP_NAMES)

    status = main(
        [
            "cloudtest",
            "--config",
            str(config),
            "--instance-type",
            "nope",
            "--data-dir",
            str(tmp_path / "data"),
        ]
    )
    assert status == 1
    assert "'nope' is not configured" in capsys.readouterr().err


def test_cli_table_and_failure_exit_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "herder.yaml"
    doc = sim_config(boot_probe_command="false").model_dump(mode="json")
    config.write_text(yaml.safe_dump(doc))
    status = main(
        [
            "cloudtest",
            "--config",
            str(config),
            "--timeout",
            "0.3",
            "--data-dir",
            str(tmp_path / "data"),
        ]
    )
    out = capsys.readouterr().out
    assert status == 1
    assert "boot probe" in out and "FAILED" in out and "cloudtest FAILED" in out


@pytest.mark.parametrize("tty", [False, True])
def test_cli_prints_each_step_once_whether_or_not_stderr_is_a_terminal(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tty: bool,
) -> None:
    config = tmp_path / "herder.yaml"
    config.write_text(yaml.safe_dump(sim_config().model_dump(mode="json")))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty, raising=False)
    status = main(["cloudtest", "--config", str(config), "--data-dir", str(tmp_path / "data")])
    err = capsys.readouterr().err
    assert status == 0, err
    for name in STEP_NAMES:
        lines = [line for line in err.splitlines() if f"{name}: " in line]
        assert len(lines) == 1, (name, err)


# --------------------------------------------------------------------------- loopback


def loopback_config(tmp_path: Path, **cloud: Any) -> Path:
    key = tmp_path / "id_ed25519"
    generate_key_file(key)
    doc = {
        "cluster_id": "ctest",
        "containers": {"dispatch_private_key": str(key)},
        "cloud": {
            "driver": "loopback",
            "driver_parameters": {"state_dir": str(tmp_path / "loopback")},
            "deploy_runner_directory": str(tmp_path / "runner-bin"),
            "probe_interval": "0.1s",
            "sync_interval": "0.1s",
            "timeout_booting": "20s",
            **cloud,
        },
        "instance_types": {"local": {"vcpus": 1, "ram": "1GiB"}},
    }
    path = tmp_path / "herder.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _loopback_instances(tmp_path: Path) -> list[str]:
    root = tmp_path / "loopback" / "instances"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_loopback_passes_over_real_ssh_with_the_real_runner(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = loopback_config(tmp_path)
    status = main(
        ["cloudtest", "--config", str(config), "--json", "--command", "echo hello-from-cloudtest"]
    )
    out = json.loads(capsys.readouterr().out)
    assert status == 0, out
    steps = {s["step"]: s for s in out["steps"]}
    assert steps["command"]["detail"] == "hello-from-cloudtest"
    assert steps["deploy runner"]["detail"].startswith("installed ")
    assert steps["runner --list"]["status"] == "ok"
    assert _loopback_instances(tmp_path) == []


def test_loopback_failing_step_still_cleans_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = loopback_config(tmp_path, boot_probe_command="exit 1")
    status = main(["cloudtest", "--config", str(config), "--json", "--timeout", "1"])
    out = json.loads(capsys.readouterr().out)
    assert status == 1
    steps = {s["step"]: s["status"] for s in out["steps"]}
    assert steps["ssh"] == "ok" and steps["boot probe"] == "FAILED"
    assert steps["destroy"] == "ok" and steps["gone"] == "ok"
    assert _loopback_instances(tmp_path) == []


def test_loopback_through_a_bastion_reports_the_route_and_each_hop(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bastion_key, bastion_line = generate_key()
    dispatch_key = tmp_path / "dispatch_key"
    _, dispatch_public = generate_key_file(dispatch_key)
    bastion = LocalSSHServer(
        bastion_key, [dispatch_public], forward_to=lambda host, port: (host, port)
    )
    bastion.start()
    try:
        host, port = bastion.address.rsplit(":", 1)
        config = loopback_config(
            tmp_path,
            ssh={
                "bastion_host": host,
                "bastion_port": int(port),
                "bastion_key_file": str(dispatch_key),
                "bastion_host_key": bastion_line,
            },
        )
        status = main(["cloudtest", "--config", str(config), "--json"])
        out = json.loads(capsys.readouterr().out)
    finally:
        close_shared_bastions()
        bastion.stop()
    assert status == 0, out
    steps = {s["step"]: s for s in out["steps"]}
    assert f"through bastion {getpass.getuser()}@{host}:{port}" in steps["ssh"]["detail"]
    route = out["ssh_route"]
    assert route["bastion"] == f"{getpass.getuser()}@{host}:{port}"
    assert [hop["hop"].split()[0] for hop in route["hops"]] == ["bastion", "instance"]
    assert all(hop["seconds"] >= 0 for hop in route["hops"])
    assert bastion.forwarded  # the instance was reached through the bastion
    assert _loopback_instances(tmp_path) == []

"""The command line with the gce driver installed: `herder plugins`, `herder config check`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from herder.app import cli

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "gce.yaml"


def test_plugins_lists_gce(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plugins", "--json"]) == 0
    plugins = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert plugins["gce"]["distribution"] == "herder-driver-gce"
    assert plugins["gce"]["registrations"] == [
        {
            "kind": "driver",
            "name": "gce",
            "target": "herder_driver_gce.driver:GCEDriver",
            "description": "Google Compute Engine (standard and spot VMs) through "
            "google-cloud-compute",
        }
    ]


def test_example_config_checks_clean(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["config", "check", str(EXAMPLE)]) == 0
    assert capsys.readouterr().out == f"{EXAMPLE}: OK\n"


def test_broken_copy_names_each_bad_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = yaml.safe_load(EXAMPLE.read_text())
    params = data["cloud"]["driver_parameters"]
    params["zone"] = "us-central1-a"  # misspelt: the key is zones
    params["zones"] = ["us-central1-a", "europe-west4-b"]
    params["labels"] = {"Team": "Data"}
    params["boot_disk_size"] = "large"
    params["scratch_disk"] = "ramdisk"
    del params["project"]
    broken = tmp_path / "gce.yaml"
    broken.write_text(yaml.safe_dump(data))
    assert cli.main(["config", "check", str(broken)]) == 1
    out, err = capsys.readouterr()
    text = out + err
    for key in ("zone", "zones", "labels", "boot_disk_size", "scratch_disk", "project"):
        assert f"cloud.driver_parameters.{key}" in text, (key, text)
    assert "did you mean 'zones'" in text

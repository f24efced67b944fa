"""The example configurations: each one is valid, and herder.full.yaml documents every key."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from herder.config import Config, InstanceTypeConfig, check_config, load_config
from herder.plugin.registry import PluginError, Plugins

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FULL = EXAMPLES / "herder.full.yaml"


def example_files() -> list[Path]:
    return sorted(EXAMPLES.glob("*.yaml"))


def model_keys(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every key path of a model; nested models are walked, maps (dict fields) are leaves."""
    for name, field in model.model_fields.items():
        path = (*prefix, name)
        yield path
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from model_keys(annotation, path)


def data_keys(data: Any, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    keys: set[tuple[str, ...]] = set()
    if isinstance(data, dict):
        for key, value in data.items():
            keys.add((*prefix, key))
            keys |= data_keys(value, (*prefix, key))
    return keys


@pytest.fixture(scope="module")
def plugins() -> Plugins:
    return Plugins.load()


def test_there_are_examples() -> None:
    names = {p.name for p in example_files()}
    assert {"herder.full.yaml", "sim.yaml", "minimal.yaml"} <= names


@pytest.mark.parametrize("path", example_files(), ids=lambda p: p.name)
def test_example_passes_config_check(path: Path, plugins: Plugins) -> None:
    config = load_config(path)  # the file itself is valid, whatever is installed
    driver = config.cloud.driver
    try:
        plugins.driver_class(driver)
    except PluginError as exc:
        assert check_config(path, None) == []
        pytest.skip(
            f"driver {driver!r} cannot be loaded here, so its parameters were not checked: {exc}"
        )
    problems = check_config(path, plugins)
    assert [str(p) for p in problems] == []


# ------------------------------------------------------------------------- herder.full.yaml


def test_full_example_lists_every_key_of_the_model() -> None:
    data = yaml.safe_load(FULL.read_text())
    missing = [".".join(k) for k in model_keys(Config) if k not in data_keys(data)]
    assert missing == [], f"herder.full.yaml does not document: {', '.join(missing)}"


def test_full_example_values_are_the_defaults() -> None:
    assert load_config(FULL) == Config()


def test_full_example_has_a_comment_for_every_key() -> None:
    lines = FULL.read_text().splitlines()
    undocumented = []
    for index, line in enumerate(lines):
        match = re.match(r"^(\s*)([a-z_]+):", line)
        if not match:
            continue
        previous = lines[index - 1].strip() if index else ""
        if not previous.startswith("#") and " # " not in line:
            undocumented.append(match.group(2))
    assert undocumented == []


def commented_instance_types() -> dict[str, Any]:
    """The example instance type, commented out at the end of herder.full.yaml."""
    text = FULL.read_text()
    block = re.search(r"^# instance_types:\n((?:#.*\n)+)", text, re.MULTILINE)
    assert block, "herder.full.yaml has no commented `# instance_types:` example"
    body = "instance_types:\n" + "".join(
        line[2:] + "\n" for line in block.group(1).splitlines() if line.startswith("#  ")
    )
    parsed: dict[str, Any] = yaml.safe_load(body)
    return parsed


def test_commented_instance_type_is_valid_and_shows_every_key() -> None:
    example = commented_instance_types()
    config = Config.model_validate(example)
    assert len(config.instance_types) == 1
    (entry,) = example["instance_types"].values()
    missing = [".".join(k) for k in model_keys(InstanceTypeConfig) if k not in data_keys(entry)]
    assert missing == []


# ------------------------------------------------------------------------- the others


def test_sim_example_is_ready_for_simulation() -> None:
    config = load_config(EXAMPLES / "sim.yaml")
    assert config.cloud.driver == "sim"
    types = config.instance_types
    assert 3 <= len(types) <= 4
    assert len({t.price for t in types.values()}) == len(types)
    assert len({(t.vcpus, t.ram) for t in types.values()}) == len(types)
    # Short timeouts, so a simulation shows every phase quickly.
    assert config.cloud.timeout_idle <= 30
    assert config.cloud.probe_interval <= 2
    assert config.queue.backend == "sqlite"


def test_minimal_example_is_minimal() -> None:
    data = yaml.safe_load((EXAMPLES / "minimal.yaml").read_text())
    assert data == {"cloud": {"driver": "loopback"}}

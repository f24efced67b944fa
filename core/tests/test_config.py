"""Loading and checking configuration files: every problem, with its key path."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, Field, field_validator

from herder.config import (
    Config,
    ConfigError,
    ConfigProblem,
    check_config,
    duration_text,
    load_config,
    render_config,
    size_text,
)
from herder.plugin.cloud import Capability, Driver, DriverContext, DriverParameters, InstanceSet
from herder.plugin.hookspecs import hookimpl
from herder.plugin.registry import Plugins, Registry
from herder.units import parse_duration, parse_size

# ------------------------------------------------------------------------- a fake driver


class Network(BaseModel):
    model_config = {"extra": "forbid"}
    subnet: str
    public_ip: bool = False


class FakeParameters(DriverParameters):
    region: str
    zone_count: int = Field(1, ge=1)
    network: Network | None = None

    @field_validator("region")
    @classmethod
    def _region(cls, value: str) -> str:
        if not value.startswith("eu-"):
            raise ValueError(f"region {value!r} is not in Europe")
        return value


class FakeDriver(Driver):
    parameters_model = FakeParameters

    def instance_set(self, params: DriverParameters, context: DriverContext) -> InstanceSet:
        raise NotImplementedError


class PickyDriver(FakeDriver):
    """Validates its parameters with more than a model."""

    @classmethod
    def validate_parameters(cls, raw: Any) -> DriverParameters:
        raise ValueError("credentials file /nope does not exist")


class SpotInOneRegionDriver(FakeDriver):
    """Can do spot only in one region, GPUs in another: its capabilities depend on its
    parameters."""

    def capabilities_for(self, params: DriverParameters) -> frozenset[Capability]:
        assert isinstance(params, FakeParameters)
        return {
            "eu-spot": frozenset({Capability.SPOT}),
            "eu-gpu": frozenset({Capability.GPU}),
        }.get(params.region, frozenset())


class MisspeltDriver(FakeDriver):
    capabilities = frozenset({"spott"})


class FakePlugin:
    @hookimpl
    def herder_register_drivers(self, registry: Registry) -> None:
        registry.add("fake", FakeDriver)
        registry.add("spotty", SpotInOneRegionDriver)
        registry.add("misspelt", MisspeltDriver)
        registry.add("picky", PickyDriver)
        registry.add("ghost", "herder_no_such_module:GhostDriver")


@pytest.fixture(scope="module")
def plugins() -> Plugins:
    return Plugins.load(entry_points=False, extra=[FakePlugin()])


def write(tmp_path: Path, text: str, name: str = "herder.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def keyed(problems: list[ConfigProblem]) -> dict[str, str]:
    return {p.key: p.message for p in problems}


# ------------------------------------------------------------------------- valid files


def test_valid_file_loads_with_units(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        cluster_id: abc12
        cloud:
          driver: fake
          driver_parameters: {region: eu-west-1}
          timeout_idle: 1m30s
        instance_types:
          small: {vcpus: 2, ram: 4GiB, price: 0.1}
    """,
    )
    config = load_config(path)
    assert config.cluster_id == "abc12"
    assert config.cloud.timeout_idle == 90.0
    assert config.instance_types["small"].ram == 4 * 1024**3


def test_file_with_no_problems_checks_clean(tmp_path: Path, plugins: Plugins) -> None:
    path = write(
        tmp_path,
        """
        cloud:
          driver: fake
          driver_parameters: {region: eu-west-1, network: {subnet: a}}
    """,
    )
    assert check_config(path, plugins) == []
    assert load_config(path, plugins).cloud.driver == "fake"


# ------------------------------------------------------------------------- the model's errors


def test_three_problems_are_all_reported_with_key_paths(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        cloud:
          timeout_idel: 1m
          probe_interval: 10 seconds
        instance_types:
          small:
            vcpus: 2
    """,
    )
    problems = check_config(path, None)
    assert [str(p) for p in problems] == [
        "cloud.timeout_idel: unknown key (did you mean 'timeout_idle'?)",
        "cloud.probe_interval: invalid duration '10 seconds': expected a number with a unit "
        "(ns, us, ms, s, m, h), e.g. 10s, 1m30s, 2h",
        "instance_types.small.ram: field required",
    ]
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == problems
    assert str(info.value).splitlines()[0] == (
        f"{path}: cloud.timeout_idel: unknown key (did you mean 'timeout_idle'?)"
    )


def test_problems_are_listed_in_file_order(tmp_path: Path) -> None:
    # pydantic reports in model-field order (ssh_port before timeout_idle); people read files
    # top to bottom.
    path = write(
        tmp_path,
        """
        instance_types:
          small: {vcpus: 0, ram: 1GiB}
        cloud:
          timeout_idle: forever
          ssh_port: 0
        cluster_id: TOOLONG
    """,
    )
    assert [p.key for p in check_config(path, None)] == [
        "instance_types.small.vcpus",
        "cloud.timeout_idle",
        "cloud.ssh_port",
        "cluster_id",
    ]


def test_unknown_top_level_key_suggests_the_closest(tmp_path: Path) -> None:
    path = write(tmp_path, "instance_type: {}\n")
    assert keyed(check_config(path, None)) == {
        "instance_type": "unknown key (did you mean 'instance_types'?)"
    }


def test_unknown_key_without_close_match_lists_small_sections(tmp_path: Path) -> None:
    path = write(tmp_path, "queue: {database: x}\n")
    assert keyed(check_config(path, None)) == {
        "queue.database": "unknown key; valid keys here: backend, path, backend_parameters"
    }


def test_unknown_key_inside_an_instance_type(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        instance_types:
          big:
            vcpus: 4
            ram: 8GiB
            gpu: {devices: 1}
            prise: 1.0
    """,
    )
    assert keyed(check_config(path, None)) == {
        "instance_types.big.gpu.devices": "unknown key (did you mean 'device_count'?)",
        "instance_types.big.prise": "unknown key (did you mean 'price'?)",
    }


@pytest.mark.parametrize(
    ("yaml_text", "key", "message"),
    [
        ("cloud: {max_instances: many}", "cloud.max_instances", "expected an integer, got 'many'"),
        ("cloud: {max_instances: 1.5}", "cloud.max_instances", "expected a whole number, got 1.5"),
        ("cloud: {ssh_port: 0}", "cloud.ssh_port", "must be at least 1, got 0"),
        (
            "cloud: {supervisor_fraction: 2}",
            "cloud.supervisor_fraction",
            "must be at most 1, got 2",
        ),
        (
            "cloud: {deploy_runner: maybe}",
            "cloud.deploy_runner",
            "expected true or false, got 'maybe'",
        ),
        ("cloud: {driver: [a]}", "cloud.driver", "expected a string, got a list"),
        (
            "cloud: {resource_tags: [a]}",
            "cloud.resource_tags",
            "expected a mapping of keys to values, got a list",
        ),
        ("cloud: 3", "cloud", "expected a mapping of keys to values, got 3"),
        ("cloud:", "cloud", "expected a mapping of keys to values, got nothing (null)"),
        (
            "containers: {reserve_extra_ram: lots}",
            "containers.reserve_extra_ram",
            "invalid size 'lots': expected a number with an optional unit (K, M, G, T for powers "
            "of 1000; Ki, Mi, Gi, Ti for powers of 1024), e.g. 4GiB, 500MB",
        ),
        (
            "containers: {runtime_engine: lxc}",
            "containers.runtime_engine",
            "invalid runtime engine 'lxc': expected auto, docker, podman or process",
        ),
        (
            "cluster_id: ABCDE",
            "cluster_id",
            "invalid cluster_id 'ABCDE': expected 5 lowercase letters or digits",
        ),
        (
            "instance_types: {a: {vcpus: 1, ram: 1Gi, gpu: {stack: opencl}}}",
            "instance_types.a.gpu.stack",
            "invalid GPU stack 'opencl': expected '', 'cuda' or 'rocm'",
        ),
    ],
)
def test_value_errors_are_clear(tmp_path: Path, yaml_text: str, key: str, message: str) -> None:
    problems = check_config(write(tmp_path, yaml_text + "\n"), None)
    assert keyed(problems) == {key: message}


def test_instance_types_as_a_list_is_explained(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        instance_types:
          - {name: small, vcpus: 1, ram: 1GiB}
    """,
    )
    (problem,) = check_config(path, None)
    assert problem.key == "instance_types"
    assert problem.message.startswith("instance_types must be a map of name to type, not a list")


def test_file_that_is_not_a_mapping(tmp_path: Path) -> None:
    (problem,) = check_config(write(tmp_path, "- a\n- b\n"), None)
    assert problem.key == ""
    assert problem.message == (
        "the file must be a mapping of keys to values (such as cluster_id: ...), not a list"
    )


# ------------------------------------------------------------------------- file-level errors


def test_yaml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        cloud:
          driver: fake
         timeout_idle: 1m
    """,
    )
    (problem,) = check_config(path, None)
    assert (problem.line, problem.column) == (4, 2)
    assert problem.message.startswith("invalid YAML: ")
    assert problem.format("f.yaml").startswith("f.yaml:4:2: invalid YAML: ")
    assert str(problem).startswith("4:2: invalid YAML: ")


def test_duplicate_keys_are_problems(tmp_path: Path) -> None:
    # PyYAML silently keeps the last value, which hides the first as well as a typo would.
    path = write(
        tmp_path,
        """
        cloud:
          timeout_idle: 1m
          timeout_idle: 2m
    """,
    )
    (problem,) = check_config(path, None)
    assert problem.message == "duplicate key 'timeout_idle' (first set on line 3)"
    assert problem.format("f.yaml") == (
        "f.yaml:4:3: duplicate key 'timeout_idle' (first set on line 3)"
    )


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file_is_one_clear_problem(tmp_path: Path, text: str) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    (problem,) = check_config(path, None)
    assert problem.message.startswith("the file is empty")
    with pytest.raises(ConfigError, match="the file is empty"):
        load_config(path)


def test_missing_file_is_one_clear_problem(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert check_config(path, None) == [ConfigProblem("", "no such file")]
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: no such file"


def test_directory_and_binary_files(tmp_path: Path) -> None:
    assert check_config(tmp_path, None) == [ConfigProblem("", "is a directory, not a file")]
    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    (problem,) = check_config(binary, None)
    assert problem.message.startswith("not UTF-8 text")


# ------------------------------------------------------------------------- drivers


def test_unknown_driver_lists_the_installed_ones(tmp_path: Path, plugins: Plugins) -> None:
    path = write(tmp_path, "cloud: {driver: fak}\n")
    installed = ", ".join(plugins.names("driver"))
    assert keyed(check_config(path, plugins)) == {
        "cloud.driver": f"unknown driver 'fak'; installed drivers: {installed} "
        "(did you mean 'fake'?)"
    }


def test_default_driver_is_checked_too(tmp_path: Path, plugins: Plugins) -> None:
    # No cloud section: the default driver (loopback) must be installed as well.
    path = write(tmp_path, "cluster_id: abcde\n")
    assert list(keyed(check_config(path, plugins))) == ["cloud.driver"]
    assert "unknown driver 'loopback'" in check_config(path, plugins)[0].message


def test_executor_and_boot_probe_names_are_checked(tmp_path: Path, plugins: Plugins) -> None:
    path = write(
        tmp_path,
        """
        cloud:
          driver: fake
          driver_parameters: {region: eu-west-1}
          executor: shh
          boot_probe: comand
        """,
    )
    executors = ", ".join(plugins.names("executor"))
    probes = ", ".join(plugins.names("boot_probe"))
    assert keyed(check_config(path, plugins)) == {
        "cloud.executor": f"unknown executor 'shh'; installed executors: {executors} "
        "(did you mean 'ssh'?)",
        "cloud.boot_probe": f"unknown boot probe 'comand'; installed boot probes: {probes} "
        "(did you mean 'command'?)",
    }


def test_driver_parameter_errors_have_the_driver_parameters_path(
    tmp_path: Path, plugins: Plugins
) -> None:
    path = write(
        tmp_path,
        """
        cloud:
          driver: fake
          driver_parameters:
            regoin: eu-west-1
            zone_count: 0
            network: {subnet: a, public: true}
    """,
    )
    assert keyed(check_config(path, plugins)) == {
        "cloud.driver_parameters.region": "field required",
        "cloud.driver_parameters.regoin": "unknown key (did you mean 'region'?)",
        "cloud.driver_parameters.zone_count": "must be at least 1, got 0",
        "cloud.driver_parameters.network.public": "unknown key (did you mean 'public_ip'?)",
    }


def test_driver_parameter_validator_messages_are_kept(tmp_path: Path, plugins: Plugins) -> None:
    path = write(tmp_path, "cloud: {driver: fake, driver_parameters: {region: us-east-1}}\n")
    assert keyed(check_config(path, plugins)) == {
        "cloud.driver_parameters.region": "region 'us-east-1' is not in Europe"
    }


def test_driver_parameters_are_checked_alongside_other_problems(
    tmp_path: Path, plugins: Plugins
) -> None:
    path = write(
        tmp_path,
        """
        cloud:
          driver: fake
          timeout_idel: 1m
    """,
    )
    assert set(keyed(check_config(path, plugins))) == {
        "cloud.timeout_idel",
        "cloud.driver_parameters.region",
    }


def test_driver_that_validates_with_its_own_code(tmp_path: Path, plugins: Plugins) -> None:
    path = write(tmp_path, "cloud: {driver: picky}\n")
    assert keyed(check_config(path, plugins)) == {
        "cloud.driver_parameters": "credentials file /nope does not exist"
    }


def test_driver_that_cannot_be_imported_fails_only_when_chosen(
    tmp_path: Path, plugins: Plugins
) -> None:
    chosen = write(tmp_path, "cloud: {driver: ghost}\n", "a.yaml")
    (problem,) = check_config(chosen, plugins)
    assert problem.key == "cloud.driver"
    assert "herder_no_such_module" in problem.message
    other = write(tmp_path, "cloud: {driver: fake, driver_parameters: {region: eu-1}}\n", "b.yaml")
    assert check_config(other, plugins) == []


def test_malformed_driver_parameters_are_reported_once(tmp_path: Path, plugins: Plugins) -> None:
    path = write(tmp_path, "cloud: {driver: fake, driver_parameters: [region]}\n")
    assert keyed(check_config(path, plugins)) == {
        "cloud.driver_parameters": "expected a mapping of keys to values, got a list"
    }


def test_without_plugins_driver_checks_are_skipped(tmp_path: Path) -> None:
    path = write(tmp_path, "cloud: {driver: nosuch, driver_parameters: {x: 1}}\n")
    assert check_config(path, None) == []


# ------------------------------------------------------------------------- rendering


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (10, "10s"),
        (90, "1m30s"),
        (600, "10m"),
        (3601, "1h1s"),
        (7200, "2h"),
        (86400, "24h"),
        (0.5, "500ms"),
        (1.5, "1.5s"),
        (0.0015, "1.5ms"),
    ],
)
def test_duration_text_round_trips(seconds: float, text: str) -> None:
    assert duration_text(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("nbytes", "text"),
    [
        (0, "0B"),
        (1023, "1023"),
        (4 * 1024**3, "4GiB"),
        (550 * 1024**2, "550MiB"),
        (500_000_000, "500MB"),
        (2000, "2KB"),
        (1536, "1536"),
    ],
)
def test_size_text_round_trips(nbytes: int, text: str) -> None:
    assert size_text(nbytes) == text
    assert parse_size(text) == nbytes


def test_render_config_round_trips_and_redacts(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        cloud: {timeout_idle: 90s, probe_interval: 250ms}
        containers: {reserve_extra_ram: 550MiB}
        api: {management_token: s3cret}
        instance_types:
          small: {vcpus: 2, ram: 4GiB, gpu: {vram: 16GiB}}
    """,
    )
    config = load_config(path)
    rendered = render_config(config)
    assert rendered["cloud"]["timeout_idle"] == "1m30s"
    assert rendered["cloud"]["probe_interval"] == "250ms"
    assert rendered["containers"]["reserve_extra_ram"] == "550MiB"
    assert rendered["instance_types"]["small"]["ram"] == "4GiB"
    assert rendered["instance_types"]["small"]["gpu"]["vram"] == "16GiB"
    assert rendered["api"]["management_token"] == "<redacted>"
    unredacted = render_config(config, redact=False)
    assert Config.model_validate(unredacted) == config


def test_defaults_render_and_validate() -> None:
    assert Config.model_validate(render_config(Config())) == Config()


# ------------------------------------------------------------------------- management token


def test_management_token_from_file_wins() -> None:
    config = Config.model_validate({"api": {"management_token": "file"}})
    assert config.api.resolve_management_token({"HERDER_MANAGEMENT_TOKEN": "env"}) == "file"


def test_management_token_from_environment_when_file_has_none() -> None:
    config = Config()
    assert config.api.resolve_management_token({"HERDER_MANAGEMENT_TOKEN": " env\n"}) == "env"
    assert config.api.resolve_management_token({}) == ""


def test_management_token_variable_name_is_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    config = Config.model_validate({"api": {"management_token_env": "MY_TOKEN"}})
    monkeypatch.setenv("MY_TOKEN", "abc")
    monkeypatch.setenv("HERDER_MANAGEMENT_TOKEN", "other")
    assert config.api.resolve_management_token() == "abc"


# ------------------------------------------------------------------------- hostile files


@pytest.mark.parametrize(
    ("listen", "why"),
    [
        ("999.1.1.1:99999", "port 99999 is above 65535"),
        ("999.1.1.1:9190", "bad IPv4 address"),
        ("[::zz]:9190", "bad IPv6 address"),
        ("bad_host!:9190", "bad host name"),
        ("127.0.0.1", "expected host:port"),
    ],
)
def test_api_listen_is_checked(tmp_path: Path, listen: str, why: str) -> None:
    path = write(tmp_path, f'api: {{listen: "{listen}"}}\n')
    problems = keyed(check_config(path, None))
    assert why in problems["api.listen"]


@pytest.mark.parametrize(
    "listen", ["127.0.0.1:0", ":9190", "[::1]:9190", "localhost:80", "api.example.org:443"]
)
def test_api_listen_accepts_addresses_and_names(tmp_path: Path, listen: str) -> None:
    assert check_config(write(tmp_path, f'api: {{listen: "{listen}"}}\n'), None) == []


def test_an_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    lines.append("cloud: {driver_parameters: {x: *a8}}")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")  # 1 KiB that would expand to 387 million values
    (problem,) = check_config(path, None)
    assert "expands to more than 100,000 values" in problem.message
    with pytest.raises(ConfigError, match="anchors and aliases"):
        load_config(path)


def test_ordinary_anchors_and_merge_keys_still_work(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        x-type: &base {vcpus: 2, ram: 4GiB, price: 0.1}
        instance_types:
          small: *base
          large: {<<: *base, vcpus: 8}
        """,
    )
    problems = keyed(check_config(path, None))
    assert list(problems) == ["x-type"]  # only the unknown top-level key


SPOT_TYPES = """
instance_types:
  small: {provider_type: s1, vcpus: 1, ram: 1GiB}
  small-spot: {provider_type: s1, vcpus: 1, ram: 1GiB, preemptible: true}
"""


def test_a_preemptible_type_needs_a_driver_that_can_do_spot_with_these_parameters(
    tmp_path: Path, plugins: Plugins
) -> None:
    no_spot = write(
        tmp_path,
        "cloud: {driver: spotty, driver_parameters: {region: eu-1}}\n" + SPOT_TYPES,
        "a.yaml",
    )
    (problem,) = check_config(no_spot, plugins)
    assert problem.key == "instance_types.small-spot.preemptible"
    assert "'spotty' cannot create preemptible" in problem.message
    spot = write(
        tmp_path,
        "cloud: {driver: spotty, driver_parameters: {region: eu-spot}}\n" + SPOT_TYPES,
        "b.yaml",
    )
    assert check_config(spot, plugins) == []


GPU_TYPES = """
instance_types:
  small: {provider_type: s1, vcpus: 1, ram: 1GiB, gpu: {device_count: 0}}
  gpu-small: {provider_type: g1, vcpus: 4, ram: 16GiB,
              gpu: {stack: cuda, hardware_target: "7.5", device_count: 1, vram: 16GiB}}
"""


def test_a_gpu_type_needs_a_driver_that_declares_gpu(tmp_path: Path, plugins: Plugins) -> None:
    without = write(
        tmp_path,
        "cloud: {driver: spotty, driver_parameters: {region: eu-1}}\n" + GPU_TYPES,
        "a.yaml",
    )
    (problem,) = check_config(without, plugins)
    assert problem.key == "instance_types.gpu-small.gpu"
    assert "'spotty' cannot create instances with GPUs" in problem.message
    assert "'gpu' capability" in problem.message
    with_gpu = write(
        tmp_path,
        "cloud: {driver: spotty, driver_parameters: {region: eu-gpu}}\n" + GPU_TYPES,
        "b.yaml",
    )
    assert check_config(with_gpu, plugins) == []


def test_spot_variants_from_the_price_factor_need_spot(tmp_path: Path, plugins: Plugins) -> None:
    text = (
        "cloud: {driver: spotty, driver_parameters: {region: REGION}}\n"
        "containers: {preemptible_price_factor: 0.3}\n"
        "instance_types:\n  small: {provider_type: s1, vcpus: 1, ram: 1GiB}\n"
    )
    (problem,) = check_config(write(tmp_path, text.replace("REGION", "eu-1"), "a.yaml"), plugins)
    assert problem.key == "containers.preemptible_price_factor"
    assert "preemptible (spot) variants" in problem.message
    assert check_config(write(tmp_path, text.replace("REGION", "eu-spot"), "b.yaml"), plugins) == []


def test_always_preemptible_needs_spot(tmp_path: Path, plugins: Plugins) -> None:
    text = (
        "cloud: {driver: spotty, driver_parameters: {region: REGION}}\n"
        "containers: {always_use_preemptible_instances: true}\n"
    )
    (problem,) = check_config(write(tmp_path, text.replace("REGION", "eu-1"), "a.yaml"), plugins)
    assert problem.key == "containers.always_use_preemptible_instances"
    assert "'spot' capability" in problem.message
    assert check_config(write(tmp_path, text.replace("REGION", "eu-spot"), "b.yaml"), plugins) == []


def test_a_driver_declaring_an_unknown_capability_is_a_problem(
    tmp_path: Path, plugins: Plugins
) -> None:
    path = write(tmp_path, "cloud: {driver: misspelt, driver_parameters: {region: eu-1}}\n")
    (problem,) = check_config(path, plugins)
    assert problem.key == "cloud.driver"
    assert "unknown driver capabilities ['spott']" in problem.message

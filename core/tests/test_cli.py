"""The ``herder`` command line: global options, ``plugins``, ``config check``, ``config show``."""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
import yaml

import herder
from herder.app import cli
from herder.app.commands import COMMANDS
from herder.plugin import registry as plugins_module
from herder.plugin.cloud import Driver, DriverContext, DriverParameters, InstanceSet
from herder.plugin.hookspecs import hookimpl
from herder.plugin.registry import Plugins, Registry


class QuietParameters(DriverParameters):
    zone: str = "z1"


class QuietDriver(Driver):
    parameters_model = QuietParameters

    def instance_set(self, params: DriverParameters, context: DriverContext) -> InstanceSet:
        raise NotImplementedError


class QuietPlugin:
    @hookimpl
    def herder_register_drivers(self, registry: Registry) -> None:
        registry.add("quiet", QuietDriver, "a driver for tests")


@pytest.fixture
def fake_plugins() -> Plugins:
    return Plugins.load(entry_points=False, extra=[QuietPlugin()])


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No $HERDER_CONFIG and no ./herder.yaml unless a test makes one."""
    monkeypatch.delenv("HERDER_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)


def write(tmp_path: Path, text: str, name: str = "conf.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


ACCEPTANCE_CONFIG = """
    cluster_id: abcde
    cloud:
      driver: {driver}
      timeout_idel: 1m
      probe_interval: 10 seconds
    instance_types:
      small:
        vcpus: 2
"""


def assert_three_clear_errors(path: str, out: str, err: str) -> None:
    assert out == ""
    assert err.splitlines() == [
        f"{path}: cloud.timeout_idel: unknown key (did you mean 'timeout_idle'?)",
        f"{path}: cloud.probe_interval: invalid duration '10 seconds': expected a number with "
        "a unit (ns, us, ms, s, m, h), e.g. 10s, 1m30s, 2h",
        f"{path}: instance_types.small.ram: field required",
    ]
    assert "Traceback" not in err


# ------------------------------------------------------------------------- config check


def test_config_check_prints_three_clear_errors_and_fails(
    tmp_path: Path, fake_plugins: Plugins, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, ACCEPTANCE_CONFIG.format(driver="quiet"))
    assert cli.main(["config", "check", path], plugins=fake_plugins) == 1
    out, err = capsys.readouterr()
    assert_three_clear_errors(path, out, err)


def test_config_check_with_installed_plugins(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same check as an operator runs it: real plugin discovery, the built-in sim driver."""
    if importlib.util.find_spec("herder.testing.sim") is None:
        pytest.skip("the sim driver (herder.testing.sim) is not in this tree")
    path = write(tmp_path, ACCEPTANCE_CONFIG.format(driver="sim"))
    assert cli.main(["config", "check", path]) == 1
    out, err = capsys.readouterr()
    assert_three_clear_errors(path, out, err)


def test_config_check_warns_of_the_deprecated_ledger_path(
    tmp_path: Path, fake_plugins: Plugins, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        "cloud: {driver: quiet, driver_parameters: {zone: z2}, budget: {ledger_path: /x.jsonl}}\n",
    )
    assert cli.main(["config", "check", path], plugins=fake_plugins) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"{path}: OK"
    assert err.strip() == (
        f"{path}: warning: cloud.budget.ledger_path is deprecated: spend now lives in the "
        "queue; the file it names is only read once, to import it, and the key can be removed"
    )


def test_config_check_ok(
    tmp_path: Path, fake_plugins: Plugins, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "cloud: {driver: quiet, driver_parameters: {zone: z2}}\n")
    assert cli.main(["config", "check", path], plugins=fake_plugins) == 0
    out, err = capsys.readouterr()
    assert out == f"{path}: OK\n"
    assert err == ""


def test_config_check_unknown_driver_lists_installed(
    tmp_path: Path, fake_plugins: Plugins, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "cloud: {driver: quite}\n")
    assert cli.main(["config", "check", path], plugins=fake_plugins) == 1
    installed = ", ".join(fake_plugins.names("driver"))
    assert capsys.readouterr().err == (
        f"{path}: cloud.driver: unknown driver 'quite'; installed drivers: {installed} "
        "(did you mean 'quiet'?)\n"
    )


def test_config_check_driver_parameters(
    tmp_path: Path, fake_plugins: Plugins, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "cloud: {driver: quiet, driver_parameters: {zoen: a}}\n")
    assert cli.main(["config", "check", path], plugins=fake_plugins) == 1
    assert capsys.readouterr().err == (
        f"{path}: cloud.driver_parameters.zoen: unknown key (did you mean 'zone'?)\n"
    )


def test_config_check_yaml_error_has_position(
    tmp_path: Path, fake_plugins: Plugins, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "cloud: {driver: quiet\n")
    assert cli.main(["config", "check", path], plugins=fake_plugins) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{path}:2:1: invalid YAML: ")


def test_config_check_missing_file(
    fake_plugins: Plugins, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["config", "check", "nope.yaml"], plugins=fake_plugins) == 1
    assert capsys.readouterr().err == "nope.yaml: no such file\n"


def test_config_check_defaults_to_the_config_file(
    tmp_path: Path,
    fake_plugins: Plugins,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    write(tmp_path, "cloud: {driver: quiet}\n", "herder.yaml")
    assert cli.main(["config", "check"], plugins=fake_plugins) == 0
    assert capsys.readouterr().out == "herder.yaml: OK\n"

    other = write(tmp_path, "cloud: {driver: quiet}\n", "env.yaml")
    monkeypatch.setenv("HERDER_CONFIG", other)
    assert cli.main(["config", "check"], plugins=fake_plugins) == 0
    assert capsys.readouterr().out == f"{other}: OK\n"

    explicit = write(tmp_path, "cloud: {driver: quiet}\n", "explicit.yaml")
    assert cli.main(["--config", explicit, "config", "check"], plugins=fake_plugins) == 0
    assert capsys.readouterr().out == f"{explicit}: OK\n"


def test_config_check_without_any_file(
    fake_plugins: Plugins, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["config", "check"], plugins=fake_plugins) == 2
    assert "no configuration file given" in capsys.readouterr().err


# ------------------------------------------------------------------------- config show


def test_config_show_defaults(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli.main(["config", "show", "--data-dir", str(tmp_path)]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["cluster_id"] == "<generated by herder serve>"
    assert shown["queue"]["path"] == str(tmp_path / "herder.db")
    assert list(tmp_path.iterdir()) == []  # show creates nothing
    (tmp_path / "cluster_id").write_text("abc12\n")
    assert cli.main(["config", "show", "--data-dir", str(tmp_path)]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["cluster_id"] == "abc12"
    assert shown["cloud"]["timeout_booting"] == "10m"
    assert shown["cloud"]["driver"] == "loopback"
    assert shown["containers"]["reserve_extra_ram"] == "0B"


def test_config_show_json_renders_units_and_redacts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        """
        api: {management_token: s3cret}
        cloud: {timeout_idle: 90}
        instance_types:
          small: {vcpus: 2, ram: 4294967296}
    """,
    )
    assert cli.main(["--config", path, "config", "show", "--json"]) == 0
    out = capsys.readouterr().out
    shown = json.loads(out)
    assert shown["cloud"]["timeout_idle"] == "1m30s"
    assert shown["instance_types"]["small"]["ram"] == "4GiB"
    assert shown["instance_types"]["small"]["provider_type"] == ""
    assert shown["api"]["management_token"] == "<redacted>"
    assert "s3cret" not in out


def test_config_show_with_a_broken_file_is_a_user_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "cloud: {timeout_idle: soon}\n")
    assert cli.main(["--config", path, "config", "show"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("herder: error: invalid configuration:\n")
    assert f"{path}: cloud.timeout_idle: invalid duration 'soon'" in err
    assert "Traceback" not in err


def test_explicit_missing_config_file_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--config", "missing.yaml", "config", "show"]) == 1
    assert "missing.yaml: no such file" in capsys.readouterr().err


# ------------------------------------------------------------------------- plugins


def test_plugins_json_lists_the_builtins(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plugins", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    builtin = next(p for p in listed if p["name"] == "builtin")
    assert builtin["distribution"] == "herder"
    assert builtin["version"] == herder.__version__
    registered = {(r["kind"], r["name"], r["target"]) for r in builtin["registrations"]}
    assert ("driver", "sim", "herder.testing.sim:SimDriver") in registered
    probe = "herder.plugin.bootprobe:CommandBootProbe"
    assert ("boot_probe", "command", probe) in registered
    assert ("executor", "ssh", "herder.ssh.executor:SSHExecutor") in registered


def test_plugins_table_is_aligned(
    fake_plugins: Plugins, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["plugins"], plugins=fake_plugins) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["PLUGIN", "VERSION", "KIND", "NAME", "TARGET"]
    target_column = lines[0].index("TARGET")
    rows = {tuple(line.split()[2:4]): line for line in lines[1:]}
    quiet = rows[("driver", "quiet")]
    assert quiet.split()[1] == "-"  # a plugin object has no distribution version
    assert quiet[target_column:] == f"{QuietDriver.__module__}:QuietDriver"
    sim = rows[("driver", "sim")]
    assert sim.split()[:2] == ["builtin", herder.__version__]
    assert sim[target_column:] == "herder.testing.sim:SimDriver"


def test_broken_plugin_is_reported_and_the_rest_listed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = metadata.EntryPoint("broken", "herder_test_no_such_plugin_module", "herder")
    monkeypatch.setattr(plugins_module, "_entry_points", lambda: [broken])
    assert cli.main(["plugins"]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    table, _, failures = out.partition("\nNot loaded:\n")
    assert "herder.testing.sim:SimDriver" in table
    assert failures.strip().startswith("plugin 'broken': cannot load plugin 'broken'")
    assert "herder_test_no_such_plugin_module" in failures
    assert cli.main(["plugins", "--json"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert "builtin" in listed
    assert listed["broken"]["registrations"] == []
    assert "herder_test_no_such_plugin_module" in listed["broken"]["error"]


def test_choosing_a_broken_plugin_says_why(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    broken = metadata.EntryPoint("broken", "herder_test_no_such_plugin_module", "herder")
    monkeypatch.setattr(plugins_module, "_entry_points", lambda: [broken])
    config = tmp_path / "c.yaml"
    config.write_text("cloud:\n  driver: broken\n")
    assert cli.main(["config", "check", str(config)]) != 0
    out, err = capsys.readouterr()
    assert "unknown driver 'broken'" in out + err
    assert "failed to load: plugin 'broken'" in out + err
    assert "Traceback" not in out + err


# ------------------------------------------------------------------------- the frame


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"herder {herder.__version__}\n"


def test_no_command_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "usage: herder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv", [["frobnicate"], ["config"], ["--log-level", "loud", "plugins"], ["plugins", "-x"]]
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "usage:" in err
    assert "Traceback" not in err


def test_help_lists_every_command_module(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in COMMANDS:
        assert re.search(rf"^    {re.escape(cmd.name)}\b.*", out, re.M), cmd.name
        assert " ".join(cmd.help.split()[:3]) in " ".join(out.split())
    assert "config" in out and "plugins" in out and "--log-level" in out


def test_help_wraps_at_the_terminal_width(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The width comes from $COLUMNS (else the terminal, else 80), as argparse itself finds it."""

    def listing() -> str:  # the description and the epilog are laid out by hand
        assert cli.main(["--help"]) == 0
        return capsys.readouterr().out.split("positional arguments:")[1].split("exit status")[0]

    monkeypatch.setenv("COLUMNS", "60")
    assert max(len(line) for line in listing().splitlines()) <= 58
    monkeypatch.setenv("COLUMNS", "300")
    assert "run the engine against a simulated cloud, faster than real time\n" in listing()


def test_each_command_module_defines_the_commands_the_table_names() -> None:
    """`herder --help` lists the commands from the table without importing their modules; each
    module must define exactly the commands the table gives it, each with a handler."""

    class Recorder:
        def __init__(self) -> None:
            self.parsers: dict[str, argparse.ArgumentParser] = {}

        def add_parser(self, name: str, **kwargs: object) -> argparse.ArgumentParser:
            assert "help" not in kwargs and "aliases" not in kwargs, name  # the table's
            self.parsers[name] = argparse.ArgumentParser(**kwargs)  # type: ignore[arg-type]
            return self.parsers[name]

    for module in {cmd.module for cmd in COMMANDS}:
        recorder = Recorder()
        importlib.import_module(module).register(recorder)
        assert set(recorder.parsers) == {c.name for c in COMMANDS if c.module == module}
        for name, parser in recorder.parsers.items():
            nested = any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)
            assert nested or parser.get_default("handler") is not None, name


def test_a_command_module_is_imported_only_when_its_command_runs() -> None:
    code = (
        "import sys\n"
        "from herder.app import cli\n"
        "status = cli.main(sys.argv[1:])\n"
        "print(sorted(m for m in sys.modules if m.startswith('herder.app.commands.')))\n"
    )

    def commands_imported(*argv: str) -> list[str]:
        out = subprocess.run(
            [sys.executable, "-c", code, *argv],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "HERDER_DATA_DIR": "/nonexistent"},
        ).stdout
        modules: list[str] = ast.literal_eval(out.strip().splitlines()[-1])
        return modules

    assert commands_imported("--help") == []
    assert commands_imported("token", "--help") == ["herder.app.commands.token"]
    # `herder submit --help` shows submit's own options.
    out = subprocess.run(
        [sys.executable, "-m", "herder.app.cli", "submit", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "usage: herder submit [options] -- COMMAND [ARGS...]" in out and "--wait" in out


def test_config_show_fills_in_the_driver_defaults(
    tmp_path: Path, fake_plugins: Plugins, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "cloud: {driver: quiet, driver_parameters: {}}\n")
    assert cli.main(["--config", path, "config", "show", "--json"], plugins=fake_plugins) == 0
    assert json.loads(capsys.readouterr().out)["cloud"]["driver_parameters"] == {"zone": "z1"}

    # A driver that is not installed: the parameters are shown as written.
    path = write(tmp_path, "cloud: {driver: elsewhere, driver_parameters: {a: 1}}\n", "b.yaml")
    assert cli.main(["--config", path, "config", "show", "--json"], plugins=fake_plugins) == 0
    assert json.loads(capsys.readouterr().out)["cloud"]["driver_parameters"] == {"a": 1}


def test_global_options_also_work_after_the_subcommand(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = write(tmp_path, "cluster_id: first\n", "first.yaml")
    second = write(tmp_path, "cluster_id: secnd\n", "second.yaml")
    assert cli.main(["config", "show", "--config", first, "--log-level", "debug"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["cluster_id"] == "first"
    # The one closest to the command wins.
    assert cli.main(["--config", first, "config", "show", "--config", second]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["cluster_id"] == "secnd"
    assert cli.main(["--config", first, "config", "show"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["cluster_id"] == "first"


def test_serve_moves_the_startup_heap_out_of_the_collector() -> None:
    """Objects loaded at start-up are frozen, so full collections stop re-walking them."""
    import gc

    from herder.app.commands.serve import settle_startup_heap

    loaded = [{"record": i} for i in range(1000)]  # stands for the queue's active containers
    gc.unfreeze()
    try:
        settle_startup_heap()
        assert gc.get_freeze_count() >= len(loaded)
        assert not any(gc.is_tracked(x) and x in gc.get_objects(generation=2) for x in loaded[:1])
    finally:
        gc.unfreeze()


def test_config_show_never_prints_a_secret_the_driver_could_not_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        """
        cloud:
          driver: nosuchdriver
          driver_parameters:
            client_secret: hunter2-very-secret
            client_secret_file: /etc/herder/secret
            nested: {password: p4ss, region: eu}
    """,
    )
    assert (
        cli.main(["--config", path, "config", "show", "--json", "--data-dir", str(tmp_path / "d")])
        == 0
    )
    out = capsys.readouterr().out
    assert "hunter2" not in out and "p4ss" not in out
    params = json.loads(out)["cloud"]["driver_parameters"]
    assert params["client_secret"] == "<redacted>"
    assert params["client_secret_file"] == "/etc/herder/secret"
    assert params["nested"] == {"password": "<redacted>", "region": "eu"}

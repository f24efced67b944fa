"""The plugin facade: registration, duplicates, unknown names, lazy imports, entry points."""

from __future__ import annotations

import sys
import textwrap
from importlib import metadata
from pathlib import Path
from typing import Any

import pluggy
import pytest

import herder
from herder.plugin import registry as plugins_module
from herder.plugin.bootprobe import CommandBootProbe
from herder.plugin.cloud import Driver, DriverContext, DriverParameters, InstanceSet
from herder.plugin.executor import ExecResult, Executor
from herder.plugin.hookspecs import hookimpl
from herder.plugin.registry import KINDS, PluginError, Plugins, Registry, load_target


class FakeDriver(Driver):
    def instance_set(self, params: DriverParameters, context: DriverContext) -> InstanceSet:
        raise NotImplementedError


class FakeExecutor(Executor):
    def execute(
        self, command: str, stdin: Any = None, env: Any = None, timeout: Any = None
    ) -> ExecResult:
        return ExecResult(0, b"", b"")

    def set_target(self, instance: Any) -> None:
        pass

    def close(self) -> None:
        pass


class NotADriver:
    pass


class DriverPlugin:
    """Registers ``fake`` (a class) and ``ghost`` (a module that does not exist)."""

    @hookimpl
    def herder_register_drivers(self, registry: Registry) -> None:
        registry.add("fake", FakeDriver, "a fake cloud")
        registry.add("ghost", "herder_no_such_module.driver:GhostDriver")
        registry.add("notadriver", NotADriver)


class ExecutorPlugin:
    @hookimpl
    def herder_register_executors(self, registry: Registry) -> None:
        registry.add("fake", FakeExecutor)


def plugin_registering(kind_hook: str, name: str, target: str | type) -> object:
    """A plugin object whose one hook registers ``name``."""

    def hook(registry: Registry) -> None:
        registry.add(name, target)

    hook.__name__ = kind_hook
    cls = type(f"Plugin_{name}", (), {kind_hook: staticmethod(hookimpl(hook))})
    return cls()


# ------------------------------------------------------------------------- built-ins


def test_builtins_are_registered_through_the_hooks() -> None:
    plugins = Plugins.load(entry_points=False)
    assert "sim" in plugins.names("driver")
    assert "command" in plugins.names("boot_probe")
    assert plugins.registration("executor", "ssh").target == "herder.ssh.executor:SSHExecutor"
    sim = plugins.registration("driver", "sim")
    assert sim.target == "herder.testing.sim:SimDriver"
    assert sim.plugin == "builtin"
    assert plugins.registration("boot_probe", "command").target == (
        "herder.plugin.bootprobe:CommandBootProbe"
    )


def test_builtin_boot_probe_loads() -> None:
    plugins = Plugins.load(entry_points=False)
    assert plugins.boot_probe_class("command") is CommandBootProbe


def test_describe_names_distribution_and_version() -> None:
    infos = Plugins.load(entry_points=False).describe()
    assert [i.name for i in infos] == ["builtin"]
    builtin = infos[0]
    assert builtin.distribution == "herder"
    assert builtin.version == herder.__version__
    assert {("driver", "sim"), ("boot_probe", "command")} <= {
        (r.kind, r.name) for r in builtin.registrations
    }
    as_json = builtin.to_json()
    assert as_json["registrations"][0].keys() == {"kind", "name", "target", "description"}


def test_entry_points_do_not_register_the_builtins_twice() -> None:
    # herder's own distribution declares herder.plugin.builtin as an entry point too.
    plugins = Plugins.load(entry_points=True)
    assert [i.name for i in plugins.describe()].count("builtin") == 1
    assert "sim" in plugins.names("driver")


# ------------------------------------------------------------------------- lookups


def test_extra_plugins_register_classes() -> None:
    plugins = Plugins.load(entry_points=False, extra=[DriverPlugin(), ExecutorPlugin()])
    assert plugins.driver_class("fake") is FakeDriver
    assert plugins.executor_class("fake") is FakeExecutor
    fake = plugins.registration("driver", "fake")
    assert fake.target == f"{FakeDriver.__module__}:FakeDriver"
    assert fake.description == "a fake cloud"
    assert fake.plugin.endswith("DriverPlugin")


def test_unknown_name_lists_installed_and_suggests_the_closest() -> None:
    plugins = Plugins.load(entry_points=False, extra=[DriverPlugin()])
    with pytest.raises(PluginError) as info:
        plugins.driver_class("fak")
    assert str(info.value) == (
        "unknown driver 'fak'; installed drivers: fake, ghost, notadriver, sim "
        "(did you mean 'fake'?)"
    )


def test_unknown_name_without_close_match_has_no_suggestion() -> None:
    plugins = Plugins.load(entry_points=False)
    with pytest.raises(PluginError) as info:
        plugins.driver_class("azure")
    installed = ", ".join(plugins.names("driver"))
    assert str(info.value) == f"unknown driver 'azure'; installed drivers: {installed}"


def test_unknown_name_when_nothing_of_that_kind_is_installed() -> None:
    empty = Plugins(pluggy.PluginManager("herder"), {k: Registry(k) for k in KINDS}, [])
    with pytest.raises(PluginError, match="unknown executor 'ssh'; no executors are installed"):
        empty.executor_class("ssh")


def test_unknown_kind_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown plugin kind"):
        Plugins.load(entry_points=False).names("widget")


def test_import_is_lazy_and_fails_only_when_chosen() -> None:
    plugins = Plugins.load(entry_points=False, extra=[DriverPlugin()])  # no error here
    assert "ghost" in plugins.names("driver")
    assert "herder_no_such_module" not in sys.modules
    assert plugins.driver_class("fake") is FakeDriver
    with pytest.raises(PluginError) as info:
        plugins.driver_class("ghost")
    message = str(info.value)
    assert "driver 'ghost'" in message
    assert "herder_no_such_module" in message
    assert "DriverPlugin" in message  # names the plugin to blame


def test_registered_class_must_have_the_right_base() -> None:
    plugins = Plugins.load(entry_points=False, extra=[DriverPlugin()])
    with pytest.raises(PluginError, match=r"not a subclass of herder\.cloud\.Driver"):
        plugins.driver_class("notadriver")


def test_load_target() -> None:
    assert load_target("herder.cloud:Driver") is Driver
    assert load_target("herder.plugin.cloud") is sys.modules["herder.plugin.cloud"]
    with pytest.raises(PluginError, match=r"cannot load herder\.cloud:Nope"):
        load_target("herder.cloud:Nope")


# ------------------------------------------------------------------------- conflicts


def test_name_registered_by_two_plugins_is_usable_from_neither() -> None:
    first = plugin_registering("herder_register_drivers", "dup", "a.b:C")
    second = plugin_registering("herder_register_drivers", "dup", "x.y:Z")
    plugins = Plugins.load(entry_points=False, extra=[first, second])
    assert "dup" not in plugins.names("driver")
    with pytest.raises(PluginError) as info:
        plugins.driver_class("dup")
    message = str(info.value)
    assert "driver 'dup' is registered twice" in message
    assert "Plugin_dup'" in message and "Plugin_dup#2'" in message
    assert "a.b:C" in message and "x.y:Z" in message
    # The rest still loads, and the conflict is listed with the failures.
    assert "sim" in plugins.names("driver")
    assert [f.plugin for f in plugins.failures()] == ["driver 'dup'"]


def test_same_target_from_two_plugins_is_still_a_conflict() -> None:
    # Two distributions claiming one name is a packaging mistake even if they agree today.
    first = plugin_registering("herder_register_drivers", "dup", "a.b:C")
    second = plugin_registering("herder_register_drivers", "dup", "a.b:C")
    plugins = Plugins.load(entry_points=False, extra=[first, second])
    with pytest.raises(PluginError, match="registered twice"):
        plugins.registration("driver", "dup")


def test_a_third_plugin_on_a_conflicting_name_is_named_too() -> None:
    claims = [plugin_registering("herder_register_drivers", "dup", f"m{i}:C") for i in range(3)]
    plugins = Plugins.load(entry_points=False, extra=claims)
    with pytest.raises(PluginError, match=r"m0:C.*m1:C.*m2:C"):
        plugins.registration("driver", "dup")


def test_shadowing_a_builtin_is_refused_and_the_builtin_stays() -> None:
    shadow = plugin_registering("herder_register_drivers", "sim", "mysim:Driver")
    plugins = Plugins.load(entry_points=False, extra=[shadow])
    assert plugins.registration("driver", "sim").plugin == "builtin"
    (failure,) = plugins.failures()
    assert "by plugin 'builtin'" in failure.error and "mysim:Driver" in failure.error


def test_one_plugin_may_repeat_itself_but_not_contradict_itself() -> None:
    registry = Registry("driver", plugin="p")
    registry.add("a", "m:A")
    registry.add("a", "m:A")
    with pytest.raises(PluginError, match="registered driver 'a' twice"):
        registry.add("a", "m:B")


@pytest.mark.parametrize("target", ["no_colon", "", 42])
def test_target_must_be_a_dotted_path_or_a_class(target: Any) -> None:
    with pytest.raises(PluginError, match=r"expected 'package\.module:Class'"):
        Registry("driver", plugin="p").add("a", target)


@pytest.mark.parametrize("name", ["", " padded", 3])
def test_name_must_be_a_plain_string(name: Any) -> None:
    with pytest.raises(PluginError, match="invalid driver name"):
        Registry("driver", plugin="p").add(name, "m:A")


def test_failing_hook_leaves_that_plugin_out_and_names_it() -> None:
    class Broken:
        @hookimpl
        def herder_register_drivers(self, registry: Registry) -> None:
            registry.add("halfway", "m:Halfway")

        @hookimpl
        def herder_register_executors(self, registry: Registry) -> None:
            raise RuntimeError("boom")

    plugins = Plugins.load(entry_points=False, extra=[Broken(), ExecutorPlugin()])
    (failure,) = plugins.failures()
    assert failure.plugin.endswith("Broken")
    assert "failed in herder_register_executors: boom" in failure.error
    # Nothing of the broken plugin is kept, not even what it registered before failing.
    assert "halfway" not in plugins.names("driver")
    assert not any(i.name.endswith("Broken") for i in plugins.describe())
    # The others load.
    assert plugins.executor_class("fake") is FakeExecutor
    with pytest.raises(PluginError, match=r"failed to load: plugin '.*Broken'.*boom"):
        plugins.driver_class("halfway")


def test_invalid_registration_leaves_that_plugin_out() -> None:
    bad = plugin_registering("herder_register_drivers", " padded", "m:A")
    plugins = Plugins.load(entry_points=False, extra=[bad, DriverPlugin()])
    (failure,) = plugins.failures()
    assert "invalid driver name" in failure.error
    assert plugins.driver_class("fake") is FakeDriver


def test_misspelled_hook_is_reported_and_the_rest_loads() -> None:
    class Typo:
        @hookimpl
        def herder_register_driver(self, registry: Registry) -> None:
            pass

    plugins = Plugins.load(entry_points=False, extra=[Typo(), DriverPlugin()])
    (failure,) = plugins.failures()
    assert "herder_register_driver" in failure.error
    assert plugins.driver_class("fake") is FakeDriver


# ------------------------------------------------------------------------- entry points


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def write_module(directory: Path, name: str, body: str) -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(body))
    sys.modules.pop(name, None)


def use_entry_points(monkeypatch: pytest.MonkeyPatch, *eps: metadata.EntryPoint) -> None:
    monkeypatch.setattr(plugins_module, "_entry_points", lambda: list(eps))


def test_entry_point_plugins_are_loaded(plugin_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_module(
        plugin_dir,
        "herder_test_ep_cloud",
        """
        from herder.plugin.hookspecs import hookimpl

        @hookimpl
        def herder_register_drivers(registry):
            registry.add("epcloud", "herder_test_ep_cloud_impl:Driver", "from an entry point")
    """,
    )
    use_entry_points(monkeypatch, metadata.EntryPoint("epcloud", "herder_test_ep_cloud", "herder"))
    plugins = Plugins.load()
    assert plugins.registration("driver", "epcloud").plugin == "epcloud"
    assert [i.name for i in plugins.describe()] == ["builtin", "epcloud"]
    # The implementation module is not imported until the driver is chosen.
    assert "herder_test_ep_cloud_impl" not in sys.modules
    with pytest.raises(PluginError, match="herder_test_ep_cloud_impl"):
        plugins.driver_class("epcloud")


def test_entry_point_that_fails_to_import_fails_alone(
    plugin_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_module(plugin_dir, "herder_test_ep_broken", "import herder_test_missing_sdk\n")
    write_module(
        plugin_dir,
        "herder_test_ep_good",
        """
        from herder.plugin.hookspecs import hookimpl

        @hookimpl
        def herder_register_drivers(registry):
            registry.add("good", "herder_test_ep_good:Driver")
    """,
    )
    use_entry_points(
        monkeypatch,
        metadata.EntryPoint("broken", "herder_test_ep_broken", "herder"),
        metadata.EntryPoint("good", "herder_test_ep_good", "herder"),
    )
    plugins = Plugins.load()
    (failure,) = plugins.failures()
    assert failure.plugin == "broken"
    assert "cannot load plugin 'broken' (herder_test_ep_broken" in failure.error
    assert "herder_test_missing_sdk" in failure.error
    assert plugins.registration("driver", "good").plugin == "good"
    assert "sim" in plugins.names("driver")
    # Choosing the broken plugin's name says why it is missing.
    with pytest.raises(PluginError) as info:
        plugins.driver_class("broken")
    message = str(info.value)
    assert message.startswith("unknown driver 'broken'")
    assert "failed to load: plugin 'broken'" in message
    assert "herder_test_missing_sdk" in message


def test_two_entry_points_registering_one_name(
    plugin_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in ("herder_test_ep_one", "herder_test_ep_two"):
        write_module(
            plugin_dir,
            module,
            """
            from herder.plugin.hookspecs import hookimpl

            @hookimpl
            def herder_register_drivers(registry):
                registry.add("aws", __name__ + ":Driver")
        """,
        )
    use_entry_points(
        monkeypatch,
        metadata.EntryPoint("one", "herder_test_ep_one", "herder"),
        metadata.EntryPoint("two", "herder_test_ep_two", "herder"),
    )
    plugins = Plugins.load()
    with pytest.raises(PluginError, match="driver 'aws' is registered twice: by plugin 'one'"):
        plugins.driver_class("aws")

"""Dispatchers registered by plugins: the hook, the config key, and what serve runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field

from herder.config import Config, check_config
from herder.dispatch import DispatchBackend, ProbingParameters
from herder.dispatch.service import DispatchService
from herder.engine.interface import InstanceNotFound
from herder.model import ContainerSpec, ContainerState, InstanceType, RuntimeConstraints
from herder.plugin.hookspecs import hookimpl
from herder.plugin.registry import PluginError, Plugins
from herder.queue.base import ContainerQueue
from herder.runtime import VirtualRuntime


class EchoBackend(DispatchBackend):
    """Completes every container it is given with exit code 0 (the guide's example, reduced)."""

    started: ContainerQueue | None = None

    def instance_types(self) -> dict[str, InstanceType]:
        return {"one": InstanceType("one", "one", vcpus=1, ram=1 << 30)}

    def start(self, queue: ContainerQueue) -> None:
        from herder.dispatch import Dispatcher

        def run(job):  # type: ignore[no-untyped-def]
            job.set_running()
            job.finish(0)

        self.dispatcher = Dispatcher(queue, run, runtime=self.runtime)
        self.dispatcher.start()

    def stop(self) -> None:
        self.dispatcher.stop()


class NotABackend:
    pass


@hookimpl
def herder_register_dispatchers(registry):  # type: ignore[no-untyped-def]
    registry.add("echo", EchoBackend, "test backend")
    registry.add("bogus", NotABackend, "not a backend")


class _Plugin:
    herder_register_dispatchers = staticmethod(herder_register_dispatchers)


PLUGIN = _Plugin()


@pytest.fixture
def plugins() -> Plugins:
    return Plugins.load(entry_points=False, extra=[PLUGIN])


def test_dispatcher_class_loads_registered_backends(plugins: Plugins) -> None:
    assert "echo" in plugins.names("dispatcher")
    assert plugins.dispatcher_class("echo") is EchoBackend
    with pytest.raises(PluginError, match="not a"):
        plugins.dispatcher_class("bogus")
    with pytest.raises(PluginError, match="unknown dispatcher 'nope'"):
        plugins.dispatcher_class("nope")


def test_config_defaults_to_the_cloud_engine() -> None:
    assert Config().dispatcher == "cloud" and Config().dispatcher_parameters == {}


def test_config_check_reports_an_unknown_dispatcher(tmp_path: Path, plugins: Plugins) -> None:
    path = tmp_path / "herder.yaml"
    path.write_text("dispatcher: nope\n")
    problems = check_config(path, plugins)
    assert [p.key for p in problems] == ["dispatcher"]
    path.write_text("dispatcher: echo\n")
    assert check_config(path, plugins) == []


def test_service_runs_the_backend_on_a_queue_sized_by_it(plugins: Plugins) -> None:
    rt = VirtualRuntime()
    config = Config.model_validate({"dispatcher": "echo", "queue": {"path": ":memory:"}})
    service = DispatchService(config, runtime=rt, plugins=plugins)
    service.start()
    fits = service.queue.submit(ContainerSpec(command=("true",)))
    too_big = service.queue.submit(
        ContainerSpec(command=("true",), runtime_constraints=RuntimeConstraints(vcpus=2))
    )
    rt.run_until_idle()
    assert service.queue.get(fits.uuid).state is ContainerState.COMPLETE  # type: ignore[union-attr]
    assert too_big.state is ContainerState.CANCELLED
    assert not service.has_instances and service.instances() == []
    assert service.scheduling_statuses() == {} and service.scheduling_passes() == 0
    with pytest.raises(InstanceNotFound, match="echo has no instances"):
        service.kill_instance("i-1", "test")
    service.stop()


def test_the_api_of_an_engine_without_instances_leaves_out_the_instance_routes(
    plugins: Plugins,
) -> None:
    """APIServer reads ``has_instances`` from the engine: no flag to pass, none to forget."""
    from herder.app.api import APIServer

    config = Config.model_validate(
        {
            "dispatcher": "echo",
            "queue": {"path": ":memory:"},
            "api": {"listen": "127.0.0.1:0", "management_token": "t"},
        }
    )
    service = DispatchService(config, runtime=VirtualRuntime(), plugins=plugins)
    paths = set(APIServer(service, config).app.openapi()["paths"])
    service.queue.close()
    assert "/api/v1/containers" in paths
    assert not any("/instances" in p for p in paths)


class ShelfParameters(ProbingParameters):
    shelf: str = Field(description="where jobs go")


class ShelfBackend(EchoBackend):
    parameters_model = ShelfParameters


class _ShelfPlugin:
    @hookimpl
    def herder_register_dispatchers(self, registry):  # type: ignore[no-untyped-def]
        registry.add("shelf", ShelfBackend, "test backend with parameters")


def test_config_check_reports_dispatcher_parameters_under_their_key(tmp_path: Path) -> None:
    """The backend's ``parameters_model`` checks ``dispatcher_parameters`` in config check, as
    a driver's model does ``cloud.driver_parameters``: each problem named by its key."""
    plugins = Plugins.load(entry_points=False, extra=[PLUGIN, _ShelfPlugin()])
    path = tmp_path / "herder.yaml"
    path.write_text("dispatcher: shelf\ndispatcher_parameters: {shelv: a, batch_size: 0}\n")
    problems = {p.key: p.message for p in check_config(path, plugins)}
    assert set(problems) == {
        "dispatcher_parameters.shelf",
        "dispatcher_parameters.shelv",
        "dispatcher_parameters.batch_size",
    }
    assert "did you mean 'shelf'" in problems["dispatcher_parameters.shelv"]
    path.write_text("dispatcher: shelf\ndispatcher_parameters: {shelf: top}\n")
    assert check_config(path, plugins) == []


def test_a_backend_without_parameters_refuses_any(tmp_path: Path, plugins: Plugins) -> None:
    path = tmp_path / "herder.yaml"
    path.write_text("dispatcher: echo\ndispatcher_parameters: {verbose: true}\n")
    assert [p.key for p in check_config(path, plugins)] == ["dispatcher_parameters.verbose"]


def test_the_backend_gets_its_parameters_validated() -> None:
    plugins = Plugins.load(entry_points=False, extra=[PLUGIN, _ShelfPlugin()])
    config = Config.model_validate(
        {
            "dispatcher": "shelf",
            "dispatcher_parameters": {"shelf": "top", "batch_size": 7},
            "queue": {"path": ":memory:"},
        }
    )
    service = DispatchService(config, runtime=VirtualRuntime(), plugins=plugins)
    assert isinstance(service.backend.params, ShelfParameters)
    assert (service.backend.params.shelf, service.backend.params.batch_size) == ("top", 7)
    service.queue.close()

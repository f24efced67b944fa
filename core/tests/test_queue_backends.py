"""Queue backends as plugins: the hook, ``queue.backend`` and ``queue.backend_parameters``
checked like a driver's, and one place that builds the queue for every engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import Field

from herder.config import Config, check_config
from herder.dispatch.service import DispatchService
from herder.engine.cloud_engine import CloudEngine
from herder.engine.sizing import ConfigSizer
from herder.model import ContainerSpec, InstanceType
from herder.plugin.hookspecs import hookimpl
from herder.plugin.registry import PluginError, Plugins, Registry
from herder.queue.backend import (
    QueueBackend,
    QueueContext,
    QueueParameters,
    SqliteBackend,
    open_queue,
)
from herder.queue.base import ContainerQueue
from herder.queue.memory import MemoryQueue
from herder.queue.sqlite import SqliteQueue
from herder.runtime import VirtualRuntime
from herder.testing.sim import SimDriver


class NotebookParameters(QueueParameters):
    shelf: str = Field(description="where the notebook is kept")
    pages: int = Field(10, ge=1)


class NotebookBackend(QueueBackend):
    """An in-memory queue that remembers the context it was opened with."""

    parameters_model = NotebookParameters
    opened: list[tuple[QueueParameters, QueueContext]] = []

    def open(self, params: QueueParameters, context: QueueContext) -> ContainerQueue:
        NotebookBackend.opened.append((params, context))
        return MemoryQueue(context.rules())

    def describe(self, params: QueueParameters, context: QueueContext) -> str:
        assert isinstance(params, NotebookParameters)
        return f"notebook on {params.shelf}"


class NotABackend:
    pass


class Plugin:
    @hookimpl
    def herder_register_queues(self, registry: Registry) -> None:
        registry.add("notebook", NotebookBackend, "test queue")
        registry.add("bogus", NotABackend)


@pytest.fixture
def plugins() -> Plugins:
    NotebookBackend.opened.clear()
    return Plugins.load(entry_points=False, extra=[Plugin()])


def check(tmp_path: Path, text: str, plugins: Plugins) -> dict[str, str]:
    path = tmp_path / "herder.yaml"
    path.write_text("cloud: {driver: sim}\n" + text)
    return {p.key: p.message for p in check_config(path, plugins)}


def test_sqlite_is_built_in(plugins: Plugins) -> None:
    assert plugins.names("queue") == ["bogus", "notebook", "sqlite"]
    assert plugins.registration("queue", "sqlite").plugin == "builtin"
    assert plugins.queue_class("sqlite") is SqliteBackend
    with pytest.raises(PluginError, match="not a subclass"):
        plugins.queue_class("bogus")


def test_unknown_backend_lists_the_installed_ones(tmp_path: Path, plugins: Plugins) -> None:
    problems = check(tmp_path, "queue: {backend: notebok}\n", plugins)
    assert problems == {
        "queue.backend": "unknown queue backend 'notebok'; installed queue backends: bogus, "
        "notebook, sqlite (did you mean 'notebook'?)"
    }


def test_backend_parameters_are_checked_by_the_backend(tmp_path: Path, plugins: Plugins) -> None:
    problems = check(
        tmp_path, "queue: {backend: notebook, backend_parameters: {pages: 0, shlef: a}}\n", plugins
    )
    assert set(problems) == {
        "queue.backend_parameters.shelf",
        "queue.backend_parameters.pages",
        "queue.backend_parameters.shlef",
    }
    assert "shelf" in problems["queue.backend_parameters.shlef"]  # the key probably meant
    assert (
        check(tmp_path, "queue: {backend: notebook, backend_parameters: {shelf: top}}\n", plugins)
        == {}
    )
    # SQLite takes no parameters of its own: its file is queue.path.
    assert set(check(tmp_path, "queue: {backend_parameters: {path: x}}\n", plugins)) == {
        "queue.backend_parameters.path"
    }


def test_open_queue_hands_the_containers_settings_to_the_backend(plugins: Plugins) -> None:
    config = Config.model_validate(
        {
            "cluster_id": "abcde",
            "containers": {"max_dispatch_attempts": 4, "always_use_preemptible_instances": True},
            "queue": {"backend": "notebook", "backend_parameters": {"shelf": "top"}},
        }
    )
    spot = InstanceType("s", "s", vcpus=1, ram=1 << 30, price=0.1, preemptible=True)
    opened_queue = open_queue(
        config, plugins=plugins, runtime=VirtualRuntime(), sizer=ConfigSizer({"s": spot})
    )
    queue, where = opened_queue.queue, opened_queue.description
    assert where == "notebook on top" and opened_queue.dispatch_lock is None
    ((params, context),) = NotebookBackend.opened
    assert params == NotebookParameters(shelf="top")
    assert (context.cluster_id, context.max_dispatch_attempts, context.always_use_preemptible) == (
        "abcde",
        4,
        True,
    )
    c = queue.submit(ContainerSpec(command=("true",)))
    assert c.uuid.startswith("abcde-") and c.scheduling_parameters.preemptible


def _preemptible_config(**extra: Any) -> Config:
    return Config.model_validate(
        {
            "containers": {"always_use_preemptible_instances": True},
            "queue": {"path": ":memory:"},
            "cloud": {"driver": "sim"},
            "instance_types": {"small": {"vcpus": 1, "ram": "1GiB", "preemptible": True}},
            **extra,
        }
    )


def test_every_engine_gets_its_queue_from_the_one_place(plugins: Plugins) -> None:
    """The cloud engine and a plugin dispatcher both honour always_use_preemptible_instances
    (the plugin dispatcher's queue once lost it)."""
    from herder.dispatch import DispatchBackend

    class Idle(DispatchBackend):
        def start(self, queue: ContainerQueue) -> None:
            pass

        def stop(self) -> None:
            pass

    class IdlePlugin:
        @hookimpl
        def herder_register_dispatchers(self, registry: Registry) -> None:
            registry.add("idle", Idle)

    plugins = Plugins.load(entry_points=False, extra=[Plugin(), IdlePlugin()])
    rt = VirtualRuntime()
    engine = CloudEngine(_preemptible_config(), runtime=rt, plugins=plugins, driver=SimDriver())
    service = DispatchService(_preemptible_config(dispatcher="idle"), runtime=rt, plugins=plugins)
    for queue in (engine.queue, service.queue):
        assert isinstance(queue, SqliteQueue)
        c = queue.submit(ContainerSpec(command=("true",)))
        assert c.scheduling_parameters.preemptible
        queue.close()
    assert engine.queue_description == service.queue_description == "sqlite :memory:"

"""One name per class in core, old import names still working, and each default written once."""

from __future__ import annotations

import ast
import dataclasses
from collections import defaultdict
from pathlib import Path

import herder
from herder import defaults
from herder.config import Config
from herder.engine.worker.worker import PoolSettings
from herder.queue.backend import QueueContext

SRC = Path(herder.__file__).parent


def test_no_two_classes_in_core_share_a_name() -> None:
    """Two classes of one name (there were two ``Dispatcher``s and two ``Throttle``s) make every
    import, traceback and search ambiguous."""
    where: dict[str, list[str]] = defaultdict(list)
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                where[node.name].append(str(path.relative_to(SRC)))
    assert {name: paths for name, paths in where.items() if len(paths) > 1} == {}


def test_plugin_authors_import_names_keep_working() -> None:
    from herder.dispatch import Dispatcher, Throttle
    from herder.dispatch.dispatcher import Dispatcher as SDKDispatcher

    assert Dispatcher is SDKDispatcher and Throttle.__module__ == "herder.dispatch.throttle"


def test_the_public_contract_names_are_the_plugin_room_s() -> None:
    """``herder.cloud``, ``herder.executor``, ``herder.hookspecs`` and ``herder.plugins`` are
    what the guide tells plugin authors to import; each re-exports every public name of the
    module in :mod:`herder.plugin` that holds the code, as the same object."""
    import importlib

    pairs = {
        "cloud": "cloud",
        "executor": "executor",
        "hookspecs": "hookspecs",
        "plugins": "registry",
    }
    for public, inner in pairs.items():
        facade = importlib.import_module(f"herder.{public}")
        real = importlib.import_module(f"herder.plugin.{inner}")
        names = [
            n
            for n, v in vars(real).items()
            if not n.startswith("_") and getattr(v, "__module__", None) == real.__name__
        ]
        assert names, inner
        for name in names:
            assert getattr(facade, name) is getattr(real, name), f"herder.{public}.{name}"


def test_the_pool_s_defaults_are_the_configuration_s() -> None:
    """A pool built without a configuration behaves as an unconfigured ``herder serve``."""
    built = PoolSettings.from_config(Config())
    plain = PoolSettings()
    differ = {
        f.name
        for f in dataclasses.fields(PoolSettings)
        if getattr(built, f.name) != getattr(plain, f.name)
    }
    assert differ == set()


def test_a_duration_configured_as_zero_takes_the_default() -> None:
    config = Config.model_validate({"cloud": {"probe_interval": 0, "timeout_idle": 0}})
    settings = PoolSettings.from_config(config)
    assert settings.probe_interval == Config().cloud.probe_interval
    assert settings.timeout_idle == Config().cloud.timeout_idle


def test_queue_defaults_are_the_configuration_s() -> None:
    config = Config()
    context = QueueContext(runtime=None, sizer=None)  # type: ignore[arg-type]
    assert context.max_dispatch_attempts == config.containers.max_dispatch_attempts
    assert context.path == config.queue.path == defaults.QUEUE_FILE
    assert context.cluster_id == config.cluster_id == defaults.CLUSTER_ID


def test_the_client_s_default_port_is_the_api_s() -> None:
    from herder.app.client import listen_url

    assert listen_url("localhost") == "http://localhost:" + Config().api.listen.rpartition(":")[2]

"""One name per class in core, old import names still working, and each default written once."""

from __future__ import annotations

import ast
import dataclasses
from collections import defaultdict
from pathlib import Path

import pytest

import herder
from herder import defaults
from herder.config import Config
from herder.dispatcher import CloudEngine
from herder.queue.backend import QueueContext
from herder.worker.worker import PoolSettings

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


def test_the_cloud_engine_s_former_name_imports_with_a_warning() -> None:
    import herder.dispatcher

    with pytest.warns(DeprecationWarning, match="now herder.dispatcher.CloudEngine"):
        assert herder.dispatcher.Dispatcher is CloudEngine  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        herder.dispatcher.Nothing  # type: ignore[attr-defined]  # noqa: B018


def test_the_pool_s_defaults_are_the_configuration_s() -> None:
    """A pool built without a configuration behaves as an unconfigured ``herder serve``."""
    built = PoolSettings.from_config(Config())
    plain = PoolSettings()
    differ = {f.name for f in dataclasses.fields(PoolSettings)
              if getattr(built, f.name) != getattr(plain, f.name)}
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
    from herder.client import listen_url

    assert listen_url("localhost") == "http://localhost:" + Config().api.listen.rpartition(":")[2]

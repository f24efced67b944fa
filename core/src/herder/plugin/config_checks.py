"""The checks of a configuration that need the installed plugins.

The configuration models (:mod:`herder.config`) check what a file says by itself; whether the
driver, executor, boot probe, dispatcher and queue backend it names are installed, and whether
each plugin's own parameters model accepts its parameters, is known only here, above the
registry.  :meth:`herder.plugins.Plugins.config_problems` runs these for ``herder config check``
and ``herder serve``.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from herder.config import CloudConfig, ConfigProblem, QueueConfig, problems_from_validation_error
from herder.plugin.registry import PluginError, Plugins


def plugin_problems(data: dict[str, Any], plugins: Plugins) -> list[ConfigProblem]:
    """Every problem the installed plugins find in the parsed configuration ``data``."""
    return [
        *_plugin_name_problems(data, plugins),
        *_driver_problems(data, plugins),
        *_dispatcher_problems(data, plugins),
        *_queue_problems(data, plugins),
    ]


def _plugin_name_problems(data: dict[str, Any], plugins: Plugins) -> list[ConfigProblem]:
    """``cloud.executor`` and ``cloud.boot_probe`` must name installed plugins.

    Only the names are checked: their classes are imported when the dispatcher starts.
    """
    cloud = data.get("cloud", {})
    if not isinstance(cloud, dict):
        return []
    problems = []
    dispatcher = data.get("dispatcher", "cloud")
    known = plugins.names("dispatcher")
    if isinstance(dispatcher, str) and dispatcher != "cloud" and dispatcher not in known:
        message = plugins.unknown_name_message("dispatcher", dispatcher)
        problems.append(ConfigProblem("dispatcher", message))
    for kind in ("executor", "boot_probe"):
        name = cloud.get(kind, CloudConfig.model_fields[kind].default)
        if isinstance(name, str) and name not in plugins.names(kind):
            problems.append(
                ConfigProblem(f"cloud.{kind}", plugins.unknown_name_message(kind, name))
            )
    return problems


def _driver_problems(data: dict[str, Any], plugins: Plugins) -> list[ConfigProblem]:
    """The driver must be installed, and its own model must accept ``driver_parameters``.

    Not checked when another dispatcher than the cloud engine is chosen: it never loads one.
    """
    if data.get("dispatcher", "cloud") != "cloud":
        return []
    cloud = data.get("cloud", {})
    if not isinstance(cloud, dict):
        return []  # reported by the model already
    name = cloud.get("driver", CloudConfig.model_fields["driver"].default)
    if not isinstance(name, str):
        return []
    if name not in plugins.names("driver"):
        return [ConfigProblem("cloud.driver", plugins.unknown_name_message("driver", name))]
    try:
        driver_cls = plugins.driver_class(name)
    except PluginError as exc:
        return [ConfigProblem("cloud.driver", str(exc))]
    raw = cloud.get("driver_parameters") or {}
    if not isinstance(raw, dict):
        return []  # reported by the model already
    prefix = ("cloud", "driver_parameters")
    try:
        params = driver_cls.validate_parameters(raw)
    except ValidationError as exc:
        return problems_from_validation_error(exc, driver_cls.parameters_model, prefix)
    except (ValueError, TypeError) as exc:
        return [ConfigProblem("cloud.driver_parameters", str(exc))]
    return _capability_problems(data, name, driver_cls, params)


def _dispatcher_problems(data: dict[str, Any], plugins: Plugins) -> list[ConfigProblem]:
    """A plugin dispatcher's own model must accept ``dispatcher_parameters``.

    An unknown name is reported by :func:`_plugin_name_problems`; the cloud engine takes its
    parameters under ``cloud`` and reads no ``dispatcher_parameters``.
    """
    name = data.get("dispatcher", "cloud")
    if not isinstance(name, str) or name == "cloud" or name not in plugins.names("dispatcher"):
        return []
    try:
        backend_cls = plugins.dispatcher_class(name)
    except PluginError as exc:
        return [ConfigProblem("dispatcher", str(exc))]
    raw = data.get("dispatcher_parameters") or {}
    if not isinstance(raw, dict):
        return []  # reported by the model already
    try:
        backend_cls.validate_parameters(raw)
    except ValidationError as exc:
        prefix = ("dispatcher_parameters",)
        return problems_from_validation_error(exc, backend_cls.parameters_model, prefix)
    except (ValueError, TypeError) as exc:
        return [ConfigProblem("dispatcher_parameters", str(exc))]
    return []


def _queue_problems(data: dict[str, Any], plugins: Plugins) -> list[ConfigProblem]:
    """The queue backend must be installed, and its own model must accept
    ``queue.backend_parameters``."""
    queue = data.get("queue", {})
    if not isinstance(queue, dict):
        return []  # reported by the model already
    name = queue.get("backend", QueueConfig.model_fields["backend"].default)
    if not isinstance(name, str):
        return []
    if name not in plugins.names("queue"):
        return [ConfigProblem("queue.backend", plugins.unknown_name_message("queue", name))]
    try:
        backend_cls = plugins.queue_class(name)
    except PluginError as exc:
        return [ConfigProblem("queue.backend", str(exc))]
    raw = queue.get("backend_parameters") or {}
    if not isinstance(raw, dict):
        return []  # reported by the model already
    try:
        backend_cls.validate_parameters(raw)
    except ValidationError as exc:
        prefix = ("queue", "backend_parameters")
        return problems_from_validation_error(exc, backend_cls.parameters_model, prefix)
    except (ValueError, TypeError) as exc:
        return [ConfigProblem("queue.backend_parameters", str(exc))]
    return []


def _capability_problems(
    data: dict[str, Any], name: str, driver_cls: Any, params: Any
) -> list[ConfigProblem]:
    """Instance types the driver cannot create with these parameters (what it declares through
    ``Driver.capabilities_for``): a preemptible type (or the spot variants that
    ``containers.preemptible_price_factor`` adds, or ``always_use_preemptible_instances``)
    needs ``spot``, a type with GPUs needs ``gpu``.  A driver declaring an unknown capability
    is a problem too, so a misspelling cannot switch a feature off."""
    from herder.plugin.cloud import Capability

    try:
        capabilities = driver_cls().capabilities_for(params)
    except (ValueError, TypeError) as exc:
        return [ConfigProblem("cloud.driver", f"driver {name!r}: {exc}")]
    problems: list[ConfigProblem] = []
    cannot = (
        f"driver {name!r} cannot create {{what}} with these driver_parameters (it does not "
        "declare the {capability!r} capability)"
    )
    spot = Capability.SPOT in capabilities
    containers = data.get("containers")
    factor = containers.get("preemptible_price_factor") if isinstance(containers, dict) else 0
    if not spot and isinstance(factor, (int, float)) and factor > 0:
        problems.append(
            ConfigProblem(
                "containers.preemptible_price_factor",
                cannot.format(what="the preemptible (spot) variants this adds", capability="spot"),
            )
        )
    always = (
        containers.get("always_use_preemptible_instances")
        if isinstance(containers, dict)
        else False
    )
    if not spot and always is True:
        problems.append(
            ConfigProblem(
                "containers.always_use_preemptible_instances",
                cannot.format(
                    what="the preemptible (spot) instances this asks for", capability="spot"
                ),
            )
        )
    types = data.get("instance_types") or {}
    if not isinstance(types, dict):
        return problems
    for type_name, spec in types.items():
        if not isinstance(spec, dict):
            continue
        if not spot and spec.get("preemptible") is True:
            problems.append(
                ConfigProblem(
                    f"instance_types.{type_name}.preemptible",
                    cannot.format(what="preemptible (spot) instances", capability="spot"),
                )
            )
        gpu = spec.get("gpu")
        count = gpu.get("device_count") if isinstance(gpu, dict) else None
        if (
            Capability.GPU not in capabilities
            and isinstance(count, int)
            and not isinstance(count, bool)
            and count > 0
        ):
            problems.append(
                ConfigProblem(
                    f"instance_types.{type_name}.gpu",
                    cannot.format(what="instances with GPUs", capability="gpu"),
                )
            )
    return problems

"""Every hook a herder plugin can implement.

herder's plugins are registration hooks, as in pytest, llm and datasette: a plugin module (named
by an entry point in the ``herder`` group) implements one or more of these functions and
registers names with dotted paths to the classes that implement them.  Registration by dotted
path means only the chosen driver's SDK is ever imported.  herder's own built-ins
(``herder.builtin``) register through the same hooks.

All hooks are called once, at start-up, on the main thread, from :class:`herder.plugins.Plugins`
(the only place that talks to pluggy).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from herder.plugins import Registry

PROJECT = "herder"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def herder_register_drivers(registry: Registry) -> None:
    """Register cloud drivers: ``registry.add("aws", "herder_driver_aws.driver:AWSDriver")``.

    The class must subclass :class:`herder.cloud.Driver`.  Built-in: ``sim`` (in
    ``herder.testing``).
    """


@hookspec
def herder_register_executors(registry: Registry) -> None:
    """Register executors (how commands reach an instance), subclasses of
    :class:`herder.executor.Executor` whose constructor takes ``(instance, config, runtime)``.
    """


@hookspec
def herder_register_boot_probes(registry: Registry) -> None:
    """Register boot probes, subclasses of :class:`herder.worker.bootprobe.BootProbe`.

    Built-in: ``command`` (runs ``cloud.boot_probe_command``, SPEC §3.6).
    """

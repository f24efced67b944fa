"""Every hook a herder plugin can implement.

herder's plugins are registration hooks, as in pytest, llm and datasette: a plugin module (named
by an entry point in the ``herder`` group) implements one or more of these functions and
registers names with dotted paths to the classes that implement them.  Registration by dotted
path means only the chosen driver's SDK is ever imported.  herder's own built-ins
(``herder.plugin.builtin``) register through the same hooks.

A complete plugin is one module and one entry point::

    # herder_driver_mycloud/plugin.py
    from herder.plugin.hookspecs import hookimpl

    @hookimpl
    def herder_register_drivers(registry):
        registry.add("mycloud", "herder_driver_mycloud.driver:MyCloudDriver", "My Cloud VMs")

    # pyproject.toml
    [project.entry-points.herder]
    mycloud = "herder_driver_mycloud.plugin"

All hooks are called once, at start-up, on the main thread, from :class:`herder.plugins.Plugins`
(the only place that talks to pluggy), once per plugin, so that herder knows which plugin
registered which name.  A name registered by two plugins is an error naming both.  Hooks must
not import heavy modules or talk to the network: ``herder plugins`` and ``herder config check``
call them too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from herder.plugin.registry import Registry

PROJECT = "herder"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def herder_register_drivers(registry: Registry) -> None:
    """Register cloud drivers: ``registry.add("aws", "herder_driver_aws.driver:AWSDriver")``.

    The class must subclass :class:`herder.cloud.Driver` and take no constructor arguments; its
    ``parameters_model`` validates ``cloud.driver_parameters`` (``herder config check`` reports
    its errors under that key).  It is imported only when ``cloud.driver`` names it.
    Built-in: ``sim``, the simulated cloud in :mod:`herder.testing`.
    """


@hookspec
def herder_register_executors(registry: Registry) -> None:
    """Register executors (how commands reach an instance), subclasses of
    :class:`herder.executor.Executor` whose constructor takes ``(instance, config, runtime)``.

    The one named by ``cloud.executor`` is imported when the dispatcher starts.
    """


@hookspec
def herder_register_boot_probes(registry: Registry) -> None:
    """Register boot probes: classes whose constructor takes the ``cloud.boot_probe_command``
    string and which decide whether a new instance has booted
    (:mod:`herder.plugin.bootprobe`).

    Built-in: ``command`` (runs ``cloud.boot_probe_command`` through the executor, SPEC §3.6).
    """


@hookspec
def herder_register_dispatchers(registry: Registry) -> None:
    """Register dispatchers that ``herder serve`` runs instead of the cloud engine:
    ``registry.add("local", "herder_dispatcher_local.backend:LocalBackend")``.

    The class must subclass :class:`herder.dispatch.DispatchBackend`; it is imported only when
    the ``dispatcher`` configuration key names it.
    """


@hookspec
def herder_register_queues(registry: Registry) -> None:
    """Register queue backends: ``registry.add("postgres", "herder_queue_postgres:Backend")``.

    The class must subclass :class:`herder.queue.backend.QueueBackend` and take no constructor
    arguments; its ``parameters_model`` validates ``queue.backend_parameters`` (``herder config
    check`` reports its errors under that key).  It is imported only when ``queue.backend``
    names it.  Built-in: ``sqlite``, the embedded queue in one file.
    """

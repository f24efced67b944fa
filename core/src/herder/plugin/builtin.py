"""herder's built-in plugins, registered through the same hooks as third-party ones.

Only dotted paths appear here, so loading the built-ins imports nothing but this module.
"""

from __future__ import annotations

from herder.plugin.hookspecs import hookimpl
from herder.plugin.registry import Registry


@hookimpl
def herder_register_drivers(registry: Registry) -> None:
    """The simulated cloud: tests, demos and scale benchmarks run on it."""
    registry.add(
        "sim", "herder.testing.sim:SimDriver", "simulated cloud for tests and `herder simulate`"
    )


@hookimpl
def herder_register_executors(registry: Registry) -> None:
    """The default executor: SSH with one shared connection per instance (SPEC §6.2)."""
    registry.add("ssh", "herder.ssh.executor:SSHExecutor", "runs commands over SSH (paramiko)")


@hookimpl
def herder_register_boot_probes(registry: Registry) -> None:
    """The default boot probe: run ``cloud.boot_probe_command`` through the executor."""
    registry.add(
        "command",
        "herder.plugin.bootprobe:CommandBootProbe",
        "runs cloud.boot_probe_command on the instance; exit 0 means booted",
    )


@hookimpl
def herder_register_queues(registry: Registry) -> None:
    """The embedded queue: one SQLite file at ``queue.path``."""
    registry.add("sqlite", "herder.queue.backend:SqliteBackend", "SQLite file at queue.path")

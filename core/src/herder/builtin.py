"""herder's built-in plugins, registered through the same hooks as third-party ones."""

from __future__ import annotations

from herder.hookspecs import hookimpl
from herder.plugins import Registry


@hookimpl
def herder_register_drivers(registry: Registry) -> None:
    registry.add(
        "sim", "herder.testing.sim:SimDriver", "simulated cloud for tests and `herder simulate`"
    )

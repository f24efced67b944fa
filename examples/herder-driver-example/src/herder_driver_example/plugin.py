"""Registers the ``example`` driver with herder (entry point ``herder: example``).

Keep this module cheap to import: ``herder plugins`` imports every plugin module.  The driver
is named by its dotted path, so its module (and its cloud SDK) is imported only when a
configuration selects ``driver: example``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from herder.hookspecs import hookimpl

if TYPE_CHECKING:
    from herder.plugins import Registry


@hookimpl
def herder_register_drivers(registry: Registry) -> None:
    """One line per driver: name, ``module:Class``, one-line description."""
    registry.add(
        "example",
        "herder_driver_example.driver:ExampleDriver",
        "in-memory example cloud: each instance is an SSH server on this host",
    )

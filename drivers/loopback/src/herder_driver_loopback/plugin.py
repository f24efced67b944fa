"""Registers the ``loopback`` driver (entry point ``herder: loopback``).

Only the dotted path appears here, so ``herder plugins`` does not import paramiko's server side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from herder.hookspecs import hookimpl

if TYPE_CHECKING:
    from herder.plugins import Registry


@hookimpl
def herder_register_drivers(registry: Registry) -> None:
    """The local host as a cloud: each instance is an SSH server on 127.0.0.1."""
    registry.add(
        "loopback",
        "herder_driver_loopback.driver:LoopbackDriver",
        "the local host as a cloud (one local SSH server per instance)",
    )

"""Registers the ``libcloud`` driver (entry point ``herder: libcloud``).

Only the dotted path appears here, so ``herder plugins`` does not import libcloud.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from herder.hookspecs import hookimpl

if TYPE_CHECKING:
    from herder.plugins import Registry


@hookimpl
def herder_register_drivers(registry: Registry) -> None:
    """Any compute provider of apache-libcloud, with tested presets."""
    registry.add(
        "libcloud",
        "herder_driver_libcloud.driver:LibcloudDriver",
        "any apache-libcloud compute provider (tested presets: dummy, ec2, openstack)",
    )

"""Registers the ``gce`` driver (entry point ``herder: gce``).

Only the dotted path appears here, so ``herder plugins`` does not import google-cloud-compute.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from herder.hookspecs import hookimpl

if TYPE_CHECKING:
    from herder.plugins import Registry


@hookimpl
def herder_register_drivers(registry: Registry) -> None:
    """Google Compute Engine through google-cloud-compute."""
    registry.add(
        "gce",
        "herder_driver_gce.driver:GCEDriver",
        "Google Compute Engine (standard and spot VMs) through google-cloud-compute",
    )

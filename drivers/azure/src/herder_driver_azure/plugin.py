"""Registers the ``azure`` driver (entry point ``herder: azure``).

Only the dotted path appears here, so ``herder plugins`` does not import the Azure SDK.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from herder.hookspecs import hookimpl

if TYPE_CHECKING:
    from herder.plugins import Registry


@hookimpl
def herder_register_drivers(registry: Registry) -> None:
    """Microsoft Azure through azure-mgmt-compute."""
    registry.add(
        "azure",
        "herder_driver_azure.driver:AzureDriver",
        "Microsoft Azure virtual machines (on-demand and spot) through azure-mgmt-compute",
    )

"""Registers the ``aws`` driver (entry point ``herder: aws``).

Only the dotted path appears here, so ``herder plugins`` does not import boto3.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from herder.hookspecs import hookimpl

if TYPE_CHECKING:
    from herder.plugins import Registry


@hookimpl
def herder_register_drivers(registry: Registry) -> None:
    """Amazon EC2 through boto3."""
    registry.add(
        "aws",
        "herder_driver_aws.driver:AWSDriver",
        "Amazon EC2 (on-demand and spot instances) through boto3",
    )

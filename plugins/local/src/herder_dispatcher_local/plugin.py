"""Registers the ``local`` dispatcher (entry point ``herder: local``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from herder.hookspecs import hookimpl

if TYPE_CHECKING:
    from herder.plugins import Registry


@hookimpl
def herder_register_dispatchers(registry: Registry) -> None:
    """Containers run on this host, under herder's runner agent, without SSH or a cloud."""
    registry.add(
        "local",
        "herder_dispatcher_local.backend:LocalBackend",
        "runs containers on this host as processes (or docker/podman), no SSH or cloud",
    )

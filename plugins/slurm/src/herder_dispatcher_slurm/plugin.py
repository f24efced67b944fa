"""Registers the ``slurm`` dispatcher (entry point ``herder: slurm``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from herder.hookspecs import hookimpl

if TYPE_CHECKING:
    from herder.plugins import Registry


@hookimpl
def herder_register_dispatchers(registry: Registry) -> None:
    """Containers run as Slurm batch jobs (sbatch, squeue, scancel)."""
    registry.add(
        "slurm",
        "herder_dispatcher_slurm.backend:SlurmBackend",
        "runs containers as Slurm batch jobs (sbatch, squeue, scancel)",
    )

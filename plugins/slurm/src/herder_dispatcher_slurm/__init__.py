"""herder's ``slurm`` dispatcher: containers run as Slurm batch jobs."""

from herder_dispatcher_slurm.backend import SlurmBackend, SlurmParameters

__all__ = ["SlurmBackend", "SlurmParameters"]

"""A one-node Slurm cluster on this machine, started for the tests that need a real Slurm."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from herder_dispatcher_slurm.localcluster import LocalSlurm, missing_prerequisites


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """slurmctld and one slurmd (2 CPUs, 2000 MB) in the foreground; SLURM_CONF points at them."""
    problem = missing_prerequisites()
    if problem:
        pytest.skip(f"needs a private Slurm: {problem}")
    d = tmp_path_factory.mktemp("slurm")
    with LocalSlurm(d, nodes=1, cpus_per_node=2, real_memory_mb=2000, min_job_age=300):
        yield d

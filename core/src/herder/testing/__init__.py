"""Test support that ships with herder.

:mod:`herder.testing.sim` is the ``sim`` driver: a simulated cloud with a simulated runner
and fault knobs, for tests and ``herder simulate``.
"""

from herder.testing.sim import (
    DoubleRun,
    SimCloud,
    SimDriver,
    SimExecutor,
    SimInstance,
    SimInstanceSet,
    SimParameters,
    SimStats,
)

__all__ = [
    "DoubleRun",
    "SimCloud",
    "SimDriver",
    "SimExecutor",
    "SimInstance",
    "SimInstanceSet",
    "SimParameters",
    "SimStats",
]

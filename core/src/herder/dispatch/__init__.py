"""Write a dispatcher that runs herder's containers somewhere the cloud engine does not reach.

:class:`Dispatcher` watches a :class:`~herder.queue.base.ContainerQueue`, locks the containers it
may run and calls a function once per container with a :class:`Job`: the container's record, a
stream of its later records (:class:`Updates`) and the state changes the function may make.
:class:`DispatchBackend` is what a plugin registers so that ``herder serve`` runs it;
:class:`ProbingBackend` does the common work of one that hands containers to another system.
The guide is ``docs/dispatch.md``.
"""

from herder.dispatch.backend import (
    DispatchBackend,
    DispatcherParameters,
    ProbingBackend,
    ProbingParameters,
)
from herder.dispatch.dispatcher import CanRun, Dispatcher, Job, RunFunction, UpdateAction
from herder.dispatch.throttle import Throttle
from herder.dispatch.updates import CloseReason, Updates

__all__ = [
    "CanRun",
    "CloseReason",
    "DispatchBackend",
    "Dispatcher",
    "DispatcherParameters",
    "Job",
    "ProbingBackend",
    "ProbingParameters",
    "RunFunction",
    "Throttle",
    "UpdateAction",
    "Updates",
]

"""Dispatchers that ``herder serve`` can run instead of the cloud engine.

A plugin registers a :class:`DispatchBackend` subclass under a name with the
``herder_register_dispatchers`` hook; ``dispatcher: <name>`` in the configuration file selects
it, and ``dispatcher_parameters`` is passed to it unchanged.  The backend usually builds a
:class:`herder.dispatch.Dispatcher` in :meth:`DispatchBackend.start`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry

from herder.config import Config
from herder.model import InstanceType
from herder.queue.base import ContainerQueue
from herder.runtime import Runtime


class DispatchBackend(ABC):
    """One way to run containers that is not herder's cloud engine.

    Constructed once per ``herder serve`` with the whole configuration, its own
    ``dispatcher_parameters`` (validate them here and raise ``ValueError`` with a clear message),
    the runtime and the metrics registry.
    """

    def __init__(
        self,
        config: Config,
        parameters: Mapping[str, Any],
        *,
        runtime: Runtime,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        self.parameters = dict(parameters)
        self.runtime = runtime
        self.registry = registry if registry is not None else CollectorRegistry()

    def instance_types(self) -> dict[str, InstanceType]:
        """What containers are sized against: a submission no type fits is cancelled at once.

        The configured ``instance_types`` by default; a backend that knows its capacity (the
        local host, a cluster's largest node) describes it instead.
        """
        return self.config.build_instance_types()

    @abstractmethod
    def start(self, queue: ContainerQueue) -> None:
        """Start taking containers from ``queue``; must return promptly."""

    @abstractmethod
    def stop(self) -> None:
        """Stop taking containers.  Containers that run on are taken up again at next start."""

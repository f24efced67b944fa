"""What ``herder serve`` runs when ``dispatcher`` names a :class:`DispatchBackend`.

The management API was written against the cloud engine (:class:`herder.dispatcher.Dispatcher`);
this service offers the same attributes so that the container, service and status routes work
unchanged.  There are no instances: the pool reports none and the instance actions are not
served (``APIServer(..., with_instances=False)``), and the scheduler reports no scheduling status.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry

from herder.config import Config
from herder.dispatch.backend import DispatchBackend
from herder.model import ContainerState, InstanceView
from herder.plugins import Plugins
from herder.queue.backend import DispatchLock, open_queue
from herder.queue.base import ContainerQueue
from herder.runtime import Runtime
from herder.sizing import ConfigSizer

log = logging.getLogger(__name__)


class NoInstances:
    """The pool as the API sees it, for a backend that has no instances."""

    def instances(self) -> list[InstanceView]:
        return []

    def running(self) -> dict[str, float]:
        """No runners the API could wait for (the backend collects logs at the exit)."""
        return {}

    def check_health(self) -> None:
        """Healthy while the process serves: the backend reports its own failures in logs."""


class NoScheduler:
    """The scheduler as the API sees it: no pass ever records a scheduling status."""

    passes = 0

    def snapshot(self) -> list[Any]:
        return []


class DispatchService:
    """The configured queue plus one backend, started and stopped together."""

    def __init__(
        self,
        config: Config,
        *,
        runtime: Runtime,
        plugins: Plugins | None = None,
        queue: ContainerQueue | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        self.runtime = runtime
        self.plugins = plugins or Plugins.load()
        self.registry = registry if registry is not None else CollectorRegistry()
        cls = self.plugins.dispatcher_class(config.dispatcher)
        self.backend: DispatchBackend = cls(
            config, config.dispatcher_parameters, runtime=runtime, registry=self.registry
        )
        self.instance_types = self.backend.instance_types()
        #: Where the queue lives, for the start-up log line.
        self.queue_description = "given"
        #: Held before :meth:`start` when this herder may be a standby (``herder serve``).
        self.dispatch_lock: DispatchLock | None = None
        if queue is None:
            opened = open_queue(
                config,
                plugins=self.plugins,
                runtime=runtime,
                sizer=ConfigSizer(
                    self.instance_types,
                    reserve_extra_ram=config.containers.reserve_extra_ram,
                    maximum_price_factor=config.containers.maximum_price_factor,
                ),
            )
            queue, self.queue_description = opened.queue, opened.description
            self.dispatch_lock = opened.dispatch_lock
        self.queue = queue
        self.pool = NoInstances()
        self.scheduler = NoScheduler()

    def start(self) -> None:
        self.backend.start(self.queue)

    def halt(self) -> None:
        """Stop dispatching at once (the dispatch lock was lost); the queue stays open."""
        self.backend.stop()

    def stop(self) -> None:
        self.backend.stop()
        self.queue.close()
        if self.dispatch_lock is not None:
            self.dispatch_lock.release()

    def active_counts(self) -> dict[ContainerState, int]:
        return self.queue.counts()


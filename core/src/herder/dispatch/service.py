"""What ``herder serve`` runs when ``dispatcher`` names a :class:`DispatchBackend`.

:class:`DispatchService` implements :class:`herder.engine.interface.Engine`, as the cloud
engine does, so the management API serves it unchanged.  It has no instances (``has_instances``
is False: the API leaves the instance routes out) and no scheduler (no pass ever records a
scheduling status).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from herder.config import Config
from herder.dispatch.backend import DispatchBackend
from herder.engine.interface import InstanceNotFound
from herder.engine.sizing import ConfigSizer
from herder.model import ContainerState, IdleBehavior, InstanceView
from herder.plugin.registry import Plugins
from herder.queue.backend import DispatchLock, open_queue
from herder.queue.base import ContainerQueue
from herder.runtime import Runtime

if TYPE_CHECKING:
    from herder.costs import CostReport
    from herder.engine.scheduler.quotas import QuotaState
    from herder.spend import BudgetState

log = logging.getLogger(__name__)


class DispatchService:
    """The configured queue plus one backend, started and stopped together."""

    #: A backend hands containers to another system: there are no instances to show or command.
    has_instances = False

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

    # ---- the engine interface: no instances, no scheduler

    def instances(self) -> list[InstanceView]:
        return []

    def kill_instance(self, instance_id: str, reason: str) -> None:
        raise InstanceNotFound(f"dispatcher {self.config.dispatcher} has no instances")

    def set_idle_behavior(self, instance_id: str, behavior: IdleBehavior) -> None:
        raise InstanceNotFound(f"dispatcher {self.config.dispatcher} has no instances")

    def check_health(self) -> None:
        """Healthy while the process serves: the backend reports its own failures in logs."""

    def scheduling_passes(self) -> int:
        return 0

    def scheduling_statuses(self) -> dict[str, str]:
        """The backend decides what runs when; it records no scheduling status."""
        return {}

    # No instances: no quotas to watch, no spend to keep.
    quotas_enabled = False

    def quota_states(self) -> list[QuotaState]:
        return []

    def budget_state(self) -> BudgetState | None:
        return None

    def cost_report(self, period: str, periods: int) -> CostReport | None:
        return None

    def has_runner(self, uuid: str) -> bool:
        """The backend stores a container's whole log when it records the exit."""
        return False

    def spot_prices(self) -> dict[str, float]:
        """No instances, so no spot price seen."""
        return {}

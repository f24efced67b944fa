"""The engine interface: what the management API, the CLI and the status page need of an engine.

``herder serve`` runs one of two engines: the cloud engine
(:class:`herder.engine.cloud_engine.CloudEngine`: queue, instance set, pool and scheduler) or a
plugin dispatcher's service (:class:`herder.dispatch.service.DispatchService`: queue and one
backend, no instances).  Both
implement :class:`Engine`, so the API is written once against this protocol and never reaches
into an engine's parts.  An engine without instances says so (:attr:`Engine.has_instances`) and
the API leaves the instance routes out; it never pretends with stand-in parts.

Every read returns a copy and every command is thread-safe: the API calls them from its worker
threads while the engine runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from herder.config import Config
    from herder.costs import CostReport
    from herder.engine.scheduler.quotas import QuotaState
    from herder.model import ContainerState, IdleBehavior, InstanceType, InstanceView
    from herder.plugin.registry import Plugins
    from herder.queue.backend import DispatchLock
    from herder.queue.base import ContainerQueue
    from herder.runtime import Runtime
    from herder.spend import BudgetState


class InstanceNotFound(LookupError):
    """An instance command named an instance the engine does not have (or an engine that has
    none was asked about one)."""


class Engine(Protocol):
    """One engine as the API, the CLI and the status page see it; started and stopped by
    ``herder serve``."""

    @property
    def config(self) -> Config:
        """The configuration the engine was built from."""
        ...

    @property
    def runtime(self) -> Runtime:
        """The engine's clock and timers (durations such as ``time_in_state`` use it)."""
        ...

    @property
    def plugins(self) -> Plugins:
        """The plugins installed, for ``/api/v1/plugins``."""
        ...

    @property
    def registry(self) -> CollectorRegistry:
        """The metrics the engine and its plugins record, for ``/metrics``."""
        ...

    @property
    def queue(self) -> ContainerQueue:
        """The queue the engine dispatches from; the API submits, lists and cancels through it."""
        ...

    @property
    def instance_types(self) -> Mapping[str, InstanceType]:
        """The instance types containers are sized against (GPU requests resolve against them)."""
        ...

    @property
    def queue_description(self) -> str:
        """Where the queue lives, for the start-up log line (never a secret)."""
        ...

    @property
    def dispatch_lock(self) -> DispatchLock | None:
        """The lock to hold before :meth:`start` when this herder may be a standby (None: the
        queue has one owner and there is nothing to wait for)."""
        ...

    @property
    def has_instances(self) -> bool:
        """Whether the engine runs instances: False leaves the instance routes out of the API,
        and :meth:`instances` is then always empty."""
        ...

    def instances(self) -> list[InstanceView]:
        """A copy of every instance's view, by instance id."""
        ...

    def kill_instance(self, instance_id: str, reason: str) -> None:
        """Shut an instance down whatever it runs (:class:`InstanceNotFound` if unknown)."""
        ...

    def set_idle_behavior(self, instance_id: str, behavior: IdleBehavior) -> None:
        """Set run / hold / drain on an instance (:class:`InstanceNotFound` if unknown)."""
        ...

    @property
    def quotas_enabled(self) -> bool:
        """Whether the engine reads the cloud's quotas (its driver can)."""
        ...

    def quota_states(self) -> list[QuotaState]:
        """The cloud's quotas as last read, with herder's share of each; [] when none are."""
        ...

    def budget_state(self) -> BudgetState | None:
        """The spend budget's period, spend and limits; None for an engine that keeps no
        spend (it runs no instances)."""
        ...

    def cost_report(self, period: str, periods: int) -> CostReport | None:
        """Spend by period, instance type and label, and finished containers' cost; None for
        an engine that keeps no spend.  ValueError for an unknown period."""
        ...

    def has_runner(self, uuid: str) -> bool:
        """Whether a runner for the container still exists (its last output may be on its way
        to the log)."""
        ...

    def spot_prices(self) -> dict[str, float]:
        """Instance type name → the current spot price where the engine has seen one."""
        ...

    def check_health(self) -> None:
        """Raise with the reason when the engine cannot work; return when it can."""
        ...

    def scheduling_passes(self) -> int:
        """How many scheduling passes have ended: the statuses change only when this does."""
        ...

    def scheduling_statuses(self) -> dict[str, str]:
        """uuid → the last pass's human-readable scheduling status of each waiting container."""
        ...

    def active_counts(self) -> dict[ContainerState, int]:
        """Containers by state."""
        ...

    def start(self) -> None:
        """Start dispatching (after :attr:`dispatch_lock` is held, when there is one)."""
        ...

    def halt(self) -> None:
        """Stop dispatching at once (the dispatch lock was lost); the queue stays open for the
        API until :meth:`stop`."""
        ...

    def stop(self) -> None:
        """Stop everything and release the queue and the dispatch lock."""
        ...

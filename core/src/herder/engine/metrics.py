"""Metrics about the work itself, on top of the pool's and the scheduler's (SPEC §13).

Arvados' dispatcher does not own its queue, so it has no metrics about containers as such;
herder does, and operators ask first how deep the queue is, how long containers wait, how many
end well, and what the fleet costs right now:

- ``herder_queue_containers{state}``: containers Queued, Locked and Running, read from the queue
  at scrape time (finished ones are counted by the next metric instead);
- ``herder_queue_wait_seconds``: histogram of the time from a container's creation to its start;
- ``herder_containers_finished_total{outcome}``: ``complete_ok``, ``complete_failed`` (non-zero
  exit code) or ``cancelled``;
- ``herder_instances_cost_per_hour``: summed hourly price of every instance that exists;
- ``herder_spend_period{period}``: what the instances cost in the current budget period
  (``cloud.budget.period``, UTC), rounded to the types' billing increments;
- ``herder_spend_limit{limit}`` and ``herder_spend_limit_reached{limit}``: the budget's soft
  and hard limits, where configured, and whether spend has reached them (1) or not (0).

The counters and the histogram are fed by the queue's change observer
(:meth:`~herder.queue.base.ContainerQueue.observe`), so every way a container can start or end
(an exit reported by a worker, an operator's cancel, the dispatch-attempt cap) is counted once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from herder.engine.worker.interfaces import WorkerPool
from herder.model import Container, ContainerState, InstanceView
from herder.queue.base import ContainerQueue
from herder.spend import Budget

if TYPE_CHECKING:
    from herder.engine.scheduler.quotas import QuotaState

#: The states ``herder_queue_containers`` reports: the ones a container is still waiting or
#: running in.  Final states only grow; their rate is ``herder_containers_finished_total``.
QUEUE_STATES = (ContainerState.QUEUED, ContainerState.LOCKED, ContainerState.RUNNING)
OUTCOMES = ("complete_ok", "complete_failed", "cancelled")
#: From seconds (an idle instance was ready) to a day (a queue far beyond the quota).
WAIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 43200, 86400)


def fleet_cost_per_hour(views: Iterable[InstanceView]) -> float:
    """What the instances cost per hour now: every instance the provider bills for.

    Booting, idle, held and shutting-down instances are billed as much as busy ones; a create
    still in progress (no instance id yet) is not billed yet.
    """
    return sum(v.price for v in views if v.instance)


def finish_outcome(ctr: Container) -> str | None:
    """The outcome label of a finished container, None while it has not finished."""
    if ctr.state is ContainerState.CANCELLED:
        return "cancelled"
    if ctr.state is ContainerState.COMPLETE:
        return "complete_ok" if ctr.exit_code == 0 else "complete_failed"
    return None


class ContainerMetrics:
    """The metrics above, registered on ``registry`` and fed by ``queue`` and ``pool``."""

    def __init__(
        self, registry: CollectorRegistry, queue: ContainerQueue, pool: WorkerPool
    ) -> None:
        self.queue_wait = Histogram(
            "herder_queue_wait_seconds",
            "Time from a container's creation to its start on an instance",
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.finished = Counter(
            "herder_containers_finished",
            "Containers that reached a final state, by outcome",
            ["outcome"],
            registry=registry,
        )
        for outcome in OUTCOMES:
            self.finished.labels(outcome)
        registry.register(_LiveGauges(queue, pool))
        self._unobserve = queue.observe(self.observe)

    def observe(self, old: Container | None, new: Container) -> None:
        """Count one committed change: a start, or the end of a container."""
        was = old.state if old is not None else None
        if was is new.state:
            return
        if new.state is ContainerState.RUNNING and new.started_at is not None:
            self.queue_wait.observe(max(0.0, new.started_at - new.created_at))
        outcome = finish_outcome(new)
        if outcome is not None and (old is None or not old.state.final):
            self.finished.labels(outcome).inc()

    def close(self) -> None:
        self._unobserve()


class _LiveGauges:
    """Gauges computed from the queue and the pool at scrape time, so they are never stale."""

    def __init__(self, queue: ContainerQueue, pool: WorkerPool) -> None:
        self._queue = queue
        self._pool = pool

    def describe(self) -> Iterator[Any]:
        yield from self._families(live=False)

    def collect(self) -> Iterator[Any]:
        yield from self._families(live=True)

    def _families(self, *, live: bool) -> Iterator[Any]:
        depth = GaugeMetricFamily(
            "herder_queue_containers",
            "Containers waiting or running, by state",
            labels=["state"],
        )
        cost = GaugeMetricFamily(
            "herder_instances_cost_per_hour", "Summed hourly price of every existing instance"
        )
        if live:
            counts = self._queue.counts()
            for state in QUEUE_STATES:
                depth.add_metric([state.value], counts.get(state, 0))
            cost.add_metric([], fleet_cost_per_hour(self._pool.instances()))
        yield depth
        yield cost


class QuotaMetrics:
    """The ``herder_quota_*`` gauges: the cloud's quotas as the driver last read them (see
    :mod:`herder.engine.scheduler.quotas`), with herder's own share; none when no quota is read."""

    def __init__(self, registry: CollectorRegistry, states: Callable[[], list[QuotaState]]) -> None:
        self._states = states
        registry.register(self)

    def describe(self) -> Iterator[Any]:
        yield from self._families(live=False)

    def collect(self) -> Iterator[Any]:
        yield from self._families(live=True)

    def _families(self, *, live: bool) -> Iterator[Any]:
        labels = ["quota", "unit"]
        limit = GaugeMetricFamily(
            "herder_quota_limit", "A cloud quota's limit, as last read", labels=labels
        )
        usage = GaugeMetricFamily(
            "herder_quota_usage",
            "The account's usage of a cloud quota, as last read",
            labels=labels,
        )
        own = GaugeMetricFamily(
            "herder_quota_herder",
            "What herder's own live instances take of a cloud quota",
            labels=labels,
        )
        for state in self._states() if live else []:
            key = [state.quota.name, state.quota.unit.value]
            limit.add_metric(key, state.quota.limit)
            usage.add_metric(key, state.quota.usage)
            own.add_metric(key, state.herder)
        yield limit
        yield usage
        yield own


class SpendMetrics:
    """The ``herder_spend_*`` gauges, from the budget's latest evaluation (each pass books spend
    and evaluates; a scrape only reads the result, never the ledger)."""

    def __init__(self, registry: CollectorRegistry, budget: Budget) -> None:
        self._budget = budget
        registry.register(self)

    def describe(self) -> Iterator[Any]:
        yield from self._families(live=False)

    def collect(self) -> Iterator[Any]:
        yield from self._families(live=True)

    def _families(self, *, live: bool) -> Iterator[Any]:
        spent = GaugeMetricFamily(
            "herder_spend_period",
            "Spend of the instances in the current budget period (UTC), in the price unit",
            labels=["period"],
        )
        limits = GaugeMetricFamily(
            "herder_spend_limit", "The budget's configured spend limits", labels=["limit"]
        )
        reached = GaugeMetricFamily(
            "herder_spend_limit_reached",
            "1 when spend in the period has reached the limit, else 0",
            labels=["limit"],
        )
        state = self._budget.last if live else None
        if state is not None:
            spent.add_metric([state.period], state.spent)
            for name, limit, hit in (
                ("soft", state.soft_limit, state.soft_reached),
                ("hard", state.hard_limit, state.hard_reached),
            ):
                if limit is not None:
                    limits.add_metric([name], limit)
                    reached.add_metric([name], 1.0 if hit else 0.0)
        yield spent
        yield limits
        yield reached

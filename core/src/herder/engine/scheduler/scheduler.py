"""The scheduler: maps the queue onto the pool's instances (SPEC §9).

Lifecycle (mirroring Arvados' start-up order, SPEC §9.3):

1. wait until the pool has listed the cloud's instances once (``pool.loaded``);
2. fix stale locks left by a previous process (:mod:`~herder.engine.scheduler.stale_locks`), waiting
   for unknown workers to be probed — no pass that could lock or start anything runs before
   this is done, or it could start a second copy of a container that is still preparing;
3. then run a pass after every queue or pool change: :mod:`~herder.engine.scheduler.run_queue`
   (lock, start, create, wait), :mod:`~herder.engine.scheduler.sync` (reconcile), metrics.

Everything is event driven: queue and pool notifications fire one coalescing trigger, so passes
never overlap and a burst of changes costs one pass.  Timers add passes where time alone changes
something: 250 ms after an operation was found already in progress for a container (SPEC §9.4),
when a Running container reaches its ``max_run_time``, shortly after a runner exit the queue
snapshot did not cover yet, and every ``cloud.poll_interval`` as a safety net (Arvados runs at
least one pass per queue poll).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from enum import Enum

from prometheus_client import CollectorRegistry

from herder.config import Config
from herder.engine.scheduler.budget import BudgetEnforcer
from herder.engine.scheduler.consolidate import Consolidator
from herder.engine.scheduler.metrics import SchedulerMetrics
from herder.engine.scheduler.ops import RETRY_DELAY, ContainerOps
from herder.engine.scheduler.queue_index import QueueIndex
from herder.engine.scheduler.quotas import QuotaHeadroom
from herder.engine.scheduler.run_queue import PassInput, PassResult, RunQueue
from herder.engine.scheduler.stale_locks import StaleLockFixer
from herder.engine.scheduler.status import SchedEntry
from herder.engine.scheduler.sync import Syncer
from herder.engine.worker.interfaces import WorkerPool
from herder.model import InstanceType, WorkerState
from herder.queue.base import ContainerQueue
from herder.runtime import Runtime, TimerHandle
from herder.spend import Budget, SpendTracker

__all__ = ["SchedEntry", "Scheduler"]


class _Phase(Enum):
    NEW = "new"
    WAIT_LOADED = "waiting for the pool to load"
    FIXING_LOCKS = "fixing stale locks"
    UNLOCKING = "unlocking stale locks"
    RUNNING = "running"
    STOPPED = "stopped"


class Scheduler:
    """Runs scheduling passes in reaction to queue and pool changes."""

    def __init__(
        self,
        *,
        runtime: Runtime,
        queue: ContainerQueue,
        pool: WorkerPool,
        config: Config,
        instance_types: dict[str, InstanceType],
        registry: CollectorRegistry | None = None,
        logger: logging.Logger | None = None,
        tracker: SpendTracker | None = None,
        budget: Budget | None = None,
        quotas: QuotaHeadroom | None = None,
    ) -> None:
        """``tracker`` books the instances' spend each pass, and ``budget`` (if given and
        enabled) limits it; without a tracker neither happens.  ``quotas`` reads the cloud's
        quotas (see :mod:`herder.engine.scheduler.quotas`); without it none are read."""
        self._runtime = runtime
        self._queue = queue
        self._pool = pool
        self._config = config
        self._log = logger or logging.getLogger("herder.engine.scheduler")
        self._trigger = runtime.trigger(self._step)
        self._mtx = threading.Lock()  # phase, timers, subscriptions
        self._pass_lock = threading.Lock()  # held for the length of a pass
        self._phase = _Phase.NEW
        self._unsubscribe: list[Callable[[], None]] = []
        self._wake_timer: TimerHandle | None = None
        self.ops = ContainerOps(
            runtime=runtime, queue=queue, pool=pool, retry_soon=self._wake_in, logger=self._log
        )
        self._run_queue = RunQueue(
            pool=pool, ops=self.ops, config=config, instance_types=instance_types, logger=self._log
        )
        if quotas is not None:
            self._run_queue.quotas = quotas
        self.quotas = self._run_queue.quotas
        self._syncer = Syncer(
            queue=queue, ops=self.ops, logger=self._log, lost_reason=pool.lost_reason
        )
        self._metrics = SchedulerMetrics(
            registry if registry is not None else CollectorRegistry(), pool
        )
        self._stale_locks = StaleLockFixer(
            runtime=runtime,
            queue=queue,
            pool=pool,
            timeout=config.containers.stale_lock_timeout,
            on_timeout=self._trigger.fire,
            logger=self._log,
        )
        self._budget: BudgetEnforcer | None = None
        if tracker is not None:
            self._budget = BudgetEnforcer(
                pool=pool,
                ops=self.ops,
                tracker=tracker,
                budget=budget or Budget(),
                logger=self._log,
            )
        self._consolidator = Consolidator(
            pool=pool,
            instance_types=instance_types,
            threshold=config.cloud.consolidation_threshold,
            logger=self._log,
        )
        self._last = PassResult()
        self.passes = 0

    # ---- lifecycle

    def start(self) -> None:
        """Subscribe to the queue and the pool and begin (see the module docstring)."""
        with self._mtx:
            if self._phase is not _Phase.NEW:
                return
            self._phase = _Phase.WAIT_LOADED
            self._unsubscribe = [
                self._pool.subscribe(self._trigger.fire),
                self._queue.subscribe(self._trigger.fire),
            ]
        self._log.info("scheduler starting")
        self._trigger.fire()

    def stop(self) -> None:
        """Stop reacting to changes; returns after any pass in progress has finished."""
        with self._mtx:
            self._phase = _Phase.STOPPED
            unsubscribe, self._unsubscribe = self._unsubscribe, []
            if self._wake_timer is not None:
                self._wake_timer.cancel()
                self._wake_timer = None
        for fn in unsubscribe:
            fn()
        with self._pass_lock:
            pass

    @property
    def phase(self) -> str:
        return self._phase.value

    def _step(self) -> None:
        """React to a change: advance the start-up phases, or run a pass once running."""
        phase = self._phase
        if phase is _Phase.WAIT_LOADED:
            if not self._pool.loaded:
                return
            self._set_phase(_Phase.WAIT_LOADED, _Phase.FIXING_LOCKS)
            phase = _Phase.FIXING_LOCKS
        if phase is _Phase.FIXING_LOCKS:
            stale = self._stale_locks.check()
            if stale is None:
                return
            if self._set_phase(_Phase.FIXING_LOCKS, _Phase.UNLOCKING):
                self._runtime.spawn(lambda: self._unlock_stale(stale))
            return
        if phase is _Phase.RUNNING:
            self.run_pass()

    def _unlock_stale(self, stale: list[str]) -> None:
        self._stale_locks.unlock(stale)
        if self._set_phase(_Phase.UNLOCKING, _Phase.RUNNING):
            self._log.info("scheduler running")
            self._trigger.fire()

    def _set_phase(self, expect: _Phase, new: _Phase) -> bool:
        """Move from ``expect`` to ``new``; False if something else (stop) came first."""
        with self._mtx:
            if self._phase is not expect:
                return False
            self._phase = new
            return True

    # ---- wake-ups

    def _wake_in(self, delay: float) -> None:
        self._wake_at(self._runtime.now() + delay)

    def _wake_at(self, when: float) -> None:
        """Make sure a pass runs at ``when`` (one timer; the earliest request wins)."""
        with self._mtx:
            if self._phase is _Phase.STOPPED:
                return
            timer = self._wake_timer
            if timer is not None and not timer.cancelled and timer.due <= when:
                return
            if timer is not None:
                timer.cancel()
            self._wake_timer = self._runtime.call_at(when, self._on_wake)

    def _on_wake(self) -> None:
        with self._mtx:
            self._wake_timer = None
        self._trigger.fire()

    # ---- passes

    def run_pass(self) -> None:
        """One pass: run the queue, reconcile with the pool, update metrics."""
        # A cloud call: made before the pass lock is taken (at most once a refresh interval).
        self.quotas.refresh(self._runtime.now())
        with self._pass_lock:
            if self._phase is _Phase.STOPPED:
                return
            now = self._runtime.now()
            self.quotas.begin_pass()
            no_new = self._budget.before_pass(now) if self._budget is not None else None
            counts = self._pool.count_workers()
            running = self._pool.running()
            entries, queue_time = self._queue.entries()
            result = self._run_queue.run(
                PassInput(
                    now=now,
                    running=running,
                    entries=entries,
                    queue_time=queue_time,
                    worker_counts=counts,
                    no_new_instances=no_new,
                )
            )
            self._last = result
            # Sync uses the same snapshots: taken in the same order Arvados' sync takes them
            # (runners, then queue), and any change since then triggers another pass.
            outcome = self._syncer.sync(
                now=now,
                running=running,
                entries=entries,
                attention=self._run_queue.index.attention,
                queue_time=queue_time,
                any_unknown=counts.get(WorkerState.UNKNOWN, 0) > 0,
            )
            if self._consolidator.enabled:
                index = self._run_queue.index
                self._consolidator.run(
                    now=now,
                    entries=entries,
                    demand=any(uuid not in running for _, uuid in index.waiting),
                )
            self._update_metrics(result, running, now)
            self.passes += 1
        next_wake = now + self._config.cloud.poll_interval
        if outcome.recheck_at is not None:
            # Never "now": a pass that asks to be rerun at once would spin.
            next_wake = min(next_wake, max(outcome.recheck_at, now + RETRY_DELAY))
        self._wake_at(next_wake)

    def _update_metrics(self, result: PassResult, running: Mapping[str, float], now: float) -> None:
        m = self._metrics
        m.allocated_not_started.set(result.allocated_not_started)
        m.not_allocated_over_quota.set(result.over_quota)
        m.max_concurrent_containers.set(result.max_containers)
        m.longest_wait_time.set(longest_wait(self._run_queue.index, running, now))
        m.set_queue_entries(self._run_queue.index.counts)

    # ---- reads for the API

    def snapshot(self) -> list[SchedEntry]:
        """The last pass's queue in scheduler order, each entry with its scheduling status."""
        return self._last.sched_entries()

    @property
    def max_containers(self) -> int:
        """The current dynamic limit on containers running at once (0: none)."""
        return self._run_queue.limit.max_containers


def longest_wait(index: QueueIndex, running: Mapping[str, float], now: float) -> float:
    """Seconds since the oldest waiting container without a runner was created (SPEC §9.9)."""
    for created_at, uuid in index.waiting:
        if uuid not in running:
            return max(0.0, now - created_at)
    return 0.0

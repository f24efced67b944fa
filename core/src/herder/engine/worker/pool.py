"""The worker pool: every instance herder owns, and every cloud call about them (SPEC §5).

The pool creates instances (with throttles, quota and capacity bookkeeping), keeps its list of
workers in step with the cloud's listing, probes workers, starts and kills containers on them,
and tells subscribers (the scheduler) whenever anything changed.

One lock guards the pool and all its workers.  Slow work never runs under it: cloud calls and
SSH commands run in background tasks (:meth:`Runtime.spawn` / :meth:`Runtime.call_at`) and take
the lock again to apply their results.  Subscribers are called outside the lock.

Every cloud call (create, list, destroy, set_tags) goes through one :class:`SlotLimiter`, which
spaces calls ``1/max_cloud_ops_per_second`` apart by scheduling them, never by sleeping.
"""

from __future__ import annotations

import functools
import logging
import random
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from herder.callbacks import Callbacks
from herder.config import Config
from herder.engine.worker.interfaces import BootBackoff, ContainerReporter, QuotaLimit, WorkerPool
from herder.engine.worker.metrics import PoolMetrics, PoolSample
from herder.engine.worker.runner import RunnerDeployment
from herder.engine.worker.throttle import CloudCallThrottle, SlotLimiter, wrap_instance_set
from herder.engine.worker.verify import TagVerifier, init_command
from herder.engine.worker.worker import (
    TAG_DRAIN_CAUSE,
    TAG_IDLE_BEHAVIOR,
    TAG_INSTANCE_SECRET,
    TAG_INSTANCE_SET_ID,
    TAG_INSTANCE_TYPE,
    PoolSettings,
    Worker,
    WorkerEnv,
)
from herder.model import (
    BootOutcome,
    Container,
    DrainCause,
    IdleBehavior,
    InstanceType,
    InstanceView,
    WorkerState,
)
from herder.plugin.bootprobe import BootProbe, CommandBootProbe
from herder.plugin.cloud import CapacityError, Instance, InstanceSet, QuotaError
from herder.plugin.executor import ExecutorFactory
from herder.runtime import Runtime, TimerHandle
from herder.units import format_duration

log = logging.getLogger(__name__)

#: How long a quota error with no other instances, or a capacity error, blocks creates.
QUOTA_ERROR_TTL = 60.0
CAPACITY_ERROR_TTL = 60.0

#: A capacity-error scope: ("global", ""), ("group", <quota group>) or ("type", <type key>).
#: The scopes are kept apart so that a quota group named like a provider type, or the quota
#: group "", never collides with another scope.
CapacityKey = tuple[str, str]


class PoolError(LookupError):
    """A pool command named an instance the pool does not have."""


@dataclass(frozen=True, slots=True)
class _PendingCreate:
    secret: str
    instance_type: InstanceType
    started: float


def capacity_type_key(instance_type: InstanceType) -> str:
    """Capacity is tracked per provider type, separately for its preemptible variant."""
    suffix = "-preemptible" if instance_type.preemptible else ""
    return instance_type.provider_type + suffix


class Pool(WorkerPool):
    """The worker pool (SPEC §5)."""

    def __init__(
        self,
        *,
        runtime: Runtime,
        instance_set: InstanceSet,
        executor_factory: ExecutorFactory,
        config: Config,
        instance_types: dict[str, InstanceType],
        instance_set_id: str,
        reporter: ContainerReporter,
        boot_probe: BootProbe | None = None,
        runner_data: bytes | None = None,
        public_key: str | None = None,
        registry: CollectorRegistry | None = None,
        logger: logging.Logger | None = None,
        rng: random.Random | None = None,
        started_at: Callable[[str], float | None] | None = None,
    ) -> None:
        """``started_at`` tells when an instance found in the cloud (not created by this
        process) started, if anything remembers it (the spend ledger does)."""
        self._runtime = runtime
        self._started_at = started_at
        self._settings = settings = PoolSettings.from_config(config)
        self._instance_types = dict(instance_types)
        self._instance_set_id = instance_set_id
        self._executor_factory = executor_factory
        self._log = logger or log
        self._rng = rng or random.Random()
        self._seeded = rng is not None
        self._public_key = public_key if settings.deploy_public_key else None
        self._lock = threading.Lock()
        self.metrics = PoolMetrics(registry if registry is not None else CollectorRegistry())
        self._instance_set = wrap_instance_set(
            instance_set,
            operations_counter=self.metrics.driver_operations,
            resource_tags=settings.resource_tags,
            logger=self._log,
        )
        self._cloud_ops = SlotLimiter(runtime, settings.max_cloud_ops_per_second)
        self._probe_slots = SlotLimiter(runtime, settings.max_probes_per_second)
        self._throttle_create = CloudCallThrottle(runtime)
        self._throttle_instances = CloudCallThrottle(runtime)
        if boot_probe is None:
            boot_probe = CommandBootProbe(config.cloud.boot_probe_command)
        boot_probe.bind(config)
        self._runner_data = runner_data
        self._runner = RunnerDeployment.build(
            runner_data, config.cloud.deploy_runner_directory, config.containers.runner_command
        )

        # Guarded by self._lock.
        self._workers: dict[str, Worker] = {}
        self._creating: dict[str, _PendingCreate] = {}
        self._exited: dict[str, float] = {}
        #: uuid -> why its runner is gone, for the scheduler's retry (see lost_reason)
        self._lost: dict[str, str] = {}
        self._loaded = False
        self._quota_until_fewer = 0  # at quota until fewer than this many instances
        self._quota_until = 0.0
        self._capacity_until: dict[CapacityKey, float] = {}
        self._boot_backoff: dict[str, BootBackoff] = {}  # by instance type name
        self._listeners: Callbacks[[]] = Callbacks("pool subscriber", self._log)
        self._last_seq = 0
        self._started = False
        self._stopped = False
        self._sync_in_flight = False
        self._sync_again = False
        self._sync_timer: TimerHandle | None = None
        self._probe_timer: TimerHandle | None = None
        self._probe_pending: set[str] = set()

        self._notify_trigger = runtime.trigger(self._call_listeners)
        self._env = WorkerEnv(
            runtime=runtime,
            lock=self._lock,
            settings=settings,
            metrics=self.metrics,
            boot_probe=boot_probe,
            runner=self._runner,
            reporter=reporter,
            exited=self._exited,
            notify=self._notify,
            submit_cloud_op=self._submit_cloud_op,
            logger=self._log,
            sequence=self._next_seq,
            boot_outcome=self._record_boot_outcome,
        )
        self.metrics.set_source(self._metrics_sample)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Sync with the cloud now and every sync_interval; probe every probe_interval."""
        with self._lock:
            if self._started or self._stopped:
                return
            self._started = True
            self._probe_timer = self._runtime.call_later(
                self._settings.probe_interval, self._probe_tick
            )
        self.sync_now()

    def stop(self) -> None:
        """Stop syncing and probing.  Instances are left as they are, for the next start."""
        with self._lock:
            self._stopped = True
            for timer in (self._sync_timer, self._probe_timer):
                if timer is not None:
                    timer.cancel()
            self._sync_timer = self._probe_timer = None
            executors = [w.executor for w in self._workers.values()]
        # Connections are dropped, runners are not: containers keep running on the instances and
        # the next start adopts them.
        for executor in executors:
            try:
                executor.close()
            except Exception:  # closing must never stop a shutdown
                self._log.exception("closing an executor failed")

    def check_health(self) -> None:
        """Raise if the pool cannot work (an empty runner program would fail every boot)."""
        if self._runner_data is not None and not self._runner_data:
            raise PoolError("error loading runner binary: runner program is empty")

    # ------------------------------------------------------------------ notification

    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]:
        return self._listeners.add(listener)

    def _notify(self) -> None:
        """Tell subscribers something changed, soon, outside the lock; bursts coalesce."""
        self._notify_trigger.fire()

    def _call_listeners(self) -> None:
        self._listeners.call()

    def _next_seq(self) -> int:
        """Next modification number (caller holds the lock)."""
        self._last_seq += 1
        return self._last_seq

    def _submit_cloud_op(self, fn: Callable[[], None]) -> None:
        self._cloud_ops.schedule(fn)

    # ------------------------------------------------------------------ queries

    @property
    def loaded(self) -> bool:
        with self._lock:
            return self._loaded

    def lost_reason(self, uuid: str) -> str:
        with self._lock:
            return self._lost.pop(uuid, "")

    def running(self) -> dict[str, float]:
        """uuid -> 0.0 while a runner exists, or -> exit time until forgotten (SPEC §5.6)."""
        with self._lock:
            out: dict[str, float] = {}
            for w in self._workers.values():
                for uuid in (*w.running, *w.starting):
                    out[uuid] = 0.0
            out.update(self._exited)
            return out

    def instances(self) -> list[InstanceView]:
        """Every worker and pending create, by instance id (pending creates, id "", first)."""
        with self._lock:
            views = [w.view() for w in self._workers.values()]
            views.extend(self._pending_view(p) for p in self._creating.values())
        views.sort(key=lambda v: (v.instance, v.instance_type))
        return views

    def spot_prices(self) -> dict[str, float]:
        """The current price of each preemptible instance type that has an instance now, as
        its driver reports it (``Instance.price_history``, spot markets); types without an
        instance, or whose driver reports nothing, are left out.

        The driver is asked outside the pool lock, one instance per type; a driver that fails
        costs that type its entry, never the caller.
        """
        with self._lock:
            chosen: dict[str, Worker] = {}
            for w in self._workers.values():
                if w.instance_type.preemptible:
                    chosen.setdefault(w.instance_type.name, w)
        out: dict[str, float] = {}
        for name, w in chosen.items():
            try:
                prices = w.instance.price_history(w.instance_type)
            except Exception as exc:  # a driver's failure must not break a listing
                self._log.warning("price history of %s unavailable: %s", w.instance.id, exc)
                continue
            if prices:
                out[name] = max(prices, key=lambda p: p.start_time).price
        return out

    @staticmethod
    def _pending_view(pending: _PendingCreate) -> InstanceView:
        it = pending.instance_type
        return InstanceView(
            instance="",
            address="",
            price=it.price,
            instance_type=it.name,
            provider_instance_type=it.provider_type,
            last_container_uuid="",
            last_busy=0.0,
            running_container_uuids=[],
            worker_state=WorkerState.BOOTING,
            idle_behavior=IdleBehavior.RUN,
            state_since=pending.started,
            appeared=pending.started,
        )

    def count_workers(self) -> dict[WorkerState, int]:
        """Workers per state (pending creates excluded); every state present.

        Arvados blocks here until the first sync; herder never blocks, so callers that need a
        complete picture check :attr:`loaded` (and are notified when it becomes true).
        """
        with self._lock:
            counts = dict.fromkeys(WorkerState, 0)
            for w in self._workers.values():
                counts[w.state] += 1
            return counts

    def at_capacity(self, instance_type: InstanceType) -> bool:
        with self._lock:
            return self._at_capacity(instance_type)

    def _capacity_keys(self, instance_type: InstanceType) -> list[CapacityKey]:
        return [
            ("global", ""),
            ("group", self._instance_set.quota_group(instance_type)),
            ("type", capacity_type_key(instance_type)),
        ]

    def _at_capacity(self, instance_type: InstanceType) -> bool:
        now = self._runtime.now()
        return any(
            self._capacity_until.get(key, 0.0) > now for key in self._capacity_keys(instance_type)
        )

    def at_quota(self) -> bool:
        with self._lock:
            return self._quota_limit() is not None

    def quota_limit(self) -> QuotaLimit | None:
        with self._lock:
            return self._quota_limit()

    def _at_quota(self) -> bool:
        return self._quota_limit() is not None

    def _quota_limit(self) -> QuotaLimit | None:
        """A quota error from the cloud, or max_instances (caller holds the lock).

        Pending creates count, and so do shut-down workers until the cloud has accepted their
        destroy: from then on the instance is on its way out and no longer holds a place (a
        sync that still lists it after timeout_shutdown destroys it again, and it counts until
        that destroy is accepted).
        """
        if self._quota_until_fewer > 0 or self._runtime.now() < self._quota_until:
            return QuotaLimit.CLOUD_QUOTA
        limit = self._settings.max_instances
        if limit > 0 and limit <= self._instance_count():
            return QuotaLimit.MAX_INSTANCES
        return None

    def _instance_count(self) -> int:
        """Instances that hold a place against max_instances (caller holds the lock)."""
        gone = sum(1 for w in self._workers.values() if w.destroy_accepted)
        return len(self._workers) - gone + len(self._creating)

    # ------------------------------------------------------------------ boot failures

    def boot_backoff(self, instance_type: InstanceType) -> BootBackoff | None:
        with self._lock:
            return self._active_backoff(instance_type)

    def _active_backoff(self, instance_type: InstanceType) -> BootBackoff | None:
        backoff = self._boot_backoff.get(instance_type.name)
        if backoff is None or backoff.until <= self._runtime.now():
            return None
        return backoff

    def _record_boot_outcome(self, it: InstanceType, outcome: BootOutcome) -> None:
        """Grow or end the type's pause on creates (caller holds the lock).

        An instance that never becomes reachable (a bad image, user or firewall) would
        otherwise be replaced by another just like it every timeout_booting, for ever, each
        paid for: after n failures in a row no instance of the type is created for
        ``boot_failure_backoff * 2**(n-1)`` (capped).  An instance of the type that boots ends
        the pause.  Instances that were aborted or disappeared say nothing about the type.
        """
        s = self._settings
        if outcome is BootOutcome.SUCCESS:
            if self._boot_backoff.pop(it.name, None) is not None:
                self._log.info("instance type %s: an instance booted; boot back-off ended", it.name)
                self.metrics.boot_failures_in_a_row.labels(it.name).set(0)
            return
        if outcome is not BootOutcome.FAILURE or s.boot_failure_backoff <= 0:
            return
        previous = self._boot_backoff.get(it.name)
        failures = (previous.failures if previous else 0) + 1
        pause = min(s.boot_failure_backoff * 2 ** min(failures - 1, 30), s.boot_failure_backoff_max)
        until = self._runtime.now() + pause
        self._boot_backoff[it.name] = BootBackoff(it.name, failures, until)
        self.metrics.boot_failures_in_a_row.labels(it.name).set(failures)
        self.metrics.boot_backoffs.labels(it.name).inc()
        self._log.warning(
            "instance type %s: %d instance(s) failed to boot in a row; no new %s instance for "
            "%s (check the image, the admin user and the firewall with herder cloudtest)",
            it.name,
            failures,
            it.name,
            format_duration(pause),
        )
        self._runtime.call_later(pause, self._notify)

    # ------------------------------------------------------------------ create

    def create(self, instance_type: InstanceType) -> InstanceView | None:
        """Start creating an instance; None when capacity, quota or a throttle forbids it.

        Concurrent creates are limited by max_concurrent_instance_create_ops.  Arvados refuses
        every create for a fixed 5 s after hitting the limit, even when the create in flight
        finishes sooner (SPEC §19 item 13).  herder refuses only while the limit is reached,
        and notifies subscribers when a create finishes, so the next one starts at once.
        """
        with self._lock:
            if self._stopped:
                return None
            if (
                self._at_capacity(instance_type)
                or self._at_quota()
                or self._active_backoff(instance_type) is not None
                or self._throttle_create.error() is not None
            ):
                return None
            limit = self._settings.max_concurrent_creates
            if limit > 0 and len(self._creating) >= limit:
                self._log.info("reached max_concurrent_instance_create_ops (%d)", limit)
                return None
            pending = _PendingCreate(self._new_secret(), instance_type, self._runtime.now())
            self._creating[pending.secret] = pending
            view = self._pending_view(pending)
        self._submit_cloud_op(lambda: self._run_create(pending))
        return view

    def _new_secret(self) -> str:
        """An instance secret: from the system's secure source, unless a seeded generator was
        given (a simulation, whose runs must repeat exactly)."""
        if self._seeded:
            return self._rng.randbytes(20).hex()
        return secrets.token_hex(20)

    def _run_create(self, pending: _PendingCreate) -> None:
        """Background: call the cloud, then record the new worker or the error."""
        it = pending.instance_type
        throttled = self._throttle_create.error()
        if throttled is not None:
            # Another create was rate limited after this one was queued: no call before the
            # provider's retry time.
            self._log.info("not creating %s: %s", it.name, throttled)
            with self._lock:
                self._creating.pop(pending.secret, None)
            self._notify()
            return
        s = self._settings
        tags = {
            s.tag(TAG_INSTANCE_SET_ID): self._instance_set_id,
            s.tag(TAG_INSTANCE_TYPE): it.name,
            s.tag(TAG_IDLE_BEHAVIOR): IdleBehavior.RUN.value,
            s.tag(TAG_INSTANCE_SECRET): pending.secret,
        }
        try:
            instance = self._instance_set.create(
                it,
                s.image_id,
                tags,
                init_command(pending.secret, s.instance_init_command),
                self._public_key,
            )
        except Exception as err:
            with self._lock:
                self._record_create_error(err, it)
                self._creating.pop(pending.secret, None)
            self._throttle_create.check_rate_limit_error(
                err, "create instance", self._notify, self._log
            )
            self._notify()
            return
        with self._lock:
            # Remove the pending create only after adding the worker, so it starts "booting".
            self._update_worker(instance, it)
            self._creating.pop(pending.secret, None)
            if self._instance_count() == s.max_instances:
                self._log.info("now at max_instances limit of %d instances", s.max_instances)
        self._notify()

    def _record_create_error(self, err: Exception, it: InstanceType) -> None:
        """Quota and capacity bookkeeping for a failed create (caller holds the lock)."""
        now = self._runtime.now()
        if isinstance(err, QuotaError):
            others = len(self._workers) + len(self._creating) - 1
            if others < 1:
                # No instances at all, so "until one goes away" would never end: retry later.
                self._quota_until_fewer = 0
                self._quota_until = now + QUOTA_ERROR_TTL
                self._runtime.call_later(QUOTA_ERROR_TTL, self._notify)
            elif self._quota_until_fewer == 0 or others < self._quota_until_fewer:
                # Wait until a sync sees fewer instances than now.
                self._quota_until_fewer = others
                self._quota_until = 0.0
        if isinstance(err, CapacityError):
            if err.instance_type_specific:
                key: CapacityKey = ("type", capacity_type_key(it))
            elif err.quota_group_specific:
                key = ("group", self._instance_set.quota_group(it))
            else:
                key = ("global", "")
            self._capacity_until[key] = now + CAPACITY_ERROR_TTL
            self._runtime.call_later(CAPACITY_ERROR_TTL, self._notify)
        self._log.error(
            "create %s failed (quota error: %s, capacity error: %s): %s",
            it.name,
            isinstance(err, QuotaError),
            isinstance(err, CapacityError),
            err,
        )

    # ------------------------------------------------------------------ workers from listings

    def _update_worker(self, instance: Instance, it: InstanceType) -> tuple[Worker, bool]:
        """Add or refresh the worker for a listed or created instance (caller holds the lock).

        A new worker is ``booting`` if we are creating it (its secret is pending), else
        ``unknown``; its idle behaviour comes back from its tags, so hold and drain survive a
        restart.  An instance tagged with a type no longer configured is drained.
        """
        s = self._settings
        secret = instance.tags.get(s.tag(TAG_INSTANCE_SECRET), "")
        wrapped = TagVerifier(instance, secret, self._report_ssh_connected, s.timeout_command)
        existing = self._workers.get(instance.id)
        if existing is not None:
            existing.executor.set_target(wrapped)
            existing.instance = wrapped
            existing.touch()
            existing.save_tags()
            return existing, False

        state = WorkerState.BOOTING if secret in self._creating else WorkerState.UNKNOWN
        try:
            behavior = IdleBehavior(instance.tags.get(s.tag(TAG_IDLE_BEHAVIOR), "run"))
        except ValueError:
            behavior = IdleBehavior.RUN
        if not it.provider_type and behavior != IdleBehavior.HOLD:
            self._log.info(
                "instance %s: %sing instance tagged with unrecognized instance type %r",
                instance.id,
                IdleBehavior.DRAIN.value,
                it.name,
                extra={"instance": instance.id},
            )
            behavior = IdleBehavior.DRAIN
        worker = Worker(self._env, wrapped, it, self._executor_factory(wrapped), state, behavior)
        if state == WorkerState.UNKNOWN and self._started_at is not None:
            started = self._started_at(instance.id)
            if started is not None and started < worker.started:
                worker.started = started
        if behavior != IdleBehavior.RUN and it.provider_type:
            # Who set it, as the tags remember it (a drain from before a restart): herder's
            # own reversible drains stay reversible.  (Not for a type no longer configured:
            # that drain is for good.)
            try:
                cause = DrainCause(instance.tags.get(s.tag(TAG_DRAIN_CAUSE), ""))
            except ValueError:
                cause = DrainCause.NONE
            if cause is not DrainCause.NONE:
                worker.drain_cause = cause
                worker.reason = f"{behavior.value} ({cause.value}) set before herder restarted"
        self._workers[instance.id] = worker
        self._log.info(
            "instance %s: new worker (%s, type %s, idle behavior %s)",
            instance.id,
            state.value,
            it.name,
            behavior.value,
            extra={"instance": instance.id},
        )
        return worker, True

    def _report_ssh_connected(self, instance: Instance) -> None:
        """Time to first SSH, for booting workers (host-key verification callback)."""
        with self._lock:
            worker = self._workers.get(instance.id)
            if worker is None or worker.state != WorkerState.BOOTING:
                return
            if worker.first_ssh is not None:
                return
            now = self._runtime.now()
            worker.first_ssh = now
            self.metrics.time_to_ssh.observe(now - worker.appeared)

    # ------------------------------------------------------------------ sync

    def sync_now(self) -> None:
        """Ask for a cloud sync now (one runs at a time; a request during one runs after it)."""
        with self._lock:
            if self._stopped:
                return
            if self._sync_in_flight:
                self._sync_again = True
                return
            self._sync_in_flight = True
            if self._sync_timer is not None:
                self._sync_timer.cancel()
                self._sync_timer = None
        self._begin_sync()

    def _begin_sync(self) -> None:
        throttled = self._throttle_instances.error()
        if throttled is not None:
            self._log.warning("sync failed: %s", throttled)
            self._sync_finished()
            return
        self._submit_cloud_op(self._list_and_sync)

    def _list_and_sync(self) -> None:
        """Background: list our instances and reconcile the workers with the listing."""
        try:
            throttled = self._throttle_instances.error()
            if throttled is not None:
                self._log.warning("sync failed: %s", throttled)
                return
            with self._lock:
                threshold = self._last_seq
            tag = {self._settings.tag(TAG_INSTANCE_SET_ID): self._instance_set_id}
            try:
                listed = self._instance_set.instances(tag)
            except Exception as err:
                self._log.warning("sync failed: %s", err)
                self._throttle_instances.check_rate_limit_error(
                    err, "list instances", self._notify, self._log
                )
                return
            with self._lock:
                changed = self._sync(threshold, listed)
            if changed:
                self._notify()
        finally:
            self._sync_finished()

    def _sync_finished(self) -> None:
        with self._lock:
            self._sync_in_flight = False
            if self._stopped:
                return
            again = self._sync_again
            self._sync_again = False
            if again:
                self._sync_in_flight = True
            elif self._started:
                self._sync_timer = self._runtime.call_later(
                    self._settings.sync_interval, self.sync_now
                )
        if again:
            self._begin_sync()

    def _sync(self, threshold: int, listed: list[Instance]) -> bool:
        """Apply a listing (caller holds the lock; SPEC §5.8); returns whether to notify.

        ``threshold`` is the modification number when the listing started: a worker neither
        refreshed by this listing nor modified since it started has left the cloud.
        """
        s = self._settings
        now = self._runtime.now()
        changed = False
        for instance in listed:
            type_name = instance.tags.get(s.tag(TAG_INSTANCE_TYPE), "")
            it = self._instance_types.get(type_name) or InstanceType(
                name=type_name, provider_type="", vcpus=0, ram=0
            )
            worker, is_new = self._update_worker(instance, it)
            if is_new:
                changed = True
            elif (
                worker.state == WorkerState.SHUTDOWN
                and worker.destroyed is not None
                and now - worker.destroyed > s.timeout_shutdown
            ):
                worker.log.info("worker still listed after shutdown; retrying")
                worker.destroy_accepted = False  # counts again until this destroy is accepted
                worker.shutdown()

        for instance_id, worker in list(self._workers.items()):
            if worker.update_seq > threshold:
                continue
            worker.log.info("instance disappeared in cloud (state %s)", worker.state.value)
            reason = worker.lost_reason or (
                f"instance {instance_id} is gone from the cloud (state {worker.state.value})"
            )
            for uuid in (*worker.running, *worker.starting):
                self._lost[uuid] = reason
            worker.report_boot_outcome(BootOutcome.DISAPPEARED)
            self.metrics.instances_disappeared.labels(worker.state.value).inc()
            if worker.destroyed is not None:
                self.metrics.shutdown_to_disappearance.observe(now - worker.destroyed)
            del self._workers[instance_id]
            self._runtime.spawn(worker.close)
            changed = True

        if self._quota_until_fewer > len(self._workers) + len(self._creating):
            # Fewer instances than when the quota error came: the quota may have room again.
            # (Only a sync notices, as in Arvados: SPEC §19 item 12.)
            self._quota_until_fewer = 0
            changed = True
        if not self._loaded:
            self._loaded = True
            changed = True
            self._log.info("loaded initial instance list (%d instances)", len(self._workers))
        return changed

    # ------------------------------------------------------------------ probes

    def _probe_tick(self) -> None:
        """Every probe_interval: after a small jitter, run a probe round."""
        with self._lock:
            if self._stopped:
                return
            interval = self._settings.probe_interval
            self._probe_timer = self._runtime.call_later(interval, self._probe_tick)
            # The jitter keeps probes from always coinciding with syncs, whose modifications
            # make overlapping probes discard their results (SPEC §19 item 18).
            jitter = self._rng.uniform(0.0, interval / 23)
        self._runtime.call_later(jitter, self.probe_round)

    def probe_round(self) -> None:
        """Shut down workers that should go, then probe each of the others once.

        Probe starts are spaced 1/max_probes_per_second apart.  A worker whose probe from an
        earlier round has not started yet is skipped, so slow rounds never pile up; so is an
        idle worker with a resident runner probed less than idle_probe_interval ago.
        """
        with self._lock:
            if self._stopped:
                return
            due: list[str] = []
            for instance_id in sorted(self._workers):
                worker = self._workers[instance_id]
                if worker.state == WorkerState.SHUTDOWN:
                    continue
                worker.retire_if_old()
                if worker.shutdown_if_idle():
                    continue
                if instance_id in self._probe_pending or worker.probe_can_wait():
                    continue
                self._probe_pending.add(instance_id)
                due.append(instance_id)
        for instance_id in due:
            self._probe_slots.schedule(functools.partial(self._probe_worker, instance_id))

    def _probe_worker(self, instance_id: str) -> None:
        with self._lock:
            self._probe_pending.discard(instance_id)
            worker = self._workers.get(instance_id)
            if worker is None or self._stopped:
                return
        worker.probe_and_update()

    # ------------------------------------------------------------------ commands

    def start_container(self, instance_id: str, container: Container) -> bool:
        """Start ``container`` on an idle or running worker whose idle behaviour is run."""
        with self._lock:
            worker = self._workers.get(instance_id)
            if worker is None or worker.idle_behavior != IdleBehavior.RUN:
                return False
            if worker.state not in (WorkerState.IDLE, WorkerState.RUNNING):
                return False
            if container.uuid in worker.running or container.uuid in worker.starting:
                return True  # already there: never start a container twice
            self._lost.pop(container.uuid, None)
            worker.start_container(container)
            return True

    def kill_container(self, uuid: str, reason: str) -> bool:
        """Begin killing ``uuid`` wherever it runs; False if no worker has it."""
        with self._lock:
            for runners in ("running", "starting"):
                for worker in self._workers.values():
                    runner = getattr(worker, runners).get(uuid)
                    if runner is not None:
                        runner.kill(reason)
                        return True
        self._log.debug("cannot kill container %s: already disappeared", uuid)
        return False

    def forget_container(self, uuid: str) -> None:
        """Drop the exit record of ``uuid`` (the scheduler has dealt with it)."""
        with self._lock:
            if self._exited.pop(uuid, None) is not None:
                self._log.debug("forgot exited container %s", uuid)

    def shutdown(self, instance_id: str) -> bool:
        """Shut down a booting or idle worker unless it is held (the scheduler's request)."""
        with self._lock:
            worker = self._workers.get(instance_id)
            self._log.info(
                "instance %s: shutdown requested", instance_id, extra={"instance": instance_id}
            )
            if worker is None or worker.idle_behavior == IdleBehavior.HOLD:
                return False
            if worker.state not in (WorkerState.BOOTING, WorkerState.IDLE):
                return False
            worker.report_boot_outcome(BootOutcome.ABORTED)
            worker.shutdown()
            return True

    def kill_instance(self, instance_id: str, reason: str) -> None:
        """Shut down a worker whatever its state and idle behaviour (an operator's request)."""
        with self._lock:
            worker = self._workers.get(instance_id)
            if worker is None:
                raise PoolError(f"no such instance: {instance_id}")
            worker.log.info("killing instance: %s", reason)
            worker.report_boot_outcome(BootOutcome.ABORTED)
            worker.shutdown()

    def set_idle_behavior(
        self,
        instance_id: str,
        behavior: IdleBehavior,
        cause: DrainCause = DrainCause.OPERATOR,
        reason: str = "",
    ) -> None:
        """Set run / hold / drain; may shut the worker down at once.

        The default cause is an operator's request (the API and CLI call this), which herder
        never undoes by itself.
        """
        with self._lock:
            worker = self._workers.get(instance_id)
            if worker is None:
                raise PoolError(f"no such instance: {instance_id}")
            if cause is DrainCause.OPERATOR and not reason and behavior != IdleBehavior.RUN:
                reason = f"{behavior.value} requested by an operator"
            worker.set_idle_behavior(behavior, cause, reason)

    def auto_drain(self, instance_id: str, cause: DrainCause, reason: str) -> bool:
        """Drain an instance for one of herder's own reasons, if it is taking work now.

        Refused (False) for an instance that is held or draining already: whatever set that
        (an operator, say) keeps it.
        """
        with self._lock:
            worker = self._workers.get(instance_id)
            if worker is None or worker.idle_behavior != IdleBehavior.RUN:
                return False
            if worker.state == WorkerState.SHUTDOWN:
                return False
            worker.set_idle_behavior(IdleBehavior.DRAIN, cause, reason)
        self._notify()
        return True

    def undo_drain(self, instance_id: str, cause: DrainCause) -> bool:
        """Put an instance drained for ``cause`` back to work; False if anything else drained it.

        Only herder's reversible causes can be undone: an operator's drain (or hold) stays.
        """
        if not cause.automatic_undo:
            return False
        with self._lock:
            worker = self._workers.get(instance_id)
            if worker is None or worker.drain_cause is not cause:
                return False
            if worker.idle_behavior != IdleBehavior.DRAIN or worker.state == WorkerState.SHUTDOWN:
                return False
            worker.log.info("drain (%s) undone", cause.value)
            worker.set_idle_behavior(IdleBehavior.RUN)
        self._notify()
        return True

    # ------------------------------------------------------------------ metrics

    def _metrics_sample(self) -> PoolSample:
        with self._lock:
            return PoolSample(
                now=self._runtime.now(),
                workers=[w.metrics_sample() for w in self._workers.values()],
                instance_types=sorted(self._instance_types),
            )

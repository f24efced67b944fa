"""Wiring: builds the queue, the cloud instance set, the pool and the scheduler from a Config.

``herder serve`` and ``herder simulate`` both run a :class:`CloudEngine`; they differ only in the
runtime (wall clock or virtual) and in where the queue lives.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from herder.agent import PROGRAM
from herder.config import Config, deprecations
from herder.costs import CostReport, build_report, last_periods
from herder.engine.interface import InstanceNotFound
from herder.engine.metrics import ContainerMetrics, QuotaMetrics, SpendMetrics
from herder.engine.scheduler.quotas import QuotaHeadroom, QuotaState
from herder.engine.scheduler.scheduler import Scheduler
from herder.engine.sizing import ConfigSizer
from herder.engine.worker.interfaces import ContainerReporter
from herder.engine.worker.pool import Pool, PoolError
from herder.model import Container, ContainerState, IdleBehavior, InstanceType, InstanceView
from herder.plugin.bootprobe import BootProbe
from herder.plugin.cloud import (
    Capability,
    Driver,
    DriverContext,
    DriverParameters,
    Instance,
    InstanceSet,
)
from herder.plugin.executor import Executor, ExecutorFactory
from herder.plugin.registry import Plugins
from herder.queue.backend import DispatchLock, open_queue
from herder.queue.base import ContainerNotFound, ContainerQueue, InvalidTransition
from herder.runtime import Runtime
from herder.spend import (
    BudgetState,
    ContainerCost,
    ContainerCostLog,
    Ledger,
    SpendLedger,
    SpendTracker,
    import_jsonl,
    legacy_ledger_path,
    period_bounds,
)

log = logging.getLogger(__name__)


def default_instance_set_id(config: Config) -> str:
    """The tag value that marks this installation's instances.

    Derived from the cluster id alone, so that it survives restarts and token rotation (SPEC §19
    item 24 records how deriving it from a token orphans instances when the token changes).
    """
    if config.cloud.instance_set_id:
        return config.cloud.instance_set_id
    digest = hashlib.sha256(f"herder:{config.cluster_id}".encode()).hexdigest()[:15]
    return f"{config.cluster_id}-is000-{digest}"


def with_driver_billing(
    config: Config,
    driver: Driver,
    params: DriverParameters,
    types: dict[str, InstanceType],
) -> dict[str, InstanceType]:
    """The types, each with the billing the driver states unless its config keys state one.

    A ``<name>.preemptible`` variant follows its base type's keys.
    """
    out: dict[str, InstanceType] = {}
    for name, it in types.items():
        cfg = config.instance_types.get(name) or config.instance_types.get(
            name.removesuffix(".preemptible")
        )
        stated = driver.billing(params, it)
        if (cfg is not None and cfg.configured_billing() is not None) or stated is None:
            out[name] = it
        else:
            out[name] = dataclasses.replace(it, billing=stated)
    return out


class QueueReporter(ContainerReporter):
    """Records what workers report (a start, an exit code and log) in the queue.

    Every call is idempotent, because a probe may report the same exit again when collecting the
    log or cleaning up on the instance failed the first time.
    """

    def __init__(
        self,
        queue: ContainerQueue,
        instance_types: dict[str, InstanceType],
        runtime: Runtime,
        costs: ContainerCostLog | None = None,
    ) -> None:
        """``costs`` also keeps each finished container's cost, for cost reports."""
        self.queue = queue
        self.instance_types = instance_types
        self.runtime = runtime
        self.costs = costs

    def container_started(self, uuid: str, instance_id: str, instance_type: str) -> None:
        try:
            self.queue.set_running(uuid, instance_id, instance_type)
        except (InvalidTransition, ContainerNotFound) as exc:
            log.debug("not marking %s running: %s", uuid, exc)

    def container_failed(
        self, uuid: str, instance_side: bool, message: str, instance_id: str = ""
    ) -> None:
        """Retry (counted against max dispatch attempts) or cancel; never an exit code."""
        ctr = self.queue.get(uuid)
        if ctr is None or ctr.state.final:
            return
        self._add_cost(ctr)
        try:
            if instance_side:
                where = f"instance {instance_id}" if instance_id else "the instance"
                self.queue.retry(uuid, f"{where} could not start the container: {message}")
            else:
                self.queue.cancel(uuid, f"the container could not be started: {message}")
        except InvalidTransition as exc:
            log.warning("cannot record the start failure of %s: %s", uuid, exc)

    def _add_cost(self, ctr: Container) -> float:
        """Charge the time the container held its instance; returns what was added."""
        if ctr.started_at is None or ctr.instance_type not in self.instance_types:
            return 0.0
        hours = max(0.0, self.runtime.now() - ctr.started_at) / 3600.0
        cost = hours * self.instance_types[ctr.instance_type].price
        self.queue.add_cost(ctr.uuid, cost)
        return cost

    def container_pulled(self, uuid: str, seconds: float) -> None:
        try:
            self.queue.set_status(uuid, "image_pull", f"pulled in {seconds:.1f}s")
        except (InvalidTransition, ContainerNotFound) as exc:
            log.debug("not recording the image pull of %s: %s", uuid, exc)

    def container_log(self, uuid: str, data: bytes) -> None:
        try:
            self.queue.append_log(uuid, data)
        except ContainerNotFound:
            log.warning("runner sent the log of unknown container %s", uuid)

    def container_exited(self, uuid: str, exit_code: int, log_data: bytes) -> None:
        ctr = self.queue.get(uuid)
        if ctr is None:
            log.warning("runner reported exit of unknown container %s", uuid)
            return
        if ctr.state.final:
            return
        if log_data:
            self.queue.append_log(uuid, log_data)
        cost = self._add_cost(ctr)
        try:
            self.queue.finish(uuid, exit_code)
        except InvalidTransition as exc:
            log.warning("cannot record exit code %d of %s: %s", exit_code, uuid, exc)
            return
        if self.costs is not None:
            self.costs.record_container(
                ContainerCost(
                    at=self.runtime.now(),
                    uuid=uuid,
                    name=ctr.spec.name,
                    instance_type=ctr.instance_type,
                    cost=ctr.cost + cost,
                    exit_code=exit_code,
                    labels=ctr.spec.labels,
                )
            )


@dataclass
class RunnerBinary:
    """The runner agent program herder copies to instances (None: do not deploy)."""

    data: bytes | None


def load_runner_binary(config: Config) -> RunnerBinary:
    """The bundled runner agent, when ``cloud.deploy_runner`` is on and the agent is installed."""
    if not config.cloud.deploy_runner:
        return RunnerBinary(None)
    path = PROGRAM
    if not path.exists():
        log.warning(
            "runner agent %s not found; using %s already on instances",
            path,
            config.containers.runner_command,
        )
        return RunnerBinary(None)
    return RunnerBinary(path.read_bytes())


class CloudEngine:
    """herder's cloud engine: queue + instance set + pool + scheduler, started and stopped
    together.  (Named apart from :class:`herder.dispatch.Dispatcher`, the SDK's loop for
    dispatchers that are not the cloud engine.)

    Implements :class:`herder.engine.interface.Engine`, the interface the API reads it through.
    """

    #: The cloud engine runs instances: the API serves the instance routes.
    has_instances = True

    def __init__(
        self,
        config: Config,
        *,
        runtime: Runtime,
        plugins: Plugins | None = None,
        queue: ContainerQueue | None = None,
        registry: CollectorRegistry | None = None,
        driver: Driver | None = None,
        executor_factory: ExecutorFactory | None = None,
        public_key: str | None = None,
        uuid_random_bytes: Callable[[int], bytes] | None = None,
        rng: random.Random | None = None,
        ledger: SpendLedger | None = None,
    ) -> None:
        """``uuid_random_bytes`` and ``rng`` (the pool's draws: probe jitter, instance secrets)
        default to unpredictable sources; a simulation passes seeded ones, so that the same
        seed gives the same run.

        ``ledger`` keeps the instances' spend; by default the queue's own
        (:attr:`~herder.queue.base.ContainerQueue.ledger`), so that it lives where the
        containers do and a standby that takes over knows the period's spend."""
        self.config = config
        self.runtime = runtime
        self.plugins = plugins or Plugins.load()
        self.registry = registry if registry is not None else CollectorRegistry()
        if driver is None:
            driver = self.plugins.driver_class(config.cloud.driver)()
        self.driver = driver
        params = driver.validate_parameters(config.cloud.driver_parameters)
        self.instance_types = with_driver_billing(
            config,
            driver,
            params,
            config.build_instance_types() or driver.default_instance_types(params),
        )
        self.sizer = ConfigSizer(
            self.instance_types,
            reserve_extra_ram=config.containers.reserve_extra_ram,
            maximum_price_factor=config.containers.maximum_price_factor,
        )
        #: Where the queue lives, for the start-up log line.
        self.queue_description = "given"
        #: Held before :meth:`start` when this herder may be a standby (``herder serve``).
        self.dispatch_lock: DispatchLock | None = None
        if queue is None:
            opened = open_queue(
                config,
                plugins=self.plugins,
                runtime=runtime,
                sizer=self.sizer,
                random_bytes=uuid_random_bytes,
            )
            queue, self.queue_description = opened.queue, opened.description
            self.dispatch_lock = opened.dispatch_lock
        self.queue = queue
        self.instance_set_id = default_instance_set_id(config)

        self.instance_set: InstanceSet = driver.instance_set(
            params,
            DriverContext(
                instance_set_id=self.instance_set_id,
                shared_resource_tags=dict(config.cloud.resource_tags),
                logger=logging.getLogger(f"herder.driver.{config.cloud.driver}"),
                metrics_registry=self.registry,
                runtime=runtime,
                tag_key_prefix=config.cloud.tag_key_prefix,
            ),
        )
        if executor_factory is None:
            executor_factory = driver.executor_factory(self.instance_set)
        if executor_factory is None:
            executor_factory = self._configured_executor_factory()

        self.ledger = ledger if ledger is not None else open_ledger(config, self.queue)
        self.spend = SpendTracker(self.ledger, self.instance_types, runtime.now())
        self.reporter = QueueReporter(
            self.queue,
            self.instance_types,
            runtime,
            costs=self.ledger if isinstance(self.ledger, ContainerCostLog) else None,
        )
        self.pool = Pool(
            runtime=runtime,
            instance_set=self.instance_set,
            executor_factory=executor_factory,
            config=config,
            instance_types=self.instance_types,
            instance_set_id=self.instance_set_id,
            reporter=self.reporter,
            boot_probe=self._boot_probe(),
            runner_data=load_runner_binary(config).data,
            public_key=public_key,
            registry=self.registry,
            rng=rng,
            started_at=self.spend.started_at,
        )
        self.budget = config.cloud.budget.budget()
        #: The cloud's quotas, read only from drivers that declare they can.
        self.quotas = QuotaHeadroom(
            read=(
                self.instance_set.quotas
                if Capability.QUOTA_HEADROOM in driver.capabilities_for(params)
                else None
            ),
            group_of=self.instance_set.quota_group,
            refresh_interval=config.cloud.quota_refresh_interval,
            logger=logging.getLogger("herder.engine.scheduler.quotas"),
        )
        self.scheduler = Scheduler(
            runtime=runtime,
            queue=self.queue,
            pool=self.pool,
            config=config,
            instance_types=self.instance_types,
            registry=self.registry,
            tracker=self.spend,
            budget=self.budget,
            quotas=self.quotas,
        )
        self.spend_metrics = SpendMetrics(self.registry, self.budget)
        self.quota_metrics = QuotaMetrics(self.registry, self.quota_states)
        self.metrics = ContainerMetrics(self.registry, self.queue, self.pool)
        self._started = False
        self._lock = threading.Lock()

    def _configured_executor_factory(self) -> ExecutorFactory:
        cls = self.plugins.executor_class(self.config.cloud.executor)
        config, runtime = self.config, self.runtime

        def factory(instance: Instance) -> Executor:
            executor: Executor = cls(instance, config, runtime)
            return executor

        return factory

    def _boot_probe(self) -> BootProbe:
        cls = self.plugins.boot_probe_class(self.config.cloud.boot_probe)
        probe: BootProbe = cls(self.config.cloud.boot_probe_command)
        return probe

    def start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        # What the ledger holds now: a standby's leader booked spend while it waited.
        self.spend.reload(self.runtime.now())
        self.pool.start()
        self.scheduler.start()

    def halt(self) -> None:
        """Stop dispatching at once (the dispatch lock was lost): no more locks, starts, kills
        or instance changes.  The queue stays open for the API until :meth:`stop`."""
        self.scheduler.stop()
        self.pool.stop()

    def stop(self) -> None:
        """Stop in reverse order of start; instances are left running for the next start."""
        self.scheduler.stop()
        # After the scheduler (which books spend in its passes) has stopped: no pass races this.
        self.spend.flush(self.runtime.now())
        self.pool.stop()
        self.instance_set.stop()
        self.queue.close()
        if self.dispatch_lock is not None:
            self.dispatch_lock.release()

    def active_counts(self) -> dict[ContainerState, int]:
        return self.queue.counts()

    # ---- the engine interface's instance commands and reads (herder.engine.interface.Engine)

    def instances(self) -> list[InstanceView]:
        return self.pool.instances()

    def kill_instance(self, instance_id: str, reason: str) -> None:
        try:
            self.pool.kill_instance(instance_id, reason)
        except PoolError as exc:
            raise InstanceNotFound(*exc.args) from None

    def set_idle_behavior(self, instance_id: str, behavior: IdleBehavior) -> None:
        try:
            self.pool.set_idle_behavior(instance_id, behavior)
        except PoolError as exc:
            raise InstanceNotFound(*exc.args) from None

    def has_runner(self, uuid: str) -> bool:
        return self.pool.running().get(uuid) == 0.0

    def spot_prices(self) -> dict[str, float]:
        return self.pool.spot_prices()

    def check_health(self) -> None:
        self.pool.check_health()

    def scheduling_passes(self) -> int:
        return self.scheduler.passes

    def scheduling_statuses(self) -> dict[str, str]:
        return {e.entry.container.uuid: e.scheduling_status for e in self.scheduler.snapshot()}

    # ---- spend, for the API (plain data; thread-safe)

    @property
    def quotas_enabled(self) -> bool:
        return self.quotas.enabled

    def quota_states(self) -> list[QuotaState]:
        """The cloud's quotas as last read, with what herder's instances take of each, what
        it created since the read and what waiting containers want; [] when none are read."""
        return self.quotas.states(self.pool.instances(), self.instance_types)

    def budget_state(self) -> BudgetState:
        """The budget as of the latest scheduling pass: period, spend in it, limits, whether
        they are reached.  Before the first pass, spend in the period as the ledger has it."""
        last = self.budget.last
        if last is not None:
            return last
        now = self.runtime.now()
        start, end = period_bounds(now, self.budget.period)
        b = self.budget
        return BudgetState(
            b.period,
            start,
            end,
            self.ledger.total(start, end),
            b.soft_limit,
            b.hard_limit,
            b.on_hard_limit,
            at=now,
        )

    def cost_report(self, period: str = "day", periods: int = 7) -> CostReport:
        """Spend by ``period`` (hour, day, month; UTC) over the last ``periods`` of them, by
        instance type, and the cost of the containers that finished meanwhile.

        Spend is what the ledger has booked: per-second spend of running instances is booked
        every few minutes, so the current period may lag that much (``budget_state`` counts
        it).  Raises ValueError for an unknown period.
        """
        now = self.runtime.now()
        since, until = last_periods(now, period, periods)
        costs = self.ledger if isinstance(self.ledger, ContainerCostLog) else None
        return build_report(
            self.ledger.entries(since, until),
            costs.containers(since, until) if costs is not None else [],
            period=period,
            since=since,
            until=until,
        )


def open_ledger(config: Config, queue: ContainerQueue) -> Ledger:
    """The queue's spend ledger, with an old ledger file's entries imported into it once (see
    :func:`herder.spend.import_jsonl`): the file herder kept before the queue held spend."""
    ledger = queue.ledger
    for warning in deprecations(config):
        log.warning("%s", warning)
    path = legacy_ledger_path(config.cloud.budget.ledger_path, config.queue.path)
    if path is not None:
        import_jsonl(path, ledger)
    return ledger


def public_key_from_private(path: str) -> str:
    """The OpenSSH public key line of the private key file at ``path`` (ValueError if unusable)."""
    import paramiko

    errors = []
    for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            key = cls.from_private_key_file(path)
        except FileNotFoundError as exc:
            raise ValueError(f"{path}: no such file") from exc
        except PermissionError as exc:
            raise ValueError(f"{path}: not readable") from exc
        except (paramiko.SSHException, ValueError) as exc:
            errors.append(str(exc))
            continue
        return f"{key.get_name()} {key.get_base64()}"
    raise ValueError(f"{path}: not a usable SSH private key ({'; '.join(errors)})")

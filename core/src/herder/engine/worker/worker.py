"""One worker per cloud instance: its state machine, probes and shutdown rules (SPEC §3).

States (SPEC §3.1): ``unknown`` (found in the cloud, not created by this process, not yet
probed successfully), ``booting`` (created by us, not ready yet), ``idle``, ``running`` (at least
one runner) and ``shutdown`` (destroy requested; watched only until it leaves the listing).

Every field of every worker is guarded by the pool's single lock (:attr:`WorkerEnv.lock`).
Slow work (SSH commands, cloud calls) never runs under it: a probe snapshots the worker's
modification counter, works without the lock, and applies its result only if nothing changed
the worker meanwhile (SPEC §3.4).

Methods documented "caller holds the lock" must only be called with ``env.lock`` held; the
others take it themselves.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import threading
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from herder import defaults
from herder.agent import protocol as runner_protocol
from herder.config import CloudConfig, Config, ContainersConfig
from herder.engine.worker.interfaces import ContainerReporter
from herder.engine.worker.metrics import PoolMetrics, WorkerSample, worker_category
from herder.engine.worker.runner import Runner, RunnerDeployment
from herder.engine.worker.runner_client import RunnerClient
from herder.engine.worker.verify import TagVerifier
from herder.model import (
    BootOutcome,
    Container,
    DrainCause,
    IdleBehavior,
    InstanceType,
    InstanceView,
    WorkerState,
    is_container_uuid,
)
from herder.plugin.bootprobe import BootProbe
from herder.plugin.executor import ExecResult, Executor, ExecutorError
from herder.runtime import Runtime, Task
from herder.units import format_duration

log = logging.getLogger(__name__)

# Tag names, after the configured prefix (SPEC §5.1).
TAG_INSTANCE_SET_ID = "InstanceSetID"
TAG_INSTANCE_TYPE = "InstanceType"
TAG_IDLE_BEHAVIOR = "IdleBehavior"
TAG_INSTANCE_SECRET = "InstanceSecret"  # noqa: S105 (a tag name)
#: What drained or held the instance (:class:`DrainCause`), so that herder still knows after a
#: restart which drains are its own to undo.  Written only once a cause has been set.
TAG_DRAIN_CAUSE = "DrainCause"


#: Bytes past ``containers.log_limit`` herder still stores: the runner's own "truncated" line.
TRUNCATION_ROOM = 1024
#: The line before the log of a container a previous herder process started: herder cannot
#: tell how much of it that process stored, so it stores the runner's whole log again.
ADOPTED_LOG_NOTE = (
    b"runner herder restarted while the container ran: output stored before the restart "
    b"may appear again below\n"
)
#: Seconds to wait for a container's log before shutting its instance down.
SAVE_OUTPUT_TIMEOUT = 10.0


def _positive(value: float, default: float) -> float:
    """Arvados' rule: a duration or rate that is unset (<= 0) takes the code default."""
    return value if value > 0 else default


#: The configuration's defaults: the pool's own defaults are read from them, never repeated.
_CLOUD = CloudConfig()
_CONTAINERS = ContainersConfig()


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """The pool's and workers' knobs, with code defaults applied (SPEC §5.1).

    The defaults are the configuration's (a pool built without a configuration, as tests do,
    behaves as an unconfigured ``herder serve``), and a duration or rate configured as 0 or
    less falls back to the same default.
    """

    cluster_id: str = defaults.CLUSTER_ID
    tag_key_prefix: str = _CLOUD.tag_key_prefix
    probe_interval: float = _CLOUD.probe_interval
    # <= probe_interval: no slower probing of idle workers
    idle_probe_interval: float = _CLOUD.idle_probe_interval
    sync_interval: float = _CLOUD.sync_interval
    timeout_idle: float = _CLOUD.timeout_idle
    billing_shutdown_margin: float = _CLOUD.billing_shutdown_margin
    max_instance_lifetime: float = _CLOUD.max_instance_lifetime  # 0 = no limit
    timeout_booting: float = _CLOUD.timeout_booting
    boot_failure_backoff: float = _CLOUD.boot_failure_backoff  # 0 = no back-off
    boot_failure_backoff_max: float = _CLOUD.boot_failure_backoff_max
    timeout_probe: float = _CLOUD.timeout_probe
    timeout_shutdown: float = _CLOUD.timeout_shutdown
    timeout_term: float = _CLOUD.timeout_term
    timeout_signal: float = _CLOUD.timeout_signal
    timeout_stale_run_lock: float = _CLOUD.timeout_stale_run_lock
    timeout_command: float = _CLOUD.timeout_command
    max_probes_per_second: float = _CLOUD.max_probes_per_second
    max_cloud_ops_per_second: float = _CLOUD.max_cloud_ops_per_second
    max_concurrent_creates: int = _CLOUD.max_concurrent_instance_create_ops  # 0 = unlimited
    max_instances: int = _CLOUD.max_instances  # 0 = unlimited
    runner_args: tuple[str, ...] = ()
    runtime_engine: str = _CONTAINERS.runtime_engine
    log_limit: int = _CONTAINERS.log_limit  # 0 = unlimited
    pull_policy: str = _CONTAINERS.pull_policy
    image_id: str = _CLOUD.image_id
    instance_init_command: str = _CLOUD.instance_init_command
    deploy_public_key: bool = _CLOUD.deploy_public_key
    resource_tags: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Config) -> PoolSettings:
        c, d = config.cloud, _CLOUD
        return cls(
            cluster_id=config.cluster_id,
            tag_key_prefix=c.tag_key_prefix,
            probe_interval=_positive(c.probe_interval, d.probe_interval),
            idle_probe_interval=max(0.0, c.idle_probe_interval),
            sync_interval=_positive(c.sync_interval, d.sync_interval),
            timeout_idle=_positive(c.timeout_idle, d.timeout_idle),
            billing_shutdown_margin=max(0.0, c.billing_shutdown_margin),
            max_instance_lifetime=max(0.0, c.max_instance_lifetime),
            timeout_booting=_positive(c.timeout_booting, d.timeout_booting),
            boot_failure_backoff=max(0.0, c.boot_failure_backoff),
            boot_failure_backoff_max=max(c.boot_failure_backoff, c.boot_failure_backoff_max),
            timeout_probe=_positive(c.timeout_probe, d.timeout_probe),
            timeout_shutdown=_positive(c.timeout_shutdown, d.timeout_shutdown),
            timeout_term=_positive(c.timeout_term, d.timeout_term),
            timeout_signal=_positive(c.timeout_signal, d.timeout_signal),
            timeout_stale_run_lock=_positive(c.timeout_stale_run_lock, d.timeout_stale_run_lock),
            timeout_command=_positive(c.timeout_command, d.timeout_command),
            max_probes_per_second=(
                c.max_probes_per_second if c.max_probes_per_second >= 1 else d.max_probes_per_second
            ),
            max_cloud_ops_per_second=c.max_cloud_ops_per_second,
            max_concurrent_creates=c.max_concurrent_instance_create_ops,
            max_instances=c.max_instances,
            runner_args=tuple(config.containers.runner_args),
            runtime_engine=config.containers.runtime_engine,
            log_limit=config.containers.log_limit,
            pull_policy=config.containers.pull_policy,
            image_id=c.image_id,
            instance_init_command=c.instance_init_command,
            deploy_public_key=c.deploy_public_key,
            resource_tags=dict(c.resource_tags),
        )

    def tag(self, name: str) -> str:
        return self.tag_key_prefix + name


@dataclass
class WorkerEnv:
    """What every worker of one pool shares with the pool."""

    runtime: Runtime
    lock: threading.Lock
    settings: PoolSettings
    metrics: PoolMetrics
    boot_probe: BootProbe
    runner: RunnerDeployment
    reporter: ContainerReporter
    #: uuid -> time its runner ended (the pool's ``exited`` map, SPEC §5.6).
    exited: MutableMapping[str, float]
    notify: Callable[[], None]
    #: Schedules a cloud call (destroy, set_tags) through the pool's cloud-op rate limit.
    submit_cloud_op: Callable[[Task], None]
    logger: logging.Logger = log
    #: Pool-wide modification counter (see :meth:`Worker.touch`).
    sequence: Callable[[], int] = field(default_factory=lambda: itertools.count(1).__next__)
    #: Told each worker's boot outcome, once (caller holds the lock): the pool's back-off.
    boot_outcome: Callable[[InstanceType, BootOutcome], None] = lambda _type, _outcome: None


class _InstanceLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every message with the instance id, and attaches it as the ``instance`` field.

    A caller's own ``extra=`` fields (``container``) are kept next to it, where a plain
    LoggerAdapter would drop them.
    """

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return f"instance {self.extra['instance'] if self.extra else '?'}: {msg}", kwargs


@dataclass
class RunProbeResult:
    """What one ``--list`` told us (SPEC §3.5)."""

    ok: bool = False
    running: list[str] = field(default_factory=list)
    exited: dict[str, int] = field(default_factory=dict)
    #: uuid -> (side, message): containers the runner could not start
    failed: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: uuid -> seconds its image pull took
    pulled: dict[str, float] = field(default_factory=dict)
    broken: bool = False
    error: str = ""  # why the probe failed (a bastion that refused, a timeout...), if it did


def _outcome(run: Callable[[], ExecResult]) -> tuple[bool, bytes, bytes, str]:
    """(ok, stdout, stderr, error text) of a command: what the probe and install steps log."""
    try:
        result = run()
    except ExecutorError as exc:
        return False, b"", b"", str(exc)
    err = "" if result.ok else f"exit status {result.exit_status}"
    return result.ok, result.stdout, result.stderr, err


class Worker:
    """The pool's record of one cloud instance."""

    def __init__(
        self,
        env: WorkerEnv,
        instance: TagVerifier,
        instance_type: InstanceType,
        executor: Executor,
        state: WorkerState,
        idle_behavior: IdleBehavior,
    ) -> None:
        now = env.runtime.now()
        self.env = env
        self.instance = instance
        self.instance_type = instance_type
        self.executor = executor
        self.state = state
        self.state_since = now
        self.idle_behavior = idle_behavior
        #: What set the idle behaviour, and why, in words (see :class:`DrainCause`).
        self.drain_cause = DrainCause.NONE
        self.reason = ""
        self.appeared = now
        #: When the instance started, as far as herder knows: its creation, or for an instance
        #: adopted after a restart what the spend ledger remembers (else the adoption).  Billing
        #: increments and the lifetime limit count from it; boot timeouts from ``appeared``.
        self.started = now
        self.probed = now  # start of the last successful probe
        self.busy = now  # last time known busy
        self.updated = now  # last local modification
        #: Modification counter: compared instead of ``updated`` because a virtual clock does
        #: not move within an instant, so equal times cannot tell "changed since" apart.
        self.update_seq = env.sequence()
        self.destroyed: float | None = None
        #: The cloud accepted the destroy: the instance no longer holds a place in the limits.
        self.destroy_accepted = False
        self.first_ssh: float | None = None
        self.last_uuid = ""
        self.running: dict[str, Runner] = {}
        self.starting: dict[str, Runner] = {}
        self.boot_outcome: BootOutcome | None = None
        self.probe_error = ""
        #: why its containers are lost, once it shut down for not answering ("" otherwise)
        self.lost_reason = ""
        #: The latest price from the instance's price history (spot), 0 when it has none.
        self.market_price = 0.0
        self.time_to_ready_reported = False
        self.stale_run_lock_since: float | None = None
        self._probing = threading.Lock()
        self.log = _InstanceLog(env.logger, {"instance": instance.id})
        #: set when the runner reported a change while a probe was running (see runner_changed)
        self._probe_again = False
        #: uuid -> bytes of the runner's log of the current attempt stored in the queue; its
        #: own lock, because the stream's reader and a probe both store logs.
        self._output_lock = threading.Lock()
        self._output_stored: dict[str, int] = {}
        #: containers whose image pull time was reported (guarded by ``_output_lock``)
        self._pulls_reported: set[str] = set()
        #: containers started by an earlier herder process, whose log may be partly stored
        #: already: their log is stored again from its start, after a line saying so
        self._adopted: set[str] = set()
        self.runner_client = RunnerClient(
            executor,
            command=env.runner.command,
            remote_user=self._remote_user,
            resident=env.runner.deploying,
            now=self._now,
            on_change=self.runner_changed,
            on_log=self.relay_log,
            name=f"runner-{instance.id}",
            logger=self.log,
        )

    # ------------------------------------------------------------------ small helpers

    @property
    def id(self) -> str:
        return self.instance.id

    def _now(self) -> float:
        return self.env.runtime.now()

    def runner_count(self) -> int:
        return len(self.running) + len(self.starting)

    def set_state(self, state: WorkerState) -> None:
        """Change state, remembering since when (caller holds the lock)."""
        if state != self.state:
            self.state = state
            self.state_since = self._now()

    def touch(self) -> float:
        """Record a local modification (caller holds the lock); returns the time."""
        now = self._now()
        self.updated = now
        self.update_seq = self.env.sequence()
        return now

    def report_boot_outcome(self, outcome: BootOutcome) -> None:
        """Count the boot outcome once per worker: the first report wins (caller holds lock)."""
        if self.boot_outcome is not None:
            return
        self.boot_outcome = outcome
        self.env.metrics.boot_outcomes.labels(outcome.value).inc()
        self.env.boot_outcome(self.instance_type, outcome)

    def _report_time_to_ready(self) -> None:
        """Observe first SSH -> ready, once (caller holds the lock).

        Only when the first SSH connection was recorded: Arvados observes "now - zero time"
        otherwise, a meaningless huge value (SPEC §19 item 15).
        """
        if self.time_to_ready_reported:
            return
        self.time_to_ready_reported = True
        if self.first_ssh is not None:
            self.env.metrics.time_to_ready.observe(self._now() - self.first_ssh)

    def _remote_user(self) -> str:
        return self.instance.remote_user

    def _execute(self, command: str, stdin: bytes | None = None) -> tuple[bool, bytes, bytes, str]:
        """Run a command with the configured timeout: (ok, stdout, stderr, error text)."""
        timeout = self.env.settings.timeout_command
        return _outcome(lambda: self.executor.execute(command, stdin, None, timeout))

    def _run_verb(
        self, argv: list[str], stdin: bytes | None = None
    ) -> tuple[bool, bytes, bytes, str]:
        """Run a runner verb with the configured timeout: (ok, stdout, stderr, error text)."""
        timeout = self.env.settings.timeout_command
        return _outcome(lambda: self.runner_client.call(argv, stdin, timeout))

    # ------------------------------------------------------------------ runners

    def new_runner(self, uuid: str, container: Container | None) -> Runner:
        settings = self.env.settings
        return Runner(
            uuid=uuid,
            container=container,
            instance_type=self.instance_type,
            client=self.runner_client,
            args=list(settings.runner_args),
            runtime_engine=settings.runtime_engine,
            runtime=self.env.runtime,
            log_limit=settings.log_limit,
            pull_policy=settings.pull_policy,
            lock=self.env.lock,
            timeout_term=settings.timeout_term,
            timeout_signal=settings.timeout_signal,
            timeout_command=settings.timeout_command,
            on_unkillable=self.on_unkillable,
            on_killed=self.on_killed,
            logger=self.log,
        )

    def start_container(self, container: Container) -> None:
        """Start a runner for ``container`` (caller holds the lock; SPEC §3.8)."""
        self.log.debug("starting container %s", container.uuid)
        runner = self.new_runner(container.uuid, container)
        self.starting[container.uuid] = runner
        with self._output_lock:
            self._output_stored.pop(container.uuid, None)  # a new run starts a new log
            self._pulls_reported.discard(container.uuid)
            self._adopted.discard(container.uuid)
        if self.state != WorkerState.RUNNING:
            self.set_state(WorkerState.RUNNING)
            self.env.notify()
        self.env.runtime.spawn(lambda: self._start_runner(runner))

    def _start_runner(self, runner: Runner) -> None:
        """Background: run the start command, then move the runner starting -> running.

        The move happens whether or not the command succeeded (it may have started the
        process anyway); the next run probe ends a runner that is not really there.  It is
        skipped if the runner is no longer ours in ``starting`` (a probe already moved it, or
        the worker was closed).
        """
        assert runner.container is not None
        ok = runner.start()
        self.env.metrics.queue_to_runner.observe(self._now() - runner.container.created_at)
        with self.env.lock:
            moved = self.starting.get(runner.uuid) is runner
            if moved:
                now = self.touch()
                self.busy = now
                del self.starting[runner.uuid]
                self.running[runner.uuid] = runner
                self.last_uuid = runner.uuid
            runner.start_finished()
        if moved and ok:
            self.env.reporter.container_started(runner.uuid, self.id, self.instance_type.name)

    def close_runner(self, uuid: str, runner: Runner | None = None) -> bool:
        """End a runner whose process is gone (caller holds the lock; SPEC §3.9).

        Records the exit time for the scheduler.  Only runners in ``running`` are ended, except
        that a kill confirmed for a specific runner that is still in ``starting`` ends that one
        too (its start command has returned by then, see :meth:`Runner.kill`).
        """
        found = self.running.get(uuid)
        if found is not None and (runner is None or found is runner):
            del self.running[uuid]
        elif runner is not None and self.starting.get(uuid) is runner:
            found = runner
            del self.starting[uuid]
        else:
            return False
        self.log.info("container %s: runner process ended", uuid)
        found.close()
        now = self.touch()
        self.env.exited[uuid] = now
        if self.state == WorkerState.RUNNING and self.runner_count() == 0:
            self.set_state(WorkerState.IDLE)
        return True

    def update_running(self, uuids: list[str]) -> tuple[bool, list[str]]:
        """Make ``running`` match a run probe (caller holds the lock; SPEC §3.9).

        Returns (changed, uuids newly known to be running).  Runners still starting that the
        probe did not list are left alone: their start command may not have run yet.
        """
        changed = False
        newly_running: list[str] = []
        alive = set(uuids)
        for uuid in uuids:
            if uuid in self.running:
                continue
            if uuid in self.starting:
                self.running[uuid] = self.starting.pop(uuid)
            else:
                # Not started by us: a previous herder process started it.
                self.log.info("container %s: runner process detected", uuid)
                self.running[uuid] = self.new_runner(uuid, None)
                with self._output_lock:
                    if uuid not in self._output_stored:
                        self._adopted.add(uuid)
            newly_running.append(uuid)
            changed = True
        for uuid in [u for u in self.running if u not in alive]:
            self.close_runner(uuid)
            changed = True
        return changed, newly_running

    def on_unkillable(self, uuid: str) -> None:
        """A runner gave up on SIGTERM: drain the worker unless it is held."""
        with self.env.lock:
            if self.idle_behavior == IdleBehavior.HOLD:
                self.log.warning("container %s unkillable, but the worker is held", uuid)
                return
            self.log.warning("container %s unkillable, draining worker", uuid)
            self.set_idle_behavior(
                IdleBehavior.DRAIN, DrainCause.BROKEN, f"container {uuid} could not be killed"
            )

    def on_killed(self, uuid: str, runner: Runner) -> None:
        """A kill command reported the process gone."""
        with self.env.lock:
            self.close_runner(uuid, runner)
        self.env.notify()

    # ------------------------------------------------------------------ idle behaviour, shutdown

    def set_idle_behavior(
        self,
        behavior: IdleBehavior,
        cause: DrainCause = DrainCause.NONE,
        reason: str = "",
    ) -> None:
        """Set, save in tags, and shut down at once if now eligible (caller holds the lock).

        ``cause`` and ``reason`` say who set it and why (shown with the instance); setting
        ``run`` clears them.
        """
        self.log.info("set idle behavior %s%s", behavior.value, f" ({reason})" if reason else "")
        self.idle_behavior = behavior
        if behavior == IdleBehavior.RUN:
            cause, reason = DrainCause.NONE, ""
        self.drain_cause = cause
        self.reason = reason
        self.save_tags()
        self.shutdown_if_idle()

    def age(self) -> float:
        """Seconds since the instance started (see :attr:`started`)."""
        return self._now() - self.started

    def retire_if_old(self) -> bool:
        """Drain an instance past ``max_instance_lifetime`` (caller holds the lock).

        Draining, not killing: it finishes what runs on it, takes nothing new, and shuts down
        once empty; demand then creates a fresh instance.  Held instances and ones already
        draining are left alone.  True if drained now.
        """
        limit = self.env.settings.max_instance_lifetime
        if limit <= 0 or self.idle_behavior != IdleBehavior.RUN:
            return False
        if self.state not in (WorkerState.IDLE, WorkerState.RUNNING) or self.age() < limit:
            return False
        self.set_idle_behavior(
            IdleBehavior.DRAIN,
            DrainCause.LIFETIME,
            f"older than cloud.max_instance_lifetime ({format_duration(limit)}): draining, "
            "to be replaced",
        )
        return True

    def idle_expired(self, now: float) -> bool:
        """Whether an idle worker has been idle long enough to shut down (SPEC §3.10, extended).

        Idle for ``timeout_idle`` is needed, as in Arvados.  Then, when the cloud bills in
        increments, an instance whose current increment (or minimum) is already paid is kept
        for work until ``billing_shutdown_margin`` before it runs out: shutting it down sooner
        saves nothing, and a container arriving meanwhile gets an instance without a boot.
        With per-second billing past the minimum this is exactly the idle timeout.
        """
        s = self.env.settings
        if now - self.busy < s.timeout_idle:
            return False
        billing = self.instance_type.billing
        age = now - self.started
        if billing.per_second and age >= billing.minimum:
            return True
        return billing.paid_until(age) - age <= s.billing_shutdown_margin

    def eligible_for_shutdown(self) -> bool:
        """Whether the idle/drain/unknown rules say to shut down now (SPEC §3.10)."""
        if self.idle_behavior == IdleBehavior.HOLD:
            return False
        draining = self.idle_behavior == IdleBehavior.DRAIN
        now = self._now()
        match self.state:
            case WorkerState.BOOTING:
                return draining
            case WorkerState.IDLE:
                if draining and self.drain_cause is DrainCause.CONSOLIDATION:
                    # Consolidation only steers work away; once empty, the instance goes by
                    # the idle rules, so a paid billing increment is not thrown away and
                    # demand can still take it back meanwhile.
                    return self.idle_expired(now)
                return draining or self.idle_expired(now)
            case WorkerState.RUNNING:
                runners = [*self.running.values(), *self.starting.values()]
                return draining and all(r.givenup for r in runners)
            case WorkerState.UNKNOWN:
                # Arvados shuts an unknown worker down after TimeoutBooting even when run
                # probes show containers on it, killing live work after a restart with a
                # broken boot probe (SPEC §19 item 11).  A worker with runners is kept.
                if self.runner_count() > 0:
                    return False
                return now - self.appeared >= self.env.settings.timeout_booting
            case _:
                return False

    def shutdown_if_idle(self) -> bool:
        """Shut down if eligible (caller holds the lock)."""
        if not self.eligible_for_shutdown():
            return False
        self.log.info(
            "shutdown worker (state %s, idle %.0fs, idle behavior %s)",
            self.state.value,
            self._now() - self.busy,
            self.idle_behavior.value,
        )
        self.report_boot_outcome(BootOutcome.ABORTED)
        self.shutdown()
        return True

    def shutdown_if_broken(self, since_last_success: float) -> bool:
        """Shut down an unresponsive worker (caller holds the lock).

        ``since_last_success`` is measured from the last successful probe's start to this
        probe's start, so a slow probe that straddles the deadline still counts as an attempt
        made after it.
        """
        if self.idle_behavior == IdleBehavior.HOLD:
            return False
        settings = self.env.settings
        if self.state in (WorkerState.UNKNOWN, WorkerState.BOOTING):
            label, threshold = "new instance", settings.timeout_booting
        else:
            label, threshold = "instance", settings.timeout_probe
        if since_last_success < threshold:
            return False
        self.log.warning(
            "%s unresponsive for %.0fs, shutting down (state %s)%s",
            label,
            since_last_success,
            self.state.value,
            "; try `herder cloudtest` to debug" if label == "new instance" else "",
        )
        if self.runner_count():
            self.lost_reason = (
                f"instance {self.id} did not answer for {since_last_success:.0f}s "
                f"(past cloud.timeout_probe {threshold:g}s) and was shut down"
            )
        self.shutdown(save_output=False)  # it does not answer: no log to save
        return True

    def shutdown(self, save_output: bool = True) -> None:
        """Mark shut down and ask the cloud to destroy the instance (caller holds the lock).

        A failed destroy is only logged: the pool's sync destroys again while the instance is
        still listed after timeout_shutdown.  With ``save_output``, the logs of containers
        still on the instance are read once more before it is destroyed (when its last probe
        succeeded, so the instance answers), so that they are kept to the last line.
        """
        uuids = sorted({*self.running, *self.starting})
        if not (save_output and uuids and not self.probe_error):
            uuids = []  # nothing to save, or the last probe failed: it may not answer
        now = self.touch()
        self.destroyed = now
        self.set_state(WorkerState.SHUTDOWN)
        self.env.notify()
        instance = self.instance

        def destroy() -> None:
            try:
                instance.destroy()
            except Exception as exc:
                self.log.warning("destroy failed: %s", exc)
                return
            with self.env.lock:
                if self.state == WorkerState.SHUTDOWN:
                    self.destroy_accepted = True
            # A place against max_instances is free now: the scheduler may create at once.
            self.env.notify()

        if not uuids:
            self.env.submit_cloud_op(destroy)
            return

        def save_then_destroy() -> None:
            self._save_output(uuids)
            self.env.submit_cloud_op(destroy)

        self.env.runtime.spawn(save_then_destroy)

    def _save_output(self, uuids: list[str]) -> None:
        """Store what the runner logged for ``uuids`` and herder has not stored yet."""
        timeout = min(self.env.settings.timeout_command, SAVE_OUTPUT_TIMEOUT)
        for uuid in uuids:
            call = functools.partial(
                self.runner_client.call, runner_protocol.log_argv(uuid), None, timeout
            )
            ok, data, _, err = _outcome(call)
            if not ok:
                self.log.info("container %s: cannot save its log before shutdown: %s", uuid, err)
                continue
            try:
                self.relay_log(uuid, 0, data)
            except Exception as exc:
                self.log.warning("container %s: cannot store its log: %s", uuid, exc)

    def save_tags(self) -> None:
        """Write the instance type and idle behaviour to the instance's tags if they differ.

        Caller holds the lock.  Called from every sync too, so tags converge after a transient
        failure.
        """
        settings = self.env.settings
        tags = dict(self.instance.tags)
        desired = {
            settings.tag(TAG_INSTANCE_TYPE): self.instance_type.name,
            settings.tag(TAG_IDLE_BEHAVIOR): self.idle_behavior.value,
        }
        cause_tag = settings.tag(TAG_DRAIN_CAUSE)
        if self.drain_cause is not DrainCause.NONE or cause_tag in tags:
            desired[cause_tag] = self.drain_cause.value
        if all(tags.get(k) == v for k, v in desired.items()):
            return
        tags.update(desired)
        instance = self.instance

        def set_tags() -> None:
            try:
                instance.set_tags(tags)
            except Exception as exc:
                self.log.warning("error updating tags: %s", exc)

        self.env.submit_cloud_op(set_tags)

    def close(self) -> None:
        """The instance left the pool: abandon its runners, then drop the connection."""
        with self.env.lock:
            for runners in (self.running, self.starting):
                for uuid, runner in list(runners.items()):
                    self.log.info("container %s: runner process abandoned", uuid)
                    runner.close()
                    del runners[uuid]
        self.runner_client.close()
        self.executor.close()

    # ------------------------------------------------------------------ probing

    def probe_can_wait(self) -> bool:
        """Whether this round's probe may be skipped (caller holds the lock).

        An idle worker whose resident runner stream is up needs no ``--list`` every
        ``probe_interval``: nothing runs there to finish, the stream would tell of a container
        ending, and a connection that dies ends the stream (the worker is then probed every
        round again).  It is still probed every ``idle_probe_interval``, which bounds how late
        a silently hung instance or a runner reporting itself broken is noticed.  At 2,000
        idle instances this is most of the probes, and most of the dispatcher's CPU
        (``benchmarks/ssh_scale.py --pool``).
        """
        settings = self.env.settings
        if settings.idle_probe_interval <= settings.probe_interval:
            return False
        if self.state != WorkerState.IDLE or self.runner_count() or self.probe_error:
            return False
        if self._now() - self.probed >= settings.idle_probe_interval:
            return False
        return self.runner_client.resident

    def probe_and_update(self) -> None:
        """Probe the instance and update state from the results (SPEC §3.3).

        Call in a background task, without the lock.  Returns at once if a probe of this
        worker is still running.
        """
        while True:
            if not self._probing.acquire(blocking=False):
                self.log.debug("still waiting for last probe to finish")
                return
            try:
                with self.env.lock:
                    self._probe_again = False
                self._probe_and_update()
            finally:
                self._probing.release()
            with self.env.lock:
                if not self._probe_again:
                    return

    def runner_changed(self) -> None:
        """The resident runner says a container ended: probe now, not at the next round.

        Results then reach the queue within milliseconds of the exit instead of up to a
        probe interval later.  These probes are not spaced by max_probes_per_second: they come
        at most once per container end, and coalesce; a change reported while a probe runs
        makes that probe run once more when it ends (its ``--list`` may have been too early).
        Called from the runner client's reader thread: it only schedules.
        """
        with self.env.lock:
            self._probe_again = True
        self.env.runtime.spawn(self._probe_on_change)

    def _probe_on_change(self) -> None:
        with self.env.lock:
            if not self._probe_again:
                return  # a probe since the change has already looked
        self.probe_and_update()

    def _probe_and_update(self) -> None:
        """SPEC §3.4, step by step."""
        with self.env.lock:
            seq0 = self.update_seq
            initial = self.state
        if initial == WorkerState.SHUTDOWN:
            return
        booted = initial in (WorkerState.IDLE, WorkerState.RUNNING)
        probe_start = self._now()
        detail = ""
        if not booted:
            booted, detail = self.env.boot_probe.probe(self.executor, self.instance)
            # The runner goes onto an unknown worker even when the boot probe fails, so the
            # run probe can still find containers a previous herder process left there.
            should_copy = booted or initial == WorkerState.UNKNOWN
            if not booted:
                with self.env.lock:
                    if self.state in (WorkerState.IDLE, WorkerState.RUNNING):
                        booted, should_copy = True, False  # a concurrent probe succeeded
            if should_copy:
                copied, copy_detail = self.copy_runner()
                if not copied:
                    booted, detail = False, copy_detail
                    self.log.warning("error copying runner program: %s", copy_detail)
            if booted:
                self.log.info("instance booted; will try the run probe")
        result = RunProbeResult()
        if booted or initial == WorkerState.UNKNOWN:
            result = self.probe_running()
            if result.ok and result.pulled:
                self._report_pulls(result.pulled)
            if result.ok and (result.exited or result.failed):
                self.collect_exited(result.exited, result.failed)
        with self.env.lock:
            newly_running = self._apply_probe(seq0, initial, booted, probe_start, detail, result)
        for uuid in newly_running:
            self.env.reporter.container_started(uuid, self.id, self.instance_type.name)

    def _apply_probe(
        self,
        seq0: int,
        initial: WorkerState,
        booted: bool,
        probe_start: float,
        detail: str,
        result: RunProbeResult,
    ) -> list[str]:
        """Apply a finished probe (caller holds the lock); returns uuids newly running."""
        # What operators see in the instance's status until a probe succeeds again.
        if result.ok:
            self.probe_error = ""
        elif result.error or (not booted and detail.strip()):
            self.probe_error = (result.error or detail.strip())[:500]
        if result.broken and self.idle_behavior == IdleBehavior.RUN:
            self.log.info("probe reported broken instance")
            self.report_boot_outcome(BootOutcome.FAILURE)
            self.set_idle_behavior(
                IdleBehavior.DRAIN, DrainCause.BROKEN, "the runner reported the instance broken"
            )
        if not result.ok or (not booted and not result.running and not self.running):
            if self.state == WorkerState.SHUTDOWN:
                return []  # shut down during the probe (or just now, for being broken)
            since = probe_start - self.probed
            if self.shutdown_if_broken(since) and not booted:
                self.report_boot_outcome(BootOutcome.FAILURE)
                self.log.info("boot failed after %.0fs: %s", since, detail.strip())
            return []

        update_time = self._now()
        self.probed = update_time
        if self.update_seq != seq0:
            # Changed during the probe (a sync, a container start): ``running`` may hold a
            # container that was not yet running when the probe listed them.  The next probe
            # catches up.
            self.log.debug("skipping worker state update due to probe/sync race")
            return []

        if result.running:
            self.busy = update_time
            if not self.last_uuid:
                self.last_uuid = result.running[0]
        elif self.running:
            self.busy = update_time  # containers just finished
        changed, newly_running = self.update_running(result.running)

        if booted and self.state in (WorkerState.UNKNOWN, WorkerState.BOOTING):
            if self.state == WorkerState.BOOTING:
                self._report_time_to_ready()
            self.set_state(WorkerState.IDLE)  # becomes running below if there are runners
            changed = True
        if not changed:
            return newly_running
        if self.state == WorkerState.UNKNOWN:
            self.log.info("run probe succeeded, but boot probe is still failing")
        if self.state == WorkerState.IDLE and self.runner_count() > 0:
            self.set_state(WorkerState.RUNNING)
        elif self.state == WorkerState.RUNNING and self.runner_count() == 0:
            self.set_state(WorkerState.IDLE)
        self.updated = update_time
        self.update_seq = self.env.sequence()
        if booted and initial in (WorkerState.UNKNOWN, WorkerState.BOOTING):
            self.report_boot_outcome(BootOutcome.SUCCESS)
            self.log.info(
                "probes succeeded, instance is in service (state %s, %d runners)",
                self.state.value,
                self.runner_count(),
            )
        self.env.notify()
        return newly_running

    def copy_runner(self) -> tuple[bool, str]:
        """Install the runner program unless the right one is there already (SPEC §3.7)."""
        runner = self.env.runner
        if not runner.deploying:
            return True, ""  # deployment disabled: the runner command is already installed
        ok, stdout, stderr, _ = self._execute(runner.md5_check_command(self._remote_user()))
        if ok and not stderr and stdout == runner.md5_expected_output():
            self.log.debug("runner program already installed with the right md5")
            return True, ""
        command = runner.install_command(self._remote_user())
        self.log.info("installing runner program at %s", runner.command)
        ok, _, stderr, err = self._execute(command, runner.data)
        if not ok:
            return False, f"{err}: {stderr.decode(errors='replace').strip()}"
        return True, ""

    def probe_running(self) -> RunProbeResult:
        """Run ``--list`` and parse it; update the stale-lock timer (SPEC §3.5)."""
        prices = self.instance.price_history(self.instance_type)
        if prices:  # newest first: the price in force, for spend
            self.market_price = prices[0].price
        stdin = json.dumps([p.to_json() for p in prices]).encode() if prices else None
        argv = runner_protocol.list_argv(with_prices=bool(prices))
        before = self._now()
        ok, stdout, stderr, err = self._run_verb(argv, stdin)
        duration = self._now() - before
        if not ok:
            self.log.warning(
                "run probe %r failed: %s: stdout=%r stderr=%r",
                " ".join(argv),
                err,
                stdout[:1000],
                stderr[:1000],
            )
            self.env.metrics.run_probe_duration.labels("fail").observe(duration)
            return RunProbeResult(error=err or stderr.decode(errors="replace").strip()[:500])
        self.env.metrics.run_probe_duration.labels("success").observe(duration)
        parsed = runner_protocol.parse_list_output(
            stdout.decode(errors="replace"), self.env.settings.cluster_id
        )
        result = RunProbeResult(
            ok=True,
            running=[u for u in parsed.running if self._valid_uuid(u)],
            exited={u: c for u, c in parsed.exited.items() if self._valid_uuid(u)},
            failed={u: f for u, f in parsed.failed.items() if self._valid_uuid(u)},
            pulled={u: s for u, s in parsed.pulled.items() if self._valid_uuid(u)},
            broken=parsed.broken,
        )
        for uuid in parsed.stale:
            self.log.info("container %s: probe reported stale run lock", uuid)
        with self.env.lock:
            result.broken = self._stale_lock_makes_broken(bool(parsed.stale)) or result.broken
        return result

    def _valid_uuid(self, uuid: str) -> bool:
        """Only well-formed uuids are tracked: they end up in shell commands."""
        if is_container_uuid(uuid):
            return True
        self.log.warning("ignoring malformed container uuid %r in run probe output", uuid)
        return False

    def _stale_lock_makes_broken(self, stale: bool) -> bool:
        """A stale run lock seen for longer than timeout_stale_run_lock means broken.

        Caller holds the lock.  The lock is typically held by a mount process that outlived
        the runner; until it goes away no new container can use the instance properly.
        """
        now = self._now()
        if not stale:
            self.stale_run_lock_since = None
            return False
        if self.stale_run_lock_since is None:
            self.stale_run_lock_since = now
            return False
        held = now - self.stale_run_lock_since
        if held > self.env.settings.timeout_stale_run_lock:
            self.log.warning("reporting broken after a stale run lock for %.0fs", held)
            return True
        return False

    def collect_exited(
        self, exited: dict[str, int], failed: dict[str, tuple[str, str]] | None = None
    ) -> None:
        """Pull each finished container's result and log, then let the runner forget it.

        Without the lock.  Idempotent: if ``--forget`` fails, the next probe lists the
        container again and this runs again; the reporter accepts repeats.

        A container the runner could not start (``failed``) is no exit code: blamed on the
        instance, the container is retried elsewhere and the instance is drained; blamed on the
        container (no such image), it is cancelled and the instance stays in service.
        """
        results: dict[str, int | tuple[str, str]] = {**exited, **(failed or {})}
        for uuid, outcome in sorted(results.items()):
            ok, log_data, stderr, err = self._run_verb(runner_protocol.log_argv(uuid))
            if ok:
                # The whole log: what the live relay has stored already is skipped.
                self.relay_log(uuid, 0, log_data)
            else:
                self.log.warning("container %s: cannot read log: %s %r", uuid, err, stderr[:500])
            try:
                if isinstance(outcome, int):
                    self.env.reporter.container_exited(uuid, outcome, b"")
                else:
                    self._start_failed(uuid, *outcome)
            except Exception as exc:
                # Not recorded (the queue's disk is full, say): the runner keeps the result
                # and lists it again, so the next probe records it.  Forgetting it now would
                # make the container look lost, and it would run a second time.
                self.log.error(
                    "container %s: cannot record its result %r, kept on the instance for "
                    "the next probe: %s",
                    uuid,
                    outcome,
                    exc,
                )
                continue
            ok, _, stderr, err = self._run_verb(runner_protocol.forget_argv(uuid))
            if not ok:
                self.log.warning("container %s: cannot forget: %s %r", uuid, err, stderr[:500])
                continue
            with self._output_lock:
                self._output_stored.pop(uuid, None)
                self._pulls_reported.discard(uuid)

    def _report_pulls(self, pulled: dict[str, float]) -> None:
        """Tell the reporter each image pull once (``--list`` repeats it every probe)."""
        for uuid, seconds in sorted(pulled.items()):
            with self._output_lock:
                if uuid in self._pulls_reported:
                    continue
                self._pulls_reported.add(uuid)
            try:
                self.env.reporter.container_pulled(uuid, seconds)
            except Exception as exc:
                self.log.warning("container %s: cannot record its image pull: %s", uuid, exc)

    def _start_failed(self, uuid: str, side: str, message: str) -> None:
        """Record a container the runner could not start, and drain an instance at fault."""
        instance_side = side == runner_protocol.FAILURE_INSTANCE
        self.log.warning("container %s could not be started (%s failure): %s", uuid, side, message)
        if instance_side:
            with self.env.lock:
                if self.idle_behavior == IdleBehavior.RUN:
                    self.log.info("draining: the instance cannot start containers")
                    self.report_boot_outcome(BootOutcome.FAILURE)
                    self.set_idle_behavior(IdleBehavior.DRAIN)
        self.env.reporter.container_failed(uuid, instance_side, message, self.id)

    def relay_log(self, uuid: str, offset: int, data: bytes) -> None:
        """Store the part of ``data`` (bytes ``offset``... of the runner's log of ``uuid``)
        that the queue does not have yet.

        Called with the live pieces the resident runner sends, and with the whole log when the
        result is collected, so every byte is stored once whichever comes first.  Bytes past
        ``containers.log_limit`` (plus room for the runner's own "truncated" line) are
        dropped with a line saying so, for runners that do not stop at the limit themselves.
        A piece that cannot be stored (the queue is down) is not counted, so the collection at
        the exit stores it.
        """
        limit = self.env.settings.log_limit
        bound = limit + TRUNCATION_ROOM if limit else None
        with self._output_lock:
            stored = self._output_stored.get(uuid, 0)
            end = offset + len(data)
            if offset > stored or end <= stored:
                return  # a gap (the exit collection fills it) or nothing new
            fresh = data[stored - offset :]
            if bound is not None and end > bound:
                fresh = fresh[: max(0, bound - stored)]
                if stored < bound:
                    fresh += (
                        f"runner log truncated by herder at {bound} bytes "
                        "(containers.log_limit); later output is discarded\n"
                    ).encode()
            if fresh and stored == 0 and uuid in self._adopted:
                fresh = ADOPTED_LOG_NOTE + fresh
            if fresh:
                self.env.reporter.container_log(uuid, fresh)
            self._adopted.discard(uuid)
            self._output_stored[uuid] = end

    # ------------------------------------------------------------------ views

    def view(self) -> InstanceView:
        """What the scheduler and the API see (caller holds the lock; SPEC §5.6)."""
        return InstanceView(
            instance=self.id,
            address=self.instance.address,
            price=self.instance_type.price,
            instance_type=self.instance_type.name,
            provider_instance_type=self.instance_type.provider_type,
            last_container_uuid=self.last_uuid,
            last_busy=self.busy,
            running_container_uuids=sorted({*self.running, *self.starting}),
            worker_state=self.state,
            idle_behavior=self.idle_behavior,
            state_since=self.state_since,
            last_probe=self.probed,
            appeared=self.appeared,
            boot_outcome=self.boot_outcome.value if self.boot_outcome else "",
            probe_error=self.probe_error,
            reason=self.reason,
            drain_cause=self.drain_cause,
            paid_until=self._paid_until(),
            market_price=self.market_price,
        )

    def _paid_until(self) -> float:
        billing = self.instance_type.billing
        if billing.per_second and billing.minimum <= 1:
            return 0.0
        return self.started + billing.paid_until(self._now() - self.started)

    def metrics_sample(self) -> WorkerSample:
        """What the fleet gauges need (caller holds the lock)."""
        return WorkerSample(
            category=worker_category(self.state, self.idle_behavior, self.runner_count()),
            instance_type=self.instance_type.name,
            price=self.instance_type.price,
            vcpus=self.instance_type.vcpus,
            ram=self.instance_type.ram,
            runners=self.runner_count(),
            probed=self.probed,
            monitored=self.state != WorkerState.SHUTDOWN,
        )

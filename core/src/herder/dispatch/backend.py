"""Dispatchers that ``herder serve`` can run instead of the cloud engine.

A plugin registers a :class:`DispatchBackend` subclass under a name with the
``herder_register_dispatchers`` hook; ``dispatcher: <name>`` in the configuration file selects
it.  ``dispatcher_parameters`` is validated by the backend's ``parameters_model`` (a subclass of
:class:`DispatcherParameters`), by ``herder config check`` and ``herder serve`` alike, errors
naming the key, as a driver's and a queue backend's parameters are.  The backend usually builds
a :class:`herder.dispatch.Dispatcher` in :meth:`DispatchBackend.start`.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field

from herder.config import Config, Duration
from herder.dispatch.dispatcher import BATCH_SIZE, POLL_PERIOD, Dispatcher, Job, UpdateAction
from herder.model import InstanceType
from herder.queue.base import ContainerQueue
from herder.runtime import Runtime, TimerHandle


class DispatcherParameters(BaseModel):
    """The ``dispatcher_parameters`` of a backend that takes none: any key is reported, so a
    misspelling never goes unnoticed.  A backend with parameters extends it."""

    model_config = ConfigDict(extra="forbid")


class DispatchBackend(ABC):
    """One way to run containers that is not herder's cloud engine.

    Constructed once per ``herder serve`` with the whole configuration, its own
    ``dispatcher_parameters`` (validated by ``parameters_model`` into :attr:`params`; raise
    ``ValueError`` with a clear message for what a model cannot check), the runtime and the
    metrics registry.
    """

    #: Validates ``dispatcher_parameters``; ``herder config check`` reports its errors under
    #: ``dispatcher_parameters.<key>``.
    parameters_model: ClassVar[type[DispatcherParameters]] = DispatcherParameters
    params: DispatcherParameters

    @classmethod
    def validate_parameters(cls, raw: Mapping[str, Any] | None) -> DispatcherParameters:
        """``dispatcher_parameters`` checked by :attr:`parameters_model` (pydantic's
        ``ValidationError`` when they do not fit)."""
        return cls.parameters_model.model_validate(dict(raw or {}))

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
        self.params = self.validate_parameters(parameters)
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


class ProbingParameters(DispatcherParameters):
    """The ``dispatcher_parameters`` every :class:`ProbingBackend` takes; extend it."""

    probe_interval: Duration = Field(1.0, gt=0, description="how often ends are looked for")
    poll_period: Duration = Field(POLL_PERIOD, gt=0, description="queue poll when no change seen")
    min_retry_period: Duration = Field(10.0, ge=0, description="wait before retrying a failure")
    batch_size: int = Field(BATCH_SIZE, ge=1, description="containers read from the queue at once")


class ProbingBackend(DispatchBackend):
    """A backend that hands containers to a system which runs them, and probes it for ends.

    It owns the :class:`Dispatcher`, the jobs it follows, and the probe loop: a probe runs
    soon after each start or stop and then every ``probe_interval`` while jobs remain.  A
    subclass starts a container in :meth:`_run` (calling :meth:`_follow` once it runs),
    stops one in :meth:`_stop_job`, and looks for ends in :meth:`_probe_once` (calling
    :meth:`_probe_again` when there is still something to watch).
    """

    parameters_model: ClassVar[type[DispatcherParameters]] = ProbingParameters
    params: ProbingParameters

    def __init__(
        self,
        config: Config,
        parameters: Mapping[str, Any],
        *,
        runtime: Runtime,
        registry: CollectorRegistry | None = None,
    ) -> None:
        super().__init__(config, parameters, runtime=runtime, registry=registry)
        self.dispatcher: Dispatcher | None = None
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._probe = runtime.trigger(self._probe_once)
        self._probe_timer: TimerHandle | None = None

    # ---- what a subclass provides

    def _prepare(self) -> None:
        """Called by :meth:`start` before the first container is taken."""

    def _dispatcher_limits(self) -> dict[str, Any]:
        """``max_concurrent`` / ``can_run`` for the :class:`Dispatcher`."""
        return {}

    @abstractmethod
    def _run(self, job: Job) -> None:
        """Start (or take up again) one container, then :meth:`_follow` it."""

    @abstractmethod
    def _stop_job(self, uuid: str) -> None:
        """Stop the work of a container that was cancelled, vanished or given back."""

    @abstractmethod
    def _probe_once(self) -> None:
        """Look for started and ended work; call :meth:`_probe_again` while any is followed."""

    # ---- lifecycle

    def start(self, queue: ContainerQueue) -> None:
        self._prepare()
        self.dispatcher = Dispatcher(
            queue,
            self._run,
            runtime=self.runtime,
            poll_period=self.params.poll_period,
            min_retry_period=self.params.min_retry_period,
            batch_size=self.params.batch_size,
            **self._dispatcher_limits(),
        )
        self.dispatcher.start()

    def stop(self) -> None:
        """Stop taking containers; the ones running go on and are taken up at next start."""
        if self.dispatcher is not None:
            self.dispatcher.stop()
        with self._lock:
            if self._probe_timer is not None:
                self._probe_timer.cancel()
            self._jobs.clear()

    # ---- following jobs

    def _follow(self, job: Job) -> None:
        """Watch ``job``'s updates and probe for it soon."""
        with self._lock:
            self._jobs[job.uuid] = job
        job.updates.listen(lambda: self._on_update(job))
        self._schedule_probe(0.0)

    def _on_update(self, job: Job) -> None:
        """A record changed: act on it as :meth:`Job.next_action` says."""
        action = job.next_action()
        if action is UpdateAction.FORGET:
            with self._lock:
                self._jobs.pop(job.uuid, None)
        elif action is UpdateAction.STOP:
            self.runtime.spawn(lambda: self._stop_and_probe(job.uuid))
        elif action is UpdateAction.CANCEL:
            self.runtime.spawn(lambda: job.cancel_quietly("priority set to 0"))

    def _stop_and_probe(self, uuid: str) -> None:
        self._stop_job(uuid)
        self._schedule_probe(0.0)

    def _schedule_probe(self, delay: float) -> None:
        with self._lock:
            if self._probe_timer is not None:
                self._probe_timer.cancel()
            self._probe_timer = self.runtime.call_later(delay, self._probe.fire)

    def _probe_again(self) -> None:
        """Schedule the next probe, unless the backend has stopped."""
        if self.dispatcher is not None:
            self._schedule_probe(self.params.probe_interval)

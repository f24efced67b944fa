"""What the pool offers the scheduler, and what it tells the rest of herder about containers."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from herder.model import Container, DrainCause, InstanceType, InstanceView, WorkerState


class ContainerReporter(ABC):
    """Receives what workers learn about containers; the dispatcher records it in the queue.

    Called from background threads, outside the pool lock.  Each call is idempotent: a probe may
    report the same fact again.
    """

    @abstractmethod
    def container_started(self, uuid: str, instance_id: str, instance_type: str) -> None:
        """The runner on ``instance_id`` has the container (start succeeded or a probe saw it)."""

    @abstractmethod
    def container_exited(self, uuid: str, exit_code: int, log: bytes) -> None:
        """The runner reported the container's exit code; ``log`` is its output (what the
        worker has not already passed on with :meth:`container_log`)."""

    def container_failed(
        self, uuid: str, instance_side: bool, message: str, instance_id: str = ""
    ) -> None:
        """The runner could not start the container: ``instance_side`` when the instance is
        at fault (retry it elsewhere), else the container is (cancel it); ``message`` is the
        runtime's own.  Reporters that do not tell failures apart record the engine's 125."""
        self.container_exited(uuid, 125, b"")

    def container_pulled(self, uuid: str, seconds: float) -> None:
        """The runner pulled the container's image, taking ``seconds``."""

    def container_log(self, uuid: str, data: bytes) -> None:
        """More of the container's output, as it is written (whatever the container's state:
        a cancelled container's last lines arrive after it was cancelled)."""


class NullReporter(ContainerReporter):
    def container_started(self, uuid: str, instance_id: str, instance_type: str) -> None:
        pass

    def container_exited(self, uuid: str, exit_code: int, log: bytes) -> None:
        pass


class QuotaLimit(StrEnum):
    """Which limit stops new instances: herder's own cap, or a quota the cloud reported.

    Kept apart so that a status never blames the cloud for ``cloud.max_instances``.
    """

    MAX_INSTANCES = "max_instances"
    CLOUD_QUOTA = "cloud_quota"


@dataclass(frozen=True, slots=True)
class BootBackoff:
    """Instances of one type failed to boot ``failures`` times in a row: no create before
    ``until`` (a growing, capped pause; the first instance of the type that boots ends it)."""

    instance_type: str
    failures: int
    until: float


class WorkerPool(ABC):
    """The pool as the scheduler sees it (SPEC §9.1)."""

    @abstractmethod
    def running(self) -> dict[str, float]:
        """uuid → 0.0 for containers with a runner, or → exit time for recently exited ones."""

    def lost_reason(self, uuid: str) -> str:
        """Why the runner of ``uuid`` is gone, once ("" when the pool does not know): its
        instance left the cloud's listing, or stopped answering past the probe timeout and
        was shut down.  Recorded with the retry, so a second run says why."""
        return ""

    @abstractmethod
    def instances(self) -> list[InstanceView]:
        """One view per worker plus one per pending create, sorted by instance id."""

    @abstractmethod
    def count_workers(self) -> dict[WorkerState, int]: ...

    @property
    @abstractmethod
    def loaded(self) -> bool:
        """True after the first successful sync with the cloud."""

    @abstractmethod
    def at_capacity(self, instance_type: InstanceType) -> bool: ...

    @abstractmethod
    def at_quota(self) -> bool: ...

    def quota_limit(self) -> QuotaLimit | None:
        """Which limit :meth:`at_quota` is at (a pool that cannot tell says the cloud's)."""
        return QuotaLimit.CLOUD_QUOTA if self.at_quota() else None

    def boot_backoff(self, instance_type: InstanceType) -> BootBackoff | None:
        """The pause on creating ``instance_type`` after boot failures, while it lasts."""
        return None

    def auto_drain(self, instance_id: str, cause: DrainCause, reason: str) -> bool:
        """Drain an instance that takes work, for one of herder's own reasons (consolidation,
        the budget); False if refused (held, draining already, unknown).  A pool without
        idle behaviours refuses."""
        return False

    def undo_drain(self, instance_id: str, cause: DrainCause) -> bool:
        """Put an instance drained for ``cause`` back to work; never undoes other causes."""
        return False

    @abstractmethod
    def create(self, instance_type: InstanceType) -> InstanceView | None:
        """Start creating an instance; None if refused (throttled, quota, capacity)."""

    @abstractmethod
    def shutdown(self, instance_id: str) -> bool: ...

    @abstractmethod
    def start_container(self, instance_id: str, container: Container) -> bool: ...

    @abstractmethod
    def kill_container(self, uuid: str, reason: str) -> bool: ...

    @abstractmethod
    def forget_container(self, uuid: str) -> None: ...

    @abstractmethod
    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener()`` on every change (coalesced by the listener)."""

"""Queue backends as plugins, and the one place a queue is built from the configuration.

A plugin registers a :class:`QueueBackend` subclass under a name with the
``herder_register_queues`` hook; ``queue.backend: <name>`` selects it, and its
``parameters_model`` validates ``queue.backend_parameters`` (``herder config check`` and
``herder serve`` report its errors under that key).  Built in: ``sqlite``.

Every engine (the cloud engine and the plugin dispatchers) gets its queue from
:func:`open_queue`, so that what the configuration says about containers
(``max_dispatch_attempts``, ``always_use_preemptible_instances``) reaches every backend the
same way, whichever engine runs.
"""

from __future__ import annotations

import secrets
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from herder import defaults
from herder.queue.base import ContainerQueue, QueueError, Sizer
from herder.queue.rules import RuleSettings
from herder.runtime import Runtime

if TYPE_CHECKING:
    from herder.config import Config
    from herder.plugin.registry import Plugins
    from herder.spend import Ledger

__all__ = [
    "DispatchLock",
    "OpenedQueue",
    "QueueBackend",
    "QueueContext",
    "QueueParameters",
    "SqliteBackend",
    "open_queue",
]


class QueueParameters(BaseModel):
    """``queue.backend_parameters`` of a backend; subclass it with the backend's own keys.

    Unknown keys are errors, so a misspelt key is reported instead of ignored.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class QueueContext:
    """Everything herder hands a backend to build its queue with: the settings of the queue
    rules (:meth:`rules`), plus ``path`` (``queue.path``, the SQLite file)."""

    runtime: Runtime
    sizer: Sizer
    cluster_id: str = defaults.CLUSTER_ID
    max_dispatch_attempts: int = defaults.MAX_DISPATCH_ATTEMPTS
    always_use_preemptible: bool = False
    path: str = defaults.QUEUE_FILE
    random_bytes: Callable[[int], bytes] = field(default=secrets.token_bytes)

    def rules(self) -> RuleSettings:
        """The settings of the queue rules, as every backend's queue takes them."""
        return RuleSettings(
            runtime=self.runtime,
            sizer=self.sizer,
            cluster_id=self.cluster_id,
            max_dispatch_attempts=self.max_dispatch_attempts,
            always_use_preemptible=self.always_use_preemptible,
            random_bytes=self.random_bytes,
        )


class DispatchLock(ABC):
    """Lets one of several herders sharing a queue dispatch from it; the others wait as
    standbys, serving the API.

    The holder must stop dispatching the moment it loses the lock (its database gone, its
    connection cut): the lock calls ``on_lost`` at once, from its own thread, and then another
    herder may take the lock and adopt the instances from their tags.
    """

    @abstractmethod
    def acquire(self, stop: threading.Event, on_lost: Callable[[str], None]) -> bool:
        """Wait until the lock is held (True) or ``stop`` is set (False).  Once held,
        ``on_lost(reason)`` is called once if the lock is lost before :meth:`release`."""

    @abstractmethod
    def release(self) -> None:
        """Give the lock up (or stop waiting for it); ``on_lost`` is not called after this."""


class QueueBackend(ABC):
    """One kind of queue storage.  Constructed with no arguments; cheap to import."""

    parameters_model: ClassVar[type[QueueParameters]] = QueueParameters

    @classmethod
    def validate_parameters(cls, raw: Mapping[str, Any] | None) -> QueueParameters:
        """``queue.backend_parameters`` checked by the backend's model (pydantic errors)."""
        return cls.parameters_model.model_validate(dict(raw or {}))

    @abstractmethod
    def open(self, params: QueueParameters, context: QueueContext) -> ContainerQueue:
        """The queue, opened and ready (raises :class:`~herder.queue.base.QueueError` with
        what to do when the storage cannot be used)."""

    def describe(self, params: QueueParameters, context: QueueContext) -> str:
        """Where the queue lives, for the start-up log line; never a secret."""
        return context.path

    def dispatch_lock(self, params: QueueParameters, context: QueueContext) -> DispatchLock | None:
        """The lock a standby waits for, when these parameters ask for a standby; None when
        the queue itself refuses a second dispatcher (or cannot be shared at all)."""
        return None

    def read_ledger(self, params: QueueParameters, path: str) -> Ledger:
        """The queue's spend ledger, read without opening the queue for dispatching (``herder
        costs`` when no server answers); ``path`` is ``queue.path``.  Raises
        :class:`~herder.queue.base.QueueError` saying what to do when this backend cannot."""
        raise QueueError(
            "this queue backend's spend is read through the server: start herder serve, or "
            "ask one that runs (--server)"
        )


class SqliteBackend(QueueBackend):
    """The embedded queue: one SQLite file at ``queue.path``; no parameters of its own."""

    def open(self, params: QueueParameters, context: QueueContext) -> ContainerQueue:
        from herder.queue.sqlite import SqliteQueue

        return SqliteQueue(context.path, context.rules())

    def describe(self, params: QueueParameters, context: QueueContext) -> str:
        return f"sqlite {context.path}"

    def read_ledger(self, params: QueueParameters, path: str) -> Ledger:
        from herder.queue.sqlite import read_ledger

        return read_ledger(path)


@dataclass
class OpenedQueue:
    """What :func:`open_queue` gives an engine."""

    queue: ContainerQueue
    #: Where the queue lives, for the log (never a secret).
    description: str
    #: The lock to hold before dispatching, when this herder may be a standby.
    dispatch_lock: DispatchLock | None = None


def open_queue(
    config: Config,
    *,
    plugins: Plugins,
    runtime: Runtime,
    sizer: Sizer,
    random_bytes: Callable[[int], bytes] | None = None,
) -> OpenedQueue:
    """The queue ``config`` asks for, where it lives, and the dispatch lock if any.

    Raises :class:`~herder.plugin.registry.PluginError` for a backend that is not installed and
    ``ValueError`` (pydantic's ``ValidationError``) for bad ``queue.backend_parameters``;
    ``herder serve`` has checked both already, with the key named.
    """
    backend = plugins.queue_class(config.queue.backend)()
    params = backend.validate_parameters(config.queue.backend_parameters)
    context = QueueContext(
        runtime=runtime,
        sizer=sizer,
        cluster_id=config.cluster_id,
        max_dispatch_attempts=config.containers.max_dispatch_attempts,
        always_use_preemptible=config.containers.always_use_preemptible_instances,
        path=config.queue.path,
        **({"random_bytes": random_bytes} if random_bytes is not None else {}),
    )
    queue = backend.open(params, context)
    return OpenedQueue(
        queue, backend.describe(params, context), backend.dispatch_lock(params, context)
    )

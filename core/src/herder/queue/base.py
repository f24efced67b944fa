"""The container queue interface (SPEC §7, made the system of record).

In Arvados the queue lives in the API server and the dispatcher polls it.  herder owns its
queue, so one object plays both roles: it stores every container durably, enforces the state
rules the Arvados API server enforces (lock needs Queued and priority > 0 and counts an attempt;
unlocking past ``max_dispatch_attempts`` cancels), and gives the scheduler a cheap in-memory
snapshot of the containers that still need attention.

States: Queued → Locked → Running → Complete, and Cancelled from any non-final state.  Locked
→ Queued is an unlock; Running → Queued is a retry after the runner was lost.

Every method is thread-safe.  Every change notifies subscribers (coalesced by the subscriber),
so the scheduler reacts at once instead of waiting for a poll.
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from herder.model import Container, ContainerSpec, ContainerState, InstanceResources, InstanceType
from herder.spend import Ledger, MemoryLedger


class QueueError(Exception):
    """A queue operation was refused."""


class QueueUnavailable(QueueError):
    """The queue's storage cannot be reached or written right now (a database connection lost,
    a disk full); nothing is wrong with the request, which may be retried later."""


class ContainerNotFound(QueueError):
    def __init__(self, uuid: str) -> None:
        super().__init__(f"container {uuid} not found")
        self.uuid = uuid


class InvalidTransition(QueueError):
    """The container is not in a state that allows this operation."""


@dataclass(slots=True)
class QueueEntry:
    """A container plus what the scheduler needs to place it (SPEC §7.1).

    ``instance_types`` is the eligible list, cheapest first (SPEC §8.4); it is computed once, when
    the queue first sees the container.
    """

    container: Container
    resources: InstanceResources
    instance_types: list[InstanceType]
    first_seen_at: float


#: The states of a container waiting in line for an instance.
WAITING = (ContainerState.LOCKED, ContainerState.QUEUED)


def queue_position(c: Container) -> tuple[int, int, float, str]:
    """Where ``c`` stands in line, smallest first: Locked before Queued (a Locked container
    is being started), then higher priority, then older, the uuid breaking ties.  The
    scheduler's order (SPEC §9.5), by creation time rather than the time this process first
    saw the container, so that a position is the same in every process and a page cursor
    stays valid across a restart."""
    return (0 if c.state is ContainerState.LOCKED else 1, -c.priority, c.created_at, c.uuid)


class ConstraintsNotSatisfiable(Exception):
    """No configured instance type can run the container (raised by a :class:`Sizer`; the
    queue's rules refuse such a container at submission)."""

    def __init__(self, message: str, available: list[InstanceType] | None = None) -> None:
        super().__init__(message)
        self.available = available or []


class Sizer(ABC):
    """Decides what a container needs and which instance types fit it (SPEC §8)."""

    @abstractmethod
    def resources_needed(self, container: Container) -> InstanceResources: ...

    @abstractmethod
    def choose_instance_types(self, container: Container) -> list[InstanceType]:
        """Eligible types, cheapest first.  Raises :class:`ConstraintsNotSatisfiable` if none."""


@dataclass(frozen=True, slots=True)
class ListFilter:
    """Which containers a listing for people shows (:meth:`ContainerQueue.newest`).

    ``states``: only these (all when None); ``since``: only those created at or after this
    time; ``array_id``: only the members of this array (all when "").
    """

    states: tuple[ContainerState, ...] | None = None
    since: float | None = None
    array_id: str = ""


Listener = Callable[[], None]
#: Called as ``observer(old, new)`` after a change is committed; ``old`` is None for a submission.
Observer = Callable[["Container | None", Container], None]


class ContainerQueue(ABC):
    """Durable queue of containers."""

    # ---- reads used by the scheduler (non-blocking, in-memory)

    @abstractmethod
    def entries(self) -> tuple[dict[str, QueueEntry], float]:
        """Snapshot of the containers needing attention, and the time it is current as of.

        Holds every non-final container, plus final ones not yet :meth:`forget`-ten.  The
        returned dict is the caller's to keep; entries are not modified afterwards.
        """

    @abstractmethod
    def get(self, uuid: str) -> Container | None:
        """Current record of any container, final ones included; None if unknown."""

    @abstractmethod
    def forget(self, uuid: str) -> None:
        """Drop a final (or Queued with priority 0) container from :meth:`entries`.

        The record stays in storage; other containers are left alone.
        """

    # ---- state changes (blocking: each is durable when it returns)

    @abstractmethod
    def submit(self, spec: ContainerSpec) -> Container:
        """Store a new container in state Queued (or Cancelled with a reason if it cannot fit
        any configured instance type)."""

    @abstractmethod
    def submit_many(self, specs: Iterable[ContainerSpec]) -> list[Container]:
        """Submit several containers in one transaction: all are stored, or none is.  A spec
        that is refused makes the whole batch fail, naming its index.  An ``after`` entry that
        is not a container uuid is the ``name`` of another spec of the batch (one only it
        has), and is stored as that container's uuid."""

    @abstractmethod
    def submit_array(self, spec: ContainerSpec, count: int) -> list[Container]:
        """``count`` containers of one spec sharing a new array id (``Container.array_id``),
        each with its index in ``$HERDER_ARRAY_INDEX``; all stored, or none."""

    @abstractmethod
    def lock(self, uuid: str) -> Container:
        """Queued with priority > 0 → Locked; counts one dispatch attempt."""

    @abstractmethod
    def unlock(self, uuid: str) -> Container:
        """Locked → Queued; → Cancelled instead once the attempts reach the configured cap."""

    @abstractmethod
    def set_running(self, uuid: str, instance_id: str = "", instance_type: str = "") -> Container:
        """Locked → Running (no-op if already Running)."""

    @abstractmethod
    def finish(self, uuid: str, exit_code: int) -> Container:
        """Locked/Running → Complete with ``exit_code``.  No-op on a final container."""

    @abstractmethod
    def retry(self, uuid: str, reason: str) -> Container:
        """Running/Locked → Queued after its runner was lost, or → Cancelled past the cap."""

    @abstractmethod
    def cancel(self, uuid: str, reason: str = "") -> Container:
        """Any non-final state → Cancelled, recording ``reason`` as the error."""

    @abstractmethod
    def set_priority(self, uuid: str, priority: int) -> Container: ...

    def set_status(self, uuid: str, key: str, value: str) -> Container:
        """Record ``key: value`` in a non-final container's runtime_status (what the runner
        reports while it runs, e.g. how long its image pull took)."""
        raise NotImplementedError

    @abstractmethod
    def add_cost(self, uuid: str, cost: float) -> None:
        """Add to the container's accumulated cost."""

    # ---- logs

    @abstractmethod
    def append_log(self, uuid: str, data: bytes) -> None: ...

    @abstractmethod
    def read_log(self, uuid: str, offset: int = 0, limit: int | None = None) -> bytes: ...

    # ---- listing for people (API / CLI)

    @abstractmethod
    def newest(
        self, filter: ListFilter | None = None, limit: int = 100, after: str = ""
    ) -> list[Container]:
        """Containers newest first (by creation time, then uuid, both descending), a page at
        a time: ``after`` is the uuid of the previous page's last container, and the page
        continues from its position (keyset paging on ``(created_at, uuid)``), so that
        containers submitted meanwhile never shift a page.  Raises
        :class:`ContainerNotFound` for an unknown ``after``."""

    def in_line(
        self, states: Iterable[ContainerState] = WAITING, limit: int = 100, after: str = ""
    ) -> tuple[list[Container], int]:
        """Waiting containers in queue order (:func:`queue_position`), and how many there are.

        Read from the snapshot, so a queue of any length is listed from its head: what runs
        next.  Containers on hold (priority 0) are not in line and not listed (the snapshot
        may have forgotten them).  ``after`` continues after that container's position (keyset
        paging), wherever it has gone since; ``states`` are among Queued and Locked.
        """
        wanted = frozenset(ContainerState(s) for s in states)
        if limit < 0 or not wanted <= frozenset(WAITING):
            raise ValueError("in_line lists Queued and Locked containers, limit >= 0")
        entries, _ = self.entries()
        line = [
            e.container
            for e in entries.values()
            if e.container.state in wanted and e.container.priority > 0
        ]
        if after:
            last = self.get(after)
            if last is None:
                raise ContainerNotFound(after)
            cursor = queue_position(last)
            line = [c for c in line if queue_position(c) > cursor]
        return heapq.nsmallest(limit, line, key=queue_position), len(line)

    @abstractmethod
    def list(
        self,
        states: Iterable[ContainerState] | None = None,
        limit: int = 100,
        after: str = "",
    ) -> list[Container]:
        """Containers by UUID order, after ``after`` (keyset paging)."""

    @abstractmethod
    def counts(self) -> dict[ContainerState, int]:
        """Number of containers in each state (all of storage)."""

    # ---- notifications and lifecycle

    @abstractmethod
    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener()`` after every change; returns the unsubscribe function.

        Listeners are called on the thread that made the change, outside the queue's locks, and
        must return quickly (fire a trigger, set an event).
        """

    def observe(self, observer: Observer) -> Callable[[], None]:
        """Call ``observer(old, new)`` after every committed change of a container.

        For metrics that count transitions (containers finished by outcome, queue wait times),
        which a plain :meth:`subscribe` notification cannot tell apart.  Called outside the
        queue's locks; must return quickly.  Queues that cannot report changes never call it.
        """
        return lambda: None

    # ---- spend

    @property
    def ledger(self) -> Ledger:
        """The spend ledger kept with the queue (:class:`herder.spend.Ledger`): what the
        instances cost and what finished containers cost, for budgets and cost reports.

        A backend keeps it in the queue's own storage, so that it survives a restart and
        herders sharing the queue share it (the conformance suite checks both).  This default
        keeps it in memory for as long as the queue object lives, for a backend that has no
        table for it yet: budgets then count only this process's spend.
        """
        found = self.__dict__.get("_default_ledger")
        if found is None:
            found = self.__dict__["_default_ledger"] = MemoryLedger()
        ledger: Ledger = found
        return ledger

    def update(self) -> None:
        """Refresh from an external store.  The embedded queue is always current."""

    def close(self) -> None:
        """Release storage."""

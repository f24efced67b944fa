"""The queue's rules, written once for every backend (SPEC §7).

The rules are the ones the Arvados API server enforces and the dispatcher relies on (SPEC
§7.6): a lock needs Queued and priority > 0 and counts a dispatch attempt; an unlock or a retry
past ``max_dispatch_attempts`` cancels; a final container never changes again.  A container no
configured instance type can run is cancelled rather than queued (SPEC §7.5): at submission,
and again when the queue is opened, in case the configured types changed.

Two layers live here:

- the *state rules*, pure functions from the current record to the new one (or
  :class:`~herder.queue.base.InvalidTransition`), which know nothing of storage or locking;
- :class:`RuledQueue`, the :class:`~herder.queue.base.ContainerQueue` every backend subclasses:
  it validates and sizes submissions, applies the state rules, keeps the in-memory snapshot the
  scheduler reads on every pass (SPEC §7.1), and notifies listeners and observers.  A backend
  only stores and loads records (the ``_store_*`` / ``_load_*`` methods), so that SQLite,
  PostgreSQL and a test double cannot drift apart on what a lock or a retry means.
"""

from __future__ import annotations

import functools
import logging
import math
import secrets
import threading
from abc import abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from herder import defaults
from herder.callbacks import Callbacks
from herder.model import (
    ARRAY_ID_ENV,
    ARRAY_INDEX_ENV,
    CLUSTER_ID_RE,
    Attempt,
    Container,
    ContainerSpec,
    ContainerState,
    InstanceResources,
    InstanceType,
    is_container_uuid,
)
from herder.queue.base import (
    ConstraintsNotSatisfiable,
    ContainerNotFound,
    ContainerQueue,
    InvalidTransition,
    Listener,
    ListFilter,
    Observer,
    QueueEntry,
    QueueError,
    Sizer,
)
from herder.runtime import Runtime

log = logging.getLogger(__name__)

QUEUED = ContainerState.QUEUED
LOCKED = ContainerState.LOCKED
RUNNING = ContainerState.RUNNING
COMPLETE = ContainerState.COMPLETE
CANCELLED = ContainerState.CANCELLED

#: The states a container needs attention in; a backend loads these when it opens.
UNFINISHED = (QUEUED, LOCKED, RUNNING)


class InvalidRequest(QueueError, ValueError):
    """A malformed submission or argument (as opposed to one refused for the container's state).

    It is a :class:`ValueError` too, so callers that validate input generically catch it.
    ``index`` is the position of the refused spec in a batch (:meth:`RuledQueue.submit_many`),
    ``field`` the field of the spec at fault when one is.
    """

    def __init__(self, message: str, index: int | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.index = index
        self.field = field


# --------------------------------------------------------------------------- state rules
#
# Each rule takes the current record and returns the new one, the same object when nothing
# changes, or raises InvalidTransition.  They are pure so that each rule lives in one place and
# the queue's locking and storage stay out of them.

Rule = Callable[[Container, float], Container]


def _with_status(c: Container, key: str, value: str) -> tuple[tuple[str, str], ...]:
    """runtime_status with ``key`` set to ``value`` (replacing any earlier value)."""
    return (*((k, v) for k, v in c.runtime_status if k != key), (key, value))


def _refuse(c: Container, action: str) -> InvalidTransition:
    return InvalidTransition(f"cannot {action} container {c.uuid} in state {c.state}")


def _ended(
    c: Container, now: float, outcome: str, reason: str = "", exit_code: int | None = None
) -> tuple[Attempt, ...]:
    """The attempt history with the current attempt ended.

    The current attempt is the last one while it is open; a Locked container that never
    started has none open, and gets one that never started (its dispatch was an attempt too).
    A Queued container has no attempt to end.
    """
    history = c.attempt_history
    if history and history[-1].ended_at is None:
        last = replace(
            history[-1], ended_at=now, outcome=outcome, reason=reason, exit_code=exit_code
        )
        return (*history[:-1], last)
    if c.state is QUEUED:
        return history
    return (
        *history,
        Attempt(
            number=c.lock_count,
            instance_id=c.instance_id,
            instance_type=c.instance_type,
            ended_at=now,
            outcome=outcome,
            reason=reason,
            exit_code=exit_code,
        ),
    )


def cancelled(c: Container, now: float, error: str = "") -> Container:
    """``c`` Cancelled, recording ``error`` (if any) as runtime_status error; it waits for
    nothing any more."""
    status = _with_status(c, "error", error) if error else c.runtime_status
    status = tuple((k, v) for k, v in status if k != WAITING_FOR)
    return replace(
        c,
        state=CANCELLED,
        finished_at=now,
        runtime_status=status,
        attempt_history=_ended(c, now, "cancelled", error),
    )


def unsatisfiable_error(message: str) -> str:
    return f"cannot run container: {message}"


def _requeued(c: Container) -> Container:
    """Back to Queued for another attempt: what the last attempt recorded no longer applies."""
    return replace(
        c, state=QUEUED, locked_at=None, started_at=None, instance_id="", instance_type=""
    )


#: runtime_status key of a container held by ``after``: the uuids it still waits for, spaced.
WAITING_FOR = "waiting_for"
#: Most containers one container may wait for.
MAX_AFTER = 1000


def waiting_for(c: Container) -> list[str]:
    """The containers ``c`` still waits for before it may run (``--after``)."""
    return c.status(WAITING_FOR).split()


def _without_status(c: Container, key: str) -> tuple[tuple[str, str], ...]:
    return tuple((k, v) for k, v in c.runtime_status if k != key)


def dependency_failure(dep: Container) -> str:
    """Why a container that waited for ``dep`` is cancelled, or "" if ``dep`` succeeded."""
    if dep.state is COMPLETE and dep.exit_code == 0:
        return ""
    if dep.state is COMPLETE:
        return f"dependency {dep.uuid} failed with exit code {dep.exit_code}"
    why = dep.status("error")
    return f"dependency {dep.uuid} was cancelled" + (f" ({why})" if why else "")


def held_at_submission(c: Container, deps: Sequence[Container], now: float) -> Container:
    """A new container with ``after``: held while some dependency has not finished, cancelled
    (with which one and why) if one has failed or been cancelled already."""
    pending = []
    for dep in deps:
        if not dep.state.final:
            pending.append(dep.uuid)
            continue
        failure = dependency_failure(dep)
        if failure:
            return cancelled(c, now, failure)
    if not pending:
        return c
    return replace(c, runtime_status=_with_status(c, WAITING_FOR, " ".join(pending)))


def dependency_rule(c: Container, now: float, dep: Container) -> Container:
    """``dep`` has finished: a container waiting for it waits for one less, or is cancelled
    when ``dep`` did not complete with exit code 0."""
    pending = waiting_for(c)
    if c.state.final or dep.uuid not in pending:
        return c
    failure = dependency_failure(dep)
    if failure:
        return cancelled(c, now, failure)
    rest = [u for u in pending if u != dep.uuid]
    if rest:
        return replace(c, runtime_status=_with_status(c, WAITING_FOR, " ".join(rest)))
    return replace(c, runtime_status=_without_status(c, WAITING_FOR))


def _dependency_rule_of(dep: Container, c: Container, now: float) -> Container:
    return dependency_rule(c, now, dep)


def lock_rule(c: Container, now: float) -> Container:
    if c.state is not QUEUED or c.priority <= 0:
        raise _refuse(c, f"lock (priority {c.priority})")
    if waiting_for(c):
        raise InvalidTransition(
            f"cannot lock container {c.uuid}: it waits for {', '.join(waiting_for(c))}"
        )
    return replace(c, state=LOCKED, lock_count=c.lock_count + 1, locked_at=now)


def unlock_rule(c: Container, now: float, max_attempts: int) -> Container:
    if c.state is not LOCKED:
        raise _refuse(c, "unlock")
    if c.lock_count >= max_attempts:
        return cancelled(
            c,
            now,
            "Failed to start container.  Cancelled after exceeding "
            f"'containers.max_dispatch_attempts' (lock_count={c.lock_count})",
        )
    return replace(_requeued(c), attempt_history=_ended(c, now, "unlocked"))


def running_rule(c: Container, now: float, instance_id: str, instance_type: str) -> Container:
    if c.state is RUNNING:
        return c
    if c.state is not LOCKED:
        raise _refuse(c, "start")
    attempt = Attempt(
        number=c.lock_count, instance_id=instance_id, instance_type=instance_type, started_at=now
    )
    return replace(
        c,
        state=RUNNING,
        started_at=now,
        instance_id=instance_id,
        instance_type=instance_type,
        attempt_history=(*c.attempt_history, attempt),
    )


def finish_rule(c: Container, now: float, exit_code: int) -> Container:
    if c.state.final:
        return c
    if c.state is QUEUED:
        raise _refuse(c, "finish")
    return replace(
        c,
        state=COMPLETE,
        exit_code=exit_code,
        finished_at=now,
        attempt_history=_ended(c, now, "complete", exit_code=exit_code),
    )


def retry_rule(c: Container, now: float, reason: str, max_attempts: int) -> Container:
    """A lost runner: queue again, unless the attempts are used up.

    A final container is left alone: its runner was lost after it finished or was cancelled,
    which needs no retry.
    """
    if c.state.final:
        return c
    if c.state is QUEUED:
        raise _refuse(c, "retry")
    if c.lock_count >= max_attempts:
        gone = cancelled(c, now, f"{reason}; cancelled after {c.lock_count} dispatch attempts")
        return replace(gone, attempt_history=_ended(c, now, "retried", reason))
    return replace(
        _requeued(c),
        runtime_status=_with_status(c, "warning", reason),
        attempt_history=_ended(c, now, "retried", reason),
    )


def cancel_rule(c: Container, now: float, reason: str) -> Container:
    if c.state.final:
        return c
    return cancelled(c, now, reason)


def priority_rule(c: Container, now: float, priority: int) -> Container:
    if c.priority == priority:
        return c
    if c.state.final:
        raise _refuse(c, "change the priority of")
    return replace(c, priority=priority)


def status_rule(c: Container, now: float, key: str, value: str) -> Container:
    if c.status(key) == value:
        return c
    if c.state.final:
        raise _refuse(c, f"set {key} of")
    return replace(c, runtime_status=_with_status(c, key, value))


def cost_rule(c: Container, now: float, cost: float) -> Container:
    """Add to the container's cost, and to its latest attempt's (the one that cost it)."""
    if not cost:
        return c
    history = c.attempt_history
    if history:
        history = (*history[:-1], replace(history[-1], cost=history[-1].cost + cost))
    return replace(c, cost=c.cost + cost, attempt_history=history)


def may_forget(c: Container) -> bool:
    """SPEC §7.2: only finished containers, and queued ones on hold, may leave the snapshot."""
    return c.state.final or (c.state is QUEUED and c.priority == 0)


def validate_spec(spec: ContainerSpec) -> None:
    """Refuse a spec no runner could make sense of, before anything is stored."""
    rc = spec.runtime_constraints
    problems = []
    if not spec.command or not all(isinstance(arg, str) for arg in spec.command):
        problems.append("command must be a non-empty list of strings")
    if not isinstance(spec.priority, int) or spec.priority < 0:
        problems.append(f"priority must be an integer >= 0, not {spec.priority!r}")
    for name in ("vcpus", "ram", "scratch"):
        value = getattr(rc, name)
        if not isinstance(value, int) or value < 0:
            problems.append(f"runtime_constraints.{name} must be an integer >= 0, not {value!r}")
    if rc.gpu.device_count < 0 or rc.gpu.vram < 0:
        problems.append("runtime_constraints.gpu device_count and vram must be >= 0")
    if len(spec.after) > MAX_AFTER:
        problems.append(f"after: at most {MAX_AFTER} containers")
    bad = [u for u in spec.after if not is_container_uuid(u)]
    if bad:
        problems.append(f"after: {bad[0][:60]!r} is not a container uuid")
    if problems:
        raise InvalidRequest("invalid container: " + "; ".join(problems))


def resolve_batch(
    specs: Sequence[ContainerSpec], uuids: Sequence[str]
) -> tuple[list[ContainerSpec], list[int]]:
    """The specs of a batch with ``after`` names of other items replaced by their uuids, and
    an order in which every item comes after the items it waits for.

    An ``after`` entry that is not a container uuid names another item of the same batch (its
    ``name``), which is how a file or request says "item 3 runs after item 1" before either
    has a uuid, as workflow files refer to their steps by name.  Names need not be unique, but
    a name ``after`` refers to must belong to exactly one item.  An unknown or ambiguous name,
    and a cycle, are refused naming the item (:attr:`InvalidRequest.index`, field ``after``).
    """

    def refuse(index: int, message: str) -> InvalidRequest:
        where = f"item {index}: " if len(specs) > 1 else ""
        return InvalidRequest(f"{where}after: {message}", index, "after")

    named: dict[str, list[int]] = {}
    for index, spec in enumerate(specs):
        if spec.name:
            named.setdefault(spec.name, []).append(index)
    resolved = list(specs)
    waits: list[list[int]] = [[] for _ in specs]
    for index, spec in enumerate(specs):
        if all(is_container_uuid(ref) for ref in spec.after):
            continue
        after = []
        for ref in spec.after:
            if is_container_uuid(ref):
                after.append(ref)
                continue
            found = named.get(ref, [])
            if not found:
                alone = len(specs) == 1
                nor = "" if alone else " nor the name of an item of this batch"
                raise refuse(index, f"{ref[:60]!r} is not a container uuid{nor}")
            if len(found) > 1:
                items = ", ".join(map(str, found[:5]))
                raise refuse(index, f"{ref[:60]!r} names several items ({items}): rename them")
            waits[index].append(found[0])
            after.append(uuids[found[0]])
        resolved[index] = replace(spec, after=tuple(after))
    return resolved, _dependency_order(waits, [s.name for s in specs], refuse)


def _dependency_order(
    waits: list[list[int]], names: list[str], refuse: Callable[[int, str], InvalidRequest]
) -> list[int]:
    """Item indexes, each after the ones it waits for (Kahn's algorithm); a cycle is refused
    at its first item, spelled out with the items' names (every item of a cycle has one)."""
    waiters: list[list[int]] = [[] for _ in waits]
    missing = [len(set(w)) for w in waits]
    for index, deps in enumerate(waits):
        for dep in set(deps):
            waiters[dep].append(index)
    ready = [i for i, n in enumerate(missing) if n == 0]
    order: list[int] = []
    while ready:
        index = ready.pop()
        order.append(index)
        for waiter in waiters[index]:
            missing[waiter] -= 1
            if missing[waiter] == 0:
                ready.append(waiter)
    if len(order) == len(waits):
        return order
    # Every item left waits for another item left: walking its first such wait comes back
    # to an item already seen, which closes the cycle.
    start = min(i for i, n in enumerate(missing) if n)
    path, seen = [start], {start}
    while True:
        step = next(d for d in waits[path[-1]] if missing[d])
        if step in seen:
            cycle = path[path.index(step) :]
            break
        path.append(step)
        seen.add(step)
    first = min(cycle)
    turn = cycle.index(first)
    cycle = [*cycle[turn:], *cycle[:turn], first]
    spelled = " -> ".join(repr(names[i][:60]) for i in cycle)
    raise refuse(first, f"a cycle: {spelled} (each waits for the next)")


# --------------------------------------------------------------------------- uuids

_UUID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
_UUID_RANDOM_LEN = 15
#: Random bytes below this map uniformly onto the alphabet with ``% 36``; the rest are skipped.
_UUID_BYTE_LIMIT = 256 - 256 % len(_UUID_ALPHABET)


#: The infix of array ids (``<cluster_id>-a88ay-<15 alphanumerics>``), as dz642 is containers'.
ARRAY_INFIX = "a88ay"
#: Most members one array may have.
MAX_ARRAY = 100_000
_ARRAY_ENV = frozenset({ARRAY_ID_ENV, ARRAY_INDEX_ENV})


def new_uuid(cluster_id: str, random_bytes: Callable[[int], bytes], infix: str = "dz642") -> str:
    """``<cluster_id>-dz642-<15 random lowercase alphanumerics>`` (``infix`` for other kinds).

    One draw of random bytes per UUID (not one per character) keeps a 100,000-container
    submission fast; 24 bytes almost always hold 15 usable ones, else it draws again.
    """
    n = len(_UUID_ALPHABET)
    chars = ""
    while len(chars) < _UUID_RANDOM_LEN:
        raw = random_bytes(24)
        chars += "".join(_UUID_ALPHABET[b % n] for b in raw if b < _UUID_BYTE_LIMIT)
    return f"{cluster_id}-{infix}-{chars[:_UUID_RANDOM_LEN]}"


# --------------------------------------------------------------------------- the queue


class Sizing(NamedTuple):
    resources: InstanceResources
    instance_types: list[InstanceType]
    error: str  # "" when at least one type fits


#: A record that could not be decoded: its uuid, and why (see :meth:`RuledQueue._load_unfinished`).
Unreadable = tuple[str, str]


@dataclass(frozen=True, slots=True)
class RuleSettings:
    """What the queue rules are configured with, built once (from the configuration, by
    :meth:`herder.queue.backend.QueueContext.rules`) and handed to every backend's
    constructor as one value, so that a new setting is added here alone.

    ``random_bytes`` draws the random part of new UUIDs; simulations pass a seeded generator
    so that a run is reproducible.
    """

    runtime: Runtime
    sizer: Sizer
    cluster_id: str = defaults.CLUSTER_ID
    max_dispatch_attempts: int = defaults.MAX_DISPATCH_ATTEMPTS
    always_use_preemptible: bool = False
    random_bytes: Callable[[int], bytes] = field(default=secrets.token_bytes)


class RuledQueue(ContainerQueue):
    """A :class:`ContainerQueue` that applies the rules above over a backend's storage.

    Every public method takes ``self._lock``; the storage methods a backend implements are
    called with it held, one at a time, so a backend may use one connection for everything.
    Writes follow one order: store durably, replace the immutable record in the snapshot,
    release the lock, then call the listeners, so that a listener reading the queue always sees
    the change it is told about.

    A subclass calls :meth:`_open` at the end of its ``__init__``, once its storage is ready.
    """

    def __init__(self, rules: RuleSettings) -> None:
        if not CLUSTER_ID_RE.fullmatch(rules.cluster_id):
            raise ValueError(
                f"invalid cluster_id {rules.cluster_id!r}: need 5 lowercase alphanumerics"
            )
        if rules.max_dispatch_attempts < 1:
            raise ValueError("max_dispatch_attempts must be at least 1")
        self._random_bytes = rules.random_bytes
        self._runtime = rules.runtime
        self._sizer = rules.sizer
        self._cluster_id = rules.cluster_id
        self._max_attempts = rules.max_dispatch_attempts
        self._always_preemptible = rules.always_use_preemptible
        self._lock = threading.Lock()
        self._entries: dict[str, QueueEntry] = {}
        #: uuid → the containers in the snapshot that wait for it (``after``), so that a
        #: finished container finds its waiters without a scan; may hold stale entries.
        self._waiters: dict[str, set[str]] = {}
        self._listeners: Callbacks[[]] = Callbacks("queue listener", log)
        self._observers: Callbacks[[Container | None, Container]] = Callbacks("queue observer", log)
        self._closed = False

    # ---- what a backend provides (each called with self._lock held)

    @abstractmethod
    def _store_new(self, containers: Sequence[Container]) -> None:
        """Store new containers, all or none (one transaction)."""

    @abstractmethod
    def _store_change(
        self, uuid: str, change: Callable[[Container], Container]
    ) -> tuple[Container, Container]:
        """Read the current record of ``uuid``, compute ``new = change(old)``, and store
        ``new`` durably unless it ``is old``; return ``(old, new)``.

        A backend shared by several processes reads ``old`` from storage with the row locked
        until ``new`` is stored; one used by this process alone may start from
        :meth:`_cached`.  Raises :class:`ContainerNotFound` for an unknown uuid, and lets
        ``change``'s exceptions through with nothing stored.
        """

    @abstractmethod
    def _store_cancelled(
        self, containers: Sequence[Container], unreadable: Sequence[Unreadable], now: float
    ) -> None:
        """At opening: store cancellations decided by the rules, and cancel records that could
        not be decoded (written directly: they cannot be re-encoded), in one transaction."""

    @abstractmethod
    def _load(self, uuid: str) -> Container | None:
        """The stored record, or None."""

    @abstractmethod
    def _load_unfinished(self) -> list[tuple[Container, str | None]]:
        """Every Queued, Locked or Running record, each with None, or with why it could not be
        decoded (the record is then a placeholder keeping uuid and state)."""

    @abstractmethod
    def _load_page(
        self, states: list[ContainerState] | None, limit: int, after: str
    ) -> list[Container]:
        """Records by uuid order after ``after``, in ``states`` (all when None)."""

    @abstractmethod
    def _load_newest(
        self, filter: ListFilter, limit: int, cursor: tuple[float, str] | None
    ) -> list[Container]:
        """Records matching ``filter``, ordered by ``(created_at, uuid)`` descending, strictly
        after ``cursor`` in that order (from the newest when None); at most ``limit``."""

    @abstractmethod
    def _load_counts(self) -> dict[ContainerState, int]:
        """Number of stored records in each state."""

    @abstractmethod
    def _store_log(self, uuid: str, data: bytes) -> None:
        """Append a non-empty chunk to the log of a container known to exist."""

    @abstractmethod
    def _load_log(self, uuid: str, offset: int, end: int | None) -> bytes:
        """Bytes ``offset`` to ``end`` of the log (to its end when None)."""

    @abstractmethod
    def _close_storage(self) -> None:
        """Release the storage; called once."""

    # ---- opening

    def _open(self) -> None:
        """Rebuild the snapshot from every unfinished container in storage.

        The configured instance types may have changed since the container was submitted, so
        each is sized again: a Queued or Locked one that no longer fits anything is cancelled
        (SPEC §7.5); a Running one is kept, with no eligible types, because it is running
        somewhere already and the pool must still find it.  A record that cannot be decoded
        costs that one container (cancelled with the reason), never the queue.
        """
        with self._lock:
            now = self._runtime.now()
            doomed: list[Container] = []
            unreadable: list[Unreadable] = []
            for c, why in self._load_unfinished():
                if why is not None:
                    log.error("cancelling %s: %s", c.uuid, why)
                    unreadable.append((c.uuid, why))
                    continue
                sizing = self._size(c)
                if sizing.error and c.state is not RUNNING:
                    log.warning(
                        "cancelling %s: no suitable instance type: %s", c.uuid, sizing.error
                    )
                    doomed.append(cancelled(c, now, unsatisfiable_error(sizing.error)))
                    continue
                if sizing.error:
                    # An entry with no eligible types: Arvados' queue metrics crashed on these by
                    # reading the first type (SPEC §19.3 item 26); herder code never assumes one.
                    log.warning(
                        "%s is running but fits no configured type: %s", c.uuid, sizing.error
                    )
                # The queue had each container since its creation, so that is when it was first
                # seen: equal priorities stay in the order of their age across a restart,
                # instead of all being "seen" at the same moment and falling into uuid order.
                first_seen = min(c.created_at, now)
                self._entries[c.uuid] = QueueEntry(
                    c, sizing.resources, sizing.instance_types, first_seen
                )
                if waiting_for(c):
                    self._wait(c)
            if doomed or unreadable:
                self._store_cancelled(doomed, unreadable, now)
        if self._waiters:
            self._settle_from_storage()

    # ---- helpers for subclasses

    def _cached(self, uuid: str) -> Container | None:
        """The snapshot's record of ``uuid``, if it is there (caller holds ``self._lock``)."""
        entry = self._entries.get(uuid)
        return None if entry is None else entry.container

    def _stored(self, uuid: str) -> Container:
        """The current record: the snapshot's, or storage's (caller holds ``self._lock``)."""
        c = self._cached(uuid)
        if c is None:
            c = self._load(uuid)
        if c is None:
            raise ContainerNotFound(uuid)
        return c

    def _size(self, c: Container) -> Sizing:
        resources = self._sizer.resources_needed(c)
        try:
            return Sizing(resources, self._sizer.choose_instance_types(c), "")
        except ConstraintsNotSatisfiable as exc:
            return Sizing(resources, [], str(exc) or "no suitable instance type")

    def _refresh(self, uuids: Iterable[str] | None = None) -> None:
        """Take in changes another process stored: the snapshot follows storage for ``uuids``
        (every unfinished container, and every one in the snapshot, when None), and listeners
        and observers are told.  For backends shared between processes (and test doubles that
        change records behind the queue's back)."""
        changes: list[tuple[Container | None, Container]] = []
        with self._lock:
            if self._closed:
                return
            if uuids is None:
                found = {c.uuid: c for c, why in self._load_unfinished() if why is None}
                for uuid in self._entries.keys() - found.keys():
                    record = self._load(uuid)
                    if record is not None:
                        found[uuid] = record
                records = list(found.values())
            else:
                records = [c for c in map(self._load, uuids) if c is not None]
            now = self._runtime.now()
            for new in records:
                entry = self._entries.get(new.uuid)
                old = None if entry is None else entry.container
                if old == new:
                    continue
                if entry is not None:
                    self._entries[new.uuid] = QueueEntry(
                        new, entry.resources, entry.instance_types, entry.first_seen_at
                    )
                elif not new.state.final:
                    sizing = self._size(new)
                    self._entries[new.uuid] = QueueEntry(
                        new, sizing.resources, sizing.instance_types, now
                    )
                else:
                    continue
                if waiting_for(new):
                    self._wait(new)
                changes.append((old, new))
        if changes:
            self._notify()
        for old, new in changes:
            self._observed(old, new)
        # What another process finished may release containers held here, and what it
        # submitted may wait for containers that have finished since.
        finished = [
            new
            for old, new in changes
            if new.state.final and old is not None and not old.state.final
        ]
        if finished and self._waiters:
            self._settle(finished)
        deps = {dep for _, new in changes for dep in waiting_for(new)}
        if deps:
            self._settle_from_storage(deps)

    def _notify(self) -> None:
        """Call every listener; one failing listener must not starve the others."""
        self._listeners.call()

    def _observed(self, old: Container | None, new: Container) -> None:
        """Tell every observer about one change; a failing observer must not break the change."""
        self._observers.call(old, new)

    def _prepare(
        self, spec: ContainerSpec, now: float, array_id: str = "", uuid: str = ""
    ) -> tuple[Container, Sizing]:
        """Validate and size a submission (a new uuid unless given); unsatisfiable ones come
        back Cancelled."""
        validate_spec(spec)
        if self._always_preemptible and not spec.scheduling_parameters.preemptible:
            sp = replace(spec.scheduling_parameters, preemptible=True)
            spec = replace(spec, scheduling_parameters=sp)
        c = Container(
            uuid=uuid or new_uuid(self._cluster_id, self._random_bytes),
            state=QUEUED,
            priority=spec.priority,
            spec=spec,
            created_at=now,
            array_id=array_id,
        )
        sizing = self._size(c)
        if sizing.error:
            c = cancelled(c, now, unsatisfiable_error(sizing.error))
        return c, sizing

    def _transition(self, uuid: str, rule: Rule, *, settle: bool = True) -> Container:
        """Apply ``rule`` to one container: store, update the snapshot, then notify; then
        settle what waited for it, if it has just finished (unless ``settle`` is false: the
        caller settles)."""
        with self._lock:
            now = self._runtime.now()
            entry = self._entries.get(uuid)
            sizing: Sizing | None = None

            def change(old: Container) -> Container:
                nonlocal sizing
                new = rule(old, now)
                if new is old:
                    return old
                if entry is None and not may_forget(new):
                    # A forgotten container that needs attention again re-enters the snapshot.
                    sizing = self._size(new)
                if new.state is QUEUED and (old.state is not QUEUED or entry is None):
                    new = self._cancel_if_unsatisfiable(new, entry, sizing, now)
                return new

            old, new = self._store_change(uuid, change)
            # Storage ahead of the snapshot when nothing changed: another process changed the
            # container and this one has not been told yet (its notification is on the way).
            behind = (
                new is old
                and entry is not None
                and entry.container is not old
                and entry.container != old
            )
            if new is old:
                if not behind:
                    return old
            elif entry is not None:
                self._entries[uuid] = QueueEntry(
                    new, entry.resources, entry.instance_types, entry.first_seen_at
                )
            elif sizing is not None and not new.state.final:
                self._entries[uuid] = QueueEntry(new, sizing.resources, sizing.instance_types, now)
        if behind:
            # The snapshot follows storage now rather than when the notification arrives, so
            # that a read right after this call sees what the rule saw (and listeners hear).
            self._refresh([uuid])
            return old
        self._notify()
        self._observed(old, new)
        if settle and new.state.final and not old.state.final and self._waiters:
            self._settle([new])
        return new

    def _cancel_if_unsatisfiable(
        self, c: Container, entry: QueueEntry | None, sizing: Sizing | None, now: float
    ) -> Container:
        """Never queue a container that no type fits (Arvados 15942).

        This happens when a Running container kept across a restart with no eligible types
        (see :meth:`_open`) loses its runner and is queued again.
        """
        if entry is not None and entry.instance_types:
            return c
        if sizing is None:
            sizing = self._size(c)
        if not sizing.error:
            return c
        return cancelled(c, now, unsatisfiable_error(sizing.error))

    # ---- reads used by the scheduler

    def entries(self) -> tuple[dict[str, QueueEntry], float]:
        with self._lock:
            return dict(self._entries), self._runtime.now()

    def get(self, uuid: str) -> Container | None:
        with self._lock:
            try:
                return self._stored(uuid)
            except ContainerNotFound:
                return None

    def forget(self, uuid: str) -> None:
        """Drop from the snapshot (SPEC §7.2).  Not a change to any container: no notification."""
        with self._lock:
            entry = self._entries.get(uuid)
            if entry is not None and may_forget(entry.container):
                del self._entries[uuid]

    # ---- state changes

    def submit(self, spec: ContainerSpec) -> Container:
        return self.submit_many([spec])[0]

    def submit_many(self, specs: Iterable[ContainerSpec]) -> list[Container]:
        """Submit several containers in one transaction: all are stored, or none is.

        Each spec's uuid is drawn first, so that an ``after`` naming another item of the batch
        resolves to it (:func:`resolve_batch`).  Validation and sizing happen before the lock
        is taken, so a large batch does not hold up the scheduler's reads for longer than the
        insert itself.
        """
        now = self._runtime.now()
        specs = list(specs)
        uuids = [new_uuid(self._cluster_id, self._random_bytes) for _ in specs]
        specs, order = resolve_batch(specs, uuids)
        prepared = []
        for index, spec in enumerate(specs):
            try:
                prepared.append(self._prepare(spec, now, uuid=uuids[index]))
            except InvalidRequest as exc:
                if len(specs) == 1:
                    raise
                raise InvalidRequest(f"item {index}: {exc}", index, exc.field) from None
        return self._store_prepared(prepared, now, order)

    def submit_array(self, spec: ContainerSpec, count: int) -> list[Container]:
        """``count`` containers of one spec sharing a new array id, in one transaction.

        Each member finds its index (0 to count - 1) in ``$HERDER_ARRAY_INDEX`` and the array
        id in ``$HERDER_ARRAY_ID``, replacing any value the spec gave them.
        """
        if not isinstance(count, int) or not 1 <= count <= MAX_ARRAY:
            raise InvalidRequest(f"count must be 1 to {MAX_ARRAY}, not {count!r}")
        array_id = new_uuid(self._cluster_id, self._random_bytes, ARRAY_INFIX)
        base = tuple((k, v) for k, v in spec.environment if k not in _ARRAY_ENV)
        now = self._runtime.now()
        validate_spec(spec)
        prepared = []
        for index in range(count):
            env = (*base, (ARRAY_ID_ENV, array_id), (ARRAY_INDEX_ENV, str(index)))
            member = replace(spec, environment=tuple(sorted(env)))
            prepared.append(self._prepare(member, now, array_id))
        return self._store_prepared(prepared, now)

    def _store_prepared(
        self, prepared: list[tuple[Container, Sizing]], now: float, order: Sequence[int] = ()
    ) -> list[Container]:
        """Store validated submissions in one transaction, then tell listeners.

        ``after`` is applied in ``order`` (dependencies first, :func:`resolve_batch`), so an
        item that waits for another of the batch sees it as the batch stores it: held, or
        cancelled at once (nothing fits it), which cancels the waiter too.
        """
        if not prepared:
            return []
        with self._lock:
            batch = len(prepared) > 1
            held: dict[str, Container] = {}
            for i in order or range(len(prepared)):
                c, sizing = prepared[i]
                c = self._hold(c, i if batch else None, now, held)
                held[c.uuid] = c
                prepared[i] = (c, sizing)
            self._store_new([c for c, _ in prepared])
            for c, sizing in prepared:
                # An unsatisfiable submission is cancelled at once and never needs attention.
                if not c.state.final:
                    self._entries[c.uuid] = QueueEntry(
                        c, sizing.resources, sizing.instance_types, now
                    )
                    if waiting_for(c):
                        self._wait(c)
        self._notify()
        for c, _ in prepared:
            self._observed(None, c)
        return [c for c, _ in prepared]

    def _hold(
        self, c: Container, index: int | None, now: float, batch: dict[str, Container]
    ) -> Container:
        """Apply ``after`` to a new container (caller holds ``self._lock``): every dependency
        must exist, stored or in the same ``batch``; the container waits for those not
        finished yet, or is cancelled at once if one has failed already."""
        if not c.spec.after or c.state.final:
            return c
        deps = []
        for uuid in dict.fromkeys(c.spec.after):
            try:
                deps.append(batch[uuid] if uuid in batch else self._stored(uuid))
            except ContainerNotFound:
                where = "" if index is None else f"item {index}: "
                raise InvalidRequest(f"{where}after: no container {uuid}", index, "after") from None
        return held_at_submission(c, deps, now)

    def _wait(self, c: Container) -> None:
        """Index ``c`` under each container it waits for (caller holds ``self._lock``)."""
        for dep in waiting_for(c):
            self._waiters.setdefault(dep, set()).add(c.uuid)

    def _settle(self, finished: Iterable[Container]) -> None:
        """Tell the containers waiting for ``finished`` (final ones) that they have ended:
        each is released once all it waits for completed with exit code 0, and cancelled
        as soon as one did not.  Cancellations cascade to what waited for them in turn,
        iteratively, so a long chain costs no stack."""
        work = [c for c in finished if c.state.final]
        while work:
            done = work.pop()
            with self._lock:
                candidates = sorted(self._waiters.pop(done.uuid, ()))
            rule: Rule = functools.partial(_dependency_rule_of, done)
            for uuid in candidates:
                try:
                    new = self._transition(uuid, rule, settle=False)
                except ContainerNotFound:
                    continue
                if new.state.final:
                    work.append(new)

    def _settle_from_storage(self, deps: Iterable[str] | None = None) -> None:
        """Settle held containers whose dependencies (``deps``, or all of them) finished while
        nobody was told (a stop between the two writes; a container submitted elsewhere after
        its dependency ended)."""
        with self._lock:
            deps = list(self._waiters if deps is None else deps)
            finished = [c for c in map(self._load, deps) if c is not None and c.state.final]
        self._settle(finished)

    def lock(self, uuid: str) -> Container:
        return self._transition(uuid, lock_rule)

    def unlock(self, uuid: str) -> Container:
        return self._transition(uuid, lambda c, now: unlock_rule(c, now, self._max_attempts))

    def set_running(self, uuid: str, instance_id: str = "", instance_type: str = "") -> Container:
        return self._transition(
            uuid, lambda c, now: running_rule(c, now, instance_id, instance_type)
        )

    def finish(self, uuid: str, exit_code: int) -> Container:
        return self._transition(uuid, lambda c, now: finish_rule(c, now, exit_code))

    def retry(self, uuid: str, reason: str) -> Container:
        return self._transition(uuid, lambda c, now: retry_rule(c, now, reason, self._max_attempts))

    def cancel(self, uuid: str, reason: str = "") -> Container:
        return self._transition(uuid, lambda c, now: cancel_rule(c, now, reason))

    def set_priority(self, uuid: str, priority: int) -> Container:
        if not isinstance(priority, int) or priority < 0:
            raise InvalidRequest(f"priority must be an integer >= 0, not {priority!r}")
        return self._transition(uuid, lambda c, now: priority_rule(c, now, priority))

    def set_status(self, uuid: str, key: str, value: str) -> Container:
        if not key or key in ("error", "warning"):
            raise InvalidRequest(f"runtime_status key {key!r} is not one to set")
        return self._transition(uuid, lambda c, now: status_rule(c, now, key, value))

    def add_cost(self, uuid: str, cost: float) -> None:
        if not math.isfinite(cost) or cost < 0:
            raise InvalidRequest(f"cost must be a finite number >= 0, not {cost!r}")
        self._transition(uuid, lambda c, now: cost_rule(c, now, cost))

    # ---- logs

    def append_log(self, uuid: str, data: bytes) -> None:
        """Append a chunk at the end of the container's log (kept after it finishes, too)."""
        with self._lock:
            self._stored(uuid)
            if data:
                self._store_log(uuid, bytes(data))

    def read_log(self, uuid: str, offset: int = 0, limit: int | None = None) -> bytes:
        """Bytes ``offset`` to ``offset + limit`` of the log (to its end without a limit).

        Offsets are bytes, so a client follows a log by asking again from ``offset + len(got)``.
        """
        if offset < 0 or (limit is not None and limit < 0):
            raise InvalidRequest("log offset and limit must be >= 0")
        end = None if limit is None else offset + limit
        with self._lock:
            self._stored(uuid)
            if end == offset:
                return b""
            return self._load_log(uuid, offset, end)

    # ---- listing for people

    def newest(
        self, filter: ListFilter | None = None, limit: int = 100, after: str = ""
    ) -> list[Container]:
        if limit < 0:
            raise InvalidRequest("limit must be >= 0")
        filter = filter or ListFilter()
        if filter.states is not None:
            filter = replace(filter, states=tuple(ContainerState(s) for s in filter.states))
            if not filter.states:
                return []
        if filter.since is not None and not math.isfinite(filter.since):
            raise InvalidRequest("since must be a finite time")
        with self._lock:
            cursor = None
            if after:
                last = self._stored(after)
                cursor = (last.created_at, last.uuid)
            return self._load_newest(filter, limit, cursor) if limit else []

    def list(
        self,
        states: Iterable[ContainerState] | None = None,
        limit: int = 100,
        after: str = "",
    ) -> list[Container]:
        if limit < 0:
            raise InvalidRequest("limit must be >= 0")
        wanted = None if states is None else [ContainerState(s) for s in states]
        if wanted is not None and not wanted:
            return []
        with self._lock:
            return self._load_page(wanted, limit, after)

    def counts(self) -> dict[ContainerState, int]:
        with self._lock:
            found = self._load_counts()
        out = dict.fromkeys(ContainerState, 0)
        out.update(found)
        return out

    # ---- notifications and lifecycle

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        return self._listeners.add(listener)

    def observe(self, observer: Observer) -> Callable[[], None]:
        return self._observers.add(observer)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._close_storage()

"""Quota headroom: no instance is created into a quota the cloud says is full.

Drivers that can (capability ``quota_headroom``) report the account's quotas and their usage
through :meth:`herder.plugin.cloud.InstanceSet.quotas`.  Learning a quota only from a refused create
costs a create call, a back-off for the whole pool and, for containers that were locked for
the instance, dispatch attempts; reading it beforehand lets the scheduler pass over the types
of a full quota group, try others, and tell waiting containers which quota holds them.

The read is a cloud call, so it is made at most every ``cloud.quota_refresh_interval``, before
a pass and outside its lock.  Between reads, the instances herder creates are added to the
usage read last (*pending*), so that one pass cannot create a whole group's worth of
instances into a quota that had room for one.  A failed read keeps the previous answer; a
driver without the method switches reading off for good.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from herder.model import InstanceType, InstanceView, WorkerState
from herder.plugin.cloud import NotImplementedByDriver, Quota


@dataclass(frozen=True, slots=True)
class QuotaState:
    """One quota as the API and ``herder quotas`` show it.

    ``herder`` is what herder's own live instances of the group take of it; ``pending`` what
    herder created since the last read (not yet in ``usage``); ``wanted`` what the last pass
    would have created for waiting containers had the quota had room.
    """

    quota: Quota
    herder: float
    pending: float
    wanted: float
    read_at: float

    @property
    def headroom(self) -> float:
        return self.quota.limit - self.quota.usage - self.pending

    def to_json(self) -> dict[str, object]:
        q = self.quota
        return {
            "name": q.name,
            "group": q.group,
            "unit": q.unit.value,
            "description": q.description,
            "limit": q.limit,
            "usage": q.usage,
            "herder": self.herder,
            "pending": self.pending,
            "wanted": self.wanted,
            "headroom": self.headroom,
            "read_at": self.read_at,
        }


def describe(quota: Quota, pending: float, instance_type: InstanceType) -> str:
    """What a container waiting on ``quota`` is told (after "Cloud quota full: ")."""
    label = quota.description or quota.name
    if quota.description and quota.description != quota.name:
        label = f"{quota.description} ({quota.name})"
    used = quota.usage + pending
    return (
        f"{label}: {_num(used)} of {_num(quota.limit)} {quota.unit.value} in use, "
        f"type {instance_type.name} needs {_num(quota.need(instance_type))}"
    )


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.2f}"


class QuotaHeadroom:
    """The quotas last read and herder's creates since; thread-safe."""

    def __init__(
        self,
        *,
        read: Callable[[], list[Quota]] | None,
        group_of: Callable[[InstanceType], str],
        refresh_interval: float,
        logger: logging.Logger,
    ) -> None:
        """``read`` is the driver's ``quotas`` (None or ``refresh_interval`` 0: never read)."""
        self._read = read if refresh_interval > 0 else None
        self._group_of = group_of
        self._interval = refresh_interval
        self._log = logger
        self._lock = threading.Lock()
        self._quotas: list[Quota] = []
        self._read_at = float("-inf")
        self._next_read = float("-inf")
        self._pending: dict[str, float] = {}  # by quota name, since the last read
        self._wanted: dict[str, float] = {}  # by quota name, in the last pass
        self._wanted_now: dict[str, float] = {}
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self._read is not None

    def refresh(self, now: float) -> None:
        """Read the quotas if the last read is ``refresh_interval`` old; never raises."""
        read = self._read
        if read is None or now < self._next_read:
            return
        self._next_read = now + self._interval
        try:
            quotas = read()
        except NotImplementedByDriver:
            self._log.info("the driver cannot read quotas: quota headroom not checked")
            self._read = None
            return
        except Exception as exc:
            if not self._failed:
                self._log.warning("reading the cloud's quotas failed (keeping the last): %s", exc)
            self._failed = True
            return
        if self._failed:
            self._log.info("reading the cloud's quotas works again")
        self._failed = False
        with self._lock:
            self._quotas = list(quotas)
            self._read_at = now
            self._pending.clear()

    def begin_pass(self) -> None:
        """A pass begins: the demand counted by the previous one becomes ``wanted``."""
        with self._lock:
            self._wanted = self._wanted_now
            self._wanted_now = {}

    def _of(self, instance_type: InstanceType) -> list[Quota]:
        group = self._group_of(instance_type)
        return [q for q in self._quotas if q.group == group and q.need(instance_type) > 0]

    def blocking(self, instance_type: InstanceType) -> str | None:
        """Why one more instance of ``instance_type`` would not fit its quota, or None."""
        if not self._quotas:
            return None
        with self._lock:
            for quota in self._of(instance_type):
                pending = self._pending.get(quota.name, 0.0)
                if quota.usage + pending + quota.need(instance_type) > quota.limit:
                    return describe(quota, pending, instance_type)
        return None

    def want(self, instance_type: InstanceType) -> None:
        """A container waits for an instance of ``instance_type`` that its quota has no room
        for: counted in ``wanted`` of every full quota of its group (call once a container)."""
        with self._lock:
            for quota in self._of(instance_type):
                pending = self._pending.get(quota.name, 0.0)
                need = quota.need(instance_type)
                if quota.usage + pending + need > quota.limit:
                    self._wanted_now[quota.name] = self._wanted_now.get(quota.name, 0.0) + need

    def created(self, instance_type: InstanceType) -> None:
        """herder asked for an instance of ``instance_type``: count it until the next read."""
        with self._lock:
            for quota in self._of(instance_type):
                self._pending[quota.name] = self._pending.get(quota.name, 0.0) + quota.need(
                    instance_type
                )

    def states(
        self, views: Iterable[InstanceView], instance_types: Mapping[str, InstanceType]
    ) -> list[QuotaState]:
        """Every quota last read, with what herder's instances in ``views`` take of each."""
        with self._lock:
            quotas = list(self._quotas)
            pending = dict(self._pending)
            wanted = dict(self._wanted)
            read_at = self._read_at
        own: dict[str, float] = {}
        for view in views:
            it = instance_types.get(view.instance_type)
            if it is None or not view.instance or view.worker_state is WorkerState.SHUTDOWN:
                continue
            group = self._group_of(it)
            for quota in quotas:
                if quota.group == group:
                    own[quota.name] = own.get(quota.name, 0.0) + quota.need(it)
        return [
            QuotaState(
                quota=q,
                herder=own.get(q.name, 0.0),
                pending=pending.get(q.name, 0.0),
                wanted=wanted.get(q.name, 0.0),
                read_at=read_at,
            )
            for q in quotas
        ]

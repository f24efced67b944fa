"""Test doubles for scheduler tests: an in-memory queue and a scripted pool (SPEC §14.4, §14.5).

Both are deliberately simple and fully visible: tests set the pool's quota, capacity and create
budget, put workers in any state, and read back every create, start, kill and shutdown.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from herder.config import Config, ContainersConfig
from herder.engine.scheduler.scheduler import Scheduler
from herder.engine.sizing import ConfigSizer, choose_instance_types, resources_needed
from herder.engine.worker.interfaces import BootBackoff, QuotaLimit, WorkerPool
from herder.model import (
    Container,
    ContainerSpec,
    ContainerState,
    GPURequest,
    IdleBehavior,
    InstanceType,
    InstanceView,
    RuntimeConstraints,
    SchedulingParameters,
    WorkerState,
)
from herder.queue.base import ContainerQueue, QueueEntry
from herder.queue.memory import MemoryQueue
from herder.queue.rules import RuleSettings
from herder.runtime import VirtualRuntime
from herder.testing.queue_conformance import QueueFactory, QueueSettings

GiB = 1 << 30

Q = ContainerState.QUEUED
L = ContainerState.LOCKED
R = ContainerState.RUNNING
C = ContainerState.COMPLETE
X = ContainerState.CANCELLED


def itype(name: str, vcpus: int, ram_gib: int, price: float, **kw: Any) -> InstanceType:
    return InstanceType(
        name=name,
        provider_type=kw.pop("provider_type", name),
        vcpus=vcpus,
        ram=ram_gib * GiB,
        price=price,
        **kw,
    )


def default_types() -> dict[str, InstanceType]:
    """Each type twice the previous: a container fits exactly one cheapest type."""
    return {
        t.name: t
        for t in (
            itype("t1", 1, 4, 1.0),
            itype("t2", 2, 8, 2.0),
            itype("t4", 4, 16, 4.0),
            itype("t8", 8, 32, 8.0),
        )
    }


def uuid_of(n: int) -> str:
    return f"zzzzz-dz642-{n:015d}"


# --------------------------------------------------------------------------- queue


class StubQueue(MemoryQueue):
    """The queue rules of :mod:`herder.queue.rules` over memory, plus what scheduler tests
    need: containers put straight into any state (:meth:`add`), records changed as another
    process would (:meth:`set`), and every lock, unlock, retry, cancel and forget call recorded
    (failed ones included).  ``max_dispatch_attempts=0`` takes the configured default."""

    def __init__(
        self,
        runtime: VirtualRuntime,
        types: dict[str, InstanceType],
        max_dispatch_attempts: int = 0,
        always_use_preemptible: bool = False,
    ) -> None:
        super().__init__(
            RuleSettings(
                runtime=runtime,
                sizer=ConfigSizer(types),
                max_dispatch_attempts=(
                    max_dispatch_attempts or ContainersConfig().max_dispatch_attempts
                ),
                always_use_preemptible=always_use_preemptible,
            )
        )
        self.runtime = runtime
        self.types = types
        self.calls: list[tuple[str, str, str]] = []  # (op, uuid, reason)
        self._seq = itertools.count(1)

    @property
    def db(self) -> dict[str, Container]:
        """Every stored record, by uuid."""
        return self._records

    # ---- building
    def add(
        self,
        state: ContainerState = Q,
        *,
        priority: int = 1,
        vcpus: int = 1,
        ram: int = GiB,
        supervisor: bool = False,
        preemptible: bool = False,
        max_run_time: float = 0.0,
        started_at: float | None = None,
        created_at: float | None = None,
        first_seen: float | None = None,
        gpu: GPURequest | None = None,
        n: int | None = None,
    ) -> str:
        """Store a container in ``state`` as if the queue had been opened with it there (a
        container no type fits is kept, with no eligible types)."""
        uuid = uuid_of(n if n is not None else next(self._seq))
        now = self.runtime.now()
        spec = ContainerSpec(
            command=("true",),
            runtime_constraints=RuntimeConstraints(vcpus=vcpus, ram=ram, gpu=gpu or GPURequest()),
            scheduling_parameters=SchedulingParameters(
                preemptible=preemptible, max_run_time=max_run_time, supervisor=supervisor
            ),
            priority=priority,
        )
        c = Container(
            uuid=uuid,
            state=state,
            priority=priority,
            spec=spec,
            created_at=created_at if created_at is not None else now,
            started_at=started_at,
            lock_count=1 if state in (L, R) else 0,
        )
        types = choose_instance_types(c, self.types) if self.types else []
        with self._lock:
            self._records[uuid] = c
            self._entries[uuid] = QueueEntry(
                c, resources_needed(c), types, first_seen if first_seen is not None else now
            )
        self.notify()
        return uuid

    def set(self, uuid: str, **changes: Any) -> None:
        """Change a record as another process would (no rules applied)."""
        with self._lock:
            self._records[uuid] = replace(self._records[uuid], **changes)
        self._refresh([uuid])

    def state(self, uuid: str) -> ContainerState:
        return self.db[uuid].state

    # ---- recorded calls
    def forget(self, uuid: str) -> None:
        self.calls.append(("forget", uuid, ""))
        super().forget(uuid)

    def lock(self, uuid: str) -> Container:
        self.calls.append(("lock", uuid, ""))
        return super().lock(uuid)

    def unlock(self, uuid: str) -> Container:
        self.calls.append(("unlock", uuid, ""))
        return super().unlock(uuid)

    def retry(self, uuid: str, reason: str) -> Container:
        self.calls.append(("retry", uuid, reason))
        return super().retry(uuid, reason)

    def cancel(self, uuid: str, reason: str = "") -> Container:
        self.calls.append(("cancel", uuid, reason))
        return super().cancel(uuid, reason)

    def notify(self) -> None:
        self._notify()

    def ops(self, op: str) -> list[str]:
        return [u for o, u, _ in self.calls if o == op]


# --------------------------------------------------------------------------- pool


class StubPool(WorkerPool):
    """The pool double of SPEC §14.5 (implements herder.engine.worker.interfaces.WorkerPool)."""

    def __init__(self, types: dict[str, InstanceType]) -> None:
        self.types = types
        self.quota = 1_000_000  # at quota when total workers >= quota
        self.limit_kind: QuotaLimit = QuotaLimit.CLOUD_QUOTA  # which limit ``quota`` stands for
        self.backoffs: dict[str, BootBackoff] = {}  # type name -> boot back-off
        self.capacity: dict[str, int] = {}  # provider type -> how many may exist
        self.can_create = 1_000_000
        self.workers: dict[str, InstanceView] = {}
        self.run: dict[str, float] = {}
        self.lingering: set[str] = set()  # old runners still exiting, not listed by running()
        self.creates: list[str] = []
        self.starts: list[str] = []
        self.kills: list[tuple[str, str]] = []
        self.forgotten: list[str] = []
        self.shutdowns: list[str] = []
        self.is_loaded = True
        self._listeners: list[Callable[[], None]] = []

    # ---- building
    def add_worker(
        self,
        iid: str,
        type_name: str,
        state: WorkerState = WorkerState.IDLE,
        uuids: Iterable[str] = (),
        behavior: IdleBehavior = IdleBehavior.RUN,
        price: float | None = None,
    ) -> InstanceView:
        it = self.types.get(type_name)
        view = InstanceView(
            instance=iid,
            address="",
            price=price if price is not None else (it.price if it else 0.0),
            instance_type=type_name,
            provider_instance_type=it.provider_type if it else type_name,
            last_container_uuid="",
            last_busy=0.0,
            running_container_uuids=list(uuids),
            worker_state=state,
            idle_behavior=behavior,
        )
        self.workers[iid] = view
        for u in uuids:
            self.run[u] = 0.0
        return view

    def boot_all(self) -> None:
        for v in self.workers.values():
            if v.worker_state is WorkerState.BOOTING:
                v.worker_state = WorkerState.IDLE
        self.notify()

    # ---- WorkerPool
    def running(self) -> dict[str, float]:
        return dict(self.run)

    def instances(self) -> list[InstanceView]:
        return [
            replace(v, running_container_uuids=list(v.running_container_uuids))
            for _, v in sorted(self.workers.items())
        ]

    def count_workers(self) -> dict[WorkerState, int]:
        return dict(Counter(v.worker_state for v in self.workers.values()))

    @property
    def loaded(self) -> bool:
        return self.is_loaded

    def at_capacity(self, instance_type: InstanceType) -> bool:
        supply = self.capacity.get(instance_type.provider_type)
        if supply is None:
            return False
        have = sum(
            1
            for v in self.workers.values()
            if v.provider_instance_type == instance_type.provider_type
        )
        return supply - have < 1

    def at_quota(self) -> bool:
        return len(self.workers) >= self.quota

    def quota_limit(self) -> QuotaLimit | None:
        return self.limit_kind if self.at_quota() else None

    def boot_backoff(self, instance_type: InstanceType) -> BootBackoff | None:
        return self.backoffs.get(instance_type.name)

    def create(self, instance_type: InstanceType) -> InstanceView | None:
        self.creates.append(instance_type.name)
        if self.can_create < 1:
            return None
        self.can_create -= 1
        iid = f"i-{len(self.creates):07d}"
        self.add_worker(iid, instance_type.name, WorkerState.BOOTING)
        view = replace(self.workers[iid], instance="", running_container_uuids=[])
        return view

    def shutdown(self, instance_id: str) -> bool:
        self.shutdowns.append(instance_id)
        return False

    def start_container(self, instance_id: str, container: Container) -> bool:
        self.starts.append(container.uuid)
        v = self.workers.get(instance_id)
        if (
            v is None
            or v.worker_state not in (WorkerState.IDLE, WorkerState.RUNNING)
            or v.idle_behavior is not IdleBehavior.RUN
        ):
            return False
        self.run[container.uuid] = 0.0
        v.worker_state = WorkerState.RUNNING
        v.running_container_uuids.append(container.uuid)
        return True

    def kill_container(self, uuid: str, reason: str) -> bool:
        self.kills.append((uuid, reason))
        if uuid in self.lingering:
            return True
        t = self.run.pop(uuid, None)
        if t is not None:
            for v in self.workers.values():
                if uuid in v.running_container_uuids:
                    v.running_container_uuids.remove(uuid)
        return t == 0.0

    def forget_container(self, uuid: str) -> None:
        self.forgotten.append(uuid)

    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def notify(self) -> None:
        for fn in list(self._listeners):
            fn()


# --------------------------------------------------------------------------- harness


class Harness:
    def __init__(
        self,
        types: dict[str, InstanceType] | None = None,
        max_dispatch_attempts: int = 0,
        **cloud: Any,
    ) -> None:
        self.types = default_types() if types is None else types
        self.rt = VirtualRuntime()
        self.queue = StubQueue(self.rt, self.types, max_dispatch_attempts)
        self.pool = StubPool(self.types)
        containers = cloud.pop("containers", {})
        self.config = Config.model_validate({"cloud": cloud, "containers": containers})
        self.registry = CollectorRegistry()
        self.sched = Scheduler(
            runtime=self.rt,
            queue=self.queue,
            pool=self.pool,
            config=self.config,
            instance_types=self.types,
            registry=self.registry,
        )

    def run_pass(self) -> None:
        """One pass, then let its background operations finish."""
        self.sched.run_pass()
        self.rt.run_until_idle()

    def status(self, uuid: str) -> str:
        for e in self.sched.snapshot():
            if e.entry.container.uuid == uuid:
                return e.scheduling_status
        raise KeyError(uuid)

    def order(self) -> list[str]:
        return [e.entry.container.uuid for e in self.sched.snapshot()]

    def metric(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels or None)


@pytest.fixture
def make() -> Callable[..., Harness]:
    return Harness


@pytest.fixture
def stub_queue_factory() -> QueueFactory:
    """Builds the stub queue for the queue conformance suite (test_stub_queue.py)."""

    def build(settings: QueueSettings) -> ContainerQueue:
        return StubQueue(
            settings.runtime,
            settings.instance_types,
            settings.max_dispatch_attempts,
            settings.always_use_preemptible,
        )

    return build

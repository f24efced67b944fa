"""The ``sim`` driver: a simulated cloud, with a simulated runner and fault knobs.

It lets the real engine (queue, scheduler, pool, workers) run against a cloud that lives in
memory, on the engine's clock: under a :class:`~herder.runtime.VirtualRuntime`, ``herder
simulate`` runs a simulated hour in seconds, and tests inject every fault Arvados' stub driver
can (SPEC §14.2) plus a few more (see :class:`SimParameters`).

Instances are not reached over SSH: :meth:`SimDriver.executor_factory` gives herder a
:class:`SimExecutor` that interprets herder's commands directly.  Every cloud call, fault,
instance-second and container process is counted in :class:`SimStats`; in particular a
container process that starts while another process of the same container is alive anywhere
is recorded as a *double run*, which is how a simulation proves there were none.

Example configuration::

    cloud:
      driver: sim
      driver_parameters: {seed: 7, boot_delay: [20, 60], faults: true}
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from herder import defaults
from herder.model import Billing, InstanceType
from herder.plugin.cloud import (
    Capability,
    CapacityError,
    CloudError,
    Driver,
    DriverContext,
    DriverParameters,
    HostKey,
    HostKeyMismatch,
    Instance,
    InstancePrice,
    InstanceSet,
    NotImplementedByDriver,
    Quota,
    QuotaError,
    RateLimitError,
    RemoteRunner,
    create_key,
)
from herder.plugin.executor import ExecutorFactory
from herder.testing.sim_cloud import SimCloud, SimVM, sim_billing
from herder.testing.sim_executor import SimExecutor
from herder.testing.sim_params import SimParameters
from herder.testing.sim_stats import DoubleRun, SimStats

__all__ = [
    "DoubleRun",
    "SimCloud",
    "SimDriver",
    "SimError",
    "SimExecutor",
    "SimInstance",
    "SimInstanceSet",
    "SimParameters",
    "SimStats",
]

#: The longest init command a cloud must accept (SPEC §1.2).
MAX_INIT_COMMAND_BYTES = 1024


class SimError(CloudError):
    """An ordinary cloud failure injected by the simulation (or a misuse it detected)."""


class SimInstance(Instance):
    """A snapshot of a simulated instance, as returned by create or a listing.

    Tags are those of the moment the snapshot was taken (as with real clouds' cached objects);
    the address follows the instance live.
    """

    def __init__(self, instance_set: SimInstanceSet, vm: SimVM, tags: Mapping[str, str]) -> None:
        self._set = instance_set
        self._vm = vm
        self._tags = dict(tags)

    @property
    def id(self) -> str:
        return self._vm.id

    @property
    def provider_type(self) -> str:
        return self._vm.instance_type.provider_type

    @property
    def address(self) -> str:
        cloud = self._set.cloud
        with cloud.lock:
            return self._vm.current_address(cloud.now())

    @property
    def remote_user(self) -> str:
        return self._vm.remote_user

    @property
    def tags(self) -> dict[str, str]:
        return dict(self._tags)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._set.set_tags(self._vm, tags)

    def destroy(self) -> None:
        self._set.destroy(self._vm)

    def verify_host_key(self, key: HostKey, remote: RemoteRunner) -> None:
        """Compare with the instance's genuine key, when the host-key capability is on."""
        if not self._vm.params.host_key_verification:
            raise NotImplementedByDriver()
        if key != self._vm.host_key:
            raise HostKeyMismatch(f"{self.id}: host key {key.openssh()} is not the instance's")

    def price_history(self, instance_type: InstanceType) -> list[InstancePrice]:
        if not self._vm.params.price_history:
            return []
        return [InstancePrice(self._vm.created_at, instance_type.price)]

    @property
    def host_key(self) -> HostKey:
        """The key this instance's (simulated) SSH server presents."""
        return self._vm.host_key

    @property
    def init_command(self) -> str:
        """The init command given to create (run "at first boot")."""
        return self._vm.init_command

    @property
    def public_key(self) -> str | None:
        """The public key given to create (allowed to log in)."""
        return self._vm.public_key


class SimInstanceSet(InstanceSet):
    """One dispatcher's view of a simulated cloud, with the faults of its parameters.

    Thread-safe: every call takes the cloud's lock.  Rate limits are per instance set, as in
    Arvados' stub; quota and capacity count every instance of the cloud.  An instance's own
    faults (boot, broken, vanishing, runner) follow the parameters of the set that created it;
    connection faults follow those of the set whose executor runs the command.
    """

    def __init__(
        self, cloud: SimCloud, params: SimParameters, context: DriverContext | None = None
    ) -> None:
        self.cloud = cloud
        self.params = params
        self.context = context
        self._next_create_at = float("-inf")
        self._next_list_at = float("-inf")
        self._stopped = False

    @property
    def stats(self) -> SimStats:
        """The whole cloud's live statistics (shared by every instance set of the driver)."""
        return self.cloud.stats

    def executor(self, instance: Instance) -> SimExecutor:
        """An executor for one of this cloud's instances (an :data:`ExecutorFactory`)."""
        return SimExecutor(self.cloud, self.params, instance)

    # ------------------------------------------------------------------ InstanceSet

    def create(
        self,
        instance_type: InstanceType,
        image_id: str,
        tags: Mapping[str, str],
        init_command: str,
        public_key: str | None,
    ) -> Instance:
        """Create, after the stub driver's checks in its order (SPEC §14.2).

        Idempotent: a create whose create key (:func:`herder.plugin.cloud.create_key`) an instance
        still listed carries returns that instance, as a cloud with client tokens does.
        """
        cloud = self.cloud
        context = self.context
        prefix = context.tag_key_prefix if context is not None else defaults.TAG_KEY_PREFIX
        key = create_key(tags, prefix)
        with cloud.lock:
            now = cloud.now()
            cloud.settle(now)
            if key is not None:
                for existing in cloud.listed_vms(now):
                    if create_key(existing.tags, prefix) == key:
                        cloud.call("create", "ok")
                        return SimInstance(self, existing, existing.tags)
            self._check_create(instance_type, init_command, now)
            self._next_create_at = now + self.params.min_time_between_create_calls
            vm = cloud.add_vm(
                self.params, instance_type, image_id, tags, init_command, public_key, now
            )
            cloud.call("create", "ok")
            return SimInstance(self, vm, vm.tags)

    def _check_create(self, instance_type: InstanceType, init_command: str, now: float) -> None:
        """Raise the error a create gets now, if any (counting the call and the fault)."""
        cloud, params = self.cloud, self.params
        if self._stopped:
            cloud.call("create", "error")
            raise SimError("instance set is stopped")
        if now < self._next_create_at:
            cloud.call("create", "rate_limit")
            cloud.fault("rate_limit")
            raise RateLimitError("sim: too many create calls", self._next_create_at)
        if len(init_command.encode()) > MAX_INIT_COMMAND_BYTES:
            cloud.call("create", "error")
            raise SimError(f"init command is longer than {MAX_INIT_COMMAND_BYTES} bytes")
        if cloud.roll(params.create_error_rate):
            cloud.call("create", "error")
            cloud.fault("create_error")
            raise SimError("sim: injected create error")
        quota = params.quota_max_instances
        if quota is not None and cloud.listed_count(now) >= quota:
            cloud.call("create", "quota")
            cloud.fault("quota")
            raise QuotaError(f"sim: reached quota_max_instances {quota}")
        group = self.quota_group(instance_type)
        limit = params.quota_vcpus.get(group)
        if limit is not None and self._vcpus_in(group, now) + instance_type.vcpus > limit:
            cloud.call("create", "quota")
            cloud.fault("quota")
            raise QuotaError(f"sim: quota_vcpus of group {group!r} ({limit}) reached")
        self._check_capacity(instance_type, now)

    def _check_capacity(self, instance_type: InstanceType, now: float) -> None:
        cloud, params = self.cloud, self.params
        provider_type = instance_type.provider_type
        limit = params.capacity_max_instances.get(provider_type)
        if limit is not None and cloud.listed_count(now, provider_type) >= limit:
            cloud.call("create", "capacity")
            cloud.fault("capacity")
            raise CapacityError(
                f"sim: insufficient capacity for {provider_type}", instance_type_specific=True
            )
        if cloud.roll(params.capacity_error_rate):
            cloud.call("create", "capacity")
            cloud.fault("capacity")
            scope = params.capacity_error_scope
            raise CapacityError(
                f"sim: insufficient capacity ({scope})",
                instance_type_specific=scope == "instance_type",
                quota_group_specific=scope == "quota_group",
            )

    def instances(self, tags: Mapping[str, str]) -> list[Instance]:
        """Every listed instance that has all ``tags``, as snapshots."""
        cloud = self.cloud
        with cloud.lock:
            now = cloud.now()
            cloud.settle(now)
            if now < self._next_list_at:
                cloud.call("list", "rate_limit")
                cloud.fault("rate_limit")
                raise RateLimitError("sim: too many list calls", self._next_list_at)
            self._next_list_at = now + self.params.min_time_between_list_calls
            cloud.call("list", "ok")
            return [
                SimInstance(self, vm, vm.tags)
                for vm in cloud.listed_vms(now)
                if all(vm.tags.get(k) == v for k, v in tags.items())
            ]

    def quota_group(self, instance_type: InstanceType) -> str:
        """First character of the provider type, ``-p`` for preemptible (as Arvados' stub)."""
        group = instance_type.provider_type[:1]
        return group + "-p" if instance_type.preemptible else group

    def _vcpus_in(self, group: str, now: float) -> int:
        """vCPUs of the listed instances of quota ``group``: what ``quota_vcpus`` counts."""
        return sum(
            vm.instance_type.vcpus
            for vm in self.cloud.listed_vms(now)
            if self.quota_group(vm.instance_type) == group
        )

    def quotas(self) -> list[Quota]:
        """``quota_vcpus`` with the listed instances' vCPUs as usage (every instance of the
        simulated cloud counts, as an account's quota counts everyone's)."""
        if not self.params.quota_vcpus:
            raise NotImplementedByDriver("sim: no quota_vcpus configured")
        cloud = self.cloud
        with cloud.lock:
            now = cloud.now()
            cloud.settle(now)
            cloud.call("quotas", "ok")
            return [
                Quota(
                    group=group,
                    name=f"sim-{group}-vcpus",
                    limit=float(limit),
                    usage=float(self._vcpus_in(group, now)),
                    description=f"sim vCPUs of group {group}",
                )
                for group, limit in sorted(self.params.quota_vcpus.items())
            ]

    def stop(self) -> None:
        with self.cloud.lock:
            self._stopped = True

    # ------------------------------------------------------------------ instance operations

    def set_tags(self, vm: SimVM, tags: Mapping[str, str]) -> None:
        cloud = self.cloud
        with cloud.lock:
            now = cloud.now()
            cloud.settle(now)
            if not vm.listed(now):
                cloud.call("set_tags", "error")
                raise SimError(f"sim: instance {vm.id} not found")
            vm.tags = dict(tags)
            cloud.call("set_tags", "ok")

    def destroy(self, vm: SimVM) -> None:
        cloud = self.cloud
        with cloud.lock:
            now = cloud.now()
            cloud.settle(now)
            if cloud.roll(self.params.destroy_error_rate):
                cloud.call("destroy", "error")
                cloud.fault("destroy_error")
                raise SimError("sim: injected destroy error")
            cloud.destroy_vm(vm, now)
            cloud.call("destroy", "ok")


class SimDriver(Driver):
    """The ``sim`` driver.  Every instance set it builds shares one :class:`SimCloud`.

    Pass ``cloud`` to share a simulated cloud between driver objects (a dispatcher restart in
    a simulation); otherwise the first :meth:`instance_set` creates it, seeded by its
    parameters and on its context's clock.  With ``state_file`` the cloud is kept in that file
    and outlives the process (a dispatcher killed and started again on the wall clock).

    Capabilities: ``quota_errors`` (``quota_max_instances``), ``capacity_errors``
    (``capacity_error_rate`` / ``capacity_max_instances``), ``rate_limit_errors``
    (``min_time_between_*_calls``), ``host_key_verification`` and ``price_history`` (only when
    the parameters of those names are on: :meth:`capabilities_for`), ``idempotent_create``,
    plus ``spot`` and ``gpu`` (any type can be created).
    """

    parameters_model = SimParameters
    capabilities = frozenset(
        {
            "quota_errors",
            "capacity_errors",
            "rate_limit_errors",
            "host_key_verification",
            "price_history",
            "spot",
            "gpu",
            "idempotent_create",
        }
    )

    def capabilities_for(self, params: DriverParameters) -> frozenset[Capability]:
        """The declared capabilities, less the two that the parameters switch off."""
        caps = set(super().capabilities_for(params))
        if isinstance(params, SimParameters):
            if not params.host_key_verification:
                caps.discard(Capability.HOST_KEY_VERIFICATION)
            if not params.price_history:
                caps.discard(Capability.PRICE_HISTORY)
            if params.quota_vcpus:
                caps.add(Capability.QUOTA_HEADROOM)
        return frozenset(caps)

    def __init__(self, cloud: SimCloud | None = None) -> None:
        self.cloud = cloud
        self._lock = threading.Lock()
        self._last_set: SimInstanceSet | None = None

    def instance_set(self, params: DriverParameters, context: DriverContext) -> SimInstanceSet:
        if not isinstance(params, SimParameters):
            params = SimParameters.model_validate(params.model_dump())
        with self._lock:
            if self.cloud is None:
                self.cloud = SimCloud(
                    seed=params.seed, runtime=context.runtime, state_file=params.state_file
                )
            instance_set = SimInstanceSet(self.cloud, params, context)
            self._last_set = instance_set
            return instance_set

    def billing(self, params: DriverParameters, instance_type: InstanceType) -> Billing | None:
        """The ``billing_increment`` / ``billing_minimum`` the simulated cloud bills with."""
        if not isinstance(params, SimParameters):
            params = SimParameters.model_validate(params.model_dump())
        return sim_billing(params)

    def executor_factory(self, instance_set: InstanceSet) -> ExecutorFactory | None:
        """Sim instances are reached by calling them: build :class:`SimExecutor` s.

        ``instance_set`` may be herder's wrapper around a sim instance set; the most recent
        set this driver built then supplies the parameters.
        """
        if isinstance(instance_set, SimInstanceSet):
            return instance_set.executor
        with self._lock:
            last = self._last_set
        return last.executor if last is not None else None

    @property
    def stats(self) -> SimStats:
        """Statistics of this driver's cloud (empty before the first instance set)."""
        return self.cloud.stats if self.cloud is not None else SimStats()

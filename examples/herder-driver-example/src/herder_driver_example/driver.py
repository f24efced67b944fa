"""The ``example`` driver: an in-memory cloud whose instances are SSH servers on this host.

It stands in for a real cloud API so that the whole driver fits on a few pages:

* :class:`ExampleParameters` is the ``cloud.driver_parameters`` model (unknown keys are errors).
* :class:`ExampleCloud` plays the provider: one per ``account`` name in this process, shared by
  every instance set that uses that account, guarded by one lock.  A real driver calls its
  cloud's SDK where this one touches a dictionary.
* :class:`ExampleInstanceSet` and :class:`ExampleInstance` implement herder's interface
  (:mod:`herder.cloud`), keeping its rules: every method is thread-safe; tags come back exactly
  as set; listings never drop an instance that matches the filter; destroying twice is fine;
  errors herder must react to are raised as its typed errors (here: :class:`QuotaError`).

Each instance is a :class:`herder.ssh.server.LocalSSHServer` that runs commands with ``sh -c``
as the user running herder, in a private runner directory, so herder's runner agent really runs
containers on it.  The init command is kept but not run: it is meant for a fresh VM's root, and
this driver can check host keys itself (each instance's key is generated at create), so herder
never needs the instance secret the init command plants.
"""

from __future__ import annotations

import getpass
import itertools
import os
import shutil
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

from herder.cloud import (
    CloudError,
    Driver,
    DriverContext,
    DriverParameters,
    HostKey,
    HostKeyMismatch,
    Instance,
    InstanceSet,
    QuotaError,
    RemoteRunner,
)
from herder.model import InstanceType
from herder.ssh.server import ExecRequest, Handler, LocalSSHServer, generate_key, run_shell
from pydantic import Field


class ExampleParameters(DriverParameters):
    """``cloud.driver_parameters`` of the example driver.  Every key is optional."""

    account: str = Field("default", description="instance sets with one account share a cloud")
    max_instances: int = Field(8, ge=1, description="more instances than this: QuotaError")
    bind: str = Field("127.0.0.1", description="address the instances' SSH servers listen on")


# --------------------------------------------------------------------------- the "provider"


@dataclass
class _VM:
    """One instance as the provider knows it."""

    id: str
    provider_type: str
    tags: dict[str, str]
    server: LocalSSHServer
    host_key: HostKey
    workdir: str
    remote_user: str
    #: What a real cloud would run at first boot and authorize: kept, so that tests can check
    #: create passes them on (this provider boots no real VM).
    init_command: str = ""
    authorized_keys: list[str] = field(default_factory=list)


@dataclass
class ExampleCloud:
    """The provider's side: every instance of one account.  All fields guarded by ``lock``."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    vms: dict[str, _VM] = field(default_factory=dict)
    #: The provider numbers instances once per account and never reuses a number, as herder
    #: needs (an id names one instance only); a counter per instance set would not do.
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))


_ACCOUNTS: dict[str, ExampleCloud] = {}
_ACCOUNTS_LOCK = threading.Lock()


def cloud_for(account: str) -> ExampleCloud:
    """The cloud of ``account``, made on first use (like logging in to a real provider)."""
    with _ACCOUNTS_LOCK:
        return _ACCOUNTS.setdefault(account, ExampleCloud())


def _handler(workdir: str) -> Handler:
    """Run commands like a login shell on a VM, with the runner agent's state in ``workdir``."""

    def handle(request: ExecRequest) -> int:
        base = request.env or dict(os.environ)
        request.env = {**base, "HERDER_RUNNER_DIR": workdir, "HERDER_RUNNER_LOG_DIR": workdir}
        return run_shell(request)

    return handle


# --------------------------------------------------------------------------- herder's interface


class ExampleInstance(Instance):
    """A snapshot of one instance: tags as of the call that returned it."""

    def __init__(self, instance_set: ExampleInstanceSet, vm: _VM) -> None:
        self._set = instance_set
        self._id = vm.id
        self._provider_type = vm.provider_type
        self._tags = dict(vm.tags)
        self._address = vm.server.address
        self._remote_user = vm.remote_user
        self._host_key = vm.host_key

    @property
    def id(self) -> str:
        return self._id

    @property
    def provider_type(self) -> str:
        return self._provider_type

    @property
    def address(self) -> str:
        return self._address

    @property
    def remote_user(self) -> str:
        return self._remote_user

    @property
    def tags(self) -> dict[str, str]:
        return dict(self._tags)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._set.set_tags(self._id, tags)

    def destroy(self) -> None:
        self._set.destroy(self._id)

    def verify_host_key(self, key: HostKey, remote: RemoteRunner) -> None:
        """Accept only the key generated for this instance at create."""
        if key != self._host_key:
            raise HostKeyMismatch(f"{self._id} presented a host key that is not its own")


class ExampleInstanceSet(InstanceSet):
    """One herder installation's view of an account."""

    def __init__(self, params: ExampleParameters, context: DriverContext) -> None:
        self._params = params
        self._cloud = cloud_for(params.account)
        self._log = context.logger

    def create(
        self,
        instance_type: InstanceType,
        image_id: str,
        tags: Mapping[str, str],
        init_command: str,
        public_key: str | None,
    ) -> Instance:
        if not public_key:
            raise CloudError("the example driver needs herder's public key to let it log in")
        with self._cloud.lock:
            if len(self._cloud.vms) >= self._params.max_instances:
                # A typed error: herder stops creating until an instance goes away.
                raise QuotaError(
                    f"account {self._params.account!r} has "
                    f"{self._params.max_instances} instances already"
                )
            instance_id = f"ex-{next(self._cloud.ids)}"
        key, _ = generate_key()  # slow work (key, server start) happens outside the lock
        workdir = tempfile.mkdtemp(prefix=f"herder-example-{instance_id}-")
        server = LocalSSHServer(
            key, [public_key], _handler(workdir), bind=self._params.bind, strip_sudo=True
        )
        server.start()
        vm = _VM(
            instance_id,
            instance_type.provider_type,
            dict(tags),
            server,
            HostKey(key.get_name(), key.asbytes()),
            workdir,
            getpass.getuser(),
            init_command=init_command,
            authorized_keys=[public_key],
        )
        with self._cloud.lock:
            self._cloud.vms[instance_id] = vm
            snapshot = ExampleInstance(self, vm)
        self._log.info("example instance %s created at %s", instance_id, server.address)
        return snapshot

    def instances(self, tags: Mapping[str, str]) -> list[Instance]:
        """Every instance of the account that has all ``tags`` (herder filters again)."""
        with self._cloud.lock:
            return [
                ExampleInstance(self, vm)
                for vm in self._cloud.vms.values()
                if all(vm.tags.get(k) == v for k, v in tags.items())
            ]

    def set_tags(self, instance_id: str, tags: Mapping[str, str]) -> None:
        with self._cloud.lock:
            vm = self._cloud.vms.get(instance_id)
            if vm is None:
                raise CloudError(f"instance {instance_id} does not exist")
            vm.tags = dict(tags)

    def destroy(self, instance_id: str) -> None:
        """Terminate; an instance that is already gone is not an error."""
        with self._cloud.lock:
            vm = self._cloud.vms.pop(instance_id, None)
        if vm is None:
            return
        vm.server.stop()
        shutil.rmtree(vm.workdir, ignore_errors=True)

    def stop(self) -> None:
        """Nothing to release: instances outlive the instance set, as in a real cloud."""


class ExampleDriver(Driver):
    """The ``example`` driver.

    Capabilities (they decide which conformance tests run): ``quota_errors``
    (``max_instances``) and ``host_key_verification`` (keys are known from create).
    """

    parameters_model = ExampleParameters
    capabilities = frozenset({"quota_errors", "host_key_verification"})

    def instance_set(self, params: DriverParameters, context: DriverContext) -> InstanceSet:
        assert isinstance(params, ExampleParameters)
        return ExampleInstanceSet(params, context)

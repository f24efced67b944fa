"""Test doubles for the worker pool: a fake cloud, fake hosts and an executor that plays the
runner agent's command-line protocol (herder.agent.protocol) against a fake host's state."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from herder.config import Config
from herder.engine.worker.interfaces import ContainerReporter
from herder.engine.worker.pool import Pool
from herder.model import Container, ContainerSpec, ContainerState, InstanceType
from herder.plugin.cloud import (
    HostKey,
    Instance,
    InstancePrice,
    InstanceSet,
    NotImplementedByDriver,
    RemoteRunner,
)
from herder.plugin.executor import ExecResult, Executor, ExecutorError, HostKeyError, NoAddressError
from herder.runtime import VirtualRuntime

CLUSTER = "zzzzz"


def uuid(n: int, cluster: str = CLUSTER) -> str:
    return f"{cluster}-dz642-{n:015d}"


def container(n: int, created_at: float = 0.0) -> Container:
    return Container(
        uuid=uuid(n),
        state=ContainerState.LOCKED,
        priority=1,
        spec=ContainerSpec(command=("true",)),
        created_at=created_at,
    )


# --------------------------------------------------------------------------- hosts


@dataclass
class FakeHost:
    """What is on one VM: the runner program, containers, and knobs for failures."""

    boot_ok: bool = True
    boot_error: Exception | None = None  # raised by the boot probe command
    installed: dict[str, bytes] = field(default_factory=dict)
    # uuid -> "running" | "stale" | ("exited", code)
    containers: dict[str, Any] = field(default_factory=dict)
    logs: dict[str, bytes] = field(default_factory=dict)
    broken: bool = False
    extra_list_lines: list[str] = field(default_factory=list)
    list_fails: bool = False
    detach_fails: bool = False
    kill_works: bool = True
    log_fails: bool = False
    forget_fails: bool = False
    secret_file: str | None = None
    commands: list[tuple[str, bytes | None]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    hook: Any = None  # called with the command kind before each command
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def verbs(self) -> list[str]:
        """The runner verbs / command kinds run so far, in order."""
        return [classify(c) for c, _ in self.commands]

    def list_output(self) -> str:
        lines = []
        if self.broken:
            lines.append("broken")
        for u, st in sorted(self.containers.items()):
            if st == "running":
                lines.append(u)
            elif st == "stale":
                lines.append(f"{u} stale")
            elif st[0] == "failed":
                lines.append(f"{u} failed {st[1]} {st[2]}")
            else:
                lines.append(f"{u} exited {st[1]}")
        lines.extend(self.extra_list_lines)
        return "".join(line + "\n" for line in lines)


def dstfile(command: str) -> str:
    """The runner path in herder's md5 check or install snippet (``sudo sh -c '<script>'``)."""
    script = shlex.split(command)[-1]
    m = re.search(r"dstfile=([^;]+);", script)
    assert m is not None, command
    return shlex.split(m.group(1))[0]


def classify(command: str) -> str:
    if "dstfile=" in command:
        return "install" if 'cat >"$tmp"' in command else "md5sum"
    for verb in ("--list", "--detach", "--kill", "--log", "--forget"):
        if f" {verb}" in command:
            return verb
    if "herder-instance-secret" in command:
        return "secret"
    return "boot"


class FakeRemote(RemoteRunner):
    def __init__(self, host: FakeHost) -> None:
        self.host = host
        self.commands: list[str] = []

    def run(
        self, command: str, stdin: bytes = b"", timeout: float = 60.0
    ) -> tuple[int, bytes, bytes]:
        self.commands.append(command)
        if command.endswith("cat /var/run/herder-instance-secret"):
            if self.host.secret_file is None:
                return 1, b"", b"No such file"
            return 0, self.host.secret_file.encode(), b""
        return 127, b"", b"unknown command"


# --------------------------------------------------------------------------- cloud


@dataclass
class FakeVM:
    id: str
    provider_type: str
    tags: dict[str, str]
    host: FakeHost
    address: str = "10.0.0.1"
    remote_user: str = "admin"
    destroyed: bool = False
    destroy_calls: int = 0
    prices: list[InstancePrice] = field(default_factory=list)
    host_key_check: str = "unsupported"  # "unsupported" | "ok" | "bad"


class FakeInstance(Instance):
    """A snapshot of a FakeVM, as a driver returns it."""

    def __init__(self, cloud: FakeInstanceSet, vm: FakeVM) -> None:
        self._cloud = cloud
        self.vm = vm
        self._tags = dict(vm.tags)

    @property
    def id(self) -> str:
        return self.vm.id

    @property
    def provider_type(self) -> str:
        return self.vm.provider_type

    @property
    def address(self) -> str:
        return self.vm.address

    @property
    def remote_user(self) -> str:
        return self.vm.remote_user

    @property
    def tags(self) -> dict[str, str]:
        return dict(self._tags)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._cloud.calls.append(("set_tags", self.vm.id, self._cloud.runtime.now()))
        self.vm.tags = dict(tags)
        self._tags = dict(tags)

    def destroy(self) -> None:
        self._cloud.calls.append(("destroy", self.vm.id, self._cloud.runtime.now()))
        self.vm.destroy_calls += 1
        if self._cloud.destroy_fails:
            raise RuntimeError("destroy failed")
        if not self._cloud.sticky_destroy:
            self.vm.destroyed = True

    def verify_host_key(self, key: HostKey, remote: RemoteRunner) -> None:
        if self.vm.host_key_check == "ok":
            return
        if self.vm.host_key_check == "bad":
            raise ExecutorError("host key mismatch")
        raise NotImplementedByDriver()

    def price_history(self, instance_type: InstanceType) -> list[InstancePrice]:
        return list(self.vm.prices)


class FakeInstanceSet(InstanceSet):
    def __init__(self, runtime: VirtualRuntime) -> None:
        self.runtime = runtime
        self.vms: dict[str, FakeVM] = {}
        self.calls: list[tuple[str, str, float]] = []
        self.create_args: list[dict[str, Any]] = []
        self.create_errors: list[Exception] = []
        self.list_errors: list[Exception] = []
        self.destroy_fails = False
        self.sticky_destroy = False  # destroyed VMs stay listed
        self.new_host: Any = FakeHost
        self._n = 0

    def add_vm(self, tags: dict[str, str], provider_type: str = "p.small", **kw: Any) -> FakeVM:
        self._n += 1
        vm = FakeVM(
            id=f"i-{self._n:04d}",
            provider_type=provider_type,
            tags=dict(tags),
            host=self.new_host(),
            **kw,
        )
        self.vms[vm.id] = vm
        return vm

    def create(
        self,
        instance_type: InstanceType,
        image_id: str,
        tags: Mapping[str, str],
        init_command: str,
        public_key: str | None,
    ) -> Instance:
        self.calls.append(("create", instance_type.name, self.runtime.now()))
        self.create_args.append(
            dict(
                instance_type=instance_type,
                image_id=image_id,
                tags=dict(tags),
                init_command=init_command,
                public_key=public_key,
            )
        )
        if self.create_errors:
            raise self.create_errors.pop(0)
        vm = self.add_vm(dict(tags), provider_type=instance_type.provider_type)
        m = re.match(
            r'umask 0177 && echo -n "([0-9a-f]+)" >/var/run/herder-instance-secret\n', init_command
        )
        vm.host.secret_file = m.group(1) if m else None
        return FakeInstance(self, vm)

    def instances(self, tags: Mapping[str, str]) -> list[Instance]:
        self.calls.append(("list", "", self.runtime.now()))
        if self.list_errors:
            raise self.list_errors.pop(0)
        return [FakeInstance(self, vm) for vm in self.vms.values() if not vm.destroyed]

    def quota_group(self, instance_type: InstanceType) -> str:
        return (
            "group-"
            + instance_type.provider_type.split(".")[0]
            + ("-preemptible" if instance_type.preemptible else "")
        )

    def count(self, kind: str) -> int:
        return sum(1 for c in self.calls if c[0] == kind)

    def times(self, kind: str) -> list[float]:
        return [c[2] for c in self.calls if c[0] == kind]


# --------------------------------------------------------------------------- executor


class FakeExecutor(Executor):
    """Interprets runner-protocol commands against the FakeHost of its target's VM."""

    def __init__(self, cloud: FakeInstanceSet, target: Instance, verify: bool = False) -> None:
        self.cloud = cloud
        self.target = target
        self.verify = verify
        self.verified = False
        self.closed = 0
        self.timeouts: list[float | None] = []

    def _vm(self) -> FakeVM:
        return self.cloud.vms[self.target.id]

    def set_target(self, instance: Instance) -> None:
        self.target = instance

    def close(self) -> None:
        self.closed += 1

    def execute(
        self,
        command: str,
        stdin: bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        vm = self._vm()
        host = vm.host
        self.timeouts.append(timeout)
        if not vm.address:
            raise NoAddressError()
        if self.verify and not self.verified:
            try:
                self.target.verify_host_key(HostKey("ssh-ed25519", b"k"), FakeRemote(host))
            except Exception as exc:
                raise HostKeyError(str(exc)) from exc
            self.verified = True
        host.commands.append((command, stdin))
        host.times.append(self.cloud.runtime.now())
        kind = classify(command)
        if host.hook is not None:
            host.hook(kind)
        if kind == "boot":
            if host.boot_error is not None:
                raise host.boot_error
            return ExecResult(0 if host.boot_ok else 1, b"", b"" if host.boot_ok else b"booting")
        if kind == "md5sum":
            path = dstfile(command)
            if path not in host.installed:
                return ExecResult(1, b"", b"md5sum: no such file\n")
            digest = hashlib.md5(host.installed[path]).hexdigest()
            return ExecResult(0, f"{digest}  {path}\n".encode(), b"")
        if kind == "install":
            host.installed[dstfile(command)] = stdin or b""
            return ExecResult(0, b"", b"")
        args = shlex.split(command)
        if args[0] == "sudo":
            args = args[1:]
        if kind == "--list":
            if host.list_fails:
                return ExecResult(1, b"", b"list failed")
            if "--stdin-prices" in args:
                host.configs["prices"] = {"prices": json.loads(stdin or b"[]")}
            return ExecResult(0, host.list_output().encode(), b"")
        if kind == "--detach":
            if host.detach_fails:
                return ExecResult(1, b"", b"detach failed")
            u = args[-1]
            host.containers[u] = "running"
            host.configs[u] = json.loads(stdin or b"{}")
            return ExecResult(0, b"", b"")
        if kind == "--kill":
            if not host.kill_works:
                return ExecResult(1, b"", b"still alive")
            host.containers.pop(args[-1], None)
            return ExecResult(0, b"", b"")
        if kind == "--log":
            if host.log_fails:
                return ExecResult(1, b"", b"no log")
            return ExecResult(0, host.logs.get(args[-1], b""), b"")
        if kind == "--forget":
            if host.forget_fails:
                return ExecResult(1, b"", b"cannot forget")
            if isinstance(host.containers.get(args[-1]), tuple):
                del host.containers[args[-1]]
            return ExecResult(0, b"", b"")
        return ExecResult(127, b"", b"unknown command")


# --------------------------------------------------------------------------- reporter, harness


class RecordingReporter(ContainerReporter):
    def __init__(self) -> None:
        self.started: list[tuple[str, str, str]] = []
        self.exited: list[tuple[str, int, bytes]] = []
        self.failed: list[tuple[str, bool, str, str]] = []
        self.pulled: list[tuple[str, float]] = []
        self.logs: dict[str, bytes] = {}

    def container_pulled(self, uuid: str, seconds: float) -> None:
        self.pulled.append((uuid, seconds))

    def container_log(self, uuid: str, data: bytes) -> None:
        self.logs[uuid] = self.logs.get(uuid, b"") + data

    def container_started(self, uuid: str, instance_id: str, instance_type: str) -> None:
        self.started.append((uuid, instance_id, instance_type))

    def container_exited(self, uuid: str, exit_code: int, log: bytes) -> None:
        self.exited.append((uuid, exit_code, log))

    def container_failed(
        self, uuid: str, instance_side: bool, message: str, instance_id: str = ""
    ) -> None:
        self.failed.append((uuid, instance_side, message, instance_id))


def make_config(**cloud: Any) -> Config:
    base: dict[str, Any] = {
        "max_cloud_ops_per_second": 0,
        "max_concurrent_instance_create_ops": 0,
        "boot_probe_command": "systemctl is-system-running",
    }
    base.update(cloud)
    return Config.model_validate(
        {
            "cluster_id": CLUSTER,
            "cloud": base,
            "containers": {"runner_args": ["--foo", "--extra='args'"], "runtime_engine": "process"},
            "instance_types": {
                "small": {"provider_type": "p.small", "vcpus": 2, "ram": "4GiB", "price": 0.1},
                "big": {"provider_type": "p.big", "vcpus": 8, "ram": "16GiB", "price": 0.4},
                "small.spot": {
                    "provider_type": "p.small",
                    "vcpus": 2,
                    "ram": "4GiB",
                    "price": 0.05,
                    "preemptible": True,
                },
                "other": {"provider_type": "q.other", "vcpus": 2, "ram": "4GiB", "price": 0.1},
            },
        }
    )


RUNNER = b"#!/usr/bin/env python3\nprint('runner')\n"
SET_ID = "zzzzz-is000-000000000000001"


class Harness:
    """A pool over a fake cloud on a virtual clock."""

    def __init__(
        self,
        *,
        runtime: VirtualRuntime | None = None,
        cloud: FakeInstanceSet | None = None,
        runner_data: bytes | None = RUNNER,
        verify: bool = False,
        registry: CollectorRegistry | None = None,
        **cloud_config: Any,
    ) -> None:
        import random

        self.runtime = runtime or VirtualRuntime()
        self.cloud = cloud or FakeInstanceSet(self.runtime)
        self.config = make_config(**cloud_config)
        self.types = self.config.build_instance_types()
        self.reporter = RecordingReporter()
        self.registry = registry or CollectorRegistry()
        self.executors: dict[str, FakeExecutor] = {}
        self.notifications = 0

        def factory(instance: Instance) -> Executor:
            ex = FakeExecutor(self.cloud, instance, verify=verify)
            self.executors[instance.id] = ex
            return ex

        self.pool = Pool(
            runtime=self.runtime,
            instance_set=self.cloud,
            executor_factory=factory,
            config=self.config,
            instance_types=self.types,
            instance_set_id=SET_ID,
            reporter=self.reporter,
            runner_data=runner_data,
            public_key="ssh-ed25519 AAAA test",
            registry=self.registry,
            rng=random.Random(1),
        )
        self.pool.subscribe(self._notified)

    def _notified(self) -> None:
        self.notifications += 1

    def tags(
        self, type_name: str = "small", behavior: str = "run", secret: str = ""
    ) -> dict[str, str]:
        t = {
            "HerderInstanceSetID": SET_ID,
            "HerderInstanceType": type_name,
            "HerderIdleBehavior": behavior,
        }
        if secret:
            t["HerderInstanceSecret"] = secret
        return t

    def idle(self) -> None:
        self.runtime.run_until_idle()

    def sync(self) -> None:
        self.pool.sync_now()
        self.idle()

    def worker(self, instance_id: str) -> Any:
        return self.pool._workers[instance_id]

    def probe(self, instance_id: str) -> None:
        self.worker(instance_id).probe_and_update()
        self.idle()

    def state(self, instance_id: str) -> str:
        for v in self.pool.instances():
            if v.instance == instance_id:
                return v.worker_state.value
        return "gone"

    def create_booted(self, type_name: str = "small") -> str:
        """Create an instance through the pool and probe it until idle."""
        assert self.pool.create(self.types[type_name]) is not None
        self.idle()
        iid = max(self.pool._workers)
        self.probe(iid)
        assert self.state(iid) == "idle", self.state(iid)
        return iid

    def metric(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)

"""The ``libcloud`` driver: herder's instances as apache-libcloud nodes.

herder's instances, instance types, images and tags map onto libcloud's nodes, sizes, images
and (per provider) tags or metadata; :mod:`~herder_driver_libcloud.presets` says how for each
provider the bridge claims, and a provider without a preset works with generic behaviour and a
warning.

Thread safety: a libcloud driver object keeps per-request state on its connection (the action,
the request path, the signature's date), so two threads sharing one object can mix their
requests.  Each thread therefore gets its own driver object (built on first use from the same
parameters); a fake provider whose driver object *is* the cloud (libcloud's dummy) is shared
instead, behind one lock.

The init command and the public key travel as the node's first-boot script (user data): the
script, run as root, authorizes the key for the remote user and then runs herder's command.
Every provider with user data can do that, so no provider-specific key-pair handling is needed.
"""

from __future__ import annotations

import functools
import hashlib
import shlex
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from pydantic import Field, field_validator

from herder.cloud import (
    Capability,
    CloudError,
    Driver,
    DriverContext,
    DriverParameters,
    HostKey,
    HostKeyMismatch,
    Instance,
    InstanceSet,
    NotImplementedByDriver,
    RemoteRunner,
    SecretRef,
    create_key,
)
from herder.config import Duration
from herder.model import InstanceType
from herder_driver_libcloud.errors import classify, classify_fault
from herder_driver_libcloud.presets import Preset, TagStrategy, preset_for

T = TypeVar("T")

#: EC2 adds the node name as a tag of its own; it is not one of herder's.
_EC2_NAME_TAG = "Name"


class LibcloudParameters(DriverParameters):
    """``cloud.driver_parameters`` of the libcloud driver."""

    provider: str = Field(description="libcloud provider name (dummy, ec2, openstack, ...)")
    key: SecretRef | None = Field(
        None, description="first constructor argument (access key, user): {env: V} or {file: P}"
    )
    secret: SecretRef | None = Field(
        None, description="second constructor argument (secret key, password), by reference"
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="constructor keyword arguments (region, host, port, secure, ...); they "
        "override the preset's defaults",
    )
    secret_options: dict[str, SecretRef] = Field(
        default_factory=dict, description="constructor keyword arguments read by reference"
    )
    create_options: dict[str, Any] = Field(
        default_factory=dict,
        description="extra create_node keyword arguments (ex_securitygroup, ex_subnet, ...)",
    )
    remote_user: str = Field("root", description="user herder logs in as")
    address: str = Field("public", description="address to reach SSH on: public or private")
    name_prefix: str = Field("herder-", description="prefix of the node names the bridge picks")
    placement_timeout: Duration = Field(
        300.0,
        ge=0,
        description="how long create waits for the provider to place a node, for presets "
        "that report a failed placement (no capacity) only afterwards (openstack); 0: no wait",
    )
    poll_interval: Duration = Field(
        2.0, ge=0, description="how often a node is read while create waits for its placement"
    )

    @field_validator("provider")
    @classmethod
    def _known_provider(cls, value: str) -> str:
        from libcloud.compute.providers import DRIVERS

        if value not in DRIVERS:
            known = ", ".join(sorted(str(k) for k in DRIVERS))
            raise ValueError(f"unknown libcloud provider {value!r} (known: {known})")
        return value

    @field_validator("address")
    @classmethod
    def _address_kind(cls, value: str) -> str:
        if value not in ("public", "private"):
            raise ValueError("address must be public or private")
        return value


def first_boot_script(init_command: str, public_key: str | None, user: str) -> str:
    """The user data: authorize ``public_key`` for ``user``, then run herder's init command."""
    lines = ["#!/bin/sh"]
    if public_key:
        home = "/root" if user == "root" else f"/home/{user}"
        ssh_dir = shlex.quote(f"{home}/.ssh")
        keys = shlex.quote(f"{home}/.ssh/authorized_keys")
        lines += [
            f"mkdir -p {ssh_dir} && chmod 700 {ssh_dir}",
            f"echo {shlex.quote(public_key.strip())} >>{keys} && chmod 600 {keys}",
            f"chown -R {shlex.quote(user)} {ssh_dir} 2>/dev/null || true",
        ]
    lines.append(init_command)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- driver objects

_PROCESS_WIDE: dict[tuple[str, str], tuple[Any, threading.Lock]] = {}
_PROCESS_WIDE_LOCK = threading.Lock()


class _Connections:
    """libcloud driver objects for one instance set: one per thread, or one shared fake."""

    def __init__(self, factory: Callable[[], Any], preset: Preset, shared_key: str) -> None:
        self._factory = factory
        self._preset = preset
        self._local = threading.local()
        self._shared: tuple[Any, threading.Lock] | None = None
        if preset.process_wide:
            with _PROCESS_WIDE_LOCK:
                key = (preset.provider, shared_key)
                if key not in _PROCESS_WIDE:
                    _PROCESS_WIDE[key] = (factory(), threading.Lock())
                self._shared = _PROCESS_WIDE[key]

    def call(self, action: Callable[[Any], T]) -> T:
        """Run ``action(driver)`` with a driver object no other thread is using."""
        if self._shared is not None:
            driver, lock = self._shared
            with lock:
                return action(driver)
        driver = getattr(self._local, "driver", None)
        if driver is None:
            driver = self._local.driver = self._factory()
        return action(driver)


# --------------------------------------------------------------------------- instances


class LibcloudInstance(Instance):
    """A snapshot of one libcloud node."""

    def __init__(self, owner: LibcloudInstanceSet, node: Any) -> None:
        self._owner = owner
        self.node = node
        self._tags = owner.read_tags(node)

    @property
    def id(self) -> str:
        return self._owner.node_id(self.node)

    @property
    def provider_type(self) -> str:
        extra = self.node.extra or {}
        for key in ("herder_provider_type", "instance_type", "flavorId"):
            if extra.get(key):
                return str(extra[key])
        size = getattr(self.node, "size", None)
        return str(size.id) if size is not None else ""

    @property
    def address(self) -> str:
        public = list(self.node.public_ips or [])
        private = list(self.node.private_ips or [])
        order = public + private if self._owner.params.address == "public" else private + public
        return str(order[0]) if order else ""

    @property
    def remote_user(self) -> str:
        return self._owner.params.remote_user

    @property
    def tags(self) -> dict[str, str]:
        return dict(self._tags)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._owner.set_tags(self, dict(tags))
        self._tags = dict(tags)

    def destroy(self) -> None:
        self._owner.destroy(self)

    def verify_host_key(self, key: HostKey, remote: RemoteRunner) -> None:
        """A fake node backed by a local SSH server knows its key; others cannot check."""
        genuine = (self.node.extra or {}).get("herder_host_key")
        if genuine is None:
            raise NotImplementedByDriver()
        if key != genuine:
            raise HostKeyMismatch(f"{self.id} presented a host key that is not its own")


class LibcloudInstanceSet(InstanceSet):
    """One herder installation's nodes in one libcloud provider account."""

    def __init__(
        self,
        params: LibcloudParameters,
        context: DriverContext,
        factory: Callable[[], Any] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.params = params
        self.context = context
        self._clock = clock
        self._sleep = sleep
        self.preset = preset_for(params.provider)
        shared_key = str(params.key) if params.key is not None else ""  # the account
        self._connections = _Connections(factory or self._new_driver, self.preset, shared_key)
        self._sizes: dict[str, Any] = {}
        self._sizes_lock = threading.Lock()
        if not self.preset.tested:
            context.logger.warning(
                "libcloud provider %r has no tested preset: tags are kept as server metadata "
                "(untested), provider errors are not classified (quota, capacity and rate "
                "limits count as ordinary failures), node ids are assumed unique, and no "
                "spot, GPU types or idempotent creates are offered",
                params.provider,
            )

    # ----------------------------------------------------------------- plumbing

    def _new_driver(self) -> Any:
        from libcloud.compute.providers import get_driver

        p = self.params
        args = [ref.read() for ref in (p.key, p.secret) if ref is not None]
        if self.preset.process_wide and not args:
            args = ["0"]
        options = {**self.preset.default_options, **p.options}
        options.update({name: ref.read() for name, ref in p.secret_options.items()})
        return get_driver(p.provider)(*args, **options)

    def _call(self, what: str, action: Callable[[Any], T]) -> T:
        """Run a libcloud call; the provider's typed errors become herder's."""
        try:
            return self._connections.call(action)
        except CloudError:
            raise
        except Exception as exc:
            typed = classify(exc, self.preset.errors)
            if typed is not None:
                raise typed from exc
            raise CloudError(
                f"libcloud {self.params.provider} {what}: {type(exc).__name__}: {exc}"
            ) from exc

    def _tag(self, name: str) -> str:
        return self.context.tag_key_prefix + name

    def node_id(self, node: Any) -> str:
        extra = node.extra or {}
        if not self.preset.unique_ids and extra.get("herder_id"):
            return str(extra["herder_id"])
        return str(node.id)

    def read_tags(self, node: Any) -> dict[str, str]:
        extra = node.extra or {}
        strategy = self.preset.tags
        if strategy is TagStrategy.FAKE_NODE:
            raw = extra.get("herder_tags") or {}
        elif strategy is TagStrategy.EC2_TAGS:
            raw = {k: v for k, v in (extra.get("tags") or {}).items() if k != _EC2_NAME_TAG}
        else:
            raw = extra.get("metadata") or {}
        return {str(k): str(v) for k, v in raw.items()}

    def _gone(self, node: Any) -> bool:
        from libcloud.compute.types import NodeState

        status = (node.extra or {}).get("status")
        return node.state == NodeState.TERMINATED or status in ("shutting-down", "terminated")

    def _size(self, driver: Any, provider_type: str) -> Any:
        with self._sizes_lock:
            if not self._sizes:
                self._sizes = {str(s.id): s for s in driver.list_sizes()}
            found = self._sizes.get(provider_type)
        if found is None:
            raise CloudError(f"libcloud {self.params.provider}: no size {provider_type!r}")
        return found

    # ----------------------------------------------------------------- InstanceSet

    def create(
        self,
        instance_type: InstanceType,
        image_id: str,
        tags: Mapping[str, str],
        init_command: str,
        public_key: str | None,
    ) -> Instance:
        key = create_key(tags, self.context.tag_key_prefix)
        token_keyword = self.preset.client_token_keyword
        if (
            key is not None
            and token_keyword is None
            and Capability.IDEMPOTENT_CREATE in self.preset.capabilities
        ):
            # No token the provider honours: look for the node the first create made.
            for existing in self.instances({self._tag("InstanceSecret"): key}):
                return existing
        if not image_id and not self.preset.process_wide:
            raise CloudError("no image: set cloud.image_id")
        if instance_type.preemptible and self.preset.spot_keyword is None:
            # herder's config check refuses such types already (the preset does not declare
            # spot); an on-demand node must never be made in their place.
            raise CloudError(
                f"libcloud {self.params.provider}: the bridge cannot create "
                f"preemptible (spot) nodes for this provider"
            )
        tags = dict(tags)
        name = f"{self.params.name_prefix}{uuid.uuid4().hex[:12]}"
        script = first_boot_script(init_command, public_key, self.params.remote_user)

        def run(driver: Any) -> Any:
            from libcloud.compute.base import NodeImage

            size = self._size(driver, instance_type.provider_type)
            kwargs: dict[str, Any] = dict(self.params.create_options)
            if self.preset.user_data_keyword:
                kwargs[self.preset.user_data_keyword] = script
            if self.preset.tags is not TagStrategy.FAKE_NODE:
                kwargs["ex_metadata"] = tags
            if key is not None and token_keyword:
                # A hash: the key doubles as the instance secret, and EC2 takes 64 characters.
                kwargs[token_keyword] = hashlib.sha256(key.encode()).hexdigest()
            if instance_type.preemptible and self.preset.spot_keyword:
                kwargs[self.preset.spot_keyword] = True
                if instance_type.price > 0 and self.preset.spot_price_keyword:
                    kwargs[self.preset.spot_price_keyword] = instance_type.price
            if self.preset.process_wide:  # libcloud's dummy takes no extra arguments
                node = driver.create_node(name, size, NodeImage(image_id, "", driver))
                node.extra = {
                    **(node.extra or {}),
                    "herder_id": f"{self.params.provider}-{uuid.uuid4().hex[:16]}",
                    "herder_tags": tags,
                    "herder_provider_type": instance_type.provider_type,
                    "herder_user_data": script,
                }
                if self.preset.local_ssh:
                    _start_local_vm(node, public_key)
                return node
            return driver.create_node(
                name=name, size=size, image=NodeImage(image_id, "", driver), **kwargs
            )

        node = self._call("create_node", run)
        if self.preset.awaits_placement:
            node = self._await_placement(node)
        instance = LibcloudInstance(self, node)
        if self.preset.tags is TagStrategy.EC2_TAGS and not instance.tags:
            instance._tags = tags  # some EC2 replies omit tags given at create
        return instance

    def _await_placement(self, node: Any) -> Any:
        """Wait until the provider has placed ``node`` (left scheduling), and return it as last
        read.  A node it put in ERROR instead is destroyed, and its fault raised as herder's
        error (OpenStack's "No valid host was found" is a capacity error for the type), so no
        broken node is left for herder to wait on.  After ``placement_timeout`` the node is
        returned as it is: herder's boot timeout deals with it."""
        from libcloud.compute.types import NodeState

        deadline = self._clock() + self.params.placement_timeout
        while True:
            extra = node.extra or {}
            if node.state == NodeState.ERROR or extra.get("vm_state") == "error":
                failure = classify_fault(extra.get("fault"), self.preset.errors)
                self.context.logger.info(
                    "libcloud %s: node %s went to ERROR after its create (%s); destroying it",
                    self.params.provider,
                    node.id,
                    failure,
                )
                self._destroy_quietly(node)
                raise failure
            scheduling = extra.get("task_state") in (None, "scheduling")
            if node.state != NodeState.PENDING or not scheduling:
                return node
            if self._clock() >= deadline:
                self.context.logger.info(
                    "libcloud %s: node %s not placed after %gs; herder's boot timeout applies",
                    self.params.provider,
                    node.id,
                    self.params.placement_timeout,
                )
                return node
            self._sleep(self.params.poll_interval)
            wanted = node.id
            read = self._call("read node", functools.partial(_node_details, node_id=wanted))
            if read is None:
                raise CloudError(
                    f"libcloud {self.params.provider}: node {wanted} disappeared "
                    "while it was being placed"
                )
            node = read

    def _destroy_quietly(self, node: Any) -> None:
        try:
            self._call("destroy_node", lambda d: d.destroy_node(node))
        except CloudError as exc:
            self.context.logger.warning(
                "libcloud %s: cannot destroy node %s that went to ERROR (herder will, once "
                "it lists it): %s",
                self.params.provider,
                node.id,
                exc,
            )

    def instances(self, tags: Mapping[str, str]) -> list[Instance]:
        nodes = self._call("list_nodes", lambda driver: list(driver.list_nodes()))
        out: list[Instance] = []
        for node in nodes:
            if self._gone(node):
                continue
            instance = LibcloudInstance(self, node)
            if all(instance.tags.get(k) == v for k, v in tags.items()):
                out.append(instance)
        return out

    def set_tags(self, instance: LibcloudInstance, tags: dict[str, str]) -> None:
        node, strategy = instance.node, self.preset.tags
        if strategy is TagStrategy.FAKE_NODE:
            self._call("set tags", lambda _driver: node.extra.__setitem__("herder_tags", tags))
        elif strategy is TagStrategy.EC2_TAGS:
            old = instance.tags
            removed = [k for k in old if k not in tags]
            self._call("CreateTags", lambda d: _ec2_tags(d, "CreateTags", node.id, tags))
            if removed:
                self._call(
                    "DeleteTags",
                    lambda d: _ec2_tags(d, "DeleteTags", node.id, dict.fromkeys(removed)),
                )
        else:
            self._call("ex_set_metadata", lambda d: d.ex_set_metadata(node, tags))

    def destroy(self, instance: LibcloudInstance) -> None:
        """Terminate; a node that is already gone (or going) is not an error."""
        wanted = instance.id

        def run(driver: Any) -> None:
            for node in list(driver.list_nodes()):
                if self.node_id(node) == wanted and not self._gone(node):
                    driver.destroy_node(node)
                    _stop_local_vm(node)

        self._call("destroy_node", run)

    def stop(self) -> None:
        """Nothing to release: driver objects hold no background threads."""


def _node_details(driver: Any, node_id: str) -> Any:
    """The node as the provider describes it now (None when it no longer exists)."""
    return driver.ex_get_node_details(node_id)


def _start_local_vm(node: Any, public_key: str | None) -> None:
    """Back a fake node with an SSH server on 127.0.0.1 that runs commands with ``sh -c`` as
    herder's user, the runner agent's state in a private directory: a "VM" herder can use."""
    import os
    import tempfile

    from herder.ssh.server import ExecRequest, LocalSSHServer, generate_key, run_shell

    host_key, _ = generate_key()
    workdir = tempfile.mkdtemp(prefix="herder-libcloud-dummy-")

    def handle(request: ExecRequest) -> int:
        base = request.env or dict(os.environ)
        request.env = {**base, "HERDER_RUNNER_DIR": workdir, "HERDER_RUNNER_LOG_DIR": workdir}
        return run_shell(request)

    server = LocalSSHServer(host_key, [public_key] if public_key else [], handle, strip_sudo=True)
    server.start()
    node.public_ips = [server.address]
    node.extra["herder_server"] = server
    node.extra["herder_workdir"] = workdir
    node.extra["herder_host_key"] = HostKey(host_key.get_name(), host_key.asbytes())


def _stop_local_vm(node: Any) -> None:
    import shutil

    server = (node.extra or {}).pop("herder_server", None)
    if server is not None:
        server.stop()
        shutil.rmtree(node.extra.get("herder_workdir", ""), ignore_errors=True)


def _ec2_tags(driver: Any, action: str, resource_id: str, tags: Mapping[str, str | None]) -> None:
    """CreateTags / DeleteTags with 1-based indices, as the EC2 query API documents them
    (libcloud's own ``ex_create_tags`` counts from 0, which emulators refuse)."""
    params: dict[str, str] = {"Action": action, "ResourceId.1": resource_id}
    for i, (key, value) in enumerate(tags.items(), start=1):
        params[f"Tag.{i}.Key"] = key
        if value is not None:
            params[f"Tag.{i}.Value"] = value
    driver.connection.request(driver.path, params=params)


class LibcloudDriver(Driver):
    """The ``libcloud`` driver.  Capabilities depend on the provider's preset
    (:meth:`capabilities_for`)."""

    parameters_model = LibcloudParameters

    def capabilities_for(self, params: DriverParameters) -> frozenset[Capability]:
        assert isinstance(params, LibcloudParameters)
        return preset_for(params.provider).capabilities

    def instance_set(self, params: DriverParameters, context: DriverContext) -> InstanceSet:
        assert isinstance(params, LibcloudParameters)
        return LibcloudInstanceSet(params, context)

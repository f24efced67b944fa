"""What a driver package hands the conformance suite, and the harness the checks run with.

A driver's tests provide a ``conformance_target`` fixture returning a :class:`ConformanceTarget`:
the driver, its parameters, instance types it may create, and what it can do.  The suite builds
instance sets from it through a :class:`ConformanceHarness`, which remembers every instance it
created and every instance set it built, and cleans them all up after each test, whatever
happened, so that a failing run against a real cloud account leaves nothing behind.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from herder import defaults
from herder.model import InstanceType
from herder.plugin.cloud import (
    Capability,
    Driver,
    DriverContext,
    DriverParameters,
    Instance,
    InstanceSet,
    parse_capabilities,
)
from herder.testing.conformance.rules import fail

log = logging.getLogger("herder.testing.conformance")

#: A hook that makes the driver raise one kind of typed error (see :class:`ConformanceTarget`).
Provoke = Callable[["ConformanceHarness"], object]
#: Builds an instance set for an instance-set id (see :class:`ConformanceTarget`).
InstanceSetFactory = Callable[[DriverContext], InstanceSet]


@dataclass(frozen=True)
class BootRecord:
    """What a (fake) cloud was told to do when it boots an instance, read back from the cloud.

    ``init_command``: the first-boot script the instance will run, decoded (the suite looks for
    the command it passed inside it, so wrapping it in a larger script is fine).
    ``public_keys``: the OpenSSH public keys that may log in as the instance's remote user.
    """

    init_command: str
    public_keys: Sequence[str] = ()


#: Reads an instance's :class:`BootRecord` from the cloud or its fake (see ConformanceTarget).
BootRecordHook = Callable[["ConformanceHarness", Instance], BootRecord]


@dataclass
class ConformanceTarget:
    """The driver under test and how to exercise it.

    ``params``: the driver parameters (a mapping as in ``cloud.driver_parameters``, or an
    already validated model).  ``instance_types``: at least one type the account may create;
    the first is used unless a test needs another (a preemptible one for ``spot``, one with
    GPUs for ``gpu``).  ``capabilities``: defaults to the driver's own declaration; tests of
    undeclared capabilities are skipped.

    ``listing_delay``: the longest time, in seconds, a listing may lag behind a create, a
    set_tags or a destroy (eventually consistent cloud APIs); the suite polls every
    ``poll_interval`` until then.  ``boot_timeout``: how long a new instance may take to run
    commands.  ``max_instances``: how many instances the suite may have at once (the thread
    safety check creates this many concurrently).

    ``private_key_path``: the SSH key herder would use; when given (or when the driver supplies
    its own executor factory) the suite runs commands on a booted instance.  ``ssh_port``: the
    port used for addresses without one.

    ``instance_set_factory``: how to build an instance set for a context, when
    ``driver.instance_set(params, context)`` is not right (for example when each instance set
    needs its own local state directory).

    ``provoke_quota_error`` / ``provoke_capacity_error`` / ``provoke_rate_limit_error``: hooks
    that make the driver raise that error, given the harness (so what they create is cleaned
    up: use :meth:`ConformanceHarness.create` and :meth:`ConformanceHarness.instance_set`).

    ``boot_record``: for a fake cloud whose instances never really boot, a hook returning what
    the cloud was told to run and authorize at boot (:class:`BootRecord`); the suite then checks
    that ``create`` passed on the init command and the public key.  Without it the suite checks
    them by logging in to a booted instance (``private_key_path``).

    ``strict``: fail, instead of skipping, the checks the suite cannot make with what the target
    gives (init command and public key unverifiable, a declared capability without its
    provoke hook).  Use it in a driver's own CI: a skipped check proves nothing.
    """

    driver: Driver
    instance_types: Sequence[InstanceType]
    params: Mapping[str, Any] | DriverParameters = field(default_factory=dict)
    image_id: str = ""
    capabilities: frozenset[str] | None = None
    listing_delay: float = 0.0
    poll_interval: float = 0.1
    boot_timeout: float = 120.0
    max_instances: int = 4
    private_key_path: str | None = None
    ssh_port: int = 22
    tag_key_prefix: str = defaults.TAG_KEY_PREFIX
    instance_set_factory: InstanceSetFactory | None = None
    provoke_quota_error: Provoke | None = None
    provoke_capacity_error: Provoke | None = None
    provoke_rate_limit_error: Provoke | None = None
    boot_record: BootRecordHook | None = None
    strict: bool = False

    def __post_init__(self) -> None:
        if not self.instance_types:
            raise ValueError("ConformanceTarget needs at least one instance type")
        if self.max_instances < 2:
            raise ValueError("ConformanceTarget.max_instances must be at least 2")
        if self.capabilities is not None:
            parse_capabilities(self.capabilities)  # a misspelt one fails here, loudly

    @property
    def declared(self) -> frozenset[Capability]:
        """The capabilities in effect: the target's own list, else what the driver declares
        for these parameters (:meth:`Driver.capabilities_for`).  ValueError for unknown ones."""
        if self.capabilities is not None:
            return parse_capabilities(self.capabilities)
        return parse_capabilities(self.driver.capabilities_for(self.validated_params()))

    def validated_params(self) -> DriverParameters:
        if isinstance(self.params, DriverParameters):
            return self.params
        return type(self.driver).validate_parameters(self.params)

    def instance_type(
        self, *, preemptible: bool | None = None, gpu: bool | None = None
    ) -> InstanceType | None:
        """The first type with the wanted properties, or None."""
        for it in self.instance_types:
            if preemptible is not None and it.preemptible != preemptible:
                continue
            if gpu is not None and (it.gpu.device_count > 0) != gpu:
                continue
            return it
        return None


def new_instance_set_id() -> str:
    """A fresh id shaped like herder's own (``xxxxx-xxxxx-<15 chars>``), unique per test."""
    return f"cnfrm-is000-{secrets.token_hex(8)[:15]}"


class ConformanceHarness:
    """Builds instance sets and instances for one test, and removes them all afterwards.

    Thread-safe, so the thread-safety check can create through it from several threads.
    """

    def __init__(self, target: ConformanceTarget) -> None:
        self.target = target
        self.instance_set_id = new_instance_set_id()
        self._lock = threading.Lock()
        self._sets: dict[str, InstanceSet] = {}
        self._extra_sets: list[InstanceSet] = []
        self._created: list[Instance] = []
        self._public_key: str | None = None

    # ----------------------------------------------------------------- building

    def tag(self, name: str) -> str:
        return self.target.tag_key_prefix + name

    def owner_tags(self, instance_set_id: str | None = None) -> dict[str, str]:
        """The tag herder filters its listings by: ``<prefix>InstanceSetID``."""
        return {self.tag("InstanceSetID"): instance_set_id or self.instance_set_id}

    def context(self, instance_set_id: str | None = None) -> DriverContext:
        return DriverContext(
            instance_set_id=instance_set_id or self.instance_set_id,
            logger=logging.getLogger("herder.driver.conformance"),
            tag_key_prefix=self.target.tag_key_prefix,
        )

    def instance_set(
        self,
        instance_set_id: str | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> InstanceSet:
        """The instance set for ``instance_set_id`` (default: this test's), built once.

        ``params`` overrides some driver parameters and always builds a new set (for the
        provoke hooks: a set with a quota of zero, say).
        """
        set_id = instance_set_id or self.instance_set_id
        if params is not None:
            base = self.target.validated_params().model_dump()
            merged = type(self.target.driver).validate_parameters({**base, **params})
            built = self.target.driver.instance_set(merged, self.context(set_id))
            with self._lock:
                self._extra_sets.append(built)
            return built
        with self._lock:
            existing = self._sets.get(set_id)
        if existing is not None:
            return existing
        factory = self.target.instance_set_factory
        context = self.context(set_id)
        if factory is not None:
            built = factory(context)
        else:
            built = self.target.driver.instance_set(self.target.validated_params(), context)
        with self._lock:
            self._sets[set_id] = built
        return built

    def restart_instance_set(self, instance_set_id: str | None = None) -> InstanceSet:
        """Stop the instance set for ``instance_set_id`` and build a new one from the same
        parameters, as a restarted herder (another process) would; later
        :meth:`instance_set` calls return the new one.

        The new set shares nothing in memory with the old one, so what it lists is what the
        cloud itself stores.
        """
        set_id = instance_set_id or self.instance_set_id
        with self._lock:
            old = self._sets.pop(set_id, None)
        if old is not None:
            old.stop()
        return self.instance_set(set_id)

    def create(
        self,
        instance_set: InstanceSet | None = None,
        tags: Mapping[str, str] | None = None,
        instance_type: InstanceType | None = None,
        init_command: str = "",
        public_key: str | None = None,
    ) -> Instance:
        """Create an instance (owner tag plus ``tags``) and remember it for clean-up.

        ``public_key`` defaults to the public half of the target's private key, as herder
        passes its own on every create (``cloud.deploy_public_key``).
        """
        iset = instance_set or self.instance_set()
        if public_key is None:
            public_key = self.public_key
        it = instance_type or self.target.instance_types[0]
        all_tags = {**self.owner_tags(), **dict(tags or {})}
        instance = iset.create(it, self.target.image_id, all_tags, init_command, public_key)
        with self._lock:
            self._created.append(instance)
        return instance

    @property
    def public_key(self) -> str | None:
        """The OpenSSH public key of ``target.private_key_path``, or None without one."""
        path = self.target.private_key_path
        if not path:
            return None
        if self._public_key is None:
            from herder.engine.cloud_engine import public_key_from_private

            self._public_key = public_key_from_private(path)
        return self._public_key

    # ----------------------------------------------------------------- waiting

    def poll(
        self,
        instance_set: InstanceSet,
        tags: Mapping[str, str],
        done: Callable[[list[Instance]], bool],
        timeout: float | None = None,
    ) -> tuple[bool, list[Instance]]:
        """List with ``tags`` until ``done(listing)`` or the listing delay runs out.

        Always lists at least once, and once more at the deadline, so a zero delay still
        means "the first listing must be right".
        """
        limit = self.target.listing_delay if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            listing = instance_set.instances(tags)
            if done(listing):
                return True, listing
            if time.monotonic() >= deadline:
                return False, listing
            time.sleep(min(self.target.poll_interval, max(0.0, deadline - time.monotonic())))

    def wait_listed(
        self, instance_set: InstanceSet, tags: Mapping[str, str], ids: Iterable[str], rule: str
    ) -> list[Instance]:
        """The listing once it has every one of ``ids``; fail naming ``rule`` if it never does."""
        wanted = set(ids)
        ok, listing = self.poll(instance_set, tags, lambda got: wanted <= {i.id for i in got})
        if not ok:
            missing = sorted(wanted - {i.id for i in listing})
            raise fail(
                f"instances({dict(tags)!r}) did not list {', '.join(missing)} within "
                f"{self.target.listing_delay:g}s (listed: {sorted(i.id for i in listing)})",
                rule,
            )
        return listing

    def wait_gone(
        self, instance_set: InstanceSet, tags: Mapping[str, str], instance_id: str, rule: str
    ) -> None:
        ok, _ = self.poll(instance_set, tags, lambda got: instance_id not in {i.id for i in got})
        if not ok:
            raise fail(
                f"instance {instance_id} was still listed {self.target.listing_delay:g}s "
                "after destroy",
                rule,
            )

    # ----------------------------------------------------------------- clean-up

    def close(self) -> None:
        """Destroy every instance created here and stop every instance set built here.

        Errors are logged, not raised: clean-up must get as far as it can, and the test's own
        result is what matters.
        """
        with self._lock:
            created, self._created = self._created, []
            main = list(self._sets.values())
            sets = [*main, *self._extra_sets]
            self._sets, self._extra_sets = {}, []
        wanted = {instance.id for instance in created}
        for iset in main:
            # Fresh snapshots first: an instance object from a set that was since stopped
            # (restart_instance_set) may no longer be able to act.
            try:
                listed = iset.instances({})
            except Exception as exc:
                log.warning("clean-up: cannot list instances: %s", exc)
                continue
            for instance in listed:
                if instance.id in wanted:
                    try:
                        instance.destroy()
                        wanted.discard(instance.id)
                    except Exception as exc:
                        log.warning("clean-up: cannot destroy %s: %s", instance.id, exc)
        for instance in created:
            if instance.id not in wanted:
                continue
            try:
                instance.destroy()
            except Exception as exc:
                log.warning("clean-up: cannot destroy %s: %s", instance.id, exc)
        for iset in sets:
            try:
                iset.stop()
            except Exception as exc:
                log.warning("clean-up: cannot stop an instance set: %s", exc)

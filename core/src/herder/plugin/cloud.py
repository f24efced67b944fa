"""The cloud driver interface: what a driver for a new cloud implements.

A driver package registers a :class:`Driver` subclass under a name (see :mod:`herder.hookspecs`).
herder builds one :class:`InstanceSet` from it and calls that from several threads at once, so
every method must be thread-safe.  Calls block; herder never calls them while holding its own
locks.

Ownership: herder tags every instance it creates with ``<prefix>InstanceSetID`` and filters
listings by that tag, so a driver need not filter by the id itself; but a driver must never
modify or destroy anything it was not asked to, and must give tags back exactly as set.

Errors: raise :class:`RateLimitError`, :class:`QuotaError` or :class:`CapacityError` directly (not
wrapped in another exception) when the cloud says so: herder's pool reacts to each differently
(see ``DEVELOPING-DRIVERS.md``).  Anything else is an ordinary failure that is logged and
retried later.
"""

from __future__ import annotations

import logging
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_serializer, model_validator

from herder import defaults
from herder.model import Billing, InstanceType
from herder.runtime import Runtime

if TYPE_CHECKING:
    from herder.plugin.executor import ExecutorFactory

# --------------------------------------------------------------------------- errors


class CloudError(Exception):
    """Base of the errors a driver raises on purpose."""


class RateLimitError(CloudError):
    """The provider refuses every call until ``earliest_retry`` (epoch seconds)."""

    def __init__(self, message: str, earliest_retry: float) -> None:
        super().__init__(message)
        self.earliest_retry = earliest_retry


class ThrottleBackoff:
    """Growing delay between throttled calls, for drivers: ``clamp(previous × 1.5 + 1 s, 1 s,
    60 s)``.

    A driver keeps one per kind of call (create, list, other), so a throttled list does not
    slow creates, grows it on each throttling answer to compute :class:`RateLimitError`'s
    ``earliest_retry``, and resets it on any other answer: a quota or capacity error proves
    the API takes calls again (Arvados resets only on success or a plain error, so one throttle
    long after another would wait far too long).  Thread-safe.
    """

    MIN = 1.0
    MAX = 60.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._delay = 0.0

    @property
    def delay(self) -> float:
        with self._lock:
            return self._delay

    def grow(self) -> float:
        with self._lock:
            self._delay = min(self.MAX, max(self.MIN, self._delay * 1.5 + 1.0))
            return self._delay

    def reset(self) -> None:
        with self._lock:
            self._delay = 0.0


class QuotaError(CloudError):
    """The account cannot have more instances than it has now."""


class CapacityError(CloudError):
    """The provider cannot create this kind of instance right now (Create only).

    ``instance_type_specific``: only this instance type is affected.
    ``quota_group_specific``: every type of this type's quota group is affected.
    Neither: every type is affected.
    """

    def __init__(
        self,
        message: str,
        *,
        instance_type_specific: bool = False,
        quota_group_specific: bool = False,
    ) -> None:
        super().__init__(message)
        self.instance_type_specific = instance_type_specific
        self.quota_group_specific = quota_group_specific and not instance_type_specific


class NotImplementedByDriver(CloudError):
    """The driver has no way to do this (e.g. check an instance's SSH host key)."""

    def __init__(self, message: str = "not implemented") -> None:
        super().__init__(message)


class HostKeyMismatch(CloudError):
    """The SSH host key presented is not the instance's genuine key."""


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class InstancePrice:
    """One point of an instance's price history: ``price`` per hour from ``start_time`` on."""

    start_time: float
    price: float

    def to_json(self) -> dict[str, Any]:
        return {"StartTime": self.start_time, "Price": self.price}


def normalize_price_history(prices: list[InstancePrice]) -> list[InstancePrice]:
    """Newest first, with runs of equal price collapsed to their oldest point.

    Adjacent entries with the same start time or the same price keep only the older one.  The
    input is not modified.
    """
    ordered = sorted(prices, key=lambda p: p.start_time, reverse=True)
    out: list[InstancePrice] = []
    for i, item in enumerate(ordered):
        if i + 1 < len(ordered):
            older = ordered[i + 1]
            if older.start_time == item.start_time or older.price == item.price:
                continue
        out.append(item)
    return out


class QuotaUnit(StrEnum):
    """What a :class:`Quota` counts, and so how much one instance of a type takes of it."""

    VCPUS = "vcpus"
    GPUS = "gpus"
    INSTANCES = "instances"


@dataclass(frozen=True, slots=True)
class Quota:
    """One of the account's quotas as the cloud reports it: ``usage`` of ``limit``.

    ``group`` is the quota group (:meth:`InstanceSet.quota_group`) whose types count against
    it, so herder knows which types a full quota blocks; ``name`` is the provider's own name
    for it (``L-1216C47A``, ``N2_CPUS``, ``standardDSv3Family``), shown to people.  ``usage``
    is the whole account's, herder's instances and everyone else's.
    """

    group: str
    name: str
    limit: float
    usage: float
    unit: QuotaUnit = QuotaUnit.VCPUS
    description: str = ""

    def need(self, instance_type: InstanceType) -> float:
        """How much one instance of ``instance_type`` takes of this quota."""
        if self.unit is QuotaUnit.GPUS:
            return float(instance_type.gpu.device_count)
        if self.unit is QuotaUnit.INSTANCES:
            return 1.0
        return float(instance_type.vcpus)


@dataclass(frozen=True, slots=True)
class HostKey:
    """An SSH host key as the server presented it: ``ssh-ed25519`` and the raw key blob."""

    key_type: str
    blob: bytes

    def openssh(self) -> str:
        import base64

        return f"{self.key_type} {base64.b64encode(self.blob).decode()}"


class RemoteRunner(ABC):
    """Runs a command over a connection that is being verified (for ``verify_host_key``)."""

    @abstractmethod
    def run(
        self, command: str, stdin: bytes = b"", timeout: float = 60.0
    ) -> tuple[int, bytes, bytes]:
        """Return (exit status, stdout, stderr)."""


# --------------------------------------------------------------------------- interface


class Instance(ABC):
    """One cloud VM.  Objects may be snapshots: a later listing may return a new object."""

    @property
    @abstractmethod
    def id(self) -> str:
        """The provider's id, stable for the VM's whole life."""

    @property
    @abstractmethod
    def provider_type(self) -> str: ...

    @property
    @abstractmethod
    def address(self) -> str:
        """``host`` or ``host:port`` to reach SSH on; ``""`` while not known yet."""

    @property
    @abstractmethod
    def remote_user(self) -> str: ...

    @property
    @abstractmethod
    def tags(self) -> dict[str, str]:
        """Tags as of this snapshot (may be stale after :meth:`set_tags`)."""

    @abstractmethod
    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Replace the instance's tags with ``tags``."""

    @abstractmethod
    def destroy(self) -> None:
        """Terminate the VM.  Destroying one that is already gone is not an error."""

    def verify_host_key(self, key: HostKey, remote: RemoteRunner) -> None:
        """Return if ``key`` is the instance's genuine host key; raise otherwise.

        Raise :class:`NotImplementedByDriver` (the default) when the driver has no way to
        know: herder then checks the instance secret it planted through the init command.
        """
        raise NotImplementedByDriver()

    def price_history(self, instance_type: InstanceType) -> list[InstancePrice]:
        """Recent prices, newest first, if the driver knows them (spot markets)."""
        return []

    def __str__(self) -> str:
        return self.id


class DelegatingInstance(Instance):
    """An Instance that forwards everything to another one: the base of instance wrappers
    (herder's instrumentation and secret verification; a driver's own decorators)."""

    def __init__(self, inner: Instance) -> None:
        self._inner = inner

    @property
    def inner(self) -> Instance:
        return self._inner

    @property
    def id(self) -> str:
        return self._inner.id

    @property
    def provider_type(self) -> str:
        return self._inner.provider_type

    @property
    def address(self) -> str:
        return self._inner.address

    @property
    def remote_user(self) -> str:
        return self._inner.remote_user

    @property
    def tags(self) -> dict[str, str]:
        return self._inner.tags

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._inner.set_tags(tags)

    def destroy(self) -> None:
        self._inner.destroy()

    def verify_host_key(self, key: HostKey, remote: RemoteRunner) -> None:
        self._inner.verify_host_key(key, remote)

    def price_history(self, instance_type: InstanceType) -> list[InstancePrice]:
        return self._inner.price_history(instance_type)

    def __str__(self) -> str:
        return str(self._inner)


class InstanceSet(ABC):
    """The instances of one herder installation in one cloud account."""

    @abstractmethod
    def create(
        self,
        instance_type: InstanceType,
        image_id: str,
        tags: Mapping[str, str],
        init_command: str,
        public_key: str | None,
    ) -> Instance:
        """Create one VM of ``instance_type.provider_type`` with ``tags``.

        ``image_id`` is the operator's ``cloud.image_id``; ``""`` when none is configured: use
        the driver's documented default image, or raise :class:`CloudError` saying that
        ``cloud.image_id`` must be set.  ``init_command`` (a shell script under 1 KiB) must run
        as root at first boot; ``public_key`` (OpenSSH format), if given, must be allowed to
        log in as :attr:`Instance.remote_user`.  ``tags`` carry a create key
        (:func:`create_key`) that drivers declaring ``idempotent_create`` use.
        """

    @abstractmethod
    def instances(self, tags: Mapping[str, str]) -> list[Instance]:
        """Every instance that has all ``tags``, booting ones included.

        Instances that are terminated or being terminated are left out, even while the cloud
        still lists them: herder counts every listed instance as alive (and paid for).  A
        driver may return more (herder filters again); it must not drop matching ones.
        """

    def quota_group(self, instance_type: InstanceType) -> str:
        """Name of the quota family ``instance_type`` counts against: herder stops creating
        types of a group whose quota the cloud reported exhausted, and no others."""
        return "-preemptible" if instance_type.preemptible else ""

    def quotas(self) -> list[Quota]:
        """The account's quotas that herder's instance types count against, with their usage.

        Optional (capability ``quota_headroom``): the default raises
        :class:`NotImplementedByDriver`, and herder then learns the quota only from
        :class:`QuotaError` on create, as before.  A driver that can read them returns one
        :class:`Quota` per quota group it knows (several quotas may share a group: every one
        must have room).  herder calls this at most every ``cloud.quota_refresh_interval``,
        never while holding its own locks; it may call the cloud.
        """
        raise NotImplementedByDriver("this driver cannot read quotas")

    def stop(self) -> None:
        """Release background resources.  Called once, at shutdown."""


class DriverParameters(BaseModel):
    """Base of a driver's parameter model: unknown keys are errors.

    A secret written in the clear where a :class:`SecretRef` is expected is refused, and is
    replaced by a placeholder before validation, so that no error message, log line or
    ``config check`` output repeats it (pydantic's errors quote the input they refuse).
    """

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _hide_plain_secrets(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        fields = _secret_fields(cls)
        if not fields:
            return data
        out = dict(data)
        for name, kind in fields.items():
            value = out.get(name)
            if kind == "one" and isinstance(value, str) and value:
                out[name] = PLAIN_SECRET_PLACEHOLDER
            elif kind == "map" and isinstance(value, Mapping):
                out[name] = {
                    k: PLAIN_SECRET_PLACEHOLDER if isinstance(v, str) and v else v
                    for k, v in value.items()
                }
        return out


#: What a secret written in the clear is replaced with before validation.
PLAIN_SECRET_PLACEHOLDER = "<secret not shown>"  # noqa: S105 (a placeholder, not a secret)


def _secret_fields(model: type[BaseModel]) -> dict[str, str]:
    """The fields of ``model`` holding a :class:`SecretRef` (``"one"``) or a map of them
    (``"map"``), from their annotations."""
    import typing

    found: dict[str, str] = {}
    for name, info in model.model_fields.items():
        annotation = info.annotation
        args = typing.get_args(annotation)
        if typing.get_origin(annotation) in (dict, Mapping) and args[-1:] == (SecretRef,):
            found[name] = "map"
        elif annotation is SecretRef or SecretRef in args:
            found[name] = "one"
    return found


class SecretRef(BaseModel):
    """A secret named by reference, never written in the configuration: ``{env: VAR}`` (an
    environment variable of herder's process) or ``{file: /path}`` (a file's content, without
    the trailing newline).

    The one way for every driver's parameters to take a credential: declare the field as
    ``SecretRef`` (or ``SecretRef | None``) and call :meth:`read` when the instance set is
    built, so ``herder config check`` and ``config show`` never see the secret itself.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    env: str = ""
    file: str = ""

    @model_validator(mode="before")
    @classmethod
    def _not_a_plain_string(cls, data: Any) -> Any:
        if isinstance(data, str):
            raise ValueError(
                "secrets are given by reference, not written here: {env: VARIABLE} or "
                "{file: /path/to/file}"
            )
        return data

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretRef:
        if bool(self.env) == bool(self.file):
            raise ValueError("give exactly one of env and file")
        return self

    def read(self, environ: Mapping[str, str] | None = None) -> str:
        """The secret; ValueError naming the reference (not the secret) when it is missing."""
        if self.env:
            env = os.environ if environ is None else environ
            value = env.get(self.env, "")
            if not value:
                raise ValueError(f"environment variable {self.env} is not set or empty")
            return value
        try:
            with open(self.file, encoding="utf-8") as handle:
                value = handle.read().rstrip("\n")
        except OSError as exc:
            raise ValueError(f"cannot read secret file {self.file}: {exc.strerror}") from exc
        if not value:
            raise ValueError(f"secret file {self.file} is empty")
        return value

    @model_serializer(mode="plain")
    def _as_written(self) -> dict[str, str]:
        """Dumped as the operator writes it (``{env: VAR}``), which validates back the same."""
        return {"env": self.env} if self.env else {"file": self.file}

    def __str__(self) -> str:
        return f"env:{self.env}" if self.env else f"file:{self.file}"


@dataclass
class DriverContext:
    """Everything herder hands a driver when it builds the instance set.

    ``instance_set_id``: this herder installation's id; herder tags every instance it creates
    with ``<tag_key_prefix>InstanceSetID`` set to it and lists with that tag as the filter, so
    a driver needs it only to name cloud resources of its own (a security group, a key pair).

    ``shared_resource_tags``: the operator's ``cloud.resource_tags``, tags wanted on every
    cloud resource herder causes to exist (disks, network interfaces, key pairs), for cost and
    ownership tracing.  A driver may add them to instances too, but must then leave them out of
    :attr:`Instance.tags`, which gives back exactly what herder set.  Empty unless configured.

    ``logger``: log through it (not the root logger), so the driver's lines carry herder's
    format and level.  ``metrics_registry``: a ``prometheus_client`` ``CollectorRegistry`` to
    register the driver's own metrics in, or None when metrics are off.

    ``runtime``: herder's clock and timers (:class:`herder.runtime.Runtime`), or None.  Only a
    driver that simulates time (a fake cloud whose instances boot after a delay) needs it, so
    that it runs at the speed of herder's simulated clock; a real cloud driver ignores it.

    ``tag_key_prefix``: the operator's ``cloud.tag_key_prefix``, which herder puts before each
    of its tag names (``InstanceSetID``, ``InstanceType``, ``IdleBehavior``, ``InstanceSecret``).
    """

    instance_set_id: str
    shared_resource_tags: dict[str, str] = field(default_factory=dict)
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("herder.driver"))
    metrics_registry: Any = None  # prometheus_client CollectorRegistry, or None
    runtime: Runtime | None = None  # the engine's clock, for drivers that simulate time
    tag_key_prefix: str = defaults.TAG_KEY_PREFIX


class Capability(StrEnum):
    """The optional features a driver may declare: a closed set.

    A :class:`StrEnum`, so a driver may still declare plain strings (``"spot"``); but every
    string must be one of these values, and :func:`parse_capabilities` rejects any other, so a
    misspelt capability fails loudly instead of silently switching a feature (and its
    conformance tests) off.
    """

    #: ``verify_host_key`` really checks keys (never raises NotImplementedByDriver).
    HOST_KEY_VERIFICATION = "host_key_verification"
    #: ``price_history`` returns the provider's spot prices.
    PRICE_HISTORY = "price_history"
    #: preemptible instance types can be created.
    SPOT = "spot"
    #: GPU instance types can be created.
    GPU = "gpu"
    #: the provider's quota errors are raised as :class:`QuotaError`.
    QUOTA_ERRORS = "quota_errors"
    #: the provider's capacity errors are raised as :class:`CapacityError`.
    CAPACITY_ERRORS = "capacity_errors"
    #: the provider's throttling is raised as :class:`RateLimitError`.
    RATE_LIMIT_ERRORS = "rate_limit_errors"
    #: a create repeated with the same create key (see :func:`create_key`) returns the
    #: instance the first one made instead of making a second.
    IDEMPOTENT_CREATE = "idempotent_create"
    #: :meth:`InstanceSet.quotas` reads the account's quotas and usage, so herder creates no
    #: instance into a quota it can see is full.
    QUOTA_HEADROOM = "quota_headroom"


def parse_capabilities(values: Iterable[str]) -> frozenset[Capability]:
    """``values`` as :class:`Capability` members; ValueError naming any unknown one."""
    out: set[Capability] = set()
    unknown: list[str] = []
    for value in values:
        try:
            out.add(Capability(value))
        except ValueError:
            unknown.append(str(value))
    if unknown:
        valid = ", ".join(sorted(c.value for c in Capability))
        raise ValueError(f"unknown driver capabilities {sorted(unknown)} (valid: {valid})")
    return frozenset(out)


#: The tag (after herder's ``tag_key_prefix``) whose value is unique to one create call.
CREATE_KEY_TAG = "InstanceSecret"


def create_key(
    tags: Mapping[str, str], tag_key_prefix: str = defaults.TAG_KEY_PREFIX
) -> str | None:
    """The create key of a create call with ``tags``, or None when herder gave none.

    herder plants a fresh random ``<prefix>InstanceSecret`` tag in every create, and uses the
    same value again only if it repeats that very create.  A driver declaring
    :attr:`Capability.IDEMPOTENT_CREATE` uses it as the provider's idempotency token (EC2
    ``ClientToken``, a GCE request id) or looks for an instance already carrying it before
    creating, so that a create that timed out but succeeded is found instead of duplicated.
    It is carried in the tags rather than as a new argument so that drivers written against
    the original ``create`` signature keep working unchanged.
    """
    return tags.get(tag_key_prefix + CREATE_KEY_TAG) or None


class Driver(ABC):
    """A cloud driver: validates its parameters and builds an :class:`InstanceSet`.

    ``capabilities`` declares optional features (:class:`Capability` members or their string
    values); herder and the conformance suite reject unknown ones.  When what a driver can do
    depends on its parameters (a bridge to many providers, say), override
    :meth:`capabilities_for`: herder asks it, not the class attribute.
    """

    parameters_model: ClassVar[type[DriverParameters]] = DriverParameters
    capabilities: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def validate_parameters(cls, raw: Mapping[str, Any] | None) -> DriverParameters:
        return cls.parameters_model.model_validate(dict(raw or {}))

    def capabilities_for(self, params: DriverParameters) -> frozenset[Capability]:
        """What the driver can do with ``params`` (default: the class's ``capabilities``).

        herder uses the answer, e.g. ``herder config check`` rejects a preemptible instance
        type when ``spot`` is missing, and the conformance suite skips the tests of missing
        ones.  Raises ValueError for a capability outside :class:`Capability`.
        """
        return parse_capabilities(type(self).capabilities)

    @abstractmethod
    def instance_set(self, params: DriverParameters, context: DriverContext) -> InstanceSet: ...

    def default_instance_types(self, params: DriverParameters) -> dict[str, InstanceType]:
        """Instance types to offer when the configuration lists none.

        Called once at start-up (``herder serve``, ``herder cloudtest``), after the parameters
        were validated and only when ``cloud.instance_types`` is empty; must not call the
        cloud.  Most clouds return nothing (the operator must say what may be bought); the
        loopback driver offers the local machine itself.
        """
        return {}

    def billing(self, params: DriverParameters, instance_type: InstanceType) -> Billing | None:
        """How the cloud bills ``instance_type`` (increment and minimum), or None: unknown.

        herder keeps an idle instance whose billing increment is already paid until just
        before the increment ends, and computes spend with it.  A type's own
        ``billing_increment`` / ``billing_minimum`` keys win over this answer; with neither,
        herder assumes per-second billing.  Called once per type at start-up; must not call
        the cloud.
        """
        return None

    def executor_factory(self, instance_set: InstanceSet) -> ExecutorFactory | None:
        """Executors for ``instance_set``'s instances, or None (the default) for the configured one.

        A driver whose instances are not reached over SSH (a simulated cloud, say) returns its
        own factory here, and herder uses it instead of ``cloud.executor``.
        """
        return None


#: A factory the registry can call instead of a Driver subclass.
DriverFactory = Callable[[], Driver]

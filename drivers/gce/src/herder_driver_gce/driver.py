"""The ``gce`` driver: Compute Engine VMs through google-cloud-compute's REST clients.

How herder's interface maps onto GCE, and why:

* **Tags live in instance metadata**, as one JSON item (``herder-tags``): GCE labels allow only
  lowercase letters, digits, ``-`` and ``_`` in 63 characters, and herder must get every tag
  back exactly as set.  One label, ``herder-set``, carries the instance-set id (as it is when
  it fits a label, hashed when not) so listings can filter on the server side.
* **Setting tags never loses a concurrent change**: metadata is written with the fingerprint
  read just before, and a stale fingerprint (HTTP 412) makes the driver read and write again.
  Other metadata items (``ssh-keys``, an operator's own) are kept as they are.
* **Operations are waited for with ``zoneOperations.wait``** on a ZoneOperationsClient built
  with the same credentials and endpoint as the instances client, so a configured
  ``api_endpoint`` holds for every call, polling included (google-api-core's own polling
  builds a client of its own that would ignore it).  An insert accepted over HTTP can still
  fail in its operation: both failures are classified alike (:mod:`.errors`).
* **Zone failover**: a stockout (``ZONE_RESOURCE_POOL_EXHAUSTED``...) moves the create to the
  next configured zone; the zone last tried is where the next create starts, as the AWS
  driver does with subnets.  A region stockout or a quota ends the attempt at once.
* **Host keys**: with ``verify_host_keys`` the instance gets ``enable-guest-attributes`` and
  the guest agent publishes its SSH host keys as guest attributes (``hostkeys/``), which
  only the Compute API can write: a presented key must be one of them.  Until they are
  published, herder falls back to the instance secret.
* **Idempotent creates**: an insert carries a ``requestId`` derived from herder's create key
  (and the zone), and the instance name is derived from the key too, so a repeated create is
  answered with the first insert's operation, or, once GCE forgot the request id, finds its
  name taken by the instance the first create made.
* **Destroy** does not wait for the delete operation (a minute or more): the instance turns
  STOPPING at once, which listings drop, and an instance GCE already deleted is no error.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import secrets
import string
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from google.api_core import exceptions as gexc
from google.api_core.client_options import ClientOptions
from google.cloud import compute_v1
from prometheus_client import CollectorRegistry, Counter, Gauge

from herder.cloud import (
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
    QuotaUnit,
    RateLimitError,
    RemoteRunner,
    create_key,
)
from herder.model import InstanceType
from herder_driver_gce.errors import (
    Backoff,
    classify,
    error_codes,
    error_message,
    is_not_found,
    is_precondition_failed,
    is_stockout,
    is_zone_specific,
    operation_error,
)
from herder_driver_gce.params import CLOUD_PLATFORM, LABEL_VALUE, GCEParameters, region_of
from herder_driver_gce.quota import accelerator_for, built_in_accelerator, quota_group

#: GCE statuses of an instance that is going away or stopped: herder does not count it.
GONE_STATUSES = frozenset({"STOPPING", "STOPPED", "TERMINATED", "DEPROVISIONING"})
#: The metadata item holding herder's tags, as a JSON object.
TAGS_KEY = "herder-tags"
#: The label holding the (label-safe form of the) instance-set id.
SET_LABEL = "herder-set"
#: Guest attributes the guest agent publishes SSH host keys under.
HOST_KEYS_PATH = "hostkeys/"
#: Size of one local SSD partition.
LOCAL_SSD_BYTES = 375 << 30
GIB = 1 << 30
#: Times a metadata write is retried after a stale fingerprint.
FINGERPRINT_RETRIES = 5
#: First pause after an operation wait that came back early and unfinished.
QUICK_WAIT_PAUSE = 0.05
#: aggregatedList page size (GCE allows up to 500).
PAGE_SIZE = 500
_SUFFIX_ALPHABET = string.ascii_lowercase + string.digits
#: How many recent create keys remember the zone their last attempt used.
REMEMBERED_CREATE_KEYS = 1000
#: The namespace of the request ids derived from create keys (a fixed, random UUID).
REQUEST_ID_NAMESPACE = uuid.UUID("6f1d0a52-3c1e-4b8e-9f57-2f4c6e0d8a13")


def set_label_value(instance_set_id: str) -> str:
    """The ``herder-set`` label for an instance-set id: the id itself when GCE allows it as a
    label value (readable in the console), else ``h-`` and a hash of it.  Listings filter again
    on the exact tag, so the label only has to narrow the search."""
    if instance_set_id and LABEL_VALUE.fullmatch(instance_set_id):
        return instance_set_id
    return "h-" + hashlib.sha256(instance_set_id.encode()).hexdigest()[:40]


def instance_name(prefix: str, instance_set_id: str) -> str:
    """``<prefix>-<8 hex of the set id>-<10 random>``: valid as a GCE name whatever the id is,
    recognisably herder's, and unique without asking GCE."""
    digest = hashlib.sha256(instance_set_id.encode()).hexdigest()[:8]
    suffix = "".join(secrets.choice(_SUFFIX_ALPHABET) for _ in range(10))
    return f"{prefix}-{digest}-{suffix}"


def keyed_instance_name(prefix: str, instance_set_id: str, key: str) -> str:
    """The name of the instance made by the create with ``key``: like :func:`instance_name`,
    with the suffix derived from the key, so that a repeated create asks for the same name and
    GCE refuses a second instance (``alreadyExists``) instead of making one."""
    digest = hashlib.sha256(instance_set_id.encode()).hexdigest()[:8]
    hashed = int.from_bytes(hashlib.sha256(key.encode()).digest(), "big")
    suffix = ""
    for _ in range(10):
        hashed, index = divmod(hashed, len(_SUFFIX_ALPHABET))
        suffix += _SUFFIX_ALPHABET[index]
    return f"{prefix}-{digest}-{suffix}"


def request_id(key: str, zone: str) -> str:
    """The ``requestId`` of the insert for create key ``key`` in ``zone``: a UUID, as GCE
    requires, the same for every repeat (GCE then answers with the first request's operation
    instead of inserting again), and one per zone so that failover is a new request."""
    return str(uuid.uuid5(REQUEST_ID_NAMESPACE, f"{key}/{zone}"))


def startup_script(init_command: str) -> str:
    """The ``startup-script`` metadata: GCE runs it as root at every boot (herder's init
    command is idempotent: it writes the instance secret)."""
    return f"#!/bin/sh\n{init_command}\n"


def ssh_keys_entry(user: str, public_key: str) -> str:
    """The ``ssh-keys`` metadata line for ``public_key`` (type and key only, so no newline or
    comment from the caller can add a second line, i.e. a second login)."""
    fields = public_key.split()
    if len(fields) < 2 or not fields[0].startswith(("ssh-", "ecdsa-", "sk-")):
        raise CloudError("the public key is not in OpenSSH format ('ssh-ed25519 AAAA...')")
    base64.b64decode(fields[1], validate=True)
    return f"{user}:{fields[0]} {fields[1]} {user}"


def credentials_for(params: GCEParameters) -> Any:
    """Service-account key credentials (``credentials``), or Application Default Credentials.

    The key is read from its reference now and handed to google-auth; its contents never reach
    herder's logs or errors, which name the reference only.
    """
    import google.auth
    from google.auth import exceptions as auth_exceptions
    from google.oauth2 import service_account

    if params.credentials is not None:
        where = f"cloud.driver_parameters.credentials ({params.credentials})"
        try:
            text = params.credentials.read()
        except ValueError as exc:  # names the variable or file only
            raise CloudError(f"{where}: {exc}") from None
        try:
            load = service_account.Credentials.from_service_account_info
            return load(json.loads(text), scopes=[CLOUD_PLATFORM])  # type: ignore[no-untyped-call]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # The type only: a parser's message could quote a piece of the key.
            raise CloudError(f"{where}: not a service-account key ({type(exc).__name__})") from None
    try:
        credentials, _ = google.auth.default(scopes=[CLOUD_PLATFORM])
    except auth_exceptions.DefaultCredentialsError as exc:
        raise CloudError(
            f"no Application Default Credentials ({exc}); set "
            "cloud.driver_parameters.credentials or GOOGLE_APPLICATION_CREDENTIALS"
        ) from None
    return credentials


def compute_clients(params: GCEParameters) -> tuple[Any, Any]:
    """The instances and zone-operations clients, REST, with the same credentials and endpoint."""
    options = ClientOptions(api_endpoint=params.api_endpoint) if params.api_endpoint else None
    kwargs: dict[str, Any] = {
        "credentials": credentials_for(params),
        "transport": "rest",
        "client_options": options,
    }
    return compute_v1.InstancesClient(**kwargs), compute_v1.ZoneOperationsClient(**kwargs)


def regions_client(params: GCEParameters) -> Any:
    """A regions client (for quotas), REST, with the instances client's credentials."""
    options = ClientOptions(api_endpoint=params.api_endpoint) if params.api_endpoint else None
    return compute_v1.RegionsClient(
        credentials=credentials_for(params), transport="rest", client_options=options
    )


def _zone_of(url: str) -> str:
    """``.../zones/us-central1-a`` or ``zones/us-central1-a`` → ``us-central1-a``."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def _parse_time(stamp: str) -> float | None:
    try:
        return datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return None


class GCEMetrics:
    """``herder_gce_instance_creates_total{zone,outcome}`` and ``herder_gce_instances{zone}``."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.creates = Counter(
            "herder_gce_instance_creates",
            "Instance inserts, by zone and outcome (success, capacity, quota, rate_limit, error)",
            ["zone", "outcome"],
            registry=registry,
        )
        self.instances = Gauge(
            "herder_gce_instances",
            "Instances listed, by zone",
            ["zone"],
            registry=registry,
        )


class GCEInstance(Instance):
    """One Compute Engine instance, as a ``compute_v1.Instance`` snapshot."""

    def __init__(self, instance_set: GCEInstanceSet, data: Any, zone: str) -> None:
        self._set = instance_set
        self._data = data
        self.zone = zone

    @property
    def id(self) -> str:
        """The instance name: unique in the project (herder makes it so), stable, and what
        every API call needs along with the zone."""
        return str(self._data.name)

    @property
    def provider_type(self) -> str:
        return _zone_of(str(self._data.machine_type))

    @property
    def status(self) -> str:
        return str(self._data.status)

    @property
    def address(self) -> str:
        for nic in self._data.network_interfaces:
            if self._set.params.external_ip:
                for config in nic.access_configs:
                    if config.nat_i_p:
                        return str(config.nat_i_p)
                return ""
            return str(nic.network_i_p or "")
        return ""

    @property
    def remote_user(self) -> str:
        return self._set.params.admin_username

    @property
    def tags(self) -> dict[str, str]:
        return tags_from_metadata(self._data.metadata)

    @property
    def created_at(self) -> float | None:
        stamp = str(self._data.creation_timestamp or "")
        return _parse_time(stamp) if stamp else None

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._set.replace_tags(self.zone, self.id, tags)

    def destroy(self) -> None:
        self._set.delete(self.zone, self.id)

    def verify_host_key(self, key: HostKey, remote: RemoteRunner) -> None:
        """Accept ``key`` only if the guest agent published it as this instance's host key.

        Guest attributes are written by the guest agent through the metadata server and read
        through the Compute API, so a machine in the path of the SSH connection cannot forge
        them.  Without published keys (guest attributes off, or not yet published while the
        instance boots) :class:`NotImplementedByDriver` lets herder check the instance secret.
        """
        published = self._set.host_keys(self.zone, self.id)
        if not published:
            raise NotImplementedByDriver(f"{self.id} has published no SSH host keys (yet)")
        if published.get(key.key_type) == key.blob:
            return
        raise HostKeyMismatch(
            f"host key mismatch: {self.id} presented a {key.key_type} key that is not among the "
            f"host keys its guest agent published ({', '.join(sorted(published))})"
        )

    def price_history(self, instance_type: InstanceType) -> list[InstancePrice]:
        """A spot instance's configured price since it was created (GCE spot prices change at
        most monthly and have no history API); on-demand instances have none."""
        if not instance_type.preemptible:
            return []
        start = self.created_at
        if start is None:
            start = self._set.now()
        return [InstancePrice(start_time=start, price=instance_type.price)]


def tags_from_metadata(metadata: Any) -> dict[str, str]:
    """herder's tags from an instance's metadata (``{}`` for instances herder did not tag)."""
    for item in metadata.items if metadata else ():
        if item.key == TAGS_KEY:
            try:
                decoded = json.loads(item.value)
            except ValueError:
                return {}
            if isinstance(decoded, dict):
                return {str(k): str(v) for k, v in decoded.items()}
    return {}


def _tags_json(tags: Mapping[str, str]) -> str:
    return json.dumps(dict(tags), separators=(",", ":"), ensure_ascii=False)


class GCEInstanceSet(InstanceSet):
    """The instances of one herder installation in one GCE project and region.

    ``clients``: an (InstancesClient, ZoneOperationsClient) pair to use instead of building
    them from the parameters, for an embedding program that holds credentials of its own.
    Thread-safe: the clients are, and the only shared state (the zone to start creates in, the
    back-off delays) is guarded.
    """

    def __init__(
        self,
        params: GCEParameters,
        context: DriverContext,
        clients: tuple[Any, Any] | None = None,
    ) -> None:
        self.params = params
        self.context = context
        self.client, self.operations = clients if clients is not None else compute_clients(params)
        self._log = context.logger
        self.now: Callable[[], float] = (
            context.runtime.now if context.runtime is not None else time.time
        )
        self.metrics = GCEMetrics(context.metrics_registry)
        self._create_backoff = Backoff()
        self._list_backoff = Backoff()
        self._other_backoff = Backoff()
        self._lock = threading.Lock()  # guards _zone_index and _key_zones
        self._zone_index = 0
        self._key_zones: OrderedDict[str, int] = OrderedDict()  # create key -> zone index
        self._regions_client: Any = None  # made when quotas are first read

    # ----------------------------------------------------------------- create

    def create(
        self,
        instance_type: InstanceType,
        image_id: str,
        tags: Mapping[str, str],
        init_command: str,
        public_key: str | None,
    ) -> Instance:
        try:
            accelerator = accelerator_for(instance_type, self.params.accelerator_types)
            source_image = self.params.image_path(image_id)
        except ValueError as exc:
            raise CloudError(str(exc)) from None
        set_id = tags.get(self._tag("InstanceSetID"), self.context.instance_set_id)
        key = create_key(tags, self.context.tag_key_prefix)
        if key is None:
            name = instance_name(self.params.name_prefix, set_id)
        else:
            name = keyed_instance_name(self.params.name_prefix, set_id, key)
        metadata = self._metadata(tags, init_command, public_key)
        zones = self.params.zones
        with self._lock:
            start = self._zone_index
            if key is not None and key in self._key_zones:
                start = self._key_zones[key] % len(zones)
        # (GCE's error, herder's error) of the last attempt, and of the last stockout: a
        # stockout is reported over a later error of another kind (a zone without the type).
        last: tuple[BaseException, Exception] | None = None
        stockout: tuple[BaseException, Exception] | None = None
        for attempt in range(len(zones)):
            index = (start + attempt) % len(zones)
            zone = zones[index]
            resource = self._resource(
                name, zone, instance_type, accelerator, source_image, set_id, metadata
            )
            with self._lock:
                self._zone_index = index
                if key is not None:
                    self._key_zones[key] = index
                    self._key_zones.move_to_end(key)
                    while len(self._key_zones) > REMEMBERED_CREATE_KEYS:
                        self._key_zones.popitem(last=False)
            try:
                self._insert(zone, resource, request_id(key, zone) if key else "")
            except Exception as exc:
                existing = None
                if key is not None and isinstance(exc, gexc.Conflict):
                    existing = self._made_by(zone, name, key)
                if existing is not None:
                    self._count(zone, None)
                    self._create_backoff.reset()
                    return existing
                typed = classify(exc, self._create_backoff, self.now(), "insert")
                self._count(zone, typed)
                self._log.info(
                    "insert %s (%s) in %s failed: %s",
                    name,
                    instance_type.provider_type,
                    zone,
                    typed,
                )
                last = (exc, typed)
                if is_stockout(exc):
                    stockout = last
                if not is_zone_specific(exc):
                    break
                continue
            self._count(zone, None)
            self._create_backoff.reset()
            return self._created(zone, name, resource)
        assert last is not None  # zones has at least one entry
        cause, failure = stockout or last
        if failure is cause:
            raise failure
        raise failure from cause

    def _tag(self, name: str) -> str:
        return self.context.tag_key_prefix + name

    def _metadata(
        self, tags: Mapping[str, str], init_command: str, public_key: str | None
    ) -> list[dict[str, str]]:
        items = [
            {"key": TAGS_KEY, "value": _tags_json(tags)},
            {"key": "startup-script", "value": startup_script(init_command)},
        ]
        if public_key:
            items.append(
                {"key": "ssh-keys", "value": ssh_keys_entry(self.params.admin_username, public_key)}
            )
        if self.params.verify_host_keys:
            items.append({"key": "enable-guest-attributes", "value": "TRUE"})
        return items

    def _resource(
        self,
        name: str,
        zone: str,
        it: InstanceType,
        accelerator: str,
        source_image: str,
        set_id: str,
        metadata: list[dict[str, str]],
    ) -> dict[str, Any]:
        """The instance resource for ``zone`` (a dict in the API's field names)."""
        p = self.params
        labels = {**p.labels, SET_LABEL: set_label_value(set_id)}
        boot: dict[str, Any] = {
            "source_image": source_image,
            "disk_type": f"zones/{zone}/diskTypes/{p.boot_disk_type}",
            "labels": labels,
        }
        if p.boot_disk_size:
            boot["disk_size_gb"] = math.ceil(p.boot_disk_size / GIB)
        disks: list[dict[str, Any]] = [
            {"boot": True, "auto_delete": True, "initialize_params": boot}
        ]
        disks.extend(self._scratch_disks(zone, it, labels))
        nic: dict[str, Any] = {"network": p.network_path()}
        if p.subnetwork:
            nic["subnetwork"] = p.subnetwork_path()
        if p.external_ip:
            nic["access_configs"] = [{"name": "External NAT", "type_": "ONE_TO_ONE_NAT"}]
        scheduling: dict[str, Any] = {}
        if accelerator or built_in_accelerator(it.provider_type) or it.gpu.device_count > 0:
            scheduling["on_host_maintenance"] = "TERMINATE"  # GPUs cannot live-migrate
        if it.preemptible:
            scheduling.update(
                provisioning_model="SPOT",
                instance_termination_action="DELETE",
                automatic_restart=False,
                on_host_maintenance="TERMINATE",
            )
        resource: dict[str, Any] = {
            "name": name,
            "machine_type": f"zones/{zone}/machineTypes/{it.provider_type}",
            "labels": labels,
            "disks": disks,
            "network_interfaces": [nic],
            "metadata": {"items": metadata},
        }
        if scheduling:
            resource["scheduling"] = scheduling
        if accelerator:
            accelerator_path = accelerator
            if "/" not in accelerator:
                accelerator_path = f"zones/{zone}/acceleratorTypes/{accelerator}"
            resource["guest_accelerators"] = [
                {"accelerator_type": accelerator_path, "accelerator_count": it.gpu.device_count}
            ]
        if p.service_account:
            resource["service_accounts"] = [{"email": p.service_account, "scopes": p.scopes}]
        return resource

    def _scratch_disks(
        self, zone: str, it: InstanceType, labels: dict[str, str]
    ) -> list[dict[str, Any]]:
        """Disks for the type's ``added_scratch``: one persistent disk of that size (rounded up
        to GiB), or as many 375 GiB local SSDs as it takes."""
        if it.added_scratch <= 0:
            return []
        if self.params.scratch_disk == "local-ssd":
            count = math.ceil(it.added_scratch / LOCAL_SSD_BYTES)
            return [
                {
                    "type_": "SCRATCH",
                    "interface": "NVME",
                    "auto_delete": True,
                    "initialize_params": {"disk_type": f"zones/{zone}/diskTypes/local-ssd"},
                }
                for _ in range(count)
            ]
        return [
            {
                "auto_delete": True,
                "device_name": "herder-scratch",
                "initialize_params": {
                    "disk_type": f"zones/{zone}/diskTypes/{self.params.scratch_disk_type}",
                    "disk_size_gb": math.ceil(it.added_scratch / GIB),
                    "labels": labels,
                },
            }
        ]

    def _insert(self, zone: str, resource: dict[str, Any], request_id: str) -> None:
        request = compute_v1.InsertInstanceRequest(
            project=self.params.project,
            zone=zone,
            instance_resource=compute_v1.Instance(resource),
        )
        if request_id:
            request.request_id = request_id
        operation = self.client.insert_unary(
            request=request, retry=None, timeout=self.params.request_timeout
        )
        self._wait(zone, operation)

    def _made_by(self, zone: str, name: str, key: str) -> GCEInstance | None:
        """The instance ``name`` in ``zone`` if the create with ``key`` made it (an insert
        repeated after GCE forgot its request id finds its name taken), else None."""
        try:
            data = self.client.get(
                project=self.params.project,
                zone=zone,
                instance=name,
                retry=None,
                timeout=self.params.request_timeout,
            )
        except gexc.GoogleAPICallError:
            return None
        found = GCEInstance(self, data, zone)
        if create_key(found.tags, self.context.tag_key_prefix) != key:
            return None
        return found

    def _wait(self, zone: str, operation: Any) -> None:
        """Wait for a zonal operation and raise what it reports.

        ``zoneOperations.wait`` blocks on the server until the operation is done or about two
        minutes passed, but only on a best-effort basis: an overloaded server may answer at
        once.  A wait that came back early and unfinished is followed by a short pause that
        doubles each time (50 ms up to 1 s), so such answers never make a busy loop.
        """
        deadline = self.now() + self.params.operation_timeout
        pause = QUICK_WAIT_PAUSE
        while operation.status != compute_v1.Operation.Status.DONE:
            if self.now() >= deadline:
                raise CloudError(
                    f"operation {operation.name} in {zone} still not done after "
                    f"{self.params.operation_timeout:g}s"
                )
            started = time.monotonic()
            operation = self.operations.wait(
                project=self.params.project,
                zone=zone,
                operation=operation.name,
                retry=None,
                timeout=self.params.request_timeout + 150.0,
            )
            done = operation.status == compute_v1.Operation.Status.DONE
            if not done and time.monotonic() - started < 1.0:
                time.sleep(pause)
                pause = min(1.0, pause * 2)
        failure = operation_error(operation)
        if failure is not None:
            raise failure

    def _count(self, zone: str, typed: BaseException | None) -> None:
        outcome = "success"
        if isinstance(typed, CapacityError):
            outcome = "capacity"
        elif isinstance(typed, QuotaError):
            outcome = "quota"
        elif isinstance(typed, RateLimitError):
            outcome = "rate_limit"
        elif typed is not None:
            outcome = "error"
        self.metrics.creates.labels(zone=zone, outcome=outcome).inc()

    def _created(self, zone: str, name: str, resource: dict[str, Any]) -> GCEInstance:
        """The new instance as GCE describes it, or as requested if that read fails (it has
        been created either way; the next listing has the details)."""
        try:
            data = self.client.get(
                project=self.params.project,
                zone=zone,
                instance=name,
                retry=None,
                timeout=self.params.request_timeout,
            )
        except gexc.GoogleAPICallError as exc:
            self._log.info("created %s in %s but cannot read it back: %s", name, zone, exc)
            data = compute_v1.Instance(resource)
        return GCEInstance(self, data, zone)

    # ----------------------------------------------------------------- listing

    def instances(self, tags: Mapping[str, str]) -> list[Instance]:
        set_id = tags.get(self._tag("InstanceSetID"))
        label_filter = (
            f"labels.{SET_LABEL}={set_label_value(set_id)}"
            if set_id is not None
            else f"labels.{SET_LABEL}:*"
        )
        try:
            found = self._list_all(label_filter)
        except Exception as exc:
            raise classify(exc, self._list_backoff, self.now(), "aggregatedList") from exc
        self._list_backoff.reset()
        counts = dict.fromkeys(self.params.zones, 0)
        for instance in found:
            counts[instance.zone] = counts.get(instance.zone, 0) + 1
        for zone, count in counts.items():
            self.metrics.instances.labels(zone=zone).set(count)
        wanted = dict(tags)
        return [i for i in found if wanted.items() <= i.tags.items()]

    def _list_all(self, label_filter: str) -> list[GCEInstance]:
        """Every page of aggregatedList, every zone, without instances going away."""
        request = compute_v1.AggregatedListInstancesRequest(
            project=self.params.project, filter=label_filter, max_results=PAGE_SIZE
        )
        pager = self.client.aggregated_list(
            request=request, retry=None, timeout=self.params.request_timeout
        )
        found: list[GCEInstance] = []
        for scope, scoped in pager:
            zone = _zone_of(scope)
            for data in scoped.instances:
                if data.status not in GONE_STATUSES:
                    found.append(GCEInstance(self, data, zone))
        return found

    # ----------------------------------------------------------------- per instance

    def replace_tags(self, zone: str, name: str, tags: Mapping[str, str]) -> None:
        """Make the instance's tags exactly ``tags``, keeping its other metadata, and move the
        ``herder-set`` label along if the instance-set id changed."""
        try:
            self._rewrite(zone, name, lambda data: self._set_metadata(zone, name, data, tags))
            set_id = tags.get(self._tag("InstanceSetID"))
            if set_id is not None:
                self._rewrite(zone, name, lambda data: self._set_label(zone, name, data, set_id))
        except Exception as exc:
            raise classify(exc, self._other_backoff, self.now(), "setMetadata") from exc
        self._other_backoff.reset()

    def _rewrite(self, zone: str, name: str, write: Callable[[Any], None]) -> None:
        """Read the instance and ``write(instance)``; read again and retry when the write's
        fingerprint went stale in between (a concurrent change, which is thus kept)."""
        for attempt in range(FINGERPRINT_RETRIES):
            data = self.client.get(
                project=self.params.project,
                zone=zone,
                instance=name,
                retry=None,
                timeout=self.params.request_timeout,
            )
            try:
                write(data)
                return
            except gexc.GoogleAPICallError as exc:
                if not is_precondition_failed(exc) or attempt == FINGERPRINT_RETRIES - 1:
                    raise
                self._log.info("%s changed while herder wrote to it; reading it again", name)

    def _set_metadata(self, zone: str, name: str, data: Any, tags: Mapping[str, str]) -> None:
        items = [
            {"key": item.key, "value": item.value}
            for item in data.metadata.items
            if item.key != TAGS_KEY
        ]
        items.append({"key": TAGS_KEY, "value": _tags_json(tags)})
        operation = self.client.set_metadata_unary(
            project=self.params.project,
            zone=zone,
            instance=name,
            metadata_resource=compute_v1.Metadata(
                fingerprint=data.metadata.fingerprint, items=items
            ),
            retry=None,
            timeout=self.params.request_timeout,
        )
        self._wait(zone, operation)

    def _set_label(self, zone: str, name: str, data: Any, set_id: str) -> None:
        value = set_label_value(set_id)
        if data.labels.get(SET_LABEL) == value:
            return
        labels = {**dict(data.labels), SET_LABEL: value}
        operation = self.client.set_labels_unary(
            project=self.params.project,
            zone=zone,
            instance=name,
            instances_set_labels_request_resource=compute_v1.InstancesSetLabelsRequest(
                label_fingerprint=data.label_fingerprint, labels=labels
            ),
            retry=None,
            timeout=self.params.request_timeout,
        )
        self._wait(zone, operation)

    def delete(self, zone: str, name: str) -> None:
        """Start deleting the instance; one GCE no longer knows is already destroyed."""
        try:
            operation = self.client.delete_unary(
                project=self.params.project,
                zone=zone,
                instance=name,
                retry=None,
                timeout=self.params.request_timeout,
            )
            failure = operation_error(operation)
            if failure is not None:
                raise failure
        except Exception as exc:
            if is_not_found(exc):
                self._other_backoff.reset()
                return
            raise classify(exc, self._other_backoff, self.now(), "delete") from exc
        self._other_backoff.reset()

    def host_keys(self, zone: str, name: str) -> dict[str, bytes]:
        """The SSH host keys the guest agent published, by key type (``{}`` if none)."""
        if not self.params.verify_host_keys:
            return {}
        try:
            reply = self.client.get_guest_attributes(
                request=compute_v1.GetGuestAttributesInstanceRequest(
                    project=self.params.project,
                    zone=zone,
                    instance=name,
                    query_path=HOST_KEYS_PATH,
                ),
                retry=None,
                timeout=self.params.request_timeout,
            )
        except gexc.NotFound:
            return {}
        except gexc.GoogleAPICallError as exc:
            raise CloudError(
                f"cannot read the host keys of {name}: {error_codes(exc)} {error_message(exc)}"
            ) from exc
        keys: dict[str, bytes] = {}
        for item in reply.query_value.items:
            if item.namespace != "hostkeys":
                continue
            # The guest agent publishes the base64 key; tolerate "type key [comment]" too.
            fields = str(item.value or "").split()
            blob = fields[1] if len(fields) > 1 else (fields[0] if fields else "")
            try:
                keys[str(item.key)] = base64.b64decode(blob, validate=True)
            except ValueError:
                self._log.warning("%s published an unreadable %s host key", name, item.key)
        return keys

    def quota_group(self, instance_type: InstanceType) -> str:
        return quota_group(
            instance_type,
            self.params.accelerator_types,
            self.params.instance_type_quota_groups,
        )

    # ----------------------------------------------------------------- quotas

    def quotas(self) -> list[Quota]:
        """The region's vCPU and GPU quotas (``regions.get``), usage as GCE counts it.

        Every ``*CPUS`` and ``*_GPUS`` metric is reported, its group the metric lowercased,
        as :func:`~herder_driver_gce.quota.quota_group` names types' groups (``N2_CPUS`` →
        ``n2_cpus``, ``PREEMPTIBLE_CPUS``, ``NVIDIA_T4_GPUS``); other quotas (addresses,
        disks) do not limit what herder creates by type and are left out.
        """
        region = region_of(self.params.zones[0])
        try:
            data = self._regions().get(project=self.params.project, region=region)
        except Exception as exc:
            raise classify(exc, self._other_backoff, self.now(), "regions.get") from exc
        self._other_backoff.reset()
        out: list[Quota] = []
        for q in data.quotas:
            metric = str(q.metric)
            if metric.endswith("_GPUS"):
                unit = QuotaUnit.GPUS
            elif metric == "CPUS" or metric.endswith("_CPUS"):
                unit = QuotaUnit.VCPUS
            else:
                continue
            out.append(
                Quota(
                    group=metric.lower(),
                    name=metric,
                    limit=float(q.limit),
                    usage=float(q.usage),
                    unit=unit,
                    description=f"{metric} in {region}",
                )
            )
        return out

    def _regions(self) -> Any:
        with self._lock:
            if self._regions_client is None:
                self._regions_client = regions_client(self.params)
            return self._regions_client

    def stop(self) -> None:
        for client in (self.client, self.operations, self._regions_client):
            if client is None:
                continue
            transport = getattr(client, "transport", None)
            if transport is not None:
                transport.close()


class GCEDriver(Driver):
    """Google Compute Engine: standard and spot VMs in the zones of one region."""

    parameters_model = GCEParameters
    capabilities = frozenset(
        {
            "price_history",
            "spot",
            "gpu",
            "quota_errors",
            "capacity_errors",
            "rate_limit_errors",
            "idempotent_create",
            "quota_headroom",
        }
    )

    def instance_set(self, params: DriverParameters, context: DriverContext) -> InstanceSet:
        assert isinstance(params, GCEParameters)
        return GCEInstanceSet(params, context)

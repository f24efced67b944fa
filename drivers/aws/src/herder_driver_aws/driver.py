"""The ``aws`` driver: EC2 instances through boto3 (SPEC §16.2, improved).

What it improves on Arvados' EC2 driver, and why:

* Throttle back-off is reset by any non-throttle answer, quota and capacity errors included
  (SPEC §19 item 34): they prove the API takes calls again.
* Spot prices are also fetched when a price history is asked for and the cache is stale, not
  only during listings (SPEC §19 item 34), so a new spot instance has prices at once.
* ``set_tags`` replaces the tag map as herder's interface says (Arvados only adds and
  overwrites): tags herder no longer sets are deleted, ``aws:`` tags are left alone.
* Availability zones come from DescribeInstances' placement, so no DescribeInstanceStatus
  round trips are needed for spot prices.
* A key pair import that races another herder (``InvalidKeyPair.Duplicate``) uses the key pair
  the other one imported: its name embeds the key's fingerprint.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any, ClassVar

import boto3
import botocore.config
import botocore.session
from botocore.exceptions import ClientError
from prometheus_client import CollectorRegistry, Counter, Gauge

from herder.cloud import (
    CloudError,
    Driver,
    DriverContext,
    DriverParameters,
    Instance,
    InstancePrice,
    InstanceSet,
    Quota,
    QuotaUnit,
    create_key,
)
from herder.model import InstanceType
from herder_driver_aws.errors import (
    Backoff,
    classify,
    error_code,
    is_capacity_error,
    is_subnet_specific,
)
from herder_driver_aws.keys import fingerprints, key_pair_name
from herder_driver_aws.params import AWSParameters
from herder_driver_aws.prices import GIB, SpotPriceCache, ebs_hourly_cost
from herder_driver_aws.quota import quota_group

#: EC2 states in which an instance is gone or going: herder must not count it.
GONE_STATES = frozenset({"shutting-down", "terminated"})
#: The device the extra scratch volume is attached as.
SCRATCH_DEVICE = "/dev/xvdt"
#: How many recent create keys remember the subnet their last attempt used.
REMEMBERED_CREATE_KEYS = 1000


def client_token(key: str, subnet: str) -> str:
    """RunInstances' ``ClientToken`` for create key ``key`` in ``subnet``: at most 64 ASCII
    characters, as EC2 requires.  One per subnet, since EC2 answers a token reused with other
    parameters (another subnet, on failover) with ``IdempotentParameterMismatch``."""
    return hashlib.sha256(f"{key}\0{subnet}".encode()).hexdigest()


def format_price(price: float) -> str:
    """The shortest decimal that reads back as ``price``, never in exponent form (``0.00001``)."""
    text = format(Decimal(repr(float(price))), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def user_data(init_command: str) -> str:
    """The first-boot script (boto3 base64-encodes it for RunInstances)."""
    return f"#!/bin/sh\n{init_command}\n"


def ec2_client(params: AWSParameters, service: str = "ec2") -> Any:
    """An EC2 client (or another ``service``'s) with SDK retries off (herder's pool does its
    own) and timeouts set.

    Credentials: static keys (the secret and session token read now from where the parameters
    point), else a named profile, else boto3's default chain; instance metadata is then only
    read with IMDSv2 tokens.
    """
    core = botocore.session.Session(profile=params.profile or None)
    core.set_config_variable("ec2_metadata_v1_disabled", True)
    try:
        secret = params.secret_access_key.read() if params.secret_access_key else None
        token = params.session_token.read() if params.session_token else None
    except ValueError as exc:  # names the variable or file, never the secret
        raise CloudError(f"cloud.driver_parameters: {exc}") from None
    session = boto3.Session(
        botocore_session=core,
        region_name=params.region,
        aws_access_key_id=params.access_key_id or None,
        aws_secret_access_key=secret,
        aws_session_token=token,
    )
    config = botocore.config.Config(
        retries={"mode": "standard", "total_max_attempts": 1},
        connect_timeout=params.connect_timeout,
        read_timeout=params.read_timeout,
    )
    return session.client(service, endpoint_url=params.endpoint_url or None, config=config)


class EC2Metrics:
    """``herder_ec2_instance_starts_total{subnet_id,success}`` and ``herder_ec2_instances``."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.starts = Counter(
            "herder_ec2_instance_starts",
            "RunInstances attempts, by subnet and whether they succeeded",
            ["subnet_id", "success"],
            registry=registry,
        )
        self.instances = Gauge(
            "herder_ec2_instances",
            "Instances listed, by subnet",
            ["subnet_id"],
            registry=registry,
        )


class AWSInstance(Instance):
    """One EC2 instance, as described by RunInstances or DescribeInstances."""

    def __init__(self, instance_set: AWSInstanceSet, data: Mapping[str, Any]) -> None:
        self._set = instance_set
        self._data = data

    @property
    def id(self) -> str:
        return str(self._data["InstanceId"])

    @property
    def provider_type(self) -> str:
        return str(self._data.get("InstanceType", ""))

    @property
    def address(self) -> str:
        return str(self._data.get("PrivateIpAddress") or "")

    @property
    def remote_user(self) -> str:
        return self._set.params.admin_username

    @property
    def tags(self) -> dict[str, str]:
        return {t["Key"]: t.get("Value", "") for t in self._data.get("Tags", [])}

    @property
    def subnet_id(self) -> str:
        return str(self._data.get("SubnetId") or "")

    @property
    def availability_zone(self) -> str:
        return str(self._data.get("Placement", {}).get("AvailabilityZone") or "")

    @property
    def is_spot(self) -> bool:
        return self._data.get("InstanceLifecycle") == "spot"

    @property
    def vcpus(self) -> int:
        """vCPUs from the instance's CPU options; 0 when EC2 did not say."""
        options = self._data.get("CpuOptions") or {}
        return int(options.get("CoreCount", 0)) * int(options.get("ThreadsPerCore", 1))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._set.replace_tags(self.id, tags)

    def destroy(self) -> None:
        self._set.terminate(self.id)

    def price_history(self, instance_type: InstanceType) -> list[InstancePrice]:
        """Spot prices of this instance's type and zone, plus its scratch volume's cost."""
        if not self.is_spot:
            return []
        key = (self.provider_type, self.availability_zone)
        self._set.prices.refresh([key])
        extra = ebs_hourly_cost(instance_type.added_scratch, self._set.params.ebs_price)
        return [
            InstancePrice(start_time=p.start_time, price=p.price + extra)
            for p in self._set.prices.series(key)
        ]


class AWSInstanceSet(InstanceSet):
    """The instances of one herder installation in one EC2 region."""

    #: DescribeInstances page size (EC2 allows 5 to 1000).
    page_size: ClassVar[int] = 500

    def __init__(
        self,
        params: AWSParameters,
        context: DriverContext,
        client: Any = None,
        quotas_client: Any = None,
    ) -> None:
        """``client`` (EC2) and ``quotas_client`` (Service Quotas, made when first needed)
        are built from ``params`` unless given."""
        self.params = params
        self.context = context
        self.client = client if client is not None else ec2_client(params)
        self._quotas_client = quotas_client
        self._vcpus: dict[str, int] = {}  # provider type -> default vCPUs, from EC2
        self._log = context.logger
        self._now: Callable[[], float] = (
            context.runtime.now if context.runtime is not None else time.time
        )
        self.metrics = EC2Metrics(context.metrics_registry)
        self.prices = SpotPriceCache(
            lambda **request: self.client.describe_spot_price_history(**request),
            params.spot_price_update_interval,
            self._now,
            self._log,
        )
        self._create_backoff = Backoff()
        self._list_backoff = Backoff()
        self._other_backoff = Backoff()
        self._lock = threading.Lock()  # guards the three fields below
        self._key_names: dict[str, str] = {}  # first fingerprint -> key pair name
        self._subnet_index = 0
        self._key_subnets: OrderedDict[str, int] = OrderedDict()  # create key -> subnet index
        self._key_lock = threading.Lock()  # one key-pair lookup/import at a time

    # ----------------------------------------------------------------- create

    def create(
        self,
        instance_type: InstanceType,
        image_id: str,
        tags: Mapping[str, str],
        init_command: str,
        public_key: str | None,
    ) -> Instance:
        """RunInstances with herder's create key as the client token: EC2 answers a repeated
        create (one that timed out but went through) with the instance it made the first time,
        as long as it is repeated in the same subnet, which the set remembers per key."""
        key_name = self._key_pair(public_key) if public_key else None
        request = self._run_request(instance_type, image_id, tags, init_command, key_name)
        data = self._run_with_failover(request, create_key(tags, self.context.tag_key_prefix))
        return AWSInstance(self, data)

    def _run_request(
        self,
        it: InstanceType,
        image_id: str,
        tags: Mapping[str, str],
        init_command: str,
        key_name: str | None,
    ) -> dict[str, Any]:
        """The RunInstances request, without the subnet (added per failover attempt)."""
        instance_tags = {**self.params.resource_tags, **tags}
        nic: dict[str, Any] = {
            "DeviceIndex": 0,
            "AssociatePublicIpAddress": self.params.associate_public_ip,
            "DeleteOnTermination": True,
        }
        if self.params.security_group_ids:
            nic["Groups"] = list(self.params.security_group_ids)
        request: dict[str, Any] = {
            "ImageId": image_id,
            "InstanceType": it.provider_type,
            "MinCount": 1,
            "MaxCount": 1,
            "NetworkInterfaces": [nic],
            "DisableApiTermination": False,
            "InstanceInitiatedShutdownBehavior": "terminate",
            "MetadataOptions": {"HttpEndpoint": "enabled", "HttpTokens": "required"},
            "UserData": user_data(init_command),
            "TagSpecifications": self._tag_specifications(instance_tags, it),
        }
        if key_name:
            request["KeyName"] = key_name
        if it.added_scratch > 0:
            request["BlockDeviceMappings"] = [
                {
                    "DeviceName": SCRATCH_DEVICE,
                    "Ebs": {
                        "VolumeSize": math.ceil(it.added_scratch / GIB),
                        "VolumeType": self.params.ebs_volume_type,
                        "DeleteOnTermination": True,
                    },
                }
            ]
        if it.preemptible:
            spot: dict[str, Any] = {
                "SpotInstanceType": "one-time",
                "InstanceInterruptionBehavior": "terminate",
            }
            if it.price > 0:
                spot["MaxPrice"] = format_price(it.price)
            request["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": spot}
        if self.params.iam_instance_profile:
            request["IamInstanceProfile"] = {"Name": self.params.iam_instance_profile}
        return request

    def _tag_specifications(
        self, instance_tags: Mapping[str, str], it: InstanceType
    ) -> list[dict[str, Any]]:
        """herder's tags on the instance; the shared resource tags on its volumes too."""
        specs = [{"ResourceType": "instance", "Tags": _tag_list(instance_tags)}]
        shared = {**self.context.shared_resource_tags, **self.params.resource_tags}
        if shared:
            specs.append({"ResourceType": "volume", "Tags": _tag_list(shared)})
        return specs

    def _run_with_failover(self, request: dict[str, Any], key: str | None) -> dict[str, Any]:
        """RunInstances in each subnet in turn, from the last one used (for a repeated create
        key: the one its last attempt used), while errors are subnet-specific; report a
        capacity error over any other (SPEC §16.2)."""
        subnets = self.params.subnet_ids or [""]
        with self._lock:
            start = self._subnet_index
            if key is not None and key in self._key_subnets:
                start = self._key_subnets[key] % len(subnets)
        last: ClientError | None = None
        capacity: ClientError | None = None
        for attempt in range(len(subnets)):
            index = (start + attempt) % len(subnets)
            subnet = subnets[index]
            nic = dict(request["NetworkInterfaces"][0])
            if subnet:
                nic["SubnetId"] = subnet
            attempt_request = {**request, "NetworkInterfaces": [nic]}
            if key is not None:
                attempt_request["ClientToken"] = client_token(key, subnet)
                self._remember_subnet(key, index)
            try:
                reply = self.client.run_instances(**attempt_request)
            except ClientError as exc:
                self._after_attempt(index, subnet, success=False)
                code, message = error_code(exc)
                self._log.info("RunInstances in subnet %r failed: %s: %s", subnet, code, message)
                last = exc
                if is_capacity_error(code, message):
                    capacity = exc
                if not is_subnet_specific(code, message):
                    break
                continue
            except Exception as exc:
                self._after_attempt(index, subnet, success=False)
                raise classify(exc, self._create_backoff, self._now(), "RunInstances") from exc
            self._after_attempt(index, subnet, success=True)
            self._create_backoff.reset()
            return dict(reply["Instances"][0])
        failure = capacity or last
        assert failure is not None
        raise classify(failure, self._create_backoff, self._now(), "RunInstances") from failure

    def _remember_subnet(self, key: str, index: int) -> None:
        """Remember where the create with ``key`` was last tried (the newest keys only)."""
        with self._lock:
            self._key_subnets[key] = index
            self._key_subnets.move_to_end(key)
            while len(self._key_subnets) > REMEMBERED_CREATE_KEYS:
                self._key_subnets.popitem(last=False)

    def _after_attempt(self, index: int, subnet: str, *, success: bool) -> None:
        """Count the attempt and remember the subnet, failed or not, to start there next."""
        self.metrics.starts.labels(subnet_id=subnet, success=str(success).lower()).inc()
        with self._lock:
            self._subnet_index = index

    # ----------------------------------------------------------------- key pairs

    def _key_pair(self, public_key: str) -> str:
        """The name of the key pair holding ``public_key``, imported on first use."""
        try:
            prints = fingerprints(public_key)
        except ValueError as exc:
            raise CloudError(f"Could not make key fingerprint: {exc}") from exc
        with self._key_lock:
            cached = self._key_names.get(prints[0])
            if cached:
                return cached
            name = self._find_key_pair(prints) or self._import_key_pair(public_key, prints[0])
            self._key_names[prints[0]] = name
            return name

    def _find_key_pair(self, prints: list[str]) -> str | None:
        try:
            reply = self.client.describe_key_pairs(
                Filters=[{"Name": "fingerprint", "Values": prints}]
            )
        except ClientError as exc:
            raise CloudError(f"Could not search for keypair: {_describe(exc)}") from exc
        pairs = reply.get("KeyPairs", [])
        return str(pairs[0]["KeyName"]) if pairs else None

    def _import_key_pair(self, public_key: str, fingerprint: str) -> str:
        name = key_pair_name(fingerprint)
        try:
            self.client.import_key_pair(KeyName=name, PublicKeyMaterial=public_key.encode())
        except ClientError as exc:
            if error_code(exc)[0] != "InvalidKeyPair.Duplicate":
                raise CloudError(f"Could not import keypair: {_describe(exc)}") from exc
        return name

    # ----------------------------------------------------------------- listing

    def instances(self, tags: Mapping[str, str]) -> list[Instance]:
        filters = [{"Name": f"tag:{k}", "Values": [v]} for k, v in tags.items()]
        try:
            found = self._describe_all(filters)
        except Exception as exc:
            raise classify(exc, self._list_backoff, self._now(), "DescribeInstances") from exc
        self._list_backoff.reset()
        self._count_by_subnet(found)
        spot = {(i.provider_type, i.availability_zone) for i in found if i.is_spot}
        if spot:
            self.prices.refresh(spot)
        return list(found)

    def _describe_all(self, filters: list[dict[str, Any]]) -> list[AWSInstance]:
        """Every page of DescribeInstances, without instances that are gone or going."""
        request: dict[str, Any] = {"Filters": filters, "MaxResults": self.page_size}
        found: list[AWSInstance] = []
        while True:
            reply = self.client.describe_instances(**request)
            for reservation in reply.get("Reservations", []):
                for data in reservation.get("Instances", []):
                    if data.get("State", {}).get("Name") not in GONE_STATES:
                        found.append(AWSInstance(self, data))
            token = reply.get("NextToken")
            if not token:
                return found
            request["NextToken"] = token

    def _count_by_subnet(self, found: list[AWSInstance]) -> None:
        """Instances per subnet; configured subnets (and "") are reported even when empty."""
        counts = dict.fromkeys(["", *self.params.subnet_ids], 0)
        for instance in found:
            counts[instance.subnet_id] = counts.get(instance.subnet_id, 0) + 1
        for subnet, count in counts.items():
            self.metrics.instances.labels(subnet_id=subnet).set(count)

    # ----------------------------------------------------------------- per instance

    def replace_tags(self, instance_id: str, tags: Mapping[str, str]) -> None:
        """Make the instance's tags exactly ``tags`` (``aws:`` tags excepted: AWS owns them)."""
        try:
            reply = self.client.describe_tags(
                Filters=[{"Name": "resource-id", "Values": [instance_id]}]
            )
            current = {t["Key"] for t in reply.get("Tags", [])}
            if tags:
                self.client.create_tags(Resources=[instance_id], Tags=_tag_list(tags))
            stale = sorted(k for k in current - set(tags) if not k.startswith("aws:"))
            if stale:
                self.client.delete_tags(Resources=[instance_id], Tags=[{"Key": k} for k in stale])
        except Exception as exc:
            raise classify(exc, self._other_backoff, self._now(), "CreateTags") from exc
        self._other_backoff.reset()

    def terminate(self, instance_id: str) -> None:
        """TerminateInstances; an instance AWS no longer knows is already destroyed."""
        try:
            self.client.terminate_instances(InstanceIds=[instance_id])
        except ClientError as exc:
            if error_code(exc)[0] == "InvalidInstanceID.NotFound" or self._is_gone(instance_id):
                return
            raise classify(exc, self._other_backoff, self._now(), "TerminateInstances") from exc
        self._other_backoff.reset()

    def _is_gone(self, instance_id: str) -> bool:
        """Whether the instance is already terminated or terminating (a repeated destroy:
        some EC2 implementations refuse to terminate an instance twice)."""
        try:
            reply = self.client.describe_instances(InstanceIds=[instance_id])
        except ClientError:
            return False
        states = {
            data.get("State", {}).get("Name")
            for reservation in reply.get("Reservations", [])
            for data in reservation.get("Instances", [])
        }
        return bool(states) and states <= GONE_STATES

    def quota_group(self, instance_type: InstanceType) -> str:
        return quota_group(
            instance_type.provider_type,
            instance_type.preemptible,
            self.params.instance_type_quota_groups,
        )

    # ----------------------------------------------------------------- quotas

    def quotas(self) -> list[Quota]:
        """The vCPU quotas of ``quota_codes`` from Service Quotas, with the account's usage.

        Usage is counted from DescribeInstances (every pending or running instance of the
        region, herder's or not, by its type's quota group and vCPUs), not from CloudWatch's
        usage metrics, which lag by minutes: an instance made a second ago counts.  A code
        Service Quotas does not know in this region is left out.
        """
        usage = self._vcpu_usage()
        client = self._quotas()
        out: list[Quota] = []
        for group, code in sorted(self.params.quota_codes.items()):
            try:
                reply = client.get_service_quota(ServiceCode="ec2", QuotaCode=code)
            except ClientError as exc:
                if error_code(exc)[0] == "NoSuchResourceException":
                    continue
                raise classify(exc, self._other_backoff, self._now(), "GetServiceQuota") from exc
            self._other_backoff.reset()
            quota = reply.get("Quota", {})
            out.append(
                Quota(
                    group=group,
                    name=code,
                    limit=float(quota.get("Value", 0.0)),
                    usage=float(usage.get(group, 0)),
                    unit=QuotaUnit.VCPUS,
                    description=str(quota.get("QuotaName", "")),
                )
            )
        return out

    def _quotas(self) -> Any:
        if self._quotas_client is None:
            self._quotas_client = ec2_client(self.params, "service-quotas")
        return self._quotas_client

    def _vcpu_usage(self) -> dict[str, int]:
        """vCPUs of the region's pending and running instances, by quota group."""
        try:
            found = self._describe_all(
                [{"Name": "instance-state-name", "Values": ["pending", "running"]}]
            )
            by_group: dict[str, int] = {}
            for inst in found:
                group = quota_group(
                    inst.provider_type, inst.is_spot, self.params.instance_type_quota_groups
                )
                by_group[group] = by_group.get(group, 0) + self._vcpus_of(inst)
        except ClientError as exc:
            raise classify(exc, self._list_backoff, self._now(), "DescribeInstances") from exc
        return by_group

    def _vcpus_of(self, inst: AWSInstance) -> int:
        """An instance's vCPUs: its CPU options, else its type's default (asked once a type)."""
        if inst.vcpus:
            return inst.vcpus
        name = inst.provider_type
        if name not in self._vcpus:
            reply = self.client.describe_instance_types(InstanceTypes=[name])
            (info,) = reply.get("InstanceTypes", [{}])[:1] or [{}]
            self._vcpus[name] = int(info.get("VCpuInfo", {}).get("DefaultVCpus", 0))
        return self._vcpus[name]

    def stop(self) -> None:
        self.client.close()
        if self._quotas_client is not None:
            self._quotas_client.close()


def _tag_list(tags: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def _describe(exc: ClientError) -> str:
    code, message = error_code(exc)
    return f"{code}: {message}"


class AWSDriver(Driver):
    """Amazon EC2: on-demand and spot instances in one region."""

    parameters_model = AWSParameters
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
        assert isinstance(params, AWSParameters)
        return AWSInstanceSet(params, context)

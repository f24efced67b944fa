"""The ``azure`` driver: Azure virtual machines through azure-mgmt-compute (SPEC §16.3, improved).

What it improves on Arvados' Azure driver, and why:

* Instance types with ``added_scratch`` get an empty managed data disk of that size (Arvados
  refuses to create them).
* Capacity errors are reported (allocation failures, per VM size; full VM-family or spot
  quotas, per quota group), and quota groups follow Azure's VM families, so herder tries
  another size instead of the same one again (Arvados has one quota group and no capacity
  errors, SPEC §19 item 32).
* A 429 without ``Retry-After`` is a 20 s rate limit, not a crash (SPEC §19 item 31).
* NIC and disks are created with ``deleteOption: Delete``, so Azure deletes them with the VM;
  a VM whose create failed after Azure accepted it is deleted at once, then its NIC.  The
  background clean-up is a safety net, and stops without the closed-channel panic (SPEC §19
  item 32).
* ``set_tags`` sends only the tags (a PATCH with ``If-Match``), re-reading and retrying when
  the VM changed meanwhile, so a concurrent change is never lost (Arvados re-submits the whole
  VM it read earlier).
* Long-running operations are polled every ``poll_interval`` (2 s), not the SDK's 30 s.
* Spot VMs' maximum price is the instance type's price, or -1 (pay up to the on-demand price,
  never evicted for price) with ``spot_max_price: on-demand`` or a type without a price.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import logging
import math
import re
import secrets
import string
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from azure.core import MatchConditions
from azure.core.credentials import TokenCredential
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.mgmt.compute import ComputeManagementClient
from azure.mgmt.compute import models as cm
from azure.mgmt.network import NetworkManagementClient
from azure.mgmt.network import models as nm

from herder.cloud import (
    CloudError,
    Driver,
    DriverContext,
    DriverParameters,
    Instance,
    InstanceSet,
    Quota,
    QuotaUnit,
    RateLimitError,
    create_key,
)
from herder.model import InstanceType
from herder_driver_azure import tags as tagcodec
from herder_driver_azure.cleanup import Cleaner, Dangling
from herder_driver_azure.errors import classify
from herder_driver_azure.params import AzureParameters
from herder_driver_azure.quota import SPOT_GROUP, quota_group

GIB = 1 << 30
#: Azure's limit on a Linux VM's name and computer name.
MAX_VM_NAME = 64
#: The random part of every name: 15 lowercase letters and digits, as Arvados.
RANDOM_LENGTH = 15
#: How often set_tags re-reads and retries when the VM changed between its read and write.
TAG_ATTEMPTS = 5
#: The data disk herder adds for ``added_scratch``.
SCRATCH_LUN = 0

_ALPHABET = string.ascii_lowercase + string.digits
_URN = re.compile(r"[^:\s]+:[^:\s]+:[^:\s]+:[^:\s]+")


def custom_data(init_command: str) -> str:
    """The first-boot script, base64-encoded as the VM's custom data (cloud-init runs it)."""
    return base64.b64encode(f"#!/bin/sh\n{init_command}\n".encode()).decode()


def rfc3339(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).isoformat(timespec="seconds")


def parse_time(value: Any) -> float | None:
    """Epoch seconds of an RFC 3339 string or a datetime; None when unreadable."""
    if isinstance(value, datetime.datetime):
        return value.timestamp()
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    return parsed.timestamp()


def make_credential(params: AzureParameters) -> TokenCredential:
    """The credential the clients sign in with.

    A service principal when ``client_id`` is set (its secret read now from the file or
    environment variable named in the parameters), else azure-identity's default chain
    (environment, workload identity, managed identity, Azure CLI, ...).  A custom
    ``authority_host`` (Azure Stack, a proxy) turns off the sign-in host's instance discovery,
    which would otherwise ask the public cloud whether that host is legitimate.
    """
    from azure.identity import ClientSecretCredential, DefaultAzureCredential

    transport: dict[str, Any] = {}
    if params.ca_bundle:
        transport["connection_verify"] = params.ca_bundle
    if params.uses_service_principal:
        try:
            secret = params.read_client_secret()
        except ValueError as exc:
            raise CloudError(str(exc)) from None
        return ClientSecretCredential(
            params.tenant_id,
            params.client_id,
            secret,
            authority=params.authority,
            disable_instance_discovery=bool(params.authority_host),
            **transport,
        )
    return DefaultAzureCredential(authority=params.authority, **transport)


def client_options(params: AzureParameters) -> dict[str, Any]:
    """What both management clients are built with: endpoint, token scope, CA bundle,
    timeouts, the poll interval, and the SDK's own retries off (herder's pool retries, and
    must see a 429 to honour its ``Retry-After`` for every call)."""
    options: dict[str, Any] = {
        "base_url": params.endpoint,
        "credential_scopes": [f"{params.endpoint}/.default"],
        "polling_interval": params.poll_interval,
        "retry_total": 0,
        "connection_timeout": params.connect_timeout,
        "read_timeout": params.read_timeout,
    }
    if params.ca_bundle:
        options["connection_verify"] = params.ca_bundle
    return options


class AzureInstance(Instance):
    """One VM, as the create call or a listing described it."""

    def __init__(self, instance_set: AzureInstanceSet, vm: cm.VirtualMachine, address: str) -> None:
        self._set = instance_set
        self._vm = vm
        self._address = address

    @property
    def name(self) -> str:
        return str(self._vm.name)

    @property
    def id(self) -> str:
        """The VM's resource id, built from the configured names so that it never changes
        case between calls (Azure returns some ids with the resource group uppercased)."""
        return self._set.resource_id("Microsoft.Compute/virtualMachines", self.name)

    @property
    def provider_type(self) -> str:
        hardware = self._vm.properties.hardware_profile if self._vm.properties else None
        return str(hardware.vm_size) if hardware and hardware.vm_size else ""

    @property
    def address(self) -> str:
        return self._address

    @property
    def remote_user(self) -> str:
        return self._set.params.admin_username

    @property
    def tags(self) -> dict[str, str]:
        return tagcodec.decode(self._vm.tags)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Replace herder's tags; this snapshot then shows the VM as Azure returned it."""
        self._vm = self._set.replace_tags(self.name, tags)

    def destroy(self) -> None:
        self._set.delete_vm(self.name)

    def __str__(self) -> str:
        return self.name


class AzureInstanceSet(InstanceSet):
    """The VMs of one herder installation in one resource group.

    ``credential`` (any azure-core ``TokenCredential``) is for programs that embed herder and
    already hold one; without it the parameters say how to sign in (:func:`make_credential`).
    ``compute`` / ``network`` replace the management clients the same way.
    """

    def __init__(
        self,
        params: AzureParameters,
        context: DriverContext,
        *,
        credential: TokenCredential | None = None,
        compute: ComputeManagementClient | None = None,
        network: NetworkManagementClient | None = None,
    ) -> None:
        self.params = params
        self.context = context
        self._log = context.logger
        self._now: Callable[[], float] = (
            context.runtime.now if context.runtime is not None else time.time
        )
        #: The credential this set made itself, and so closes on stop (None if given one).
        self._own_credential: TokenCredential | None = None
        if compute is None or network is None:
            if credential is None:
                credential = self._own_credential = make_credential(params)
            options = client_options(params)
            sub = params.subscription_id
            compute = compute or ComputeManagementClient(credential, sub, **options)
            network = network or NetworkManagementClient(credential, sub, **options)
        self.credential = credential
        self.compute = compute
        self.network = network
        set_part = re.sub(r"[^a-z0-9-]", "-", context.instance_set_id.lower()).strip("-")
        room = MAX_VM_NAME - len(params.name_prefix) - RANDOM_LENGTH - 2
        #: Every resource this instance set creates is named ``<prefix>-<set>-<random>...``.
        self.name_prefix = f"{params.name_prefix}-{set_part[:room].rstrip('-')}-"
        self._lock = threading.Lock()  # guards the two fields below
        self._creating: set[str] = set()  # VM names whose create is in progress here
        self._spare_key: str | None = None
        self.cleaner = Cleaner(
            self.find_dangling,
            self.delete_dangling,
            parallelism=params.cleanup_parallelism,
            interval=params.cleanup_interval,
            logger=self._log,
        )
        self.cleaner.start()

    # ----------------------------------------------------------------- names and ids

    def resource_id(self, provider_type: str, name: str, group: str | None = None) -> str:
        return (
            f"/subscriptions/{self.params.subscription_id}/resourceGroups/"
            f"{group or self.params.resource_group}/providers/{provider_type}/{name}"
        )

    def new_name(self) -> str:
        return self.name_prefix + "".join(secrets.choice(_ALPHABET) for _ in range(RANDOM_LENGTH))

    def name_for_key(self, key: str) -> str:
        """The VM name of the create with ``key``: the random part derived from the key, so
        that a repeated create looks for (and finds) the VM the first one made."""
        hashed = int.from_bytes(hashlib.sha256(key.encode()).digest(), "big")
        chars = []
        for _ in range(RANDOM_LENGTH):
            hashed, index = divmod(hashed, len(_ALPHABET))
            chars.append(_ALPHABET[index])
        return self.name_prefix + "".join(chars)

    def image_reference(self, image_id: str) -> cm.ImageReference:
        """The image: a resource id as given (managed image, gallery image version), a
        marketplace URN ``publisher:offer:sku:version``, or a name: a version of that image in
        the configured shared image gallery, else a managed image in the image resource group.
        """
        p = self.params
        if not image_id:
            raise CloudError("no image: set cloud.image_id")
        if image_id.startswith(("http://", "https://")):
            raise CloudError(
                f"image {image_id!r} is a VHD URL: unmanaged images are not supported, use a "
                "managed image, a shared image gallery version or a marketplace image"
            )
        if image_id.startswith("/"):
            return cm.ImageReference(id=image_id)
        if _URN.fullmatch(image_id):
            publisher, offer, sku, version = image_id.split(":")
            return cm.ImageReference(publisher=publisher, offer=offer, sku=sku, version=version)
        if p.shared_image_gallery_name:
            return cm.ImageReference(
                id=self.resource_id(
                    "Microsoft.Compute/galleries",
                    f"{p.shared_image_gallery_name}/images/{image_id}/versions/"
                    f"{p.shared_image_gallery_image_version}",
                    p.image_group,
                )
            )
        return cm.ImageReference(
            id=self.resource_id("Microsoft.Compute/images", image_id, p.image_group)
        )

    # ----------------------------------------------------------------- create

    def create(
        self,
        instance_type: InstanceType,
        image_id: str,
        tags: Mapping[str, str],
        init_command: str,
        public_key: str | None,
    ) -> Instance:
        """Create the NIC, then the VM.  With a create key the VM's name comes from the key
        and is looked up first: a repeated create (after one that timed out but went through)
        returns the VM the first one made instead of making a second."""
        encoded = tagcodec.encode(tags)
        image = self.image_reference(image_id)
        key = create_key(tags, self.context.tag_key_prefix)
        name = self.new_name() if key is None else self.name_for_key(key)
        if key is not None:
            existing = self._made_by(name, key)
            if existing is not None:
                return existing
        stamp = {tagcodec.CREATED_AT: rfc3339(self._now())}
        with self._lock:
            self._creating.add(name)
        try:
            shared = tagcodec.encode(tagcodec.merge(self.context.shared_resource_tags, tags))
            nic = self._create_nic(name, {**shared, **stamp})
            vm = self._create_vm(
                name,
                instance_type,
                image,
                {**encoded, **stamp},
                init_command,
                public_key,
                str(nic.id),
            )
        finally:
            with self._lock:
                self._creating.discard(name)
        return AzureInstance(self, vm, _private_address(nic))

    def _made_by(self, name: str, key: str) -> AzureInstance | None:
        """VM ``name`` if the create with ``key`` made it and it is not going away, else None;
        a VM of that name made by another create is an error (never adopted)."""
        rg = self.params.resource_group
        try:
            vm = self.compute.virtual_machines.get(rg, name)
        except ResourceNotFoundError:
            return None
        except Exception as exc:
            raise self._classify(exc, "read virtual machine") from exc
        state = vm.properties.provisioning_state if vm.properties else None
        if str(state or "").lower() in ("deleting", "failed"):
            return None
        if create_key(tagcodec.decode(vm.tags), self.context.tag_key_prefix) != key:
            raise CloudError(f"virtual machine {name} exists but another create made it")
        try:
            nic = self.network.network_interfaces.get(rg, f"{name}-nic")
        except ResourceNotFoundError:
            return AzureInstance(self, vm, "")  # the next listing has the address
        except Exception as exc:
            raise self._classify(exc, "read network interface") from exc
        return AzureInstance(self, vm, _private_address(nic))

    def _create_nic(self, name: str, nic_tags: dict[str, str]) -> nm.NetworkInterface:
        p = self.params
        subnet = self.resource_id(
            "Microsoft.Network/virtualNetworks", f"{p.network}/subnets/{p.subnet}", p.network_group
        )
        body = nm.NetworkInterface(
            location=p.location,
            tags=nic_tags,
            properties=nm.NetworkInterfacePropertiesFormat(
                ip_configurations=[
                    nm.NetworkInterfaceIPConfiguration(
                        name="primary",
                        properties=nm.NetworkInterfaceIPConfigurationPropertiesFormat(
                            primary=True,
                            subnet=nm.Subnet(id=subnet),
                            private_ip_allocation_method="Dynamic",
                        ),
                    )
                ]
            ),
        )
        try:
            poller = self.network.network_interfaces.begin_create_or_update(
                p.resource_group, f"{name}-nic", body
            )
        except Exception as exc:
            raise self._classify(exc, "create network interface") from exc
        try:
            return poller.result()
        except Exception as exc:
            error = self._classify(exc, "create network interface")
            self._delete_quietly("nic", f"{name}-nic")
            raise error from exc

    def vm_model(
        self,
        name: str,
        it: InstanceType,
        image: cm.ImageReference,
        vm_tags: dict[str, str],
        init_command: str,
        public_key: str | None,
        nic_id: str,
    ) -> cm.VirtualMachine:
        """The VM to create (see the package README for what each part is for)."""
        p = self.params
        key = public_key.strip() if public_key else self._throwaway_key()
        os_disk = cm.OSDisk(
            name=f"{name}-os",
            create_option="FromImage",
            delete_option="Delete",
            caching="ReadWrite",
        )
        if p.os_disk_type:
            os_disk.managed_disk = cm.ManagedDiskParameters(storage_account_type=p.os_disk_type)
        if p.os_disk_size_gb:
            os_disk.disk_size_gb = p.os_disk_size_gb
        storage = cm.StorageProfile(image_reference=image, os_disk=os_disk)
        if it.added_scratch > 0:
            storage.data_disks = [
                cm.DataDisk(
                    lun=SCRATCH_LUN,
                    name=f"{name}-scratch",
                    create_option="Empty",
                    disk_size_gb=math.ceil(it.added_scratch / GIB),
                    delete_option="Delete",
                    managed_disk=cm.ManagedDiskParameters(storage_account_type=p.data_disk_type),
                )
            ]
        props = cm.VirtualMachineProperties(
            hardware_profile=cm.HardwareProfile(vm_size=it.provider_type),
            storage_profile=storage,
            os_profile=cm.OSProfile(
                computer_name=name,
                admin_username=p.admin_username,
                custom_data=custom_data(init_command),
                linux_configuration=cm.LinuxConfiguration(
                    disable_password_authentication=True,
                    ssh=cm.SshConfiguration(
                        public_keys=[
                            cm.SshPublicKey(
                                path=f"/home/{p.admin_username}/.ssh/authorized_keys",
                                key_data=key,
                            )
                        ]
                    ),
                ),
            ),
            network_profile=cm.NetworkProfile(
                network_interfaces=[
                    cm.NetworkInterfaceReference(
                        id=nic_id,
                        properties=cm.NetworkInterfaceReferenceProperties(
                            primary=True, delete_option="Delete"
                        ),
                    )
                ]
            ),
        )
        if it.preemptible:
            props.priority = "Spot"
            props.eviction_policy = "Delete"
            use_type_price = p.spot_max_price == "type" and it.price > 0
            props.billing_profile = cm.BillingProfile(max_price=it.price if use_type_price else -1)
        return cm.VirtualMachine(location=p.location, tags=vm_tags, properties=props)

    def _create_vm(
        self,
        name: str,
        it: InstanceType,
        image: cm.ImageReference,
        vm_tags: dict[str, str],
        init_command: str,
        public_key: str | None,
        nic_id: str,
    ) -> cm.VirtualMachine:
        """Create the VM; on failure delete what was made (the VM if Azure accepted it, then
        the NIC) before raising the classified error."""
        body = self.vm_model(name, it, image, vm_tags, init_command, public_key, nic_id)
        rg = self.params.resource_group
        try:
            poller = self.compute.virtual_machines.begin_create_or_update(rg, name, body)
        except Exception as exc:
            error = self._classify(exc, "create virtual machine")
            self._delete_quietly("nic", f"{name}-nic")
            raise error from exc
        try:
            vm: cm.VirtualMachine = poller.result()
        except Exception as exc:
            error = self._classify(exc, "create virtual machine")
            self._log.info("create of %s failed after Azure accepted it: deleting it", name)
            self._delete_quietly("vm", name)
            self._delete_quietly("nic", f"{name}-nic")
            raise error from exc
        return vm

    def _throwaway_key(self) -> str:
        """An SSH key nobody holds, for creates without herder's key: Azure insists on a key
        (or a password) for the admin user, and herder must not open password logins."""
        with self._lock:
            if self._spare_key is None:
                from cryptography.hazmat.primitives import serialization
                from cryptography.hazmat.primitives.asymmetric import rsa

                private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
                self._spare_key = (
                    private.public_key()
                    .public_bytes(
                        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
                    )
                    .decode()
                )
            return self._spare_key

    def _delete_quietly(self, kind: str, name: str) -> None:
        """Delete what a failed create left; on failure the clean-up retries later."""
        try:
            self._delete(kind, name)
        except Exception as exc:
            self._log.warning(
                "cannot delete %s %s after a failed create (the clean-up will retry): %s",
                kind,
                name,
                exc,
            )

    # ----------------------------------------------------------------- listing

    def instances(self, tags: Mapping[str, str]) -> list[Instance]:
        """Every VM of the resource group that has ``tags``, with its NIC's address.

        NICs are listed first: their addresses, and the dangling ones to clean up.
        """
        rg = self.params.resource_group
        try:
            nics = list(self.network.network_interfaces.list(rg))
            vms = list(self.compute.virtual_machines.list(rg))
        except Exception as exc:
            raise self._classify(exc, "list") from exc
        addresses = {str(n.id).lower(): _private_address(n) for n in nics if n.id}
        self.cleaner.submit(self._dangling_nics(nics))
        found: list[Instance] = []
        for vm in vms:
            instance = AzureInstance(self, vm, self._vm_address(vm, addresses))
            if all(instance.tags.get(k) == v for k, v in tags.items()):
                found.append(instance)
        return found

    @staticmethod
    def _vm_address(vm: cm.VirtualMachine, addresses: Mapping[str, str]) -> str:
        network = vm.properties.network_profile if vm.properties else None
        refs = list(network.network_interfaces or []) if network else []
        refs.sort(key=lambda r: not (r.properties and r.properties.primary))
        for ref in refs:
            address = addresses.get(str(ref.id).lower())
            if address:
                return address
        return ""

    # ----------------------------------------------------------------- per instance

    def replace_tags(self, name: str, tags: Mapping[str, str]) -> cm.VirtualMachine:
        """Make herder's tags of VM ``name`` exactly ``tags``.

        Tags whose names start with herder's tag prefix (every tag, with an empty prefix) are
        replaced as a whole (one that ``tags`` lacks is removed); others (``created-at``, an
        operator's or a policy's) are kept unless ``tags`` sets them.  Only the tags are sent,
        with the ETag read, so a VM changed meanwhile is re-read and the change kept, not
        overwritten.
        """
        encoded = tagcodec.encode(tags)
        prefix = self.context.tag_key_prefix
        rg = self.params.resource_group
        for attempt in range(TAG_ATTEMPTS):
            try:
                vm = self.compute.virtual_machines.get(rg, name)
                kept = {k: v for k, v in (vm.tags or {}).items() if not self._herders(k, prefix)}
                condition: dict[str, Any] = {}
                if vm.etag:
                    condition = {"etag": vm.etag, "match_condition": MatchConditions.IfNotModified}
                updated: cm.VirtualMachine = self.compute.virtual_machines.begin_update(
                    rg,
                    name,
                    cm.VirtualMachineUpdate(tags=tagcodec.merge(kept, encoded)),
                    **condition,
                ).result()
                return updated
            except HttpResponseError as exc:
                if exc.status_code == 412 and attempt + 1 < TAG_ATTEMPTS:
                    self._log.debug("VM %s changed while its tags were set: retrying", name)
                    continue
                raise self._classify(exc, "set tags") from exc
            except Exception as exc:
                raise self._classify(exc, "set tags") from exc
        raise AssertionError("unreachable: the last attempt returns or raises")

    @staticmethod
    def _herders(stored: str, prefix: str) -> bool:
        """Whether a VM's tag is in herder's namespace, which set_tags replaces as a whole:
        names with herder's tag prefix, or, with an empty prefix, all but ``created-at``."""
        if stored.lower() == tagcodec.CREATED_AT:
            return False
        return not prefix or tagcodec.decode_name(stored).startswith(prefix)

    def delete_vm(self, name: str) -> None:
        """Delete VM ``name`` (with its NIC and disks); one already gone is not an error."""
        try:
            self._delete("vm", name)
        except Exception as exc:
            raise self._classify(exc, "delete virtual machine") from exc

    def _delete(self, kind: str, name: str) -> None:
        rg = self.params.resource_group
        try:
            if kind == "vm":
                self.compute.virtual_machines.begin_delete(rg, name).result()
            elif kind == "nic":
                self.network.network_interfaces.begin_delete(rg, name).result()
            elif kind == "disk":
                self.compute.disks.begin_delete(rg, name).result()
            else:
                raise ValueError(f"unknown resource kind {kind!r}")
        except ResourceNotFoundError:
            return

    # ----------------------------------------------------------------- clean-up

    def _is_ours(self, name: str | None) -> bool:
        if not name or not name.startswith(self.name_prefix):
            return False
        with self._lock:
            return not any(name.startswith(vm) for vm in self._creating)

    def _old_enough(self, created: float | None) -> bool:
        if created is None:
            return False
        return self._now() - created > self.params.delete_dangling_resources_after

    def _dangling_nics(self, nics: Iterable[nm.NetworkInterface]) -> list[Dangling]:
        owner = self.context.tag_key_prefix + "InstanceSetID"
        found = []
        for nic in nics:
            if not self._is_ours(nic.name) or nic.virtual_machine is not None:
                continue
            nic_tags = tagcodec.decode(nic.tags)
            if nic_tags.get(owner, self.context.instance_set_id) != self.context.instance_set_id:
                continue
            if self._old_enough(parse_time(tagcodec.created_at(nic.tags))):
                found.append(Dangling("nic", str(nic.name)))
        return found

    def find_dangling(self) -> list[Dangling]:
        """NICs and managed disks of this instance set that are attached to nothing and older
        than ``delete_dangling_resources_after`` (disks by Azure's own creation time)."""
        rg = self.params.resource_group
        found = self._dangling_nics(self.network.network_interfaces.list(rg))
        for disk in self.compute.disks.list_by_resource_group(rg):
            props = disk.properties
            if not self._is_ours(disk.name) or disk.managed_by or props is None:
                continue
            if props.disk_state != "Unattached":
                continue
            if self._old_enough(parse_time(props.time_created)):
                found.append(Dangling("disk", str(disk.name)))
        return found

    def delete_dangling(self, item: Dangling) -> None:
        self._delete(item.kind, item.name)

    # ----------------------------------------------------------------- the rest

    def _classify(self, exc: BaseException, operation: str) -> Exception:
        error = classify(exc, self._now(), operation)
        if isinstance(error, RateLimitError):
            self._log.info("Azure rate limit on %s: %s", operation, error)
        return error

    def quota_group(self, instance_type: InstanceType) -> str:
        return quota_group(
            instance_type.provider_type, instance_type.preemptible, self.params.quota_groups
        )

    # ----------------------------------------------------------------- quotas

    def quotas(self) -> list[Quota]:
        """The location's vCPU quotas per VM family and for spot, from compute ``usage.list``.

        A ``...Family`` quota is the group of the sizes :func:`~herder_driver_azure.quota.
        vm_family` puts in it; ``lowPriorityCores`` is the spot group.  The regional totals
        (``cores``, ``virtualMachines``) are left out: herder's groups give each size one
        quota, and the family quota is the one that usually binds.
        """
        try:
            usages = list(self.compute.usage.list(self.params.location))
        except Exception as exc:
            raise self._classify(exc, "usage.list") from exc
        out: list[Quota] = []
        for usage in usages:
            name = str(usage.name.value if usage.name is not None else "")
            if name == "lowPriorityCores":
                group = SPOT_GROUP
            elif name.endswith("Family"):
                group = name
            else:
                continue
            label = usage.name.localized_value if usage.name is not None else ""
            out.append(
                Quota(
                    group=group,
                    name=name,
                    limit=float(usage.limit),
                    usage=float(usage.current_value),
                    unit=QuotaUnit.VCPUS,
                    description=str(label or name),
                )
            )
        return out

    def stop(self) -> None:
        """Stop the clean-up (waiting for deletions under way) and close the clients."""
        self.cleaner.stop()
        self.compute.close()
        self.network.close()
        close = getattr(self._own_credential, "close", None)
        if close is not None:
            close()


def _private_address(nic: nm.NetworkInterface) -> str:
    """The private IP of the NIC's primary IP configuration (or its first), or ""."""
    configs = list(nic.ip_configurations or [])
    configs.sort(key=lambda c: not c.primary)
    for config in configs:
        if config.private_ip_address:
            return str(config.private_ip_address)
    return ""


class AzureDriver(Driver):
    """Microsoft Azure: on-demand and spot VMs in one resource group and subnet."""

    parameters_model = AzureParameters
    capabilities = frozenset(
        {
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
        assert isinstance(params, AzureParameters)
        quiet_sdk_loggers()
        return AzureInstanceSet(params, context)


#: The Azure SDK's loggers that speak at INFO on every request or token (headers, URLs):
#: too much for herder's log, where every listing would add several lines.
SDK_LOGGERS = ("azure.core.pipeline.policies.http_logging_policy", "azure.identity", "msal")


def quiet_sdk_loggers() -> None:
    """Show only warnings from the SDK's chatty loggers, unless the operator set their level
    (``logging.getLogger("azure.core.pipeline.policies.http_logging_policy").setLevel(...)``
    before herder starts brings the request log back)."""
    for name in SDK_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)

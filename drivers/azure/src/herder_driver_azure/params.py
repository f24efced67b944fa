"""The ``azure`` driver's parameters (``cloud.driver_parameters``), validated before any Azure call.

Secrets never live in the configuration file: a service principal's client secret is named by
reference (``client_secret: {file: PATH}`` or ``{env: VARIABLE}``, herder's one way for every
driver) and read when the instance set is built.  So ``herder config show`` has nothing to hide,
and the secret never reaches a log line or argv.
"""

from __future__ import annotations

import re

from pydantic import Field, ValidationInfo, field_validator, model_validator

from herder.cloud import DriverParameters, SecretRef
from herder.config import Duration

#: Management endpoints of Azure's national clouds (``cloud_environment``).  Each cloud's token
#: scope is its endpoint plus ``/.default``; its sign-in host is Microsoft Entra ID's there.
CLOUDS: dict[str, tuple[str, str]] = {
    "AzurePublicCloud": ("https://management.azure.com", "https://login.microsoftonline.com"),
    "AzureChinaCloud": ("https://management.chinacloudapi.cn", "https://login.chinacloudapi.cn"),
    "AzureUSGovernment": (
        "https://management.usgovcloudapi.net",
        "https://login.microsoftonline.us",
    ),
}

#: User names Azure refuses for a Linux VM's administrator (its API says "not allowed").
RESERVED_ADMIN_NAMES = frozenset(
    {
        "administrator",
        "admin",
        "user",
        "user1",
        "test",
        "user2",
        "test1",
        "user3",
        "admin1",
        "1",
        "123",
        "a",
        "actuser",
        "adm",
        "admin2",
        "aspnet",
        "backup",
        "console",
        "david",
        "guest",
        "john",
        "owner",
        "root",
        "server",
        "sql",
        "support",
        "support_388945a0",
        "sys",
        "test2",
        "test3",
        "user4",
        "user5",
    }
)

_NAME_PREFIX = re.compile(r"[a-z][a-z0-9-]{0,14}")
_ADMIN_NAME = re.compile(r"[a-z_][a-z0-9_.-]{0,63}", re.IGNORECASE)
_RESOURCE_GROUP = re.compile(r"[-\w._()]{1,90}")


class AzureParameters(DriverParameters):
    """Everything the Azure driver needs; see the package README for each key."""

    subscription_id: str = Field(min_length=1, description="Azure subscription to work in")
    resource_group: str = Field(min_length=1, description="resource group of VMs, NICs, disks")
    location: str = Field(min_length=1, description="region, e.g. westeurope")
    network: str = Field(min_length=1, description="virtual network of the instances")
    subnet: str = Field(min_length=1, description="subnet of that network")
    network_resource_group: str = Field("", description="the network's (default: resource_group)")
    image_resource_group: str = Field("", description="managed images' (default: resource_group)")
    shared_image_gallery_name: str = Field("", description="gallery holding cloud.image_id")
    shared_image_gallery_image_version: str = Field("", description="version of that image")
    admin_username: str = Field("herder", description="the VM's administrator (remote_user)")
    name_prefix: str = Field("herder", description="first part of every resource's name")
    delete_dangling_resources_after: Duration = Field(
        600.0, gt=0, description="age after which unattached NICs and disks are deleted"
    )
    cleanup_interval: Duration = Field(
        300.0, gt=0, description="how often unattached NICs and disks are looked for"
    )
    cleanup_parallelism: int = Field(4, ge=1, le=32, description="deletions at once")
    os_disk_type: str = Field("", description="OS disk storage type (default: Azure's)")
    os_disk_size_gb: int = Field(0, ge=0, description="OS disk size (default: the image's)")
    data_disk_type: str = Field("StandardSSD_LRS", description="added scratch disk type")
    spot_max_price: str = Field(
        "type", description="'type': the instance type's price; 'on-demand': -1"
    )
    # credentials: a service principal, else azure-identity's default chain
    tenant_id: str = Field("", description="service principal's tenant")
    client_id: str = Field("", description="service principal's application (client) id")
    client_secret: SecretRef | None = Field(
        None, description="its secret by reference: {file: PATH} or {env: VARIABLE}"
    )
    #: The former spellings of ``client_secret: {file: ...}`` / ``{env: ...}``: refused with
    #: the line to write instead, so that every driver names its secrets one way.
    client_secret_file: str | None = Field(None, exclude=True, description="replaced")
    client_secret_env: str | None = Field(None, exclude=True, description="replaced")
    # endpoints
    cloud_environment: str = Field("AzurePublicCloud", description="national cloud")
    management_endpoint: str = Field("", description="Resource Manager URL (default: the cloud's)")
    authority_host: str = Field("", description="Entra ID sign-in URL (default: the cloud's)")
    ca_bundle: str = Field("", description="CA certificates for both (default: the system's)")
    poll_interval: Duration = Field(2.0, ge=0, description="long-running operation poll interval")
    connect_timeout: Duration = Field(10.0, gt=0)
    read_timeout: Duration = Field(60.0, gt=0)
    quota_groups: dict[str, str] = Field(
        default_factory=dict, description="VM size (or size prefix) -> quota group"
    )

    @field_validator("client_secret_file", "client_secret_env")
    @classmethod
    def _replaced_by_a_reference(cls, value: str | None, info: ValidationInfo) -> None:
        if value is not None:
            kind = "file" if info.field_name == "client_secret_file" else "env"
            raise ValueError(
                f"replaced by a reference: write 'client_secret: {{{kind}: {value}}}' instead"
            )
        return None

    @field_validator("name_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        """Lowercase, short and DNS-safe: it starts VM, computer, NIC and disk names."""
        if not _NAME_PREFIX.fullmatch(value):
            raise ValueError(
                f"invalid name_prefix {value!r}: 1 to 15 lowercase letters, digits or '-', "
                "starting with a letter"
            )
        return value

    @field_validator("admin_username")
    @classmethod
    def _admin(cls, value: str) -> str:
        if not _ADMIN_NAME.fullmatch(value) or value.endswith("."):
            raise ValueError(f"invalid admin_username {value!r}")
        if value.lower() in RESERVED_ADMIN_NAMES:
            raise ValueError(f"admin_username {value!r} is reserved by Azure; choose another")
        return value

    @field_validator("resource_group", "network_resource_group", "image_resource_group")
    @classmethod
    def _group(cls, value: str) -> str:
        if value and (not _RESOURCE_GROUP.fullmatch(value) or value.endswith(".")):
            raise ValueError(f"invalid resource group name {value!r}")
        return value

    @field_validator("spot_max_price")
    @classmethod
    def _spot_price(cls, value: str) -> str:
        if value not in ("type", "on-demand"):
            raise ValueError(f"spot_max_price must be 'type' or 'on-demand', not {value!r}")
        return value

    @field_validator("cloud_environment")
    @classmethod
    def _cloud(cls, value: str) -> str:
        if value not in CLOUDS:
            raise ValueError(
                f"unknown cloud_environment {value!r}: expected one of {', '.join(CLOUDS)}"
            )
        return value

    @field_validator("management_endpoint", "authority_host")
    @classmethod
    def _https(cls, value: str) -> str:
        """Bearer tokens and secrets only ever travel over TLS."""
        if value and not value.startswith("https://"):
            raise ValueError(f"{value!r} must be an https:// URL")
        return value.rstrip("/")

    @field_validator("quota_groups")
    @classmethod
    def _lowercase_sizes(cls, value: dict[str, str]) -> dict[str, str]:
        """VM sizes are case-insensitive in Azure, so the keys are matched lowercased."""
        return {k.lower(): v for k, v in value.items()}

    @model_validator(mode="after")
    def _consistent(self) -> AzureParameters:
        gallery = (self.shared_image_gallery_name, self.shared_image_gallery_image_version)
        if bool(gallery[0]) != bool(gallery[1]):
            raise ValueError(
                "shared_image_gallery_name and shared_image_gallery_image_version "
                "must be given together"
            )
        principal = (self.tenant_id, self.client_id)
        if any(principal) or self.client_secret is not None:
            if not all(principal):
                raise ValueError("a service principal needs tenant_id and client_id")
            if self.client_secret is None:
                raise ValueError(
                    "a service principal needs client_secret: {file: PATH} or {env: VARIABLE}"
                )
        return self

    # ----------------------------------------------------------------- derived

    @property
    def network_group(self) -> str:
        return self.network_resource_group or self.resource_group

    @property
    def image_group(self) -> str:
        return self.image_resource_group or self.resource_group

    @property
    def endpoint(self) -> str:
        return self.management_endpoint or CLOUDS[self.cloud_environment][0]

    @property
    def authority(self) -> str:
        return self.authority_host or CLOUDS[self.cloud_environment][1]

    @property
    def uses_service_principal(self) -> bool:
        return bool(self.client_id)

    def read_client_secret(self) -> str:
        """The service principal's secret, read now from where ``client_secret`` points.

        Raises ValueError naming the reference (never the value) when it is missing or empty.
        """
        assert self.client_secret is not None
        try:
            return self.client_secret.read().strip()
        except ValueError as exc:
            raise ValueError(f"client_secret ({self.client_secret}): {exc}") from None

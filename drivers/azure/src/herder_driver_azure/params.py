"""The ``azure`` driver's parameters (``cloud.driver_parameters``), validated before any Azure call.

Secrets never live in the configuration file: a service principal's client secret is read, when
the instance set is built, from a file or an environment variable that the file only *names*.
So ``herder config show`` has nothing to hide, and the secret never reaches a log line or argv.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from herder.cloud import DriverParameters
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
        "administrator", "admin", "user", "user1", "test", "user2", "test1", "user3", "admin1",
        "1", "123", "a", "actuser", "adm", "admin2", "aspnet", "backup", "console", "david",
        "guest", "john", "owner", "root", "server", "sql", "support", "support_388945a0", "sys",
        "test2", "test3", "user4", "user5",
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
    client_secret_file: str = Field("", description="file holding the client secret")
    client_secret_env: str = Field("", description="environment variable holding it")
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

    #: Only here to refuse it with the way to give it instead: a secret never belongs in the
    #: configuration file.  Masked before validation, so that no error shows the value.
    client_secret: str | None = Field(None, exclude=True, description="not allowed")

    @model_validator(mode="before")
    @classmethod
    def _mask_secret(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("client_secret") is not None:
            return {**data, "client_secret": "<redacted>"}
        return data

    @field_validator("client_secret")
    @classmethod
    def _no_secret_in_the_file(cls, value: str | None) -> None:
        if value is not None:
            raise ValueError(
                "the client secret must not be written in the configuration: put it in a file "
                "(client_secret_file) or an environment variable (client_secret_env)"
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
            raise ValueError(f"unknown cloud_environment {value!r}: expected one of "
                             f"{', '.join(CLOUDS)}")
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
            raise ValueError("shared_image_gallery_name and shared_image_gallery_image_version "
                             "must be given together")
        principal = (self.tenant_id, self.client_id)
        secret_sources = bool(self.client_secret_file) + bool(self.client_secret_env)
        if any(principal) or secret_sources:
            if not all(principal):
                raise ValueError("a service principal needs tenant_id and client_id")
            if secret_sources != 1:
                raise ValueError("a service principal needs its secret from exactly one of "
                                 "client_secret_file and client_secret_env")
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
        """The service principal's secret, read now from its file or environment variable.

        Raises ValueError naming the source (never the value) when it is missing or empty.
        """
        if self.client_secret_file:
            path = Path(self.client_secret_file).expanduser()
            try:
                secret = path.read_text().strip()
            except OSError as exc:
                raise ValueError(f"cannot read client_secret_file {str(path)!r}: "
                                 f"{exc.strerror}") from None
            source = f"client_secret_file {str(path)!r}"
        else:
            secret = os.environ.get(self.client_secret_env, "").strip()
            source = f"environment variable {self.client_secret_env}"
        if not secret:
            raise ValueError(f"the client secret in {source} is empty or missing")
        return secret

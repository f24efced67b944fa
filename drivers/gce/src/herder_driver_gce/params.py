"""The ``gce`` driver's parameters (``cloud.driver_parameters``), validated before any API call.

Everything GCE would refuse later for its form (zone names, label keys and values, the name
prefix of instances) is refused here, so ``herder config check`` names the key instead of a
create failing at 3 a.m.  Nothing here is secret: credentials come from Application Default
Credentials or from a service-account key named by reference (``credentials: {file: PATH}`` or
``{env: VARIABLE}``), read only when the instance set is built.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from herder.cloud import DriverParameters, SecretRef
from herder.config import Duration, Size

#: GCE label keys: a lowercase letter, then up to 62 lowercase letters, digits, ``-``, ``_``.
LABEL_KEY = re.compile(r"[a-z][a-z0-9_-]{0,62}")
#: GCE label values: up to 63 lowercase letters, digits, ``-``, ``_`` (may be empty).
LABEL_VALUE = re.compile(r"[a-z0-9_-]{0,63}")
#: A zone: ``<region>-<letter>``, e.g. ``us-central1-a``.
ZONE = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]")
#: The start of instance names: GCE names are ``[a-z]([-a-z0-9]*[a-z0-9])?``, 63 at most, and
#: herder appends ``-<8 hex>-<10 random>``, so the prefix may have 40 characters.
NAME_PREFIX = re.compile(r"[a-z][-a-z0-9]{0,39}")
#: A metadata key GCE accepts.
METADATA_KEY = re.compile(r"[a-zA-Z0-9_-]{1,128}")

#: The scope that lets IAM roles alone decide what the instance's service account may do.
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
_SCOPE_PREFIX = "https://www.googleapis.com/auth/"


def _zone_list(value: Any) -> Any:
    """One zone as a string, or a list in failover order."""
    if isinstance(value, str):
        return [value] if value else []
    return value


def region_of(zone: str) -> str:
    """``us-central1-a`` → ``us-central1``."""
    return zone.rsplit("-", 1)[0]


class GCEParameters(DriverParameters):
    """Everything the GCE driver needs; see the package README for each key."""

    project: str = Field(
        min_length=1, description="the Google Cloud project instances are created in"
    )
    zones: list[str] = Field(
        min_length=1,
        description="one zone, or a list of zones of one region in failover order",
    )
    network: str = Field(
        "default", description="VPC network name or path (default: the project's 'default')"
    )
    subnetwork: str = Field("", description="subnetwork name or path (default: auto-mode)")
    external_ip: bool = Field(
        False, description="give instances an external IP and use it as their address"
    )
    service_account: str = Field(
        "", description="service account e-mail the instances run as ('' for none)"
    )
    scopes: list[str] = Field(
        default_factory=lambda: [CLOUD_PLATFORM],
        description="OAuth scopes of the service account (short names or URLs)",
    )
    image: str = Field(
        "",
        description="boot image when cloud.image_id is empty: a name, family/NAME, "
        "projects/P/global/images/..., or a full URL",
    )
    image_project: str = Field(
        "", description="project of bare image names and families (default: project)"
    )
    boot_disk_type: str = Field("pd-balanced", description="boot disk type")
    boot_disk_size: Size = Field(
        0, description="boot disk size (0: the image's size); rounded up to whole GiB"
    )
    scratch_disk: Literal["persistent", "local-ssd"] = Field(
        "persistent",
        description="how added_scratch is provided: an extra persistent disk or local SSDs",
    )
    scratch_disk_type: str = Field(
        "pd-balanced", description="type of the extra persistent disk for added_scratch"
    )
    admin_username: str = Field(
        "herder",
        pattern=r"^[a-z_][a-z0-9_-]{0,31}$",
        description="the login user the guest agent creates from the ssh-keys metadata",
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description="labels added to every instance and its disks"
    )
    name_prefix: str = Field("herder", description="start of every instance name")
    credentials: SecretRef | None = Field(
        None,
        description="a service-account key (its JSON) by reference: {file: PATH} or "
        "{env: VARIABLE}; none for Application Default Credentials",
    )
    #: The former spelling of ``credentials: {file: PATH}``: refused with that line, so that
    #: every driver names its secrets one way.
    credentials_file: str | None = Field(None, exclude=True, description="replaced")
    api_endpoint: str = Field(
        "",
        description="Compute API endpoint (Private Service Connect, a proxy); '' for Google's",
    )
    verify_host_keys: bool = Field(
        True,
        description="enable guest attributes and check SSH host keys against the keys the "
        "guest agent publishes there",
    )
    accelerator_types: dict[str, str] = Field(
        default_factory=dict,
        description="herder instance type name → GCE accelerator type (e.g. nvidia-tesla-t4)",
    )
    instance_type_quota_groups: dict[str, str] = Field(
        default_factory=dict,
        description="machine type prefix → quota group, overriding the built-in families",
    )
    request_timeout: Duration = Field(60.0, gt=0, description="timeout of each API request")
    operation_timeout: Duration = Field(
        300.0, gt=0, description="how long to wait for an insert or metadata operation"
    )

    _zones = field_validator("zones", mode="before")(_zone_list)

    @field_validator("credentials_file")
    @classmethod
    def _replaced_by_a_reference(cls, value: str | None) -> None:
        if value is not None:
            raise ValueError(
                f"replaced by a reference: write 'credentials: {{file: {value}}}' instead"
            )
        return None

    @field_validator("zones")
    @classmethod
    def _zones_of_one_region(cls, value: list[str]) -> list[str]:
        """Failover moves between zones of one region: instance types, images and subnets are
        regional, and herder's quota groups count a region's quota."""
        for zone in value:
            if not ZONE.fullmatch(zone):
                raise ValueError(f"{zone!r} is not a zone name like us-central1-a")
        regions = sorted({region_of(z) for z in value})
        if len(regions) > 1:
            raise ValueError(f"zones must all be in one region, not {', '.join(regions)}")
        if len(set(value)) != len(value):
            raise ValueError("a zone is listed twice")
        return value

    @field_validator("labels")
    @classmethod
    def _labels_gce_accepts(cls, value: dict[str, str]) -> dict[str, str]:
        for key, item in value.items():
            if not LABEL_KEY.fullmatch(key):
                raise ValueError(
                    f"label key {key!r}: GCE label keys start with a lowercase letter and "
                    "have up to 63 lowercase letters, digits, '-' and '_'"
                )
            if not LABEL_VALUE.fullmatch(item):
                raise ValueError(
                    f"label {key!r} value {item!r}: GCE label values have up to 63 "
                    "lowercase letters, digits, '-' and '_'"
                )
            if key.startswith("herder-"):
                raise ValueError(f"label key {key!r}: labels starting 'herder-' are herder's own")
        return value

    @field_validator("name_prefix")
    @classmethod
    def _name_prefix_gce_accepts(cls, value: str) -> str:
        if not NAME_PREFIX.fullmatch(value) or value.endswith("-"):
            raise ValueError(
                f"{value!r}: a lowercase letter, then up to 39 lowercase letters, digits "
                "and '-', not ending in '-'"
            )
        return value

    @field_validator("scopes")
    @classmethod
    def _full_scope_urls(cls, value: list[str]) -> list[str]:
        """``cloud-platform`` is short for its URL, as in gcloud."""
        return [s if s.startswith("https://") else _SCOPE_PREFIX + s for s in value]

    @field_validator("instance_type_quota_groups")
    @classmethod
    def _lowercase_prefixes(cls, value: dict[str, str]) -> dict[str, str]:
        return {k.lower(): v for k, v in value.items()}

    @field_validator("api_endpoint")
    @classmethod
    def _endpoint_form(cls, value: str) -> str:
        if value and not re.fullmatch(r"(https?://)?[A-Za-z0-9.\-\[\]:]+(:\d+)?/?", value):
            raise ValueError(f"{value!r} is not a host[:port] or http(s)://host[:port]")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _service_account_scopes(self) -> GCEParameters:
        if self.service_account and not self.scopes:
            raise ValueError("service_account needs at least one scope in scopes")
        return self

    @property
    def region(self) -> str:
        return region_of(self.zones[0])

    def network_path(self) -> str:
        """The network as a path relative to the API, from a name or a path."""
        if "/" in self.network:
            return self.network
        return f"projects/{self.project}/global/networks/{self.network}"

    def subnetwork_path(self) -> str:
        if not self.subnetwork or "/" in self.subnetwork:
            return self.subnetwork
        return f"projects/{self.project}/regions/{self.region}/subnetworks/{self.subnetwork}"

    def image_path(self, image_id: str) -> str:
        """The source image of the boot disk, from ``cloud.image_id`` or the ``image`` key.

        A full URL or a ``projects/...`` or ``global/...`` path is used as it is; ``family/X``
        and bare names are looked up in ``image_project`` (default: the project).
        """
        image = image_id or self.image
        if not image:
            raise ValueError("no boot image: set cloud.image_id or cloud.driver_parameters.image")
        if image.startswith(("https://", "projects/", "global/")):
            return image
        project = self.image_project or self.project
        return f"projects/{project}/global/images/{image}"

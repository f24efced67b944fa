"""The ``aws`` driver's parameters (``cloud.driver_parameters``), validated before any AWS call."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from herder.cloud import DriverParameters, SecretRef
from herder.config import Duration
from herder_driver_aws.quota import DEFAULT_QUOTA_CODES, DEFAULT_QUOTA_GROUPS


def _id_list(value: Any) -> Any:
    """A list of ids from a list, a single id, ``""`` (none) or a map (its keys, Arvados' set)."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return list(value)
    return value


class AWSParameters(DriverParameters):
    """Everything the EC2 driver needs; see the package README for each key."""

    region: str = Field(min_length=1)
    access_key_id: str = ""
    #: by reference only (``{env: VAR}`` or ``{file: PATH}``): never written in the YAML
    secret_access_key: SecretRef | None = None
    #: the session token of temporary credentials, by reference too
    session_token: SecretRef | None = None
    profile: str = ""
    endpoint_url: str = ""
    security_group_ids: list[str] = Field(default_factory=list)
    subnet_ids: list[str] = Field(default_factory=list)
    associate_public_ip: bool = False
    admin_username: str = Field(default="admin", min_length=1)
    ebs_volume_type: str = "gp2"
    ebs_price: float = Field(default=0.10, ge=0)
    iam_instance_profile: str = ""
    spot_price_update_interval: Duration = 86400.0
    instance_type_quota_groups: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_QUOTA_GROUPS)
    )
    #: quota group → Service Quotas code of its vCPU quota, read for quota headroom
    quota_codes: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_QUOTA_CODES))
    resource_tags: dict[str, str] = Field(default_factory=dict)
    connect_timeout: Duration = Field(default=10.0, gt=0)
    read_timeout: Duration = Field(default=60.0, gt=0)

    _ids = field_validator("security_group_ids", "subnet_ids", mode="before")(_id_list)

    @field_validator("instance_type_quota_groups")
    @classmethod
    def _lowercase_prefixes(cls, value: dict[str, str]) -> dict[str, str]:
        """Type names are matched lowercased, so prefixes are too."""
        return {k.lower(): v for k, v in value.items()}

    @model_validator(mode="after")
    def _one_credential_source(self) -> AWSParameters:
        """Static keys come in pairs, and exclude a profile: a half-set pair is a typo."""
        has_id = bool(self.access_key_id)
        has_secret = self.secret_access_key is not None
        if has_id != has_secret:
            raise ValueError("access_key_id and secret_access_key must be given together")
        if has_id and self.profile:
            raise ValueError("give either access_key_id/secret_access_key or profile, not both")
        if self.session_token is not None and not has_id:
            raise ValueError("session_token needs access_key_id and secret_access_key")
        return self

"""herder's configuration: one YAML file, validated by typed models.

Every key and its default is listed, with what it does, in ``examples/herder.full.yaml`` (the
role Arvados' ``config.default.yml`` plays; SPEC §12 maps the Arvados names).  Durations accept
``10s``, ``1m30s``, ``2h``; sizes accept ``4GiB``, ``500MB`` (see :mod:`herder.units`).

Unknown keys are errors: a misspelled key must never be silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from herder.model import CLUSTER_ID_RE, GPUSpec, InstanceType
from herder.units import parse_duration, parse_size

Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class GPUConfig(_Strict):
    stack: str = Field("", description='"" (no GPU), "cuda" or "rocm"')
    driver_version: str = ""
    hardware_target: str = ""
    device_count: int = Field(0, ge=0)
    vram: Size = 0

    @field_validator("stack")
    @classmethod
    def _stack(cls, v: str) -> str:
        if v not in ("", "cuda", "rocm"):
            raise ValueError(f"invalid GPU stack {v!r}: expected '', 'cuda' or 'rocm'")
        return v


class InstanceTypeConfig(_Strict):
    provider_type: str = Field("", description="the cloud's name for the type; defaults to the key")
    vcpus: int = Field(ge=1)
    ram: Size
    included_scratch: Size = 0
    added_scratch: Size = 0
    price: float = Field(0.0, ge=0)
    preemptible: bool = False
    gpu: GPUConfig = Field(default_factory=GPUConfig)  # type: ignore[arg-type]

    def build(self, name: str) -> InstanceType:
        return InstanceType(
            name=name,
            provider_type=self.provider_type or name,
            vcpus=self.vcpus,
            ram=self.ram,
            included_scratch=self.included_scratch,
            added_scratch=self.added_scratch,
            price=self.price,
            preemptible=self.preemptible,
            gpu=GPUSpec(
                stack=self.gpu.stack,
                driver_version=self.gpu.driver_version,
                hardware_target=self.gpu.hardware_target,
                device_count=self.gpu.device_count,
                vram=self.gpu.vram,
            ),
        )


class ContainersConfig(_Strict):
    """How containers are sized and run (Arvados' ``Containers`` section)."""

    runner_command: str = Field(
        "herder-runner",
        description="runner command on instances when the runner is not deployed by herder",
    )
    runner_args: list[str] = Field(default_factory=list)
    runtime_engine: str = Field("auto", description="auto, docker, podman or process")
    dispatch_private_key: str = Field(
        "", description="path of the SSH private key herder logs in with"
    )
    stale_lock_timeout: Duration = 60.0
    reserve_extra_ram: Size = 0
    maximum_price_factor: float = Field(1.5, ge=0)
    preemptible_price_factor: float = Field(0.0, ge=0)
    max_dispatch_attempts: int = Field(10, ge=1)
    always_use_preemptible_instances: bool = False

    @field_validator("runtime_engine")
    @classmethod
    def _engine(cls, v: str) -> str:
        if v not in ("auto", "docker", "podman", "process"):
            raise ValueError(
                f"invalid runtime engine {v!r}: expected auto, docker, podman or process"
            )
        return v


class CloudConfig(_Strict):
    """The cloud and the worker pool (Arvados' ``CloudVMs`` section)."""

    driver: str = "loopback"
    driver_parameters: dict[str, Any] = Field(default_factory=dict)
    executor: str = "ssh"
    boot_probe: str = "command"
    boot_probe_command: str = "true"
    ssh_port: int = Field(22, ge=1, le=65535)
    image_id: str = ""
    instance_init_command: str = ""
    deploy_runner: bool = Field(True, description="copy herder's runner agent to each instance")
    deploy_runner_directory: str = "/tmp/herder-runner"
    deploy_public_key: bool = True
    resource_tags: dict[str, str] = Field(default_factory=dict)
    tag_key_prefix: str = "Herder"
    instance_set_id: str = Field("", description="defaults to a digest of cluster_id")
    poll_interval: Duration = 10.0
    probe_interval: Duration = 10.0
    max_probes_per_second: float = Field(10.0, ge=0)
    sync_interval: Duration = 60.0
    timeout_idle: Duration = 60.0
    timeout_booting: Duration = 600.0
    timeout_probe: Duration = 600.0
    timeout_shutdown: Duration = 10.0
    timeout_term: Duration = 120.0
    timeout_signal: Duration = 5.0
    timeout_stale_run_lock: Duration = 5.0
    timeout_command: Duration = Field(60.0, description="timeout of one command on an instance")
    max_cloud_ops_per_second: float = Field(10.0, ge=0)
    max_concurrent_instance_create_ops: int = Field(1, ge=0)
    max_instances: int = Field(64, ge=0)
    max_running_containers_per_instance: int = Field(0, ge=0)
    initial_quota_estimate: int = Field(0, ge=0)
    supervisor_fraction: float = Field(0.5, ge=0, le=1)


class QueueConfig(_Strict):
    backend: str = "sqlite"
    path: str = Field("herder.db", description="SQLite database file")


class APIConfig(_Strict):
    listen: str = "127.0.0.1:9190"
    management_token: str = Field("", description="bearer token; empty closes the API")
    management_token_env: str = Field(
        "HERDER_MANAGEMENT_TOKEN", description="environment variable read when the token is empty"
    )


class Config(_Strict):
    """The whole configuration file."""

    cluster_id: str = "zzzzz"
    containers: ContainersConfig = Field(default_factory=ContainersConfig)  # type: ignore[arg-type]
    cloud: CloudConfig = Field(default_factory=CloudConfig)  # type: ignore[arg-type]
    queue: QueueConfig = Field(default_factory=QueueConfig)  # type: ignore[arg-type]
    api: APIConfig = Field(default_factory=APIConfig)  # type: ignore[arg-type]
    instance_types: dict[str, InstanceTypeConfig] = Field(default_factory=dict)

    @field_validator("cluster_id")
    @classmethod
    def _cluster_id(cls, v: str) -> str:
        if not CLUSTER_ID_RE.match(v):
            raise ValueError(f"invalid cluster_id {v!r}: expected 5 lowercase letters or digits")
        return v

    @model_validator(mode="before")
    @classmethod
    def _instance_types_is_a_map(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("instance_types"), list):
            raise ValueError(
                "instance_types must be a map of name to type, not a list "
                "(write `instance_types: {small: {vcpus: 2, ram: 4GiB, ...}}`)"
            )
        return data

    def build_instance_types(self) -> dict[str, InstanceType]:
        """Configured types, plus ``<name>.preemptible`` variants when asked (SPEC §8.1)."""
        types = {name: cfg.build(name) for name, cfg in self.instance_types.items()}
        factor = self.containers.preemptible_price_factor
        if factor > 0:
            for name, it in list(types.items()):
                if it.preemptible:
                    continue
                variant = f"{name}.preemptible"
                if variant in types:
                    continue
                types[variant] = InstanceType(
                    name=variant,
                    provider_type=it.provider_type,
                    vcpus=it.vcpus,
                    ram=it.ram,
                    included_scratch=it.included_scratch,
                    added_scratch=it.added_scratch,
                    price=it.price * factor,
                    preemptible=True,
                    gpu=it.gpu,
                )
        return types

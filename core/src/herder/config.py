"""herder's configuration: one YAML file, validated by typed models.

Every key and its default is listed, with what it does, in ``examples/herder.full.yaml`` (the
role Arvados' ``config.default.yml`` plays; SPEC §12 maps the Arvados names).  Durations accept
``10s``, ``1m30s``, ``2h``; sizes accept ``4GiB``, ``500MB`` (see :mod:`herder.units`).

Unknown keys are errors: a misspelled key must never be silently ignored.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Protocol, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from herder import defaults
from herder.model import CLUSTER_ID_RE, Billing, GPUSpec, InstanceType
from herder.spend import Budget
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
    gpu: GPUConfig = Field(default_factory=GPUConfig)
    billing_increment: Duration | None = Field(
        None,
        description="the cloud bills this type in steps of this long (1s, 1h); unset: what the "
        "driver says, else per second",
    )
    billing_minimum: Duration | None = Field(
        None,
        description="the least time the cloud bills for one instance of this type (60s); "
        "unset: what the driver says, else 0 (or one increment when billing_increment is set)",
    )

    @field_validator("billing_increment")
    @classmethod
    def _increment(cls, v: float | None) -> float | None:
        if v is not None and v < 1:
            raise ValueError(f"must be at least 1s, got {duration_text(v)}")
        return v

    @field_validator("billing_minimum")
    @classmethod
    def _minimum(cls, v: float | None) -> float | None:
        if v is not None and v < 0:
            raise ValueError("must not be negative")
        return v

    def configured_billing(self) -> Billing | None:
        """The billing this type's keys state, or None when neither key is set."""
        if self.billing_increment is None and self.billing_minimum is None:
            return None
        increment = self.billing_increment if self.billing_increment is not None else 1.0
        minimum = self.billing_minimum
        if minimum is None:
            minimum = increment if increment > 1 else 0.0
        return Billing(increment, minimum)

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
            billing=self.configured_billing() or Billing(),
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
    maximum_price_factor: float = Field(defaults.MAXIMUM_PRICE_FACTOR, ge=0)
    preemptible_price_factor: float = Field(0.0, ge=0)
    max_dispatch_attempts: int = Field(defaults.MAX_DISPATCH_ATTEMPTS, ge=1)
    always_use_preemptible_instances: bool = False
    pull_policy: str = Field(
        "if-not-present",
        description="when runners pull a container's image: if-not-present, always or never",
    )
    log_limit: Size = Field(
        64 << 20,
        description="bytes of output kept per container attempt; 0 keeps everything",
    )

    @field_validator("pull_policy")
    @classmethod
    def _pull_policy(cls, v: str) -> str:
        if v not in ("if-not-present", "always", "never"):
            raise ValueError(f"invalid pull policy {v!r}: expected if-not-present, always or never")
        return v

    @field_validator("runtime_engine")
    @classmethod
    def _engine(cls, v: str) -> str:
        if v not in ("auto", "docker", "podman", "process"):
            raise ValueError(
                f"invalid runtime engine {v!r}: expected auto, docker, podman or process"
            )
        return v


class CloudSSHConfig(_Strict):
    """How the SSH executor reaches instances: directly, or through a bastion (jump host).

    The bastion is either spelled out here (``bastion_host`` and friends) or left to the
    user's OpenSSH config (``use_ssh_config``: its ``ProxyJump`` for the instance address
    picks the bastion, as ``ssh`` would).  Either way the bastion's host key must be known
    beforehand; instance host keys are still verified by herder's own rules.
    """

    bastion_host: str = Field("", description='jump host to reach instances through; "" = none')
    bastion_port: int = Field(22, ge=1, le=65535)
    bastion_user: str = Field("", description='login on the bastion; "" = the local user')
    bastion_key_file: str = Field(
        "", description='private key for the bastion; "" = containers.dispatch_private_key'
    )
    bastion_host_key: str = Field(
        "", description='the bastion\'s public host key line; "" = look it up in known_hosts'
    )
    known_hosts_file: str = Field(
        "~/.ssh/known_hosts", description="where the bastion's host key is looked up"
    )
    use_ssh_config: bool = False
    ssh_config_file: str = Field(
        "", description='the OpenSSH config to read; "" = ~/.ssh/config and /etc/ssh/ssh_config'
    )
    connect_timeout: Duration = Field(60.0, gt=0)
    keepalive_interval: Duration = Field(30.0, ge=0)
    bastion_retry_max: Duration = Field(
        60.0, gt=0, description="longest pause between attempts to reach a failing bastion"
    )

    @field_validator("bastion_host_key")
    @classmethod
    def _host_key(cls, v: str) -> str:
        if v and len(v.split()) < 2:
            raise ValueError(
                f"invalid host key {v!r}: expected an OpenSSH public key line "
                "such as 'ssh-ed25519 AAAA...'"
            )
        return v

    @field_validator("use_ssh_config")
    @classmethod
    def _one_bastion_source(cls, v: bool, info: ValidationInfo) -> bool:
        if v and info.data.get("bastion_host"):
            raise ValueError(
                "use_ssh_config and bastion_host exclude each other: the bastion comes either "
                "from the OpenSSH config or from bastion_host"
            )
        return v

    @field_validator("bastion_host")
    @classmethod
    def _bastion_host(cls, v: str) -> str:
        if any(c.isspace() for c in v) or "@" in v:
            raise ValueError(
                f"invalid bastion host {v!r}: give the host name alone "
                "(user and port have their own keys)"
            )
        return v


class BudgetConfig(_Strict):
    """A spend limit per period (``cloud.budget``), in the instance types' price unit.

    Spend is what the instances cost while they live (their lifetimes at the prices in force,
    rounded to each type's billing increment), counted from the start of each period (UTC).
    """

    period: str = Field("day", description="hour, day or month (UTC)")
    soft_limit: float | None = Field(
        None, ge=0, description="at or above this spend no new instance is created; unset: none"
    )
    hard_limit: float | None = Field(
        None,
        ge=0,
        description="at or above this spend every instance is drained; unset: none",
    )
    on_hard_limit: str = Field(
        "finish",
        description="what running containers do at the hard limit: finish (run to their end) "
        "or stop (cancelled, saying why)",
    )
    ledger_path: str = Field(
        "",
        description="deprecated: spend now lives in the queue; only where an older herder's "
        'ledger file is, imported once at start ("" = herder-spend.jsonl next to queue.path)',
    )

    @property
    def enabled(self) -> bool:
        return self.soft_limit is not None or self.hard_limit is not None

    def budget(self) -> Budget:
        """These limits as the engine and ``herder budget`` evaluate them."""
        return Budget(self.period, self.soft_limit, self.hard_limit, self.on_hard_limit)

    @field_validator("period")
    @classmethod
    def _period(cls, v: str) -> str:
        if v not in ("hour", "day", "month"):
            raise ValueError(f"invalid budget period {v!r}: expected hour, day or month")
        return v

    @field_validator("on_hard_limit")
    @classmethod
    def _action(cls, v: str) -> str:
        if v not in ("finish", "stop"):
            raise ValueError(f"invalid action {v!r}: expected finish or stop")
        return v

    @field_validator("hard_limit")
    @classmethod
    def _hard_above_soft(cls, v: float | None, info: ValidationInfo) -> float | None:
        soft = info.data.get("soft_limit")
        if v is not None and soft is not None and v < soft:
            raise ValueError(f"must not be below soft_limit ({soft:g}), got {v:g}")
        return v


class CloudConfig(_Strict):
    """The cloud and the worker pool (Arvados' ``CloudVMs`` section)."""

    driver: str = "loopback"
    driver_parameters: dict[str, Any] = Field(default_factory=dict)
    executor: str = "ssh"
    boot_probe: str = "command"
    boot_probe_command: str = "true"
    ssh_port: int = Field(22, ge=1, le=65535)
    ssh: CloudSSHConfig = Field(default_factory=CloudSSHConfig)
    image_id: str = ""
    instance_init_command: str = ""
    deploy_runner: bool = Field(True, description="copy herder's runner agent to each instance")
    deploy_runner_directory: str = Field(
        "/var/lib/herder/runner",
        description="where the runner agent is installed on each instance: created 0700 and "
        "owned by the user the runner runs as (root through sudo); refused if someone else "
        "owns it",
    )
    deploy_public_key: bool = True
    resource_tags: dict[str, str] = Field(default_factory=dict)
    tag_key_prefix: str = defaults.TAG_KEY_PREFIX
    instance_set_id: str = Field("", description="defaults to a digest of cluster_id")
    poll_interval: Duration = 10.0
    probe_interval: Duration = 10.0
    idle_probe_interval: Duration = Field(
        60.0,
        description="how often an idle instance whose resident runner stream is up is probed "
        "(the stream reports container ends and a lost connection at once); 0 or anything not "
        "longer than probe_interval = every probe_interval",
    )
    max_probes_per_second: float = Field(10.0, ge=0)
    sync_interval: Duration = 60.0
    timeout_idle: Duration = 60.0
    billing_shutdown_margin: Duration = Field(
        60.0,
        ge=0,
        description="an idle instance whose billing increment is paid is kept until this long "
        "before the increment ends (per-second types: timeout_idle alone decides)",
    )
    max_instance_lifetime: Duration = Field(
        0.0,
        ge=0,
        description="an instance older than this is drained (takes no new container, finishes "
        "its own) and replaced as demand asks; 0 = no limit",
    )
    consolidation_threshold: float = Field(
        0.0,
        ge=0,
        le=1,
        description="an instance using at most this fraction of its VCPUs is lightly used: "
        "while nothing waits for an instance, the lightly used ones that can empty soonest "
        "are drained so that new containers go elsewhere; 0 = off",
    )
    quota_refresh_interval: Duration = Field(
        300.0,
        ge=0,
        description="how often the account's quotas and usage are read from a driver that can "
        "(capability quota_headroom), so that no instance is created into a full quota; "
        "0 = never read",
    )
    budget: BudgetConfig = Field(
        default_factory=lambda: BudgetConfig(),
        description="a spend limit per period; without soft_limit or hard_limit: none",
    )
    timeout_booting: Duration = 600.0
    boot_failure_backoff: Duration = Field(
        60.0,
        description="pause on creating an instance type after one of its instances failed to "
        "boot; doubles with each failure in a row, up to boot_failure_backoff_max; 0 disables",
    )
    boot_failure_backoff_max: Duration = 1800.0
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
    #: A queue backend registered by a plugin (``herder plugins`` lists them); built in: sqlite.
    backend: str = "sqlite"
    path: str = Field(
        defaults.QUEUE_FILE,
        description="SQLite database file; dispatcher plugins keep their state beside it",
    )
    #: Passed to the backend named by ``backend``, checked by its own parameters model.
    backend_parameters: dict[str, Any] = Field(default_factory=dict)


_LISTEN_RE = re.compile(r"^(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^:\[\]]*)):(?P<port>\d{1,5})$")
_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``:port`` (every interface) → (host, port).

    The host must be an IP address or a host name, the port 0-65535 (0 picks a free one), so
    that ``config check`` catches what binding would only find at start-up.
    """
    import ipaddress

    m = _LISTEN_RE.match(listen.strip())
    if m is None:
        raise ValueError(f"invalid listen address {listen!r}: expected host:port")
    port = int(m.group("port"))
    if port > 65535:
        raise ValueError(f"invalid listen address {listen!r}: port {port} is above 65535")
    if m.group("v6") is not None:
        host = m.group("v6")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid listen address {listen!r}: bad IPv6 address") from None
        return host, port
    host = m.group("host")
    if host and re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"invalid listen address {listen!r}: bad IPv4 address") from None
    elif host and not _HOSTNAME_RE.match(host):
        raise ValueError(f"invalid listen address {listen!r}: bad host name {host!r}")
    return host, port


class APIConfig(_Strict):
    listen: str = defaults.API_LISTEN

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        parse_listen(v)
        return v

    management_token: str = Field("", description="bearer token; empty closes the API")
    management_token_env: str = Field(
        defaults.MANAGEMENT_TOKEN_ENV,
        description="environment variable read when the token is empty",
    )
    tls_certificate: str = Field(
        "", description="PEM certificate (chain) to serve the API over HTTPS; empty: plain HTTP"
    )
    tls_key: str = Field("", description="PEM private key of tls_certificate")
    request_timeout: Duration = Field(
        30.0,
        gt=0,
        le=3600,
        description="deadline for one whole request and its answer; slower clients are cut off",
    )
    max_connections: int = Field(
        1000, ge=1, le=100_000, description="open connections served at once; beyond: 503"
    )

    @model_validator(mode="after")
    def _tls_pair(self) -> APIConfig:
        if bool(self.tls_certificate) != bool(self.tls_key):
            missing = "tls_key" if self.tls_certificate else "tls_certificate"
            raise ValueError(f"api.{missing} is needed too: TLS takes a certificate and its key")
        return self

    def resolve_management_token(self, environ: Mapping[str, str] | None = None) -> str:
        """The token the API checks: the configured one, else the environment variable's.

        Read when the server starts (not when the file is loaded), so a secret can stay out of
        the file and ``herder config show`` never prints it.
        """
        if self.management_token:
            return self.management_token
        if not self.management_token_env:
            return ""
        env = os.environ if environ is None else environ
        return env.get(self.management_token_env, "").strip()


class Config(_Strict):
    """The whole configuration file."""

    cluster_id: str = defaults.CLUSTER_ID
    #: "cloud" (herder's elastic cloud engine) or a dispatcher registered by a plugin, which
    #: ``herder serve`` runs instead (:mod:`herder.dispatch`).
    dispatcher: str = "cloud"
    #: Passed unchanged to the dispatcher named by ``dispatcher`` (ignored for "cloud").
    dispatcher_parameters: dict[str, Any] = Field(default_factory=dict)
    containers: ContainersConfig = Field(default_factory=ContainersConfig)
    cloud: CloudConfig = Field(default_factory=CloudConfig)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    api: APIConfig = Field(default_factory=APIConfig)
    instance_types: dict[str, InstanceTypeConfig] = Field(default_factory=dict)

    @field_validator("cluster_id")
    @classmethod
    def _cluster_id(cls, v: str) -> str:
        if not CLUSTER_ID_RE.fullmatch(v):
            raise ValueError(f"invalid cluster_id {v!r}: expected 5 lowercase letters or digits")
        return v

    @field_validator("instance_types", mode="before")
    @classmethod
    def _instance_types_is_a_map(cls, data: Any) -> Any:
        if isinstance(data, list):
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
                    billing=it.billing,
                )
        return types


# --------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with a configuration file.

    ``key`` is the dotted path of the offending key (``cloud.timeout_idle``), or ``""`` when the
    problem is about the file as a whole; ``line``/``column`` (1-based) are set for problems
    found while parsing YAML, before any key path exists.
    """

    key: str
    message: str
    line: int | None = None
    column: int | None = None

    def format(self, source: str = "") -> str:
        """``FILE: key.path: message``, or ``FILE:LINE:COL: message`` for YAML problems."""
        where = source
        if self.line is not None:
            position = f"{self.line}:{self.column or 1}"
            where = f"{source}:{position}" if source else position
        parts = [p for p in (where, self.key, self.message) if p]
        return ": ".join(parts)

    def __str__(self) -> str:
        return self.format()


class ConfigError(Exception):
    """A configuration file cannot be used; ``problems`` lists every reason at once."""

    def __init__(self, problems: list[ConfigProblem], source: str = "") -> None:
        self.problems = list(problems)
        self.source = source
        super().__init__("\n".join(p.format(source) for p in self.problems))


# --------------------------------------------------------------------------- loading


class PluginChecks(Protocol):
    """What loading a configuration needs of the installed plugins (:class:`herder.plugins.
    Plugins` provides it): the problems in what the file says about them, an unknown driver or
    queue backend, parameters its own model refuses.  A protocol, so that the configuration
    models stay below the plugin machinery and never import it."""

    def config_problems(self, data: dict[str, Any]) -> list[ConfigProblem]:
        """Every problem the installed plugins find in the parsed file ``data``."""
        ...


def deprecations(config: Config) -> list[str]:
    """Keys still accepted but no longer needed, each with what to do: ``herder config check``
    prints them as warnings and ``herder serve`` logs them (the configuration still works)."""
    found = []
    if config.cloud.budget.ledger_path:
        found.append(
            "cloud.budget.ledger_path is deprecated: spend now lives in the queue; the file it "
            "names is only read once, to import it, and the key can be removed"
        )
    return found


def load_config(path: str | os.PathLike[str], plugins: PluginChecks | None = None) -> Config:
    """Read and validate a configuration file, or raise :class:`ConfigError` with every problem.

    With ``plugins``, the plugin names and the driver's parameters are checked too (what
    ``herder serve`` needs); without, only what the file itself says is checked.
    """
    config, problems = _load(path, plugins)
    if problems or config is None:
        raise ConfigError(problems, str(path))
    return config


def check_config(path: str | os.PathLike[str], plugins: PluginChecks | None) -> list[ConfigProblem]:
    """Every problem in a configuration file (an empty list when it is fine).

    ``plugins=None`` skips the checks that need installed plugins (the driver, executor, boot
    probe, dispatcher and queue backend names, and the parameters each plugin's model checks).
    """
    return _load(path, plugins)[1]


def config_from_data(
    data: Any, plugins: PluginChecks | None = None
) -> tuple[Config | None, list[ConfigProblem]]:
    """Validate already-parsed YAML data: the config (None if invalid) and every problem."""
    problems: list[ConfigProblem] = []
    config: Config | None = None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems.extend(problems_from_validation_error(exc, Config))
    if plugins is not None and isinstance(data, dict):
        problems.extend(plugins.config_problems(data))
    return (config if not problems else None), problems


def _load(
    path: str | os.PathLike[str], plugins: PluginChecks | None
) -> tuple[Config | None, list[ConfigProblem]]:
    text, problems = _read_text(path)
    if text is None:
        return None, problems
    data, lines, problems = _parse_yaml(text)
    if problems:
        return None, problems
    if data is None:
        return None, [
            ConfigProblem(
                "",
                "the file is empty; it must be a mapping of keys such as cluster_id, cloud "
                "and instance_types (`herder config show` prints every key with its default)",
            )
        ]
    config, problems = config_from_data(data, plugins)
    return config, _in_file_order(problems, lines)


class _DuplicateCheckingLoader(yaml.SafeLoader):
    """SafeLoader that records duplicate keys: PyYAML keeps the last one silently, which would
    hide a setting as surely as a misspelled key does."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[ConfigProblem] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[str, int] = {}
        for key_node, _value in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            mark = key_node.start_mark
            if key_node.value in first_line:
                self.duplicates.append(
                    ConfigProblem(
                        "",
                        f"duplicate key {key_node.value!r} (first set on line "
                        f"{first_line[key_node.value]})",
                        mark.line + 1,
                        mark.column + 1,
                    )
                )
            else:
                first_line[key_node.value] = mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike[str]) -> tuple[Any, list[ConfigProblem]]:
    """Parse a YAML file: (data, problems).  Data is None for an empty file."""
    text, problems = _read_text(path)
    if text is None:
        return None, problems
    data, _lines, problems = _parse_yaml(text)
    return data, problems


def _read_text(path: str | os.PathLike[str]) -> tuple[str | None, list[ConfigProblem]]:
    try:
        return Path(path).read_text(encoding="utf-8"), []
    except FileNotFoundError:
        return None, [ConfigProblem("", "no such file")]
    except IsADirectoryError:
        return None, [ConfigProblem("", "is a directory, not a file")]
    except UnicodeDecodeError as exc:
        return None, [ConfigProblem("", f"not UTF-8 text ({exc.reason} at byte {exc.start})")]
    except OSError as exc:
        return None, [ConfigProblem("", f"cannot read the file: {exc.strerror or exc}")]


def _parse_yaml(text: str) -> tuple[Any, dict[tuple[str, ...], int], list[ConfigProblem]]:
    """(data, line of every key path, problems)."""
    try:
        # Building the loader already reads the stream: bad characters fail here.
        loader = _DuplicateCheckingLoader(text)
    except yaml.YAMLError as exc:
        return None, {}, [ConfigProblem("", f"invalid YAML: {exc}")]
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(node) > MAX_YAML_VALUES:
            return (
                None,
                {},
                [
                    ConfigProblem(
                        "",
                        f"the file expands to more than {MAX_YAML_VALUES:,} values through anchors "
                        "and aliases; refusing to load it (a configuration never needs that many)",
                    )
                ],
            )
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        return None, {}, [_yaml_problem(exc)]
    except yaml.YAMLError as exc:
        return None, {}, [ConfigProblem("", f"invalid YAML: {exc}")]
    finally:
        loader.dispose()
    lines: dict[tuple[str, ...], int] = {}
    if node is not None:
        _record_key_lines(node, (), lines)
    return data, lines, loader.duplicates


#: A configuration with more values than this, counting every alias expanded, is refused:
#: a few lines of nested aliases ("billion laughs") would otherwise take minutes to validate.
MAX_YAML_VALUES = 100_000


def _expanded_size(root: yaml.Node) -> int:
    """How many nodes the document has with every alias expanded.

    The composer shares one node between an anchor and its aliases, so the document is a
    graph; the size of each node is computed once (memoized), which keeps this linear in the
    file while the number it finds may be astronomic.  A cycle (a recursive alias) counts as
    too many.
    """
    sizes: dict[int, int] = {}
    visiting: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in visiting:
            return MAX_YAML_VALUES + 1
        visiting.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                total += size(key_node) + size(value_node)
                if total > MAX_YAML_VALUES:
                    break
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                total += size(item)
                if total > MAX_YAML_VALUES:
                    break
        visiting.discard(key)
        sizes[key] = total
        return total

    return size(root)


def _record_key_lines(
    node: yaml.Node, path: tuple[str, ...], lines: dict[tuple[str, ...], int]
) -> None:
    """Where each key path starts, so problems can be listed in the order of the file."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key_path = (*path, str(key_node.value))
                lines.setdefault(key_path, key_node.start_mark.line + 1)
                _record_key_lines(value_node, key_path, lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _record_key_lines(item, (*path, str(index)), lines)


def _in_file_order(
    problems: list[ConfigProblem], lines: dict[tuple[str, ...], int]
) -> list[ConfigProblem]:
    """Sort problems by where their key (or its nearest existing parent) is in the file."""

    def position(problem: ConfigProblem) -> int:
        if problem.line is not None:
            return problem.line
        path = tuple(problem.key.split(".")) if problem.key else ()
        while path:
            if path in lines:
                return lines[path]
            path = path[:-1]
        return 0

    return sorted(problems, key=position)


def _yaml_problem(exc: yaml.MarkedYAMLError) -> ConfigProblem:
    message = f"invalid YAML: {exc.problem or exc.context or 'syntax error'}"
    if exc.context and exc.problem and exc.context_mark is not None:
        message += f" ({exc.context} on line {exc.context_mark.line + 1})"
    mark = exc.problem_mark or exc.context_mark
    if mark is None:
        return ConfigProblem("", message)
    return ConfigProblem("", message, mark.line + 1, mark.column + 1)


# --------------------------------------------------------------------------- error messages


def problems_from_validation_error(
    exc: ValidationError, root: type[BaseModel], prefix: tuple[str, ...] = ()
) -> list[ConfigProblem]:
    """One clear problem per pydantic error, each with its full key path.

    ``root`` is the model that was validated: unknown keys are compared with the valid keys at
    their level to suggest the one that was probably meant.
    """
    problems = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        key = ".".join(str(part) for part in (*prefix, *loc))
        problems.append(ConfigProblem(key, _error_message(error, root, loc)))
    return problems


_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "dict_type": "a mapping of keys to values",
    "model_type": "a mapping of keys to values",
    "model_attributes_type": "a mapping of keys to values",
    "list_type": "a list",
}

_BOUNDS = {
    "greater_than_equal": ("ge", "at least"),
    "greater_than": ("gt", "greater than"),
    "less_than_equal": ("le", "at most"),
    "less_than": ("lt", "less than"),
}


def _error_message(error: Any, root: type[BaseModel], loc: tuple[Any, ...]) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        return _unknown_key_message(str(loc[-1]), _valid_keys(root, loc[:-1]))
    if kind == "missing":
        return "field required"
    if kind in ("value_error", "assertion_error"):
        error_obj = ctx.get("error")
        return str(error_obj) if error_obj is not None else str(error["msg"])
    if kind in _EXPECTED:
        what = _EXPECTED[kind]
        if not loc and what.startswith("a mapping"):
            return f"the file must be {what} (such as cluster_id: ...), not {_describe(error)}"
        return f"expected {what}, got {_describe(error)}"
    if kind in _BOUNDS:
        bound_key, words = _BOUNDS[kind]
        return f"must be {words} {_number(ctx.get(bound_key))}, got {error['input']!r}"
    if kind == "literal_error":
        return f"expected {ctx.get('expected')}, got {error['input']!r}"
    msg = str(error["msg"])
    return f"{msg[:1].lower()}{msg[1:]}, got {_describe(error)}"


def _number(value: Any) -> Any:
    """``1`` rather than ``1.0`` for a whole float bound."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _describe(error: Any) -> str:
    """How a rejected YAML value reads to a person."""
    value = error.get("input")
    if value is None:
        return "nothing (null)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _unknown_key_message(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    if close:
        return f"unknown key (did you mean {close[0]!r}?)"
    if valid and len(valid) <= 8:
        return f"unknown key; valid keys here: {', '.join(valid)}"
    return "unknown key"


def _valid_keys(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys the model at ``loc`` (a path from ``root``) accepts."""
    model = _model_at(root, loc)
    if model is None:
        return []
    return [field.alias or name for name, field in model.model_fields.items()]


def _model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """Follow a pydantic error location through fields, dict values and list items."""
    current: Any = root
    for part in loc:
        current = _unwrap(current)
        if _is_model(current):
            field = _field_by_key(current, str(part))
            if field is None:
                return None
            current = field.annotation
        elif get_origin(current) in (dict, Mapping) and len(get_args(current)) == 2:
            current = get_args(current)[1]
        elif get_origin(current) in (list, tuple) and get_args(current):
            current = get_args(current)[0]
        else:
            return None
    current = _unwrap(current)
    return current if _is_model(current) else None


def _field_by_key(model: type[BaseModel], key: str) -> FieldInfo | None:
    for name, field in model.model_fields.items():
        if key in (name, field.alias):
            return field
    return None


def _unwrap(annotation: Any) -> Any:
    """``Annotated[X, ...]`` → X; ``X | None`` → X (the first model among the options)."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, UnionType):
        options = [a for a in get_args(annotation) if a is not type(None)]
        models = [a for a in options if _is_model(a)]
        return models[0] if models else (options[0] if len(options) == 1 else annotation)
    return annotation


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


# --------------------------------------------------------------------------- rendering


def render_config(config: BaseModel, *, redact: bool = True) -> dict[str, Any]:
    """The config as plain data, with durations and sizes written back as text.

    The result is what a person would write in the file, so ``herder config show`` output can
    be saved and loaded again.  Secrets (the management token) are replaced by ``<redacted>``.
    """
    out: dict[str, Any] = {}
    for name, field in type(config).model_fields.items():
        value = getattr(config, name)
        if redact and name == "management_token" and value:
            out[name] = "<redacted>"
        elif _has_validator(field, parse_duration):
            out[name] = duration_text(value)
        elif _has_validator(field, parse_size):
            out[name] = size_text(value)
        else:
            out[name] = _render_value(value, redact)
    return out


def _render_value(value: Any, redact: bool) -> Any:
    if isinstance(value, BaseModel):
        return render_config(value, redact=redact)
    if isinstance(value, dict):
        return {k: _render_value(v, redact) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_render_value(v, redact) for v in value]
    return value


def _has_validator(field: FieldInfo, func: Any) -> bool:
    return any(isinstance(m, BeforeValidator) and m.func is func for m in field.metadata)


def duration_text(seconds: float) -> str:
    """Seconds as a duration string that :func:`parse_duration` reads back exactly-ish:
    ``10s``, ``1m30s``, ``2h``, ``500ms``, ``1.5s``."""
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{round(seconds * 1000, 6):g}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    parts = []
    if hours:
        parts.append(f"{int(hours)}h")
    if minutes:
        parts.append(f"{int(minutes)}m")
    if secs:
        parts.append(f"{round(secs, 6):g}s")
    return "".join(parts)


_BINARY_UNITS = (
    ("Ei", 1024**6),
    ("Pi", 1024**5),
    ("Ti", 1024**4),
    ("Gi", 1024**3),
    ("Mi", 1024**2),
    ("Ki", 1024),
)
_DECIMAL_UNITS = (
    ("E", 1000**6),
    ("P", 1000**5),
    ("T", 1000**4),
    ("G", 1000**3),
    ("M", 1000**2),
    ("K", 1000),
)


def size_text(nbytes: int) -> str:
    """A byte count in the largest unit that divides it exactly: ``4GiB``, ``500MB``, ``1023``."""
    if nbytes == 0:
        return "0B"
    for units in (_BINARY_UNITS, _DECIMAL_UNITS):
        for unit, factor in units:
            if nbytes % factor == 0:
                return f"{nbytes // factor}{unit}B"
    return str(nbytes)

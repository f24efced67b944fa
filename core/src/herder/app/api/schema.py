"""The JSON shapes of the management API: request validation and response documents.

Requests are validated by strict pydantic models (``extra="forbid"``, no silent type coercion),
so a typo in a field name or a string where a number belongs is a 400 that names the field
instead of a container that runs with a default.  Sizes accept ``4GiB``-style strings and
durations ``1h``-style strings, as the config file does (:mod:`herder.units`).

Responses are built through the models below too, so the OpenAPI document generated from them
(:mod:`herder.app.api.openapi`) describes exactly what the server sends.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from herder.model import (
    ARRAY_ID_RE,
    CONTAINER_UUID_RE,
    IMAGE_REFERENCE_PATTERN,
    ContainerState,
    IdleBehavior,
    WorkerState,
    is_image_reference,
)
from herder.units import parse_duration, parse_size

#: Largest size, count or priority accepted: what the queue's SQLite integers can hold.
MAX_INT = 2**63 - 1
#: Largest ``max_run_time`` accepted (ten years): beyond it a number is a mistake, not a limit.
MAX_RUN_TIME = 10 * 365 * 24 * 3600.0
#: Environment variable names a container engine and a shell both accept.
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_NAME_LENGTH = 255
#: A label key: letters, digits and ``. _ / -``, starting with a letter or digit (as the
#: clouds' own tag keys mostly allow, so that labels could be copied to them).
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")
MAX_LABELS = 64
MAX_LABEL_VALUE = 255
MAX_REASON_LENGTH = 1000


def _size(value: Any) -> int:
    """A byte count from an integer or a ``4GiB``-style string (floats are refused: sizes are
    whole bytes, and a float usually means a unit was forgotten)."""
    if isinstance(value, float):
        raise ValueError(f"invalid size {value!r}: expected an integer or a string like 4GiB")
    return parse_size(value)


def _duration(value: Any) -> float:
    """Seconds from a number or a ``1h30m``-style string; finite and not absurdly large."""
    seconds = parse_duration(value)
    if not math.isfinite(seconds) or seconds > MAX_RUN_TIME:
        raise ValueError(f"invalid duration {value!r}: must be at most {MAX_RUN_TIME:.0f}s")
    return seconds


Size = Annotated[
    int,
    BeforeValidator(_size),
    Field(ge=0, le=MAX_INT),
    WithJsonSchema(
        {
            "oneOf": [
                {"type": "integer", "minimum": 0, "maximum": MAX_INT},
                {"type": "string", "examples": ["4GiB", "500MB"]},
            ],
            "description": "bytes, or a size with a unit (K, M, G, T, Ki, Mi, Gi, Ti)",
        },
        mode="validation",
    ),
]

Duration = Annotated[
    float,
    BeforeValidator(_duration),
    WithJsonSchema(
        {
            "oneOf": [
                {"type": "number", "minimum": 0, "maximum": MAX_RUN_TIME},
                {"type": "string", "examples": ["1h", "90s", "1h30m"]},
            ],
            "description": "seconds, or a duration with units (s, m, h); 0 means no limit",
        },
        mode="validation",
    ),
]

Count = Annotated[int, Field(ge=0, le=2**31 - 1)]
Text = Annotated[str, Field(max_length=4096)]


def _no_nul(value: str, what: str) -> str:
    """NUL cannot appear in argv, environment or paths; refuse it before a runner chokes on it."""
    if "\x00" in value:
        raise ValueError(f"{what} must not contain NUL characters")
    return value


class _Request(BaseModel):
    """Base of request bodies: unknown fields and loose types are errors."""

    model_config = ConfigDict(extra="forbid", strict=True)


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- requests


class GPURequestBody(_Request):
    """GPUs a container needs; ``stack`` must match the instance type's."""

    stack: Literal["", "cuda", "rocm"] = ""
    device_count: Count = 0
    driver_version: Annotated[str, Field(max_length=64)] = ""
    hardware_target: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=64)] = (
        Field(default_factory=list)
    )
    vram: Size = 0


class RuntimeConstraintsBody(_Request):
    """What the container needs.  ``gpus: N`` is short for ``gpu: {device_count: N}`` with the
    stack of the configured GPU instance types."""

    vcpus: Annotated[
        int,
        Field(
            ge=0,
            le=2**31 - 1,
            description="VCPUs needed; 0 asks for a share of one VCPU that all 0-VCPU "
            "containers on an instance share (as in Arvados), for light work",
        ),
    ] = 1
    ram: Annotated[
        Size, Field(description="bytes of RAM needed; 0: nothing beyond the configured reserve")
    ] = 0
    scratch: Size = 0
    gpus: Count | None = None
    gpu: GPURequestBody | None = None

    @model_validator(mode="after")
    def _one_gpu_form(self) -> RuntimeConstraintsBody:
        if self.gpu is not None and self.gpus is not None:
            raise ValueError("give either gpus or gpu, not both")
        return self


class SchedulingParametersBody(_Request):
    preemptible: bool = False
    max_run_time: Duration = 0.0
    supervisor: bool = False


class SubmitRequest(_Request):
    """A new container."""

    command: Annotated[list[Text], Field(min_length=1, max_length=10_000)]
    image: Annotated[
        str,
        Field(
            max_length=512,
            # In the document; checked by _image below, with a message people can act on.
            json_schema_extra={"pattern": IMAGE_REFERENCE_PATTERN},
            description="an image reference ([registry/]name[:tag][@digest]); empty: none",
        ),
    ] = ""
    environment: Annotated[dict[str, Text], Field(max_length=10_000)] = Field(default_factory=dict)
    cwd: Text = ""
    runtime: Literal["", "docker", "podman", "process"] = ""
    runtime_constraints: RuntimeConstraintsBody = Field(default_factory=RuntimeConstraintsBody)
    scheduling_parameters: SchedulingParametersBody = Field(
        default_factory=SchedulingParametersBody
    )
    priority: Count = 1
    name: Annotated[str, Field(max_length=MAX_NAME_LENGTH)] = ""
    after: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=MAX_NAME_LENGTH)]],
        Field(max_length=1000),
    ] = Field(
        default_factory=list,
        description="containers that must complete with exit code 0 first: this one is held "
        "until they have, and cancelled if one fails or is cancelled.  Each is a container "
        "uuid or, in a batch, the `name` of another item of the batch (a name given to "
        "exactly one item)",
    )
    pull_policy: Literal["", "if-not-present", "always", "never"] = Field(
        "", description="when to pull the image; empty: containers.pull_policy"
    )
    labels: Annotated[dict[str, str], Field(max_length=MAX_LABELS)] = Field(
        default_factory=dict,
        description="free-form labels (key: letters, digits, . _ / -; value: up to 255 "
        "characters) that cost reports group by",
    )

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not LABEL_KEY_RE.fullmatch(key):
                raise ValueError(
                    f"invalid label key {key[:70]!r}: expected up to 63 letters, digits and "
                    "'._/-', starting with a letter or digit"
                )
            if len(value) > MAX_LABEL_VALUE or any(ord(ch) < 32 for ch in value):
                raise ValueError(
                    f"label {key!r}: a value of at most {MAX_LABEL_VALUE} characters without "
                    "control characters"
                )
        return v

    @field_validator("command")
    @classmethod
    def _command(cls, v: list[str]) -> list[str]:
        for arg in v:
            _no_nul(arg, "command arguments")
        return v

    @field_validator("environment")
    @classmethod
    def _environment(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not ENV_NAME_RE.fullmatch(key):
                raise ValueError(
                    f"invalid environment variable name {key[:50]!r}: expected letters, digits "
                    "and underscores, not starting with a digit"
                )
            _no_nul(value, f"environment variable {key}")
        return v

    @field_validator("cwd")
    @classmethod
    def _cwd(cls, v: str) -> str:
        _no_nul(v, "cwd")
        if v and not v.startswith("/"):
            raise ValueError("cwd must be an absolute path")
        return v

    @field_validator("name")
    @classmethod
    def _plain_text(cls, v: str) -> str:
        return _no_nul(v, "the value")

    @field_validator("image")
    @classmethod
    def _image(cls, v: str) -> str:
        if not is_image_reference(v):
            raise ValueError(
                f"invalid image reference {v[:80]!r}: expected [registry[:port]/]name[:tag]"
                "[@digest], the name in lowercase (for example ubuntu:24.04 or "
                "ghcr.io/org/tool@sha256:...)"
            )
        return v


#: Most containers one batch (or array) request may submit.
MAX_BATCH = 10_000


class BatchRequest(_Request):
    """Several containers submitted at once: all are stored, or none is."""

    items: Annotated[list[SubmitRequest], Field(min_length=1, max_length=MAX_BATCH)]


class ArrayRequest(SubmitRequest):
    """``count`` containers of one spec sharing an array id; each finds its index (0 to
    count - 1) in ``$HERDER_ARRAY_INDEX`` and the id in ``$HERDER_ARRAY_ID``."""

    count: Annotated[int, Field(ge=1, le=MAX_BATCH)]


class CancelRequest(_Request):
    reason: Annotated[str, Field(max_length=MAX_REASON_LENGTH)] = ""


class CancelManyRequest(_Request):
    """Containers to cancel: the ``uuids`` listed, or the unfinished members of an ``array``."""

    uuids: Annotated[
        list[Annotated[str, Field(pattern=CONTAINER_UUID_RE.pattern)]],
        Field(max_length=MAX_BATCH),
    ] = Field(default_factory=list, description="these containers")
    array: str = Field(
        "",
        pattern=f"^$|{ARRAY_ID_RE.pattern}",
        description="the unfinished members of this array (`submit --count`)",
    )
    reason: Annotated[str, Field(max_length=MAX_REASON_LENGTH)] = ""

    @model_validator(mode="after")
    def _one_selection(self) -> CancelManyRequest:
        if bool(self.uuids) == bool(self.array):
            raise ValueError("give either uuids (a non-empty list) or array, not both")
        return self


class PriorityRequest(_Request):
    priority: Count


class InstanceActionRequest(_Request):
    """Body of hold / drain / run / kill; the reason is logged (and recorded for kill)."""

    reason: Annotated[str, Field(max_length=MAX_REASON_LENGTH)] = ""


# --------------------------------------------------------------------------- responses

Timestamp = Annotated[
    str | None, Field(description="RFC 3339 time in UTC, or null when it has not happened")
]


class GPUOut(_Response):
    stack: str
    device_count: int
    driver_version: str
    hardware_target: list[str]
    vram: int


class RuntimeConstraintsOut(_Response):
    vcpus: int
    ram: int
    scratch: int
    gpu: GPUOut


class SchedulingParametersOut(_Response):
    preemptible: bool
    max_run_time: float
    supervisor: bool


class AttemptOut(_Response):
    """One dispatch of a container: where, when, and how it ended."""

    number: int = Field(description="1 for the first dispatch, counting every lock")
    instance_id: str | None
    instance_type: str | None
    started_at: Timestamp
    ended_at: Timestamp
    outcome: str = Field(
        description="running, complete, retried (runner or instance lost, or the instance "
        "could not start it), unlocked (never started) or cancelled"
    )
    reason: str = Field(description="why it ended so, for retried, unlocked and cancelled")
    exit_code: int | None
    cost: float


class ContainerOut(_Response):
    """A container as the API shows it."""

    uuid: str
    name: str
    labels: dict[str, str] = Field(default_factory=dict)
    state: ContainerState
    priority: int
    command: list[str]
    image: str
    environment: dict[str, str]
    cwd: str
    runtime: str
    pull_policy: str = Field("", description="as submitted; empty: containers.pull_policy")
    runtime_constraints: RuntimeConstraintsOut
    scheduling_parameters: SchedulingParametersOut
    scheduling_status: str = Field(
        description="why a waiting container waits (empty once it runs or ends)"
    )
    instance_id: str | None
    instance_type: str | None
    attempts: int = Field(description="how many times the container was locked for dispatch")
    attempt_history: list[AttemptOut] = Field(
        default_factory=list, description="every dispatch attempt, oldest first"
    )
    exit_code: int | None
    cost: float
    runtime_status: dict[str, str]
    created_at: Timestamp
    locked_at: Timestamp
    started_at: Timestamp
    finished_at: Timestamp
    run_time: float | None = Field(description="seconds it has run (so far), null if not started")
    array_id: str = Field("", description="the array it belongs to; empty when none")
    after: list[str] = Field(
        default_factory=list, description="the containers it was submitted to wait for"
    )


class BatchOut(_Response):
    items: list[ContainerOut] = Field(description="the containers, in the request's order")


class ArrayOut(_Response):
    array_id: str = Field(description="list, wait on or cancel the members with it")
    items: list[ContainerOut] = Field(description="the members, by index")


class ContainerList(_Response):
    items: list[ContainerOut]
    next: str | None = Field(description="pass as ?after= to get the next page; null at the end")
    total: int | None = Field(
        None,
        description="with order=queue: how many containers are in line from this page's "
        "first on (this page and all after it); null for the other orders",
    )


CancelOutcome = Literal["cancelled", "final", "not_found"]


class CancelOutcomeOut(_Response):
    uuid: str
    outcome: CancelOutcome = Field(
        description="`cancelled`: cancelled now; `final`: it had already completed or been "
        "cancelled, and is left as it was; `not_found`: no such container"
    )
    state: ContainerState | None = Field(description="its state now; null when not found")


class CancelManyOut(_Response):
    items: list[CancelOutcomeOut] = Field(
        description="what happened to each container, in the request's order (an array's "
        "members oldest first)"
    )
    cancelled: int = Field(description="how many were cancelled by this request")


class LogChunk(_Response):
    offset: int = Field(description="byte offset of data in the log")
    next_offset: int = Field(description="offset to ask for next")
    data: str = Field(description="the log text (UTF-8, invalid bytes replaced)")
    final: bool = Field(
        description="true when the container has ended, its runner is gone, a moment has "
        "passed for its last lines, and data reaches the end"
    )


class InstanceTypeGPUOut(_Response):
    stack: str
    driver_version: str
    hardware_target: str
    device_count: int
    vram: int


class InstanceTypeOut(_Response):
    """An instance type herder may create (configured, or offered by the driver)."""

    name: str
    provider_type: str
    vcpus: int
    ram: int
    included_scratch: int
    added_scratch: int
    scratch: int
    price: float = Field(description="configured price per hour")
    preemptible: bool
    gpu: InstanceTypeGPUOut
    spot_price: float | None = Field(
        description="current price per hour on the provider's spot market, from an instance "
        "of this type running now; null when none runs or the driver does not tell"
    )


class InstanceTypeList(_Response):
    items: list[InstanceTypeOut] = Field(description="cheapest first")


class InstanceOut(_Response):
    """An instance (SPEC §10.2's InstanceView, plus what operators ask next)."""

    instance: str = Field(description="provider id; empty for a create still in progress")
    address: str
    price: float
    instance_type: str
    provider_instance_type: str
    last_container_uuid: str
    last_busy: Timestamp
    running_container_uuids: list[str]
    worker_state: WorkerState
    idle_behavior: IdleBehavior
    state_since: Timestamp
    time_in_state: float = Field(description="seconds in the current worker_state")
    last_probe: Timestamp
    appeared: Timestamp
    boot_outcome: str | None
    probe_error: str = Field(
        "",
        description="why the latest probe failed (unreachable, bastion down...); "
        "empty once a probe succeeds",
    )
    reason: str = Field(
        "",
        description="why the instance's idle behaviour is what it is (a drain's cause, "
        "an idle instance kept for its paid billing increment...)",
    )
    drain_cause: str = Field(
        "",
        description="who or what drained it: operator, broken, lifetime, consolidation, "
        "budget; empty when not drained by a known cause",
    )
    paid_until: Timestamp = Field(
        None,
        description="when the billing increment the instance is in ends (types billed "
        "in increments only)",
    )
    market_price: float | None = Field(
        None,
        description="the price per hour in force from the driver's price history (spot "
        "markets), which spend counts; null when the driver reports none",
    )


class InstanceList(_Response):
    items: list[InstanceOut]


class RegistrationOut(_Response):
    kind: str
    name: str
    target: str
    description: str


class PluginOut(_Response):
    name: str
    distribution: str
    version: str
    registrations: list[RegistrationOut]


class PluginList(_Response):
    items: list[PluginOut]


class Health(_Response):
    health: Literal["OK", "ERROR"]
    error: str | None = None


class FieldError(_Response):
    # Optional in the document: error bodies leave out null fields, nested ones included.
    field: str | None = None
    error: str


class ErrorOut(_Response):
    error: str
    field: str | None = None
    errors: list[FieldError] | None = None


class SummaryOut(_Response):
    """The totals of the status page."""

    instances: dict[str, int] = Field(description="instances (pending creates too) by worker state")
    containers: dict[str, int] = Field(description="containers in storage, by state")
    cost_per_hour: float = Field(description="summed hourly price of every existing instance")


class QuotaOut(_Response):
    """One of the cloud account's quotas, as the driver last read it."""

    name: str = Field(description="the provider's name of the quota")
    group: str = Field(description="the quota group whose instance types count against it")
    unit: str = Field(description="vcpus, gpus or instances")
    description: str
    limit: float
    usage: float = Field(description="the whole account's usage when read")
    herder: float = Field(description="what herder's own live instances take of it")
    pending: float = Field(description="what herder created since the read (not in usage)")
    wanted: float = Field(
        description="what waiting containers would take had the quota room (last pass)"
    )
    headroom: float = Field(description="limit - usage - pending")
    read_at: Timestamp


class QuotaList(_Response):
    enabled: bool = Field(
        description="the driver reads quotas (capability quota_headroom) and "
        "cloud.quota_refresh_interval is not 0"
    )
    items: list[QuotaOut]


class BudgetOut(_Response):
    """The spend budget (cloud.budget) as of the latest scheduling pass."""

    period: str = Field(description="hour, day or month (UTC)")
    period_start: Timestamp
    period_end: Timestamp
    spent: float = Field(description="spend in the current period, in the types' price unit")
    soft_limit: float | None
    hard_limit: float | None
    soft_reached: bool
    hard_reached: bool
    on_hard_limit: str = Field(description="finish or stop")
    message: str = Field(
        description="what waiting containers are told while a limit is reached; else empty"
    )


class SpendBucketOut(_Response):
    period: str = Field(description="the period's label, UTC (2026-12-06, 2026-12, ...)")
    start: Timestamp
    end: Timestamp
    spent: float


class ContainerCostsOut(_Response):
    finished: int = Field(description="containers that finished in the report's range")
    total: float
    per_container: float
    by_instance_type: dict[str, float]
    by_name: dict[str, float]
    by_label: dict[str, float] = Field(
        default_factory=dict,
        description="cost by container label, as key=value (a container counts under each "
        "of its labels; unlabelled ones under the empty string)",
    )


class CostReportOut(_Response):
    """Spend by period and instance type, and what finished containers cost."""

    period: str
    since: Timestamp
    until: Timestamp
    total: float
    by_period: list[SpendBucketOut]
    by_instance_type: dict[str, float]
    containers: ContainerCostsOut


class InstanceActionOut(_Response):
    instance: str
    action: Literal["hold", "drain", "run", "kill"]


# --------------------------------------------------------------------------- helpers


def rfc3339(ts: float | None) -> str | None:
    """Epoch seconds as an RFC 3339 UTC string; None (and 0, "never") as None."""
    if not ts:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def field_path(loc: tuple[int | str, ...]) -> str:
    """``("runtime_constraints", "ram")`` → ``runtime_constraints.ram``; list indexes as [i]."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


#: Where the framework says a request's error is; pydantic's own errors carry no such prefix.
_REQUEST_PARTS = ("body", "query", "path", "header")


def field_errors(errors: Iterable[Mapping[str, Any]]) -> list[FieldError]:
    """Validation errors (pydantic's, or the framework's for a whole request) as (field,
    message) pairs that a person can act on, without echoing huge inputs back."""
    return [_field_error(err) for err in errors]


def _field_error(err: Mapping[str, Any]) -> FieldError:
    loc = tuple(p for p in err.get("loc", ()) if not str(p).startswith("function-"))
    where, path = (loc[0], loc[1:]) if loc and loc[0] in _REQUEST_PARTS else ("body", loc)
    kind = err.get("type", "")
    message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind == "json_invalid":
        return FieldError(field=None, error=f"request body is not valid JSON: {message}"[:500])
    if where == "body" and not path and kind == "missing":
        return FieldError(field=None, error="a JSON object is required as request body")
    if kind == "extra_forbidden":
        message = "unknown query parameter" if where == "query" else "unknown field"
    if where == "path":
        message = f"not a valid {path[0] if path else 'path'}: {message}"
    field = field_path(path[:1] if where == "query" else path)
    return FieldError(field=field[:100] or None, error=message[:500])

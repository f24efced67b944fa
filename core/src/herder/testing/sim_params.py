"""Parameters of the ``sim`` driver: the simulated cloud's timings and its fault knobs.

Every knob defaults to "no fault", so ``driver: sim`` alone is a perfectly reliable cloud.
``faults: true`` (or :meth:`SimParameters.all_faults`) turns every fault on at rates that still
let a workload finish; any knob given explicitly next to it wins.

Delays are seconds, either a number or a ``[min, max]`` pair drawn uniformly per use (jitter).
Rates are probabilities between 0 and 1, drawn from one random generator seeded by ``seed``, so
a run under the virtual clock is reproducible.
"""

from __future__ import annotations

import random
from typing import Annotated, Any, Literal

from pydantic import Field, NonNegativeFloat, field_validator, model_validator

from herder.plugin.cloud import DriverParameters

#: A delay in seconds: fixed, or ``(min, max)`` drawn uniformly.
Delay = float | tuple[NonNegativeFloat, NonNegativeFloat]
Rate = Annotated[float, Field(ge=0.0, le=1.0)]

#: What ``faults: true`` turns on.  Moderate: a run of a few hundred containers sees every kind
#: fire, and the engine's retries still get every container done.  Broken and vanishing
#: instances go early, so that they happen even to instances that live only minutes.  The
#: per-instance rates are the highest: packing puts a few hundred containers on a few dozen
#: instances, and each kind must still fire in such a run.
FAULT_DEFAULTS: dict[str, Any] = {
    "create_error_rate": 0.1,
    "destroy_error_rate": 0.15,
    "quota_max_instances": 10,
    "capacity_error_rate": 0.15,
    "capacity_error_scope": "instance_type",
    "min_time_between_create_calls": 1.0,
    "min_time_between_list_calls": 1.0,
    "never_boot_rate": 0.15,
    "broken_rate": 0.2,
    "broken_after": (10.0, 120.0),
    "disappear_rate": 0.15,
    "disappear_after": (10.0, 120.0),
    "runner_crash_rate": 0.03,
    "ssh_failure_rate": 0.01,
    "stale_lock_rate": 0.05,
    "runner_missing": True,
}


def draw_delay(rng: random.Random, delay: Delay) -> float:
    """One value of ``delay``: itself, or uniform in its ``(min, max)`` range."""
    if isinstance(delay, tuple):
        return rng.uniform(delay[0], delay[1])
    return float(delay)


class SimParameters(DriverParameters):
    """``cloud.driver_parameters`` of the ``sim`` driver."""

    seed: int = Field(0, description="seed of every random draw (faults, jitter)")
    faults: bool = Field(
        False, description="turn every fault on at moderate rates (explicit knobs win)"
    )
    state_file: str | None = Field(
        None,
        description="SQLite file the simulated cloud keeps its state in, so that it outlives a "
        "dispatcher process killed without warning and can be shared by live ones (a leader "
        "and its standby) (None: in memory only)",
    )

    # ---- instances
    boot_delay: Delay = Field(
        (20.0, 40.0), description="seconds from create until commands succeed; [min, max] jitters"
    )
    address_delay: Delay = Field(
        0.0, description="seconds from create until the address is known (capped at boot)"
    )
    destroy_delay: Delay = Field(
        0.0, description="seconds a destroyed instance stays listed (shutting down)"
    )
    remote_user: str = Field(
        "root", description="login user; anything else makes herder prefix commands with sudo"
    )
    host_key_verification: bool = Field(
        False,
        description="instances verify SSH host keys themselves; otherwise herder checks the "
        "instance secret planted by the init command",
    )
    check_host_keys: bool = Field(
        True,
        description="the executor checks the host key on connect, as the SSH executor does "
        "(through the instance's verify_host_key)",
    )
    price_history: bool = Field(
        False, description="instances report a price history (so --list gets --stdin-prices)"
    )
    billing_increment: float = Field(
        1.0,
        ge=1.0,
        description="seconds: the simulated cloud bills instances in steps of this long "
        "(3600 = hourly), and says so to herder (Driver.billing)",
    )
    billing_minimum: NonNegativeFloat = Field(
        0.0, description="seconds: the least time the simulated cloud bills for one instance"
    )
    kill_delay: NonNegativeFloat = Field(
        2.0,
        description="seconds a container process lives after SIGTERM; up to 1 s the runner "
        "waits it out and --kill reports success at once",
    )

    # ---- cloud call faults (Arvados' stub driver knobs)
    create_error_rate: Rate = Field(0.0, description="probability a create fails (plain error)")
    destroy_error_rate: Rate = Field(0.0, description="probability a destroy fails (plain error)")
    quota_max_instances: int | None = Field(
        None, ge=0, description="QuotaError when this many instances are listed (None: no quota)"
    )
    quota_vcpus: dict[str, int] = Field(
        default_factory=dict,
        description="quota group (first letter of the provider type, -p for preemptible) → "
        "vCPUs the account may run in it: a create beyond it gets QuotaError, and the driver "
        "reports these quotas and their usage (capability quota_headroom)",
    )
    capacity_error_rate: Rate = Field(0.0, description="probability a create gets CapacityError")
    capacity_error_scope: Literal["instance_type", "quota_group", "global"] = Field(
        "instance_type", description="what a random CapacityError says it affects"
    )
    capacity_max_instances: dict[str, int] = Field(
        default_factory=dict,
        description="provider type → listed instances of it before creates get an instance-type "
        "specific CapacityError",
    )
    min_time_between_create_calls: NonNegativeFloat = Field(
        0.0, description="RateLimitError for a create sooner than this after the last good one"
    )
    min_time_between_list_calls: NonNegativeFloat = Field(
        0.0, description="RateLimitError for a listing sooner than this after the last one"
    )

    # ---- instance faults
    never_boot_rate: Rate = Field(0.0, description="probability an instance never boots")
    broken_rate: Rate = Field(
        0.0, description="probability an instance's runner reports `broken` some time after boot"
    )
    broken_after: Delay = Field(
        (60.0, 600.0), description="seconds after boot when a broken instance starts saying so"
    )
    disappear_rate: Rate = Field(
        0.0, description="probability an instance vanishes from the cloud (spot reclaim)"
    )
    disappear_after: Delay = Field(
        (60.0, 1800.0), description="seconds after create when a vanishing instance goes"
    )

    # ---- runner and connection faults
    runner_crash_rate: Rate = Field(
        0.0, description="probability a container's runner dies without an exit code"
    )
    ssh_failure_rate: Rate = Field(
        0.0,
        description="probability a command raises ExecutorError (half of them after the "
        "command ran: the outcome is unknown to herder)",
    )
    stale_lock_rate: Rate = Field(
        0.0, description="probability an exited container's lock stays held (`<uuid> stale`)"
    )
    runner_missing: bool = Field(
        False, description="runner commands fail (not found) until herder deploys the runner"
    )
    probe_latency: NonNegativeFloat = Field(
        0.0,
        description="seconds each command takes; slept on a real clock, and under the "
        "virtual clock only compared with the command's timeout",
    )

    @model_validator(mode="before")
    @classmethod
    def _expand_faults(cls, data: Any) -> Any:
        """``faults: true`` fills in every fault knob the caller did not set."""
        if isinstance(data, dict) and data.get("faults"):
            return {**FAULT_DEFAULTS, **data}
        return data

    @field_validator(
        "boot_delay", "address_delay", "destroy_delay", "broken_after", "disappear_after"
    )
    @classmethod
    def _delay(cls, value: Delay) -> Delay:
        if isinstance(value, tuple):
            low, high = value
            if low > high:
                raise ValueError(f"delay range [{low}, {high}] has min > max")
            return value
        if value < 0:
            raise ValueError("delay must be >= 0")
        return value

    @classmethod
    def all_faults(cls, **overrides: Any) -> SimParameters:
        """Parameters with every fault on at moderate rates (``overrides`` win)."""
        return cls.model_validate({"faults": True, **overrides})

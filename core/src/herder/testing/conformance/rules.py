"""The rules a cloud driver must keep, as herder relies on them (``DEVELOPING-DRIVERS.md`` §2).

Each rule has one sentence, quoted in every failure message as ``(rule: <sentence>)`` so that a
driver author reading a red test knows what to fix without reading herder's internals.
"""

from __future__ import annotations


class ConformanceError(AssertionError):
    """A driver broke a rule.  ``rule`` is the sentence of the rule broken.

    An :class:`AssertionError`, so pytest reports it as a test failure, not as an error in
    the test's setup.
    """

    def __init__(self, detail: str, rule: str) -> None:
        super().__init__(f"{detail} (rule: {rule})")
        self.rule = rule
        self.detail = detail


def fail(detail: str, rule: str) -> ConformanceError:
    """The exception to raise when ``rule`` is broken; ``detail`` says what was seen."""
    return ConformanceError(detail, rule)


CREATE_RETURNS_INSTANCE = (
    "create returns an instance of the requested provider type carrying exactly the given tags"
)
CREATED_IS_LISTED = "instances() lists every instance created, at most listing_delay after create"
LISTING_KEEPS_MATCHES = "listings must not drop instances that match the tag filter"
IDS_STABLE = "an instance's id is stable and the same in create and every listing"
IDS_NEVER_REUSED = (
    "an id names one instance only: no two instances ever get the same id, not even after "
    "the first is destroyed"
)
TAGS_IN_CLOUD = (
    "tags are stored in the cloud: another instance set built from the same parameters (another "
    "process, another host) lists the same tags"
)
TAGS_EXACT = "tags are given back exactly as set (keys and values unchanged)"
SET_TAGS_REPLACES = "set_tags replaces all tags, and a later listing shows the new tags"
DESTROY_REMOVES = "destroy makes the instance leave the listing, at most listing_delay later"
DESTROY_ONLY_TARGET = "destroy terminates only the instance it is called on"
DESTROY_IDEMPOTENT = "destroying an instance that is already destroyed is not an error"
INSTANCE_SETS_ISOLATED = (
    "instance sets with different ids never see or touch each other's instances"
)
THREAD_SAFE = "every public method is safe to call from several threads at once"
QUOTA_ERROR_TYPED = "quota errors are raised as herder.plugin.cloud.QuotaError"
CAPACITY_ERROR_TYPED = "capacity errors are raised as herder.plugin.cloud.CapacityError"
RATE_LIMIT_ERROR_TYPED = (
    "rate limits are raised as herder.plugin.cloud.RateLimitError with an earliest_retry time"
)
QUOTA_GROUPS_SPLIT = "quota_group differs between the preemptible and on-demand variant of a type"
ADDRESS_USABLE = (
    "once booted, address and remote_user let herder's executor run commands on the instance"
)
ADDRESS_FORMAT = 'address is "", "host" or "host:port"'
HOST_KEY_CHECKED = (
    "verify_host_key raises NotImplementedByDriver, or checks the key and refuses a wrong one"
)
HOST_KEY_DECLARED = (
    "a driver declaring host_key_verification never raises NotImplementedByDriver from "
    "verify_host_key"
)
PRICE_HISTORY_ORDERED = "price_history returns InstancePrice points, newest first"
QUOTAS_REPORTED = (
    "a driver declaring quota_headroom returns Quota values from quotas (a name, a limit and "
    "usage not negative), among them one of a quota group of the target's instance types"
)
SPOT_CREATES = "a driver declaring spot creates preemptible instance types"
GPU_CREATES = "a driver declaring gpu creates GPU instance types"
DEFAULT_TYPES_DECLARED = (
    "default_instance_types offers a preemptible type only with the spot capability and a type "
    "with GPUs only with the gpu capability (for the same parameters)"
)
INIT_COMMAND_RUN = "create runs init_command as root at the instance's first boot"
PUBLIC_KEY_INSTALLED = "create lets public_key log in as the instance's remote_user"
IDEMPOTENT_CREATE = (
    "a driver declaring idempotent_create returns the instance already made when a create is "
    "repeated with the same create key (the <prefix>InstanceSecret tag) instead of making another"
)

#: Every rule, for documentation and for tools that list them.
ALL_RULES: tuple[str, ...] = (
    CREATE_RETURNS_INSTANCE,
    CREATED_IS_LISTED,
    LISTING_KEEPS_MATCHES,
    IDS_STABLE,
    IDS_NEVER_REUSED,
    TAGS_EXACT,
    TAGS_IN_CLOUD,
    SET_TAGS_REPLACES,
    DESTROY_REMOVES,
    DESTROY_ONLY_TARGET,
    DESTROY_IDEMPOTENT,
    INSTANCE_SETS_ISOLATED,
    THREAD_SAFE,
    QUOTA_ERROR_TYPED,
    CAPACITY_ERROR_TYPED,
    RATE_LIMIT_ERROR_TYPED,
    QUOTA_GROUPS_SPLIT,
    ADDRESS_USABLE,
    ADDRESS_FORMAT,
    HOST_KEY_CHECKED,
    HOST_KEY_DECLARED,
    PRICE_HISTORY_ORDERED,
    QUOTAS_REPORTED,
    SPOT_CREATES,
    GPU_CREATES,
    DEFAULT_TYPES_DECLARED,
    INIT_COMMAND_RUN,
    PUBLIC_KEY_INSTALLED,
    IDEMPOTENT_CREATE,
)

"""The checks of the conformance suite, as plain functions of a :class:`ConformanceHarness`.

Each ``check_*`` function exercises one part of the driver interface and raises
:class:`~herder.testing.conformance.rules.ConformanceError` naming the rule broken, or
:class:`Skipped` when the target does not declare the capability it needs.  The pytest classes
in :mod:`herder.testing.conformance.suite` call them; so can any other test runner.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from herder.cloud import (
    CapacityError,
    CloudError,
    HostKey,
    HostKeyMismatch,
    Instance,
    InstancePrice,
    NotImplementedByDriver,
    QuotaError,
    RateLimitError,
    RemoteRunner,
)
from herder.config import Config
from herder.executor import Executor, ExecutorError
from herder.model import InstanceType
from herder.runtime import ThreadRuntime
from herder.testing.conformance import rules
from herder.testing.conformance.rules import fail
from herder.testing.conformance.target import ConformanceHarness
from herder.worker.verify import TagVerifier, init_command


class Skipped(Exception):
    """The check does not apply to this driver; ``str(exc)`` says why."""


def _require(harness: ConformanceHarness, capability: str) -> None:
    if capability not in harness.target.declared:
        raise Skipped(f"the driver does not declare the {capability!r} capability")


def _by_id(listing: list[Instance], instance_id: str) -> Instance:
    for instance in listing:
        if instance.id == instance_id:
            return instance
    raise KeyError(instance_id)


# --------------------------------------------------------------------------- lifecycle


def check_create_returns_instance(harness: ConformanceHarness) -> None:
    """create gives back an instance of the right type with exactly our tags."""
    it = harness.target.instance_types[0]
    tags = {harness.tag("Role"): "create", "plain-key": "a value with spaces"}
    instance = harness.create(tags=tags, instance_type=it)
    if not isinstance(instance, Instance):
        raise fail(f"create returned {type(instance).__name__}, not an Instance",
                   rules.CREATE_RETURNS_INSTANCE)
    if not instance.id:
        raise fail("create returned an instance with an empty id", rules.CREATE_RETURNS_INSTANCE)
    if instance.provider_type != it.provider_type:
        raise fail(
            f"create({it.provider_type!r}) returned an instance of provider type "
            f"{instance.provider_type!r}",
            rules.CREATE_RETURNS_INSTANCE,
        )
    expected = {**harness.owner_tags(), **tags}
    if instance.tags != expected:
        raise fail(f"create returned tags {instance.tags!r}, expected {expected!r}",
                   rules.TAGS_EXACT)


def check_created_instance_is_listed(harness: ConformanceHarness) -> None:
    """A new instance shows up, with the same id, type and tags."""
    iset = harness.instance_set()
    extra = {harness.tag("Role"): "listed"}
    instance = harness.create(iset, tags=extra)
    listing = harness.wait_listed(iset, harness.owner_tags(), [instance.id],
                                  rules.CREATED_IS_LISTED)
    listed = _by_id(listing, instance.id)
    if listed.provider_type != instance.provider_type:
        raise fail(
            f"create said provider type {instance.provider_type!r}, the listing says "
            f"{listed.provider_type!r}",
            rules.IDS_STABLE,
        )
    expected = {**harness.owner_tags(), **extra}
    if listed.tags != expected:
        raise fail(f"the listing gave tags {listed.tags!r}, expected {expected!r}",
                   rules.TAGS_EXACT)
    ids = [i.id for i in listing]
    if len(ids) != len(set(ids)):
        raise fail(f"a listing returned the same id twice: {sorted(ids)}", rules.IDS_STABLE)


def check_listing_keeps_matching_instances(harness: ConformanceHarness) -> None:
    """Filtering by tags may return extra instances but never drops one that matches."""
    iset = harness.instance_set()
    role = harness.tag("Role")
    first = harness.create(iset, tags={role: "a"})
    second = harness.create(iset, tags={role: "b"})
    third = harness.create(iset, tags={role: "a"})
    harness.wait_listed(iset, harness.owner_tags(), [first.id, second.id, third.id],
                        rules.LISTING_KEEPS_MATCHES)
    harness.wait_listed(iset, {**harness.owner_tags(), role: "a"}, [first.id, third.id],
                        rules.LISTING_KEEPS_MATCHES)
    harness.wait_listed(iset, {}, [first.id, second.id, third.id], rules.LISTING_KEEPS_MATCHES)


def check_ids_are_stable(harness: ConformanceHarness) -> None:
    """Several listings give the same id for the same instance."""
    iset = harness.instance_set()
    instance = harness.create(iset)
    for _ in range(3):
        harness.wait_listed(iset, harness.owner_tags(), [instance.id], rules.IDS_STABLE)
    if str(instance) == "":
        raise fail("str(instance) is empty; herder logs instances by it", rules.IDS_STABLE)


def check_set_tags_replaces_tags(harness: ConformanceHarness) -> None:
    """set_tags replaces the whole map, and later listings show the new one."""
    iset = harness.instance_set()
    old_key, new_key = harness.tag("Old"), harness.tag("IdleBehavior")
    instance = harness.create(iset, tags={old_key: "1", new_key: "run"})
    harness.wait_listed(iset, harness.owner_tags(), [instance.id], rules.CREATED_IS_LISTED)
    replacement = {**harness.owner_tags(), new_key: "drain"}
    instance.set_tags(replacement)

    def shows_new_tags(listing: list[Instance]) -> bool:
        return any(i.id == instance.id and i.tags == replacement for i in listing)

    ok, listing = harness.poll(iset, harness.owner_tags(), shows_new_tags)
    if not ok:
        seen = [i.tags for i in listing if i.id == instance.id]
        raise fail(
            f"after set_tags({replacement!r}) the listing still shows {seen!r} "
            f"{harness.target.listing_delay:g}s later",
            rules.SET_TAGS_REPLACES,
        )


def check_destroy_removes_instance(harness: ConformanceHarness) -> None:
    """A destroyed instance leaves the listing; the other instance stays."""
    iset = harness.instance_set()
    doomed = harness.create(iset)
    keeper = harness.create(iset)
    harness.wait_listed(iset, harness.owner_tags(), [doomed.id, keeper.id],
                        rules.CREATED_IS_LISTED)
    doomed.destroy()
    harness.wait_gone(iset, harness.owner_tags(), doomed.id, rules.DESTROY_REMOVES)
    harness.wait_listed(iset, harness.owner_tags(), [keeper.id], rules.DESTROY_ONLY_TARGET)


def check_destroy_twice_is_harmless(harness: ConformanceHarness) -> None:
    """herder may destroy an instance again (a retry, or a second herder): no error."""
    iset = harness.instance_set()
    instance = harness.create(iset)
    harness.wait_listed(iset, harness.owner_tags(), [instance.id], rules.CREATED_IS_LISTED)
    instance.destroy()
    harness.wait_gone(iset, harness.owner_tags(), instance.id, rules.DESTROY_REMOVES)
    for attempt in ("a second", "a third"):
        try:
            instance.destroy()
        except Exception as exc:
            raise fail(
                f"{attempt} destroy of {instance.id} raised {type(exc).__name__}: {exc}",
                rules.DESTROY_IDEMPOTENT,
            ) from exc


def check_instance_sets_are_isolated(harness: ConformanceHarness) -> None:
    """Two instance sets filtering by their own id see only their own instances."""
    other_id = harness.instance_set_id[:-5] + "other"
    mine, theirs = harness.instance_set(), harness.instance_set(other_id)
    my_instance = harness.create(mine)
    their_instance = harness.create(theirs, tags=harness.owner_tags(other_id))
    my_listing = harness.wait_listed(mine, harness.owner_tags(), [my_instance.id],
                                     rules.CREATED_IS_LISTED)
    harness.wait_listed(theirs, harness.owner_tags(other_id), [their_instance.id],
                        rules.CREATED_IS_LISTED)
    if their_instance.id in {i.id for i in my_listing}:
        raise fail(
            f"instance set {harness.instance_set_id} listed {their_instance.id}, which set "
            f"{other_id} created, when filtering by its own InstanceSetID tag",
            rules.INSTANCE_SETS_ISOLATED,
        )
    my_instance.destroy()
    harness.wait_gone(mine, harness.owner_tags(), my_instance.id, rules.DESTROY_REMOVES)
    listing = harness.wait_listed(theirs, harness.owner_tags(other_id), [their_instance.id],
                                  rules.INSTANCE_SETS_ISOLATED)
    if _by_id(listing, their_instance.id).tags != harness.owner_tags(other_id):
        raise fail(
            f"the tags of {their_instance.id} changed when another instance set worked",
            rules.INSTANCE_SETS_ISOLATED,
        )


def check_quota_groups_split(harness: ConformanceHarness) -> None:
    """The preemptible and on-demand variants of a type count against different quotas."""
    from dataclasses import replace

    iset = harness.instance_set()
    it = harness.target.instance_types[0]
    on_demand = replace(it, preemptible=False)
    spot = replace(it, preemptible=True)
    if iset.quota_group(on_demand) == iset.quota_group(spot):
        raise fail(
            f"quota_group gives {iset.quota_group(spot)!r} for both variants of {it.name}",
            rules.QUOTA_GROUPS_SPLIT,
        )


# --------------------------------------------------------------------------- threads


def check_thread_safety(harness: ConformanceHarness) -> None:
    """Create, list, set_tags and destroy from several threads at once, all succeed."""
    iset = harness.instance_set()
    workers = harness.target.max_instances
    start = threading.Barrier(workers + 1)
    stop_listing = threading.Event()
    role = harness.tag("Thread")

    def lifecycle(n: int) -> str:
        start.wait()
        instance = harness.create(iset, tags={role: str(n)})
        harness.wait_listed(iset, harness.owner_tags(), [instance.id], rules.CREATED_IS_LISTED)
        instance.set_tags({**harness.owner_tags(), role: f"{n}-retagged"})
        instance.destroy()
        return instance.id

    def keep_listing() -> int:
        start.wait()
        calls = 0
        while not stop_listing.is_set():
            iset.instances(harness.owner_tags())
            calls += 1
        return calls

    errors: list[str] = []
    ids: list[str] = []
    with ThreadPoolExecutor(max_workers=workers + 1) as pool:
        lister = pool.submit(keep_listing)
        futures = [pool.submit(lifecycle, n) for n in range(workers)]
        for future in futures:
            try:
                ids.append(future.result())
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
        stop_listing.set()
        try:
            lister.result()
        except Exception as exc:
            errors.append(f"instances() raised {type(exc).__name__}: {exc}")
    if errors:
        raise fail(
            f"{len(errors)} of {workers} concurrent create/list/set_tags/destroy sequences "
            f"failed: {'; '.join(errors)}",
            rules.THREAD_SAFE,
        )
    if len(set(ids)) != len(ids):
        raise fail(f"concurrent creates returned duplicate ids: {sorted(ids)}", rules.THREAD_SAFE)
    for instance_id in ids:
        harness.wait_gone(iset, harness.owner_tags(), instance_id, rules.DESTROY_REMOVES)


# --------------------------------------------------------------------------- typed errors


def _provoke(
    harness: ConformanceHarness,
    capability: str,
    hook: Callable[[ConformanceHarness], object] | None,
    expected: type[CloudError],
    rule: str,
) -> CloudError:
    """Run the target's hook and return the typed error it provoked; fail if it was not."""
    _require(harness, capability)
    if hook is None:
        raise Skipped(f"the target declares {capability!r} but gives no hook to provoke one")
    try:
        hook(harness)
    except expected as exc:
        return exc
    except Exception as exc:
        cause = exc.__cause__ or exc.__context__
        wrapped = (
            f" (wrapping a {type(cause).__name__}: raise the {expected.__name__} itself)"
            if isinstance(cause, expected)
            else ""
        )
        raise fail(
            f"the driver raised {type(exc).__module__}.{type(exc).__name__}({exc}) instead of "
            f"herder.cloud.{expected.__name__}{wrapped}",
            rule,
        ) from exc
    raise fail(f"the hook meant to provoke a {expected.__name__} raised nothing", rule)


def check_quota_error(harness: ConformanceHarness) -> None:
    _provoke(harness, "quota_errors", harness.target.provoke_quota_error, QuotaError,
             rules.QUOTA_ERROR_TYPED)


def check_capacity_error(harness: ConformanceHarness) -> None:
    exc = _provoke(harness, "capacity_errors", harness.target.provoke_capacity_error,
                   CapacityError, rules.CAPACITY_ERROR_TYPED)
    assert isinstance(exc, CapacityError)
    if exc.instance_type_specific and exc.quota_group_specific:
        raise fail("a CapacityError claims to be both type- and quota-group-specific",
                   rules.CAPACITY_ERROR_TYPED)


def check_rate_limit_error(harness: ConformanceHarness) -> None:
    exc = _provoke(harness, "rate_limit_errors", harness.target.provoke_rate_limit_error,
                   RateLimitError, rules.RATE_LIMIT_ERROR_TYPED)
    assert isinstance(exc, RateLimitError)
    retry = getattr(exc, "earliest_retry", None)
    if not isinstance(retry, int | float) or retry <= 0:
        raise fail(f"RateLimitError.earliest_retry is {retry!r}, not epoch seconds",
                   rules.RATE_LIMIT_ERROR_TYPED)


# --------------------------------------------------------------------------- reaching instances

_ADDRESS_RE = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._-]+)(:[0-9]{1,5})?$")


def check_address_format(harness: ConformanceHarness) -> None:
    """Addresses are something the SSH executor can split."""
    iset = harness.instance_set()
    instance = harness.create(iset)
    listing = harness.wait_listed(iset, harness.owner_tags(), [instance.id],
                                  rules.CREATED_IS_LISTED)
    for candidate in (instance, _by_id(listing, instance.id)):
        address = candidate.address
        if address and not _ADDRESS_RE.match(address):
            raise fail(f"instance {candidate.id} has address {address!r}", rules.ADDRESS_FORMAT)
        if not candidate.remote_user:
            raise fail(f"instance {candidate.id} has an empty remote_user", rules.ADDRESS_USABLE)


def _executor_for(
    harness: ConformanceHarness, instance: Instance, runtime: ThreadRuntime
) -> Executor:
    """The executor herder would use: the driver's own, else SSH with the target's key."""
    target = harness.target
    factory = target.driver.executor_factory(harness.instance_set())
    if factory is not None:
        return factory(instance)
    from herder.ssh.executor import SSHExecutor

    assert target.private_key_path is not None
    config = Config.model_validate(
        {
            "containers": {"dispatch_private_key": target.private_key_path},
            "cloud": {"ssh_port": target.ssh_port, "timeout_command": 30},
        }
    )
    return SSHExecutor(instance, config, runtime, connect_timeout=10.0)


def check_booted_instance_runs_commands(harness: ConformanceHarness) -> None:
    """Through the executor herder would use, with the instance secret check herder uses."""
    target = harness.target
    iset = harness.instance_set()
    own_executor = target.driver.executor_factory(iset) is not None
    if not own_executor and not target.private_key_path:
        raise Skipped("the target gives no private_key_path, so the suite cannot log in")
    secret = secrets.token_hex(20)
    instance = harness.create(
        iset,
        tags={harness.tag("InstanceSecret"): secret},
        init_command=init_command(secret),
    )
    runtime = ThreadRuntime()
    executor = _executor_for(harness, TagVerifier(instance, secret, timeout=30.0), runtime)
    try:
        _run_until_booted(harness, instance, secret, executor)
    finally:
        executor.close()
        runtime.shutdown()


def _run_until_booted(
    harness: ConformanceHarness, instance: Instance, secret: str, executor: Executor
) -> None:
    """Retry ``true`` until it works or the boot timeout passes, following new addresses.

    Then ``exit 3`` must report status 3: the exit status is how herder's boot probe and runner
    commands tell success from failure.
    """
    iset, target = harness.instance_set(), harness.target
    deadline = time.monotonic() + target.boot_timeout
    last = "no attempt made"
    while True:
        try:
            result = executor.execute("true", None, None, 30.0)
        except ExecutorError as exc:
            last = f"{type(exc).__name__}: {exc}"
        else:
            if result.ok:
                break
            last = f"exit {result.exit_status}: {result.stderr[:200]!r}"
        if time.monotonic() >= deadline:
            raise fail(
                f"could not run a command on {instance.id} (address {instance.address!r}, "
                f"user {instance.remote_user!r}) within {target.boot_timeout:g}s; last "
                f"attempt: {last}",
                rules.ADDRESS_USABLE,
            )
        time.sleep(min(1.0, max(target.poll_interval, 0.05)))
        fresh = [i for i in iset.instances(harness.owner_tags()) if i.id == instance.id]
        if fresh:
            executor.set_target(TagVerifier(fresh[0], secret, timeout=30.0))
    status = executor.execute("exit 3", None, None, 30.0).exit_status
    if status != 3:
        raise fail(f"`exit 3` on {instance.id} reported exit status {status}",
                   rules.ADDRESS_USABLE)


class _RefusingRemote(RemoteRunner):
    """A connection on which every command fails: a host that knows no secret."""

    def run(
        self, command: str, stdin: bytes = b"", timeout: float = 60.0
    ) -> tuple[int, bytes, bytes]:
        return 1, b"", b"permission denied"


def check_host_key_verification(harness: ConformanceHarness) -> None:
    """A made-up key is never accepted; a driver declaring the capability really checks."""
    iset = harness.instance_set()
    instance = harness.create(iset)
    bogus = HostKey("ssh-ed25519", secrets.token_bytes(51))
    declared = "host_key_verification" in harness.target.declared
    try:
        instance.verify_host_key(bogus, _RefusingRemote())
    except NotImplementedByDriver as exc:
        if declared:
            raise fail(
                f"verify_host_key raised NotImplementedByDriver({exc})", rules.HOST_KEY_DECLARED
            ) from exc
        return
    except HostKeyMismatch:
        return
    except Exception as exc:
        if isinstance(exc, AssertionError):
            raise
        if not declared:
            raise fail(
                f"verify_host_key raised {type(exc).__name__}({exc}); raise "
                "NotImplementedByDriver when the driver cannot check keys",
                rules.HOST_KEY_CHECKED,
            ) from exc
        return  # any error refuses the key; HostKeyMismatch says why most clearly
    raise fail(f"verify_host_key accepted a random key for {instance.id}",
               rules.HOST_KEY_CHECKED)


# --------------------------------------------------------------------------- optional features


def check_price_history(harness: ConformanceHarness) -> None:
    _require(harness, "price_history")
    it = harness.target.instance_type(preemptible=True) or harness.target.instance_types[0]
    instance = harness.create(instance_type=it)
    prices: Any = instance.price_history(it)
    if not isinstance(prices, list) or not all(isinstance(p, InstancePrice) for p in prices):
        raise fail(f"price_history returned {prices!r}", rules.PRICE_HISTORY_ORDERED)
    times = [p.start_time for p in prices]
    if times != sorted(times, reverse=True):
        raise fail(f"price_history start times are not newest first: {times}",
                   rules.PRICE_HISTORY_ORDERED)


def _create_kind(harness: ConformanceHarness, it: InstanceType | None, rule: str) -> None:
    if it is None:
        raise Skipped("the target lists no instance type of this kind")
    iset = harness.instance_set()
    try:
        instance = harness.create(iset, instance_type=it)
    except Exception as exc:
        raise fail(f"create({it.name}) raised {type(exc).__name__}: {exc}", rule) from exc
    harness.wait_listed(iset, harness.owner_tags(), [instance.id], rules.CREATED_IS_LISTED)
    if instance.provider_type != it.provider_type:
        raise fail(f"create({it.name}) returned provider type {instance.provider_type!r}", rule)


def check_spot(harness: ConformanceHarness) -> None:
    _require(harness, "spot")
    _create_kind(harness, harness.target.instance_type(preemptible=True), rules.SPOT_CREATES)


def check_gpu(harness: ConformanceHarness) -> None:
    _require(harness, "gpu")
    _create_kind(harness, harness.target.instance_type(gpu=True), rules.GPU_CREATES)


#: Every check, by the name its pytest test carries (``test_<name>``).
CHECKS: dict[str, Callable[[ConformanceHarness], None]] = {
    "create_returns_instance": check_create_returns_instance,
    "created_instance_is_listed": check_created_instance_is_listed,
    "listing_keeps_matching_instances": check_listing_keeps_matching_instances,
    "ids_are_stable": check_ids_are_stable,
    "set_tags_replaces_tags": check_set_tags_replaces_tags,
    "destroy_removes_instance": check_destroy_removes_instance,
    "destroy_twice_is_harmless": check_destroy_twice_is_harmless,
    "instance_sets_are_isolated": check_instance_sets_are_isolated,
    "quota_groups_split": check_quota_groups_split,
    "thread_safety": check_thread_safety,
    "quota_error": check_quota_error,
    "capacity_error": check_capacity_error,
    "rate_limit_error": check_rate_limit_error,
    "address_format": check_address_format,
    "booted_instance_runs_commands": check_booted_instance_runs_commands,
    "host_key_verification": check_host_key_verification,
    "price_history": check_price_history,
    "spot": check_spot,
    "gpu": check_gpu,
}


def run_check(name: str, harness: ConformanceHarness) -> None:
    """Run one check by name (without pytest); raises ConformanceError or Skipped."""
    CHECKS[name](harness)

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

from herder.config import Config
from herder.engine.worker.verify import SECRET_PATH, TagVerifier, init_command
from herder.model import InstanceType
from herder.plugin.cloud import (
    CREATE_KEY_TAG,
    Capability,
    CapacityError,
    CloudError,
    HostKey,
    HostKeyMismatch,
    Instance,
    InstancePrice,
    NotImplementedByDriver,
    Quota,
    QuotaError,
    RateLimitError,
    RemoteRunner,
)
from herder.plugin.executor import Executor, ExecutorError
from herder.runtime import ThreadRuntime
from herder.testing.conformance import rules
from herder.testing.conformance.rules import fail
from herder.testing.conformance.target import ConformanceHarness


class Skipped(Exception):
    """The check does not apply to this driver; ``str(exc)`` says why."""


def _require(harness: ConformanceHarness, capability: Capability) -> None:
    if capability not in harness.target.declared:
        raise Skipped(f"the driver does not declare the {capability.value!r} capability")


def _cannot_check(harness: ConformanceHarness, why: str, rule: str) -> Skipped:
    """A skip, or in strict mode the failure of ``rule`` (a skipped check proves nothing)."""
    if harness.target.strict:
        raise fail(f"strict mode: {why}", rule)
    return Skipped(why)


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
        raise fail(
            f"create returned {type(instance).__name__}, not an Instance",
            rules.CREATE_RETURNS_INSTANCE,
        )
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
        raise fail(
            f"create returned tags {instance.tags!r}, expected {expected!r}", rules.TAGS_EXACT
        )


def check_created_instance_is_listed(harness: ConformanceHarness) -> None:
    """A new instance shows up, with the same id, type and tags."""
    iset = harness.instance_set()
    extra = {harness.tag("Role"): "listed"}
    instance = harness.create(iset, tags=extra)
    listing = harness.wait_listed(
        iset, harness.owner_tags(), [instance.id], rules.CREATED_IS_LISTED
    )
    listed = _by_id(listing, instance.id)
    if listed.provider_type != instance.provider_type:
        raise fail(
            f"create said provider type {instance.provider_type!r}, the listing says "
            f"{listed.provider_type!r}",
            rules.IDS_STABLE,
        )
    expected = {**harness.owner_tags(), **extra}
    if listed.tags != expected:
        raise fail(
            f"the listing gave tags {listed.tags!r}, expected {expected!r}", rules.TAGS_EXACT
        )
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
    harness.wait_listed(
        iset, harness.owner_tags(), [first.id, second.id, third.id], rules.LISTING_KEEPS_MATCHES
    )
    harness.wait_listed(
        iset, {**harness.owner_tags(), role: "a"}, [first.id, third.id], rules.LISTING_KEEPS_MATCHES
    )
    harness.wait_listed(iset, {}, [first.id, second.id, third.id], rules.LISTING_KEEPS_MATCHES)


def check_ids_are_stable(harness: ConformanceHarness) -> None:
    """Several listings give the same id for the same instance."""
    iset = harness.instance_set()
    instance = harness.create(iset)
    for _ in range(3):
        harness.wait_listed(iset, harness.owner_tags(), [instance.id], rules.IDS_STABLE)
    if str(instance) == "":
        raise fail("str(instance) is empty; herder logs instances by it", rules.IDS_STABLE)


def check_ids_never_reused(harness: ConformanceHarness) -> None:
    """A destroyed instance's id is never given to a later one: herder keys its records (and
    its decisions to destroy) by id, so a reused id would make it act on the wrong VM."""
    iset = harness.instance_set()
    first = harness.create(iset)
    harness.wait_listed(iset, harness.owner_tags(), [first.id], rules.CREATED_IS_LISTED)
    first.destroy()
    harness.wait_gone(iset, harness.owner_tags(), first.id, rules.DESTROY_REMOVES)
    later = [harness.create(iset), harness.create(iset)]
    ids = [first.id, *(i.id for i in later)]
    if len(set(ids)) != len(ids):
        raise fail(
            f"instances created one after another got ids {ids} (the first was destroyed "
            "before the others were created)",
            rules.IDS_NEVER_REUSED,
        )
    fresh = harness.restart_instance_set()
    again = harness.create(fresh)
    if again.id in ids:
        raise fail(
            f"an instance set restarted from the same parameters created {again.id}, an id "
            f"already given out ({ids}); derive ids from the cloud, not from an in-memory counter",
            rules.IDS_NEVER_REUSED,
        )


def check_tags_seen_by_another_instance_set(harness: ConformanceHarness) -> None:
    """Tags set through one instance set are listed by another one built from the same
    parameters: herder adopts its instances by their tags after a restart."""
    iset = harness.instance_set()
    key = harness.tag("IdleBehavior")
    instance = harness.create(iset, tags={key: "run"})
    harness.wait_listed(iset, harness.owner_tags(), [instance.id], rules.CREATED_IS_LISTED)
    replacement = {**harness.owner_tags(), key: "hold"}
    instance.set_tags(replacement)
    other = harness.restart_instance_set()

    def shows_new_tags(listing: list[Instance]) -> bool:
        return any(i.id == instance.id and i.tags == replacement for i in listing)

    ok, listing = harness.poll(other, harness.owner_tags(), shows_new_tags)
    if not ok:
        seen = [i.tags for i in listing if i.id == instance.id]
        raise fail(
            f"after set_tags({replacement!r}) and a restart (the instance set stopped, another "
            f"built from the same parameters), the listing shows {instance.id} with tags "
            f"{seen or 'none (not listed)'} {harness.target.listing_delay:g}s later",
            rules.TAGS_IN_CLOUD,
        )


def check_idempotent_create(harness: ConformanceHarness) -> None:
    """A create repeated with the same create key gives back the first instance."""
    _require(harness, Capability.IDEMPOTENT_CREATE)
    iset = harness.instance_set()
    key_tags = {harness.tag(CREATE_KEY_TAG): secrets.token_hex(20)}
    first = harness.create(iset, tags=key_tags)
    repeated = harness.create(iset, tags=key_tags)
    if repeated.id != first.id:
        raise fail(
            f"two creates with the same create key made {first.id} and {repeated.id}",
            rules.IDEMPOTENT_CREATE,
        )
    listing = harness.wait_listed(iset, harness.owner_tags(), [first.id], rules.CREATED_IS_LISTED)
    same_key = [
        i.id
        for i in listing
        if i.tags.get(harness.tag(CREATE_KEY_TAG)) == key_tags[harness.tag(CREATE_KEY_TAG)]
    ]
    if len(same_key) != 1:
        raise fail(
            f"the listing shows {len(same_key)} instances with one create key: {same_key}",
            rules.IDEMPOTENT_CREATE,
        )
    other = harness.create(iset, tags={harness.tag(CREATE_KEY_TAG): secrets.token_hex(20)})
    if other.id == first.id:
        raise fail(
            f"a create with a new create key returned the existing {first.id}",
            rules.IDEMPOTENT_CREATE,
        )


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
    harness.wait_listed(iset, harness.owner_tags(), [doomed.id, keeper.id], rules.CREATED_IS_LISTED)
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
    my_listing = harness.wait_listed(
        mine, harness.owner_tags(), [my_instance.id], rules.CREATED_IS_LISTED
    )
    harness.wait_listed(
        theirs, harness.owner_tags(other_id), [their_instance.id], rules.CREATED_IS_LISTED
    )
    if their_instance.id in {i.id for i in my_listing}:
        raise fail(
            f"instance set {harness.instance_set_id} listed {their_instance.id}, which set "
            f"{other_id} created, when filtering by its own InstanceSetID tag",
            rules.INSTANCE_SETS_ISOLATED,
        )
    my_instance.destroy()
    harness.wait_gone(mine, harness.owner_tags(), my_instance.id, rules.DESTROY_REMOVES)
    listing = harness.wait_listed(
        theirs, harness.owner_tags(other_id), [their_instance.id], rules.INSTANCE_SETS_ISOLATED
    )
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
        raise fail(
            f"concurrent creates returned duplicate ids: {sorted(ids)}", rules.IDS_NEVER_REUSED
        )
    for instance_id in ids:
        harness.wait_gone(iset, harness.owner_tags(), instance_id, rules.DESTROY_REMOVES)


# --------------------------------------------------------------------------- typed errors


def _provoke(
    harness: ConformanceHarness,
    capability: Capability,
    hook: Callable[[ConformanceHarness], object] | None,
    expected: type[CloudError],
    rule: str,
) -> CloudError:
    """Run the target's hook and return the typed error it provoked; fail if it was not."""
    _require(harness, capability)
    if hook is None:
        raise _cannot_check(
            harness,
            f"the target declares {capability.value!r} but gives no hook to provoke one",
            rule,
        )
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
            f"herder.plugin.cloud.{expected.__name__}{wrapped}",
            rule,
        ) from exc
    raise fail(f"the hook meant to provoke a {expected.__name__} raised nothing", rule)


def check_quota_error(harness: ConformanceHarness) -> None:
    _provoke(
        harness,
        Capability.QUOTA_ERRORS,
        harness.target.provoke_quota_error,
        QuotaError,
        rules.QUOTA_ERROR_TYPED,
    )


def check_capacity_error(harness: ConformanceHarness) -> None:
    exc = _provoke(
        harness,
        Capability.CAPACITY_ERRORS,
        harness.target.provoke_capacity_error,
        CapacityError,
        rules.CAPACITY_ERROR_TYPED,
    )
    assert isinstance(exc, CapacityError)
    if exc.instance_type_specific and exc.quota_group_specific:
        raise fail(
            "a CapacityError claims to be both type- and quota-group-specific",
            rules.CAPACITY_ERROR_TYPED,
        )


def check_rate_limit_error(harness: ConformanceHarness) -> None:
    exc = _provoke(
        harness,
        Capability.RATE_LIMIT_ERRORS,
        harness.target.provoke_rate_limit_error,
        RateLimitError,
        rules.RATE_LIMIT_ERROR_TYPED,
    )
    assert isinstance(exc, RateLimitError)
    retry = getattr(exc, "earliest_retry", None)
    if not isinstance(retry, int | float) or retry <= 0:
        raise fail(
            f"RateLimitError.earliest_retry is {retry!r}, not epoch seconds",
            rules.RATE_LIMIT_ERROR_TYPED,
        )


# --------------------------------------------------------------------------- reaching instances

_ADDRESS_RE = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._-]+)(:[0-9]{1,5})?$")


def check_address_format(harness: ConformanceHarness) -> None:
    """Addresses are something the SSH executor can split."""
    iset = harness.instance_set()
    instance = harness.create(iset)
    listing = harness.wait_listed(
        iset, harness.owner_tags(), [instance.id], rules.CREATED_IS_LISTED
    )
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
        raise fail(f"`exit 3` on {instance.id} reported exit status {status}", rules.ADDRESS_USABLE)


def check_init_command_and_public_key(harness: ConformanceHarness) -> None:
    """create passes the init command and the public key on to the instance.

    A driver that drops them passes every other check against a fake, and then no instance it
    creates in production can be verified or logged in to.  Checked through the target's
    ``boot_record`` hook (a fake cloud), else on a booted instance over SSH; otherwise skipped,
    or failed in strict mode.
    """
    target = harness.target
    iset = harness.instance_set()
    secret = secrets.token_hex(20)
    command = init_command(secret)
    if target.boot_record is not None:
        public_key = harness.public_key or _throwaway_public_key()
        instance = harness.create(
            iset,
            tags={harness.tag("InstanceSecret"): secret},
            init_command=command,
            public_key=public_key,
        )
        record = target.boot_record(harness, instance)
        if command.strip() not in record.init_command:
            raise fail(
                f"the cloud was told to run {record.init_command[:300]!r} at boot of "
                f"{instance.id}, which does not contain the init command {command!r}",
                rules.INIT_COMMAND_RUN,
            )
        wanted = _key_body(public_key)
        if wanted not in {_key_body(k) for k in record.public_keys}:
            raise fail(
                f"{instance.id} authorizes {list(record.public_keys)!r}, not the public key "
                f"passed to create ({public_key[:60]}...)",
                rules.PUBLIC_KEY_INSTALLED,
            )
        return
    if target.driver.executor_factory(iset) is not None or not target.private_key_path:
        raise _cannot_check(
            harness,
            "the target gives neither a boot_record hook nor a private_key_path (with herder's "
            "SSH executor), so the suite cannot see whether create uses init_command and "
            "public_key",
            rules.INIT_COMMAND_RUN,
        )
    instance = harness.create(
        iset, tags={harness.tag("InstanceSecret"): secret}, init_command=command
    )
    runtime = ThreadRuntime()
    executor = _executor_for(harness, TagVerifier(instance, secret, timeout=30.0), runtime)
    try:
        _run_until_booted(harness, instance, secret, executor)  # the key let us in
        sudo = "" if instance.remote_user == "root" else "sudo "
        result = executor.execute(f"{sudo}cat {SECRET_PATH}", None, None, 30.0)
        if not result.ok or result.stdout.decode(errors="replace").strip() != secret:
            raise fail(
                f"{SECRET_PATH} on {instance.id} does not hold the secret the init command "
                f"wrote (exit {result.exit_status}, stdout {result.stdout[:100]!r})",
                rules.INIT_COMMAND_RUN,
            )
    finally:
        executor.close()
        runtime.shutdown()


def _key_body(key: str) -> str:
    """The type and base64 body of an OpenSSH public key, without its comment."""
    return " ".join(key.split()[:2])


def _throwaway_public_key() -> str:
    """A valid OpenSSH public key nobody holds the private half of (for boot_record checks)."""
    from herder.ssh.server import generate_key

    return generate_key()[1]


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
    declared = Capability.HOST_KEY_VERIFICATION in harness.target.declared
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
    raise fail(f"verify_host_key accepted a random key for {instance.id}", rules.HOST_KEY_CHECKED)


# --------------------------------------------------------------------------- optional features


def check_price_history(harness: ConformanceHarness) -> None:
    _require(harness, Capability.PRICE_HISTORY)
    it = harness.target.instance_type(preemptible=True) or harness.target.instance_types[0]
    instance = harness.create(instance_type=it)
    prices: Any = instance.price_history(it)
    if not isinstance(prices, list) or not all(isinstance(p, InstancePrice) for p in prices):
        raise fail(f"price_history returned {prices!r}", rules.PRICE_HISTORY_ORDERED)
    times = [p.start_time for p in prices]
    if times != sorted(times, reverse=True):
        raise fail(
            f"price_history start times are not newest first: {times}", rules.PRICE_HISTORY_ORDERED
        )


def check_quotas(harness: ConformanceHarness) -> None:
    _require(harness, Capability.QUOTA_HEADROOM)
    iset = harness.instance_set()
    quotas: Any = iset.quotas()
    if not isinstance(quotas, list) or not all(isinstance(q, Quota) for q in quotas):
        raise fail(f"quotas returned {quotas!r}", rules.QUOTAS_REPORTED)
    for q in quotas:
        if q.limit < 0 or q.usage < 0 or not q.name:
            raise fail(
                f"quota {q!r}: a name, a limit and usage not negative", rules.QUOTAS_REPORTED
            )
    groups = {iset.quota_group(it) for it in harness.target.instance_types}
    if not groups & {q.group for q in quotas}:
        raise fail(
            f"no quota of the groups of the target's types ({sorted(groups)}) in {quotas!r}",
            rules.QUOTAS_REPORTED,
        )


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
    _require(harness, Capability.SPOT)
    _create_kind(harness, harness.target.instance_type(preemptible=True), rules.SPOT_CREATES)


def check_gpu(harness: ConformanceHarness) -> None:
    _require(harness, Capability.GPU)
    _create_kind(harness, harness.target.instance_type(gpu=True), rules.GPU_CREATES)


def check_default_types_within_capabilities(harness: ConformanceHarness) -> None:
    """The types a driver offers by itself need the capabilities it declares: herder checks
    configured types against them (``herder config check``), and must be able to trust the
    driver's own offer as much."""
    target = harness.target
    params = target.validated_params()
    try:
        offered: Any = target.driver.default_instance_types(params)
    except Exception as exc:
        raise fail(
            f"default_instance_types raised {type(exc).__name__}: {exc}",
            rules.DEFAULT_TYPES_DECLARED,
        ) from exc
    if not isinstance(offered, dict) or not all(
        isinstance(it, InstanceType) for it in offered.values()
    ):
        raise fail(
            f"default_instance_types returned {offered!r}, not a dict of InstanceType",
            rules.DEFAULT_TYPES_DECLARED,
        )
    declared = target.declared
    for name, it in offered.items():
        if it.preemptible and Capability.SPOT not in declared:
            raise fail(
                f"default_instance_types offers preemptible {name!r} without declaring spot",
                rules.DEFAULT_TYPES_DECLARED,
            )
        if it.gpu.device_count > 0 and Capability.GPU not in declared:
            raise fail(
                f"default_instance_types offers {name!r} with GPUs without declaring gpu",
                rules.DEFAULT_TYPES_DECLARED,
            )


#: Every check, by the name its pytest test carries (``test_<name>``).
CHECKS: dict[str, Callable[[ConformanceHarness], None]] = {
    "create_returns_instance": check_create_returns_instance,
    "created_instance_is_listed": check_created_instance_is_listed,
    "listing_keeps_matching_instances": check_listing_keeps_matching_instances,
    "ids_are_stable": check_ids_are_stable,
    "ids_never_reused": check_ids_never_reused,
    "tags_seen_by_another_instance_set": check_tags_seen_by_another_instance_set,
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
    "init_command_and_public_key": check_init_command_and_public_key,
    "host_key_verification": check_host_key_verification,
    "price_history": check_price_history,
    "quotas": check_quotas,
    "spot": check_spot,
    "gpu": check_gpu,
    "idempotent_create": check_idempotent_create,
    "default_types_within_capabilities": check_default_types_within_capabilities,
}


def run_check(name: str, harness: ConformanceHarness) -> None:
    """Run one check by name (without pytest); raises ConformanceError or Skipped."""
    CHECKS[name](harness)

"""The conformance suite against the ``sim`` driver, and against deliberately broken drivers.

The sim driver must pass every check (none skipped: it declares every capability).  Each broken
variant wraps the sim driver and breaks exactly one rule; the suite must fail it with a message
that names that rule, both through the check functions and through a real pytest run.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from herder.model import GPUSpec, InstanceType
from herder.plugin.cloud import (
    Capability,
    Driver,
    DriverContext,
    DriverParameters,
    HostKey,
    Instance,
    InstancePrice,
    InstanceSet,
    QuotaError,
    RemoteRunner,
)
from herder.plugin.executor import ExecutorFactory
from herder.testing.conformance import *  # noqa: F403  (collects TestDriverConformance)
from herder.testing.conformance import (
    CHECKS,
    BootRecord,
    ConformanceError,
    ConformanceHarness,
    ConformanceTarget,
    Skipped,
    rules,
    run_check,
)
from herder.testing.sim import SimDriver, SimInstance, SimParameters

SMALL = InstanceType(name="small", provider_type="s.small", vcpus=1, ram=1 << 30, price=0.1)
SPOT = InstanceType(
    name="small-spot",
    provider_type="s.small",
    vcpus=1,
    ram=1 << 30,
    price=0.03,
    preemptible=True,
)
GPU = InstanceType(
    name="gpu",
    provider_type="g.large",
    vcpus=8,
    ram=32 << 30,
    price=2.0,
    gpu=GPUSpec(stack="cuda", device_count=1, vram=16 << 30),
)
SIM_PARAMS: dict[str, Any] = {
    "boot_delay": 0.0,
    "host_key_verification": True,
    "price_history": True,
    "quota_vcpus": {"s": 1000, "s-p": 1000, "g": 1000},
}


def _provoke_quota(h: ConformanceHarness) -> None:
    h.create(h.instance_set(params={"quota_max_instances": 0}))


def _provoke_capacity(h: ConformanceHarness) -> None:
    h.create(h.instance_set(params={"capacity_max_instances": {SMALL.provider_type: 0}}))


def _provoke_rate_limit(h: ConformanceHarness) -> None:
    limited = h.instance_set(params={"min_time_between_create_calls": 3600.0})
    h.create(limited)
    h.create(limited)


def sim_target(driver: Driver | None = None, **overrides: Any) -> ConformanceTarget:
    fields: dict[str, Any] = {
        "driver": driver or SimDriver(),
        "params": SIM_PARAMS,
        "instance_types": [SMALL, SPOT, GPU],
        "boot_timeout": 5.0,
        "provoke_quota_error": _provoke_quota,
        "provoke_capacity_error": _provoke_capacity,
        "provoke_rate_limit_error": _provoke_rate_limit,
        "boot_record": _sim_boot_record,
        "strict": True,
    }
    fields.update(overrides)
    return ConformanceTarget(**fields)


def _sim_boot_record(h: ConformanceHarness, instance: Instance) -> BootRecord:
    """What the simulated cloud was given at create (it runs no real first boot)."""
    listed = [i for i in h.instance_set().instances({}) if i.id == instance.id]
    sim = listed[0] if listed else instance
    sim = getattr(sim, "inner", sim)  # the broken drivers' wrapper
    assert isinstance(sim, SimInstance)
    return BootRecord(init_command=sim.init_command, public_keys=[sim.public_key or ""])


@pytest.fixture
def conformance_target() -> ConformanceTarget:
    return sim_target()


# --------------------------------------------------------------------------- broken drivers


class _Wrapped(Instance):
    """A sim instance behind a wrapper that may break one rule."""

    def __init__(self, inner: Instance, owner: _BrokenSet) -> None:
        self.inner = inner
        self.owner = owner

    @property
    def id(self) -> str:
        if self.owner.breaks == "counter_ids":
            return self.owner.number(self.inner.id)
        return self.inner.id

    @property
    def provider_type(self) -> str:
        return self.inner.provider_type

    @property
    def address(self) -> str:
        return self.inner.address

    @property
    def remote_user(self) -> str:
        return self.inner.remote_user

    @property
    def tags(self) -> dict[str, str]:
        if self.owner.breaks == "tags_in_memory" and self.inner.id in self.owner.tags:
            return dict(self.owner.tags[self.inner.id])
        return self.inner.tags

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.owner.breaks == "tags_in_memory":
            with self.owner.lock:
                self.owner.tags[self.inner.id] = dict(tags)  # never reaches the cloud
            return
        self.inner.set_tags(tags)

    def destroy(self) -> None:
        if self.owner.breaks == "destroy_twice":
            with self.owner.lock:
                if self.id in self.owner.destroyed:
                    raise RuntimeError(f"instance {self.id} not found")
                self.owner.destroyed.add(self.id)
        self.inner.destroy()

    def verify_host_key(self, key: HostKey, remote: RemoteRunner) -> None:
        self.inner.verify_host_key(key, remote)

    def price_history(self, instance_type: InstanceType) -> list[InstancePrice]:
        return self.inner.price_history(instance_type)


class _BrokenSet(InstanceSet):
    def __init__(self, inner: InstanceSet, breaks: str) -> None:
        import threading

        self.inner = inner
        self.breaks = breaks
        self.lock = threading.Lock()
        self.destroyed: set[str] = set()
        self.tags: dict[str, dict[str, str]] = {}
        self.numbers: dict[str, str] = {}

    def number(self, inner_id: str) -> str:
        """A provider that numbers its nodes 1, 2, 3 in each process."""
        with self.lock:
            return self.numbers.setdefault(inner_id, str(len(self.numbers) + 1))

    def create(
        self,
        instance_type: InstanceType,
        image_id: str,
        tags: Mapping[str, str],
        init_command: str,
        public_key: str | None,
    ) -> Instance:
        if self.breaks == "ignores_init_command":
            init_command = ""
        if self.breaks == "ignores_public_key":
            public_key = None
        try:
            made = self.inner.create(instance_type, image_id, tags, init_command, public_key)
        except QuotaError as exc:
            if self.breaks == "plain_quota":
                raise Exception(f"QuotaExceeded: {exc}") from None
            raise
        return _Wrapped(made, self)

    def instances(self, tags: Mapping[str, str]) -> list[Instance]:
        listing = [_Wrapped(i, self) for i in self.inner.instances(tags)]
        if self.breaks == "drop_matching" and len(listing) > 1:
            listing = listing[:-1]  # e.g. a forgotten second page of results
        return listing

    def quota_group(self, instance_type: InstanceType) -> str:
        return self.inner.quota_group(instance_type)

    def stop(self) -> None:
        self.inner.stop()


class BrokenSimDriver(Driver):
    """The sim driver with one rule broken (``breaks``)."""

    parameters_model = SimParameters
    capabilities = SimDriver.capabilities

    def __init__(self, breaks: str) -> None:
        self.breaks = breaks
        self.sim = SimDriver()

    def instance_set(self, params: DriverParameters, context: DriverContext) -> InstanceSet:
        if self.breaks == "not_idempotent":
            # The sim then looks for a create key under a tag herder never sets.
            context = replace(context, tag_key_prefix="Elsewhere")
        return _BrokenSet(self.sim.instance_set(params, context), self.breaks)

    def executor_factory(self, instance_set: InstanceSet) -> ExecutorFactory | None:
        return self.sim.executor_factory(instance_set)

    def capabilities_for(self, params: DriverParameters) -> frozenset[Capability]:
        caps = self.sim.capabilities_for(params)
        if self.breaks == "undeclared_default_gpu":
            return caps - {Capability.GPU}
        return caps

    def default_instance_types(self, params: DriverParameters) -> dict[str, InstanceType]:
        if self.breaks in ("undeclared_default_gpu", "nothing"):
            return {GPU.name: GPU, SPOT.name: SPOT}  # fine while gpu and spot are declared
        return self.sim.default_instance_types(params)


BROKEN_CASES = [
    ("drop_matching", "listing_keeps_matching_instances", rules.LISTING_KEEPS_MATCHES),
    ("destroy_twice", "destroy_twice_is_harmless", rules.DESTROY_IDEMPOTENT),
    ("plain_quota", "quota_error", rules.QUOTA_ERROR_TYPED),
    ("counter_ids", "ids_never_reused", rules.IDS_NEVER_REUSED),
    ("tags_in_memory", "tags_seen_by_another_instance_set", rules.TAGS_IN_CLOUD),
    ("ignores_init_command", "init_command_and_public_key", rules.INIT_COMMAND_RUN),
    ("ignores_public_key", "init_command_and_public_key", rules.PUBLIC_KEY_INSTALLED),
    ("not_idempotent", "idempotent_create", rules.IDEMPOTENT_CREATE),
    ("undeclared_default_gpu", "default_types_within_capabilities", rules.DEFAULT_TYPES_DECLARED),
]


@pytest.mark.parametrize(("breaks", "check", "rule"), BROKEN_CASES)
def test_broken_driver_fails_the_check_naming_the_rule(breaks: str, check: str, rule: str) -> None:
    harness = ConformanceHarness(sim_target(BrokenSimDriver(breaks)))
    try:
        with pytest.raises(ConformanceError) as caught:
            run_check(check, harness)
    finally:
        harness.close()
    assert caught.value.rule == rule
    assert f"(rule: {rule})" in str(caught.value)


def test_the_unbroken_wrapper_passes_those_checks() -> None:
    """The wrapper itself is sound: only the deliberate breakage fails the checks."""
    for _, check, _ in BROKEN_CASES:
        harness = ConformanceHarness(sim_target(BrokenSimDriver("nothing")))
        try:
            run_check(check, harness)
        finally:
            harness.close()


def test_plain_exception_message_says_what_was_raised() -> None:
    harness = ConformanceHarness(sim_target(BrokenSimDriver("plain_quota")))
    try:
        with pytest.raises(ConformanceError, match=r"raised builtins\.Exception\(QuotaExceeded"):
            run_check("quota_error", harness)
    finally:
        harness.close()


def test_undeclared_capabilities_are_skipped_not_failed() -> None:
    target = sim_target(capabilities=frozenset())
    for check in (
        "quota_error",
        "capacity_error",
        "rate_limit_error",
        "price_history",
        "spot",
        "gpu",
    ):
        harness = ConformanceHarness(target)
        try:
            with pytest.raises(Skipped, match="does not declare"):
                run_check(check, harness)
        finally:
            harness.close()


def test_a_declared_capability_without_its_hook_is_skipped_with_the_reason() -> None:
    harness = ConformanceHarness(sim_target(provoke_quota_error=None, strict=False))
    try:
        with pytest.raises(Skipped, match="gives no hook"):
            run_check("quota_error", harness)
    finally:
        harness.close()


def test_strict_mode_fails_what_it_would_skip() -> None:
    for target, check in (
        (sim_target(provoke_quota_error=None), "quota_error"),
        (sim_target(boot_record=None), "init_command_and_public_key"),
    ):
        harness = ConformanceHarness(target)
        try:
            with pytest.raises(ConformanceError, match="strict mode"):
                run_check(check, harness)
        finally:
            harness.close()
        lenient = ConformanceHarness(replace(target, strict=False))
        try:
            with pytest.raises(Skipped):
                run_check(check, lenient)
        finally:
            lenient.close()


def test_a_misspelt_capability_fails_loudly() -> None:
    with pytest.raises(ValueError, match="unknown driver capabilities"):
        sim_target(capabilities=frozenset({"quota_error"}))

    class Misspelt(SimDriver):
        capabilities = frozenset({"spot_instances"})

    with pytest.raises(ValueError, match=r"'spot_instances'"):
        _ = sim_target(Misspelt()).declared


def test_capabilities_follow_the_parameters() -> None:
    """The sim verifies host keys and knows prices only when its parameters say so."""
    off = SimDriver().capabilities_for(
        SimParameters(host_key_verification=False, price_history=False)
    )
    on = SimDriver().capabilities_for(SimParameters(host_key_verification=True, price_history=True))
    assert Capability.HOST_KEY_VERIFICATION in on and Capability.PRICE_HISTORY in on
    assert Capability.HOST_KEY_VERIFICATION not in off
    assert Capability.PRICE_HISTORY not in off


def test_host_key_capability_declared_but_not_implemented_fails() -> None:
    params = {**SIM_PARAMS, "host_key_verification": False}
    harness = ConformanceHarness(sim_target(params=params, capabilities=SimDriver.capabilities))
    try:
        with pytest.raises(ConformanceError) as caught:
            run_check("host_key_verification", harness)
    finally:
        harness.close()
    assert caught.value.rule == rules.HOST_KEY_DECLARED


def test_not_implemented_host_keys_pass_when_not_declared() -> None:
    params = {**SIM_PARAMS, "host_key_verification": False}
    caps = SimDriver.capabilities - {"host_key_verification"}
    harness = ConformanceHarness(sim_target(params=params, capabilities=caps))
    try:
        run_check("host_key_verification", harness)
        run_check("booted_instance_runs_commands", harness)  # through the instance secret
    finally:
        harness.close()


def test_a_slow_listing_is_waited_for_up_to_the_listing_delay() -> None:
    """The sim lists a destroyed instance for destroy_delay; the suite allows listing_delay."""
    params = {**SIM_PARAMS, "destroy_delay": 0.3}
    for delay, passes in ((2.0, True), (0.0, False)):
        harness = ConformanceHarness(sim_target(params=params, listing_delay=delay))
        try:
            if passes:
                run_check("destroy_removes_instance", harness)
            else:
                with pytest.raises(ConformanceError) as caught:
                    run_check("destroy_removes_instance", harness)
                assert caught.value.rule == rules.DESTROY_REMOVES
        finally:
            harness.close()


def test_the_harness_destroys_what_a_failed_check_left_behind() -> None:
    driver = SimDriver()
    harness = ConformanceHarness(sim_target(driver))
    harness.create()
    harness.create()
    harness.close()
    assert driver.cloud is not None
    observer = driver.instance_set(SimParameters(), DriverContext(instance_set_id="observer"))
    assert observer.instances(harness.owner_tags()) == []


def test_every_check_has_a_test_in_the_suite() -> None:
    from herder.testing.conformance import DriverConformance

    names = {n.removeprefix("test_") for n in dir(DriverConformance) if n.startswith("test_")}
    assert names == set(CHECKS)


def test_a_pytest_run_reports_the_broken_rule(tmp_path: Path) -> None:
    """The way a driver author meets the suite: `pytest` on their package's test module."""
    module = tmp_path / "test_broken_driver.py"
    module.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(Path(__file__).parent)!r})
            import pytest
            from herder.testing.conformance import *  # noqa: F403
            from test_conformance_sim import BrokenSimDriver, sim_target

            @pytest.fixture
            def conformance_target():
                return sim_target(BrokenSimDriver("drop_matching"))
            """
        )
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            "-k",
            "listing_keeps or quota_error",
            str(module),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 failed, 1 passed" in result.stdout, result.stdout
    assert f"(rule: {rules.LISTING_KEEPS_MATCHES})" in result.stdout


def test_the_subclassing_route_needs_no_other_import(tmp_path: Path) -> None:
    """As the guide writes it: a DriverConformance subclass and a target fixture, nothing else."""
    module = tmp_path / "test_subclass.py"
    module.write_text(
        textwrap.dedent(
            """
            import pytest
            from herder.model import InstanceType
            from herder.testing.conformance import ConformanceTarget, DriverConformance
            from herder.testing.sim import SimDriver

            @pytest.fixture
            def conformance_target():
                return ConformanceTarget(
                    driver=SimDriver(), params={"boot_delay": 0.0},
                    instance_types=[InstanceType(name="s", provider_type="s", vcpus=1,
                                                 ram=1 << 30)],
                )

            class TestMine(DriverConformance):
                def test_my_own_thing(self, conformance_harness):
                    assert conformance_harness.create().id
            """
        )
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            "-k",
            "my_own or ids_are_stable",
            str(module),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout, result.stdout

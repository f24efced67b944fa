"""The ``sim`` driver: simulated cloud, simulated runner, fault knobs and accounting."""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections.abc import Mapping
from typing import Any

import pytest
from pydantic import ValidationError

from herder.agent.protocol import (
    config_document,
    detach_command,
    forget_command,
    kill_command,
    list_command,
    log_command,
    parse_list_output,
)
from herder.model import (
    Container,
    ContainerSpec,
    ContainerState,
    InstanceType,
    SchedulingParameters,
)
from herder.plugin.cloud import (
    CapacityError,
    Driver,
    DriverContext,
    HostKey,
    HostKeyMismatch,
    Instance,
    InstanceSet,
    NotImplementedByDriver,
    QuotaError,
    RateLimitError,
    RemoteRunner,
)
from herder.plugin.executor import ExecResult, ExecutorError, HostKeyError, NoAddressError
from herder.runtime import VirtualRuntime
from herder.testing.sim import (
    SimCloud,
    SimDriver,
    SimError,
    SimExecutor,
    SimInstance,
    SimInstanceSet,
    SimParameters,
    SimStats,
)

CLUSTER = "zzzzz"
RUNNER = "/tmp/herder-runner/herder-runner"
SECRET = "0123456789abcdef0123456789abcdef01234567"
SECRET_PATH = "/var/run/herder-instance-secret"
SMALL = InstanceType("small", "a.small", vcpus=2, ram=4 << 30, price=0.36)
LARGE = InstanceType("large", "a.large", vcpus=8, ram=16 << 30, price=1.44)
OTHER = InstanceType("other", "b.small", vcpus=2, ram=4 << 30, price=0.72)
SPOT = InstanceType("spot", "a.small", vcpus=2, ram=4 << 30, price=0.10, preemptible=True)


def uuid(i: int) -> str:
    return f"{CLUSTER}-dz642-{i:015d}"


def init_command(secret: str = SECRET) -> str:
    return f'umask 0177 && echo -n "{secret}" >{SECRET_PATH}'


def install_snippet(path: str = RUNNER) -> str:
    """herder's own install snippet for ``path`` (as the instance's root user runs it)."""
    from herder.engine.worker.runner import RunnerDeployment

    deployment = RunnerDeployment(command=path, data=b"x", md5="0")
    return deployment.install_command("root")


class SecretVerifier(Instance):
    """What herder's pool wraps instances in (SPEC §6.1): falls back to the planted secret."""

    def __init__(self, inner: Instance, secret: str = SECRET) -> None:
        self.inner = inner
        self.secret = secret
        self.verified = 0

    @property
    def id(self) -> str:
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
        return self.inner.tags

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.inner.set_tags(tags)

    def destroy(self) -> None:
        self.inner.destroy()

    def verify_host_key(self, key: HostKey, remote: RemoteRunner) -> None:
        self.verified += 1
        try:
            self.inner.verify_host_key(key, remote)
            return
        except NotImplementedByDriver:
            pass
        sudo = "" if self.remote_user == "root" else "sudo "
        status, out, _ = remote.run(f"{sudo}cat {SECRET_PATH}")
        if status != 0 or out.decode() != self.secret:
            raise HostKeyMismatch("bad instance secret")


class Sim:
    """A sim driver on a virtual clock, with helpers to create, boot and talk to instances."""

    def __init__(self, **params: Any) -> None:
        params.setdefault("boot_delay", 10.0)
        self.runtime = VirtualRuntime()
        self.driver = SimDriver()
        self.params = SimParameters.model_validate(params)
        self.context = DriverContext(
            instance_set_id="zzzzz-zzzzz-zzzzzzzzzzzzzzz", runtime=self.runtime
        )
        self.set = self.driver.instance_set(self.params, self.context)

    def create(self, it: InstanceType = SMALL, tags: Mapping[str, str] | None = None) -> Instance:
        return self.set.create(
            it, "img", dict(tags or {"HerderInstanceSetID": "x"}), init_command(), None
        )

    def executor(self, inst: Instance) -> SimExecutor:
        factory = self.driver.executor_factory(self.set)
        assert factory is not None
        ex = factory(SecretVerifier(inst))
        assert isinstance(ex, SimExecutor)
        return ex

    def booted(self, it: InstanceType = SMALL) -> tuple[Instance, SimExecutor]:
        inst = self.create(it)
        self.advance(self.params.boot_delay if isinstance(self.params.boot_delay, float) else 100)
        return inst, self.executor(inst)

    def advance(self, seconds: float) -> None:
        self.runtime.advance(seconds)

    @property
    def stats(self) -> SimStats:
        return self.set.stats


def container(
    i: int, command: tuple[str, ...] = ("sleep", "10"), max_run_time: float = 0.0
) -> Container:
    spec = ContainerSpec(
        command=command, scheduling_parameters=SchedulingParameters(max_run_time=max_run_time)
    )
    return Container(uuid(i), ContainerState.LOCKED, 1, spec, created_at=0.0)


def start(
    ex: SimExecutor, i: int, command: tuple[str, ...] = ("sleep", "10"), **kw: Any
) -> ExecResult:
    ctr = container(i, command, **kw)
    return ex.execute(
        detach_command(RUNNER, "root", ["--runtime-engine=process"], ctr.uuid),
        stdin=config_document(ctr, SMALL),
    )


def listing(ex: SimExecutor, user: str = "root") -> str:
    res = ex.execute(list_command(RUNNER, user))
    assert res.exit_status == 0, res
    return res.stdout.decode()


# --------------------------------------------------------------------------- parameters


def test_defaults_inject_no_faults() -> None:
    p = SimParameters()
    rates = [v for k, v in p.model_dump().items() if k.endswith("_rate")]
    assert rates and all(r == 0 for r in rates)
    assert p.quota_max_instances is None and not p.runner_missing


def test_faults_shorthand_turns_every_fault_on_and_explicit_knobs_win() -> None:
    p = SimParameters.model_validate({"faults": True, "create_error_rate": 0.0, "seed": 4})
    assert p.create_error_rate == 0.0
    for knob in (
        "destroy_error_rate",
        "capacity_error_rate",
        "never_boot_rate",
        "broken_rate",
        "disappear_rate",
        "runner_crash_rate",
        "ssh_failure_rate",
        "stale_lock_rate",
    ):
        assert 0 < getattr(p, knob) <= 0.2, knob  # moderate: most attempts still succeed
    assert p.runner_missing and p.quota_max_instances
    assert p.min_time_between_create_calls > 0 and p.min_time_between_list_calls > 0
    assert SimParameters.all_faults(seed=9).broken_rate == p.broken_rate


def test_parameters_are_validated() -> None:
    with pytest.raises(ValidationError, match="extra"):
        SimParameters.model_validate({"boot_dealy": 3})
    with pytest.raises(ValidationError, match="min > max"):
        SimParameters.model_validate({"boot_delay": [5, 1]})
    with pytest.raises(ValidationError):
        SimParameters.model_validate({"create_error_rate": 1.5})
    with pytest.raises(ValidationError):
        SimParameters.model_validate({"boot_delay": -1})
    assert SimParameters.model_validate({"boot_delay": [1, 2]}).boot_delay == (1.0, 2.0)


# --------------------------------------------------------------------------- driver


def test_driver_is_registered_and_declares_capabilities() -> None:
    from herder.plugin.registry import Plugins

    assert Plugins.load().driver_class("sim") is SimDriver
    assert SimDriver.parameters_model is SimParameters
    assert {"quota_errors", "capacity_errors", "rate_limit_errors", "host_key_verification"} <= (
        SimDriver.capabilities
    )
    assert isinstance(SimDriver.validate_parameters({"seed": 3}), SimParameters)


def test_base_driver_has_no_executor_factory() -> None:
    class Plain(Driver):
        def instance_set(self, params: Any, context: DriverContext) -> InstanceSet:
            raise AssertionError

    assert Plain().executor_factory(SimInstanceSet(SimCloud(), SimParameters())) is None


def test_executor_factory_accepts_a_wrapped_instance_set() -> None:
    sim = Sim()
    inst = sim.create()
    factory = sim.driver.executor_factory(sim.set)
    assert factory is not None and isinstance(factory(inst), SimExecutor)

    class Wrapper(InstanceSet):
        def create(self, *a: Any, **k: Any) -> Instance:
            raise AssertionError

        def instances(self, tags: Mapping[str, str]) -> list[Instance]:
            return []

    fallback = sim.driver.executor_factory(Wrapper())
    assert fallback is not None
    sim.advance(10)
    assert fallback(SecretVerifier(inst)).execute("true").ok


def test_instance_sets_of_one_driver_share_the_cloud() -> None:
    sim = Sim()
    inst = sim.create()
    second = sim.driver.instance_set(sim.params, sim.context)
    assert [i.id for i in second.instances({})] == [inst.id]
    second.create(SMALL, "img", {}, "", None)
    assert sim.driver.stats.created == 2 == sim.set.stats.created
    assert sim.driver.stats.call_count("create", "ok") == 2


# --------------------------------------------------------------------------- instances


def test_create_gives_sim_ids_addresses_and_records_the_init_command() -> None:
    sim = Sim()
    a = sim.create(tags={"k": "v"})
    b = sim.create()
    assert (a.id, b.id) == ("sim-1", "sim-2")
    assert a.address == "10.0.0.1" and b.address == "10.0.0.2"
    assert a.remote_user == "root" and a.provider_type == "a.small"
    assert a.tags == {"k": "v"}
    assert isinstance(a, SimInstance) and a.init_command == init_command()
    assert sim.set.quota_group(SMALL) == "a" and sim.set.quota_group(SPOT) == "a-p"
    assert sim.set.quota_group(OTHER) == "b"


def test_instances_filters_by_tags_and_returns_snapshots() -> None:
    sim = Sim()
    a = sim.create(tags={"HerderInstanceSetID": "x", "HerderInstanceType": "small"})
    sim.create(tags={"HerderInstanceSetID": "y"})
    assert [i.id for i in sim.set.instances({"HerderInstanceSetID": "x"})] == [a.id]
    assert len(sim.set.instances({})) == 2
    assert sim.set.instances({"HerderInstanceSetID": "x", "HerderInstanceType": "large"}) == []
    snapshot = sim.set.instances({"HerderInstanceSetID": "x"})[0]
    snapshot.set_tags({"HerderInstanceSetID": "x", "HerderIdleBehavior": "hold"})
    assert "HerderIdleBehavior" not in snapshot.tags  # as of the listing
    fresh = sim.set.instances({"HerderIdleBehavior": "hold"})
    assert [i.id for i in fresh] == [a.id] and fresh[0].tags["HerderIdleBehavior"] == "hold"
    assert sim.stats.call_count("set_tags", "ok") == 1


def test_boot_delay_every_command_fails_until_booted() -> None:
    sim = Sim(boot_delay=30.0)
    inst = sim.create()
    ex = sim.executor(inst)
    sim.advance(29.9)
    res = ex.execute("true")
    assert res.exit_status == 1 and b"booting" in res.stderr
    assert ex.execute(list_command(RUNNER, "root")).exit_status == 1
    sim.advance(0.1)
    assert ex.execute("true").ok


def test_boot_delay_range_jitters_each_instance() -> None:
    sim = Sim(boot_delay=[10.0, 50.0], seed=1)
    executors = [sim.executor(sim.create()) for _ in range(20)]
    boot_times = []
    for t in range(0, 51):
        for ex in list(executors):
            if ex.execute("true").ok:
                boot_times.append(t)
                executors.remove(ex)
        sim.advance(1)
    assert not executors
    assert min(boot_times) >= 10 and max(boot_times) <= 50 and len(set(boot_times)) > 5


def test_no_address_until_address_delay() -> None:
    sim = Sim(boot_delay=20.0, address_delay=5.0)
    inst = sim.create()
    ex = sim.executor(inst)
    assert inst.address == ""
    with pytest.raises(NoAddressError):
        ex.execute("true")
    sim.advance(5)
    assert inst.address == "10.0.0.1"
    assert ex.execute("true").exit_status == 1  # reachable, still booting


def test_custom_boot_probe_commands() -> None:
    sim = Sim()
    _, ex = sim.booted()
    assert ex.execute("systemctl is-system-running --wait").ok
    assert ex.execute("false").exit_status == 1
    assert ex.execute("exit 3").exit_status == 3


def test_destroy_is_harmless_twice_and_ends_the_instance() -> None:
    sim = Sim()
    inst, ex = sim.booted()
    assert start(ex, 1).ok
    inst.destroy()
    inst.destroy()
    assert sim.set.instances({}) == []
    with pytest.raises(ExecutorError):
        ex.execute("true")
    with pytest.raises(SimError):
        inst.set_tags({"a": "b"})
    st = sim.stats
    assert st.destroyed == 1 and st.call_count("destroy", "ok") == 2
    assert st.container_crashes == 1 and st.container_completions == 0  # no exit code
    assert st.alive == 0


def test_destroy_delay_keeps_a_shutting_down_instance_listed() -> None:
    sim = Sim(destroy_delay=30.0)
    inst, ex = sim.booted()
    inst.destroy()
    assert [i.id for i in sim.set.instances({})] == [inst.id]
    with pytest.raises(ExecutorError):
        ex.execute("true")
    assert inst.address == ""
    sim.advance(30)
    assert sim.set.instances({}) == []
    assert sim.stats.instance_seconds() == pytest.approx(10 + 30)


# --------------------------------------------------------------------------- cloud faults


def test_quota_error_when_listed_instances_reach_the_quota() -> None:
    sim = Sim(quota_max_instances=2)
    a = sim.create()
    sim.create()
    with pytest.raises(QuotaError):
        sim.create()
    a.destroy()
    sim.create()
    st = sim.stats
    assert st.call_count("create", "quota") == 1 and st.faults["quota"] == 1
    assert st.call_count("create", "ok") == 3


@pytest.mark.parametrize(
    ("scope", "type_specific", "group_specific"),
    [("instance_type", True, False), ("quota_group", False, True), ("global", False, False)],
)
def test_capacity_error_flavours(scope: str, type_specific: bool, group_specific: bool) -> None:
    sim = Sim(capacity_error_rate=1.0, capacity_error_scope=scope)
    with pytest.raises(CapacityError) as err:
        sim.create()
    assert err.value.instance_type_specific is type_specific
    assert err.value.quota_group_specific is group_specific
    assert sim.stats.call_count("create", "capacity") == 1 and sim.stats.faults["capacity"] == 1


def test_capacity_limit_per_provider_type() -> None:
    sim = Sim(capacity_max_instances={"a.small": 1})
    sim.create(SMALL)
    with pytest.raises(CapacityError) as err:
        sim.create(SMALL)
    assert err.value.instance_type_specific
    sim.create(OTHER)  # another provider type is unaffected


def test_create_rate_limit_gives_the_earliest_retry_time() -> None:
    sim = Sim(min_time_between_create_calls=5.0)
    t0 = sim.runtime.now()
    sim.create()
    sim.advance(2)
    with pytest.raises(RateLimitError) as err:
        sim.create()
    assert err.value.earliest_retry == t0 + 5
    sim.advance(3)
    sim.create()
    assert sim.stats.call_count("create", "rate_limit") == 1
    assert sim.stats.faults["rate_limit"] == 1


def test_failed_creates_do_not_reserve_the_rate_limit() -> None:
    sim = Sim(min_time_between_create_calls=5.0, quota_max_instances=0)
    with pytest.raises(QuotaError):
        sim.create()
    with pytest.raises(QuotaError):  # not RateLimitError: the refused call was not counted
        sim.create()


def test_list_rate_limit_gives_the_earliest_retry_time() -> None:
    sim = Sim(min_time_between_list_calls=10.0)
    t0 = sim.runtime.now()
    sim.set.instances({})
    sim.advance(9)
    with pytest.raises(RateLimitError) as err:
        sim.set.instances({})
    assert err.value.earliest_retry == t0 + 10
    sim.advance(1)
    sim.set.instances({})
    assert sim.stats.call_count("list", "rate_limit") == 1
    assert sim.stats.call_count("list", "ok") == 2


def test_create_and_destroy_error_rates() -> None:
    sim = Sim(create_error_rate=0.5, destroy_error_rate=1.0, seed=3)
    made, failed = [], 0
    for _ in range(40):
        try:
            made.append(sim.create())
        except SimError:
            failed += 1
    assert 5 < failed < 35
    with pytest.raises(SimError):
        made[0].destroy()
    st = sim.stats
    assert st.faults["create_error"] == failed == st.call_count("create", "error")
    assert st.faults["destroy_error"] == 1 == st.call_count("destroy", "error")
    assert len(sim.set.instances({})) == len(made)


def test_stopped_instance_set_refuses_creates() -> None:
    sim = Sim()
    sim.set.stop()
    sim.set.stop()
    with pytest.raises(SimError):
        sim.create()


def test_init_command_over_one_kib_is_refused() -> None:
    sim = Sim()
    with pytest.raises(SimError, match="1024"):
        sim.set.create(SMALL, "img", {}, "x" * 1025, None)


# --------------------------------------------------------------------------- instance faults


def test_never_boot() -> None:
    sim = Sim(never_boot_rate=1.0)
    ex = sim.executor(sim.create())
    sim.advance(3600)
    assert ex.execute("true").exit_status == 1
    assert sim.stats.faults["never_boot"] == 1


def test_broken_instance_reports_broken_after_a_while() -> None:
    sim = Sim(broken_rate=1.0, broken_after=100.0)
    _, ex = sim.booted()
    assert "broken" not in listing(ex)
    assert start(ex, 1).ok
    sim.advance(100)
    out = listing(ex)
    assert parse_list_output(out, CLUSTER).broken
    assert parse_list_output(out, CLUSTER).exited == {uuid(1): 0}
    listing(ex)
    assert start(ex, 2).exit_status == 1  # a broken instance starts nothing
    assert sim.stats.faults["broken"] == 1  # counted when it fired, not per listing


def test_disappearing_instance_vanishes_and_its_processes_die() -> None:
    sim = Sim(disappear_rate=1.0, disappear_after=(100.0, 200.0), seed=2)
    inst, ex = sim.booted()
    assert start(ex, 1, ("sleep", "1000")).ok
    sim.advance(200)
    assert sim.set.instances({}) == []
    with pytest.raises(ExecutorError):
        ex.execute("true")
    st = sim.stats
    assert st.disappeared == 1 and st.faults["disappear"] == 1
    assert st.container_crashes == 1 and st.destroyed == 0
    assert 100 <= st.instance_seconds() <= 200
    inst.destroy()  # destroying a vanished instance is harmless
    assert sim.stats.destroyed == 0


def test_runner_crash_leaves_no_exit_code() -> None:
    sim = Sim(runner_crash_rate=1.0)
    _, ex = sim.booted()
    assert start(ex, 1, ("sleep", "100")).ok
    sim.advance(100)
    assert parse_list_output(listing(ex), CLUSTER).exited == {}
    assert listing(ex) == ""
    st = sim.stats
    assert st.container_crashes == 1 and st.faults["runner_crash"] == 1
    assert st.container_completions == 0


def test_ssh_failures_raise_and_sometimes_after_the_command_ran() -> None:
    sim = Sim(ssh_failure_rate=1.0, seed=5)
    _, ex = sim.booted()
    for i in range(20):
        with pytest.raises(ExecutorError):
            start(ex, i)
    st = sim.stats
    assert st.faults["ssh_failure"] >= 20
    assert 0 < st.container_starts < 20  # outcome unknown to herder: some did start


def test_stale_lock_after_exit() -> None:
    sim = Sim(stale_lock_rate=1.0)
    _, ex = sim.booted()
    assert start(ex, 1, ("sim", "5", "3")).ok
    sim.advance(5)
    parsed = parse_list_output(listing(ex), CLUSTER)
    assert parsed.stale == [uuid(1)] and parsed.exited == {uuid(1): 3}
    assert ex.execute(forget_command(RUNNER, "root", uuid(1))).ok
    parsed = parse_list_output(listing(ex), CLUSTER)
    assert parsed.stale == [uuid(1)] and parsed.exited == {}
    assert start(ex, 1).exit_status == 1  # the held lock refuses a new start
    assert ex.execute(kill_command(RUNNER, "root", 15, uuid(1))).ok  # nothing to kill
    assert sim.stats.faults["stale_lock"] == 1


def test_runner_missing_until_deployed() -> None:
    sim = Sim(runner_missing=True)
    _, ex = sim.booted()
    res = ex.execute(list_command(RUNNER, "root"))
    assert res.exit_status == 127 and b"not found" in res.stderr
    assert ex.execute(f"md5sum {RUNNER}").exit_status == 1
    binary = b"#!/usr/bin/env python3\nprint('runner')\n"
    assert ex.execute(install_snippet(), stdin=binary).ok
    md5 = hashlib.md5(binary).hexdigest()
    res = ex.execute(f"md5sum {RUNNER}")
    assert res.ok and res.stdout == f"{md5}  {RUNNER}\n".encode() and res.stderr == b""
    assert ex.execute(list_command(RUNNER, "root")).ok
    assert ex.execute(f"cat {RUNNER}").stdout == binary


def test_probe_latency_longer_than_the_timeout() -> None:
    sim = Sim(probe_latency=5.0)
    _, ex = sim.booted()
    with pytest.raises(ExecutorError, match="timed out"):
        ex.execute("true", timeout=1.0)
    assert ex.execute("true", timeout=10.0).ok  # virtual clock: no real sleep


def test_fault_rates_are_reproducible_with_a_seed() -> None:
    def run(seed: int) -> tuple[list[bool], list[bool]]:
        sim = Sim(seed=seed, never_boot_rate=0.3, boot_delay=[1.0, 9.0], create_error_rate=0.3)
        made, executors = [], []
        for _ in range(30):
            try:
                executors.append(sim.executor(sim.create()))
                made.append(True)
            except SimError:
                made.append(False)
        sim.advance(5)
        return made, [ex.execute("true").ok for ex in executors]

    assert run(11) == run(11)
    assert run(11) != run(12)


# --------------------------------------------------------------------------- the runner verbs


def test_list_start_and_exit() -> None:
    sim = Sim()
    _, ex = sim.booted()
    assert listing(ex) == ""
    res = start(ex, 1, ("sleep", "30"))
    assert res.ok and json.loads(res.stdout)["UUID"] == uuid(1)
    assert start(ex, 2, ("sim", "10", "7")).ok
    assert start(ex, 3, ("python", "job.py")).ok  # anything else: 1 s, exit 0
    assert parse_list_output(listing(ex), CLUSTER).running == [uuid(1), uuid(2), uuid(3)]
    sim.advance(1)
    assert parse_list_output(listing(ex), CLUSTER).exited == {uuid(3): 0}
    sim.advance(9)
    parsed = parse_list_output(listing(ex), CLUSTER)
    assert parsed.running == [uuid(1)] and parsed.exited == {uuid(2): 7, uuid(3): 0}
    sim.advance(20)
    assert listing(ex) == f"{uuid(1)} exited 0\n{uuid(2)} exited 7\n{uuid(3)} exited 0\n"
    st = sim.stats
    assert st.container_starts == 3 and st.container_completions == 3
    assert st.exit_codes == {0: 2, 7: 1}


def test_max_run_time_is_enforced_with_exit_124() -> None:
    sim = Sim()
    _, ex = sim.booted()
    assert start(ex, 1, ("sleep", "100"), max_run_time=20.0).ok
    sim.advance(19.9)
    assert parse_list_output(listing(ex), CLUSTER).running == [uuid(1)]
    sim.advance(0.1)
    assert parse_list_output(listing(ex), CLUSTER).exited == {uuid(1): 124}


def test_list_with_stdin_prices() -> None:
    sim = Sim(price_history=True)
    inst, ex = sim.booted()
    prices = inst.price_history(SMALL)
    assert len(prices) == 1 and prices[0].price == SMALL.price
    stdin = json.dumps([p.to_json() for p in prices]).encode()
    assert ex.execute(list_command(RUNNER, "root", with_prices=True), stdin=stdin).ok
    bad = ex.execute(list_command(RUNNER, "root", with_prices=True), stdin=b"{not json")
    assert bad.exit_status == 1
    assert Sim().create().price_history(SMALL) == []


def test_detach_validates_its_input() -> None:
    sim = Sim()
    _, ex = sim.booted()
    cmd = detach_command(RUNNER, "root", [], uuid(1))
    assert ex.execute(cmd, stdin=b"not json").exit_status == 1
    assert ex.execute(cmd, stdin=config_document(container(2), SMALL)).exit_status == 1
    assert ex.execute(f"{RUNNER} --detach --stdin-config not-a-uuid", stdin=b"{}").exit_status == 2
    assert ex.execute(cmd, stdin=json.dumps({"command": ["sleep", "1"]}).encode()).ok


def test_starting_a_running_uuid_on_the_same_instance_is_refused() -> None:
    sim = Sim()
    _, ex = sim.booted()
    assert start(ex, 1, ("sleep", "30")).ok
    res = start(ex, 1, ("sleep", "30"))
    assert res.exit_status == 1 and b"lock" in res.stderr
    st = sim.stats
    assert st.container_starts == 1 and st.refused_starts == 1 and st.double_runs == 0
    sim.advance(30)
    assert start(ex, 1).ok  # the lock went with the process


def test_kill_ends_the_process_shortly_after_sigterm() -> None:
    sim = Sim(kill_delay=2.0)
    _, ex = sim.booted()
    assert start(ex, 1, ("sleep", "100")).ok
    kill = kill_command(RUNNER, "root", 15, uuid(1))
    res = ex.execute(kill)
    assert res.exit_status == 1 and b"still alive" in res.stderr
    sim.advance(2)
    assert ex.execute(kill).ok
    assert parse_list_output(listing(ex), CLUSTER).exited == {uuid(1): 143}
    assert ex.execute(kill_command(RUNNER, "root", 15, uuid(9))).ok  # never existed
    st = sim.stats
    assert st.container_kills == 1 and st.exit_codes == {143: 1}


def test_kill_within_the_runners_wait_succeeds_at_once() -> None:
    sim = Sim(kill_delay=0.5)
    _, ex = sim.booted()
    assert start(ex, 1, ("sleep", "100")).ok
    assert ex.execute(kill_command(RUNNER, "root", 15, uuid(1))).ok
    assert parse_list_output(listing(ex), CLUSTER).running == []


def test_log_and_forget() -> None:
    sim = Sim()
    inst, ex = sim.booted()
    assert ex.execute(log_command(RUNNER, "root", uuid(1))).exit_status == 1
    assert start(ex, 1, ("sim", "5", "2")).ok
    assert ex.execute(forget_command(RUNNER, "root", uuid(1))).exit_status == 1  # running
    sim.advance(5)
    log = ex.execute(log_command(RUNNER, "root", uuid(1)))
    assert log.ok and uuid(1).encode() in log.stdout and inst.id.encode() in log.stdout
    assert b"exited with code 2" in log.stdout
    assert ex.execute(forget_command(RUNNER, "root", uuid(1))).ok
    assert listing(ex) == ""
    assert ex.execute(forget_command(RUNNER, "root", uuid(1))).ok  # idempotent


def test_runner_verbs_need_one_uuid() -> None:
    sim = Sim()
    _, ex = sim.booted()
    assert ex.execute(f"{RUNNER} --kill 15").exit_status == 2
    assert ex.execute(f"{RUNNER} --log garbage").exit_status == 2


# --------------------------------------------------------------------------- sudo and secrets


def test_non_root_user_needs_sudo_for_privileged_commands() -> None:
    sim = Sim(remote_user="admin", runner_missing=True)
    inst, ex = sim.booted()
    assert inst.remote_user == "admin"
    assert ex.execute(install_snippet(), stdin=b"x").exit_status == 1
    wrapped = "sudo sh -c '" + install_snippet().replace("'", "'\\''") + "'"
    assert ex.execute(wrapped, stdin=b"bin").ok
    assert ex.execute(f"md5sum {RUNNER}").ok  # no sudo needed
    assert ex.execute(list_command(RUNNER, "root")).exit_status == 1  # forgot sudo
    assert ex.execute(list_command(RUNNER, "admin")).ok
    assert ex.execute(f"cat {SECRET_PATH}").exit_status == 1
    assert ex.execute(f"sudo cat {SECRET_PATH}").stdout == SECRET.encode()
    ctr = container(1)
    cmd = detach_command(RUNNER, "admin", [], ctr.uuid)
    assert cmd.startswith("sudo ") and ex.execute(cmd, stdin=config_document(ctr, SMALL)).ok


def test_instance_secret_is_checked_through_the_executor() -> None:
    sim = Sim()
    inst, _ = sim.booted()
    good = SecretVerifier(inst)
    ex = sim.driver.executor_factory(sim.set)(good)  # type: ignore[misc]
    assert ex.execute(f"cat {SECRET_PATH}").stdout == SECRET.encode()
    assert ex.execute("true").ok
    assert good.verified == 1  # once per connection
    ex.close()
    assert ex.execute("true").ok and good.verified == 1  # same key: no new verification
    bad = sim.set.executor(SecretVerifier(inst, secret="f" * 40))
    with pytest.raises(HostKeyError):
        bad.execute("true")


def test_without_secret_or_host_key_support_verification_fails() -> None:
    sim = Sim()
    inst, _ = sim.booted()
    with pytest.raises(HostKeyError):
        sim.set.executor(inst).execute("true")  # the raw instance cannot verify
    relaxed = Sim(check_host_keys=False)
    raw, _ = relaxed.booted()
    assert relaxed.set.executor(raw).execute("true").ok


def test_host_key_verification_capability() -> None:
    sim = Sim(host_key_verification=True)
    inst, _ = sim.booted()
    assert isinstance(inst, SimInstance)
    inst.verify_host_key(inst.host_key, None)  # type: ignore[arg-type]
    with pytest.raises(HostKeyMismatch):
        inst.verify_host_key(HostKey("ssh-ed25519", b"forged"), None)  # type: ignore[arg-type]
    assert sim.set.executor(inst).execute("true").ok
    with pytest.raises(NotImplementedByDriver):
        Sim().create().verify_host_key(inst.host_key, None)  # type: ignore[arg-type]


def test_set_target_switches_instances() -> None:
    sim = Sim()
    _, ex = sim.booted()
    b = sim.create()
    sim.advance(10)
    assert start(ex, 1).ok
    ex.set_target(SecretVerifier(b))
    assert listing(ex) == ""


# --------------------------------------------------------------------------- double runs


def test_double_run_on_two_instances_is_counted() -> None:
    sim = Sim()
    a, ex_a = sim.booted()
    b, ex_b = sim.booted()
    assert start(ex_a, 1, ("sleep", "60")).ok
    sim.advance(10)
    assert start(ex_b, 1, ("sleep", "60")).ok
    st = sim.stats
    assert st.double_runs == 1
    detail = st.double_run_details[0]
    assert (detail.uuid, detail.instance_id, detail.other_instance_ids) == (uuid(1), b.id, (a.id,))
    assert detail.at == sim.runtime.now()
    assert st.to_json()["double_runs"] == 1


def test_restart_after_the_previous_process_is_gone_is_not_a_double_run() -> None:
    sim = Sim(kill_delay=0.0)
    a, ex_a = sim.booted()
    _, ex_b = sim.booted()
    assert start(ex_a, 1, ("sleep", "10")).ok
    sim.advance(10)
    assert start(ex_b, 1, ("sleep", "10")).ok  # exited on a: fine
    assert ex_b.execute(kill_command(RUNNER, "root", 15, uuid(1))).ok
    assert start(ex_a, 1, ("sleep", "10")).ok  # killed on b: fine
    a.destroy()
    assert start(ex_b, 1, ("sleep", "10")).ok  # a's instance destroyed: fine
    st = sim.stats
    assert st.double_runs == 0 and st.container_starts == 4


def test_double_run_against_a_process_that_outlives_its_sigterm() -> None:
    sim = Sim(kill_delay=3.0)
    _, ex_a = sim.booted()
    _, ex_b = sim.booted()
    assert start(ex_a, 1, ("sleep", "100")).ok
    assert ex_a.execute(kill_command(RUNNER, "root", 15, uuid(1))).exit_status == 1
    sim.advance(2.9)
    assert start(ex_b, 1).ok
    assert sim.stats.double_runs == 1


# --------------------------------------------------------------------------- accounting


def test_cost_and_instance_seconds() -> None:
    sim = Sim()
    small = sim.create(SMALL)  # 0.36 / h
    large = sim.create(LARGE)  # 1.44 / h
    sim.advance(100)
    small.destroy()
    sim.advance(50)
    st = sim.stats
    assert st.instance_seconds_by_type() == {
        "small": pytest.approx(100),
        "large": pytest.approx(150),
    }
    assert st.cost_by_type()["small"] == pytest.approx(0.01)
    assert st.cost_by_type()["large"] == pytest.approx(0.06)
    assert st.cost() == pytest.approx(0.07)
    assert (st.created, st.destroyed, st.alive) == (2, 1, 1)
    assert st.peak_alive == 2
    large.destroy()
    sim.advance(1000)
    assert sim.stats.cost() == pytest.approx(0.07)  # billing stops at destroy


def test_stats_are_live_and_serialise() -> None:
    sim = Sim()
    stats = sim.stats
    t0 = sim.runtime.now()
    sim.create()
    sim.advance(3600)
    sim.create()
    assert stats.created == 2 and stats.alive == 2
    assert stats.instance_seconds() == pytest.approx(3600)
    assert stats.cost(t0 + 1800) == pytest.approx(0.18)  # billed up to a given time
    assert stats.calls_summary() == {"create": {"ok": 2}, "list": {}, "destroy": {}, "set_tags": {}}
    data = stats.to_json()
    json.dumps(data)
    assert data["calls"]["create"] == {"ok": 2} and data["peak_alive"] == 2
    assert data["cost"] == pytest.approx(0.36)


def test_commands_are_counted_by_kind() -> None:
    sim = Sim()
    _, ex = sim.booted()
    ex.execute("true")
    listing(ex)
    start(ex, 1)
    cmds = sim.stats.commands
    assert cmds["list"] == 1 and cmds["detach"] == 1 and cmds["boot_probe"] == 1
    assert cmds["cat"] >= 1  # the secret check on connect


# --------------------------------------------------------------------------- threads


def test_instance_set_is_thread_safe() -> None:
    driver = SimDriver()
    iset = driver.instance_set(
        SimParameters(boot_delay=0.0), DriverContext(instance_set_id="x", runtime=None)
    )
    created: list[str] = []
    errors: list[BaseException] = []
    guard = threading.Lock()

    def work(n: int) -> None:
        try:
            for i in range(50):
                inst = iset.create(SMALL, "img", {"t": str(n)}, "", None)
                with guard:
                    created.append(inst.id)
                iset.instances({"t": str(n)})
                if i % 2:
                    inst.destroy()
                    inst.destroy()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(created) == len(set(created)) == 300
    st = iset.stats
    assert st.created == 300 and st.destroyed == 150 and st.alive == 150
    assert st.call_count("destroy") == 300 and st.call_count("list") == 300
    assert len(iset.instances({})) == 150
    assert not math.isnan(st.cost())


# --------------------------------------------------------------------------- with the real pool


def test_the_engine_pool_runs_a_container_on_the_sim() -> None:
    """The pool's own commands (install, md5 check, secret, runner verbs) work on the sim."""
    from herder.config import Config
    from herder.engine.worker.interfaces import ContainerReporter
    from herder.engine.worker.pool import Pool
    from herder.model import WorkerState

    class Reporter(ContainerReporter):
        def __init__(self) -> None:
            self.exited: dict[str, tuple[int, bytes]] = {}
            self.logs: dict[str, bytes] = {}

        def container_log(self, uuid: str, data: bytes) -> None:
            self.logs[uuid] = self.logs.get(uuid, b"") + data

        def container_started(self, uuid: str, instance_id: str, instance_type: str) -> None:
            pass

        def container_exited(self, uuid: str, exit_code: int, log: bytes) -> None:
            self.exited[uuid] = (exit_code, log)

    config = Config.model_validate(
        {
            "cloud": {
                "driver": "sim",
                "probe_interval": 1,
                "sync_interval": 5,
                "timeout_idle": 30,
            },
            "instance_types": {"small": {"vcpus": 2, "ram": "4GiB", "price": 0.36}},
        }
    )
    sim = Sim(boot_delay=5.0, runner_missing=True, remote_user="admin")
    reporter = Reporter()
    types = config.build_instance_types()
    factory = sim.driver.executor_factory(sim.set)
    assert factory is not None
    pool = Pool(
        runtime=sim.runtime,
        instance_set=sim.set,
        executor_factory=factory,
        config=config,
        instance_types=types,
        instance_set_id=sim.context.instance_set_id,
        reporter=reporter,
        runner_data=b"#!/bin/sh\n",
    )
    pool.start()
    try:
        sim.advance(1)
        assert pool.create(types["small"]) is not None
        sim.advance(20)
        (view,) = pool.instances()
        assert view.worker_state == WorkerState.IDLE
        assert pool.start_container(view.instance, container(1, ("sim", "10", "3")))
        sim.advance(20)
        code, _ = reporter.exited[uuid(1)]
        assert code == 3 and b"exited with code 3" in reporter.logs[uuid(1)]
        sim.advance(60)
        assert pool.instances() == []  # idle shutdown
    finally:
        pool.stop()
    st = sim.stats
    assert st.commands["install"] == 1 and st.commands["cat"] == 1
    assert st.double_runs == 0 and st.destroyed == 1 and st.alive == 0

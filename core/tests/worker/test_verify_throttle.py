"""Secret verification, boot probes, throttles and driver wrappers (SPEC §2, §5.2, §6.1)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter
from worker_fakes import FakeExecutor, FakeHost, FakeInstance, FakeInstanceSet, FakeRemote

from herder.config import Config
from herder.engine.worker.throttle import CloudCallThrottle, SlotLimiter, wrap_instance_set
from herder.engine.worker.verify import TagVerifier, init_command
from herder.model import InstanceType
from herder.plugin.bootprobe import CommandBootProbe
from herder.plugin.cloud import (
    HostKey,
    HostKeyMismatch,
    Instance,
    NotImplementedByDriver,
    RateLimitError,
)
from herder.runtime import VirtualRuntime

KEY = HostKey("ssh-ed25519", b"key")
SECRET = "ab" * 20


def fake_instance(check: str = "unsupported", user: str = "admin") -> tuple[FakeInstance, FakeHost]:
    cloud = FakeInstanceSet(VirtualRuntime())
    vm = cloud.add_vm({}, host_key_check=check, remote_user=user)
    vm.host.secret_file = SECRET
    return FakeInstance(cloud, vm), vm.host


def test_init_command() -> None:
    assert init_command(SECRET) == (
        f'umask 0177 && echo -n "{SECRET}" >/var/run/herder-instance-secret\n'
    )


def test_secret_verified_over_the_connection_with_sudo() -> None:
    inst, host = fake_instance()
    reported: list[Instance] = []
    verifier = TagVerifier(inst, SECRET, reported.append)
    remote = FakeRemote(host)
    verifier.verify_host_key(KEY, remote)
    assert reported == [verifier]
    assert remote.commands == ["sudo cat /var/run/herder-instance-secret"]


def test_secret_read_without_sudo_as_root() -> None:
    inst, host = fake_instance(user="root")
    remote = FakeRemote(host)
    TagVerifier(inst, SECRET).verify_host_key(KEY, remote)
    assert remote.commands == ["cat /var/run/herder-instance-secret"]


def test_bad_secret_is_a_mismatch_and_still_reported() -> None:
    inst, host = fake_instance()
    host.secret_file = SECRET + "\n"  # must match exactly
    reported: list[Instance] = []
    with pytest.raises(HostKeyMismatch, match="bad instance secret"):
        TagVerifier(inst, SECRET, reported.append).verify_host_key(KEY, FakeRemote(host))
    assert len(reported) == 1
    host.secret_file = None
    with pytest.raises(HostKeyMismatch):
        TagVerifier(inst, SECRET).verify_host_key(KEY, FakeRemote(host))


def test_driver_verification_wins_and_no_secret_means_not_implemented() -> None:
    inst, host = fake_instance(check="ok")
    remote = FakeRemote(host)
    TagVerifier(inst, "").verify_host_key(KEY, remote)
    assert remote.commands == []
    inst, host = fake_instance(check="bad")
    with pytest.raises(Exception, match="host key mismatch"):
        TagVerifier(inst, SECRET).verify_host_key(KEY, FakeRemote(host))
    inst, host = fake_instance()
    with pytest.raises(NotImplementedByDriver):
        TagVerifier(inst, "").verify_host_key(KEY, FakeRemote(host))


def test_verifier_delegates() -> None:
    inst, _ = fake_instance()
    v = TagVerifier(inst, SECRET)
    assert (v.id, v.address, v.remote_user, v.provider_type) == (
        inst.id,
        inst.address,
        inst.remote_user,
        inst.provider_type,
    )
    v.set_tags({"a": "b"})
    assert inst.vm.tags == {"a": "b"}
    v.destroy()
    assert inst.vm.destroyed


def test_command_boot_probe() -> None:
    inst, host = fake_instance()
    ex = FakeExecutor(inst._cloud, inst)
    probe = CommandBootProbe("")
    probe.bind(Config.model_validate({"cloud": {"timeout_command": "7s"}}))
    assert probe.probe(ex, inst) == (True, "")
    assert host.commands == [("true", None)]
    assert ex.timeouts == [7.0]
    host.boot_ok = False
    ok, detail = probe.probe(ex, inst)
    assert not ok and detail == "booting"


def test_throttle() -> None:
    rt = VirtualRuntime()
    t = CloudCallThrottle(rt)
    fired: list[float] = []
    t.check_rate_limit_error(RuntimeError("x"), "create")
    t.check_rate_limit_error(RateLimitError("x", rt.now()), "create")  # retry time not future
    assert t.error() is None
    t.check_rate_limit_error(
        RateLimitError("x", rt.now() + 10), "create", lambda: fired.append(rt.now())
    )
    assert "suspended" in str(t.error())
    rt.advance(9.9)
    assert t.error() is not None and fired == []
    rt.advance(0.1)
    assert fired == [rt.now()]
    assert t.error() is None  # allowed at the retry time itself


def test_slot_limiter_spaces_and_gives_no_burst_credit() -> None:
    rt = VirtualRuntime()
    lim = SlotLimiter(rt, 4)
    ran: list[float] = []
    t0 = rt.now()
    for _ in range(3):
        lim.schedule(lambda: ran.append(rt.now()))
    rt.advance(10)
    assert ran == [t0, t0 + 0.25, t0 + 0.5]
    ran.clear()
    for _ in range(2):
        lim.schedule(lambda: ran.append(rt.now()))
    rt.run_until_idle()
    rt.advance(1)
    assert ran == [t0 + 10, t0 + 10.25]
    unlimited = SlotLimiter(rt, 0)
    assert unlimited.schedule(lambda: None) == rt.now()


def test_wrapper_stack_tags_filters_and_counts() -> None:
    rt = VirtualRuntime()
    cloud = FakeInstanceSet(rt)
    registry = CollectorRegistry()
    counter = Counter("ops", "ops", ["operation", "error"], registry=registry)
    wrapped = wrap_instance_set(
        cloud, operations_counter=counter, resource_tags={"Owner": "ops", "Name": "default"}
    )
    it = InstanceType(name="t", provider_type="p", vcpus=1, ram=1)
    inst = wrapped.create(it, "img", {"Name": "mine", "Set": "1"}, "", None)
    assert cloud.create_args[0]["tags"] == {"Owner": "ops", "Name": "mine", "Set": "1"}
    cloud.add_vm({"Set": "2"})
    assert [i.id for i in wrapped.instances({"Set": "1"})] == [inst.id]
    inst.destroy()
    cloud.destroy_fails = True
    with pytest.raises(RuntimeError):
        inst.destroy()
    get = registry.get_sample_value
    assert get("ops_total", {"operation": "Create", "error": "0"}) == 1
    assert get("ops_total", {"operation": "List", "error": "0"}) == 1
    assert get("ops_total", {"operation": "Destroy", "error": "0"}) == 1
    assert get("ops_total", {"operation": "Destroy", "error": "1"}) == 1
    assert get("ops_total", {"operation": "SetTags", "error": "1"}) == 0

"""The pool: creating instances, throttles, sync, adoption, probe scheduling (SPEC §2, §5)."""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry
from worker_fakes import SET_ID, FakeInstanceSet, Harness, container, uuid

from herder.engine.worker.interfaces import QuotaLimit
from herder.engine.worker.pool import PoolError
from herder.model import IdleBehavior, WorkerState
from herder.plugin.cloud import CapacityError, QuotaError, RateLimitError
from herder.runtime import VirtualRuntime

C1 = uuid(1)


# --------------------------------------------------------------------------- create


def test_create_tags_init_command_and_pending_view() -> None:
    h = Harness(
        resource_tags={"Owner": "ops", "HerderInstanceType": "overridden"},
        instance_init_command="echo hi",
        image_id="img-1",
    )
    view = h.pool.create(h.types["big"])
    assert view is not None
    assert (view.instance, view.worker_state) == ("", WorkerState.BOOTING)
    assert view.instance_type == "big"
    assert [v.instance for v in h.pool.instances()] == [""]
    assert h.cloud.count("create") == 0  # the cloud call runs in the background
    h.idle()
    args = h.cloud.create_args[0]
    secret = args["tags"]["HerderInstanceSecret"]
    assert re.fullmatch(r"[0-9a-f]{40}", secret)
    assert args["tags"] == {
        "Owner": "ops",
        "HerderInstanceSetID": SET_ID,
        "HerderInstanceType": "big",
        "HerderIdleBehavior": "run",
        "HerderInstanceSecret": secret,
    }
    assert args["init_command"] == (
        f'umask 0177 && echo -n "{secret}" >/var/run/herder-instance-secret\necho hi'
    )
    assert args["image_id"] == "img-1"
    assert args["public_key"] == "ssh-ed25519 AAAA test"
    views = h.pool.instances()
    assert len(views) == 1 and views[0].instance.startswith("i-")
    assert views[0].worker_state == WorkerState.BOOTING  # created by us: booting, not unknown
    assert h.notifications >= 1


def test_no_public_key_when_not_deploying_it() -> None:
    h = Harness(deploy_public_key=False)
    h.pool.create(h.types["small"])
    h.idle()
    assert h.cloud.create_args[0]["public_key"] is None


def test_max_concurrent_creates_refuses_only_while_at_limit() -> None:
    h = Harness(max_concurrent_instance_create_ops=1)
    assert h.pool.create(h.types["small"]) is not None
    assert h.pool.create(h.types["small"]) is None
    n = h.notifications
    h.idle()  # the create finishes and subscribers hear of it
    assert h.notifications > n
    assert h.pool.create(h.types["small"]) is not None  # no fixed 5 s lockout


def test_max_instances_counts_pending_creates_and_undestroyed_workers() -> None:
    h = Harness(max_instances=2)
    assert h.pool.create(h.types["small"]) is not None
    assert not h.pool.at_quota()
    assert h.pool.create(h.types["small"]) is not None  # pending creates count
    assert h.pool.at_quota()
    assert h.pool.quota_limit() is QuotaLimit.MAX_INSTANCES  # herder's cap, not the cloud's
    assert h.pool.create(h.types["small"]) is None
    h.idle()
    iid = min(h.pool._workers)
    h.cloud.destroy_fails = True
    h.pool.kill_instance(iid, "test")
    h.idle()
    assert h.state(iid) == "shutdown"
    assert h.pool.at_quota()  # the cloud refused the destroy: the instance still holds a place


def test_an_accepted_destroy_frees_its_place_at_once() -> None:
    h = Harness(max_instances=2, sync_interval=3600)
    h.pool.create(h.types["small"])
    h.pool.create(h.types["small"])
    h.idle()
    iid = min(h.pool._workers)
    h.cloud.sticky_destroy = True  # the listing still shows it for a while
    n = h.notifications
    h.pool.kill_instance(iid, "test")
    h.idle()
    assert h.state(iid) == "shutdown"
    assert not h.pool.at_quota()  # the destroy was accepted: no wait for the next sync
    assert h.notifications > n  # and the scheduler heard of it
    assert h.pool.create(h.types["small"]) is not None
    h.idle()
    assert h.pool.at_quota()
    # Still listed after timeout_shutdown: destroyed again, and counted until accepted again.
    h.cloud.destroy_fails = True
    h.runtime.advance(11)
    h.sync()
    assert h.worker(iid).destroy_accepted is False
    assert h.pool.at_quota()
    h.cloud.destroy_fails = False
    h.cloud.sticky_destroy = False
    h.runtime.advance(11)
    h.sync()
    h.idle()
    h.sync()
    assert h.state(iid) == "gone"
    assert len(h.pool._workers) == 2 and h.pool.at_quota()  # the two live ones


def test_quota_error_with_no_other_instances_blocks_for_a_minute() -> None:
    h = Harness()
    h.cloud.create_errors.append(QuotaError("quota"))
    h.pool.create(h.types["small"])
    h.idle()
    assert h.pool.at_quota()
    assert h.pool.create(h.types["small"]) is None
    n = h.notifications
    h.runtime.advance(59)
    assert h.pool.at_quota()
    h.runtime.advance(1)
    assert not h.pool.at_quota()
    assert h.notifications > n  # woken at expiry


def test_quota_error_with_others_waits_for_fewer_instances() -> None:
    h = Harness()
    a = h.create_booted()
    h.create_booted()
    h.cloud.create_errors.append(QuotaError("quota"))
    h.pool.create(h.types["small"])
    h.idle()
    assert h.pool.at_quota()
    h.runtime.advance(3600)
    h.sync()
    assert h.pool.at_quota()  # no TTL: until fewer than 2 instances
    h.cloud.vms[a].destroyed = True
    h.sync()
    assert not h.pool.at_quota()


def capacity_harness(error: CapacityError, type_name: str = "small") -> Harness:
    h = Harness()
    h.cloud.create_errors.append(error)
    h.pool.create(h.types[type_name])
    h.idle()
    return h


def at_capacity(h: Harness) -> dict[str, bool]:
    return {name: h.pool.at_capacity(it) for name, it in h.types.items()}


def test_capacity_error_for_one_type() -> None:
    h = capacity_harness(CapacityError("no", instance_type_specific=True))
    assert at_capacity(h) == {"small": True, "big": False, "small.spot": False, "other": False}
    h2 = capacity_harness(CapacityError("no", instance_type_specific=True), "small.spot")
    assert at_capacity(h2) == {"small": False, "big": False, "small.spot": True, "other": False}


def test_capacity_error_for_a_quota_group() -> None:
    h = capacity_harness(CapacityError("no", quota_group_specific=True))
    assert at_capacity(h) == {"small": True, "big": True, "small.spot": False, "other": False}


def test_capacity_error_for_everything_expires_with_notify() -> None:
    h = capacity_harness(CapacityError("no"))
    assert all(at_capacity(h).values())
    assert h.pool.create(h.types["other"]) is None
    n = h.notifications
    h.runtime.advance(60)
    assert not any(at_capacity(h).values())
    assert h.notifications > n
    assert h.pool.create(h.types["other"]) is not None


def test_capacity_keys_are_namespaced() -> None:
    """A quota group named like a provider type must not block that type."""
    h = Harness()

    def group(it: object) -> str:
        return "p.big"

    h.pool._instance_set.quota_group = group  # type: ignore[method-assign]
    with h.pool._lock:
        h.pool._capacity_until[("type", "p.big")] = h.runtime.now() + 60
    assert h.pool.at_capacity(h.types["big"])
    with h.pool._lock:
        h.pool._capacity_until.clear()
        h.pool._capacity_until[("group", "")] = h.runtime.now() + 60
    assert not h.pool.at_capacity(h.types["small"])


def test_rate_limited_create_makes_no_call_before_retry_time() -> None:
    h = Harness()
    t0 = h.runtime.now()
    h.cloud.create_errors.append(RateLimitError("slow down", t0 + 30))
    h.pool.create(h.types["small"])
    h.pool.create(h.types["small"])  # queued before the error: must not call either
    h.idle()
    assert h.cloud.count("create") == 1
    assert h.pool.instances() == []
    h.runtime.advance(29)
    assert h.pool.create(h.types["small"]) is None
    h.runtime.advance(1)
    assert h.pool.create(h.types["small"]) is not None
    h.idle()
    assert h.cloud.times("create") == [t0, t0 + 30]


def test_rate_limited_list_makes_no_call_before_retry_time() -> None:
    h = Harness()
    t0 = h.runtime.now()
    h.cloud.list_errors.append(RateLimitError("slow down", t0 + 30))
    h.sync()
    assert not h.pool.loaded
    h.runtime.advance(10)
    h.sync()
    assert h.cloud.count("list") == 1
    h.runtime.advance(20)
    h.sync()
    assert h.cloud.count("list") == 2
    assert h.pool.loaded


def test_cloud_ops_are_spaced_without_sleeping() -> None:
    h = Harness(max_cloud_ops_per_second=2)
    t0 = h.runtime.now()
    for _ in range(3):
        assert h.pool.create(h.types["small"]) is not None
    h.pool.sync_now()
    h.runtime.advance(5)
    assert h.cloud.times("create") == [t0, t0 + 0.5, t0 + 1.0]
    assert h.cloud.times("list") == [t0 + 1.5]
    iid = min(h.pool._workers)
    h.runtime.advance(100)
    h.pool.kill_instance(iid, "x")
    h.pool.set_idle_behavior(max(h.pool._workers), IdleBehavior.HOLD)
    h.runtime.advance(5)
    t1 = t0 + 105
    assert h.cloud.times("destroy") == [t1]
    assert h.cloud.times("set_tags") == [t1 + 0.5]


# --------------------------------------------------------------------------- driver wrappers


def test_driver_operations_counted_and_foreign_instances_filtered() -> None:
    h = Harness()
    assert h.metric("herder_driver_operations_total", operation="Destroy", error="1") == 0
    foreign = h.cloud.add_vm({"HerderInstanceSetID": "someone-else"})
    h.cloud.add_vm({"Unrelated": "x"})
    h.sync()
    assert h.pool.instances() == []
    assert h.cloud.vms[foreign.id].destroy_calls == 0
    h.pool.create(h.types["small"])
    h.cloud.create_errors.append(RuntimeError("boom"))
    h.pool.create(h.types["small"])
    h.idle()
    iid = h.pool.instances()[0].instance
    h.cloud.destroy_fails = True
    h.pool.kill_instance(iid, "x")
    h.idle()
    m = h.metric
    assert m("herder_driver_operations_total", operation="List", error="0") == 1
    assert m("herder_driver_operations_total", operation="Create", error="0") == 1
    assert m("herder_driver_operations_total", operation="Create", error="1") == 1
    assert m("herder_driver_operations_total", operation="Destroy", error="1") == 1
    assert m("herder_driver_operations_total", operation="SetTags", error="0") == 0


# --------------------------------------------------------------------------- sync


def test_first_sync_sets_loaded_and_notifies() -> None:
    h = Harness()
    assert not h.pool.loaded
    h.sync()
    assert h.pool.loaded
    assert h.notifications == 1


def test_disappeared_worker_is_removed_and_counted() -> None:
    h = Harness()
    iid = h.create_booted()
    h.cloud.vms[iid].destroyed = True
    h.sync()
    assert h.state(iid) == "gone"
    assert h.metric("herder_instances_disappeared_total", state="idle") == 1
    assert h.executors[iid].closed == 1


def test_shutdown_worker_is_destroyed_again_after_timeout_shutdown() -> None:
    h = Harness(timeout_shutdown=10)
    h.cloud.sticky_destroy = True
    iid = h.create_booted()
    h.pool.kill_instance(iid, "test")
    h.idle()
    vm = h.cloud.vms[iid]
    assert vm.destroy_calls == 1
    h.runtime.advance(10)
    h.sync()
    assert vm.destroy_calls == 1  # not more than timeout_shutdown yet
    h.runtime.advance(1)
    h.sync()
    assert vm.destroy_calls == 2
    h.cloud.sticky_destroy = False
    vm.destroyed = True
    h.runtime.advance(4)
    h.sync()
    assert h.state(iid) == "gone"
    assert h.metric("herder_instances_disappeared_total", state="shutdown") == 1
    assert h.metric("herder_instances_time_from_shutdown_request_to_disappearance_seconds_sum") == 4
    assert h.metric("herder_boot_outcomes_total", outcome="disappeared") == 0  # success first


def test_sync_requested_during_a_sync_runs_after_it() -> None:
    h = Harness()
    h.pool.sync_now()
    h.pool.sync_now()
    h.pool.sync_now()
    h.idle()
    assert h.cloud.count("list") == 2


def test_periodic_sync_and_stop() -> None:
    h = Harness(sync_interval=60)
    h.pool.start()
    h.runtime.advance(150)
    assert h.cloud.times("list") == [h.runtime.now() - 150 + t for t in (0, 60, 120)]
    h.pool.stop()
    h.runtime.advance(300)
    assert h.cloud.count("list") == 3


def test_sync_refreshes_tags_and_keeps_listed_workers() -> None:
    h = Harness()
    iid = h.create_booted()
    h.pool.set_idle_behavior(iid, IdleBehavior.HOLD)
    h.idle()
    assert h.cloud.vms[iid].tags["HerderIdleBehavior"] == "hold"
    h.cloud.vms[iid].tags["HerderIdleBehavior"] = "run"  # lost by the cloud
    h.sync()
    h.idle()
    assert h.cloud.vms[iid].tags["HerderIdleBehavior"] == "hold"
    assert h.state(iid) == "idle"


def test_listed_before_create_returns_is_booting() -> None:
    h = Harness()
    h.pool.sync_now()  # the listing runs before the create call
    h.pool.create(h.types["small"])
    secret = next(iter(h.pool._creating))
    vm = h.cloud.add_vm(h.tags(secret=secret))
    h.cloud.create_errors.append(RuntimeError("boom"))
    h.idle()
    assert h.state(vm.id) == "booting"


# --------------------------------------------------------------------------- adoption


def test_adoption_after_restart() -> None:
    runtime = VirtualRuntime()
    cloud = FakeInstanceSet(runtime)
    h1 = Harness(runtime=runtime, cloud=cloud)
    iid = h1.create_booted()
    h1.pool.start_container(iid, container(1))
    h1.idle()
    h1.pool.set_idle_behavior(iid, IdleBehavior.HOLD)
    h1.idle()
    h1.pool.stop()

    h2 = Harness(runtime=runtime, cloud=cloud, registry=CollectorRegistry())
    h2.pool.start()
    h2.idle()
    w = h2.worker(iid)
    assert w.state == WorkerState.UNKNOWN
    assert w.idle_behavior == IdleBehavior.HOLD
    assert h2.pool.running() == {}
    runtime.advance(h2.config.cloud.probe_interval + 1)
    assert h2.state(iid) == "running"
    assert h2.pool.running() == {C1: 0.0}
    assert h2.reporter.started == [(C1, iid, "small")]
    assert w.last_uuid == C1
    assert h2.metric("herder_boot_outcomes_total", outcome="success") == 1


def test_adopted_instance_with_unknown_type_is_drained() -> None:
    h = Harness()
    vm = h.cloud.add_vm(h.tags(type_name="removed-type"))
    held = h.cloud.add_vm(h.tags(type_name="removed-type", behavior="hold"))
    h.sync()
    assert h.worker(vm.id).idle_behavior == IdleBehavior.DRAIN
    assert h.worker(held.id).idle_behavior == IdleBehavior.HOLD
    assert h.worker(vm.id).instance_type.name == "removed-type"
    h.probe(vm.id)
    assert h.state(vm.id) == "idle"
    h.pool.probe_round()
    assert h.state(vm.id) == "shutdown"  # booted, idle and draining
    assert h.state(held.id) == "unknown"


def test_unknown_worker_shut_down_after_boot_timeout_unless_held() -> None:
    h = Harness(timeout_booting=600)
    vm = h.cloud.add_vm(h.tags())
    held = h.cloud.add_vm(h.tags(behavior="hold"))
    vm.host.boot_ok = held.host.boot_ok = False
    h.pool.start()
    h.runtime.advance(599)
    assert h.state(vm.id) == "unknown"
    h.runtime.advance(20)
    assert h.state(vm.id) == "shutdown"
    assert h.state(held.id) == "unknown"


# --------------------------------------------------------------------------- probes


def test_probe_starts_are_spaced_by_max_probes_per_second() -> None:
    h = Harness(max_probes_per_second=2, probe_interval=10)
    vms = [h.cloud.add_vm(h.tags()) for _ in range(4)]
    h.sync()
    h.pool.probe_round()
    t0 = h.runtime.now()
    h.runtime.advance(5)
    firsts = [vm.host.times[0] for vm in vms]
    assert firsts == [t0, t0 + 0.5, t0 + 1.0, t0 + 1.5]


def test_probe_round_skips_workers_whose_probe_has_not_started() -> None:
    h = Harness(max_probes_per_second=1)
    vms = [h.cloud.add_vm(h.tags()) for _ in range(3)]
    h.sync()
    h.pool.probe_round()
    h.pool.probe_round()  # all three still pending (two not started): nothing added
    h.runtime.advance(10)
    assert [vm.host.verbs().count("boot") for vm in vms] == [1, 1, 1]


def test_probe_ticks_with_jitter_and_idle_shutdown() -> None:
    h = Harness(probe_interval=10, timeout_idle=60)
    iid = h.create_booted()
    start = h.runtime.now()
    h.pool.start()
    h.runtime.advance(55)
    host = h.cloud.vms[iid].host
    times = [
        t - start
        for (c, _), t in zip(host.commands, host.times, strict=True)
        if "--list" in c and t > start
    ]
    assert len(times) == 5  # ticks at 10, 20, ... 50
    for k, t in enumerate(times, start=1):
        assert 10 * k <= t < 10 * k + 10 / 23  # jitter within ProbeInterval/23
    assert len({round(t % 10, 6) for t in times}) > 1  # and it does vary
    assert h.state(iid) == "idle"
    h.runtime.advance(20)
    assert h.state(iid) == "shutdown"
    assert h.metric("herder_boot_outcomes_total", outcome="success") == 1


def test_probe_schedule_is_deterministic_with_seeded_rng() -> None:
    def run() -> list[float]:
        h = Harness(probe_interval=10)
        vm = h.cloud.add_vm(h.tags())
        h.pool.start()
        h.runtime.advance(100)
        return [t - h.runtime.now() for t in vm.host.times]

    assert run() == run()


# --------------------------------------------------------------------------- commands, queries


def test_commands_on_missing_instances() -> None:
    h = Harness()
    with pytest.raises(PoolError, match="no such instance: "):
        h.pool.kill_instance("i-nope", "x")
    with pytest.raises(PoolError, match="no such instance: "):
        h.pool.set_idle_behavior("i-nope", IdleBehavior.HOLD)
    assert not h.pool.shutdown("i-nope")


def test_shutdown_only_booting_or_idle_and_not_held() -> None:
    h = Harness()
    iid = h.create_booted()
    h.pool.set_idle_behavior(iid, IdleBehavior.HOLD)
    assert not h.pool.shutdown(iid)
    h.pool.set_idle_behavior(iid, IdleBehavior.RUN)
    h.pool.start_container(iid, container(1))
    assert not h.pool.shutdown(iid)  # running
    h.pool.kill_instance(iid, "operator")  # ignores state and hold
    assert h.state(iid) == "shutdown"
    assert h.metric("herder_boot_outcomes_total", outcome="aborted") == 0  # success came first
    iid2 = h.create_booted()
    assert h.pool.shutdown(iid2)
    h.idle()
    assert h.cloud.vms[iid2].destroy_calls == 1


def test_drain_and_hold() -> None:
    h = Harness(timeout_idle=60)
    iid = h.create_booted()
    h.pool.start_container(iid, container(1))
    h.idle()
    h.pool.set_idle_behavior(iid, IdleBehavior.DRAIN)
    assert h.state(iid) == "running"  # drain waits for the container
    assert not h.pool.start_container(iid, container(2))
    del h.cloud.vms[iid].host.containers[C1]
    h.probe(iid)
    h.pool.probe_round()
    assert h.state(iid) == "shutdown"

    iid2 = h.create_booted()
    h.pool.set_idle_behavior(iid2, IdleBehavior.HOLD)
    h.runtime.advance(3600)
    h.pool.probe_round()
    h.idle()
    assert h.state(iid2) == "idle"
    h.pool.set_idle_behavior(iid2, IdleBehavior.RUN)  # idle for an hour: goes at once
    assert h.state(iid2) == "shutdown"


def test_drain_booting_worker_shuts_down_at_once() -> None:
    h = Harness()
    h.pool.create(h.types["small"])
    h.idle()
    iid = h.pool.instances()[0].instance
    h.pool.set_idle_behavior(iid, IdleBehavior.DRAIN)
    assert h.state(iid) == "shutdown"


def test_instances_running_and_counts() -> None:
    h = Harness()
    a = h.create_booted("small")
    b = h.create_booted("big")
    h.pool.start_container(b, container(1))
    h.pool.create(h.types["other"])
    views = h.pool.instances()
    assert [(v.instance, v.instance_type) for v in views] == [
        ("", "other"),
        (a, "small"),
        (b, "big"),
    ]
    vb = views[2]
    assert vb.running_container_uuids == [C1]
    assert vb.worker_state == WorkerState.RUNNING
    assert vb.price == 0.4 and vb.provider_instance_type == "p.big"
    assert vb.boot_outcome == "success"
    assert vb.appeared <= vb.last_probe <= vb.state_since == h.runtime.now()
    assert views[1].running_container_uuids == []
    counts = h.pool.count_workers()
    assert counts[WorkerState.IDLE] == 1 and counts[WorkerState.RUNNING] == 1
    assert counts[WorkerState.BOOTING] == 0  # pending creates are not workers
    assert h.pool.running() == {C1: 0.0}


def test_listeners_called_outside_the_lock_and_unsubscribe() -> None:
    h = Harness()
    held: list[bool] = []

    def listener() -> None:
        held.append(h.pool._lock.locked())

    unsubscribe = h.pool.subscribe(listener)
    h.sync()
    assert held == [False]
    unsubscribe()
    h.pool.create(h.types["small"])
    h.idle()
    assert held == [False]


def test_check_health() -> None:
    Harness().pool.check_health()
    with pytest.raises(PoolError, match="error loading runner binary"):
        Harness(runner_data=b"").pool.check_health()


# --------------------------------------------------------------------------- metrics


def test_fleet_metrics() -> None:
    h = Harness()
    a = h.create_booted("small")
    b = h.create_booted("big")
    h.pool.start_container(b, container(1))
    h.idle()
    held = h.create_booted("small")
    h.pool.set_idle_behavior(held, IdleBehavior.HOLD)
    gone = h.create_booted("other")
    h.cloud.sticky_destroy = True
    h.pool.kill_instance(gone, "x")
    h.cloud.add_vm(h.tags(type_name="small"))
    h.sync()
    m = h.metric
    assert m("herder_containers_running") == 1
    assert m("herder_instances_total", category="inuse", instance_type="big") == 1
    assert m("herder_instances_total", category="idle", instance_type="small") == 1
    assert m("herder_instances_total", category="hold", instance_type="small") == 1
    assert m("herder_instances_total", category="unknown", instance_type="small") == 1
    assert m("herder_instances_total", category="shutdown", instance_type="other") == 1
    assert m("herder_instances_total", category="idle", instance_type="other") == 0
    assert m("herder_instances_total", category="booting", instance_type="big") == 0
    assert m("herder_instances_price", category="inuse") == 0.4
    assert m("herder_instances_price", category="shutdown") == 0.1
    assert m("herder_vcpus_total", category="inuse") == 8
    assert m("herder_memory_bytes_total", category="idle") == 4 << 30
    assert m("herder_boot_outcomes_total", outcome="success") == 4
    assert m("herder_instances_run_probe_duration_seconds_count", outcome="success") == 4
    assert a


def test_probe_age_metrics() -> None:
    h = Harness()
    assert h.metric("herder_probe_age_seconds_max") == 0
    a = h.create_booted()
    h.runtime.advance(10)
    b = h.create_booted()
    h.runtime.advance(10)
    c = h.create_booted()
    h.runtime.advance(5)
    assert h.metric("herder_probe_age_seconds_max") == 25
    assert h.metric("herder_probe_age_seconds_median") == 15
    assert a and b and c


def test_time_to_ssh_and_ready_with_secret_verification() -> None:
    h = Harness(verify=True)
    h.pool.create(h.types["small"])
    h.idle()
    iid = h.pool.instances()[0].instance
    h.runtime.advance(30)
    h.probe(iid)
    assert h.state(iid) == "idle"
    assert h.metric("herder_instances_time_to_ssh_seconds_sum") == 30
    assert h.metric("herder_instances_time_to_ssh_seconds_count") == 1
    assert h.metric("herder_instances_time_to_ready_for_container_seconds_count") == 1


def test_bad_instance_secret_never_boots() -> None:
    h = Harness(verify=True)
    h.pool.create(h.types["small"])
    h.idle()
    iid = h.pool.instances()[0].instance
    h.cloud.vms[iid].host.secret_file = "0" * 40
    h.probe(iid)
    assert h.state(iid) == "booting"
    assert h.cloud.vms[iid].host.commands == []


# --------------------------------------------------------------------------- boot back-off


def _fail_a_boot(h: Harness, type_name: str = "small") -> str:
    """Create an instance of the type that never passes its boot probe, until it is shut down."""
    before = set(h.pool._workers)
    assert h.pool.create(h.types[type_name]) is not None
    h.idle()
    (iid,) = set(h.pool._workers) - before
    h.cloud.vms[iid].host.boot_ok = False
    h.runtime.advance(101)
    h.probe(iid)
    assert h.state(iid) == "shutdown"
    return iid


def test_boot_failures_pause_creates_of_that_type_growing_and_capped() -> None:
    h = Harness(timeout_booting=100, boot_failure_backoff=60, boot_failure_backoff_max=200)
    small = h.types["small"]
    pauses = []
    for failures in (1, 2, 3, 4):
        _fail_a_boot(h)
        backoff = h.pool.boot_backoff(small)
        assert backoff is not None and backoff.failures == failures
        pauses.append(backoff.until - h.runtime.now())
        assert h.pool.create(small) is None  # no new instance of the type meanwhile
        assert h.pool.boot_backoff(h.types["big"]) is None  # other types are not paused
        n = h.notifications
        h.runtime.advance(pauses[-1] - 1)
        assert h.pool.create(small) is None
        h.runtime.advance(1)
        assert h.pool.boot_backoff(small) is None
        assert h.notifications > n  # the scheduler is woken when the pause ends
    assert pauses == [60, 120, 200, 200]
    sample = h.registry.get_sample_value
    assert sample("herder_boot_failures_in_a_row", {"instance_type": "small"}) == 4
    assert sample("herder_boot_backoffs_total", {"instance_type": "small"}) == 4


def test_an_instance_that_boots_ends_the_back_off() -> None:
    h = Harness(timeout_booting=100, boot_failure_backoff=60)
    small = h.types["small"]
    _fail_a_boot(h)
    h.runtime.advance(60)
    _fail_a_boot(h)
    h.runtime.advance(120)
    h.create_booted()
    assert h.pool.boot_backoff(small) is None
    assert (
        h.registry.get_sample_value("herder_boot_failures_in_a_row", {"instance_type": "small"})
        == 0
    )
    _fail_a_boot(h)  # counting starts again from one
    backoff = h.pool.boot_backoff(small)
    assert backoff is not None and backoff.failures == 1


def test_aborted_boots_and_a_disabled_back_off_do_not_pause() -> None:
    h = Harness(timeout_booting=100, boot_failure_backoff=60)
    h.pool.create(h.types["small"])
    h.idle()
    (iid,) = h.pool._workers
    assert h.pool.shutdown(iid)  # the scheduler no longer needs it: not the type's fault
    assert h.pool.boot_backoff(h.types["small"]) is None
    off = Harness(timeout_booting=100, boot_failure_backoff=0)
    _fail_a_boot(off)
    assert off.pool.boot_backoff(off.types["small"]) is None
    assert off.pool.create(off.types["small"]) is not None


# --------------------------------------------------------------------------- idle probing


def list_times(h: Harness, iid: str, after: float) -> list[float]:
    host = h.cloud.vms[iid].host
    return [
        t - after
        for (c, _), t in zip(host.commands, host.times, strict=True)
        if "--list" in c and t > after
    ]


@pytest.fixture
def resident(monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    """Whether the workers' resident runner streams are up (the fake executor has none)."""
    from herder.engine.worker.runner_client import RunnerClient

    up = {"up": True}
    monkeypatch.setattr(RunnerClient, "resident", property(lambda self: up["up"]))
    return up


def test_idle_worker_with_a_resident_runner_is_probed_every_idle_probe_interval(
    resident: dict[str, bool],
) -> None:
    h = Harness(probe_interval=10, idle_probe_interval=60, timeout_idle=1000)
    iid = h.create_booted()
    start = h.runtime.now()
    h.pool.start()
    h.runtime.advance(125)
    times = list_times(h, iid, start)
    assert len(times) == 2  # the rounds at 60 and 120, not all twelve
    assert 60 <= times[0] < 61 and 120 <= times[1] < 121
    assert h.state(iid) == "idle"


def test_idle_worker_is_probed_every_round_once_its_stream_is_down(
    resident: dict[str, bool],
) -> None:
    h = Harness(probe_interval=10, idle_probe_interval=60, timeout_idle=1000)
    iid = h.create_booted()
    start = h.runtime.now()
    h.pool.start()
    h.runtime.advance(25)
    assert list_times(h, iid, start) == []
    resident["up"] = False  # the connection died, and with it the stream
    h.runtime.advance(20)
    assert len(list_times(h, iid, start)) == 2  # the rounds at 30 and 40


def test_busy_worker_is_probed_every_round_whatever_its_stream(
    resident: dict[str, bool],
) -> None:
    h = Harness(probe_interval=10, idle_probe_interval=60, timeout_idle=1000)
    iid = h.create_booted()
    h.pool.start_container(iid, container(1))
    h.idle()
    start = h.runtime.now()
    h.pool.start()
    h.runtime.advance(35)
    assert len(list_times(h, iid, start)) == 3
    assert h.state(iid) == "running"


@pytest.mark.parametrize("idle_interval", [0, 10])
def test_idle_probe_interval_not_above_probe_interval_probes_every_round(
    resident: dict[str, bool], idle_interval: float
) -> None:
    h = Harness(probe_interval=10, idle_probe_interval=idle_interval, timeout_idle=1000)
    iid = h.create_booted()
    start = h.runtime.now()
    h.pool.start()
    h.runtime.advance(35)
    assert len(list_times(h, iid, start)) == 3

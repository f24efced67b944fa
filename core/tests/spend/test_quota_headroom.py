"""Quota headroom: the scheduler reads the cloud's quotas and creates nothing into a full one."""

from __future__ import annotations

import logging
from typing import Any

from engine_harness import Engine, sim_config
from prometheus_client import generate_latest

from herder.config import Config
from herder.engine.scheduler.quotas import QuotaHeadroom
from herder.model import ContainerState, GPUSpec, InstanceType
from herder.plugin.cloud import NotImplementedByDriver, Quota, QuotaUnit

TYPES = {
    "c4": {"vcpus": 4, "ram": "16GiB", "price": 1.0},
    "d4": {"vcpus": 4, "ram": "16GiB", "price": 1.2},
}


def quota_config(quotas: dict[str, int] | None = None, **cloud: Any) -> Config:
    """The sim cloud of TYPES with vCPU quotas per group (first letter of the type)."""
    params = {"quota_vcpus": quotas or {"c": 8}}
    return sim_config(TYPES, driver_parameters=params, **cloud)


def test_the_scheduler_stops_short_of_a_full_quota_and_names_it():
    eng = Engine(quota_config(quota_refresh_interval="30s"))
    a, b, c = (eng.submit(600, vcpus=4, name=n) for n in "abc")
    eng.run_for(60)
    # Two c4 (8 vCPUs) fill group "c"; the third container goes to d4, of another group.
    types = sorted(v.instance_type for v in eng.instances())
    assert types == ["c4", "c4", "d4"]
    assert eng.stats.calls[("create", "quota")] == 0  # never created into the full quota
    assert all(eng.container(u).state == ContainerState.RUNNING for u in (a, b, c))
    eng.stop()


def test_a_container_that_only_the_full_quota_serves_waits_saying_which_quota():
    eng = Engine(quota_config({"c": 4, "d": 0}, quota_refresh_interval="30s"))
    first = eng.submit(300, vcpus=4, name="first")
    eng.run_for(40)
    second = eng.submit(60, vcpus=4, name="second")
    eng.run_for(20)
    assert eng.stats.calls[("create", "quota")] == 0
    assert eng.container(second).state in (ContainerState.QUEUED, ContainerState.LOCKED)
    assert eng.status(second) == (
        "Waiting in queue at position 1.  Cloud quota full: sim vCPUs of group c "
        "(sim-c-vcpus): 4 of 4 vcpus in use, type c4 needs 4."
    )
    (state,) = [s for s in eng.disp.quota_states() if s.quota.group == "c"]
    assert (state.quota.limit, state.quota.usage, state.herder, state.wanted) == (4, 4, 4, 4)
    metrics = generate_latest(eng.disp.registry).decode()
    assert 'herder_quota_limit{quota="sim-c-vcpus",unit="vcpus"} 4.0' in metrics
    assert 'herder_quota_usage{quota="sim-c-vcpus",unit="vcpus"} 4.0' in metrics
    assert 'herder_quota_herder{quota="sim-c-vcpus",unit="vcpus"} 4.0' in metrics
    # The first finishes, its instance goes, the next read sees room: the second runs.
    eng.run_until_done([first, second], limit=1200)
    assert eng.container(second).exit_code == 0
    assert eng.stats.calls[("create", "quota")] == 0
    eng.stop()


def test_quotas_are_read_at_a_bounded_rate():
    eng = Engine(quota_config(quota_refresh_interval="60s"))
    eng.submit(30, vcpus=4)
    eng.run_for(600)
    reads = eng.stats.calls[("quotas", "ok")]
    assert 5 <= reads <= 11  # one a minute at most, however many passes ran
    eng.stop()


def test_without_quota_reading_the_engine_behaves_as_before():
    eng = Engine(sim_config(TYPES))
    eng.submit(30, vcpus=4)
    eng.run_for(60)
    assert eng.stats.calls[("quotas", "ok")] == 0
    assert eng.disp.quota_states() == []
    eng.stop()


def _type(name: str, vcpus: int, gpus: int = 0) -> InstanceType:
    return InstanceType(
        name=name,
        provider_type=name,
        vcpus=vcpus,
        ram=1,
        price=1.0,
        gpu=GPUSpec(device_count=gpus),
    )


def test_headroom_counts_creates_until_the_next_read_and_survives_failed_reads():
    answers: list[list[Quota] | Exception] = [
        [Quota(group="g", name="Q", limit=10, usage=2)],
        RuntimeError("throttled"),
        [Quota(group="g", name="Q", limit=10, usage=10)],
    ]

    def read() -> list[Quota]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    h = QuotaHeadroom(
        read=read, group_of=lambda it: "g", refresh_interval=60, logger=logging.getLogger("t")
    )
    four = _type("four", 4)
    h.refresh(0)
    assert h.blocking(four) is None
    h.created(four)
    h.created(four)  # 2 + 8 of 10: no room for another 4
    assert h.blocking(four) == "Q: 10 of 10 vcpus in use, type four needs 4"
    h.refresh(30)  # too soon: not read
    assert len(answers) == 2
    h.refresh(60)  # fails: the last answer and the pending creates stay
    assert h.blocking(four) is not None
    h.refresh(120)
    assert h.states([], {})[0].pending == 0
    assert h.blocking(four) is not None  # usage 10 of 10 as read


def test_gpu_quotas_count_gpus_and_a_driver_without_quotas_switches_reading_off():
    q = Quota(group="g", name="T4", limit=4, usage=3, unit=QuotaUnit.GPUS)
    assert q.need(_type("t4x2", 8, gpus=2)) == 2
    calls = []

    def read() -> list[Quota]:
        calls.append(1)
        raise NotImplementedByDriver()

    h = QuotaHeadroom(
        read=read, group_of=lambda it: "g", refresh_interval=1, logger=logging.getLogger("t")
    )
    h.refresh(0)
    h.refresh(10)
    assert calls == [1] and not h.enabled

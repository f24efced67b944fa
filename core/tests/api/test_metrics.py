"""The work metrics (queue depth, wait time, outcomes, fleet cost), read through ``/metrics``
as Prometheus scrapes them, while containers and instances come and go on the sim driver."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from herder.engine.metrics import finish_outcome, fleet_cost_per_hour
from herder.model import Container, ContainerSpec, ContainerState, IdleBehavior, InstanceView
from herder.model import WorkerState as WS


def scrape(engine) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    reply = engine.request("GET", "/metrics")
    assert reply.status == 200, reply.body
    out = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def depth(m, state: str) -> float:
    return m[("herder_queue_containers", (("state", state),))]


def finished(m, outcome: str) -> float:
    return m[("herder_containers_finished_total", (("outcome", outcome),))]


def test_metrics_are_listed_without_any_work(engine):
    m = scrape(engine)
    for state in ("Queued", "Locked", "Running"):
        assert depth(m, state) == 0
    for outcome in ("complete_ok", "complete_failed", "cancelled"):
        assert finished(m, outcome) == 0
    assert m[("herder_queue_wait_seconds_count", ())] == 0
    assert m[("herder_instances_cost_per_hour", ())] == 0


def test_values_move_as_containers_and_instances_come_and_go(engine):
    ok = engine.submit(command=["sim", "60", "0"])["uuid"]
    bad = engine.submit(command=["sim", "60", "3"])["uuid"]
    doomed = engine.submit(command=["sim", "600", "0"], priority=0)["uuid"]
    m = scrape(engine)
    assert depth(m, "Queued") == 3
    assert m[("herder_queue_wait_seconds_count", ())] == 0

    engine.advance(30)  # instances boot, both runnable containers start
    m = scrape(engine)
    assert depth(m, "Running") == 2 and depth(m, "Queued") == 1
    assert m[("herder_queue_wait_seconds_count", ())] == 2
    # Both waited for an instance to boot: more than nothing, less than the time elapsed.
    assert 0 < m[("herder_queue_wait_seconds_sum", ())] <= 60
    prices = [i["price"] for i in engine.request("GET", "/api/v1/instances").json["items"]]
    assert prices and all(p > 0 for p in prices)
    assert m[("herder_instances_cost_per_hour", ())] == pytest.approx(sum(prices))

    assert engine.request("POST", f"/api/v1/containers/{doomed}/cancel", {}).status == 200
    engine.advance(120)  # both finish; the idle instances are shut down and disappear
    m = scrape(engine)
    assert engine.container(ok)["state"] == "Complete"
    assert engine.container(bad)["exit_code"] == 3
    assert finished(m, "complete_ok") == 1
    assert finished(m, "complete_failed") == 1
    assert finished(m, "cancelled") == 1
    assert depth(m, "Running") == 0 and depth(m, "Queued") == 0
    assert m[("herder_instances_cost_per_hour", ())] == 0


def test_a_finished_container_is_counted_once(engine):
    uuid = engine.submit(command=["sim", "5", "0"])["uuid"]
    engine.advance(60)
    engine.dispatcher.queue.finish(uuid, 0)  # a late duplicate report: a no-op
    assert engine.request("POST", f"/api/v1/containers/{uuid}/cancel", {}).status == 409
    assert finished(scrape(engine), "complete_ok") == 1


def test_unsatisfiable_submission_counts_as_cancelled(engine):
    reply = engine.request(
        "POST", "/api/v1/containers", {"command": ["x"], "runtime_constraints": {"vcpus": 4096}}
    )
    assert reply.status == 201 and reply.json["state"] == "Cancelled"
    assert finished(scrape(engine), "cancelled") == 1


def _view(instance: str, price: float, state: WS) -> InstanceView:
    return InstanceView(instance, "", price, "t", "t", "", 0.0, [], state, IdleBehavior.RUN)


def test_fleet_cost_counts_every_billed_instance_but_not_pending_creates():
    views = [
        _view("", 5.0, WS.BOOTING),  # create in progress: not billed yet
        _view("i-1", 0.5, WS.BOOTING),
        _view("i-2", 0.25, WS.SHUTDOWN),  # billed until it is gone
        _view("i-3", 1.0, WS.RUNNING),
    ]
    assert fleet_cost_per_hour(views) == pytest.approx(1.75)


@pytest.mark.parametrize(
    ("state", "exit_code", "outcome"),
    [
        (ContainerState.COMPLETE, 0, "complete_ok"),
        (ContainerState.COMPLETE, 1, "complete_failed"),
        (ContainerState.CANCELLED, None, "cancelled"),
        (ContainerState.RUNNING, None, None),
    ],
)
def test_finish_outcome(state, exit_code, outcome):
    ctr = Container(
        "zzzzz-dz642-000000000000000", state, 1, ContainerSpec(("x",)), 0.0, exit_code=exit_code
    )
    assert finish_outcome(ctr) == outcome

"""Spend routes: quotas, budget and costs, and the instance fields spend control adds."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from herder.app.api import schema
from herder.config import BudgetConfig

from .conftest import Engine, sim_config, start_engine, stop_engine


@pytest.fixture
def quota_engine() -> Iterator[Engine]:
    """Small instances (2 vCPUs, group "s") in a 2-vCPU quota, read every 10 s."""
    base = sim_config()
    params = {**base.cloud.driver_parameters, "quota_vcpus": {"s": 2}}
    eng = start_engine(sim_config(driver_parameters=params, quota_refresh_interval=10.0))
    try:
        yield eng
    finally:
        stop_engine(eng)


@pytest.fixture
def budget_engine() -> Iterator[Engine]:
    eng = start_engine(sim_config(budget=BudgetConfig(period="day", soft_limit=0.001)))
    try:
        yield eng
    finally:
        stop_engine(eng)


def _small(**spec: Any) -> dict[str, Any]:
    return {
        "command": ["sim", "600", "0"],
        "runtime_constraints": {"vcpus": 2, "ram": "1GiB"},
        **spec,
    }


def test_quotas_show_limit_usage_herders_share_and_what_waits(quota_engine: Engine) -> None:
    eng = quota_engine
    eng.submit(**_small())
    eng.advance(20)
    second = eng.submit(**_small())["uuid"]
    eng.advance(15)
    reply = eng.request("GET", "/api/v1/quotas")
    assert reply.status == 200, reply.body
    quotas = schema.QuotaList.model_validate(reply.json)
    assert quotas.enabled
    (q,) = quotas.items
    assert (q.name, q.group, q.unit, q.limit, q.usage, q.herder) == (
        "sim-s-vcpus",
        "s",
        "vcpus",
        2.0,
        2.0,
        2.0,
    )
    assert q.wanted == 2.0 and q.headroom == 0.0
    assert q.read_at is not None and q.read_at.endswith("Z")
    status = eng.container(second)["scheduling_status"]
    assert "Cloud quota full: sim vCPUs of group s (sim-s-vcpus): 2 of 2 vcpus" in status


def test_quotas_of_a_driver_that_cannot_read_them_are_empty(engine: Engine) -> None:
    reply = engine.request("GET", "/api/v1/quotas")
    assert reply.status == 200
    assert reply.json == {"enabled": False, "items": []}


def test_budget_shows_spend_against_the_limits(budget_engine: Engine) -> None:
    eng = budget_engine
    eng.submit(**_small())
    eng.advance(120)
    reply = eng.request("GET", "/api/v1/budget")
    assert reply.status == 200, reply.body
    budget = schema.BudgetOut.model_validate(reply.json)
    assert budget.period == "day" and budget.soft_limit == 0.001 and budget.hard_limit is None
    assert budget.spent >= 0.001 and budget.soft_reached and not budget.hard_reached
    assert budget.message.startswith("spend this day ")
    assert budget.period_end is not None and budget.period_end.endswith("T00:00:00.000Z")


def test_costs_report_spend_by_period_and_finished_containers(engine: Engine) -> None:
    uuid = engine.submit(command=["sim", "30", "0"])["uuid"]
    engine.advance(400)
    assert engine.container(uuid)["state"] == "Complete"
    reply = engine.request("GET", "/api/v1/costs?period=hour&last=2")
    assert reply.status == 200, reply.body
    report = schema.CostReportOut.model_validate(reply.json)
    assert report.period == "hour" and len(report.by_period) == 2
    assert report.total > 0
    assert report.total == pytest.approx(sum(b.spent for b in report.by_period))
    assert report.containers.finished == 1
    assert report.containers.per_container == pytest.approx(report.containers.total)


def test_costs_refuse_an_unknown_period_naming_it(engine: Engine) -> None:
    reply = engine.request("GET", "/api/v1/costs?period=week")
    assert reply.status == 400
    assert reply.json["field"] == "period"


def test_instances_say_why_they_drain(engine: Engine) -> None:
    engine.submit(command=["sim", "600", "0"])
    engine.advance(20)
    [inst] = engine.request("GET", "/api/v1/instances").json["items"]
    assert inst["drain_cause"] == "" and "paid_until" in inst and "reason" in inst
    assert inst["market_price"] is None  # the example's sim reports no price history
    reply = engine.request(
        "POST", f"/api/v1/instances/{inst['instance']}/drain", {"reason": "maintenance"}
    )
    assert reply.status == 200
    [inst] = engine.request("GET", "/api/v1/instances").json["items"]
    assert inst["drain_cause"] == "operator"
    assert inst["idle_behavior"] == "drain"


def test_labels_at_submit_are_shown_and_group_the_cost_report(engine: Engine) -> None:
    a = engine.submit(command=["sim", "30", "0"], labels={"project": "genomics", "team": "a"})
    b = engine.submit(command=["sim", "60", "0"], labels={"project": "genomics"})
    c = engine.submit(command=["sim", "30", "0"])
    assert a["labels"] == {"project": "genomics", "team": "a"} and c["labels"] == {}
    engine.advance(600)
    costs = [engine.container(x["uuid"])["cost"] for x in (a, b, c)]
    assert all(cost > 0 for cost in costs)
    report = engine.request("GET", "/api/v1/costs").json["containers"]
    assert report["by_label"] == {
        "": pytest.approx(costs[2]),
        "project=genomics": pytest.approx(costs[0] + costs[1]),
        "team=a": pytest.approx(costs[0]),
    }


@pytest.mark.parametrize(
    ("labels", "message"),
    [({"-bad": "x"}, "invalid label key"), ({"k": "a\nb"}, "without control characters")],
)
def test_bad_labels_are_refused_naming_the_field(
    engine: Engine, labels: dict[str, str], message: str
) -> None:
    reply = engine.request("POST", "/api/v1/containers", {"command": ["true"], "labels": labels})
    assert reply.status == 400
    assert reply.json["field"].startswith("labels") and message in reply.json["error"]

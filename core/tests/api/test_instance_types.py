"""``GET /api/v1/instance-types``: the types herder chooses from, cheapest first, with the spot
price a preemptible type's running instance reports."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from herder.app.api import schema

from .conftest import Engine, sim_config, start_engine, stop_engine


@pytest.fixture
def spot_engine() -> Iterator[Engine]:
    config = sim_config(driver_parameters={"seed": 1, "boot_delay": [3, 8], "price_history": True})
    containers = config.containers.model_copy(update={"preemptible_price_factor": 0.5})
    eng = start_engine(config.model_copy(update={"containers": containers}))
    yield eng
    stop_engine(eng)


def test_instance_types_cheapest_first_without_spot_prices_when_nothing_runs(engine):
    reply = engine.request("GET", "/api/v1/instance-types")
    assert reply.status == 200, reply.body
    items = schema.InstanceTypeList.model_validate(reply.json).items
    assert [t.name for t in items] == ["small", "medium", "large", "xlarge"]
    assert items[0].vcpus == 2 and items[0].ram == 4 * 1024**3 and items[0].price == 0.05
    assert all(t.spot_price is None and not t.preemptible for t in items)
    assert engine.request("GET", "/api/v1/instance-types", token="").status == 401


def test_a_running_preemptible_instance_reports_its_spot_price(spot_engine):
    engine = spot_engine
    uuid = engine.submit(command=["sim", "600", "0"], scheduling_parameters={"preemptible": True})[
        "uuid"
    ]
    for _ in range(60):
        if engine.container(uuid)["state"] == "Running":
            break
        engine.advance(1)
    ctr = engine.container(uuid)
    assert ctr["state"] == "Running"
    items = {t["name"]: t for t in engine.request("GET", "/api/v1/instance-types").json["items"]}
    running = items[ctr["instance_type"]]
    assert running["preemptible"] and running["spot_price"] == running["price"]
    assert all(t["spot_price"] is None for name, t in items.items() if name != running["name"])

"""Instance routes: the list (SPEC §10.2 InstanceView plus price, time in state, last probe,
boot outcome) and the hold / drain / run / kill actions."""

from __future__ import annotations

import pytest

from herder.app.api import schema


def _instances(engine) -> list[dict]:
    reply = engine.request("GET", "/api/v1/instances")
    assert reply.status == 200, reply.body
    schema.InstanceList.model_validate(reply.json)
    return reply.json["items"]


@pytest.fixture
def busy(engine):
    """One instance running one long container: (engine, instance id, container uuid)."""
    uuid = engine.submit(command=["sim", "600", "0"])["uuid"]
    engine.advance(20)
    [inst] = _instances(engine)
    assert inst["worker_state"] == "running"
    return engine, inst["instance"], uuid


def test_pending_create_is_listed_without_an_id(engine):
    engine.submit()
    engine.runtime.run_until_idle()
    items = _instances(engine)
    assert items, "a create was requested"
    assert all(i["worker_state"] == "booting" for i in items)


def test_instance_fields(busy):
    engine, instance_id, uuid = busy
    engine.advance(5)
    [inst] = _instances(engine)
    assert inst["instance"] == instance_id
    assert inst["address"]
    assert inst["instance_type"] == "small"
    assert inst["provider_instance_type"]
    assert inst["price"] == pytest.approx(0.05)
    assert inst["running_container_uuids"] == [uuid]
    assert inst["idle_behavior"] == "run"
    assert inst["boot_outcome"] == "success"
    assert inst["last_probe"].endswith("Z") and inst["state_since"].endswith("Z")
    assert inst["appeared"].endswith("Z")
    assert 5 <= inst["time_in_state"] < 30


def test_hold_keeps_an_idle_instance_and_run_releases_it(busy):
    engine, instance_id, uuid = busy
    reply = engine.request("POST", f"/api/v1/instances/{instance_id}/hold", {"reason": "debug"})
    assert reply.status == 200
    assert reply.json == {"instance": instance_id, "action": "hold"}
    engine.request("POST", f"/api/v1/containers/{uuid}/cancel", {})
    engine.advance(120)  # far beyond timeout_idle
    [inst] = _instances(engine)
    assert inst["idle_behavior"] == "hold" and inst["worker_state"] == "idle"
    assert engine.request("POST", f"/api/v1/instances/{instance_id}/run").status == 200
    engine.advance(60)
    assert all(
        i["instance"] != instance_id or i["worker_state"] == "shutdown" for i in _instances(engine)
    )


def test_drain_shuts_down_once_idle_and_starts_nothing_new(busy):
    engine, instance_id, uuid = busy
    assert engine.request("POST", f"/api/v1/instances/{instance_id}/drain", {}).status == 200
    [inst] = _instances(engine)
    assert inst["idle_behavior"] == "drain" and inst["running_container_uuids"] == [uuid]
    engine.request("POST", f"/api/v1/containers/{uuid}/cancel", {})
    engine.advance(30)
    assert all(
        i["instance"] != instance_id or i["worker_state"] == "shutdown" for i in _instances(engine)
    )


def test_kill_shuts_down_a_busy_instance(busy):
    engine, instance_id, _ = busy
    reply = engine.request("POST", f"/api/v1/instances/{instance_id}/kill", {"reason": "bad"})
    assert reply.status == 200
    states = {i["instance"]: i["worker_state"] for i in _instances(engine)}
    assert states.get(instance_id, "shutdown") == "shutdown"


@pytest.mark.parametrize("action", ["hold", "drain", "run", "kill"])
def test_actions_on_unknown_instances_are_404(engine, action):
    reply = engine.request("POST", f"/api/v1/instances/no-such-instance/{action}", {})
    assert reply.status == 404
    assert reply.json["error"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"reason": 5}, "reason"),
        ({"reason": "x" * 5000}, "reason"),
        ({"reason": "x", "force": True}, "force"),
    ],
)
def test_action_bodies_are_validated(busy, body, field):
    engine, instance_id, _ = busy
    reply = engine.request("POST", f"/api/v1/instances/{instance_id}/kill", body)
    assert reply.status == 400
    assert reply.json["field"] == field
    [inst] = _instances(engine)
    assert inst["worker_state"] == "running"  # nothing was done


def test_instance_ids_with_odd_characters_are_refused_or_not_found(engine):
    assert engine.request("POST", "/api/v1/instances/%20/hold").status == 400
    assert engine.request("POST", "/api/v1/instances/a%00b/hold").status == 400
    assert engine.request("POST", "/api/v1/instances/" + "x" * 300 + "/hold").status == 400
    assert engine.request("POST", "/api/v1/instances/%C3%A9t%C3%A9/hold").status == 404

"""Health, metrics, plugins, and the OpenAPI document."""

from __future__ import annotations

import json

from herder.app.api import schema

from .conftest import served_routes

#: The API's operations: a route added or lost changes this list on purpose.
OPERATIONS = {
    ("POST", "/api/v1/containers"),
    ("POST", "/api/v1/containers/batch"),
    ("POST", "/api/v1/containers/cancel"),
    ("POST", "/api/v1/containers/array"),
    ("GET", "/api/v1/containers"),
    ("GET", "/api/v1/containers/{uuid}"),
    ("POST", "/api/v1/containers/{uuid}/cancel"),
    ("POST", "/api/v1/containers/{uuid}/priority"),
    ("GET", "/api/v1/containers/{uuid}/log"),
    ("GET", "/api/v1/instances"),
    ("GET", "/api/v1/instance-types"),
    ("POST", "/api/v1/instances/{instance_id}/hold"),
    ("POST", "/api/v1/instances/{instance_id}/drain"),
    ("POST", "/api/v1/instances/{instance_id}/run"),
    ("POST", "/api/v1/instances/{instance_id}/kill"),
    ("GET", "/api/v1/health"),
    ("GET", "/api/v1/plugins"),
    ("GET", "/api/v1/openapi.json"),
    ("GET", "/api/v1/summary"),
    ("GET", "/api/v1/quotas"),
    ("GET", "/api/v1/budget"),
    ("GET", "/api/v1/costs"),
    ("GET", "/metrics"),
    ("GET", "/"),
    ("GET", "/static/{name}"),
}


def test_health_needs_no_token(engine):
    reply = engine.request("GET", "/api/v1/health", token="")
    assert reply.status == 200
    assert reply.json["health"] == "OK"


def test_health_reports_an_unhealthy_pool(engine, monkeypatch):
    def broken() -> None:
        raise RuntimeError("error loading runner binary")

    monkeypatch.setattr(engine.dispatcher.pool, "check_health", broken)
    reply = engine.request("GET", "/api/v1/health", token="")
    assert reply.status == 503
    assert reply.json == {"health": "ERROR", "error": "error loading runner binary"}


def test_health_works_without_a_configured_token(unconfigured):
    assert unconfigured.request("GET", "/api/v1/health", token="").status == 200


def test_metrics_are_prometheus_text_and_move(engine):
    reply = engine.request("GET", "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain")
    text = reply.body.decode()
    assert "# TYPE herder_" in text
    assert "arvados" not in text

    def boots() -> float:
        for line in engine.request("GET", "/metrics").body.decode().splitlines():
            if line.startswith('herder_boot_outcomes_total{outcome="success"}'):
                return float(line.split()[-1])
        raise AssertionError("no boot outcome metric")

    before = boots()
    engine.submit()
    engine.advance(20)
    assert boots() == before + 1


def test_plugins_lists_the_builtin_plugin(engine):
    reply = engine.request("GET", "/api/v1/plugins")
    assert reply.status == 200
    schema.PluginList.model_validate(reply.json)
    names = {r["name"] for p in reply.json["items"] for r in p["registrations"]}
    assert "sim" in names or "loopback" in names or names


def _resolve(doc: dict, ref: str) -> dict:
    assert ref.startswith("#/")
    node = doc
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def _refs(node) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_openapi_document_lists_every_route(engine):
    reply = engine.request("GET", "/api/v1/openapi.json")
    assert reply.status == 200
    doc = json.loads(reply.body)
    assert doc["openapi"] == "3.1.0"
    listed = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    assert listed == OPERATIONS
    operation_ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(operation_ids) == len(set(operation_ids))
    for ref in _refs(doc):
        assert _resolve(doc, ref), ref
    health = doc["paths"]["/api/v1/health"]["get"]
    assert health["security"] == []
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    submit = doc["paths"]["/api/v1/containers"]["post"]
    assert submit["security"] == [{"bearer": []}]
    assert not any("422" in op["responses"] for ops in doc["paths"].values() for op in ops.values())
    body = _resolve(doc, submit["requestBody"]["content"]["application/json"]["schema"]["$ref"])
    assert body["additionalProperties"] is False
    assert "command" in body["required"]
    ram = _resolve(doc, body["properties"]["runtime_constraints"]["$ref"])["properties"]["ram"]
    assert {s["type"] for s in ram["oneOf"]} == {"integer", "string"}
    assert set(submit["responses"]) >= {"201", "400", "401", "403", "413"}
    listing = doc["paths"]["/api/v1/containers"]["get"]
    state = next(p for p in listing["parameters"] if p["name"] == "state")
    assert state["schema"]["type"] == "array"
    log = doc["paths"]["/api/v1/containers/{uuid}/log"]["get"]
    assert {p["name"] for p in log["parameters"]} == {"uuid", "offset", "limit"}


def test_a_dispatcher_without_instances_serves_no_instance_routes(engine):
    paths = {r.path for r in served_routes(with_instances=False)}
    assert not any(p.startswith("/api/v1/instances") for p in paths)
    assert not paths & {"/api/v1/quotas", "/api/v1/budget", "/api/v1/costs"}
    assert "/api/v1/containers" in paths

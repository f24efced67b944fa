"""Container routes: submit, list (filters, keyset paging), get, cancel, priority, log."""

from __future__ import annotations

import re

import pytest

from herder.app.api import schema
from herder.app.api.routes import LOG_SETTLE_SECONDS, utf8_prefix
from herder.model import ContainerSpec, ContainerState

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
UNKNOWN = "sim01-dz642-000000000000000"


def test_submit_returns_the_stored_container(engine):
    reply = engine.request(
        "POST",
        "/api/v1/containers",
        {
            "command": ["sim", "30", "0"],
            "image": "alpine",
            "environment": {"GREETING": "hi"},
            "cwd": "/tmp",
            "runtime": "process",
            "runtime_constraints": {"vcpus": 2, "ram": "1GiB", "scratch": 1000},
            "scheduling_parameters": {"max_run_time": "1h30m", "preemptible": False},
            "priority": 7,
            "name": "hello",
        },
    )
    assert reply.status == 201, reply.body
    ctr = reply.json
    schema.ContainerOut.model_validate(ctr)
    assert reply.headers["location"] == f"/api/v1/containers/{ctr['uuid']}"
    assert re.fullmatch(r"sim01-dz642-[a-z0-9]{15}", ctr["uuid"])
    assert ctr["state"] == "Queued"
    assert ctr["runtime_constraints"]["ram"] == 1024**3
    assert ctr["runtime_constraints"]["scratch"] == 1000
    assert ctr["scheduling_parameters"]["max_run_time"] == 5400.0
    assert ctr["environment"] == {"GREETING": "hi"}
    assert ctr["priority"] == 7 and ctr["name"] == "hello" and ctr["runtime"] == "process"
    assert RFC3339.match(ctr["created_at"])
    assert ctr["started_at"] is None and ctr["exit_code"] is None and ctr["attempts"] == 0
    stored = engine.dispatcher.queue.get(ctr["uuid"])
    assert stored is not None and stored.spec.environment == (("GREETING", "hi"),)


def test_batch_submits_every_item_or_none(engine):
    items = [{"command": ["sim", "5", "0"], "name": f"job{i}"} for i in range(3)]
    reply = engine.request("POST", "/api/v1/containers/batch", {"items": items})
    assert reply.status == 201, reply.body
    made = schema.BatchOut.model_validate(reply.json).items
    assert [c.name for c in made] == ["job0", "job1", "job2"]
    assert all(engine.dispatcher.queue.get(c.uuid) is not None for c in made)
    before = engine.dispatcher.queue.counts()
    bad = [*items, {"command": ["true"], "runtime_constraints": {"ram": "lots"}}]
    reply = engine.request("POST", "/api/v1/containers/batch", {"items": bad})
    assert reply.status == 400
    assert reply.json["field"] == "items[3].runtime_constraints.ram"
    assert engine.dispatcher.queue.counts() == before
    for body in ({"items": []}, {}, {"items": [{}]}):
        reply = engine.request("POST", "/api/v1/containers/batch", body)
        assert reply.status == 400, body


def test_array_submits_count_members_and_lists_them(engine):
    body = {"command": ["sim", "5", "0"], "environment": {"X": "y"}, "count": 3}
    reply = engine.request("POST", "/api/v1/containers/array", body)
    assert reply.status == 201, reply.body
    out = schema.ArrayOut.model_validate(reply.json)
    assert [c.environment["HERDER_ARRAY_INDEX"] for c in out.items] == ["0", "1", "2"]
    assert all(c.array_id == out.array_id and c.environment["X"] == "y" for c in out.items)
    engine.submit()
    listed = engine.request("GET", f"/api/v1/containers?array={out.array_id}").json["items"]
    assert sorted(c["uuid"] for c in listed) == sorted(c.uuid for c in out.items)
    for bad in ({**body, "count": 0}, {**body, "count": 10_001}, {"command": ["true"]}):
        reply = engine.request("POST", "/api/v1/containers/array", bad)
        assert reply.status == 400 and reply.json["field"] == "count", bad


def _run_until(engine, done, limit: float = 900.0) -> None:
    waited = 0.0
    while not done():
        assert waited < limit, "gave up waiting on the virtual clock"
        engine.advance(5)
        waited += 5


def test_after_holds_a_container_until_its_dependency_completes(engine):
    first = engine.submit(command=["sim", "30", "0"])["uuid"]
    held = engine.submit(command=["sim", "5", "0"], after=[first])
    assert held["after"] == [first] and held["state"] == "Queued"
    assert first in held["scheduling_status"] and "exit code 0" in held["scheduling_status"]
    engine.advance(1)
    seen = engine.container(held["uuid"])
    assert seen["state"] == "Queued"
    assert seen["scheduling_status"].startswith("This container will not be scheduled")
    assert first in seen["scheduling_status"]
    _run_until(engine, lambda: engine.container(held["uuid"])["state"] == "Complete")
    assert engine.container(first)["state"] == "Complete"
    first_done = engine.container(first)["finished_at"]
    assert engine.container(held["uuid"])["started_at"] >= first_done


def test_after_a_failed_dependency_cancels_with_the_reason(engine):
    failing = engine.submit(command=["sim", "10", "4"])["uuid"]
    waiter = engine.submit(after=[failing])["uuid"]
    _run_until(engine, lambda: engine.container(waiter)["state"] == "Cancelled")
    error = engine.container(waiter)["runtime_status"]["error"]
    assert error == f"dependency {failing} failed with exit code 4"
    reply = engine.request("POST", "/api/v1/containers", {"command": ["true"], "after": [UNKNOWN]})
    assert reply.status == 400 and reply.json["field"] == "after"
    assert UNKNOWN in reply.json["error"]
    reply = engine.request("POST", "/api/v1/containers", {"command": ["true"], "after": ["x"]})
    assert reply.status == 400 and reply.json["field"] == "after"
    assert "not a container uuid" in reply.json["error"]
    batch = {"items": [{"command": ["true"]}, {"command": ["true"], "after": [UNKNOWN]}]}
    reply = engine.request("POST", "/api/v1/containers/batch", batch)
    assert reply.status == 400 and reply.json["field"] == "items[1].after"


def test_zero_vcpus_is_accepted_and_negative_refused(engine):
    ctr = engine.submit(runtime_constraints={"vcpus": 0})
    assert ctr["state"] == "Queued" and ctr["runtime_constraints"]["vcpus"] == 0
    for constraints, field in (
        ({"vcpus": -1}, "runtime_constraints.vcpus"),
        ({"ram": -1}, "runtime_constraints.ram"),
        ({"ram": "-1GiB"}, "runtime_constraints.ram"),
    ):
        reply = engine.request(
            "POST", "/api/v1/containers", {"command": ["true"], "runtime_constraints": constraints}
        )
        assert reply.status == 400 and reply.json["field"] == field, constraints


def test_gpus_shorthand_and_full_gpu_request(engine):
    ctr = engine.submit(runtime_constraints={"gpus": 1})
    assert ctr["runtime_constraints"]["gpu"]["device_count"] == 1
    assert ctr["runtime_constraints"]["gpu"]["stack"] == "cuda"  # no GPU types configured
    ctr = engine.submit(
        runtime_constraints={"gpu": {"stack": "rocm", "device_count": 2, "vram": "8GiB"}}
    )
    assert ctr["runtime_constraints"]["gpu"] == {
        "stack": "rocm",
        "device_count": 2,
        "driver_version": "",
        "hardware_target": [],
        "vram": 8 * 1024**3,
    }
    both = engine.request(
        "POST",
        "/api/v1/containers",
        {"command": ["x"], "runtime_constraints": {"gpus": 1, "gpu": {"device_count": 1}}},
    )
    assert both.status == 400 and "either gpus or gpu" in both.json["error"]


def test_unsatisfiable_container_is_cancelled_with_a_reason(engine):
    ctr = engine.submit(runtime_constraints={"vcpus": 1000})
    assert ctr["state"] == "Cancelled"
    assert "error" in ctr["runtime_status"]


def test_container_lifecycle_as_seen_through_get(engine):
    uuid = engine.submit(command=["sim", "30", "3"])["uuid"]
    engine.advance(1)
    ctr = engine.container(uuid)
    assert ctr["state"] in ("Queued", "Locked")
    assert ctr["scheduling_status"] == (
        "Waiting for a small instance to boot and be ready to accept work."
    )
    engine.advance(15)
    ctr = engine.container(uuid)
    assert ctr["state"] == "Running"
    assert ctr["instance_id"] and ctr["instance_type"] == "small"
    assert ctr["scheduling_status"] == ""
    assert ctr["attempts"] == 1
    assert RFC3339.match(ctr["started_at"]) and ctr["run_time"] >= 0
    engine.advance(60)
    ctr = engine.container(uuid)
    assert ctr["state"] == "Complete" and ctr["exit_code"] == 3
    assert RFC3339.match(ctr["finished_at"])
    assert ctr["cost"] > 0
    assert 29 <= ctr["run_time"] <= 35


def test_get_unknown_and_malformed_uuids(engine):
    reply = engine.request("GET", f"/api/v1/containers/{UNKNOWN}")
    assert reply.status == 404 and reply.json["field"] == "uuid"
    for bad in ("nope", "SIM01-dz642-000000000000000", "sim01-dz642-0000", "%00"):
        reply = engine.request("GET", f"/api/v1/containers/{bad}")
        assert reply.status == 400, bad
        assert reply.json["field"] == "uuid"
    # An encoded slash is decoded before routing: a path no route has.
    assert engine.request("GET", "/api/v1/containers/a%2Fb").status == 404


def test_list_filters_by_state(engine):
    done = engine.submit(command=["sim", "5", "0"])["uuid"]
    engine.advance(60)
    waiting = engine.submit(priority=0)["uuid"]
    cancelled = engine.submit()["uuid"]
    engine.request("POST", f"/api/v1/containers/{cancelled}/cancel", {})

    def uuids(query: str) -> set[str]:
        reply = engine.request("GET", f"/api/v1/containers{query}")
        assert reply.status == 200, reply.body
        schema.ContainerList.model_validate(reply.json)
        return {c["uuid"] for c in reply.json["items"]}

    assert uuids("") == {done, waiting, cancelled}
    assert uuids("?state=Complete") == {done}
    assert uuids("?state=Queued&state=Cancelled") == {waiting, cancelled}
    assert uuids("?state=Running") == set()


def test_list_pages_by_uuid(engine):
    submitted = sorted(engine.submit(priority=0)["uuid"] for _ in range(7))
    seen: list[str] = []
    after, pages = "", 0
    while True:
        reply = engine.request("GET", f"/api/v1/containers?order=uuid&limit=3&after={after}")
        assert reply.status == 200
        page = reply.json
        seen += [c["uuid"] for c in page["items"]]
        pages += 1
        if page["next"] is None:
            break
        assert page["next"] == page["items"][-1]["uuid"]
        after = page["next"]
    assert seen == submitted
    assert pages == 3
    # A page that ends exactly at the last container says there is no next page.
    exact = engine.request(
        "GET", f"/api/v1/containers?order=uuid&limit=2&after={submitted[4]}"
    ).json
    assert [c["uuid"] for c in exact["items"]] == submitted[5:]
    assert exact["next"] is None


def test_list_is_newest_first_and_the_latest_submission_is_on_the_first_page(engine):
    submitted = []
    for _ in range(5):
        submitted.append(engine.submit(priority=0)["uuid"])
        engine.advance(1)
    seen: list[str] = []
    after = ""
    while True:
        page = engine.request("GET", f"/api/v1/containers?limit=2&after={after}").json
        seen += [c["uuid"] for c in page["items"]]
        if page["next"] is None:
            break
        if after == "":
            # Submitted between two pages: first on a new first page, never on the next ones.
            latest = engine.submit(priority=0)["uuid"]
            first = engine.request("GET", "/api/v1/containers?limit=1").json["items"]
            assert [c["uuid"] for c in first] == [latest]
        after = page["next"]
    assert seen == submitted[::-1]


def test_list_filters_by_creation_time(engine):
    old = engine.submit(priority=0)
    engine.advance(60)
    new = engine.submit(priority=0)
    since = new["created_at"]
    reply = engine.request("GET", f"/api/v1/containers?since={since}")
    assert reply.status == 200, reply.body
    assert [c["uuid"] for c in reply.json["items"]] == [new["uuid"]]
    everything = engine.request("GET", "/api/v1/containers?since=0").json["items"]
    assert {c["uuid"] for c in everything} == {old["uuid"], new["uuid"]}
    reply = engine.request("GET", f"/api/v1/containers?order=uuid&since={since}")
    assert reply.status == 400 and reply.json["field"] == "order"
    reply = engine.request("GET", f"/api/v1/containers?after={UNKNOWN}")
    assert reply.status == 400 and reply.json["field"] == "after"


def test_list_rejects_bad_query_parameters(engine):
    for query, field in (
        ("state=Sleeping", "state"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("limit=1&limit=2", "limit"),
        ("after=garbage", "after"),
        ("colour=blue", "colour"),
        ("since=yesterday", "since"),
        ("order=random", "order"),
        ("array=nope", "array"),
    ):
        reply = engine.request("GET", f"/api/v1/containers?{query}")
        assert reply.status == 400, query
        assert reply.json["field"] == field, query


def test_scheduling_status_appears_in_the_list(engine):
    uuid = engine.submit()["uuid"]
    held = engine.submit(priority=0)["uuid"]
    engine.advance(1)
    items = {c["uuid"]: c for c in engine.request("GET", "/api/v1/containers").json["items"]}
    assert items[uuid]["scheduling_status"].startswith("Waiting for a small instance")
    assert "priority is 0" in items[held]["scheduling_status"]


def test_scheduling_statuses_are_indexed_once_per_pass(engine, monkeypatch):
    scheduler = engine.dispatcher.scheduler
    calls = []
    original = scheduler.snapshot

    def counting():
        calls.append(1)
        return original()

    monkeypatch.setattr(scheduler, "snapshot", counting)
    uuid = engine.submit()["uuid"]
    engine.advance(1)
    for _ in range(3):
        engine.container(uuid)
        engine.request("GET", "/api/v1/containers")
    assert len(calls) == 1
    engine.advance(5)  # more passes
    engine.container(uuid)
    assert len(calls) == 2


def test_cancel(engine):
    uuid = engine.submit(priority=0)["uuid"]
    reply = engine.request("POST", f"/api/v1/containers/{uuid}/cancel", {"reason": "not needed"})
    assert reply.status == 200
    assert reply.json["state"] == "Cancelled"
    assert "not needed" in reply.json["runtime_status"]["error"]
    again = engine.request("POST", f"/api/v1/containers/{uuid}/cancel")
    assert again.status == 200 and again.json["state"] == "Cancelled"
    assert engine.request("POST", f"/api/v1/containers/{UNKNOWN}/cancel").status == 404


def test_cancel_stops_a_running_container(engine):
    uuid = engine.submit(command=["sim", "600", "0"])["uuid"]
    engine.advance(20)
    assert engine.container(uuid)["state"] == "Running"
    assert engine.request("POST", f"/api/v1/containers/{uuid}/cancel", {}).status == 200
    engine.advance(30)
    running = {
        u
        for i in engine.request("GET", "/api/v1/instances").json["items"]
        for u in i["running_container_uuids"]
    }
    assert uuid not in running
    assert engine.container(uuid)["state"] == "Cancelled"


def test_cancel_of_a_completed_container_conflicts(engine):
    uuid = engine.submit(command=["sim", "1", "0"])["uuid"]
    engine.advance(60)
    assert engine.container(uuid)["state"] == "Complete"
    reply = engine.request("POST", f"/api/v1/containers/{uuid}/cancel", {})
    assert reply.status == 409
    assert engine.container(uuid)["state"] == "Complete"


def test_change_priority(engine):
    uuid = engine.submit(priority=0)["uuid"]
    reply = engine.request("POST", f"/api/v1/containers/{uuid}/priority", {"priority": 500})
    assert reply.status == 200 and reply.json["priority"] == 500
    assert engine.dispatcher.queue.get(uuid).priority == 500
    for body, field in (
        ({"priority": -1}, "priority"),
        ({"priority": "5"}, "priority"),
        ({"priority": 1.5}, "priority"),
        ({}, "priority"),
        ({"priority": 1, "urgent": True}, "urgent"),
    ):
        reply = engine.request("POST", f"/api/v1/containers/{uuid}/priority", body)
        assert reply.status == 400, body
        assert reply.json["field"] == field, body
    engine.request("POST", f"/api/v1/containers/{uuid}/cancel", {})
    assert (
        engine.request("POST", f"/api/v1/containers/{uuid}/priority", {"priority": 3}).status == 409
    )


def test_log_is_read_by_offset_until_final(engine):
    uuid = engine.submit(command=["sim", "10", "0"])["uuid"]
    empty = engine.request("GET", f"/api/v1/containers/{uuid}/log").json
    assert empty == {"offset": 0, "next_offset": 0, "data": "", "final": False}
    engine.advance(60)
    whole = engine.request("GET", f"/api/v1/containers/{uuid}/log").json
    assert whole["final"] is True and "exited with code 0" in whole["data"]
    # In chunks of 16 bytes: only the last one is final, and together they are the log.
    text, offset = "", 0
    while True:
        chunk = engine.request(
            "GET", f"/api/v1/containers/{uuid}/log?offset={offset}&limit=16"
        ).json
        schema.LogChunk.model_validate(chunk)
        assert chunk["offset"] == offset
        text += chunk["data"]
        offset = chunk["next_offset"]
        if chunk["final"]:
            break
        assert chunk["data"]
    assert text == whole["data"]
    beyond = engine.request("GET", f"/api/v1/containers/{uuid}/log?offset=100000").json
    assert beyond["data"] == "" and beyond["final"] is True


def test_log_chunks_never_split_a_character(engine):
    uuid = engine.submit(priority=0)["uuid"]
    text = "héllo wörld ✓ done\n"
    engine.dispatcher.queue.append_log(uuid, text.encode())
    got, offset = "", 0
    for _ in range(100):
        chunk = engine.request("GET", f"/api/v1/containers/{uuid}/log?offset={offset}&limit=2").json
        if chunk["next_offset"] == offset:
            break
        got += chunk["data"]
        offset = chunk["next_offset"]
    assert got == text
    assert "\ufffd" not in got


def test_log_of_invalid_utf8_is_replaced_not_refused(engine):
    uuid = engine.submit(priority=0)["uuid"]
    engine.dispatcher.queue.append_log(uuid, b"ok \xff\xfe bytes\n")
    engine.dispatcher.queue.cancel(uuid, "done")
    engine.advance(LOG_SETTLE_SECONDS)
    chunk = engine.request("GET", f"/api/v1/containers/{uuid}/log").json
    assert chunk["data"] == "ok \ufffd\ufffd bytes\n" and chunk["final"] is True


def test_a_log_is_final_only_once_its_last_lines_could_have_arrived(engine):
    uuid = engine.submit(priority=0)["uuid"]
    engine.dispatcher.queue.cancel(uuid, "by the user")
    chunk = engine.request("GET", f"/api/v1/containers/{uuid}/log").json
    assert chunk["final"] is False  # a cancelled container's runner may still be writing
    engine.dispatcher.queue.append_log(uuid, b"stdout got TERM\n")
    engine.advance(LOG_SETTLE_SECONDS)
    chunk = engine.request("GET", f"/api/v1/containers/{uuid}/log").json
    assert chunk == {"offset": 0, "next_offset": 16, "data": "stdout got TERM\n", "final": True}


def test_log_parameters_are_validated(engine):
    uuid = engine.submit(priority=0)["uuid"]
    for query in ("offset=-1", "offset=x", "limit=0", f"limit={5 << 20}", "since=1"):
        reply = engine.request("GET", f"/api/v1/containers/{uuid}/log?{query}")
        assert reply.status == 400, query
    assert engine.request("GET", f"/api/v1/containers/{UNKNOWN}/log").status == 404


def test_utf8_prefix():
    assert utf8_prefix(b"abc") == 3
    assert utf8_prefix("é".encode()) == 2
    assert utf8_prefix("é".encode()[:1]) == 0
    assert utf8_prefix(b"a" + "✓".encode()[:2]) == 1
    assert utf8_prefix(b"a" + "𝄞".encode()[:3]) == 1
    assert utf8_prefix(b"a" + "𝄞".encode()) == 5
    assert utf8_prefix(b"\x80\x80\x80\x80") == 4  # not UTF-8: left to the decoder
    assert utf8_prefix(b"") == 0


def test_state_enum_matches_the_model():
    assert {s.value for s in ContainerState} == {
        "Queued",
        "Locked",
        "Running",
        "Complete",
        "Cancelled",
    }


@pytest.mark.parametrize(
    "image", ["--privileged", "-v/:/host", "Ubuntu", "alpine;id", "a b", "alpine:", "$(id)"]
)
def test_image_must_be_an_image_reference(engine, image):
    reply = engine.request("POST", "/api/v1/containers", {"command": ["true"], "image": image})
    assert reply.status == 400, reply.json
    assert "invalid image reference" in reply.json["error"]
    assert engine.dispatcher.queue.counts()[ContainerState.QUEUED] == 0


@pytest.mark.parametrize(
    "image",
    [
        "alpine",
        "ubuntu:24.04",
        "localhost:5000/team/tool_x:v1.2-rc",
        "ghcr.io/org/tool@sha256:" + "ab" * 32,
    ],
)
def test_image_references_are_accepted(engine, image):
    assert engine.submit(image=image)["image"] == image


def test_the_image_rule_is_in_the_openapi_document(engine):
    from herder.model import IMAGE_REFERENCE_PATTERN

    doc = engine.request("GET", "/api/v1/openapi.json").json
    schemas = doc["components"]["schemas"]
    submit = next(s for name, s in schemas.items() if name.startswith("SubmitRequest"))
    assert submit["properties"]["image"]["pattern"] == IMAGE_REFERENCE_PATTERN


def test_a_queue_that_cannot_be_written_is_a_503_not_a_500(engine, monkeypatch):
    import sqlite3

    def full(*_args, **_kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(engine.dispatcher.queue, "submit", full)
    reply = engine.request("POST", "/api/v1/containers", {"command": ["true"]})
    assert reply.status == 503, reply.json
    assert "the queue cannot be written right now: database or disk is full" in reply.json["error"]
    monkeypatch.setattr(
        engine.dispatcher.queue,
        "submit",
        lambda *_a, **_k: (_ for _ in ()).throw(OSError(28, "No space left")),
    )
    assert engine.request("POST", "/api/v1/containers", {"command": ["true"]}).status == 503
    doc = engine.request("GET", "/api/v1/openapi.json").json
    assert "503" in doc["paths"]["/api/v1/containers"]["post"]["responses"]


def test_a_queue_that_cannot_be_reached_is_a_503(engine, monkeypatch):
    from herder.queue.base import QueueUnavailable

    def lost(*_args, **_kwargs):
        raise QueueUnavailable("the database connection was lost; reconnecting")

    monkeypatch.setattr(engine.dispatcher.queue, "newest", lost)
    reply = engine.request("GET", "/api/v1/containers")
    assert reply.status == 503, reply.json
    assert reply.headers["retry-after"] == "30"
    assert "connection was lost" in reply.json["error"]
    doc = engine.request("GET", "/api/v1/openapi.json").json
    assert "503" in doc["paths"]["/api/v1/containers"]["get"]["responses"]


# --------------------------------------------------------------------------- batch names


def test_batch_items_wait_for_each_other_by_name(engine):
    items = [
        {"command": ["sim", "5", "0"], "name": "report", "after": ["align", "call"]},
        {"command": ["sim", "5", "0"], "name": "align"},
        {"command": ["sim", "5", "0"], "name": "call", "after": ["align"]},
    ]
    reply = engine.request("POST", "/api/v1/containers/batch", {"items": items})
    assert reply.status == 201, reply.body
    report, align, call = reply.json["items"]
    assert report["after"] == [align["uuid"], call["uuid"]] and call["after"] == [align["uuid"]]
    assert align["uuid"] in report["scheduling_status"]
    _run_until(engine, lambda: engine.container(report["uuid"])["state"] == "Complete")
    ended = {u: engine.container(u)["finished_at"] for u in (align["uuid"], call["uuid"])}
    assert ended[align["uuid"]] <= ended[call["uuid"]]


@pytest.mark.parametrize(
    ("items", "field", "message"),
    [
        ([{"name": "a"}, {"after": ["b"]}], "items[1].after", "'b' is not a container uuid"),
        ([{"name": "a", "after": ["a"]}], "items[0].after", "a cycle: 'a' -> 'a'"),
        (
            [{"name": "x"}, {"name": "a", "after": ["b"]}, {"name": "b", "after": ["a"]}],
            "items[1].after",
            "a cycle: 'a' -> 'b' -> 'a'",
        ),
        ([{"name": "a"}, {"name": "a"}, {"after": ["a"]}], "items[2].after", "several items"),
    ],
)
def test_batch_names_that_do_not_resolve_are_refused(engine, items, field, message):
    before = engine.dispatcher.queue.counts()
    body = {"items": [{"command": ["true"], **item} for item in items]}
    reply = engine.request("POST", "/api/v1/containers/batch", body)
    assert reply.status == 400, reply.body
    assert reply.json["field"] == field and message in reply.json["error"]
    assert engine.dispatcher.queue.counts() == before


# --------------------------------------------------------------------------- bulk cancel


def test_cancel_many_answers_for_each_container(engine):
    waiting = [engine.submit(priority=0)["uuid"] for _ in range(3)]
    done = engine.submit(command=["sim", "1", "0"])["uuid"]
    _run_until(engine, lambda: engine.container(done)["state"] == "Complete")
    engine.dispatcher.queue.cancel(waiting[2], "earlier")
    uuids = [waiting[0], done, UNKNOWN, waiting[1], waiting[2], waiting[0]]
    body = {"uuids": uuids, "reason": "tidy"}
    reply = engine.request("POST", "/api/v1/containers/cancel", body)
    assert reply.status == 200, reply.body
    out = schema.CancelManyOut.model_validate(reply.json)
    assert [(i.uuid, i.outcome, i.state) for i in out.items] == [
        (waiting[0], "cancelled", ContainerState.CANCELLED),
        (done, "final", ContainerState.COMPLETE),
        (UNKNOWN, "not_found", None),
        (waiting[1], "cancelled", ContainerState.CANCELLED),
        (waiting[2], "final", ContainerState.CANCELLED),
    ]
    assert out.cancelled == 2
    assert engine.container(waiting[0])["runtime_status"]["error"] == "cancelled via API: tidy"
    assert engine.container(waiting[2])["runtime_status"]["error"] == "earlier"


def test_cancel_many_cancels_the_unfinished_members_of_an_array(engine):
    body = {"command": ["sim", "30", "0"], "priority": 0, "count": 4}
    made = engine.request("POST", "/api/v1/containers/array", body).json
    array, members = made["array_id"], [c["uuid"] for c in made["items"]]
    other = engine.submit(priority=0)["uuid"]
    engine.dispatcher.queue.cancel(members[1], "not this one")
    reply = engine.request("POST", "/api/v1/containers/cancel", {"array": array})
    assert reply.status == 200, reply.body
    assert sorted(i["uuid"] for i in reply.json["items"]) == sorted(members[:1] + members[2:])
    assert reply.json["cancelled"] == 3
    assert engine.container(other)["state"] == "Queued"
    again = engine.request("POST", "/api/v1/containers/cancel", {"array": array}).json
    assert again == {"items": [], "cancelled": 0}


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({}, 400, None),
        ({"uuids": [UNKNOWN], "array": "sim01-a88ay-000000000000000"}, 400, None),
        ({"uuids": ["junk"]}, 400, "uuids[0]"),
        ({"array": "junk"}, 400, "array"),
        ({"array": "sim01-a88ay-000000000000000"}, 404, "array"),
        ({"uuids": [UNKNOWN] * (schema.MAX_BATCH + 1)}, 400, "uuids"),
    ],
)
def test_cancel_many_refuses_bad_requests_in_the_usual_format(engine, body, status, field):
    reply = engine.request("POST", "/api/v1/containers/cancel", body)
    assert reply.status == status, reply.body
    assert reply.json["error"] and reply.json.get("field") == field


# --------------------------------------------------------------------------- queue order


def test_queue_order_lists_the_head_of_a_big_queue_with_paging(engine):
    queue = engine.dispatcher.queue
    blocker = queue.submit(ContainerSpec(command=("sim", "30", "0"), priority=0)).uuid
    specs = [
        ContainerSpec(command=("sim", "1", "0"), priority=1 + i % 3, after=(blocker,))
        for i in range(1_500)
    ]
    made = []
    for part in (specs[:700], specs[700:]):  # two submissions: two creation times
        made += queue.submit_many(part)
        engine.advance(1)
    held = queue.submit(ContainerSpec(command=("sim", "1", "0"), priority=0)).uuid
    expected = sorted(
        made,
        key=lambda c: (
            0 if c.state is ContainerState.LOCKED else 1,
            -c.priority,
            c.created_at,
            c.uuid,
        ),
    )
    first = engine.request("GET", "/api/v1/containers?order=queue&limit=1000").json
    assert [c["uuid"] for c in first["items"]] == [c.uuid for c in expected[:1000]]
    assert first["total"] == 1_500 and first["next"] == expected[999].uuid
    assert first["items"][0]["priority"] == 3 and held not in {c["uuid"] for c in first["items"]}
    rest = engine.request("GET", f"/api/v1/containers?order=queue&after={first['next']}").json
    assert [c["uuid"] for c in rest["items"]] == [c.uuid for c in expected[1000:1100]]
    assert rest["total"] == 500
    queued = engine.request("GET", "/api/v1/containers?order=queue&state=Queued&limit=1").json
    assert queued["total"] == 1_500
    newest = engine.request("GET", "/api/v1/containers?limit=1").json
    assert newest["total"] is None


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("order=queue&state=Running", "state"),
        ("order=queue&array=sim01-a88ay-000000000000000", "order"),
        (f"order=queue&after={UNKNOWN}", "after"),
        ("order=line", "order"),
    ],
)
def test_queue_order_refuses_what_it_cannot_list(engine, query, field):
    reply = engine.request("GET", f"/api/v1/containers?{query}")
    assert reply.status == 400 and reply.json["field"] == field, reply.body

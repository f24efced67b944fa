"""Nothing a client sends produces a 500: malformed, mistyped, oversized and odd requests get a
4xx JSON error naming the field, and the server keeps serving."""

from __future__ import annotations

import json
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from herder.app.api.server import MAX_BODY

SUBMIT = "/api/v1/containers"
UUID = "sim01-dz642-000000000000000"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "command"),
        ({"command": []}, "command"),
        ({"command": "echo hi"}, "command"),
        ({"command": ["echo", 5]}, "command[1]"),
        ({"command": ["a\x00b"]}, "command"),
        ({"command": ["x"], "colour": "red"}, "colour"),
        ({"command": ["x"], "runtime_constraints": {"cpus": 2}}, "runtime_constraints.cpus"),
        ({"command": ["x"], "runtime_constraints": {"vcpus": "2"}}, "runtime_constraints.vcpus"),
        ({"command": ["x"], "runtime_constraints": {"vcpus": True}}, "runtime_constraints.vcpus"),
        ({"command": ["x"], "runtime_constraints": {"vcpus": -1}}, "runtime_constraints.vcpus"),
        ({"command": ["x"], "runtime_constraints": {"vcpus": 2**40}}, "runtime_constraints.vcpus"),
        ({"command": ["x"], "runtime_constraints": {"ram": "lots"}}, "runtime_constraints.ram"),
        ({"command": ["x"], "runtime_constraints": {"ram": 1.5}}, "runtime_constraints.ram"),
        ({"command": ["x"], "runtime_constraints": {"ram": -1}}, "runtime_constraints.ram"),
        ({"command": ["x"], "runtime_constraints": {"ram": "99EiB"}}, "runtime_constraints.ram"),
        ({"command": ["x"], "runtime_constraints": {"ram": 10**30}}, "runtime_constraints.ram"),
        (
            {"command": ["x"], "runtime_constraints": {"gpu": {"stack": "opencl"}}},
            "runtime_constraints.gpu.stack",
        ),
        ({"command": ["x"], "runtime_constraints": []}, "runtime_constraints"),
        (
            {"command": ["x"], "scheduling_parameters": {"max_run_time": "soon"}},
            "scheduling_parameters.max_run_time",
        ),
        (
            {"command": ["x"], "scheduling_parameters": {"max_run_time": -5}},
            "scheduling_parameters.max_run_time",
        ),
        (
            {"command": ["x"], "scheduling_parameters": {"max_run_time": 1e300}},
            "scheduling_parameters.max_run_time",
        ),
        (
            {"command": ["x"], "scheduling_parameters": {"preemptible": "yes"}},
            "scheduling_parameters.preemptible",
        ),
        ({"command": ["x"], "priority": 10**30}, "priority"),
        ({"command": ["x"], "priority": None}, "priority"),
        ({"command": ["x"], "environment": {"A=B": "c"}}, "environment"),
        ({"command": ["x"], "environment": {"A": 1}}, "environment.A"),
        ({"command": ["x"], "environment": ["A=1"]}, "environment"),
        ({"command": ["x"], "cwd": "relative/dir"}, "cwd"),
        ({"command": ["x"], "runtime": "lxc"}, "runtime"),
        ({"command": ["x"], "name": "n" * 1000}, "name"),
    ],
)
def test_bad_submissions_name_the_field(engine, body, field):
    reply = engine.request("POST", SUBMIT, body)
    assert reply.status == 400, reply.body
    assert reply.json["field"] == field, reply.json
    assert engine.dispatcher.queue.list() == []


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"[1, 2]",
        b'"command"',
        b"null",
        b'{"command": ["x"], "priority": NaN}',
        b'{"command": ["x"], "priority": Infinity}',
        b'{"command": ["x"], "scheduling_parameters": {"max_run_time": Infinity}}',
        b"\xff\xfe{}",
        b'{"command": ["\xff"]}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"command": ["x"], "priority": 1' + b"0" * 5000 + b"}",
        b'{"command": ["x"]}{"command": ["y"]}',
    ],
    ids=lambda raw: repr(raw[:30]),
)
def test_malformed_json_is_400(engine, raw):
    reply = engine.request("POST", SUBMIT, raw=raw)
    assert reply.status == 400, reply.body
    assert reply.json["error"]


def test_huge_body_is_413_without_reading_it(engine):
    # Announce a body over the cap but send only the headers: the server must answer from the
    # Content-Length alone.  (Sending the whole body races the server closing the connection.)
    request = (
        f"POST {SUBMIT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {engine.token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n"
    ).encode()
    host, port = engine.server.address
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(request)
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.0 413") or reply.startswith(b"HTTP/1.1 413"), reply[:100]


def _raw_exchange(engine, data: bytes) -> bytes:
    host, port = engine.server.address
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


@pytest.mark.parametrize(
    "head",
    [
        b"GET /api/v1/instances HTTP/2.0\r\n",
        b"GARBAGE\r\n",
        b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n",
        b"BREW /api/v1/containers HTTP/1.1\r\n",
        b"DELETE /api/v1/containers HTTP/1.1\r\n",
        b"POST /api/v1/containers HTTP/1.1\r\nContent-Length: -5\r\n",
        b"POST /api/v1/containers HTTP/1.1\r\nContent-Length: ten\r\n",
        b"POST /api/v1/containers HTTP/1.1\r\nContent-Length: 100\r\n",  # body never comes
        b"POST /api/v1/containers HTTP/1.1\r\nTransfer-Encoding: chunked\r\n",
        b"GET /api/v1/containers?limit=%ff%fe HTTP/1.1\r\n",
        b"GET /api/v1/containers/..%2F..%2Fetc HTTP/1.1\r\n",
        b"GET /api/v1/../../etc/passwd HTTP/1.1\r\n",
        b"GET /api/v1/instances HTTP/1.1\r\n" + b"X-Junk: y\r\n" * 200,
    ],
    ids=lambda head: repr(head[:40]),
)
def test_protocol_level_junk_is_4xx(engine, head):
    auth = f"Authorization: Bearer {engine.token}\r\n".encode()
    first, _, rest = head.partition(b"\r\n")
    response = _raw_exchange(engine, first + b"\r\n" + auth + rest + b"\r\n")
    status = _status(response)
    assert 400 <= status < 500, response[:200]
    # And the server still answers.
    assert engine.request("GET", "/api/v1/health").status == 200


def test_absolute_form_targets_are_refused_not_crashed(engine):
    # The API is no proxy: a target naming another host is no route of its own.
    auth = f"Authorization: Bearer {engine.token}\r\nHost: x\r\n".encode()
    response = _raw_exchange(
        engine, b"GET http://elsewhere.example/api/v1/instances HTTP/1.1\r\n" + auth + b"\r\n"
    )
    assert 400 <= _status(response) < 500


def test_query_strings_with_odd_encodings(engine):
    for query in (
        "state=%00",
        "state=",
        "limit=",
        "after=%ff",
        "limit=1e3",
        "limit=+5",
        "limit=%20%31",
        "&&&",
        "state=Queued;state=Running",
        "=x",
    ):
        reply = engine.request("GET", f"/api/v1/containers?{query}")
        assert reply.status in (200, 400), (query, reply.body)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
submit_like = st.fixed_dictionaries(
    {},
    optional={
        "command": st.one_of(st.lists(st.text(max_size=10), max_size=3), json_values),
        "image": json_values,
        "environment": st.dictionaries(st.text(max_size=8), json_values, max_size=3),
        "runtime_constraints": st.fixed_dictionaries(
            {},
            optional={
                "vcpus": json_values,
                "ram": json_values,
                "scratch": json_values,
                "gpus": json_values,
                "gpu": json_values,
            },
        ),
        "scheduling_parameters": st.dictionaries(
            st.sampled_from(["preemptible", "max_run_time", "supervisor", "other"]),
            json_values,
            max_size=3,
        ),
        "priority": json_values,
        "name": json_values,
        "runtime": json_values,
        "cwd": json_values,
    },
)


QUICK = settings(
    database=None, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@settings(QUICK, max_examples=150)
@given(body=submit_like)
def test_random_submissions_never_500(engine, body):
    reply = engine.request("POST", SUBMIT, raw=json.dumps(body).encode())
    assert reply.status in (201, 400), (body, reply.body)
    if reply.status == 400:
        assert reply.json["error"]


@settings(QUICK, max_examples=100)
@given(
    method=st.sampled_from(["GET", "POST", "PUT"]),
    segment=st.text(min_size=1, max_size=40).map(
        lambda s: "".join(f"%{b:02X}" for b in s.encode())
    ),
    suffix=st.sampled_from(["", "/cancel", "/priority", "/log", "/hold", "/kill"]),
    body=json_values,
)
def test_random_paths_and_bodies_never_500(engine, method, segment, suffix, body):
    for base in ("/api/v1/containers/", "/api/v1/instances/"):
        reply = engine.request(method, base + segment + suffix, raw=json.dumps(body).encode())
        assert reply.status < 500, (method, base, segment, suffix, reply.body)


def test_a_handler_bug_is_a_logged_500(engine, monkeypatch, caplog):
    def broken():
        raise KeyError("bug")

    monkeypatch.setattr(engine.dispatcher.pool, "instances", broken)
    reply = engine.request("GET", "/api/v1/instances")
    assert reply.status == 500
    assert reply.json == {"error": "internal server error"}
    assert any("failed" in r.message for r in caplog.records)

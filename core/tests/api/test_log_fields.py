"""Engine log lines carry the instance id and the container uuid as JSON fields."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from herder.app.logsetup import IdFields, JSONFormatter, configure_logging


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """Root logging as ``herder --log-format json`` sets it up, restored afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    configure_logging("info", "json", stream)
    try:
        yield stream
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_worker_and_scheduler_lines_carry_ids(engine, json_log):
    uuid = engine.submit(command=["sim", "5", "0"])["uuid"]
    engine.advance(60)
    records = lines(json_log)
    [instance] = {r["instance"] for r in records if "instance" in r}
    started = [r for r in records if "runner started" in str(r["message"])]
    assert started, records
    assert started[0]["container"] == uuid and started[0]["instance"] == instance
    # The text stays readable on its own.
    assert started[0]["message"] == f"instance {instance}: container {uuid}: runner started"
    # Scheduler lines name the container too.
    assert any(
        r.get("container") == uuid and r["logger"].startswith("herder.engine.scheduler")
        for r in records
    ), records
    # Pool lines about one instance carry it even outside the worker.
    assert any(r.get("instance") == instance and "new worker" in str(r["message"]) for r in records)


def test_an_explicit_field_wins_and_plain_lines_get_none():
    record = logging.makeLogRecord(
        {"msg": "x %s", "args": ("zzzzz-dz642-000000000000001",), "container": "given"}
    )
    assert IdFields().filter(record) and record.container == "given"
    plain = logging.makeLogRecord({"msg": "scheduler running"})
    IdFields().filter(plain)
    assert "container" not in json.loads(JSONFormatter().format(plain))

"""Container records as stored by the SQL backends: one row of plain columns per container,
the spec and runtime_status as JSON text.

Shared so that SQLite and PostgreSQL store the same shape and decode it the same forgiving way:
a row that cannot be decoded becomes a placeholder with the reason, and costs that one
container, never the queue.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from herder.model import (
    Attempt,
    Container,
    ContainerSpec,
    ContainerState,
    GPURequest,
    RuntimeConstraints,
    SchedulingParameters,
)
from herder.queue.base import QueueError

#: The columns of a container row, in the order every function here uses.
COLUMNS = (
    "uuid, state, priority, spec, created_at, locked_at, started_at, finished_at, lock_count, "
    "exit_code, runtime_status, instance_id, instance_type, cost, array_id, attempts, labels"
)
#: How many columns :data:`COLUMNS` names (the placeholders of an INSERT).
COLUMN_COUNT = COLUMNS.count(",") + 1
#: The columns :func:`update_row` gives, in order, followed by the uuid.
UPDATE_COLUMNS = (
    "state",
    "priority",
    "locked_at",
    "started_at",
    "finished_at",
    "lock_count",
    "exit_code",
    "runtime_status",
    "instance_id",
    "instance_type",
    "cost",
    "attempts",
)

_ENCODER = json.JSONEncoder(separators=(",", ":"))


def dumps(value: Any) -> str:
    return _ENCODER.encode(value)


def status_json(c: Container) -> str:
    return dumps(dict(c.runtime_status)) if c.runtime_status else "{}"


def attempts_json(c: Container) -> str:
    """The attempt history as JSON text (``[]`` for none)."""
    return dumps([a.to_json() for a in c.attempt_history]) if c.attempt_history else "[]"


def _spec_to_json(spec: ContainerSpec) -> dict[str, Any]:
    """The spec as plain JSON data; written out by hand because it is on the submit fast path."""
    rc = spec.runtime_constraints
    gpu = rc.gpu
    sp = spec.scheduling_parameters
    return {
        "command": list(spec.command),
        "image": spec.image,
        "environment": [[k, v] for k, v in spec.environment],
        "cwd": spec.cwd,
        "runtime": spec.runtime,
        "runtime_constraints": {
            "vcpus": rc.vcpus,
            "ram": rc.ram,
            "scratch": rc.scratch,
            "gpu": {
                "stack": gpu.stack,
                "device_count": gpu.device_count,
                "driver_version": gpu.driver_version,
                "hardware_target": list(gpu.hardware_target),
                "vram": gpu.vram,
            },
        },
        "scheduling_parameters": {
            "preemptible": sp.preemptible,
            "max_run_time": sp.max_run_time,
            "supervisor": sp.supervisor,
        },
        "priority": spec.priority,
        "name": spec.name,
        **({"after": list(spec.after)} if spec.after else {}),
        "pull_policy": spec.pull_policy,
    }


def _spec_from_json(data: dict[str, Any]) -> ContainerSpec:
    """Inverse of :func:`_spec_to_json`.  Missing keys take the model's defaults, so rows written
    before a field was added still load."""
    rc = data.get("runtime_constraints", {})
    gpu = rc.get("gpu", {})
    sp = data.get("scheduling_parameters", {})
    return ContainerSpec(
        command=tuple(data["command"]),
        image=data.get("image", ""),
        environment=tuple((k, v) for k, v in data.get("environment", ())),
        cwd=data.get("cwd", ""),
        runtime=data.get("runtime", ""),
        runtime_constraints=RuntimeConstraints(
            vcpus=rc.get("vcpus", 1),
            ram=rc.get("ram", 0),
            scratch=rc.get("scratch", 0),
            gpu=GPURequest(
                stack=gpu.get("stack", ""),
                device_count=gpu.get("device_count", 0),
                driver_version=gpu.get("driver_version", ""),
                hardware_target=tuple(gpu.get("hardware_target", ())),
                vram=gpu.get("vram", 0),
            ),
        ),
        scheduling_parameters=SchedulingParameters(
            preemptible=sp.get("preemptible", False),
            max_run_time=sp.get("max_run_time", 0.0),
            supervisor=sp.get("supervisor", False),
        ),
        priority=data.get("priority", 1),
        name=data.get("name", ""),
        after=tuple(str(u) for u in data.get("after", ())),
        pull_policy=data.get("pull_policy", ""),
    )


def insert_row(c: Container) -> tuple[Any, ...]:
    return (
        c.uuid,
        c.state.value,
        c.priority,
        dumps(_spec_to_json(c.spec)),
        c.created_at,
        c.locked_at,
        c.started_at,
        c.finished_at,
        c.lock_count,
        c.exit_code,
        status_json(c),
        c.instance_id,
        c.instance_type,
        c.cost,
        c.array_id,
        attempts_json(c),
        labels_json(c.spec.labels),
    )


def labels_json(labels: Sequence[tuple[str, str]]) -> str:
    """Labels as the ``labels`` column keeps them: a JSON object (``{}`` for none).

    A column of their own rather than a key of the spec's JSON, so that a backend can select
    or group containers by label without decoding every spec.
    """
    return dumps(dict(labels)) if labels else "{}"


def labels_from_json(text: str | None) -> tuple[tuple[str, str], ...]:
    """Labels from the ``labels`` column (the inverse of :func:`labels_json`)."""
    if not text:
        return ()
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"labels are not an object: {text[:100]!r}")
    return tuple(sorted((str(k), str(v)) for k, v in data.items()))


def update_row(c: Container) -> tuple[Any, ...]:
    """Parameters of :data:`UPDATE_COLUMNS`: every field that can change after submission."""
    return (
        c.state.value,
        c.priority,
        c.locked_at,
        c.started_at,
        c.finished_at,
        c.lock_count,
        c.exit_code,
        status_json(c),
        c.instance_id,
        c.instance_type,
        c.cost,
        attempts_json(c),
        c.uuid,
    )


def from_row(row: Sequence[Any]) -> Container:
    """The record of a row; one that cannot be decoded is shown as a placeholder (see
    :func:`decode`), so that one damaged row never stops a listing."""
    return decode(row)[0]


def decode(row: Sequence[Any]) -> tuple[Container, str | None]:
    """The record of a row and None, or a placeholder and why the row could not be decoded.

    A stored value of the wrong shape (a ``runtime_constraints`` that is a list, an
    environment entry that is not a pair) must cost that one container, not the queue: the
    placeholder keeps the uuid, the state and the times, with the reason as its error.
    """
    try:
        return _decode_strictly(row), None
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        why = f"stored record could not be read ({type(exc).__name__}: {exc})"[:500]
        try:
            state = ContainerState(row[1])
        except ValueError:
            state = ContainerState.CANCELLED
        number = (int, float)
        return (
            Container(
                uuid=str(row[0]),
                state=state,
                priority=row[2] if isinstance(row[2], int) else 0,
                spec=ContainerSpec(command=()),
                created_at=row[4] if isinstance(row[4], number) else 0.0,
                finished_at=row[7] if isinstance(row[7], number) else None,
                runtime_status=(("error", why),),
                array_id=row[14] if len(row) > 14 and isinstance(row[14], str) else "",
            ),
            why,
        )


def _decode_strictly(row: Sequence[Any]) -> Container:
    return Container(
        uuid=row[0],
        state=ContainerState(row[1]),
        priority=row[2],
        spec=replace(_spec_from_json(json.loads(row[3])), labels=labels_from_json(row[16])),
        created_at=row[4],
        locked_at=row[5],
        started_at=row[6],
        finished_at=row[7],
        lock_count=row[8],
        exit_code=row[9],
        runtime_status=tuple(json.loads(row[10]).items()),
        instance_id=row[11],
        instance_type=row[12],
        cost=row[13],
        array_id=row[14],
        attempt_history=tuple(Attempt.from_json(a) for a in json.loads(row[15])),
    )


def upgrade_schema(
    execute: Callable[..., Any],
    migrations: Sequence[Sequence[str]],
    too_new: Callable[[int, int], str],
) -> None:
    """Bring a queue's schema up to date inside the caller's transaction: read the recorded
    version (a new queue has none: 0), refuse a version newer than ``migrations`` knows with
    ``too_new(version, known)``, run each missing step's statements, record the new version.

    ``execute`` is the backend's connection's ``execute``; every statement is a constant of
    the backend's own, so this is the one place both SQL backends keep their steps in order.
    """
    execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
    row = execute("SELECT version FROM schema_version").fetchone()
    if row is None:
        execute("INSERT INTO schema_version (version) VALUES (0)")
    version = 0 if row is None else int(row[0])
    if version > len(migrations):
        raise QueueError(too_new(version, len(migrations)))
    for statements in migrations[version:]:
        for statement in statements:
            execute(statement)
    execute(f"UPDATE schema_version SET version = {len(migrations):d}")  # noqa: S608 (an int)

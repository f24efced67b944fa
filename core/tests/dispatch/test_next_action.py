"""The one rule backends follow when a held container's record changes."""

from __future__ import annotations

import dataclasses

import pytest

from herder.dispatch import CloseReason, Job, UpdateAction
from herder.model import Container, ContainerSpec, ContainerState

RUNNING = Container(
    "zzzzz-dz642-000000000000001", ContainerState.RUNNING, 5, ContainerSpec(("true",)), 0.0
)


def job_after(update: Container | None = None, close: CloseReason | None = None) -> Job:
    job = Job(None, RUNNING)  # type: ignore[arg-type]  # the dispatcher is not needed here
    job.updates.take()
    if update is not None:
        job.updates.push(update)
    if close is not None:
        job.updates.close(close, update)
    return job


@pytest.mark.parametrize(
    ("update", "close", "action"),
    [
        (dataclasses.replace(RUNNING, priority=7), None, UpdateAction.KEEP),
        (dataclasses.replace(RUNNING, priority=0), None, UpdateAction.CANCEL),
        (dataclasses.replace(RUNNING, state=ContainerState.CANCELLED), None, UpdateAction.STOP),
        (None, CloseReason.VANISHED, UpdateAction.STOP),
        (None, CloseReason.RELEASED, UpdateAction.STOP),
        (None, CloseReason.SHUTDOWN, UpdateAction.FORGET),
        (
            dataclasses.replace(RUNNING, state=ContainerState.COMPLETE, priority=0),
            CloseReason.FINAL,
            UpdateAction.KEEP,
        ),
    ],
)
def test_next_action(update, close, action):
    assert job_after(update, close).next_action() is action

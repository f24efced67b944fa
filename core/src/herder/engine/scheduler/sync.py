"""Reconcile the queue with the pool's runners (SPEC §9.7).

After each pass the scheduler compares what the queue says about each container with what the
pool says runs, and fixes disagreements: it kills runners the queue no longer wants, drops
finished containers from the snapshot, gives back locks whose runner is gone, and deals with
Running containers whose runner vanished.

herder's choices where Arvados differs (the queue here is herder's own):

* A Running container whose runner is gone (no worker runs it, or the runner exited without
  reporting an exit code) is *retried* — requeued, or cancelled by the queue past the dispatch
  attempt cap — instead of cancelled: a lost instance should not fail the user's work.
* A Running container whose priority dropped to 0 is cancelled; the next sync then kills its
  runner because it is Cancelled.
* A Running container that has run for its ``max_run_time`` is cancelled and its runner killed
  (Arvados leaves this to crunch-run; herder's runner agent does not enforce it).

Decisions about a container whose runner exited wait until the queue snapshot is newer than the
exit: an older snapshot may not show the exit code yet.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from herder.engine.scheduler.ops import ContainerOps
from herder.model import Container, ContainerState
from herder.queue.base import ContainerQueue, QueueEntry
from herder.units import format_duration

QUEUED = ContainerState.QUEUED
LOCKED = ContainerState.LOCKED
RUNNING = ContainerState.RUNNING


@dataclass(slots=True)
class SyncOutcome:
    """When sync needs to look again even if nothing changes (None: no need)."""

    recheck_at: float | None = None

    def want(self, when: float) -> None:
        if self.recheck_at is None or when < self.recheck_at:
            self.recheck_at = when


class Syncer:
    """Applies the table of SPEC §9.7 to one queue snapshot and one runner snapshot."""

    #: Re-examine soon a container whose runner exited after the queue snapshot was taken.
    EXIT_RECHECK_DELAY = 0.25

    def __init__(
        self,
        *,
        queue: ContainerQueue,
        ops: ContainerOps,
        logger: logging.Logger,
        lost_reason: Callable[[str], str] = lambda uuid: "",
    ) -> None:
        """``lost_reason(uuid)`` says why a container's runner is gone, when the pool knows
        (its instance left the cloud, or stopped answering past the probe timeout)."""
        self._queue = queue
        self._ops = ops
        self._lost_reason = lost_reason
        self._log = logger
        self._reported_bad_state = False

    def sync(
        self,
        *,
        now: float,
        running: Mapping[str, float],
        entries: Mapping[str, QueueEntry],
        attention: Mapping[str, QueueEntry],
        queue_time: float,
        any_unknown: bool,
    ) -> SyncOutcome:
        """One reconciliation.

        ``attention`` holds the entries that are neither Queued nor Locked or have priority 0;
        every other entry matters only if it has a runner, so only those two groups are
        visited, not the whole queue.
        """
        outcome = SyncOutcome()
        for uuid, entry in attention.items():
            self._check(
                entry.container, uuid in running, running, queue_time, any_unknown, now, outcome
            )
        for uuid in running:
            found = entries.get(uuid)
            if found is None:
                self._ops.kill(uuid, "not in queue")
            elif uuid not in attention:
                self._check(found.container, True, running, queue_time, any_unknown, now, outcome)
        return outcome

    def _check(
        self,
        ctr: Container,
        has_runner: bool,
        running: Mapping[str, float],
        queue_time: float,
        any_unknown: bool,
        now: float,
        outcome: SyncOutcome,
    ) -> None:
        uuid = ctr.uuid
        exited = running.get(uuid, 0.0) if has_runner else 0.0
        # An exit the queue snapshot may not reflect yet: decide on a newer snapshot.
        exit_known = exited > 0 and queue_time > exited
        if exited > 0 and not exit_known:
            outcome.want(exited + self.EXIT_RECHECK_DELAY)
        state = ctr.state
        if state is RUNNING:
            self._running(ctr, has_runner, exited, exit_known, any_unknown, now, outcome)
        elif state.final:
            if has_runner:
                self._ops.kill(uuid, f"state={state.value}")
            else:
                self._log.info("%s: container finished -- dropping from queue", uuid)
                self._queue.forget(uuid)
        elif state is QUEUED:
            if has_runner:
                self._ops.kill(uuid, "pool says running, but queue says state=Queued")
            elif ctr.priority < 1:
                self._log.info("%s: container on hold -- dropping from queue", uuid)
                self._queue.forget(uuid)
        elif state is LOCKED:
            if exit_known:
                self._ops.requeue(uuid, "crunch-run exited")
            elif has_runner and exited == 0 and ctr.priority < 1:
                self._ops.kill(uuid, "priority=0")
            elif not has_runner and ctr.priority < 1:
                self._ops.requeue(uuid, "priority=0")
        elif not self._reported_bad_state:
            self._reported_bad_state = True
            self._log.error("BUG: unexpected state %r for container %s", state, uuid)

    def _running(
        self,
        ctr: Container,
        has_runner: bool,
        exited: float,
        exit_known: bool,
        any_unknown: bool,
        now: float,
        outcome: SyncOutcome,
    ) -> None:
        uuid = ctr.uuid
        deadline = run_deadline(ctr)
        if deadline is not None and deadline <= now:
            limit = format_duration(ctr.scheduling_parameters.max_run_time)
            self._ops.cancel(uuid, f"max run time exceeded ({limit})", kill=True)
            return
        if deadline is not None:
            outcome.want(deadline)
        if not has_runner:
            # While some workers have not been probed yet, the runner may be on one of them.
            if not any_unknown:
                self._ops.retry(uuid, self._lost_reason(uuid) or "not running on any worker")
        elif exit_known:
            self._ops.retry(uuid, "state=Running after crunch-run exited")
        elif ctr.priority < 1:
            self._ops.cancel(uuid, "cancelled: priority set to 0")


def run_deadline(ctr: Container) -> float | None:
    """When a Running container exceeds its ``max_run_time``, or None without a limit."""
    limit = ctr.scheduling_parameters.max_run_time
    if limit <= 0 or ctr.started_at is None:
        return None
    return ctr.started_at + limit

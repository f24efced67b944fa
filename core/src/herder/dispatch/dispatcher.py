"""The generic dispatcher: takes containers from herder's queue and hands them to a function.

This is herder's version of Arvados' ``sdk/go/dispatch`` (SPEC §17), the helper its Slurm, LSF
and local dispatchers are built on.  One :class:`Dispatcher` watches one queue; it owns every
container it locked there, and after a restart it treats every Locked or Running container as its
own (herder's queue records no lock owner, and one queue is served by one dispatcher), handing
each to the function again so that it can re-attach or clean up.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from herder.dispatch.throttle import Throttle
from herder.dispatch.updates import CloseReason, Updates
from herder.model import Container, ContainerState
from herder.queue.base import ContainerNotFound, ContainerQueue, QueueError
from herder.queue.rules import waiting_for
from herder.runtime import Runtime, TimerHandle

log = logging.getLogger(__name__)

QUEUED, LOCKED, RUNNING = ContainerState.QUEUED, ContainerState.LOCKED, ContainerState.RUNNING
HELD_STATES = (LOCKED, RUNNING)
#: Seconds between queue polls when no change is reported (``poll_period``).
POLL_PERIOD = 10.0
#: Containers read from the queue at once (``batch_size``).
BATCH_SIZE = 100

#: The user function: called once per container, in the background, with its :class:`Job`.
RunFunction = Callable[["Job"], None]
#: Asked before locking a Queued container: False leaves it for another time (no capacity).
CanRun = Callable[[Container], bool]


class UpdateAction(enum.StrEnum):
    """What a backend does after an update (:meth:`Job.next_action`)."""

    KEEP = "keep"  # nothing to do
    FORGET = "forget"  # the dispatcher is shutting down: drop the job, leave the container
    STOP = "stop"  # stop the running work (cancelled, vanished, or given back)
    CANCEL = "cancel"  # priority 0: cancel the container, which then stops it


class Job:
    """One container handed to the run function: its first record, its updates, its actions.

    The function may return at once and react to ``updates`` later (event-driven), or run on
    its own thread and block in :meth:`Updates.wait` until the container ends.  Either way the
    dispatcher keeps tracking the container until it leaves Locked/Running or vanishes; then
    ``updates`` closes and says why.
    """

    def __init__(self, dispatcher: Dispatcher, container: Container) -> None:
        self.dispatcher = dispatcher
        self.container = container
        self.uuid = container.uuid
        self.updates = Updates(container)

    @property
    def queue(self) -> ContainerQueue:
        return self.dispatcher.queue

    def set_running(self, instance_id: str = "", instance_type: str = "") -> Container:
        """Locked → Running: the container has started."""
        return self.queue.set_running(self.uuid, instance_id, instance_type)

    def finish(self, exit_code: int) -> Container:
        """→ Complete with ``exit_code``."""
        return self.queue.finish(self.uuid, exit_code)

    def cancel(self, reason: str) -> Container:
        """→ Cancelled: the container can never run (the reason is recorded as its error)."""
        return self.queue.cancel(self.uuid, reason)

    def unlock(self) -> Container:
        """Locked → Queued: give the container back without having started it."""
        return self.queue.unlock(self.uuid)

    def retry(self, reason: str) -> Container:
        """Running → Queued: it was started but its run was lost; counts toward the cap."""
        return self.queue.retry(self.uuid, reason)

    def append_log(self, data: bytes) -> None:
        self.queue.append_log(self.uuid, data)

    def cancel_quietly(self, reason: str) -> None:
        """:meth:`cancel`, ignoring a queue that already moved on (e.g. it just finished)."""
        try:
            self.cancel(reason)
        except QueueError as exc:
            log.debug("not cancelling %s: %s", self.uuid, exc)

    def next_action(self) -> UpdateAction:
        """Read the newest update and say what a backend must do about it.

        The one rule every backend follows: a cancelled, vanished or released container is
        stopped; priority 0 on a held container cancels it (as Arvados' local dispatcher does);
        at shutdown the backend just forgets it, leaving it running for the next start.
        """
        latest = self.updates.take() or self.updates.latest
        reason = self.updates.close_reason
        if reason is CloseReason.SHUTDOWN:
            return UpdateAction.FORGET
        if latest.state is ContainerState.CANCELLED or reason in (
            CloseReason.VANISHED,
            CloseReason.RELEASED,
        ):
            return UpdateAction.STOP
        if latest.priority == 0 and not latest.state.final:
            return UpdateAction.CANCEL
        return UpdateAction.KEEP


@dataclass
class _Tracker:
    job: Job
    last: Container  # the newest record pushed, to push only real changes


class Dispatcher:
    """Watches ``queue`` and runs ``run(job)`` once for every container it takes.

    * Queued containers with priority > 0 are locked, highest priority first, as long as fewer
      than ``max_concurrent`` are held and ``can_run(container)`` agrees.
    * A container is tried no sooner than ``min_retry_period`` after its previous attempt
      started or failed.
    * The queue is read in pages of ``batch_size``, by state, never in full; a pass runs at once
      when the queue reports a change, and every ``poll_period`` in case it cannot.
    """

    def __init__(
        self,
        queue: ContainerQueue,
        run: RunFunction,
        *,
        runtime: Runtime,
        poll_period: float = POLL_PERIOD,
        min_retry_period: float = 0.0,
        batch_size: int = BATCH_SIZE,
        max_concurrent: int | None = None,
        can_run: CanRun | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.queue = queue
        self.runtime = runtime
        self.poll_period = poll_period
        self.batch_size = batch_size
        self.max_concurrent = max_concurrent
        self._run = run
        self._can_run = can_run
        self.throttle = Throttle(runtime, min_retry_period)
        self._lock = threading.Lock()
        self._trackers: dict[str, _Tracker] = {}
        self._trigger = runtime.trigger(self._pass)
        self._unsubscribe: Callable[[], None] | None = None
        self._poll_timer: TimerHandle | None = None
        self._retry_timer: TimerHandle | None = None
        self._running = False
        #: Completed passes (tests and status pages watch it).
        self.passes = 0

    # ---- lifecycle

    def start(self) -> None:
        """Subscribe to the queue and run the first pass (which recovers held containers)."""
        with self._lock:
            if self._running:
                return
            self._running = True
        self._unsubscribe = self.queue.subscribe(self._trigger.fire)
        self._trigger.fire()

    def stop(self) -> None:
        """Stop watching; close every stream with SHUTDOWN and leave the containers held."""
        with self._lock:
            self._running = False
            trackers = list(self._trackers.values())
            self._trackers.clear()
            timers = (self._poll_timer, self._retry_timer)
        if self._unsubscribe is not None:
            self._unsubscribe()
        for timer in timers:
            if timer is not None:
                timer.cancel()
        for tracker in trackers:
            tracker.job.updates.close(CloseReason.SHUTDOWN)

    def poll(self) -> None:
        """Ask for a pass soon (coalesced with any pending one)."""
        self._trigger.fire()

    # ---- reads

    def held(self) -> list[Container]:
        """Newest records of the containers this dispatcher tracks."""
        with self._lock:
            return [t.last for t in self._trackers.values()]

    def job(self, uuid: str) -> Job | None:
        with self._lock:
            tracker = self._trackers.get(uuid)
        return tracker.job if tracker else None

    # ---- TrackContainer

    def track(self, uuid: str) -> Job | None:
        """Hand ``uuid`` to the function whatever its state (Arvados ``TrackContainer``).

        For cleanup: a container that is already final gets a job whose stream is closed at
        once, so the function can remove what an earlier run left behind.  A container already
        tracked, or unknown, is left alone (None).
        """
        ctr = self.queue.get(uuid)
        if ctr is None:
            return None
        with self._lock:
            if uuid in self._trackers:
                return None
        job = self._start(ctr)
        if ctr.state not in HELD_STATES:
            self._drop(uuid, CloseReason.FINAL if ctr.state.final else CloseReason.RELEASED, ctr)
        return job

    # ---- the pass

    def _pass(self) -> None:
        with self._lock:
            if not self._running:
                return
            todo = set(self._trackers)
        held = self._read_held(todo)  # the throttled ones, still to adopt
        candidates = self._read_queued(todo)
        self._check_missing(todo)
        ordered = sorted(candidates, key=lambda c: (-c.priority, c.created_at))
        throttled = held + self._lock_candidates(ordered)
        self._schedule_next_pass(throttled)
        self.passes += 1

    def _pages(self, states: tuple[ContainerState, ...]) -> Iterator[Container]:
        """Every container in ``states``, read ``batch_size`` at a time by uuid."""
        after = ""
        while True:
            page = self.queue.list(states, self.batch_size, after)
            yield from page
            if len(page) < self.batch_size:
                return
            after = page[-1].uuid

    def _read_held(self, todo: set[str]) -> list[Container]:
        """Update tracked Locked/Running containers; adopt untracked ones (restart recovery)."""
        adopt_later: list[Container] = []
        for ctr in self._pages(HELD_STATES):
            todo.discard(ctr.uuid)
            if not self._update(ctr):
                adopt_later.append(ctr)
        throttled = []
        for ctr in adopt_later:
            if self.throttle.check(ctr.uuid):
                log.info("taking up %s (%s), held by this dispatcher", ctr.uuid, ctr.state.value)
                self._start(ctr)
            else:
                throttled.append(ctr)
        return throttled

    def _read_queued(self, todo: set[str]) -> list[Container]:
        """Release trackers of containers back in Queued; return the ones worth locking (not
        on hold, and not waiting for others: ``submit --after``)."""
        candidates = []
        for ctr in self._pages((QUEUED,)):
            if ctr.uuid in todo:
                todo.discard(ctr.uuid)
                self._drop(ctr.uuid, CloseReason.RELEASED, ctr)
            if ctr.priority > 0 and not (ctr.runtime_status and waiting_for(ctr)):
                candidates.append(ctr)
        return candidates

    def _check_missing(self, todo: set[str]) -> None:
        """Tracked containers no state query returned: final now, or gone from the queue."""
        for uuid in todo:
            ctr = self.queue.get(uuid)
            if ctr is None:
                log.info("container %s not returned by any query, stopping tracking", uuid)
                self._drop(uuid, CloseReason.VANISHED, None)
            elif ctr.state.final:
                self._drop(uuid, CloseReason.FINAL, ctr)
            elif ctr.state is QUEUED:
                self._drop(uuid, CloseReason.RELEASED, ctr)
            else:
                self._update(ctr)  # changed between the two reads

    def _lock_candidates(self, candidates: list[Container]) -> list[Container]:
        """Lock what there is room for, best first; return the ones held back by the throttle."""
        throttled = []
        for ctr in candidates:
            if not self._has_room(ctr):
                continue
            if not self.throttle.check(ctr.uuid):
                throttled.append(ctr)
                continue
            try:
                locked = self.queue.lock(ctr.uuid)
            except QueueError as exc:  # changed since read, or cancelled meanwhile
                log.debug("not locking %s: %s", ctr.uuid, exc)
                continue
            self._start(locked)
        return throttled

    def _has_room(self, ctr: Container) -> bool:
        with self._lock:
            count = len(self._trackers)
        if self.max_concurrent is not None and count >= self.max_concurrent:
            return False
        return self._can_run is None or self._can_run(ctr)

    def _schedule_next_pass(self, throttled: list[Container]) -> None:
        """The fallback poll, and a wake-up when the earliest throttled container may go."""
        with self._lock:
            if not self._running:
                return
            if self._poll_timer is not None:
                self._poll_timer.cancel()
            self._poll_timer = self.runtime.call_later(self.poll_period, self._trigger.fire)
        due = [t for c in throttled if (t := self.throttle.next_allowed(c.uuid)) is not None]
        if due:
            with self._lock:
                if self._retry_timer is not None:
                    self._retry_timer.cancel()
                self._retry_timer = self.runtime.call_at(min(due), self._trigger.fire)

    # ---- trackers

    def _update(self, ctr: Container) -> bool:
        """Push a changed record to its tracker; False if the container is not tracked."""
        with self._lock:
            tracker = self._trackers.get(ctr.uuid)
            if tracker is None:
                return False
            changed = tracker.last != ctr
            tracker.last = ctr
        if changed:
            tracker.job.updates.push(ctr)
        return True

    def _start(self, ctr: Container) -> Job:
        job = Job(self, ctr)
        with self._lock:
            self._trackers[ctr.uuid] = _Tracker(job, ctr)
        self.runtime.spawn(lambda: self._call(job))
        return job

    def _call(self, job: Job) -> None:
        """Run the function; if it fails, record why and give the container back."""
        try:
            self._run(job)
        except Exception as exc:
            log.exception("error running container %s", job.uuid)
            self._fall_back(job, f"Error running container {job.uuid}: {exc}")

    def _fall_back(self, job: Job, message: str) -> None:
        self.throttle.failed(job.uuid)  # before the unlock, so no pass can take it back at once
        try:
            job.append_log(f"dispatch: {message}\n".encode())
            ctr = self.queue.get(job.uuid)
            if ctr is not None and ctr.state is LOCKED:
                job.unlock()
            elif ctr is not None and ctr.state is RUNNING:
                job.retry(message)
        except (QueueError, ContainerNotFound) as exc:
            log.warning("cannot give back %s after a failure: %s", job.uuid, exc)

    def _drop(self, uuid: str, reason: CloseReason, last: Container | None) -> None:
        with self._lock:
            tracker = self._trackers.pop(uuid, None)
        if tracker is None:
            return
        if reason is not CloseReason.FINAL:
            self.throttle.failed(uuid)
        log.debug("stopped tracking %s: %s", uuid, reason.value)
        tracker.job.updates.close(reason, last)

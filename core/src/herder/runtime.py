"""Time and background work, injectable.

Every part of the engine that waits, times out or does slow work in the background goes through a
:class:`Runtime`.  Two implementations exist:

* :class:`ThreadRuntime` runs background work on a bounded thread pool and timers on one timer
  thread, against the wall clock.  ``herder serve`` uses it.
* :class:`VirtualRuntime` runs everything on the calling thread, in order, against a virtual clock
  that jumps straight to the next due event.  Unit tests use it so that a ten-minute boot timeout
  is tested in microseconds without a single ``sleep``; ``herder simulate`` uses it to run a
  simulated hour in seconds.

Because of the virtual runtime, engine code never blocks waiting for another part of the engine:
it reacts to events (a notification, a timer) instead.  Slow work (an SSH command, a cloud call)
is a plain blocking call made from a task started with :meth:`Runtime.spawn`.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger(__name__)

Task = Callable[[], Any]


class TimerHandle:
    """A scheduled call that can still be cancelled."""

    __slots__ = ("_cancelled", "due", "fn")

    def __init__(self, due: float, fn: Task) -> None:
        self.due = due
        self.fn = fn
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled


class Runtime(ABC):
    """Clock, background tasks and timers for the engine."""

    @abstractmethod
    def now(self) -> float:
        """Seconds since the epoch (virtual or real)."""

    @abstractmethod
    def spawn(self, fn: Task) -> None:
        """Run ``fn`` in the background, soon.  Exceptions are logged, never propagated."""

    @abstractmethod
    def call_at(self, when: float, fn: Task) -> TimerHandle:
        """Run ``fn`` in the background at time ``when`` (or soon after)."""

    def call_later(self, delay: float, fn: Task) -> TimerHandle:
        return self.call_at(self.now() + max(0.0, delay), fn)

    @abstractmethod
    def shutdown(self) -> None:
        """Stop running timers and background tasks started after this call."""

    def trigger(self, fn: Task) -> Trigger:
        """A coalescing trigger for ``fn``: see :class:`Trigger`."""
        return Trigger(self, fn)


class Trigger:
    """Runs a function soon after :meth:`fire`, never twice at once, coalescing bursts.

    Firing while the function runs makes it run once more afterwards, so no change is missed;
    firing ten times while it waits to start runs it once.  This is how the scheduler is woken
    by queue and pool changes without a polling delay.
    """

    def __init__(self, runtime: Runtime, fn: Task) -> None:
        self._runtime = runtime
        self._fn = fn
        self._lock = threading.Lock()
        self._scheduled = False
        self._running = False
        self._again = False

    def fire(self) -> None:
        with self._lock:
            if self._running:
                self._again = True
                return
            if self._scheduled:
                return
            self._scheduled = True
        self._runtime.spawn(self._run)

    def _run(self) -> None:
        with self._lock:
            self._scheduled = False
            if self._running:
                self._again = True
                return
            self._running = True
        try:
            while True:
                try:
                    self._fn()
                except Exception:
                    log.exception("triggered task %r failed", self._fn)
                with self._lock:
                    if not self._again:
                        self._running = False
                        return
                    self._again = False
        except BaseException:
            with self._lock:
                self._running = False
            raise


class ThreadRuntime(Runtime):
    """Wall-clock runtime: a bounded thread pool for tasks and one thread for timers."""

    def __init__(self, max_workers: int = 64) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="herder")
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._timer_thread = threading.Thread(
            target=self._timer_loop, name="herder-timers", daemon=True
        )
        self._timer_thread.start()

    def now(self) -> float:
        return time.time()

    def spawn(self, fn: Task) -> None:
        if self._stopped:
            return
        with contextlib.suppress(RuntimeError):  # pool shut down concurrently
            self._pool.submit(self._guard, fn)

    @staticmethod
    def _guard(fn: Task) -> None:
        try:
            fn()
        except Exception:
            log.exception("background task %r failed", fn)

    def call_at(self, when: float, fn: Task) -> TimerHandle:
        handle = TimerHandle(when, fn)
        with self._cond:
            heapq.heappush(self._heap, (when, next(self._seq), handle))
            self._cond.notify()
        return handle

    def _timer_loop(self) -> None:
        with self._cond:
            while not self._stopped:
                if not self._heap:
                    self._cond.wait()
                    continue
                due, _, handle = self._heap[0]
                delay = due - time.time()
                if delay > 0:
                    self._cond.wait(timeout=min(delay, 3600.0))
                    continue
                heapq.heappop(self._heap)
                if not handle.cancelled:
                    self.spawn(handle.fn)

    def shutdown(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._pool.shutdown(wait=False, cancel_futures=True)


class VirtualRuntime(Runtime):
    """Deterministic single-threaded runtime on a virtual clock.

    Nothing runs until the owner calls :meth:`run_until_idle`, :meth:`advance` or
    :meth:`run_until`: tasks then run one at a time in (due time, submission) order, and the clock
    jumps to each timer's due time.  With ``strict=True`` (the default, for tests) an exception in
    a task propagates to the caller instead of being logged, so bugs are not hidden.
    """

    def __init__(self, start: float = 1_700_000_000.0, *, strict: bool = True) -> None:
        self._now = start
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()
        self._stopped = False
        self.strict = strict
        self.tasks_run = 0

    def now(self) -> float:
        return self._now

    def spawn(self, fn: Task) -> None:
        if not self._stopped:
            heapq.heappush(self._heap, (self._now, next(self._seq), TimerHandle(self._now, fn)))

    def call_at(self, when: float, fn: Task) -> TimerHandle:
        handle = TimerHandle(max(when, self._now), fn)
        if not self._stopped:
            heapq.heappush(self._heap, (handle.due, next(self._seq), handle))
        return handle

    def shutdown(self) -> None:
        self._stopped = True
        self._heap.clear()

    def next_due(self) -> float | None:
        """Due time of the next pending task, or None."""
        while self._heap and self._heap[0][2].cancelled:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def _run_one(self) -> None:
        due, _, handle = heapq.heappop(self._heap)
        if handle.cancelled:
            return
        if due > self._now:
            self._now = due
        self.tasks_run += 1
        if self.strict:
            handle.fn()
            return
        try:
            handle.fn()
        except Exception:
            log.exception("virtual task %r failed", handle.fn)

    def run_until(self, when: float, max_tasks: int | None = None) -> None:
        """Run every task due at or before ``when``, then set the clock to ``when``."""
        count = 0
        while True:
            due = self.next_due()
            if due is None or due > when:
                break
            self._run_one()
            count += 1
            if max_tasks is not None and count >= max_tasks:
                raise RuntimeError(f"more than {max_tasks} tasks before {when}: runaway loop?")
        if when > self._now:
            self._now = when

    def advance(self, seconds: float) -> None:
        """Move the clock forward, running everything that falls due on the way."""
        self.run_until(self._now + seconds)

    def run_until_idle(self, max_tasks: int = 1_000_000) -> None:
        """Run tasks due now (not future timers) until none are left."""
        self.run_until(self._now, max_tasks=max_tasks)

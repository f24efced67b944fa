"""Give back locks a previous herder process left behind (SPEC §9.8).

After a restart, Locked containers may be preparing on instances herder has not probed yet, or
may have been abandoned when the old process stopped.  Until every instance has been probed
(no worker is in state unknown) nobody can tell which; the fixer waits for that, but no longer
than ``containers.stale_lock_timeout``, then unlocks the Locked containers no runner has.

It reacts to pool notifications instead of blocking: the scheduler calls :meth:`check` whenever
the pool changes or the timer fires, until it returns a decision.

Arvados computed the list of stale containers *before* waiting for the probe that ended the
wait, so a container that probe found preparing was unlocked anyway, then killed, burning a
dispatch attempt (SPEC §19.1 item 1).  herder computes the list after the wait.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from herder.engine.worker.interfaces import WorkerPool
from herder.model import ContainerState, WorkerState
from herder.queue.base import ContainerQueue, QueueError
from herder.runtime import Runtime, TimerHandle


class StaleLockFixer:
    """Decides, once, which Locked containers to unlock at startup."""

    def __init__(
        self,
        *,
        runtime: Runtime,
        queue: ContainerQueue,
        pool: WorkerPool,
        timeout: float,
        on_timeout: Callable[[], None],
        logger: logging.Logger,
    ) -> None:
        self._runtime = runtime
        self._queue = queue
        self._pool = pool
        self._timeout = timeout
        self._on_timeout = on_timeout
        self._log = logger
        self._deadline: float | None = None
        self._timer: TimerHandle | None = None

    def check(self) -> list[str] | None:
        """The uuids to unlock, or None to keep waiting for the pool."""
        first = self._deadline is None
        if first:
            self._deadline = self._runtime.now() + self._timeout
            self._log.info(
                "fixing stale locks: waiting up to %gs for unknown workers", self._timeout
            )
        unknown = self._pool.count_workers().get(WorkerState.UNKNOWN, 0)
        if unknown == 0:
            # With no unknown worker at startup there is nothing to find out: Locked containers
            # without a runner are simply started by the scheduler, as in Arvados.
            return self._done([] if first else self._stale())
        stale = self._stale()
        if not stale:
            return self._done([])
        assert self._deadline is not None
        if self._runtime.now() >= self._deadline:
            self._log.info("fixing stale locks: gave up waiting for %d unknown workers", unknown)
            return self._done(stale)
        if self._timer is None:
            self._timer = self._runtime.call_at(self._deadline, self._on_timeout)
        return None

    def _stale(self) -> list[str]:
        """Locked containers that no runner has, as of now."""
        running = self._pool.running()
        entries, _ = self._queue.entries()
        return sorted(
            uuid
            for uuid, entry in entries.items()
            if entry.container.state is ContainerState.LOCKED and uuid not in running
        )

    def _done(self, stale: list[str]) -> list[str]:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return stale

    def unlock(self, uuids: list[str]) -> None:
        """Unlock the stale containers (blocking: run it as a task)."""
        for uuid in uuids:
            self._log.info("%s: unlocking stale lock left by a previous dispatcher", uuid)
            try:
                self._queue.unlock(uuid)
            except QueueError as err:
                self._log.warning("%s: error unlocking stale lock: %s", uuid, err)
        self._log.info("fixing stale locks: done, %d unlocked", len(uuids))

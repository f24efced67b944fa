"""Changes the scheduler makes to one container, in the background, one at a time (SPEC §9.4).

Queue changes block on storage, so they run as runtime tasks, never inside a pass.  At most one
operation per container is in flight: a second one (say, a kill while an unlock is still being
written) is dropped, and the scheduler is woken 250 ms later to decide again with fresh data.
That keeps two tasks from racing on one container, e.g. unlocking it while it is being started.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from herder.engine.worker.interfaces import WorkerPool
from herder.model import ContainerState
from herder.queue.base import ContainerQueue, QueueError
from herder.runtime import Runtime

#: How soon the scheduler retries after finding an operation already in progress.
RETRY_DELAY = 0.25


class ContainerOps:
    """Starts per-container operations; each holds the container's operation lock until done."""

    def __init__(
        self,
        *,
        runtime: Runtime,
        queue: ContainerQueue,
        pool: WorkerPool,
        retry_soon: Callable[[float], None],
        logger: logging.Logger,
    ) -> None:
        self._runtime = runtime
        self._queue = queue
        self._pool = pool
        self._retry_soon = retry_soon
        self._log = logger
        self._mtx = threading.Lock()
        self._in_progress: dict[str, str] = {}

    # ---- the per-uuid lock

    def try_begin(self, uuid: str, op: str) -> bool:
        """Take the operation lock of ``uuid`` for ``op``; False (and a retry soon) if taken."""
        with self._mtx:
            current = self._in_progress.get(uuid)
            if current is None:
                self._in_progress[uuid] = op
                return True
        self._log.debug("%s: not starting %s, %s in progress", uuid, op, current)
        self._retry_soon(RETRY_DELAY)
        return False

    def end(self, uuid: str) -> None:
        with self._mtx:
            self._in_progress.pop(uuid, None)

    def in_progress(self, uuid: str) -> str | None:
        """The operation running for ``uuid``, if any."""
        with self._mtx:
            return self._in_progress.get(uuid)

    def _launch(self, uuid: str, op: str, work: Callable[[], None]) -> bool:
        if not self.try_begin(uuid, op):
            return False

        def task() -> None:
            try:
                work()
            finally:
                self.end(uuid)

        self._runtime.spawn(task)
        return True

    # ---- operations

    def lock(self, uuid: str) -> bool:
        """Lock a Queued container (SPEC §9.6); the pass that sees it Locked starts it."""
        return self._launch(uuid, "lock", lambda: self._lock(uuid))

    def _lock(self, uuid: str) -> None:
        current = self._queue.get(uuid)
        if current is None or current.state is not ContainerState.QUEUED:
            # Cancelled, or locked by an earlier pass's task: the next pass reacts.
            self._log.debug("%s: no longer queued when about to lock, not locking", uuid)
            return
        try:
            self._queue.lock(uuid)
        except QueueError as err:
            self._log.warning("%s: error locking container: %s", uuid, err)
            return
        after = self._queue.get(uuid)
        if after is None:
            self._log.error(
                "%s: (BUG?) container disappeared from queue after lock succeeded", uuid
            )
        elif after.state is not ContainerState.LOCKED:
            self._log.warning(
                "%s: (race?) container has state=%s after lock succeeded", uuid, after.state.value
            )

    def unlock(self, uuid: str, why: str) -> bool:
        """Give a Locked container back to the queue (counts towards the attempt cap)."""
        return self._launch(uuid, "unlock", lambda: self._unlock(uuid, why))

    def requeue(self, uuid: str, why: str) -> bool:
        """Unlock a Locked container whose runner exited or whose priority dropped to 0."""
        return self._launch(uuid, "requeue", lambda: self._unlock(uuid, why))

    def _unlock(self, uuid: str, why: str) -> None:
        self._log.info("%s: unlocking container because %s", uuid, why)
        try:
            self._queue.unlock(uuid)
        except QueueError as err:
            self._log.warning("%s: error unlocking container: %s", uuid, err)

    def cancel(self, uuid: str, reason: str, *, kill: bool = False) -> bool:
        """Cancel a container; with ``kill``, also stop its runner at once."""
        return self._launch(uuid, "cancel", lambda: self._cancel(uuid, reason, kill))

    def _cancel(self, uuid: str, reason: str, kill: bool) -> None:
        self._log.info("%s: cancelling container because %s", uuid, reason)
        try:
            self._queue.cancel(uuid, reason)
        except QueueError as err:
            self._log.warning("%s: error cancelling container: %s", uuid, err)
        if kill:
            self._pool.kill_container(uuid, reason)

    def retry(self, uuid: str, reason: str) -> bool:
        """Requeue a container whose runner was lost (cancelled instead past the attempt cap)."""
        return self._launch(uuid, "retry", lambda: self._retry(uuid, reason))

    def _retry(self, uuid: str, reason: str) -> None:
        self._log.info("%s: retrying container because %s", uuid, reason)
        try:
            self._queue.retry(uuid, reason)
        except QueueError as err:
            self._log.warning("%s: error retrying container: %s", uuid, err)

    def kill(self, uuid: str, reason: str) -> bool:
        """Stop the container's runner and drop the pool's record of it (SPEC §9.7).

        Forgetting is what clears the placeholder the pool keeps for an exited runner.
        """
        return self._launch(uuid, "kill", lambda: self._kill(uuid, reason))

    def _kill(self, uuid: str, reason: str) -> None:
        # Most kills of finished containers only clear the record of a runner that has already
        # exited: say "killing" only when a runner was there to kill.
        if self._pool.kill_container(uuid, reason):
            self._log.info("%s: killing runner because %s", uuid, reason)
        else:
            self._log.debug("%s: no runner left to kill (%s); forgetting it", uuid, reason)
        self._pool.forget_container(uuid)

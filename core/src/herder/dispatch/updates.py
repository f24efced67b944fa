"""The stream of later records of one container, as its run function sees it.

A one-slot mailbox: the dispatcher never waits for the function to read, so a slow function
keeps only the newest record (SPEC §17 ``tracker.update``: "latest wins").  Functions that run on
a thread of their own may block in :meth:`Updates.wait`; event-driven functions register a
callback with :meth:`Updates.listen` instead.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable

from herder.model import Container

log = logging.getLogger(__name__)


class CloseReason(enum.StrEnum):
    """Why the dispatcher stopped sending updates for a container."""

    #: The container reached Complete or Cancelled; the last update is its final record.
    FINAL = "final"
    #: The container went back to Queued (unlocked or retried): it is no longer ours.
    RELEASED = "released"
    #: The queue no longer returns the container at all.
    VANISHED = "vanished"
    #: The dispatcher is stopping; the container is still ours and is picked up at next start.
    SHUTDOWN = "shutdown"


class Updates:
    """Newest record of one container, replaced (never queued) as changes arrive."""

    def __init__(self, first: Container) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._latest = first
        self._fresh = True
        self._close_reason: CloseReason | None = None
        self._listeners: list[Callable[[], None]] = []
        #: How many records were replaced before the function took them.
        self.dropped = 0

    # ---- dispatcher side

    def push(self, container: Container) -> None:
        """Offer a newer record; an unread older one is discarded, so this never blocks."""
        with self._cond:
            if self._close_reason is not None:
                return
            if self._fresh:
                self.dropped += 1
                log.debug("slow consumer: discarded an unread update of %s", container.uuid)
            self._latest, self._fresh = container, True
            self._cond.notify_all()
        self._tell_listeners()

    def close(self, reason: CloseReason, last: Container | None = None) -> None:
        """End the stream, after delivering ``last`` (the final record) if given.  Idempotent."""
        with self._cond:
            if self._close_reason is not None:
                return
            if last is not None and last != self._latest:
                if self._fresh:
                    self.dropped += 1
                self._latest, self._fresh = last, True
            self._close_reason = reason
            self._cond.notify_all()
        self._tell_listeners()

    # ---- function side

    @property
    def latest(self) -> Container:
        """The newest record seen, whether or not it was taken."""
        with self._cond:
            return self._latest

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._close_reason is not None

    @property
    def close_reason(self) -> CloseReason | None:
        with self._cond:
            return self._close_reason

    def take(self) -> Container | None:
        """The newest record not taken yet, or None; never blocks."""
        with self._cond:
            if not self._fresh:
                return None
            self._fresh = False
            return self._latest

    def wait(self, timeout: float | None = None) -> Container | None:
        """Block until a record is fresh or the stream closes.

        Only for functions running on a thread of their own (a wall-clock runtime): under a
        virtual runtime nothing else can run while this blocks.
        """
        with self._cond:
            self._cond.wait_for(lambda: self._fresh or self._close_reason is not None, timeout)
            if not self._fresh:
                return None
            self._fresh = False
            return self._latest

    def listen(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after every push and at close; it must return quickly.

        It runs on the dispatcher's thread, so it should only fire a trigger or set a flag.
        Registering on a stream that already has a fresh record or is closed calls it at once,
        so nothing is missed between the function starting and listening.
        """
        with self._cond:
            self._listeners.append(callback)
            pending = self._fresh or self._close_reason is not None
        if pending:
            callback()

    def _tell_listeners(self) -> None:
        with self._cond:
            listeners = list(self._listeners)
        for callback in listeners:
            try:
                callback()
            except Exception:
                log.exception("update listener %r failed", callback)

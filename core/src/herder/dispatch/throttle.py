"""How soon a container may be tried again (SPEC §17 ``throttle``)."""

from __future__ import annotations

import threading

from herder.runtime import Runtime


class Throttle:
    """Allows one attempt per container per ``hold`` seconds.

    Arvados' throttle counts from the last *allowed* attempt only; herder also restarts the
    period when an attempt fails, so that a container that failed after running for a while is
    not retried the moment it is unlocked: "no sooner than ``hold`` after a failed attempt".
    Entries older than ``hold`` are pruned on each check, so memory follows the recent failures,
    not the whole history of the queue.
    """

    def __init__(self, runtime: Runtime, hold: float) -> None:
        self._runtime = runtime
        self.hold = hold
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def check(self, uuid: str) -> bool:
        """True (and the attempt recorded) if ``uuid`` may be tried now."""
        if self.hold <= 0:
            return True
        now = self._runtime.now()
        with self._lock:
            self._prune(now)
            last = self._last.get(uuid)
            if last is not None and now < last + self.hold:
                return False
            self._last[uuid] = now
            return True

    def failed(self, uuid: str) -> None:
        """An attempt ended without finishing the container: restart its hold period."""
        if self.hold > 0:
            with self._lock:
                self._last[uuid] = self._runtime.now()

    def next_allowed(self, uuid: str) -> float | None:
        """When ``uuid`` may be tried again, or None if it may be tried now."""
        with self._lock:
            last = self._last.get(uuid)
        if last is None or self._runtime.now() >= last + self.hold:
            return None
        return last + self.hold

    def _prune(self, now: float) -> None:
        expired = [u for u, t in self._last.items() if now >= t + self.hold]
        for uuid in expired:
            del self._last[uuid]

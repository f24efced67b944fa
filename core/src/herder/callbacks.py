"""A set of callbacks that other parts register with, for change notifications.

The queue and the pool tell the scheduler, the API and the metrics about changes this way.
Callbacks are called outside the owner's locks, in registration order, and one that raises is
logged without keeping the others from being called.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Generic, ParamSpec

P = ParamSpec("P")


class Callbacks(Generic[P]):
    """Registered callbacks of one kind; ``what`` names them in error logs."""

    def __init__(self, what: str, logger: logging.Logger) -> None:
        self._what = what
        self._log = logger
        self._lock = threading.Lock()
        self._items: list[Callable[P, object]] = []

    def add(self, callback: Callable[P, object]) -> Callable[[], None]:
        """Register ``callback``; returns the function that removes it again."""
        with self._lock:
            self._items.append(callback)

        def remove() -> None:
            with self._lock:
                if callback in self._items:
                    self._items.remove(callback)

        return remove

    def call(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Call every callback with these arguments (the caller must hold no lock)."""
        with self._lock:
            items = list(self._items)
        for callback in items:
            try:
                callback(*args, **kwargs)
            except Exception:
                self._log.exception("%s %r failed", self._what, callback)

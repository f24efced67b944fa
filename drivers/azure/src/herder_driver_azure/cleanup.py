"""Deleting the NICs and disks that herder's VMs left behind (SPEC §16.3, improved).

New VMs are created with ``deleteOption: Delete`` on their NIC and disks, so Azure removes
them with the VM.  What can still dangle: the NIC of a create that failed before the VM
existed and could not be deleted at once, and resources of VMs made elsewhere or deleted by
hand.  The driver looks for them in every listing (NICs) and every ``cleanup_interval``
(NICs and managed disks), and deletes those that carry its name prefix, are attached to
nothing, and are older than ``delete_dangling_resources_after``.

Deletions run on a small thread pool (``cleanup_parallelism``), one per resource at a time
(a resource already queued is not queued again).  :meth:`Cleaner.stop` closes it: later
requests are ignored, queued ones are dropped, and running ones are waited for.  Arvados'
driver closed its channels and panicked when a later listing found a dangling NIC (SPEC §19
item 32); here every submission checks, under the same lock that ``stop`` takes, whether the
pool is still open.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass


@dataclass(frozen=True)
class Dangling:
    """A resource to delete: its kind (``nic`` or ``disk``) and name."""

    kind: str
    name: str


class Cleaner:
    """Deletes dangling resources in the background; thread-safe.

    ``find()`` lists every dangling resource (the periodic sweep); ``delete(item)`` deletes
    one, blocking.  The periodic sweep runs on a thread of its own every ``interval`` seconds
    until :meth:`stop`; tests call :meth:`sweep` directly instead of waiting for it.
    """

    def __init__(
        self,
        find: Callable[[], Iterable[Dangling]],
        delete: Callable[[Dangling], None],
        *,
        parallelism: int,
        interval: float,
        logger: logging.Logger,
    ) -> None:
        self._find = find
        self._delete = delete
        self._interval = interval
        self._log = logger
        self._lock = threading.Lock()  # guards the three fields below
        self._closed = False
        self._queued: set[Dangling] = set()
        self._pool: ThreadPoolExecutor | None = None
        self._parallelism = parallelism
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the periodic sweep (once)."""
        with self._lock:
            if self._closed or self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._loop, name="herder-azure-cleanup", daemon=True
            )
            self._thread.start()

    def _loop(self) -> None:
        while not self._stopping.wait(self._interval):
            try:
                self.sweep()
            except Exception as exc:
                self._log.warning("cannot look for dangling NICs and disks: %s", exc)

    def sweep(self) -> list[Future[None]]:
        """Look for dangling resources now and queue their deletion (not once stopped)."""
        with self._lock:
            if self._closed:
                return []
        return self.submit(self._find())

    def submit(self, items: Iterable[Dangling]) -> list[Future[None]]:
        """Queue the deletion of ``items`` (those not queued already); a no-op once stopped."""
        futures: list[Future[None]] = []
        for item in items:
            with self._lock:
                if self._closed or item in self._queued:
                    continue
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(
                        max_workers=self._parallelism, thread_name_prefix="herder-azure-delete"
                    )
                self._queued.add(item)
                futures.append(self._pool.submit(self._run, item))
        return futures

    def _run(self, item: Dangling) -> None:
        try:
            if not self._stopping.is_set():
                self._log.info("deleting dangling %s %s", item.kind, item.name)
                self._delete(item)
        except Exception as exc:
            self._log.warning("cannot delete dangling %s %s: %s", item.kind, item.name, exc)
        finally:
            with self._lock:
                self._queued.discard(item)

    def stop(self) -> None:
        """Stop sweeping and deleting; wait for deletions already running.  Idempotent."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
            thread = self._thread
        self._stopping.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

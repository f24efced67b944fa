"""The clean-up pool on its own: bounded, deduplicated, and closed cleanly by stop()."""

from __future__ import annotations

import logging
import threading

from herder_driver_azure.cleanup import Cleaner, Dangling

LOG = logging.getLogger("test")


def test_deletions_run_at_most_parallelism_at_once_and_once_each() -> None:
    lock = threading.Condition()
    active, peak, deleted = [0], [0], []
    go = threading.Event()

    def delete(item: Dangling) -> None:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            lock.notify_all()
        go.wait(timeout=30)
        with lock:
            active[0] -= 1
            deleted.append(item.name)

    cleaner = Cleaner(list, delete, parallelism=2, interval=3600, logger=LOG)
    items = [Dangling("nic", f"n{i}") for i in range(5)]
    futures = cleaner.submit(items)
    assert cleaner.submit(items[:3]) == []  # already queued: not again
    with lock:
        assert lock.wait_for(lambda: active[0] == 2, timeout=30)
    go.set()
    for future in futures:
        future.result()
    assert peak[0] == 2
    assert sorted(deleted) == [i.name for i in items]
    cleaner.stop()


def test_a_failed_deletion_is_logged_and_may_be_retried() -> None:
    calls: list[str] = []

    def delete(item: Dangling) -> None:
        calls.append(item.name)
        raise RuntimeError("busy")

    cleaner = Cleaner(list, delete, parallelism=1, interval=3600, logger=LOG)
    for _ in range(2):
        for future in cleaner.submit([Dangling("disk", "d")]):
            future.result()
    assert calls == ["d", "d"]
    cleaner.stop()


def test_stop_ends_the_sweep_thread_and_later_submissions_are_ignored() -> None:
    found: list[Dangling] = []
    cleaner = Cleaner(lambda: found, lambda item: None, parallelism=1, interval=3600, logger=LOG)
    cleaner.start()
    cleaner.start()  # once only
    assert [t.name for t in threading.enumerate()].count("herder-azure-cleanup") == 1
    cleaner.stop()
    cleaner.stop()  # idempotent
    assert "herder-azure-cleanup" not in [t.name for t in threading.enumerate()]
    found.append(Dangling("nic", "late"))
    assert cleaner.submit(found) == [] and cleaner.sweep() == []
    cleaner.start()  # a stopped cleaner does not start again
    assert "herder-azure-cleanup" not in [t.name for t in threading.enumerate()]

"""The scheduler's and the queue's Prometheus metrics (SPEC §9.9, §7.7, §13.3)."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Gauge

from herder.engine.worker.interfaces import WorkerPool


class SchedulerMetrics:
    """Gauges updated after every pass; ``at_quota`` is read live from the pool."""

    def __init__(self, registry: CollectorRegistry, pool: WorkerPool) -> None:
        self.allocated_not_started = Gauge(
            "herder_containers_allocated_not_started",
            "Number of containers allocated to a worker but not started yet (worker is booting).",
            registry=registry,
        )
        self.not_allocated_over_quota = Gauge(
            "herder_containers_not_allocated_over_quota",
            "Number of containers not allocated to a worker because the system has hit a quota.",
            registry=registry,
        )
        self.longest_wait_time = Gauge(
            "herder_containers_longest_wait_time_seconds",
            "Current longest wait time of any container since queuing, and before the start "
            "of crunch-run.",
            registry=registry,
        )
        self.max_concurrent_containers = Gauge(
            "herder_max_concurrent_containers",
            "Dynamically assigned limit on number of containers scheduled concurrency, set "
            "after reaching cloud quota.",
            registry=registry,
        )
        self.at_quota = Gauge(
            "herder_at_quota",
            "Flag indicating the cloud driver is reporting an at-quota condition.",
            registry=registry,
        )
        self.at_quota.set_function(lambda: 1.0 if pool.at_quota() else 0.0)
        self.queue_entries = Gauge(
            "herder_queue_entries",
            "Number of active container entries in the queue, by state and first eligible "
            "instance type.",
            ["state", "instance_type"],
            registry=registry,
        )
        self._labels_seen: set[tuple[str, str]] = set()

    def set_queue_entries(self, counts: Mapping[tuple[str, str], int]) -> None:
        """Counts per (state, instance type); series seen before but now empty read 0."""
        for labels in self._labels_seen - counts.keys():
            self.queue_entries.labels(*labels).set(0)
        for labels, n in counts.items():
            self.queue_entries.labels(*labels).set(n)
        self._labels_seen.update(counts.keys())

"""The pool's Prometheus metrics (SPEC §13.1, §13.2), named ``herder_*``.

Counters and summaries are updated as things happen.  Gauges describing the current fleet
(instances per category, prices, probe ages) are computed from a pool snapshot each time
Prometheus scrapes, so they are never stale and need no refresh loop.

Summaries carry no quantiles (prometheus_client's Summary has none): ``_sum`` and ``_count``
give the mean, which is what dashboards plot.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Summary
from prometheus_client.core import GaugeMetricFamily

from herder.model import BootOutcome, IdleBehavior, WorkerState

#: Worker categories of ``herder_instances_total`` and friends.  Arvados counts workers that
#: are being shut down as "idle" (SPEC §19 item 17), which makes a fleet being drained look
#: idle; herder gives them their own category.
CATEGORIES = ("inuse", "hold", "booting", "unknown", "idle", "shutdown")


def worker_category(state: WorkerState, idle_behavior: IdleBehavior, runners: int) -> str:
    """The metrics category of one worker."""
    if state == WorkerState.SHUTDOWN:
        return "shutdown"
    if runners > 0:
        return "inuse"
    if idle_behavior == IdleBehavior.HOLD:
        return "hold"
    if state == WorkerState.BOOTING:
        return "booting"
    if state == WorkerState.UNKNOWN:
        return "unknown"
    return "idle"


@dataclass(frozen=True, slots=True)
class WorkerSample:
    """What the gauges need to know about one worker."""

    category: str
    instance_type: str
    price: float
    vcpus: int
    ram: int
    runners: int
    probed: float
    monitored: bool  # False once shut down: its probe age no longer means anything


@dataclass(frozen=True, slots=True)
class PoolSample:
    now: float
    workers: list[WorkerSample] = field(default_factory=list)
    instance_types: list[str] = field(default_factory=list)


class PoolMetrics:
    """Every pool metric, registered on one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.boot_outcomes = Counter(
            "herder_boot_outcomes", "Boot outcomes of instances", ["outcome"], registry=registry
        )
        for outcome in BootOutcome:
            self.boot_outcomes.labels(outcome.value)
        self.boot_failures_in_a_row = Gauge(
            "herder_boot_failures_in_a_row",
            "Instances of each type that failed to boot since one last booted",
            ["instance_type"],
            registry=registry,
        )
        self.boot_backoffs = Counter(
            "herder_boot_backoffs",
            "Pauses on creating an instance type after one of its instances failed to boot",
            ["instance_type"],
            registry=registry,
        )
        self.instances_disappeared = Counter(
            "herder_instances_disappeared",
            "Instances that disappeared from the cloud listing, by the state they were in",
            ["state"],
            registry=registry,
        )
        for state in WorkerState:
            self.instances_disappeared.labels(state.value)
        self.time_to_ssh = Summary(
            "herder_instances_time_to_ssh_seconds",
            "Time from an instance appearing to the first SSH connection to it",
            registry=registry,
        )
        self.time_to_ready = Summary(
            "herder_instances_time_to_ready_for_container_seconds",
            "Time from the first SSH connection to an instance being ready for containers",
            registry=registry,
        )
        self.shutdown_to_disappearance = Summary(
            "herder_instances_time_from_shutdown_request_to_disappearance_seconds",
            "Time from a shutdown request to the instance leaving the cloud listing",
            registry=registry,
        )
        self.queue_to_runner = Summary(
            "herder_containers_time_from_queue_to_crunch_run_seconds",
            "Time from a container's creation to its runner start returning",
            registry=registry,
        )
        self.run_probe_duration = Summary(
            "herder_instances_run_probe_duration_seconds",
            "Duration of run probes, by outcome",
            ["outcome"],
            registry=registry,
        )
        for probe_outcome in ("success", "fail"):
            self.run_probe_duration.labels(probe_outcome)
        self.driver_operations = Counter(
            "herder_driver_operations",
            "Cloud driver operations, by operation and whether they failed",
            ["operation", "error"],
            registry=registry,
        )
        self._gauges = _FleetGauges()
        registry.register(self._gauges)

    def set_source(self, source: Callable[[], PoolSample]) -> None:
        """Where the fleet gauges read the pool from at scrape time."""
        self._gauges.source = source


class _FleetGauges:
    """A custom collector computing the fleet gauges from a fresh pool snapshot."""

    def __init__(self) -> None:
        self.source: Callable[[], PoolSample] | None = None

    def describe(self) -> Iterator[Any]:
        yield from _families(PoolSample(now=0.0), samples=False)

    def collect(self) -> Iterator[Any]:
        sample = self.source() if self.source is not None else PoolSample(now=0.0)
        yield from _families(sample, samples=True)


def _families(sample: PoolSample, *, samples: bool) -> Iterator[Any]:
    running = GaugeMetricFamily("herder_containers_running", "Containers with a runner")
    total = GaugeMetricFamily(
        "herder_instances_total", "Instances per category", labels=["category", "instance_type"]
    )
    price = GaugeMetricFamily(
        "herder_instances_price", "Summed hourly price per category", labels=["category"]
    )
    vcpus = GaugeMetricFamily(
        "herder_vcpus_total", "Summed VCPUs per category", labels=["category"]
    )
    memory = GaugeMetricFamily(
        "herder_memory_bytes_total", "Summed RAM per category", labels=["category"]
    )
    age_max = GaugeMetricFamily(
        "herder_probe_age_seconds_max", "Time since the least recent successful probe"
    )
    age_median = GaugeMetricFamily(
        "herder_probe_age_seconds_median", "Median time since workers' last successful probe"
    )
    if samples:
        _fill(sample, running, total, price, vcpus, memory, age_max, age_median)
    yield from (running, total, price, vcpus, memory, age_max, age_median)


def _fill(
    sample: PoolSample,
    running: Any,
    total: Any,
    price: Any,
    vcpus: Any,
    memory: Any,
    age_max: Any,
    age_median: Any,
) -> None:
    counts: dict[tuple[str, str], int] = {}
    sums = {cat: [0.0, 0, 0] for cat in CATEGORIES}
    for w in sample.workers:
        counts[(w.category, w.instance_type)] = counts.get((w.category, w.instance_type), 0) + 1
        acc = sums[w.category]
        acc[0] += w.price
        acc[1] += w.vcpus
        acc[2] += w.ram
    # Every configured type appears in every category, at 0 when there are none.
    for type_name in sample.instance_types:
        for cat in CATEGORIES:
            counts.setdefault((cat, type_name), 0)
    for (cat, type_name), n in sorted(counts.items()):
        total.add_metric([cat, type_name], n)
    for cat in CATEGORIES:
        price.add_metric([cat], sums[cat][0])
        vcpus.add_metric([cat], sums[cat][1])
        memory.add_metric([cat], sums[cat][2])
    running.add_metric([], sum(w.runners for w in sample.workers))
    # Shut-down workers are no longer probed; counting them would only inflate the ages.
    probed = sorted(w.probed for w in sample.workers if w.monitored)
    if probed:
        age_max.add_metric([], sample.now - probed[0])
        age_median.add_metric([], sample.now - probed[len(probed) // 2])
    else:
        age_max.add_metric([], 0.0)
        age_median.add_metric([], 0.0)

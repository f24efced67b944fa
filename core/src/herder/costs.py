"""Cost reports: spend by period and by instance type, and what finished containers cost.

Built from a spend ledger (:mod:`herder.spend`) as plain dataclasses, so that the CLI
(``herder costs``, which reads the queue's ledger when no server answers) and the engine
(:meth:`Dispatcher.cost_report`, for the API) give the same answer.  Spend is what the
instances cost (billing increments included); container costs are herder's per-container
figure (each container's running time at its whole instance type's price).  The two answer
different questions and are not meant to add up: instances cost something while no container
runs (boot, idle, shutdown), and containers that share an instance are each charged its full
price.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from herder.spend import BudgetState, ContainerCost, SpendEntry, period_bounds

_LABEL_FORMATS = {"hour": "%Y-%m-%d %H:00", "day": "%Y-%m-%d", "month": "%Y-%m"}


@dataclass(frozen=True, slots=True)
class SpendBucket:
    """Spend booked in one period."""

    label: str  # "2026-12-06" (day), "2026-12" (month), "2026-12-06 22:00" (hour), UTC
    start: float
    end: float
    spent: float


@dataclass(frozen=True, slots=True)
class ContainerCosts:
    """What the containers that finished in the report's range cost."""

    finished: int = 0
    total: float = 0.0
    #: total / finished (0 when none finished)
    per_container: float = 0.0
    by_instance_type: dict[str, float] = field(default_factory=dict)
    #: by the container's name
    by_name: dict[str, float] = field(default_factory=dict)
    #: by label, ``key=value``: a container counts under each of its labels (so these may
    #: add up to more than ``total``), one without labels under ``""``
    by_label: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CostReport:
    """Spend from ``since`` to ``until`` (epoch seconds), by ``period`` and instance type."""

    period: str
    since: float
    until: float
    total: float
    by_period: list[SpendBucket]
    by_instance_type: dict[str, float]
    containers: ContainerCosts

    def to_json(self) -> dict[str, Any]:
        return {
            "period": self.period,
            "since": self.since,
            "until": self.until,
            "total": self.total,
            "by_period": [
                {"period": b.label, "start": b.start, "end": b.end, "spent": b.spent}
                for b in self.by_period
            ],
            "by_instance_type": self.by_instance_type,
            "containers": {
                "finished": self.containers.finished,
                "total": self.containers.total,
                "per_container": self.containers.per_container,
                "by_instance_type": self.containers.by_instance_type,
                "by_name": self.containers.by_name,
                "by_label": self.containers.by_label,
            },
        }


def rfc3339(ts: float) -> str | None:
    """Epoch seconds as the API writes times (RFC 3339, UTC, milliseconds); 0 as None."""
    if not ts:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def report_document(report: CostReport) -> dict[str, Any]:
    """The report as ``GET /api/v1/costs`` answers it (times in RFC 3339), so that
    ``herder costs --json`` prints one shape whether it asked the server or read the ledger."""
    data = report.to_json()
    data["since"] = rfc3339(report.since)
    data["until"] = rfc3339(report.until)
    for bucket in data["by_period"]:
        bucket["start"] = rfc3339(bucket["start"])
        bucket["end"] = rfc3339(bucket["end"])
    return data


def budget_document(state: BudgetState) -> dict[str, Any]:
    """The budget as ``GET /api/v1/budget`` answers it (times in RFC 3339, and what waiting
    containers are told once a limit is reached), so that ``herder budget`` prints one shape
    whether it asked the server or read the ledger."""
    data = state.to_json()
    data["period_start"] = rfc3339(state.period_start)
    data["period_end"] = rfc3339(state.period_end)
    data["message"] = state.message() if state.soft_reached else ""
    return data


def period_label(start: float, period: str) -> str:
    return datetime.fromtimestamp(start, UTC).strftime(_LABEL_FORMATS[period])


def build_report(
    entries: Iterable[SpendEntry],
    containers: Iterable[ContainerCost],
    *,
    period: str,
    since: float,
    until: float,
) -> CostReport:
    """The report over ``[since, until)``: every period that overlaps it gets a bucket, so a
    period without spend shows as 0 rather than missing."""
    buckets: list[SpendBucket] = []
    sums: dict[float, list[float]] = {}
    start, end = period_bounds(since, period)
    while start < until:
        sums[start] = []
        buckets.append(SpendBucket(period_label(start, period), start, end, 0.0))
        start, end = period_bounds(end, period)
    by_type: dict[str, list[float]] = defaultdict(list)
    for entry in entries:
        if not since <= entry.at < until:
            continue
        bucket_start, _ = period_bounds(entry.at, period)
        sums[bucket_start].append(entry.amount)
        by_type[entry.instance_type].append(entry.amount)
    buckets = [SpendBucket(b.label, b.start, b.end, math.fsum(sums[b.start])) for b in buckets]
    finished = [c for c in containers if since <= c.at < until]
    ctr_by_type: dict[str, list[float]] = defaultdict(list)
    by_name: dict[str, list[float]] = defaultdict(list)
    by_label: dict[str, list[float]] = defaultdict(list)
    for c in finished:
        ctr_by_type[c.instance_type].append(c.cost)
        by_name[c.name].append(c.cost)
        for key, value in c.labels or (("", ""),):
            by_label[f"{key}={value}" if key else ""].append(c.cost)
    ctr_total = math.fsum(c.cost for c in finished)
    return CostReport(
        period=period,
        since=since,
        until=until,
        total=math.fsum(b.spent for b in buckets),
        by_period=buckets,
        by_instance_type={k: math.fsum(v) for k, v in sorted(by_type.items())},
        containers=ContainerCosts(
            finished=len(finished),
            total=ctr_total,
            per_container=ctr_total / len(finished) if finished else 0.0,
            by_instance_type={k: math.fsum(v) for k, v in sorted(ctr_by_type.items())},
            by_name={k: math.fsum(v) for k, v in sorted(by_name.items())},
            by_label={k: math.fsum(v) for k, v in sorted(by_label.items())},
        ),
    )


def last_periods(now: float, period: str, count: int) -> tuple[float, float]:
    """``[since, until)`` covering the current period and the ``count - 1`` before it."""
    start, end = period_bounds(now, period)
    for _ in range(max(0, count - 1)):
        start, _ = period_bounds(start - 1, period)
    return start, end

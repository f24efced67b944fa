"""Spend: what the instances cost, per period, kept across restarts, and the budget on it.

Spend is computed from what the engine knows for sure: each instance's lifetime (from its
start until it leaves the cloud's listing) at its type's price, rounded up to the type's
billing increment and minimum (:class:`~herder.model.Billing`), and booked to the UTC period
(hour, day, month) in which it was incurred.  An increment is booked when it begins, as a
cloud charges it; per-second spend is booked about once a minute, and the part not yet booked
still counts towards the budget.  Spot price history is not used: the type's configured price is
the price in force.

Spend lives in a *ledger* behind the narrow :class:`SpendLedger` protocol (record an entry,
total a time range, list a time range).  :class:`JsonLinesLedger` keeps it in a file in the data
directory (mode 0600), so a restart neither forgets the period's spend nor bills an instance's
current increment twice (each entry carries the instance's start).  The ledger is deliberately
separate from the queue: a queue backend can later implement the same protocol (a ``spend``
table next to the containers) and the dispatcher would hand that in instead.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol, runtime_checkable

from herder.model import PER_SECOND, Billing, InstanceType, InstanceView

log = logging.getLogger(__name__)

PERIODS = ("hour", "day", "month")


# --------------------------------------------------------------------------- periods


def period_bounds(now: float, period: str) -> tuple[float, float]:
    """Start and end (epoch seconds) of the UTC ``period`` that contains ``now``."""
    dt = datetime.fromtimestamp(now, UTC)
    if period == "hour":
        start = dt.replace(minute=0, second=0, microsecond=0)
        end = start + timedelta(hours=1)
    elif period == "day":
        start = dt.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + timedelta(days=1)
    elif period == "month":
        start = dt.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = (start + timedelta(days=32)).replace(day=1)
    else:
        raise ValueError(f"unknown period {period!r}: expected hour, day or month")
    return start.timestamp(), end.timestamp()


def format_period_end(end: float, period: str) -> str:
    """When a period ends, as people read it: ``00:00 UTC``, or with the date for a month."""
    dt = datetime.fromtimestamp(end, UTC)
    if period == "month":
        return dt.strftime("%Y-%m-%d %H:%M UTC")
    return dt.strftime("%H:%M UTC")


# --------------------------------------------------------------------------- the ledger


@dataclass(frozen=True, slots=True)
class SpendEntry:
    """Spend incurred by one instance at one moment.

    ``started_at`` is the instance's start: after a restart the engine bills the instance
    from there, less what the ledger already holds for it.
    """

    at: float
    amount: float
    instance_id: str
    instance_type: str
    started_at: float

    def to_json(self) -> dict[str, float | str]:
        return {
            "at": self.at,
            "amount": self.amount,
            "instance_id": self.instance_id,
            "instance_type": self.instance_type,
            "started_at": self.started_at,
        }


@dataclass(frozen=True, slots=True)
class ContainerCost:
    """What one finished container cost: its running time at its instance type's price."""

    at: float  # when it finished
    uuid: str
    name: str
    instance_type: str
    cost: float
    exit_code: int
    #: the container's labels (``key=value``), for reports by label
    labels: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, object]:
        data: dict[str, object] = {
            "kind": "container",
            "at": self.at,
            "uuid": self.uuid,
            "name": self.name,
            "instance_type": self.instance_type,
            "cost": self.cost,
            "exit_code": self.exit_code,
        }
        if self.labels:  # lines of containers without labels stay as they were
            data["labels"] = dict(self.labels)
        return data


@runtime_checkable
class ContainerCostLog(Protocol):
    """Where the cost of each finished container is kept, for cost reports.

    Separate from :class:`SpendLedger` (what the budget needs); both file ledgers here
    implement it, and a queue backend would answer it from its container records.
    """

    def record_container(self, cost: ContainerCost) -> None: ...

    def containers(self, start: float, end: float) -> list[ContainerCost]:
        """Containers that finished in ``[start, end)``, oldest first."""
        ...


class SpendLedger(Protocol):
    """Where spend is kept.  Implementations are thread-safe."""

    def record(self, entry: SpendEntry) -> None:
        """Keep ``entry`` (durably, for a persistent ledger)."""
        ...

    def total(self, start: float, end: float) -> float:
        """Spend of the entries with ``start <= at < end``."""
        ...

    def entries(self, start: float, end: float) -> list[SpendEntry]:
        """The entries with ``start <= at < end``, oldest first."""
        ...


class MemoryLedger:
    """A ledger that lives as long as the process (simulations, a queue in memory).

    Entries are kept in time order, so a range is found by bisection.
    """

    def __init__(
        self, entries: Iterable[SpendEntry] = (), containers: Iterable[ContainerCost] = ()
    ) -> None:
        self._lock = threading.Lock()
        self._entries = sorted(entries, key=lambda e: e.at)
        self._ats = [e.at for e in self._entries]
        self._containers = sorted(containers, key=lambda c: c.at)

    def record_container(self, cost: ContainerCost) -> None:
        with self._lock:
            self._containers.append(cost)
            if len(self._containers) > 1 and cost.at < self._containers[-2].at:
                self._containers.sort(key=lambda c: c.at)

    def containers(self, start: float, end: float) -> list[ContainerCost]:
        with self._lock:
            return [c for c in self._containers if start <= c.at < end]

    def record(self, entry: SpendEntry) -> None:
        with self._lock:
            index = bisect.bisect_right(self._ats, entry.at)
            self._ats.insert(index, entry.at)
            self._entries.insert(index, entry)

    def total(self, start: float, end: float) -> float:
        return math.fsum(e.amount for e in self.entries(start, end))

    def entries(self, start: float, end: float) -> list[SpendEntry]:
        with self._lock:
            low = bisect.bisect_left(self._ats, start)
            high = bisect.bisect_left(self._ats, end)
            return self._entries[low:high]


class JsonLinesLedger(MemoryLedger):
    """A ledger in a JSON-lines file (mode 0600), appended to and read back whole at start.

    One line per entry; a line that cannot be read (a crash mid-write) is skipped with a
    warning, so a damaged tail never stops herder from starting.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        entries, containers = _read_lines(self.path)
        super().__init__(entries, containers)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(fd, 0o600)
        self._file = os.fdopen(fd, "a", encoding="utf-8")
        if self._torn_tail():
            # A crash mid-write left half a line: end it, or the next entry would join it.
            self._file.write("\n")
            self._file.flush()

    def _torn_tail(self) -> bool:
        with self.path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"

    def record(self, entry: SpendEntry) -> None:
        self._append(entry.to_json())
        super().record(entry)

    def record_container(self, cost: ContainerCost) -> None:
        self._append(cost.to_json())
        super().record_container(cost)

    def _append(self, data: Mapping[str, object]) -> None:
        with self._lock:
            self._file.write(json.dumps(data, sort_keys=True) + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


def _read_lines(path: Path) -> tuple[list[SpendEntry], list[ContainerCost]]:
    """The entries of a ledger file; unreadable lines are skipped with a warning."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return [], []
    out: list[SpendEntry] = []
    containers: list[ContainerCost] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            if raw.get("kind") == "container":
                containers.append(
                    ContainerCost(
                        at=float(raw["at"]),
                        uuid=str(raw["uuid"]),
                        name=str(raw["name"]),
                        instance_type=str(raw["instance_type"]),
                        cost=float(raw["cost"]),
                        exit_code=int(raw["exit_code"]),
                        labels=tuple(
                            sorted((str(k), str(v)) for k, v in raw.get("labels", {}).items())
                        ),
                    )
                )
                continue
            out.append(
                SpendEntry(
                    at=float(raw["at"]),
                    amount=float(raw["amount"]),
                    instance_id=str(raw["instance_id"]),
                    instance_type=str(raw["instance_type"]),
                    started_at=float(raw["started_at"]),
                )
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("%s:%d: skipping unreadable spend entry: %s", path, number, exc)
    return out, containers


def read_ledger(path: str | os.PathLike[str]) -> MemoryLedger:
    """A ledger file's contents, read only (``herder costs``: nothing is created or written)."""
    entries, containers = _read_lines(Path(path))
    return MemoryLedger(entries, containers)


def ledger_path_for(ledger_path: str, queue_path: str) -> str | None:
    """Where the ledger file goes: ``ledger_path``, else next to the queue's database; None
    (memory only) when the queue itself is in memory."""
    if ledger_path:
        return ledger_path
    if not queue_path or queue_path == ":memory:" or queue_path.startswith("file::memory:"):
        return None
    return str(Path(queue_path).expanduser().parent / "herder-spend.jsonl")


# --------------------------------------------------------------------------- accrual


@dataclass(slots=True)
class _Accrual:
    instance_type: str
    started_at: float
    recorded: float = 0.0
    last_recorded: float = -math.inf
    last_seen: float = 0.0
    price: float = 0.0
    #: Cost of the billed seconds before the latest price change, and how many they were:
    #: a spot price that moves reprices only the time after the move.
    frozen_cost: float = 0.0
    frozen_billed: float = 0.0


class SpendTracker:
    """Books the instances' spend into a ledger as their lives go on (see the module docstring).

    Call :meth:`update` with the pool's instance views now and then (each scheduling pass);
    it is cheap.  Not thread-safe: one caller (the scheduler's pass) drives it.
    """

    #: Per-second spend is booked at most this often per instance (what is not booked yet
    #: still counts, see :meth:`spent`; a restart books it from the instance's start).
    RECORD_EVERY = 300.0
    #: How far back a restart looks for instances it still bills.
    LOOKBACK = 40 * 86400.0

    def __init__(
        self,
        ledger: SpendLedger,
        instance_types: Mapping[str, InstanceType],
        now: float,
    ) -> None:
        self.ledger = ledger
        self._types = instance_types
        self._live: dict[str, _Accrual] = {}
        #: (start, end) of the period last asked about, and what the ledger holds for it: kept
        #: up to date as entries are booked, so the ledger is summed once per period.
        self._period: tuple[float, float] | None = None
        self._period_total = 0.0
        #: Instances the ledger knows from before this process, by id (start, booked so far).
        self._earlier: dict[str, _Accrual] = {}
        for entry in ledger.entries(now - self.LOOKBACK, math.inf):
            acc = self._earlier.get(entry.instance_id)
            if acc is None:
                acc = self._earlier[entry.instance_id] = _Accrual(
                    entry.instance_type, entry.started_at, last_recorded=entry.at
                )
            acc.recorded += entry.amount
            acc.last_recorded = max(acc.last_recorded, entry.at)
        #: Never changed after this: read from other threads (the pool's adoption).
        self._starts = {k: acc.started_at for k, acc in self._earlier.items()}

    def started_at(self, instance_id: str) -> float | None:
        """When an instance the ledger knew before this process started (thread-safe)."""
        return self._starts.get(instance_id)

    def _billing(self, type_name: str) -> Billing:
        it = self._types.get(type_name)
        return it.billing if it is not None else PER_SECOND

    def update(self, now: float, views: Iterable[InstanceView]) -> None:
        """Book what each instance has cost up to ``now``; close the books of ones gone."""
        seen: set[str] = set()
        for view in views:
            if not view.instance:
                continue  # a create in progress costs nothing yet
            seen.add(view.instance)
            acc = self._live.get(view.instance)
            if acc is None:
                acc = self._earlier.pop(view.instance, None) or _Accrual(
                    view.instance_type, view.appeared
                )
                self._live[view.instance] = acc
            acc.last_seen = now
            price = view.price_now
            if acc.price and price != acc.price:
                # The market moved: what was billed so far keeps the old price.
                acc.frozen_cost = self._due(acc, now)
                acc.frozen_billed = self._billing(acc.instance_type).billed_seconds(
                    max(now - acc.started_at, 1e-6)
                )
            acc.price = price
            self._book(view.instance, acc, now, force=False)
        for instance_id in [i for i in self._live if i not in seen]:
            acc = self._live.pop(instance_id)
            self._book(instance_id, acc, acc.last_seen, force=True)

    def _due(self, acc: _Accrual, until: float) -> float:
        # An instance that exists has begun its first increment (and its minimum).
        lifetime = max(until - acc.started_at, 1e-6)
        billed = self._billing(acc.instance_type).billed_seconds(lifetime)
        return acc.frozen_cost + max(0.0, billed - acc.frozen_billed) * acc.price / 3600.0

    def _book(self, instance_id: str, acc: _Accrual, until: float, *, force: bool) -> None:
        delta = self._due(acc, until) - acc.recorded
        if delta <= 1e-12:
            return
        per_second = self._billing(acc.instance_type).per_second
        if per_second and not force and until - acc.last_recorded < self.RECORD_EVERY:
            return
        self.ledger.record(SpendEntry(until, delta, instance_id, acc.instance_type, acc.started_at))
        if self._period is not None and self._period[0] <= until < self._period[1]:
            self._period_total += delta
        acc.recorded += delta
        acc.last_recorded = until

    def flush(self, now: float) -> None:
        """Book everything incurred up to ``now`` (at shutdown: nothing is left unbooked)."""
        for instance_id, acc in self._live.items():
            self._book(instance_id, acc, max(now, acc.last_seen), force=True)

    def unbooked(self, now: float) -> float:
        """Spend incurred by live instances but not booked yet (per-second billing)."""
        return math.fsum(
            max(0.0, self._due(acc, now) - acc.recorded) for acc in self._live.values()
        )

    def spent(self, start: float, end: float, now: float) -> float:
        """Spend booked in [start, end), plus what is not booked yet when ``now`` is in it."""
        if self._period != (start, end):
            self._period = (start, end)
            self._period_total = self.ledger.total(start, end)
        total = self._period_total
        if start <= now < end:
            total += self.unbooked(now)
        return total


# --------------------------------------------------------------------------- the budget


@dataclass(frozen=True, slots=True)
class BudgetState:
    """The budget as of one moment: plain data for the API, the CLI and the metrics."""

    period: str
    period_start: float
    period_end: float
    spent: float
    soft_limit: float | None
    hard_limit: float | None
    on_hard_limit: str
    at: float = 0.0

    @property
    def soft_reached(self) -> bool:
        """No new instances: the soft limit, or the hard one (which implies it), is reached."""
        return any(limit is not None and self.spent >= limit for limit in self._limits())

    @property
    def hard_reached(self) -> bool:
        return self.hard_limit is not None and self.spent >= self.hard_limit

    def _limits(self) -> list[float | None]:
        return [self.soft_limit, self.hard_limit]

    @property
    def until(self) -> str:
        return format_period_end(self.period_end, self.period)

    def message(self) -> str:
        """``spend this day 41.20 of 40.00; no new instances until 00:00 UTC``."""
        limit = self.hard_limit if self.hard_reached else self.soft_limit
        if limit is None:
            limit = self.hard_limit
        return (
            f"spend this {self.period} {self.spent:.2f} of {limit or 0.0:.2f}; "
            f"no new instances until {self.until}"
        )

    def to_json(self) -> dict[str, object]:
        return {
            "period": self.period,
            "period_start": self.period_start,
            "period_end": self.period_end,
            "spent": self.spent,
            "soft_limit": self.soft_limit,
            "hard_limit": self.hard_limit,
            "soft_reached": self.soft_reached,
            "hard_reached": self.hard_reached,
            "on_hard_limit": self.on_hard_limit,
        }


@dataclass
class Budget:
    """The configured limits, evaluated against a tracker's spend."""

    period: str = "day"
    soft_limit: float | None = None
    hard_limit: float | None = None
    on_hard_limit: str = "finish"
    _last: BudgetState | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def enabled(self) -> bool:
        return self.soft_limit is not None or self.hard_limit is not None

    def evaluate(self, tracker: SpendTracker, now: float) -> BudgetState:
        start, end = period_bounds(now, self.period)
        state = BudgetState(
            period=self.period,
            period_start=start,
            period_end=end,
            spent=tracker.spent(start, end, now),
            soft_limit=self.soft_limit,
            hard_limit=self.hard_limit,
            on_hard_limit=self.on_hard_limit,
            at=now,
        )
        with self._lock:
            self._last = state
        return state

    @property
    def last(self) -> BudgetState | None:
        """The latest evaluation (read by other threads: metrics, the API)."""
        with self._lock:
            return self._last

"""Spend: what the instances cost, per period, kept across restarts, and the budget on it.

Spend is computed from what the engine knows for sure: each instance's lifetime (from its
start until it leaves the cloud's listing) at its type's price, rounded up to the type's
billing increment and minimum (:class:`~herder.model.Billing`), and booked to the UTC period
(hour, day, month) in which it was incurred.  An increment is booked when it begins, as a
cloud charges it; per-second spend is booked about once a minute, and the part not yet booked
still counts towards the budget.  Spot price history is not used: the type's configured price is
the price in force.

Spend lives in a *ledger* behind the narrow :class:`Ledger` protocol (record an entry, total a
time range, list a time range, and the finished containers' costs).  The queue backend keeps
it, in the queue's own storage (:meth:`herder.queue.base.ContainerQueue.ledger`): a restart
neither forgets the period's spend nor bills an instance's current increment twice (each entry
carries the instance's start), and herders sharing a queue (a standby taking over) share it.
Old entries are folded (:func:`fold`, :data:`KEEP_MONTHS`) so that the ledger stays small.

Before the queue kept it, spend was a JSON-lines file (``herder-spend.jsonl`` next to the
queue); :func:`import_jsonl` moves such a file's entries into the queue's ledger once.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
import threading
from collections.abc import Callable, Iterable, Mapping
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

    Separate from :class:`SpendLedger` (what the budget needs); every :class:`Ledger`
    implements both.
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


@runtime_checkable
class Ledger(SpendLedger, ContainerCostLog, Protocol):
    """What a queue backend keeps: spend and container costs, in the queue's storage."""

    def record_many(
        self, entries: Iterable[SpendEntry], containers: Iterable[ContainerCost]
    ) -> None:
        """Keep all of them at once (one transaction in a database: all or none)."""
        ...

    def compact(self, now: float) -> int:
        """Fold spend entries older than :func:`compaction_cutoff` (:func:`fold`) and drop
        container costs older than it; returns how many stored records went."""
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

    def record_many(
        self, entries: Iterable[SpendEntry], containers: Iterable[ContainerCost]
    ) -> None:
        for entry in entries:
            self.record(entry)
        for cost in containers:
            self.record_container(cost)

    def compact(self, now: float) -> int:
        cutoff = compaction_cutoff(now)
        with self._lock:
            high = bisect.bisect_left(self._ats, cutoff)
            old = self._entries[:high]
            # Nothing new to fold: the folded months are left as they are.
            folded = old if all(e.instance_id == FOLDED for e in old) else fold(old)
            self._entries[:high] = folded
            self._ats[:high] = [e.at for e in folded]
            kept = [c for c in self._containers if c.at >= cutoff]
            gone = len(old) - len(folded) + len(self._containers) - len(kept)
            self._containers = kept
            return gone


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


def legacy_ledger_path(ledger_path: str, queue_path: str) -> str | None:
    """Where an old ledger file would be: ``ledger_path`` (``cloud.budget.ledger_path``), else
    ``herder-spend.jsonl`` next to the queue's database; None when the queue is in memory."""
    if ledger_path:
        return ledger_path
    if not queue_path or queue_path == ":memory:" or queue_path.startswith("file::memory:"):
        return None
    return str(Path(queue_path).expanduser().parent / LEGACY_FILE)


#: The old ledger file's name next to the queue file (spend before the queue kept it).
LEGACY_FILE = "herder-spend.jsonl"
#: What an imported old ledger file is renamed to (its name plus this).
IMPORTED_SUFFIX = ".imported"


def import_jsonl(path: str | os.PathLike[str], ledger: Ledger) -> int | None:
    """Move an old JSON-lines ledger file's entries into ``ledger`` once, then rename the file
    to ``*.imported``; the number of entries imported, or None when there is no file.

    The entries go in with one :meth:`Ledger.record_many` (one transaction), then the file is
    renamed.  A crash between the two would import the file again at the next start, so an
    import whose last spend entry the ledger holds already is skipped (only the rename is
    done): the ledger never counts a file's spend twice.
    """
    source = Path(path)
    if not source.exists():
        return None
    entries, containers = _read_lines(source)
    last = entries[-1] if entries else None
    done = last is not None and last in ledger.entries(last.at, math.nextafter(last.at, math.inf))
    if not done:
        ledger.record_many(entries, containers)
    target = source.with_name(source.name + IMPORTED_SUFFIX)
    os.replace(source, target)
    count = 0 if done else len(entries) + len(containers)
    log.info(
        "spend ledger %s imported into the queue (%d entries); renamed to %s", source, count, target
    )
    return count


# --------------------------------------------------------------------------- compaction

#: Spend entries and container costs are kept one by one for this many whole months before the
#: current one; older ones are folded (:func:`fold`).  Thirteen, because the longest look-back
#: anything makes is a report comparing a month with the same month a year before (``herder
#: costs --period month --last 13``); budgets look at most one month back and a restart 40
#: days.  Folded months still total right by month and instance type.
KEEP_MONTHS = 13
#: The ``instance_id`` of a folded entry: one month's spend on one instance type.
FOLDED = ""


def compaction_cutoff(now: float) -> float:
    """The start of the oldest month kept entry by entry: :data:`KEEP_MONTHS` before now's."""
    start, _ = period_bounds(now, "month")
    for _ in range(KEEP_MONTHS):
        start, _ = period_bounds(start - 1, "month")
    return start


def fold(entries: Iterable[SpendEntry]) -> list[SpendEntry]:
    """One entry per (UTC month, instance type) holding their sum, at the month's start, with
    instance id :data:`FOLDED`; oldest first.  Folded entries fold again into the same sum."""
    sums: dict[tuple[float, str], list[float]] = {}
    for e in entries:
        month, _ = period_bounds(e.at, "month")
        sums.setdefault((month, e.instance_type), []).append(e.amount)
    return [
        SpendEntry(month, math.fsum(amounts), FOLDED, instance_type, month)
        for (month, instance_type), amounts in sorted(sums.items())
    ]


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
    #: How often the ledger is compacted (:meth:`Ledger.compact`): once a day keeps it small
    #: and costs one short transaction.
    COMPACT_EVERY = 86400.0

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
        #: Read from other threads (the pool's adoption); replaced whole, never changed.
        self._starts: dict[str, float] = {}
        self.reload(now)
        #: When the ledger is compacted next (the first pass compacts it).
        self._next_compact = now

    def reload(self, now: float) -> None:
        """Read what the ledger holds for the instances of the last :data:`LOOKBACK` again.

        At construction, and when this herder starts dispatching: a standby built its tracker
        when it started waiting, and the leader has booked spend since, which the standby must
        not book a second time for the instances it adopts.  Call it before the first
        :meth:`update` only.
        """
        earlier: dict[str, _Accrual] = {}
        for entry in self.ledger.entries(now - self.LOOKBACK, math.inf):
            if entry.instance_id == FOLDED:
                continue
            acc = earlier.get(entry.instance_id)
            if acc is None:
                acc = earlier[entry.instance_id] = _Accrual(
                    entry.instance_type, entry.started_at, last_recorded=entry.at
                )
            acc.recorded += entry.amount
            acc.last_recorded = max(acc.last_recorded, entry.at)
        self._earlier = earlier
        self._starts = {k: acc.started_at for k, acc in earlier.items()}
        self._period = None

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
        if now >= self._next_compact:
            self._next_compact = now + self.COMPACT_EVERY
            self._compact(now)

    def _compact(self, now: float) -> None:
        if not isinstance(self.ledger, Ledger):
            return
        try:
            self.ledger.compact(now)
        except Exception as exc:  # a full disk, a database away: compacted at the next try
            log.warning("spend ledger: cannot compact it now: %s", exc)

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

    def state_at(self, now: float, spent: Callable[[float, float], float]) -> BudgetState:
        """The budget at ``now``, with ``spent(start, end)`` the spend of the period: a
        tracker's (booked and not yet booked) for the engine, a ledger's total offline."""
        start, end = period_bounds(now, self.period)
        return BudgetState(
            period=self.period,
            period_start=start,
            period_end=end,
            spent=spent(start, end),
            soft_limit=self.soft_limit,
            hard_limit=self.hard_limit,
            on_hard_limit=self.on_hard_limit,
            at=now,
        )

    def evaluate(self, tracker: SpendTracker, now: float) -> BudgetState:
        """The budget against ``tracker``'s spend, kept as :attr:`last`."""
        state = self.state_at(now, lambda start, end: tracker.spent(start, end, now))
        with self._lock:
            self._last = state
        return state

    @property
    def last(self) -> BudgetState | None:
        """The latest evaluation (read by other threads: metrics, the API)."""
        with self._lock:
            return self._last

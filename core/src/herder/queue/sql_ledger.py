"""The spend ledger in a SQL queue's database: the ``spend`` and ``container_costs`` tables.

One implementation of :class:`herder.spend.Ledger` for both SQL backends (SQLite and
PostgreSQL): each hands in how it runs a write (its own short transaction, under the queue's
lock) and a read, and the placeholder its driver uses.  The tables are created by each
backend's schema steps, with the columns named here.

A write that fails because the storage cannot be written right now (a full disk, a database
away) does not lose its entries: they are kept in memory, counted by every read, and written
with the next write, as the queue's results are kept on the instance until they can be
recorded.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from herder.queue.base import QueueError
from herder.queue.records import labels_from_json, labels_json
from herder.spend import (
    FOLDED,
    ContainerCost,
    SpendEntry,
    compaction_cutoff,
    fold,
)

log = logging.getLogger(__name__)

__all__ = ["COST_COLUMNS", "SPEND_COLUMNS", "SqlLedger"]

#: The columns of the ``spend`` table (besides its row id), in the order used here.
SPEND_COLUMNS = "at, amount, instance_id, instance_type, started_at"
#: The columns of the ``container_costs`` table (besides its row id), in the order used here.
COST_COLUMNS = "at, uuid, name, instance_type, cost, exit_code, labels"

_INSERT_SPEND = f"INSERT INTO spend ({SPEND_COLUMNS}) VALUES (?, ?, ?, ?, ?)"  # noqa: S608 (constants)
_INSERT_COST = f"INSERT INTO container_costs ({COST_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"  # noqa: S608 (constants)

#: Runs one statement with its parameters; returns a cursor (``fetchall``).
Execute = Callable[[str, Sequence[Any]], Any]
#: Runs ``work`` in one committed transaction (a write) or on the connection (a read).
Runner = Callable[[Callable[[Execute], Any]], Any]


def _spend_row(e: SpendEntry) -> tuple[Any, ...]:
    return (e.at, e.amount, e.instance_id, e.instance_type, e.started_at)


def _cost_row(c: ContainerCost) -> tuple[Any, ...]:
    return (c.at, c.uuid, c.name, c.instance_type, c.cost, c.exit_code, labels_json(c.labels))


def _spend_from_row(row: Sequence[Any]) -> SpendEntry:
    return SpendEntry(float(row[0]), float(row[1]), str(row[2]), str(row[3]), float(row[4]))


def _cost_from_row(row: Sequence[Any]) -> ContainerCost:
    return ContainerCost(
        at=float(row[0]),
        uuid=str(row[1]),
        name=str(row[2]),
        instance_type=str(row[3]),
        cost=float(row[4]),
        exit_code=int(row[5]),
        labels=labels_from_json(row[6]),
    )


class SqlLedger:
    """:class:`herder.spend.Ledger` over the ``spend`` and ``container_costs`` tables.

    ``write`` runs its work in one committed transaction; ``read`` on the connection.
    ``param`` is the driver's placeholder (``?`` or ``%s``).  ``retry_on``: the exceptions of
    a write that leave its entries to the next write (see the module docstring).
    """

    def __init__(
        self,
        write: Runner,
        read: Runner,
        *,
        param: str = "?",
        retry_on: tuple[type[BaseException], ...] = (),
    ) -> None:
        self._write = write
        self._read = read
        self._param = param
        self._retry_on = retry_on
        self._lock = threading.Lock()
        #: Written by no write yet (the storage refused it): written with the next one.
        self._pending: list[SpendEntry] = []
        self._pending_costs: list[ContainerCost] = []

    @classmethod
    def read_only(cls, read: Runner, refusal: str, *, param: str = "?") -> SqlLedger:
        """A ledger that reads through ``read`` and refuses every write with ``refusal`` (a
        :class:`~herder.queue.base.QueueError`): ``herder costs`` reading a queue it must
        not change."""

        def refuse(work: Callable[[Execute], Any]) -> Any:
            raise QueueError(refusal)

        return cls(refuse, read, param=param)

    def _sql(self, statement: str) -> str:
        return statement if self._param == "?" else statement.replace("?", self._param)

    # ---- writes

    def record(self, entry: SpendEntry) -> None:
        self.record_many([entry], [])

    def record_container(self, cost: ContainerCost) -> None:
        self.record_many([], [cost])

    def record_many(
        self, entries: Iterable[SpendEntry], containers: Iterable[ContainerCost]
    ) -> None:
        with self._lock:
            self._pending.extend(entries)
            self._pending_costs.extend(containers)
            self._flush()

    def flush(self) -> bool:
        """Write what earlier writes could not; True when nothing is left waiting."""
        with self._lock:
            return self._flush()

    def _flush(self) -> bool:
        entries, costs = list(self._pending), list(self._pending_costs)
        if not entries and not costs:
            return True
        insert_spend, insert_cost = self._sql(_INSERT_SPEND), self._sql(_INSERT_COST)

        def work(execute: Execute) -> None:
            for e in entries:
                execute(insert_spend, _spend_row(e))
            for c in costs:
                execute(insert_cost, _cost_row(c))

        try:
            self._write(work)
        except self._retry_on as exc:
            log.warning(
                "spend ledger: cannot write %d entries now (%s); kept in memory and written "
                "with the next one",
                len(entries) + len(costs),
                str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            )
            return False
        del self._pending[: len(entries)]
        del self._pending_costs[: len(costs)]
        return True

    def compact(self, now: float) -> int:
        """Fold the spend entries before :func:`~herder.spend.compaction_cutoff` per month and
        instance type, and drop the container costs before it, in one transaction.

        The old entries are taken with ``DELETE ... RETURNING``: of two herders compacting at
        once, the second finds the rows gone and folds nothing twice.  Nothing is rewritten
        when every old entry is folded already.
        """
        cutoff = compaction_cutoff(now)
        select_unfolded = self._sql("SELECT count(*) FROM spend WHERE at < ? AND instance_id <> ?")
        delete_spend = self._sql(f"DELETE FROM spend WHERE at < ? RETURNING {SPEND_COLUMNS}")  # noqa: S608 (constants)
        insert_spend = self._sql(_INSERT_SPEND)
        delete_costs = self._sql("DELETE FROM container_costs WHERE at < ?")

        def work(execute: Execute) -> int:
            gone = 0
            unfolded = int(execute(select_unfolded, (cutoff, FOLDED)).fetchall()[0][0])
            if unfolded:
                old = [_spend_from_row(r) for r in execute(delete_spend, (cutoff,)).fetchall()]
                folded = fold(old)
                for e in folded:
                    execute(insert_spend, _spend_row(e))
                gone += len(old) - len(folded)
            cursor = execute(delete_costs, (cutoff,))
            gone += max(0, int(cursor.rowcount))
            return gone

        with self._lock:
            gone: int = self._write(work)
        if gone:
            log.info("spend ledger: %d records older than %s folded or dropped", gone, cutoff)
        return gone

    # ---- reads

    def total(self, start: float, end: float) -> float:
        return math.fsum(e.amount for e in self.entries(start, end))

    def entries(self, start: float, end: float) -> list[SpendEntry]:
        select = self._sql(
            f"SELECT {SPEND_COLUMNS} FROM spend WHERE at >= ? AND at < ? ORDER BY at, id"  # noqa: S608 (constants)
        )
        rows = self._read(lambda execute: execute(select, (start, end)).fetchall())
        found = [_spend_from_row(r) for r in rows]
        with self._lock:
            waiting = [e for e in self._pending if start <= e.at < end]
        if waiting:
            found = sorted(found + waiting, key=lambda e: e.at)
        return found

    def containers(self, start: float, end: float) -> list[ContainerCost]:
        select = self._sql(
            f"SELECT {COST_COLUMNS} FROM container_costs WHERE at >= ? AND at < ? "  # noqa: S608 (constants)
            "ORDER BY at, id"
        )
        rows = self._read(lambda execute: execute(select, (start, end)).fetchall())
        found = [_cost_from_row(r) for r in rows]
        with self._lock:
            waiting = [c for c in self._pending_costs if start <= c.at < end]
        if waiting:
            found = sorted(found + waiting, key=lambda c: c.at)
        return found

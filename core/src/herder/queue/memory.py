"""A queue that keeps its records in memory: the shared rules with nothing durable under them.

For tests that want the real queue rules without a file (the scheduler tests' stub queue is
built on it), and as the smallest example of a backend: everything here is storing and loading.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

from herder.model import Container, ContainerState
from herder.queue.base import ContainerNotFound, ListFilter
from herder.queue.rules import UNFINISHED, RuledQueue, RuleSettings, Unreadable, cancelled
from herder.spend import Ledger, MemoryLedger

__all__ = ["MemoryQueue"]


class MemoryQueue(RuledQueue):
    """The queue rules over a dict; everything is lost when the object goes."""

    def __init__(self, rules: RuleSettings) -> None:
        super().__init__(rules)
        self._records: dict[str, Container] = {}
        self._logs: dict[str, bytearray] = {}
        self._ledger = MemoryLedger()
        self._open()

    @property
    def ledger(self) -> Ledger:
        """Spend in memory, like the records: gone with the object."""
        return self._ledger

    def _store_new(self, containers: Sequence[Container]) -> None:
        for c in containers:
            self._records[c.uuid] = c

    def _store_change(
        self, uuid: str, change: Callable[[Container], Container]
    ) -> tuple[Container, Container]:
        old = self._records.get(uuid)
        if old is None:
            raise ContainerNotFound(uuid)
        new = change(old)
        self._records[uuid] = new
        return old, new

    def _store_cancelled(
        self, containers: Sequence[Container], unreadable: Sequence[Unreadable], now: float
    ) -> None:
        for c in containers:
            self._records[c.uuid] = c
        for uuid, why in unreadable:
            self._records[uuid] = cancelled(self._records[uuid], now, why)

    def _load(self, uuid: str) -> Container | None:
        return self._records.get(uuid)

    def _load_unfinished(self) -> list[tuple[Container, str | None]]:
        return [(c, None) for c in self._records.values() if c.state in UNFINISHED]

    def _load_page(
        self, states: list[ContainerState] | None, limit: int, after: str
    ) -> list[Container]:
        found = sorted(
            (c for c in self._records.values() if c.uuid > after),
            key=lambda c: c.uuid,
        )
        if states is not None:
            found = [c for c in found if c.state in states]
        return found[:limit]

    def _load_newest(
        self, filter: ListFilter, limit: int, cursor: tuple[float, str] | None
    ) -> list[Container]:
        found = sorted(
            (
                c
                for c in self._records.values()
                if (cursor is None or (c.created_at, c.uuid) < cursor)
                and (filter.states is None or c.state in filter.states)
                and (filter.since is None or c.created_at >= filter.since)
                and (not filter.array_id or c.array_id == filter.array_id)
            ),
            key=lambda c: (c.created_at, c.uuid),
            reverse=True,
        )
        return found[:limit]

    def _load_counts(self) -> dict[ContainerState, int]:
        return dict(Counter(c.state for c in self._records.values()))

    def _store_log(self, uuid: str, data: bytes) -> None:
        self._logs.setdefault(uuid, bytearray()).extend(data)

    def _load_log(self, uuid: str, offset: int, end: int | None) -> bytes:
        return bytes(self._logs.get(uuid, b"")[offset:end])

    def _close_storage(self) -> None:
        """Nothing to release: the records go with the object."""

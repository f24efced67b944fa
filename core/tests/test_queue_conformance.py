"""The shipped queue conformance suite against the SQLite queue (a file, reopened) and the
in-memory queue."""

from __future__ import annotations

from pathlib import Path

import pytest

from herder.queue.base import ContainerQueue
from herder.queue.memory import MemoryQueue
from herder.queue.sqlite import SqliteQueue
from herder.testing.queue_conformance import QueueConformance, QueueFactory, QueueSettings


class TestSqliteQueueConformance(QueueConformance):
    @pytest.fixture
    def queue_factory(self, tmp_path: Path) -> QueueFactory:
        def make(settings: QueueSettings) -> ContainerQueue:
            return SqliteQueue(str(tmp_path / "herder.db"), settings.rules)

        return make


class TestMemoryQueueConformance(QueueConformance):
    durable = False

    @pytest.fixture
    def queue_factory(self) -> QueueFactory:
        def make(settings: QueueSettings) -> ContainerQueue:
            return MemoryQueue(settings.rules)

        return make

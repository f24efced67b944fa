"""The scheduler tests' stub queue keeps the real queue rules: it passes the shipped queue
conformance suite (it keeps nothing across a reopen, so those checks are skipped)."""

from __future__ import annotations

import pytest

from herder.testing.queue_conformance import QueueConformance, QueueFactory


class TestStubQueueConformance(QueueConformance):
    durable = False

    @pytest.fixture
    def queue_factory(self, stub_queue_factory: QueueFactory) -> QueueFactory:
        return stub_queue_factory

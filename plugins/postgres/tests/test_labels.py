"""Container labels in the postgres queue: their own column, added to an older schema in place
by one schema step."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from herder_queue_postgres.queue import MIGRATIONS, PostgresQueue

from herder.model import ContainerSpec
from herder.queue.base import ContainerQueue
from herder.runtime import VirtualRuntime
from herder.testing.queue_conformance import QueueSettings

from .test_postgres import _open

LABELLED = ContainerSpec(command=("true",), labels=(("project", "genomics"),))


@pytest.fixture
def make_queue(pg_params: Callable[..., dict[str, Any]]) -> Iterator[Callable[[], PostgresQueue]]:
    opened: list[ContainerQueue] = []

    def make() -> PostgresQueue:
        q = _open(pg_params(), QueueSettings(runtime=VirtualRuntime()))
        opened.append(q)
        return q

    yield make
    for q in opened:
        q.close()


def test_labels_are_kept_in_their_own_column(
    make_queue: Callable[[], PostgresQueue], pg_cluster: Any, schema_name: str
) -> None:
    queue = make_queue()
    c = queue.submit(LABELLED)
    queue.close()
    with pg_cluster.connect() as db:
        spec, labels = db.execute(
            f"SELECT spec, labels FROM {schema_name}.containers WHERE uuid = %s", (c.uuid,)
        ).fetchone()
    assert "genomics" not in spec and labels == '{"project":"genomics"}'
    got = make_queue().get(c.uuid)
    assert got is not None and got.spec.labels == (("project", "genomics"),)


def test_a_schema_from_before_labels_is_upgraded_in_place(
    make_queue: Callable[[], PostgresQueue], pg_cluster: Any, schema_name: str
) -> None:
    queue = make_queue()
    old = queue.submit(ContainerSpec(command=("true",), name="old"))
    queue.close()
    with pg_cluster.connect() as db:
        # As the version before labels left it: labels, and the spend tables since, taken out.
        db.execute(f"ALTER TABLE {schema_name}.containers DROP COLUMN labels")
        db.execute(f"DROP TABLE {schema_name}.spend, {schema_name}.container_costs")
        step = next(i for i, sql in enumerate(MIGRATIONS) if "COLUMN labels" in " ".join(sql))
        db.execute(f"UPDATE {schema_name}.schema_version SET version = %s", (step,))
    queue = make_queue()
    got = queue.get(old.uuid)
    assert got is not None and got.spec.labels == () and got.spec.name == "old"
    new = queue.submit(LABELLED)
    queue.close()
    with pg_cluster.connect() as db:
        (version,) = db.execute(f"SELECT version FROM {schema_name}.schema_version").fetchone()
    assert version == len(MIGRATIONS)
    got = make_queue().get(new.uuid)
    assert got is not None and got.spec.labels == (("project", "genomics"),)

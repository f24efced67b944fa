"""Container labels in the SQLite queue: stored in their own column, added to older files in
place by one schema step."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from herder.engine.sizing import ConfigSizer
from herder.model import ContainerSpec, InstanceType, RuntimeConstraints
from herder.queue.records import labels_json
from herder.queue.rules import RuleSettings
from herder.queue.sqlite import _MIGRATIONS, SqliteQueue
from herder.runtime import VirtualRuntime

GiB = 1 << 30
TYPES = {"small": InstanceType("small", "t.small", vcpus=2, ram=4 * GiB, price=0.1)}


def make_queue(path: Path) -> SqliteQueue:
    return SqliteQueue(str(path), RuleSettings(VirtualRuntime(), ConfigSizer(TYPES)))


def spec(**kw: object) -> ContainerSpec:
    constraints = RuntimeConstraints(vcpus=1, ram=GiB)
    return ContainerSpec(command=("true",), runtime_constraints=constraints, **kw)  # type: ignore[arg-type]


def test_labels_survive_a_reopen_and_stay_out_of_the_spec_json(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    q = make_queue(path)
    labelled = q.submit(spec(labels=(("project", "genomics"), ("team", "data"))))
    q.close()
    q = make_queue(path)
    assert q.get(labelled.uuid).spec.labels == (("project", "genomics"), ("team", "data"))
    q.close()
    db = sqlite3.connect(path)
    spec_text, labels = db.execute(
        "SELECT spec, labels FROM containers WHERE uuid = ?", (labelled.uuid,)
    ).fetchone()
    db.close()
    assert "genomics" not in spec_text
    assert labels == labels_json(labelled.spec.labels) == '{"project":"genomics","team":"data"}'


def test_a_file_from_before_labels_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    q = make_queue(path)
    old = q.submit(spec(name="old"))
    q.close()
    # Make it the file an older herder left: no labels column nor spend tables, schema back
    # to the step before labels.
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE containers DROP COLUMN labels")
    db.execute("DROP TABLE spend")
    db.execute("DROP TABLE container_costs")
    step = next(i for i, sql in enumerate(_MIGRATIONS) if "COLUMN labels" in " ".join(sql))
    db.execute("UPDATE schema_version SET version = ?", (step,))
    db.commit()
    db.close()

    q = make_queue(path)
    assert q.get(old.uuid).spec.labels == () and q.get(old.uuid).spec.name == "old"
    new = q.submit(spec(labels=(("project", "x"),)))
    q.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT version FROM schema_version").fetchone() == (len(_MIGRATIONS),)
    assert db.execute("SELECT labels FROM containers WHERE uuid = ?", (old.uuid,)).fetchone() == (
        "{}",
    )
    db.close()
    q = make_queue(path)
    assert q.get(new.uuid).spec.labels == (("project", "x"),)
    q.close()

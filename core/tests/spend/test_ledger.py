"""The spend ledger in the SQLite queue file: the schema 4 -> 5 upgrade, a full disk, the
import of an old ledger file, and compaction as the clock moves on."""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
from pathlib import Path

import pytest
from engine_harness import Engine, sim_config

from herder.app.cli import main
from herder.queue.sqlite import _MIGRATIONS, SqliteQueue, check_file, read_ledger
from herder.runtime import VirtualRuntime
from herder.spend import (
    FOLDED,
    ContainerCost,
    MemoryLedger,
    SpendEntry,
    SpendTracker,
    compaction_cutoff,
    import_jsonl,
    period_bounds,
)
from herder.testing.queue_conformance import QueueSettings

DAY = 86400.0


def _queue(path: Path, runtime: VirtualRuntime | None = None) -> SqliteQueue:
    settings = QueueSettings(runtime=runtime or VirtualRuntime())
    return SqliteQueue(str(path), settings.rules)


def _write_version_4_file(path: Path) -> str:
    """A queue file as herder wrote it before the ledger moved in (schema 4): the first four
    steps, one container, no spend tables."""
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    db.execute("INSERT INTO schema_version (version) VALUES (4)")
    for statements in _MIGRATIONS[:4]:
        for statement in statements:
            db.execute(statement)
    uuid = "zzzzz-dz642-000000000000001"
    db.execute(
        "INSERT INTO containers (uuid, state, priority, spec, created_at) "
        "VALUES (?, 'Queued', 1, ?, 10.0)",
        (uuid, '{"command": ["true"]}'),
    )
    db.commit()
    db.close()
    return uuid


def test_a_version_4_file_is_upgraded_in_place_and_gets_a_ledger(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    uuid = _write_version_4_file(path)
    assert len(_MIGRATIONS) == 5
    assert check_file(str(path))["schema_version"] == 4
    assert read_ledger(str(path)).entries(0.0, float("inf")) == []  # read only: none yet
    queue = _queue(path)
    assert queue.get(uuid) is not None  # the containers stay
    entry = SpendEntry(100.0, 1.5, "i-1", "small", 50.0)
    queue.ledger.record(entry)
    queue.close()
    assert check_file(str(path))["schema_version"] == 5
    assert read_ledger(str(path)).entries(0.0, 1000.0) == [entry]


def test_a_write_the_full_disk_refuses_is_kept_and_written_with_the_next(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "queue.db"
    queue = _queue(path)
    db = queue._db  # the disk "fills up": the file may not grow by one more page
    (pages,) = db.execute("PRAGMA page_count").fetchone()
    db.execute(f"PRAGMA max_page_count = {int(pages)}")
    wide = "t" * 2000  # an instance type name that fills the free space of the pages fast
    recorded = []
    with caplog.at_level(logging.WARNING, logger="herder.queue.sql_ledger"):
        for n in range(200):
            entry = SpendEntry(100.0 + n, 1.0, f"i-{n}", wide, 50.0)
            queue.ledger.record(entry)  # never raises: the entry is kept
            recorded.append(entry)
            if "cannot write" in caplog.text:
                break
    assert "cannot write" in caplog.text and "full" in caplog.text
    assert queue.ledger.total(0.0, 1000.0) == len(recorded)  # counted all the same
    db.execute("PRAGMA max_page_count = 1073741823")  # room again
    queue.ledger.record(SpendEntry(900.0, 1.0, "i-last", "small", 50.0))
    queue.close()
    stored = read_ledger(str(path)).entries(0.0, 1000.0)
    assert [e.instance_id for e in stored] == [e.instance_id for e in recorded] + ["i-last"]


def _old_ledger_file(path: Path, now: float) -> None:
    lines = [
        json.dumps({"at": now - 60, "amount": 0.25, "instance_id": "i-1",
                    "instance_type": "c4", "started_at": now - 120}),
        json.dumps({"kind": "container", "at": now - 30, "uuid": "zzzzz-dz642-a", "name": "n",
                    "instance_type": "c4", "cost": 0.1, "exit_code": 0,
                    "labels": {"project": "x"}}),
        json.dumps({"at": now - 10, "amount": 0.5, "instance_id": "i-1",
                    "instance_type": "c4", "started_at": now - 120}),
        '{"at": 5, "amou',  # a crash mid-write: skipped
    ]  # fmt: skip
    path.write_text("\n".join(lines))


def test_an_old_ledger_file_is_imported_once_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = VirtualRuntime(strict=True)
    now = runtime.now()
    old = tmp_path / "herder-spend.jsonl"
    _old_ledger_file(old, now)
    config = sim_config(queue_path=str(tmp_path / "herder.db"))
    with caplog.at_level(logging.INFO, logger="herder.spend"):
        eng = Engine(config, runtime=runtime)
    assert "imported into the queue (3 entries)" in caplog.text
    assert not old.exists() and (tmp_path / "herder-spend.jsonl.imported").exists()
    start, end = period_bounds(now, "day")
    assert eng.disp.budget_state().spent == 0.75  # the budget counts the imported spend
    (cost,) = eng.disp.ledger.containers(start, end)
    assert cost.labels == (("project", "x"),)
    eng.stop(keep_runtime=True)
    again = Engine(config, driver=eng.driver, runtime=runtime, seed=2)  # nothing to import
    assert again.disp.ledger.total(start, end) == 0.75
    again.stop()


def test_an_import_the_ledger_holds_already_is_not_counted_twice(tmp_path: Path) -> None:
    """A crash between the import and the rename leaves the file: the next start renames it
    without importing it again."""
    old = tmp_path / "herder-spend.jsonl"
    _old_ledger_file(old, 1000.0)
    copy = tmp_path / "copy.jsonl"
    shutil.copy(old, copy)
    ledger = MemoryLedger()
    assert import_jsonl(old, ledger) == 3
    shutil.copy(copy, old)
    assert import_jsonl(old, ledger) == 0
    assert ledger.total(0.0, 2000.0) == 0.75 and len(ledger.containers(0.0, 2000.0)) == 1
    assert import_jsonl(old, ledger) is None  # no file: nothing to do


def test_the_ledger_path_key_names_the_old_file_and_is_deprecated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = VirtualRuntime(strict=True)
    old = tmp_path / "elsewhere.jsonl"
    _old_ledger_file(old, runtime.now())
    config = sim_config(budget={"ledger_path": str(old)}, queue_path=str(tmp_path / "herder.db"))
    with caplog.at_level(logging.WARNING):
        eng = Engine(config, runtime=runtime)
    assert "cloud.budget.ledger_path is deprecated: spend now lives in the queue" in caplog.text
    assert (tmp_path / "elsewhere.jsonl.imported").exists()
    assert eng.disp.ledger.total(0.0, runtime.now() + 1) == 0.75
    eng.stop()


def test_the_tracker_compacts_the_ledger_once_a_day(tmp_path: Path) -> None:
    runtime = VirtualRuntime()
    queue = _queue(tmp_path / "queue.db", runtime)
    now = runtime.now()
    cutoff = compaction_cutoff(now)
    old = [SpendEntry(cutoff - 100 - n, 1.0, f"i-{n}", "c4", cutoff - DAY) for n in range(3)]
    queue.ledger.record_many(old, [ContainerCost(cutoff - 50, "u", "n", "c4", 0.5, 0)])
    tracker = SpendTracker(queue.ledger, {}, now)
    tracker.update(now, [])  # the first pass compacts
    (folded,) = queue.ledger.entries(0.0, cutoff)
    assert folded.instance_id == FOLDED and folded.amount == 3.0
    assert queue.ledger.containers(0.0, float("inf")) == []
    late = SpendEntry(cutoff - 10, 2.0, "i-late", "c4", cutoff - DAY)
    queue.ledger.record(late)
    runtime.advance(DAY - 1)
    tracker.update(runtime.now(), [])  # not yet a day later: left alone
    assert late in queue.ledger.entries(0.0, cutoff)
    runtime.advance(1)
    tracker.update(runtime.now(), [])
    (folded,) = queue.ledger.entries(0.0, cutoff)
    assert folded.amount == 5.0
    queue.close()


def test_budget_command_reads_the_queues_ledger_without_a_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import time

    path = tmp_path / "queue.db"
    queue = _queue(path)
    now = time.time()
    queue.ledger.record(SpendEntry(now - 5, 1.25, "i-1", "c4", now - 60))
    queue.close()
    config = tmp_path / "herder.yaml"
    config.write_text(
        f"queue:\n  path: {path}\ncloud:\n  budget:\n    soft_limit: 1.0\n    period: day\n"
    )
    args = ["--config", str(config), "budget", "--data-dir", str(tmp_path), "--json"]
    assert main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["spent"] == 1.25 and doc["soft_reached"] is True
    assert doc["message"].startswith("spend this day 1.25 of 1.00")


def test_a_standby_books_nothing_twice_of_what_the_leader_booked_while_it_waited() -> None:
    """The standby builds its tracker when it starts waiting; the engine reloads it when it
    starts dispatching, so an adopted instance is billed from what the ledger holds then."""
    from herder.model import IdleBehavior, InstanceType, InstanceView, WorkerState

    it = InstanceType("c4", "c4", 4, 1, price=3600.0)  # 1.0 a second: amounts read as seconds
    shared = MemoryLedger()
    standby = SpendTracker(shared, {"c4": it}, 0.0)  # built at 0, waiting
    shared.record(SpendEntry(500.0, 500.0, "i-1", "c4", 0.0))  # the leader books 500 s
    standby.reload(600.0)  # takes over at 600
    view = InstanceView(
        "i-1", "", 3600.0, "c4", "c4", "", 0.0, [], WorkerState.IDLE, IdleBehavior.RUN, appeared=0.0
    )
    standby.update(600.0, [view])
    standby.flush(600.0)
    assert shared.total(0.0, 1000.0) == pytest.approx(600.0)  # not 1100: nothing twice

"""Guards on the queue file: private, checked, never replaced or emptied without a word, and one
unreadable row costs one container, not the queue."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from herder.engine.sizing import ConfigSizer
from herder.model import ContainerSpec, ContainerState, InstanceType
from herder.queue.base import QueueError
from herder.queue.rules import RuleSettings
from herder.queue.sqlite import COMMITS_SUFFIX, IDENTITY_SUFFIX, SqliteQueue
from herder.runtime import VirtualRuntime

GiB = 1 << 30
TYPES = {"small": InstanceType("small", "p.small", 2, 8 * GiB, price=0.1)}


def open_queue(path: Path) -> SqliteQueue:
    return SqliteQueue(str(path), RuleSettings(VirtualRuntime(), ConfigSizer(TYPES)))


def fill(path: Path, n: int = 3) -> list[str]:
    queue = open_queue(path)
    uuids = [queue.submit(ContainerSpec(command=("true",), name=f"c{i}")).uuid for i in range(n)]
    queue.close()
    return uuids


def test_the_files_are_private(tmp_path: Path) -> None:
    path = tmp_path / "herder.db"
    queue = open_queue(path)
    queue.submit(ContainerSpec(command=("true",)))
    for name in ("herder.db", "herder.db-wal", f"herder.db{IDENTITY_SUFFIX}"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    queue.close()


def test_a_truncated_file_is_refused_not_started_empty(tmp_path: Path) -> None:
    path = tmp_path / "herder.db"
    fill(path)
    for suffix in ("", "-wal", "-shm"):
        if (tmp_path / f"herder.db{suffix}").exists():
            os.truncate(tmp_path / f"herder.db{suffix}", 0)
    with pytest.raises(QueueError, match="replaced or truncated") as info:
        open_queue(path)
    assert f"delete {path}{IDENTITY_SUFFIX}" in str(info.value)


def test_another_queue_put_in_its_place_is_refused(tmp_path: Path) -> None:
    path, other = tmp_path / "herder.db", tmp_path / "other" / "herder.db"
    other.parent.mkdir()
    fill(path)
    fill(other, 1)
    os.replace(other, path)
    with pytest.raises(QueueError, match="another queue's file was put in its place"):
        open_queue(path)


def test_a_damaged_file_is_refused_with_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "herder.db"
    fill(path, 200)
    size = path.stat().st_size
    assert size > 3 * 4096
    with open(path, "r+b") as fh:  # 4 KiB of damage inside the file
        fh.seek(size // 2 // 4096 * 4096)
        fh.write(b"\xa5" * 4096)
    with pytest.raises(QueueError, match="is damaged") as info:
        open_queue(path)
    assert "restore it from a backup" in str(info.value)


def test_a_file_that_is_no_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "herder.db"
    path.write_bytes(b"this is not a database, " * 200)
    with pytest.raises(QueueError, match="is damaged"):
        open_queue(path)


def test_an_older_queue_without_identity_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "herder.db"
    uuids = fill(path)
    db = sqlite3.connect(path)
    db.execute("DROP TABLE queue_identity")
    db.commit()
    db.close()
    (tmp_path / f"herder.db{IDENTITY_SUFFIX}").unlink()
    queue = open_queue(path)
    assert [queue.get(u) is not None for u in uuids] == [True] * 3
    queue.close()
    assert (tmp_path / f"herder.db{IDENTITY_SUFFIX}").read_text().strip()
    open_queue(path).close()  # and it is its own queue from now on


@pytest.mark.parametrize(
    "damage",
    [
        lambda spec: {**spec, "runtime_constraints": [1, 2]},
        lambda spec: {**spec, "environment": [["ONLY_A_NAME"]]},
        lambda spec: "not a spec at all",
    ],
)
def test_an_unreadable_row_cancels_that_container_only(tmp_path: Path, damage) -> None:
    path = tmp_path / "herder.db"
    bad, good, _ = fill(path)
    db = sqlite3.connect(path)
    (raw,) = db.execute("SELECT spec FROM containers WHERE uuid = ?", (bad,)).fetchone()
    db.execute(
        "UPDATE containers SET spec = ? WHERE uuid = ?", (json.dumps(damage(json.loads(raw))), bad)
    )
    db.commit()
    db.close()
    queue = open_queue(path)  # start-up goes on
    entries, _ = queue.entries()
    assert good in entries and bad not in entries
    cancelled = queue.get(bad)
    assert cancelled is not None and cancelled.state is ContainerState.CANCELLED
    assert "stored record could not be read" in cancelled.status("error")
    listed = {c.uuid: c for c in queue.list(None, 10, "")}
    assert listed[bad].state is ContainerState.CANCELLED
    queue.close()
    again = open_queue(path)  # and the next start finds it already cancelled
    assert again.get(bad).state is ContainerState.CANCELLED
    again.close()


# ------------------------------------------------------------------------- the commands


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from herder.app import cli

    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_queue_check_and_backup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HERDER_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    uuids = fill(data / "herder.db")
    status, out, _ = _cli(capsys, "queue", "check", "--data-dir", str(data))
    assert status == 0 and out.startswith(f"{data / 'herder.db'}: OK (queue ")
    assert "3 Queued" in out
    copy = tmp_path / "copy.db"
    status, out, _ = _cli(capsys, "queue", "backup", str(copy), "--data-dir", str(data))
    assert status == 0 and "backed up to" in out
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    restored = open_queue(copy)
    assert all(restored.get(u) is not None for u in uuids)
    restored.close()
    assert _cli(capsys, "queue", "backup", str(copy), "--data-dir", str(data))[0] == 1
    os.truncate(data / "herder.db", 0)
    for suffix in ("-wal", "-shm"):
        (data / f"herder.db{suffix}").unlink(missing_ok=True)
    status, _, err = _cli(capsys, "queue", "check", "--data-dir", str(data))
    assert status == 1 and "herder: error:" in err and "Traceback" not in err


def test_serve_refuses_a_replaced_queue_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HERDER_CONFIG", raising=False)
    monkeypatch.delenv("HERDER_MANAGEMENT_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    fill(data / "herder.db")
    (data / "herder.db").unlink()
    for suffix in ("-wal", "-shm"):
        (data / f"herder.db{suffix}").unlink(missing_ok=True)
    config = tmp_path / "sim.yaml"
    config.write_text(
        "cluster_id: guard\ncloud: {driver: sim}\ninstance_types: {small: {vcpus: 2, ram: 8GiB}}\n"
    )
    status, _, err = _cli(
        capsys, "--config", str(config), "serve", "--data-dir", str(data), "--listen", "127.0.0.1:0"
    )
    assert status == 1
    assert "queue: queue file" in err and "replaced or truncated" in err
    assert "Traceback" not in err


def test_a_second_queue_object_on_one_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "shared" / "herder.db"
    path.parent.mkdir()
    first = open_queue(path)
    with pytest.raises(QueueError, match=r"in use by another herder \(pid \d+\)"):
        open_queue(path)
    first.close()
    open_queue(path).close()  # free again once the first one is closed


def test_a_second_serve_process_on_a_shared_queue_file_is_refused(tmp_path: Path) -> None:
    """Two dispatchers with their own data directories but one queue file (queue.path)."""
    import subprocess
    import sys

    path = tmp_path / "shared.db"
    first = open_queue(path)  # held by this process, as a running herder would
    config = tmp_path / "c.yaml"
    config.write_text(
        f"cluster_id: share\ncloud: {{driver: sim}}\nqueue: {{path: {path}}}\n"
        "instance_types: {small: {vcpus: 2, ram: 8GiB}}\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "herder.app.cli",
            "--config",
            str(config),
            "serve",
            "--data-dir",
            str(tmp_path / "data"),
            "--listen",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    first.close()
    assert result.returncode == 1
    assert "in use by another herder" in result.stderr and "Traceback" not in result.stderr


# A dispatcher's process that submits containers, then is SIGKILLed: its last commits are left
# in the -wal file, never checkpointed into the main file.
KILLED_WRITER = """
import os, signal, sys
from herder.model import ContainerSpec, InstanceType
from herder.queue.rules import RuleSettings
from herder.queue.sqlite import SqliteQueue
from herder.runtime import VirtualRuntime
from herder.engine.sizing import ConfigSizer

types = {"small": InstanceType("small", "p.small", 2, 8 << 30, price=0.1)}
queue = SqliteQueue(sys.argv[1], RuleSettings(VirtualRuntime(), ConfigSizer(types)))
for i in range(int(sys.argv[2])):
    print(queue.submit(ContainerSpec(command=("true",), name=f"k{i}")).uuid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def killed_writer(path: Path, n: int) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(path), str(n)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return proc.stdout.split()


def test_a_lost_write_ahead_log_is_refused_with_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The -wal file deleted after a SIGKILL: SQLite alone opens the main file as it was at the
    last checkpoint, and the containers submitted since are gone without a word."""
    monkeypatch.delenv("HERDER_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    path = data / "herder.db"
    before = fill(path)
    backup = tmp_path / "backup.db"
    assert _cli(capsys, "queue", "backup", str(backup), "--data-dir", str(data))[0] == 0
    lost = killed_writer(path, 5)
    assert len(lost) == 5 and (data / "herder.db-wal").stat().st_size > 0
    (data / "herder.db-wal").unlink()
    with pytest.raises(QueueError, match=r"missing 5 committed change\(s\)") as info:
        open_queue(path)
    message = str(info.value)
    assert "herder queue backup" in message and f"delete {path}{COMMITS_SUFFIX}" in message
    status, _, err = _cli(capsys, "queue", "check", "--data-dir", str(data))
    assert status == 1 and "missing 5 committed change(s)" in err and "Traceback" not in err
    # What the message says: restore the backup and delete the mark, and the queue opens.
    os.replace(backup, path)
    (data / "herder.db-shm").unlink(missing_ok=True)
    (data / f"herder.db{COMMITS_SUFFIX}").unlink()
    queue = open_queue(path)
    assert [queue.get(u) is not None for u in before] == [True] * 3
    queue.close()


def test_a_kill_with_the_log_kept_loses_nothing_and_is_not_refused(tmp_path: Path) -> None:
    path = tmp_path / "herder.db"
    before = fill(path)
    after = killed_writer(path, 5)
    after += killed_writer(path, 2)
    queue = open_queue(path)
    assert all(queue.get(u) is not None for u in before + after)
    queue.close()
    # A clean close checkpoints and removes the log: nothing is missing then either.
    assert not (tmp_path / "herder.db-wal").exists()
    open_queue(path).close()


def test_every_write_is_counted_in_the_file_and_the_mark(tmp_path: Path) -> None:
    path = tmp_path / "herder.db"
    queue = open_queue(path)
    uuid = queue.submit(ContainerSpec(command=("true",))).uuid
    queue.cancel(uuid, "test")
    queue.close()
    db = sqlite3.connect(path)
    stored = db.execute("PRAGMA user_version").fetchone()[0]
    db.close()
    assert stored == 2 and int((tmp_path / f"herder.db{COMMITS_SUFFIX}").read_text()) == 2
    assert stat.S_IMODE((tmp_path / f"herder.db{COMMITS_SUFFIX}").stat().st_mode) == 0o600

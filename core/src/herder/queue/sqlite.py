"""The embedded container queue: SQLite storage under the shared queue rules.

SQLite (stdlib ``sqlite3``, WAL journal, ``synchronous=NORMAL``) is the system of record: every
state change is one committed transaction before it is visible anywhere else.  The rules, and
the in-memory snapshot the scheduler reads on every pass, are those of
:class:`~herder.queue.rules.RuledQueue`; this module only stores and loads, and guards the file
(one owner, identity, integrity, schema version, and the commits counted: a committed change
lives in the ``-wal`` file until a checkpoint copies it into the main file, and a queue whose
WAL was lost is refused, :func:`_check_commits`).

One connection serves every thread, guarded by the queue's one lock.  A transition starts from
the snapshot's record: one process owns the file (:func:`_take_ownership`), so nothing else
changes it behind the queue's back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from herder.model import Container, ContainerState
from herder.queue.base import ListFilter, QueueError
from herder.queue.records import (
    COLUMN_COUNT,
    COLUMNS,
    decode,
    dumps,
    from_row,
    insert_row,
    update_row,
    upgrade_schema,
)
from herder.queue.rules import (
    CANCELLED,
    LOCKED,
    QUEUED,
    RUNNING,
    UNFINISHED,
    InvalidRequest,
    RuledQueue,
    RuleSettings,
    Unreadable,
)
from herder.queue.sql_ledger import Execute, SqlLedger
from herder.spend import Ledger, MemoryLedger

log = logging.getLogger(__name__)

__all__ = ["InvalidRequest", "SqliteQueue", "read_ledger"]


@contextlib.contextmanager
def immediate_transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One committed ``BEGIN IMMEDIATE`` transaction on ``db``, or none at all.

    For connections in autocommit mode (``isolation_level=None``), which herder's SQLite files
    use so that every transaction is explicit.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        # Also after a failed COMMIT (disk full): the next write must find no open transaction.
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


# --------------------------------------------------------------------------- schema

#: Each item upgrades the schema by one version; ``schema_version`` records how many ran.  Add
#: new items at the end, never edit old ones: databases in the field have already run them.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE containers (
            uuid TEXT PRIMARY KEY,
            state TEXT NOT NULL,
            priority INTEGER NOT NULL,
            spec TEXT NOT NULL,
            created_at REAL NOT NULL,
            locked_at REAL,
            started_at REAL,
            finished_at REAL,
            lock_count INTEGER NOT NULL DEFAULT 0,
            exit_code INTEGER,
            runtime_status TEXT NOT NULL DEFAULT '{}',
            instance_id TEXT NOT NULL DEFAULT '',
            instance_type TEXT NOT NULL DEFAULT '',
            cost REAL NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX containers_state_uuid ON containers (state, uuid)",
        """CREATE TABLE logs (
            id INTEGER PRIMARY KEY,
            uuid TEXT NOT NULL,
            start INTEGER NOT NULL,
            data BLOB NOT NULL
        )""",
        "CREATE UNIQUE INDEX logs_uuid_start ON logs (uuid, start)",
    ),
    # Step 2: listings newest first, and arrays.
    (
        "ALTER TABLE containers ADD COLUMN array_id TEXT NOT NULL DEFAULT ''",
        "CREATE INDEX containers_created_uuid ON containers (created_at, uuid)",
        "CREATE INDEX containers_array ON containers (array_id, created_at, uuid) "
        "WHERE array_id != ''",
    ),
    # Step 3: every dispatch attempt of a container, as JSON in its row.
    ("ALTER TABLE containers ADD COLUMN attempts TEXT NOT NULL DEFAULT '[]'",),
    # Step 4: container labels (free-form key=value at submit, for cost reports).  Rows
    # written before it get none.
    ("ALTER TABLE containers ADD COLUMN labels TEXT NOT NULL DEFAULT '{}'",),
    # Step 5: the spend ledger (herder.queue.sql_ledger), kept with the queue instead of in a
    # file beside it.
    (
        """CREATE TABLE spend (
            id INTEGER PRIMARY KEY,
            at REAL NOT NULL,
            amount REAL NOT NULL,
            instance_id TEXT NOT NULL,
            instance_type TEXT NOT NULL,
            started_at REAL NOT NULL
        )""",
        "CREATE INDEX spend_at ON spend (at)",
        """CREATE TABLE container_costs (
            id INTEGER PRIMARY KEY,
            at REAL NOT NULL,
            uuid TEXT NOT NULL,
            name TEXT NOT NULL,
            instance_type TEXT NOT NULL,
            cost REAL NOT NULL,
            exit_code INTEGER NOT NULL,
            labels TEXT NOT NULL DEFAULT '{}'
        )""",
        "CREATE INDEX container_costs_at ON container_costs (at)",
    ),
)

# Built from constants only, never from input.
_SELECT = f"SELECT {COLUMNS} FROM containers"  # noqa: S608
#: Columns that upgrades added, with what a file written before them means: no array, no
#: recorded attempts, no labels.
_ADDED_COLUMNS = {"array_id": "''", "attempts": "'[]'", "labels": "'{}'"}


def _select_from_older(columns: set[str]) -> str:
    """:data:`_SELECT` for a file that may not be upgraded yet (``queue check`` reads files
    as they are): a column it lacks reads as what it meant before the column existed."""
    wanted = [name.strip() for name in COLUMNS.split(",")]
    selected = ", ".join(name if name in columns else _ADDED_COLUMNS[name] for name in wanted)
    return f"SELECT {selected} FROM containers"  # noqa: S608 (constant names and literals only)


_INSERT = f"INSERT INTO containers ({COLUMNS}) VALUES ({', '.join('?' * COLUMN_COUNT)})"  # noqa: S608
_UPDATE = (
    "UPDATE containers SET state = ?, priority = ?, locked_at = ?, started_at = ?, "
    "finished_at = ?, lock_count = ?, exit_code = ?, runtime_status = ?, instance_id = ?, "
    "instance_type = ?, cost = ?, attempts = ? WHERE uuid = ?"
)

# --------------------------------------------------------------------------- guards on the file
#
# The queue is the one thing herder must never lose, so a file that is not the one herder left
# (replaced, emptied, damaged) is refused with what to do, never opened as a new empty queue.


#: Beside the queue file: the identity of the queue that lives in it.
IDENTITY_SUFFIX = ".id"


def _create_private(path: str) -> None:
    """Create the queue file 0600 if it does not exist (SQLite gives its -wal and -shm files
    the same mode), and warn when other users can read it (it holds containers' environments
    and output) or replace it (its directory is writable by them)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        os.close(fd)
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        log.warning("queue file %s can be read by other users (mode %o); chmod 600 it", path, mode)
    directory = os.path.dirname(os.path.abspath(path))
    dir_mode = os.stat(directory).st_mode
    if dir_mode & 0o022 and not dir_mode & 0o1000:
        log.warning(
            "other users may replace the queue file: %s is writable by them (mode %o)",
            directory,
            dir_mode & 0o777,
        )


#: Beside the queue file: held (flock) by the one queue object that uses it.
OWNER_SUFFIX = ".lock"


def _take_ownership(path: str) -> int:
    """Lock ``<path>.lock`` for this queue object, or refuse: two dispatchers on one queue
    file would both lock, start and cancel the same containers, and run them twice.

    An flock, released by :meth:`SqliteQueue.close` or by the process's end however it ends;
    the file names the holder's pid for the message.  (``herder queue check`` and ``backup``
    read the file without taking it.)
    """
    from herder import lockfile

    try:
        return lockfile.hold(path + OWNER_SUFFIX)
    except lockfile.LockHeld as held:
        raise QueueError(
            f"queue file {path} is in use by another herder (pid {held.holder}); two "
            "dispatchers on one queue would run containers twice: stop the other one first"
        ) from None


def _damaged(path: str, why: str) -> str:
    return (
        f"queue file {path} is damaged ({why}); restore it from a backup (`herder queue "
        "backup` makes one), or move it away to start an empty queue"
    )


def _check_integrity(db: sqlite3.Connection, path: str) -> None:
    """SQLite's quick check over the whole file: damage found now, not as garbage later."""
    problems = [row[0] for row in db.execute("PRAGMA quick_check(5)").fetchall()]
    if problems != ["ok"]:
        raise QueueError(_damaged(path, "; ".join(str(p) for p in problems)[:500]))


#: Beside the queue file: how many write transactions the queue has committed (its commit
#: mark).  The file itself counts them too, in SQLite's ``user_version`` header field, written
#: in the same transaction as the change; a file that counts fewer than the mark lost commits.
COMMITS_SUFFIX = ".commits"


def _read_mark(path: str) -> int:
    try:
        with open(path + COMMITS_SUFFIX, encoding="ascii") as fh:
            text = fh.read().strip()
    except FileNotFoundError:
        return 0
    return int(text) if text.isdigit() else 0


def _lost_commits(path: str, stored: int, marked: int) -> str:
    return (
        f"queue file {path} is missing {marked - stored} committed change(s) of the {marked} "
        f"this queue made: its write-ahead log {path}-wal was deleted or replaced while "
        f"herder was not running, and containers it recorded are lost.  Restore the queue from "
        f"a backup (`herder queue backup` makes one) and delete {path}{COMMITS_SUFFIX}; or, to "
        f"go on with what the file holds, delete {path}{COMMITS_SUFFIX}"
    )


def _check_commits(db: sqlite3.Connection, path: str, fresh: bool) -> tuple[int, int]:
    """Refuse a queue file that holds fewer commits than the queue made: (commits, mark fd).

    With the WAL journal a committed change is in ``<path>-wal`` until the next checkpoint;
    delete that file after a crash (a SIGKILL, a power cut, a clean-up script) and SQLite opens
    the main file as it was at the checkpoint, without a word, losing every container submitted
    or finished since.  So each write transaction also counts itself in the file's
    ``user_version`` field (no schema change), and after each commit the count is written to
    ``<path>.commits`` (a few bytes, no fsync: it must survive the process, which the page
    cache ensures, not a power cut, which ``synchronous=NORMAL`` does not promise either).  At
    opening, a file whose count is below the mark has lost commits.  A kill between a commit
    and its mark leaves the mark one behind, so the last commit alone can go unnoticed.

    A new file (``fresh``) starts a new count: the identity check already refused a new file
    where a queue was kept.
    """
    stored = int(db.execute("PRAGMA user_version").fetchone()[0])
    marked = _read_mark(path)
    if not fresh and marked > stored:
        raise QueueError(_lost_commits(path, stored, marked))
    fd = os.open(path + COMMITS_SUFFIX, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        _write_mark(fd, stored)
    except BaseException:
        os.close(fd)
        raise
    return stored, fd


def _write_mark(fd: int, commits: int) -> None:
    """One write of fixed width at offset 0: a reader never sees a mix of two counts."""
    os.pwrite(fd, b"%020d\n" % commits, 0)


def check_file(path: str) -> dict[str, Any]:
    """Check a queue file without changing it (``herder queue check``), even while a
    dispatcher uses it: integrity, identity, schema version, and that every row decodes.

    Returns a report; raises :class:`QueueError` for a file that would be refused at start.
    """
    if not os.path.exists(path):
        raise QueueError(f"queue file {path}: no such file")
    # The mark before the file's count: a dispatcher writing meanwhile only raises the count,
    # so a queue in use is never taken for one that lost commits.
    marked = _read_mark(path)
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        try:
            _check_integrity(db, path)
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
            version = db.execute("SELECT version FROM schema_version").fetchone()[0]
            identity = ""
            if "queue_identity" in tables:
                found = db.execute("SELECT id FROM queue_identity").fetchone()
                identity = str(found[0]) if found else ""
            columns = {row[1] for row in db.execute("PRAGMA table_info(containers)")}
            rows = db.execute(_select_from_older(columns)).fetchall()
            stored = int(db.execute("PRAGMA user_version").fetchone()[0])
        except sqlite3.DatabaseError as exc:
            raise QueueError(_damaged(path, str(exc))) from exc
    finally:
        db.close()
    try:
        with open(path + IDENTITY_SUFFIX, encoding="ascii") as fh:
            expected = fh.read().strip()
    except FileNotFoundError:
        expected = ""
    if expected and identity and expected != identity:
        raise QueueError(
            f"queue file {path} holds queue {identity}, not queue {expected} that was kept there"
        )
    if marked > stored:
        raise QueueError(_lost_commits(path, stored, marked))
    states: dict[str, int] = {}
    unreadable = []
    for row in rows:
        container, why = decode(row)
        states[container.state.value] = states.get(container.state.value, 0) + 1
        if why is not None and container.state in (QUEUED, LOCKED, RUNNING):
            unreadable.append(container.uuid)
    if int(version) > len(_MIGRATIONS):
        raise QueueError(
            f"queue file {path} has schema version {version}, newer than this "
            f"herder understands ({len(_MIGRATIONS)}); upgrade herder"
        )
    return {
        "path": path,
        "identity": identity,
        "schema_version": int(version),
        "containers": dict(sorted(states.items())),
        "unreadable_to_cancel": unreadable,
    }


def backup_file(path: str, destination: str) -> int:
    """Copy the queue into ``destination`` with SQLite's online backup (consistent while a
    dispatcher writes), created 0600; returns its size in bytes."""
    if os.path.exists(destination):
        raise QueueError(f"{destination} exists already; choose a new file for the backup")
    fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    source = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    target = sqlite3.connect(destination)
    try:
        source.backup(target)
    except sqlite3.DatabaseError as exc:
        target.close()
        os.unlink(destination)
        raise QueueError(_damaged(path, str(exc))) from exc
    finally:
        source.close()
    target.close()
    return os.path.getsize(destination)


def read_ledger(path: str) -> Ledger:
    """The spend ledger of a queue file, read only (``herder costs`` while serve runs or not):
    nothing is created or written.  A file from before the ledger (schema 4) has none."""
    if not os.path.exists(path):
        raise QueueError(f"queue file {path}: no such file")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    except sqlite3.DatabaseError as exc:
        raise QueueError(_damaged(path, str(exc))) from exc
    if "spend" not in tables:
        db.close()
        return MemoryLedger()

    def read(work: Callable[[Execute], Any]) -> Any:
        try:
            return work(db.execute)
        except sqlite3.DatabaseError as exc:
            raise QueueError(_damaged(path, str(exc))) from exc

    return SqlLedger.read_only(read, f"queue file {path} is open read only")


def _check_identity(db: sqlite3.Connection, path: str, fresh: bool) -> None:
    """Refuse a queue file that is not the one herder used at this path.

    A new queue gets a random identity, stored in the file and in ``<path>.id`` beside it.  An
    empty file where a queue was (truncated, or replaced by a new one) finds the ``.id`` file
    without its queue; a different queue file finds another identity.
    """
    sidecar = path + IDENTITY_SUFFIX
    try:
        with open(sidecar, encoding="ascii") as fh:
            expected = fh.read().strip()
    except FileNotFoundError:
        expected = ""
    db.execute("CREATE TABLE IF NOT EXISTS queue_identity (id TEXT NOT NULL)")
    row = db.execute("SELECT id FROM queue_identity").fetchone()
    if row is None and fresh and expected:
        raise QueueError(
            f"queue file {path} is new or empty, but queue {expected} was kept there: the file "
            f"was replaced or truncated.  Restore it from a backup; or, to start an empty queue "
            f"on purpose, delete {sidecar}"
        )
    if row is None:
        identity = expected or secrets.token_hex(16)
        db.execute("INSERT INTO queue_identity (id) VALUES (?)", (identity,))
        # Into the main file at once, so the identity survives whatever happens to the WAL.
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    else:
        identity = str(row[0])
        if expected and identity != expected:
            raise QueueError(
                f"queue file {path} holds queue {identity}, not queue {expected} that was kept "
                f"there: another queue's file was put in its place.  Put the right file back, "
                f"or delete {sidecar} to use this one"
            )
    if not expected:
        fd = os.open(sidecar, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(identity + "\n")


# --------------------------------------------------------------------------- the queue


class SqliteQueue(RuledQueue):
    """The embedded :class:`~herder.queue.base.ContainerQueue`: durable in one SQLite file (or
    ``":memory:"``)."""

    def __init__(self, path: str, rules: RuleSettings) -> None:
        super().__init__(rules)
        self._path = path
        on_disk = path != ":memory:" and not path.startswith("file:")
        #: Commits counted in the file and in its commit mark (None: not counted, in memory).
        self._commits: int | None = None
        self._mark_fd: int | None = None
        self._owner_fd = _take_ownership(path) if on_disk else None
        if on_disk:
            _create_private(path)
        # isolation_level=None: no implicit transactions; every write opens its own explicitly.
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        except BaseException:
            self._release_ownership()
            raise
        try:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.execute("PRAGMA busy_timeout=5000")
                if on_disk:
                    _check_integrity(self._db, path)
                fresh = self._migrate()
                if on_disk:
                    _check_identity(self._db, path, fresh)
                    self._commits, self._mark_fd = _check_commits(self._db, path, fresh)
            except sqlite3.DatabaseError as exc:
                raise QueueError(_damaged(path, str(exc))) from exc
            self._open()
        except BaseException:
            self._db.close()
            self._release_ownership()
            raise
        self._ledger = SqlLedger(
            self._ledger_write, self._ledger_read, retry_on=(sqlite3.OperationalError,)
        )

    # ---- the spend ledger

    @property
    def ledger(self) -> Ledger:
        """Spend in the ``spend`` and ``container_costs`` tables of the queue file; a write
        the disk refuses is kept and written with the next (:mod:`herder.queue.sql_ledger`)."""
        return self._ledger

    def _ledger_write(self, work: Callable[[Execute], Any]) -> Any:
        with self._lock, self._transaction() as db:
            return work(db.execute)

    def _ledger_read(self, work: Callable[[Execute], Any]) -> Any:
        with self._lock:
            return work(self._db.execute)

    # ---- opening

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One committed transaction, or none at all (caller holds ``self._lock``), counted in
        the file and, once committed, in the commit mark (:func:`_check_commits`)."""
        if self._commits is None or self._mark_fd is None:
            with immediate_transaction(self._db) as db:
                yield db
            return
        count = self._commits + 1
        with immediate_transaction(self._db) as db:
            yield db
            db.execute(f"PRAGMA user_version = {count:d}")
        self._commits = count
        _write_mark(self._mark_fd, count)

    def _migrate(self) -> bool:
        """Bring the schema up to date, one recorded version at a time; True for a new queue."""
        with self._transaction() as db:
            found = db.execute(
                "SELECT count(*) FROM sqlite_master WHERE name = 'schema_version'"
            ).fetchone()
            fresh = int(found[0]) == 0
            upgrade_schema(
                db.execute,
                _MIGRATIONS,
                lambda version, known: (
                    f"queue database schema version {version} is newer than "
                    f"this herder understands ({known}); upgrade herder"
                ),
            )
        return fresh

    # ---- storage (each called with self._lock held)

    def _store_new(self, containers: Sequence[Container]) -> None:
        with self._transaction() as db:
            db.executemany(_INSERT, [insert_row(c) for c in containers])

    def _store_change(
        self, uuid: str, change: Callable[[Container], Container]
    ) -> tuple[Container, Container]:
        old = self._stored(uuid)
        new = change(old)
        if new is not old:
            with self._transaction() as db:
                db.execute(_UPDATE, update_row(new))
        return old, new

    def _store_cancelled(
        self, containers: Sequence[Container], unreadable: Sequence[Unreadable], now: float
    ) -> None:
        with self._transaction() as db:
            db.executemany(_UPDATE, [update_row(c) for c in containers])
            db.executemany(
                "UPDATE containers SET state = ?, finished_at = ?, runtime_status = ? "
                "WHERE uuid = ?",
                [(CANCELLED.value, now, dumps({"error": why}), uuid) for uuid, why in unreadable],
            )

    def _load(self, uuid: str) -> Container | None:
        row = self._db.execute(f"{_SELECT} WHERE uuid = ?", (uuid,)).fetchone()
        return None if row is None else from_row(row)

    def _load_unfinished(self) -> list[tuple[Container, str | None]]:
        rows = self._db.execute(
            f"{_SELECT} WHERE state IN (?, ?, ?)", tuple(s.value for s in UNFINISHED)
        ).fetchall()
        return [decode(row) for row in rows]

    def _load_page(
        self, states: list[ContainerState] | None, limit: int, after: str
    ) -> list[Container]:
        sql = f"{_SELECT} WHERE uuid > ?"
        params: list[Any] = [after]
        if states is not None:
            sql += f" AND state IN ({', '.join('?' * len(states))})"
            params += [s.value for s in states]
        sql += " ORDER BY uuid LIMIT ?"
        params.append(limit)
        return [from_row(row) for row in self._db.execute(sql, params).fetchall()]

    def _load_newest(
        self, filter: ListFilter, limit: int, cursor: tuple[float, str] | None
    ) -> list[Container]:
        clauses: list[str] = []
        params: list[Any] = []
        if cursor is not None:
            clauses.append("(created_at < ? OR (created_at = ? AND uuid < ?))")
            params += [cursor[0], cursor[0], cursor[1]]
        if filter.states is not None:
            clauses.append(f"state IN ({', '.join('?' * len(filter.states))})")
            params += [s.value for s in filter.states]
        if filter.since is not None:
            clauses.append("created_at >= ?")
            params.append(filter.since)
        if filter.array_id:
            clauses.append("array_id = ? AND array_id != ''")
            params.append(filter.array_id)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"{_SELECT}{where} ORDER BY created_at DESC, uuid DESC LIMIT ?"
        params.append(limit)
        return [from_row(row) for row in self._db.execute(sql, params).fetchall()]

    def _load_counts(self) -> dict[ContainerState, int]:
        rows = self._db.execute("SELECT state, COUNT(*) FROM containers GROUP BY state").fetchall()
        return {ContainerState(state): int(n) for state, n in rows}

    def _store_log(self, uuid: str, data: bytes) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO logs (uuid, start, data) VALUES (?, ?, ?)",
                (uuid, self._log_size(uuid), data),
            )

    def _log_size(self, uuid: str) -> int:
        row = self._db.execute(
            "SELECT start + length(data) FROM logs WHERE uuid = ? ORDER BY start DESC LIMIT 1",
            (uuid,),
        ).fetchone()
        return 0 if row is None else int(row[0])

    def _load_log(self, uuid: str, offset: int, end: int | None) -> bytes:
        # Start at the chunk holding ``offset``: the last one starting at or before it.
        rows = self._db.execute(
            "SELECT start, data FROM logs WHERE uuid = ? AND start >= ("
            " SELECT COALESCE(MAX(start), 0) FROM logs WHERE uuid = ? AND start <= ?)"
            " AND (? IS NULL OR start < ?) ORDER BY start",
            (uuid, uuid, offset, end, end),
        ).fetchall()
        if not rows:
            return b""
        first = rows[0][0]
        data = b"".join(chunk for _, chunk in rows)
        return data[offset - first : None if end is None else end - first]

    def close(self) -> None:
        """Write the spend entries a full disk held back, if it takes them now; then close."""
        ledger = getattr(self, "_ledger", None)
        if ledger is not None and not self._closed:
            try:
                ledger.flush()
            except sqlite3.Error as exc:  # the file is closed all the same
                log.error("spend ledger: entries not written at close: %s", exc)
        super().close()

    def _close_storage(self) -> None:
        self._db.close()
        self._release_ownership()

    def _release_ownership(self) -> None:
        if self._mark_fd is not None:
            os.close(self._mark_fd)
            self._mark_fd = None
        if self._owner_fd is not None:
            os.close(self._owner_fd)
            self._owner_fd = None

"""The embedded container queue: SQLite storage plus an in-memory snapshot for the scheduler.

SQLite (stdlib ``sqlite3``, WAL journal, ``synchronous=NORMAL``) is the system of record: every
state change is one committed transaction before it is visible anywhere else.  Beside it the queue
keeps, in memory, the "active" set the scheduler reads on every pass (SPEC §7.1): every non-final
container plus the final ones the scheduler has not :meth:`~SqliteQueue.forget`-ten yet, each with
its resources and eligible instance types computed once, when the queue first sees it.  Reading
that set is a dict copy, so a scheduler pass never touches the database, even with 100,000
containers queued.

The state rules are the ones the Arvados API server enforces and the dispatcher relies on
(SPEC §7.6): a lock needs Queued and priority > 0 and counts a dispatch attempt; an unlock past
``max_dispatch_attempts`` cancels.  A container that no configured instance type can run is
cancelled rather than queued (SPEC §7.5): at submission, and again on restart in case the
configured types changed.

One connection serves every thread, guarded by one lock.  Writes follow one order: commit the
transaction, replace the immutable record in the snapshot, release the lock, then call the
listeners, so a listener that reads the queue always sees the change it is told about.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any, NamedTuple

from herder.callbacks import Callbacks
from herder.model import (
    CLUSTER_ID_RE,
    Container,
    ContainerSpec,
    ContainerState,
    GPURequest,
    InstanceResources,
    InstanceType,
    RuntimeConstraints,
    SchedulingParameters,
)
from herder.queue.base import (
    ContainerNotFound,
    ContainerQueue,
    InvalidTransition,
    Listener,
    Observer,
    QueueEntry,
    QueueError,
    Sizer,
)
from herder.runtime import Runtime
from herder.sizing import ConstraintsNotSatisfiable

log = logging.getLogger(__name__)

__all__ = ["InvalidRequest", "SqliteQueue"]

QUEUED = ContainerState.QUEUED
LOCKED = ContainerState.LOCKED
RUNNING = ContainerState.RUNNING
COMPLETE = ContainerState.COMPLETE
CANCELLED = ContainerState.CANCELLED

_UUID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
_UUID_RANDOM_LEN = 15
#: Random bytes below this map uniformly onto the alphabet with ``% 36``; the rest are skipped.
_UUID_BYTE_LIMIT = 256 - 256 % len(_UUID_ALPHABET)



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

class InvalidRequest(QueueError, ValueError):
    """A malformed submission or argument (as opposed to one refused for the container's state).

    It is a :class:`ValueError` too, so callers that validate input generically catch it.
    """


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
)

_COLUMNS = (
    "uuid, state, priority, spec, created_at, locked_at, started_at, finished_at, lock_count, "
    "exit_code, runtime_status, instance_id, instance_type, cost"
)
# Built from constants only, never from input.
_SELECT = f"SELECT {_COLUMNS} FROM containers"  # noqa: S608
_INSERT = f"INSERT INTO containers ({_COLUMNS}) VALUES ({', '.join('?' * 14)})"  # noqa: S608
_UPDATE = (
    "UPDATE containers SET state = ?, priority = ?, locked_at = ?, started_at = ?, "
    "finished_at = ?, lock_count = ?, exit_code = ?, runtime_status = ?, instance_id = ?, "
    "instance_type = ?, cost = ? WHERE uuid = ?"
)


# --------------------------------------------------------------------------- record <-> row


_ENCODER = json.JSONEncoder(separators=(",", ":"))


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
        log.warning("queue file %s can be read by other users (mode %o); chmod 600 it",
                    path, mode)
    directory = os.path.dirname(os.path.abspath(path))
    dir_mode = os.stat(directory).st_mode
    if dir_mode & 0o022 and not dir_mode & 0o1000:
        log.warning("other users may replace the queue file: %s is writable by them (mode %o)",
                    directory, dir_mode & 0o777)


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


def check_file(path: str) -> dict[str, Any]:
    """Check a queue file without changing it (``herder queue check``), even while a
    dispatcher uses it: integrity, identity, schema version, and that every row decodes.

    Returns a report; raises :class:`QueueError` for a file that would be refused at start.
    """
    if not os.path.exists(path):
        raise QueueError(f"queue file {path}: no such file")
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
            rows = db.execute(_SELECT).fetchall()
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
    states: dict[str, int] = {}
    unreadable = []
    for row in rows:
        container, why = _decode(row)
        states[container.state.value] = states.get(container.state.value, 0) + 1
        if why is not None and container.state in (QUEUED, LOCKED, RUNNING):
            unreadable.append(container.uuid)
    if int(version) > len(_MIGRATIONS):
        raise QueueError(f"queue file {path} has schema version {version}, newer than this "
                         f"herder understands ({len(_MIGRATIONS)}); upgrade herder")
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


def _dumps(value: Any) -> str:
    return _ENCODER.encode(value)


def _status_json(c: Container) -> str:
    return _dumps(dict(c.runtime_status)) if c.runtime_status else "{}"


def _spec_to_json(spec: ContainerSpec) -> dict[str, Any]:
    """The spec as plain JSON data; written out by hand because it is on the submit fast path."""
    rc = spec.runtime_constraints
    gpu = rc.gpu
    sp = spec.scheduling_parameters
    return {
        "command": list(spec.command),
        "image": spec.image,
        "environment": [[k, v] for k, v in spec.environment],
        "cwd": spec.cwd,
        "runtime": spec.runtime,
        "runtime_constraints": {
            "vcpus": rc.vcpus,
            "ram": rc.ram,
            "scratch": rc.scratch,
            "gpu": {
                "stack": gpu.stack,
                "device_count": gpu.device_count,
                "driver_version": gpu.driver_version,
                "hardware_target": list(gpu.hardware_target),
                "vram": gpu.vram,
            },
        },
        "scheduling_parameters": {
            "preemptible": sp.preemptible,
            "max_run_time": sp.max_run_time,
            "supervisor": sp.supervisor,
        },
        "priority": spec.priority,
        "name": spec.name,
    }


def _spec_from_json(data: dict[str, Any]) -> ContainerSpec:
    """Inverse of :func:`_spec_to_json`.  Missing keys take the model's defaults, so rows written
    before a field was added still load."""
    rc = data.get("runtime_constraints", {})
    gpu = rc.get("gpu", {})
    sp = data.get("scheduling_parameters", {})
    return ContainerSpec(
        command=tuple(data["command"]),
        image=data.get("image", ""),
        environment=tuple((k, v) for k, v in data.get("environment", ())),
        cwd=data.get("cwd", ""),
        runtime=data.get("runtime", ""),
        runtime_constraints=RuntimeConstraints(
            vcpus=rc.get("vcpus", 1),
            ram=rc.get("ram", 0),
            scratch=rc.get("scratch", 0),
            gpu=GPURequest(
                stack=gpu.get("stack", ""),
                device_count=gpu.get("device_count", 0),
                driver_version=gpu.get("driver_version", ""),
                hardware_target=tuple(gpu.get("hardware_target", ())),
                vram=gpu.get("vram", 0),
            ),
        ),
        scheduling_parameters=SchedulingParameters(
            preemptible=sp.get("preemptible", False),
            max_run_time=sp.get("max_run_time", 0.0),
            supervisor=sp.get("supervisor", False),
        ),
        priority=data.get("priority", 1),
        name=data.get("name", ""),
    )


def _insert_row(c: Container) -> tuple[Any, ...]:
    return (
        c.uuid,
        c.state.value,
        c.priority,
        _dumps(_spec_to_json(c.spec)),
        c.created_at,
        c.locked_at,
        c.started_at,
        c.finished_at,
        c.lock_count,
        c.exit_code,
        _status_json(c),
        c.instance_id,
        c.instance_type,
        c.cost,
    )


def _update_row(c: Container) -> tuple[Any, ...]:
    """Parameters of :data:`_UPDATE`: every field that can change after submission."""
    return (
        c.state.value,
        c.priority,
        c.locked_at,
        c.started_at,
        c.finished_at,
        c.lock_count,
        c.exit_code,
        _status_json(c),
        c.instance_id,
        c.instance_type,
        c.cost,
        c.uuid,
    )


def _from_row(row: Sequence[Any]) -> Container:
    """The record of a row; one that cannot be decoded is shown as a placeholder (see
    :func:`_decode`), so that one damaged row never stops a listing."""
    return _decode(row)[0]


def _decode(row: Sequence[Any]) -> tuple[Container, str | None]:
    """The record of a row and None, or a placeholder and why the row could not be decoded.

    A stored value of the wrong shape (a ``runtime_constraints`` that is a list, an
    environment entry that is not a pair) must cost that one container, not the queue: the
    placeholder keeps the uuid, the state and the times, with the reason as its error.
    """
    try:
        return _decode_strictly(row), None
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        why = f"stored record could not be read ({type(exc).__name__}: {exc})"[:500]
        try:
            state = ContainerState(row[1])
        except ValueError:
            state = ContainerState.CANCELLED
        number = (int, float)
        return (
            Container(
                uuid=str(row[0]),
                state=state,
                priority=row[2] if isinstance(row[2], int) else 0,
                spec=ContainerSpec(command=()),
                created_at=row[4] if isinstance(row[4], number) else 0.0,
                finished_at=row[7] if isinstance(row[7], number) else None,
                runtime_status=(("error", why),),
            ),
            why,
        )


def _decode_strictly(row: Sequence[Any]) -> Container:
    return Container(
        uuid=row[0],
        state=ContainerState(row[1]),
        priority=row[2],
        spec=_spec_from_json(json.loads(row[3])),
        created_at=row[4],
        locked_at=row[5],
        started_at=row[6],
        finished_at=row[7],
        lock_count=row[8],
        exit_code=row[9],
        runtime_status=tuple(json.loads(row[10]).items()),
        instance_id=row[11],
        instance_type=row[12],
        cost=row[13],
    )


# --------------------------------------------------------------------------- state rules
#
# Each rule takes the current record and returns the new one, the same object when nothing
# changes, or raises InvalidTransition.  They are pure so that each rule lives in one place and
# the queue's locking and storage stay out of them.


def _with_status(c: Container, key: str, value: str) -> tuple[tuple[str, str], ...]:
    """runtime_status with ``key`` set to ``value`` (replacing any earlier value)."""
    return (*((k, v) for k, v in c.runtime_status if k != key), (key, value))


def _refuse(c: Container, action: str) -> InvalidTransition:
    return InvalidTransition(f"cannot {action} container {c.uuid} in state {c.state}")


def cancelled(c: Container, now: float, error: str = "") -> Container:
    """``c`` Cancelled, recording ``error`` (if any) as runtime_status error."""
    status = _with_status(c, "error", error) if error else c.runtime_status
    return replace(c, state=CANCELLED, finished_at=now, runtime_status=status)


def unsatisfiable_error(message: str) -> str:
    return f"cannot run container: {message}"


def _requeued(c: Container) -> Container:
    """Back to Queued for another attempt: what the last attempt recorded no longer applies."""
    return replace(
        c, state=QUEUED, locked_at=None, started_at=None, instance_id="", instance_type=""
    )


def lock_rule(c: Container, now: float) -> Container:
    if c.state is not QUEUED or c.priority <= 0:
        raise _refuse(c, f"lock (priority {c.priority})")
    return replace(c, state=LOCKED, lock_count=c.lock_count + 1, locked_at=now)


def unlock_rule(c: Container, now: float, max_attempts: int) -> Container:
    if c.state is not LOCKED:
        raise _refuse(c, "unlock")
    if c.lock_count >= max_attempts:
        return cancelled(
            c,
            now,
            "Failed to start container.  Cancelled after exceeding "
            f"'containers.max_dispatch_attempts' (lock_count={c.lock_count})",
        )
    return _requeued(c)


def running_rule(c: Container, now: float, instance_id: str, instance_type: str) -> Container:
    if c.state is RUNNING:
        return c
    if c.state is not LOCKED:
        raise _refuse(c, "start")
    return replace(
        c, state=RUNNING, started_at=now, instance_id=instance_id, instance_type=instance_type
    )


def finish_rule(c: Container, now: float, exit_code: int) -> Container:
    if c.state.final:
        return c
    if c.state is QUEUED:
        raise _refuse(c, "finish")
    return replace(c, state=COMPLETE, exit_code=exit_code, finished_at=now)


def retry_rule(c: Container, now: float, reason: str, max_attempts: int) -> Container:
    """A lost runner: queue again, unless the attempts are used up.

    A final container is left alone: its runner was lost after it finished or was cancelled,
    which needs no retry.
    """
    if c.state.final:
        return c
    if c.state is QUEUED:
        raise _refuse(c, "retry")
    if c.lock_count >= max_attempts:
        return cancelled(c, now, f"{reason}; cancelled after {c.lock_count} dispatch attempts")
    return replace(_requeued(c), runtime_status=_with_status(c, "warning", reason))


def cancel_rule(c: Container, now: float, reason: str) -> Container:
    if c.state.final:
        return c
    return cancelled(c, now, reason)


def priority_rule(c: Container, now: float, priority: int) -> Container:
    if c.priority == priority:
        return c
    if c.state.final:
        raise _refuse(c, "change the priority of")
    return replace(c, priority=priority)


def cost_rule(c: Container, now: float, cost: float) -> Container:
    return replace(c, cost=c.cost + cost) if cost else c


def may_forget(c: Container) -> bool:
    """SPEC §7.2: only finished containers, and queued ones on hold, may leave the snapshot."""
    return c.state.final or (c.state is QUEUED and c.priority == 0)


def validate_spec(spec: ContainerSpec) -> None:
    """Refuse a spec no runner could make sense of, before anything is stored."""
    rc = spec.runtime_constraints
    problems = []
    if not spec.command or not all(isinstance(arg, str) for arg in spec.command):
        problems.append("command must be a non-empty list of strings")
    if not isinstance(spec.priority, int) or spec.priority < 0:
        problems.append(f"priority must be an integer >= 0, not {spec.priority!r}")
    for name in ("vcpus", "ram", "scratch"):
        value = getattr(rc, name)
        if not isinstance(value, int) or value < 0:
            problems.append(f"runtime_constraints.{name} must be an integer >= 0, not {value!r}")
    if rc.gpu.device_count < 0 or rc.gpu.vram < 0:
        problems.append("runtime_constraints.gpu device_count and vram must be >= 0")
    if problems:
        raise InvalidRequest("invalid container: " + "; ".join(problems))


# --------------------------------------------------------------------------- the queue


class _Sizing(NamedTuple):
    resources: InstanceResources
    instance_types: list[InstanceType]
    error: str  # "" when at least one type fits


Rule = Callable[[Container, float], Container]


class SqliteQueue(ContainerQueue):
    """The embedded :class:`ContainerQueue`: durable in one SQLite file (or ``":memory:"``)."""

    def __init__(
        self,
        path: str,
        *,
        runtime: Runtime,
        sizer: Sizer,
        cluster_id: str = "zzzzz",
        max_dispatch_attempts: int = 10,
        always_use_preemptible: bool = False,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        """``random_bytes`` draws the random part of new UUIDs; simulations pass a seeded
        generator so that a run is reproducible."""
        self._random_bytes = random_bytes
        if not CLUSTER_ID_RE.fullmatch(cluster_id):
            raise ValueError(f"invalid cluster_id {cluster_id!r}: need 5 lowercase alphanumerics")
        if max_dispatch_attempts < 1:
            raise ValueError("max_dispatch_attempts must be at least 1")
        self._runtime = runtime
        self._sizer = sizer
        self._cluster_id = cluster_id
        self._max_attempts = max_dispatch_attempts
        self._always_preemptible = always_use_preemptible
        self._lock = threading.Lock()
        self._entries: dict[str, QueueEntry] = {}
        self._listeners: Callbacks[[]] = Callbacks("queue listener", log)
        self._observers: Callbacks[[Container | None, Container]] = Callbacks(
            "queue observer", log
        )
        self._closed = False
        self._path = path
        on_disk = path != ":memory:" and not path.startswith("file:")
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
            except sqlite3.DatabaseError as exc:
                raise QueueError(_damaged(path, str(exc))) from exc
            self._load_active()
        except BaseException:
            self._db.close()
            self._release_ownership()
            raise

    # ---- opening

    def _transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """One committed transaction, or none at all (caller holds ``self._lock``)."""
        return immediate_transaction(self._db)

    def _migrate(self) -> bool:
        """Bring the schema up to date, one recorded version at a time; True for a new queue."""
        with self._transaction() as db:
            found = db.execute(
                "SELECT count(*) FROM sqlite_master WHERE name = 'schema_version'"
            ).fetchone()
            fresh = int(found[0]) == 0
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                db.execute("INSERT INTO schema_version (version) VALUES (0)")
            version = 0 if row is None else int(row[0])
            if version > len(_MIGRATIONS):
                raise QueueError(
                    f"queue database schema version {version} is newer than this herder "
                    f"understands ({len(_MIGRATIONS)}); upgrade herder"
                )
            for statements in _MIGRATIONS[version:]:
                for statement in statements:
                    db.execute(statement)
            db.execute("UPDATE schema_version SET version = ?", (len(_MIGRATIONS),))
        return fresh

    def _load_active(self) -> None:
        """Rebuild the snapshot after a restart from every non-final container in storage.

        The configured instance types may have changed since the container was submitted, so
        each is sized again: a Queued or Locked one that no longer fits anything is cancelled
        (SPEC §7.5); a Running one is kept, with no eligible types, because it is running
        somewhere already and the pool must still find it.
        """
        now = self._runtime.now()
        rows = self._db.execute(
            f"{_SELECT} WHERE state IN (?, ?, ?)", (QUEUED.value, LOCKED.value, RUNNING.value)
        ).fetchall()
        doomed: list[Container] = []
        unreadable: list[tuple[Any, ...]] = []
        for row in rows:
            c, why = _decode(row)
            if why is not None:
                log.error("cancelling %s: %s", c.uuid, why)
                status = _dumps({"error": why})
                unreadable.append((CANCELLED.value, now, status, c.uuid))
                continue
            sizing = self._size(c)
            if sizing.error and c.state is not RUNNING:
                log.warning("cancelling %s: no suitable instance type: %s", c.uuid, sizing.error)
                doomed.append(cancelled(c, now, unsatisfiable_error(sizing.error)))
                continue
            if sizing.error:
                # An entry with no eligible types: Arvados' queue metrics crashed on these by
                # reading the first type (SPEC §19.3 item 26); herder code never assumes one.
                log.warning("%s is running but fits no configured type: %s", c.uuid, sizing.error)
            self._entries[c.uuid] = QueueEntry(c, sizing.resources, sizing.instance_types, now)
        if doomed or unreadable:
            with self._transaction() as db:
                db.executemany(_UPDATE, [_update_row(c) for c in doomed])
                # Written directly: the record cannot be decoded, so it cannot be re-encoded.
                db.executemany(
                    "UPDATE containers SET state = ?, finished_at = ?, runtime_status = ? "
                    "WHERE uuid = ?",
                    unreadable,
                )

    # ---- helpers

    def _new_uuid(self) -> str:
        """``<cluster_id>-dz642-<15 random lowercase alphanumerics>``.

        One draw of random bytes per UUID (not one per character) keeps a 100,000-container
        submission fast; 24 bytes almost always hold 15 usable ones, else it draws again.
        """
        n = len(_UUID_ALPHABET)
        chars = ""
        while len(chars) < _UUID_RANDOM_LEN:
            raw = self._random_bytes(24)
            chars += "".join(_UUID_ALPHABET[b % n] for b in raw if b < _UUID_BYTE_LIMIT)
        return f"{self._cluster_id}-dz642-{chars[:_UUID_RANDOM_LEN]}"

    def _size(self, c: Container) -> _Sizing:
        resources = self._sizer.resources_needed(c)
        try:
            return _Sizing(resources, self._sizer.choose_instance_types(c), "")
        except ConstraintsNotSatisfiable as exc:
            return _Sizing(resources, [], str(exc) or "no suitable instance type")

    def _stored(self, uuid: str) -> Container:
        """The current record: the snapshot's, or storage's (caller holds ``self._lock``)."""
        entry = self._entries.get(uuid)
        if entry is not None:
            return entry.container
        row = self._db.execute(f"{_SELECT} WHERE uuid = ?", (uuid,)).fetchone()
        if row is None:
            raise ContainerNotFound(uuid)
        return _from_row(row)

    def _notify(self) -> None:
        """Call every listener; one failing listener must not starve the others."""
        self._listeners.call()

    def _prepare(self, spec: ContainerSpec, now: float) -> tuple[Container, _Sizing]:
        """Validate and size a submission; unsatisfiable ones come back Cancelled."""
        validate_spec(spec)
        if self._always_preemptible and not spec.scheduling_parameters.preemptible:
            sp = replace(spec.scheduling_parameters, preemptible=True)
            spec = replace(spec, scheduling_parameters=sp)
        c = Container(
            uuid=self._new_uuid(), state=QUEUED, priority=spec.priority, spec=spec, created_at=now
        )
        sizing = self._size(c)
        if sizing.error:
            c = cancelled(c, now, unsatisfiable_error(sizing.error))
        return c, sizing

    def _transition(self, uuid: str, rule: Rule) -> Container:
        """Apply ``rule`` to one container: commit, update the snapshot, then notify."""
        with self._lock:
            now = self._runtime.now()
            old = self._stored(uuid)
            new = rule(old, now)
            if new is old:
                return old
            entry = self._entries.get(uuid)
            sizing = None
            if entry is None and not may_forget(new):
                # A forgotten container that needs attention again re-enters the snapshot.
                sizing = self._size(new)
            if new.state is QUEUED and (old.state is not QUEUED or entry is None):
                new = self._cancel_if_unsatisfiable(new, entry, sizing, now)
            with self._transaction() as db:
                db.execute(_UPDATE, _update_row(new))
            if entry is not None:
                self._entries[uuid] = QueueEntry(
                    new, entry.resources, entry.instance_types, entry.first_seen_at
                )
            elif sizing is not None and not new.state.final:
                self._entries[uuid] = QueueEntry(new, sizing.resources, sizing.instance_types, now)
        self._notify()
        self._observed(old, new)
        return new

    def _cancel_if_unsatisfiable(
        self, c: Container, entry: QueueEntry | None, sizing: _Sizing | None, now: float
    ) -> Container:
        """Never queue a container that no type fits (Arvados 15942).

        This happens when a Running container kept across a restart with no eligible types
        (see :meth:`_load_active`) loses its runner and is queued again.
        """
        if entry is not None and entry.instance_types:
            return c
        if sizing is None:
            sizing = self._size(c)
        if not sizing.error:
            return c
        return cancelled(c, now, unsatisfiable_error(sizing.error))

    # ---- reads used by the scheduler

    def entries(self) -> tuple[dict[str, QueueEntry], float]:
        with self._lock:
            return dict(self._entries), self._runtime.now()

    def get(self, uuid: str) -> Container | None:
        with self._lock:
            try:
                return self._stored(uuid)
            except ContainerNotFound:
                return None

    def forget(self, uuid: str) -> None:
        """Drop from the snapshot (SPEC §7.2).  Not a change to any container: no notification."""
        with self._lock:
            entry = self._entries.get(uuid)
            if entry is not None and may_forget(entry.container):
                del self._entries[uuid]

    # ---- state changes

    def submit(self, spec: ContainerSpec) -> Container:
        return self.submit_many([spec])[0]

    def submit_many(self, specs: Iterable[ContainerSpec]) -> list[Container]:
        """Submit several containers in one transaction: all are stored, or none is.

        Validation and sizing happen before the lock is taken, so a large batch does not hold
        up the scheduler's reads for longer than the insert itself.
        """
        now = self._runtime.now()
        prepared = [self._prepare(spec, now) for spec in specs]
        if not prepared:
            return []
        with self._lock:
            with self._transaction() as db:
                db.executemany(_INSERT, [_insert_row(c) for c, _ in prepared])
            for c, sizing in prepared:
                # An unsatisfiable submission is cancelled at once and never needs attention.
                if not c.state.final:
                    self._entries[c.uuid] = QueueEntry(
                        c, sizing.resources, sizing.instance_types, now
                    )
        self._notify()
        for c, _ in prepared:
            self._observed(None, c)
        return [c for c, _ in prepared]

    def lock(self, uuid: str) -> Container:
        return self._transition(uuid, lock_rule)

    def unlock(self, uuid: str) -> Container:
        return self._transition(uuid, lambda c, now: unlock_rule(c, now, self._max_attempts))

    def set_running(self, uuid: str, instance_id: str = "", instance_type: str = "") -> Container:
        return self._transition(
            uuid, lambda c, now: running_rule(c, now, instance_id, instance_type)
        )

    def finish(self, uuid: str, exit_code: int) -> Container:
        return self._transition(uuid, lambda c, now: finish_rule(c, now, exit_code))

    def retry(self, uuid: str, reason: str) -> Container:
        return self._transition(uuid, lambda c, now: retry_rule(c, now, reason, self._max_attempts))

    def cancel(self, uuid: str, reason: str = "") -> Container:
        return self._transition(uuid, lambda c, now: cancel_rule(c, now, reason))

    def set_priority(self, uuid: str, priority: int) -> Container:
        if not isinstance(priority, int) or priority < 0:
            raise InvalidRequest(f"priority must be an integer >= 0, not {priority!r}")
        return self._transition(uuid, lambda c, now: priority_rule(c, now, priority))

    def add_cost(self, uuid: str, cost: float) -> None:
        if not math.isfinite(cost) or cost < 0:
            raise InvalidRequest(f"cost must be a finite number >= 0, not {cost!r}")
        self._transition(uuid, lambda c, now: cost_rule(c, now, cost))

    # ---- logs

    def append_log(self, uuid: str, data: bytes) -> None:
        """Append a chunk at the end of the container's log (kept after it finishes, too)."""
        with self._lock:
            self._stored(uuid)
            if not data:
                return
            with self._transaction() as db:
                db.execute(
                    "INSERT INTO logs (uuid, start, data) VALUES (?, ?, ?)",
                    (uuid, self._log_size(uuid), bytes(data)),
                )

    def _log_size(self, uuid: str) -> int:
        row = self._db.execute(
            "SELECT start + length(data) FROM logs WHERE uuid = ? ORDER BY start DESC LIMIT 1",
            (uuid,),
        ).fetchone()
        return 0 if row is None else int(row[0])

    def read_log(self, uuid: str, offset: int = 0, limit: int | None = None) -> bytes:
        """Bytes ``offset`` to ``offset + limit`` of the log (to its end without a limit).

        Offsets are bytes, so a client follows a log by asking again from ``offset + len(got)``.
        """
        if offset < 0 or (limit is not None and limit < 0):
            raise InvalidRequest("log offset and limit must be >= 0")
        end = None if limit is None else offset + limit
        with self._lock:
            self._stored(uuid)
            if end == offset:
                return b""
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

    # ---- listing for people

    def list(
        self,
        states: Iterable[ContainerState] | None = None,
        limit: int = 100,
        after: str = "",
    ) -> list[Container]:
        if limit < 0:
            raise InvalidRequest("limit must be >= 0")
        sql = f"{_SELECT} WHERE uuid > ?"
        params: list[Any] = [after]
        if states is not None:
            wanted = [ContainerState(s).value for s in states]
            if not wanted:
                return []
            sql += f" AND state IN ({', '.join('?' * len(wanted))})"
            params += wanted
        sql += " ORDER BY uuid LIMIT ?"
        params.append(limit)
        with self._lock:
            rows = self._db.execute(sql, params).fetchall()
        return [_from_row(row) for row in rows]

    def counts(self) -> dict[ContainerState, int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT state, COUNT(*) FROM containers GROUP BY state"
            ).fetchall()
        out = dict.fromkeys(ContainerState, 0)
        for state, n in rows:
            out[ContainerState(state)] = int(n)
        return out

    # ---- notifications and lifecycle

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        return self._listeners.add(listener)

    def observe(self, observer: Observer) -> Callable[[], None]:
        return self._observers.add(observer)

    def _observed(self, old: Container | None, new: Container) -> None:
        """Tell every observer about one change; a failing observer must not break the change."""
        self._observers.call(old, new)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()
                self._release_ownership()

    def _release_ownership(self) -> None:
        if self._owner_fd is not None:
            os.close(self._owner_fd)
            self._owner_fd = None

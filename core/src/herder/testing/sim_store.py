"""A simulated cloud that outlives its process: the ``state_file`` of the ``sim`` driver.

A real cloud keeps running when the dispatcher is killed; a simulated one kept in memory would
die with it, and a test of "kill -9 the dispatcher, start it again" would prove nothing.  With
``state_file`` the :class:`~herder.testing.sim_cloud.SimCloud` keeps its whole state in a
SQLite file (WAL mode): instances with their tags, fates and files, container processes with
their start, planned endings and runner records, the random generator and every counter of
:class:`~herder.testing.sim_stats.SimStats`.

Shared by live processes: the cloud's lock (:class:`SavingLock`) is also a lock on the file.
Its outermost holder takes the file (:class:`FileTurns`: processes that want it take turns, so a
busy dispatcher cannot starve a starting one), opens a write transaction, re-reads the state if
another process saved since (the ``generation`` counter of the ``meta`` table says so), works on
it, and writes its changes in the same transaction on release.  So two dispatchers on one state
file (a leader and its standby) see one cloud, one change at a time, as they would a real one:
instances one created, the other lists and adopts; a container one started, the other finds
running.

When it is written: whenever the outermost holder releases the cloud's lock, the changes since
the last save are written in one transaction, before the call that made them returns.  So
whatever a dispatcher was told (an instance created, a container started) is on disk before it
can act on it, and a SIGKILL at any moment leaves a state at least as new as what the
dispatcher knew (a holder killed mid-call leaves the file as it was: its call never returned).
Only what changed is written: a row is rewritten when its encoding differs from the last one
written.

Loading needs no replay: everything that happens in the simulated cloud is an absolute
wall-clock time (boot, broken, vanish, a process's planned end), evaluated lazily against the
clock, so what happened while no process held the cloud follows from comparing those times with
now.  The cloud's first :meth:`~herder.testing.sim_cloud.SimCloud.settle` after loading does the
bookkeeping of whatever came due meanwhile.

Besides the live state the file keeps a history: every container process ever started stays in
the ``processes`` table with its instance, start, end, exit code and cause, after its instance
is gone or its record forgotten.  :func:`read_processes` reads it (how a chaos test proves no
container ran twice at the same time).
"""

from __future__ import annotations

import base64
import dataclasses
import fcntl
import hashlib
import json
import os
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from herder.model import GPUSpec, InstanceType
from herder.plugin.cloud import HostKey
from herder.queue.sqlite import immediate_transaction
from herder.testing.sim_cloud import SimCloud, SimProcess, SimVM
from herder.testing.sim_params import SimParameters
from herder.testing.sim_stats import DoubleRun, SimStats

__all__ = ["ProcessRecord", "SavingLock", "SimStore", "read_processes"]

#: Bumped when the layout changes incompatibly; a file of another version is refused.
FORMAT_VERSION = 1

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS params (key TEXT PRIMARY KEY, data TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS vms (id TEXT PRIMARY KEY, data TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS files (
        vm_id TEXT NOT NULL, path TEXT NOT NULL, data BLOB NOT NULL, PRIMARY KEY (vm_id, path)
    )""",
    """CREATE TABLE IF NOT EXISTS processes (
        pid INTEGER PRIMARY KEY,
        uuid TEXT NOT NULL,
        vm_id TEXT NOT NULL,
        started_at REAL NOT NULL,
        ended_at REAL NOT NULL,
        exit_code INTEGER,
        cause TEXT NOT NULL,
        attached INTEGER NOT NULL,
        data TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS processes_uuid ON processes (uuid)",
)


@dataclass(frozen=True, slots=True)
class ProcessRecord:
    """One container process of the history: where it ran and from when to when.

    ``ended_at`` is when it ended, or for one still alive when it will end unless something
    ends it sooner; ``exit_code`` is None when it ended without one (crash, instance gone).
    """

    pid: int
    uuid: str
    instance_id: str
    started_at: float
    ended_at: float
    exit_code: int | None
    cause: str


class SavingLock:
    """The cloud's re-entrant lock: its outermost holder also holds the state file, reading
    what other processes saved on taking it and saving the state on releasing it.

    Saving under the lock is what makes a save consistent (no half-made change is written)
    and what orders it before the caller hears the result of its call.
    """

    def __init__(self, begin: Callable[[], None], finish: Callable[[], None]) -> None:
        self._lock = threading.RLock()
        self._depth = 0
        self._begin = begin
        self._finish = finish

    def __enter__(self) -> SavingLock:
        self._lock.acquire()
        if self._depth == 0:
            try:
                self._begin()
            except BaseException:
                self._lock.release()
                raise
        self._depth += 1
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            if self._depth == 1:
                self._finish()
        finally:
            self._depth -= 1
            self._lock.release()


class FileTurns:
    """A lock between processes, beside the state file, that processes wanting it take in turn.

    SQLite's own write lock is no good for this: a process waiting for it sleeps and tries
    again, and a dispatcher whose threads call the cloud back to back takes it again first,
    every time; a standby starting meanwhile waited for minutes.  Here a process that wants the
    file first takes ``<file>.turn``, then waits for ``<file>.hold`` while keeping the turn, and
    gives the turn back once it holds the file: the process holding the file cannot take it
    again before the waiting one had it.  Both are flocks, freed by the kernel when a process
    dies, however it dies.
    """

    def __init__(self, path: str) -> None:
        self._turn = os.open(path + ".turn", os.O_RDWR | os.O_CREAT, 0o600)
        self._hold = os.open(path + ".hold", os.O_RDWR | os.O_CREAT, 0o600)

    def acquire(self) -> None:
        fcntl.flock(self._turn, fcntl.LOCK_EX)
        try:
            fcntl.flock(self._hold, fcntl.LOCK_EX)
        finally:
            fcntl.flock(self._turn, fcntl.LOCK_UN)

    def release(self) -> None:
        fcntl.flock(self._hold, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._turn)
        os.close(self._hold)


# --------------------------------------------------------------------------- encoding


def _dumps(value: Any) -> str:
    # allow_nan: never-booting and never-vanishing instances have infinite times.
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode())


def encode_vm(vm: SimVM, params_key: str) -> dict[str, Any]:
    """An instance without its files and processes (those have their own rows)."""
    return {
        "id": vm.id,
        "instance_type": dataclasses.asdict(vm.instance_type),
        "image_id": vm.image_id,
        "tags": vm.tags,
        "init_command": vm.init_command,
        "public_key": vm.public_key,
        "params": params_key,
        "address": vm.address,
        "created_at": vm.created_at,
        "address_at": vm.address_at,
        "boot_at": vm.boot_at,
        "broken_at": vm.broken_at,
        "vanish_at": vm.vanish_at,
        "host_key": [vm.host_key.key_type, _b64(vm.host_key.blob)],
        "destroyed_at": vm.destroyed_at,
        "gone_at": vm.gone_at,
        "broken_reported": vm.broken_reported,
        "prices": _b64(vm.prices),
    }


def decode_vm(data: dict[str, Any], params: SimParameters, files: dict[str, bytes]) -> SimVM:
    it = dict(data["instance_type"])
    it["gpu"] = GPUSpec(**it["gpu"])
    key_type, blob = data["host_key"]
    return SimVM(
        id=data["id"],
        instance_type=InstanceType(**it),
        image_id=data["image_id"],
        tags=dict(data["tags"]),
        init_command=data["init_command"],
        public_key=data["public_key"],
        params=params,
        address=data["address"],
        created_at=data["created_at"],
        address_at=data["address_at"],
        boot_at=data["boot_at"],
        broken_at=data["broken_at"],
        vanish_at=data["vanish_at"],
        host_key=HostKey(key_type, _unb64(blob)),
        destroyed_at=data["destroyed_at"],
        gone_at=data["gone_at"],
        broken_reported=data["broken_reported"],
        files=files,
        prices=_unb64(data["prices"]),
    )


def encode_process(proc: SimProcess) -> dict[str, Any]:
    return {
        "uuid": proc.uuid,
        "pid": proc.pid,
        "vm": proc.vm.id,
        "command": list(proc.command),
        "started_at": proc.started_at,
        "endings": [list(e) for e in proc.endings],
        "stale_lock": proc.stale_lock,
        "term_at": proc.term_at,
        "forgotten": proc.forgotten,
        "settled": proc.settled,
    }


def decode_process(data: dict[str, Any], vm: SimVM) -> SimProcess:
    return SimProcess(
        uuid=data["uuid"],
        pid=data["pid"],
        vm=vm,
        command=tuple(data["command"]),
        started_at=data["started_at"],
        endings=[(at, code, cause) for at, code, cause in data["endings"]],
        stale_lock=data["stale_lock"],
        term_at=data["term_at"],
        forgotten=data["forgotten"],
        settled=data["settled"],
    )


#: The plain counters of SimStats, found by type so that a new counter is saved too.
_STAT_COUNTS = tuple(f.name for f in dataclasses.fields(SimStats) if f.type == "int")


def encode_stats(stats: SimStats) -> dict[str, Any]:
    return {
        **{name: getattr(stats, name) for name in _STAT_COUNTS},
        "calls": sorted([k, o, n] for (k, o), n in stats.calls.items()),
        "faults": dict(stats.faults),
        "commands": dict(stats.commands),
        "exit_codes": sorted([code, n] for code, n in stats.exit_codes.items()),
        "double_run_details": [d.to_json() for d in stats.double_run_details],
        "billed_gone": stats.billed_gone,
    }


def decode_stats(data: dict[str, Any]) -> SimStats:
    stats = SimStats()
    for name in _STAT_COUNTS:
        setattr(stats, name, int(data.get(name, 0)))
    stats.calls = Counter({(k, o): n for k, o, n in data["calls"]})
    stats.faults = Counter(data["faults"])
    stats.commands = Counter(data["commands"])
    stats.exit_codes = Counter({int(code): n for code, n in data["exit_codes"]})
    stats.double_run_details = [
        DoubleRun(d["uuid"], d["at"], d["instance_id"], tuple(d["other_instance_ids"]))
        for d in data["double_run_details"]
    ]
    stats.billed_gone = {k: list(v) for k, v in data["billed_gone"].items()}
    return stats


def _encode_rng(state: object) -> str:
    version, internal, gauss = cast("tuple[int, tuple[int, ...], float | None]", state)
    return _dumps([version, list(internal), gauss])


def _decode_rng(text: str) -> tuple[Any, ...]:
    version, internal, gauss = json.loads(text)
    return (version, tuple(internal), gauss)


# --------------------------------------------------------------------------- the store


class SimStore:
    """One state file.  :meth:`load` fills a cloud from it; :meth:`save` writes the changes.

    Not thread-safe on its own: every call is made under the cloud's lock.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # A process killed loses nothing written to the operating system; NORMAL is durable
        # against that, which is all a simulation needs.
        self._db.execute("PRAGMA synchronous=NORMAL")
        # Writers take turns (FileTurns) before they write; this is for anything else.
        self._db.execute("PRAGMA busy_timeout=60000")
        self._turns = FileTurns(self.path)
        try:
            self._turns.acquire()
            try:
                self._create()
            finally:
                self._turns.release()
        except BaseException:
            self._turns.close()
            self._db.close()
            raise
        # What the file holds, as last written: a row is written again only when it differs.
        self._params: dict[int, tuple[SimParameters, str]] = {}
        self._vm_rows: dict[str, str] = {}
        self._files: dict[tuple[str, str], bytes] = {}
        self._proc_rows: dict[int, str] = {}
        self._meta: dict[str, str] = {}
        self._rng_state: object = None
        #: The file's ``generation`` as last read or written by this store (-1: unknown).
        self._generation = -1

    def _create(self) -> None:
        """The tables of a new file; a file of another format is refused."""
        with self._transaction() as db:
            for statement in _SCHEMA:
                db.execute(statement)
            row = db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('format', ?)", (str(FORMAT_VERSION),))
            elif row[0] != str(FORMAT_VERSION):
                raise ValueError(f"{self.path}: sim state format {row[0]}, need {FORMAT_VERSION}")

    def close(self) -> None:
        self._db.close()
        self._turns.close()

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return immediate_transaction(self._db)

    def saving_lock(self, cloud: SimCloud) -> SavingLock:
        """A lock for ``cloud`` that holds this store's file from its outermost acquire to its
        release, reading the cloud again when another process saved, saving it on release."""
        return SavingLock(lambda: self.begin(cloud), lambda: self.finish(cloud))

    def _file_generation(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return 0 if row is None else int(row[0])

    def begin(self, cloud: SimCloud) -> None:
        """Take the file (its turn, then a write transaction) and catch up with what other
        processes saved."""
        self._turns.acquire()
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._turns.release()
            raise
        try:
            generation = self._file_generation()
            if generation != self._generation:
                self.load(cloud)
                self._generation = generation
        except BaseException:
            self._db.execute("ROLLBACK")
            self._turns.release()
            self._generation = -1
            raise

    def finish(self, cloud: SimCloud) -> None:
        """Write what changed in the transaction :meth:`begin` opened, and commit it."""
        try:
            self._save_in_transaction(cloud)
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            self._generation = -1  # the memory is ahead of the file: read it again next time
            raise
        finally:
            self._turns.release()

    # ---- loading

    def load(self, cloud: SimCloud) -> bool:
        """Restore ``cloud`` from the file; False (and ``cloud`` untouched) when it is new.

        Instances ``cloud`` already has are updated in place, not replaced: the driver's
        instances and executors hold them, and must see the state another process saved.
        """
        db = self._db
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if "stats" not in meta:
            return False
        self._generation = int(meta.get("generation", 0))
        known = {vm.id: vm for vm in cloud.all_vms()}
        self._vm_rows, self._files, self._proc_rows = {}, {}, {}
        params = {
            key: SimParameters.model_validate_json(data)
            for key, data in db.execute("SELECT key, data FROM params")
        }
        files: dict[str, dict[str, bytes]] = {}
        for vm_id, path, data in db.execute("SELECT vm_id, path, data FROM files"):
            files.setdefault(vm_id, {})[path] = bytes(data)
        vms: dict[str, SimVM] = {}
        for vm_id, text in db.execute("SELECT id, data FROM vms"):
            data = json.loads(text)
            vm = decode_vm(data, params[data["params"]], files.get(vm_id, {}))
            held = known.get(vm_id)
            if held is not None:
                for f in dataclasses.fields(SimVM):
                    setattr(held, f.name, getattr(vm, f.name))
                vm = held
            vms[vm_id] = vm
            self._vm_rows[vm_id] = text
            self._files.update({(vm_id, p): b for p, b in vm.files.items()})
        self._params = {id(p): (p, key) for key, p in params.items()}
        rows = db.execute("SELECT pid, vm_id, data FROM processes WHERE attached = 1 ORDER BY pid")
        for pid, vm_id, text in rows:
            proc = decode_process(json.loads(text), vms[vm_id])
            proc.vm.procs[proc.uuid] = proc
            self._proc_rows[pid] = text
        cloud.seed = int(meta["seed"])
        cloud.restore(
            list(vms.values()), decode_stats(json.loads(meta["stats"])), _decode_rng(meta["rng"])
        )
        self._meta = {k: v for k, v in meta.items() if k in ("seed", "stats", "rng")}
        self._rng_state = None
        return True

    # ---- saving

    def save(self, cloud: SimCloud) -> None:
        """Write what changed since the last save, in one transaction of its own (caller holds
        the cloud's lock but not the file: :meth:`begin` / :meth:`finish` do both)."""
        self._turns.acquire()
        try:
            with self._transaction():
                self._save_in_transaction(cloud)
        finally:
            self._turns.release()

    def _save_in_transaction(self, cloud: SimCloud) -> None:
        """Write what changed since the last save, bumping the file's generation; the caller's
        transaction commits it."""
        vm_rows: dict[str, str] = {}
        files: dict[tuple[str, str], bytes] = {}
        procs: dict[int, tuple[SimProcess, str]] = {}
        new_params: list[tuple[SimParameters, str]] = []
        for vm in cloud.all_vms():
            vm_rows[vm.id] = _dumps(encode_vm(vm, self._params_key(vm.params, new_params)))
            files.update({(vm.id, path): data for path, data in vm.files.items()})
            for proc in vm.procs.values():
                procs[proc.pid] = (proc, _dumps(encode_process(proc)))
        meta = {
            "seed": str(cloud.seed),
            "stats": _dumps(encode_stats(cloud.stats)),
            "rng": self._rng_text(cloud),
        }
        changed = _Changes(
            params=new_params,
            vms={k: v for k, v in vm_rows.items() if self._vm_rows.get(k) != v},
            vms_gone=[k for k in self._vm_rows if k not in vm_rows],
            files={k: v for k, v in files.items() if self._files.get(k) is not v},
            procs={k: v for k, v in procs.items() if self._proc_rows.get(k) != v[1]},
            procs_detached=[k for k in self._proc_rows if k not in procs],
            meta={k: v for k, v in meta.items() if self._meta.get(k) != v},
        )
        if changed.empty:
            return
        generation = max(self._generation, self._file_generation()) + 1
        changed.write(self._db)
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('generation', ?)", (str(generation),))
        self._generation = generation
        for p, key in new_params:
            self._params[id(p)] = (p, key)
        self._vm_rows = vm_rows
        self._files = files
        self._proc_rows = {pid: text for pid, (_, text) in procs.items()}
        self._meta.update(changed.meta)

    def _params_key(self, params: SimParameters, new: list[tuple[SimParameters, str]]) -> str:
        """The row key of an instance's parameters, queuing a new row the first time."""
        known = self._params.get(id(params))
        if known is not None and known[0] is params:
            return known[1]
        for p, key in new:
            if p is params:
                return key
        text = params.model_dump_json()
        key = hashlib.sha256(text.encode()).hexdigest()[:16]
        new.append((params, key))
        return key

    def _rng_text(self, cloud: SimCloud) -> str:
        """The generator's state, encoded only when it moved (it is 625 numbers)."""
        state = cloud.rng_state()
        if state == self._rng_state and "rng" in self._meta:
            return self._meta["rng"]
        self._rng_state = state
        return _encode_rng(state)


@dataclass
class _Changes:
    """What one save writes."""

    params: list[tuple[SimParameters, str]]
    vms: dict[str, str]
    vms_gone: list[str]
    files: dict[tuple[str, str], bytes]
    procs: dict[int, tuple[SimProcess, str]]
    procs_detached: list[int]
    meta: dict[str, str]

    @property
    def empty(self) -> bool:
        return not (
            self.params
            or self.vms
            or self.vms_gone
            or self.files
            or self.procs
            or self.procs_detached
            or self.meta
        )

    def write(self, db: sqlite3.Connection) -> None:
        db.executemany(
            "INSERT OR REPLACE INTO params VALUES (?, ?)",
            [(key, p.model_dump_json()) for p, key in self.params],
        )
        db.executemany("INSERT OR REPLACE INTO vms VALUES (?, ?)", list(self.vms.items()))
        db.executemany("DELETE FROM vms WHERE id = ?", [(k,) for k in self.vms_gone])
        db.executemany("DELETE FROM files WHERE vm_id = ?", [(k,) for k in self.vms_gone])
        db.executemany(
            "INSERT OR REPLACE INTO files VALUES (?, ?, ?)",
            [(vm_id, path, data) for (vm_id, path), data in self.files.items()],
        )
        db.executemany(
            "INSERT OR REPLACE INTO processes VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?)",
            [_process_row(proc, text) for proc, text in self.procs.values()],
        )
        # A process whose record was forgotten, replaced or whose instance went stays in the
        # history; it is only no longer part of the live state.
        db.executemany(
            "UPDATE processes SET attached = 0 WHERE pid = ?", [(k,) for k in self.procs_detached]
        )
        db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(self.meta.items()))


def _process_row(proc: SimProcess, text: str) -> tuple[Any, ...]:
    end_at, exit_code, cause = proc.end
    return (proc.pid, proc.uuid, proc.vm.id, proc.started_at, end_at, exit_code, cause, text)


def read_processes(path: str | Path) -> list[ProcessRecord]:
    """Every container process in a state file's history, in the order they started."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT pid, uuid, vm_id, started_at, ended_at, exit_code, cause FROM processes "
            "ORDER BY pid"
        ).fetchall()
    finally:
        db.close()
    return [ProcessRecord(*row) for row in rows]

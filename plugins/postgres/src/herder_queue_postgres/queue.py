"""The container queue in a PostgreSQL database (psycopg 3), under herder's shared queue rules.

Storage only: the rules and the scheduler's in-memory snapshot are
:class:`~herder.queue.rules.RuledQueue`'s.  What PostgreSQL changes:

- **Several processes.**  The database may be written by another herder (a standby serving the
  API, a second dispatcher): every transition reads its row ``FOR UPDATE`` inside the
  transaction that writes it, so two writers never both apply a rule to the same old record.
  Every committed change sends a notification (``NOTIFY``, delivered at commit) naming the
  container; a listener thread takes in the changes of *other* processes and tells the queue's
  listeners, which is what wakes the scheduler when a container is submitted elsewhere.
- **One dispatcher.**  The queue holds a session advisory lock for as long as it is open, so a
  second dispatcher on the same database and schema is refused with one clear line, and a
  dispatcher that lost its connection and finds the lock taken by another stops writing.
- **Connections drop.**  Each call reconnects when it finds the connection broken, for up to
  ``reconnect_for`` seconds.  A call whose statements cannot have been committed is retried on
  the new connection; one that failed while committing (its outcome unknown) raises
  :class:`~herder.queue.base.QueueUnavailable`, and the caller retries with the rules applied
  to whatever was stored.  The listener reconnects on its own and then re-reads every
  unfinished container, since notifications sent while it was away are lost.
- **Secrets.**  The password is handed to libpq as a separate argument, read from its
  reference when connecting; it is never part of the DSN, the log or an error message.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from herder.model import Container, ContainerState
from herder.queue.base import (
    ContainerNotFound,
    ListFilter,
    QueueError,
    QueueUnavailable,
)
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
from herder.queue.rules import CANCELLED, UNFINISHED, RuledQueue, RuleSettings, Unreadable
from herder.queue.sql_ledger import Execute, SqlLedger
from herder.spend import Ledger
from herder_queue_postgres.leader import lock_key

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Each item upgrades the schema by one version; ``schema_version`` records how many ran.  Add
#: new items at the end, never edit old ones: databases in the field have already run them.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE containers (
            uuid text PRIMARY KEY,
            state text NOT NULL,
            priority bigint NOT NULL,
            spec text NOT NULL,
            created_at double precision NOT NULL,
            locked_at double precision,
            started_at double precision,
            finished_at double precision,
            lock_count integer NOT NULL DEFAULT 0,
            exit_code integer,
            runtime_status text NOT NULL DEFAULT '{}',
            instance_id text NOT NULL DEFAULT '',
            instance_type text NOT NULL DEFAULT '',
            cost double precision NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX containers_state_uuid ON containers (state, uuid)",
        """CREATE TABLE logs (
            uuid text NOT NULL,
            start bigint NOT NULL,
            data bytea NOT NULL,
            PRIMARY KEY (uuid, start)
        )""",
    ),
    # Step 2: listings newest first, and arrays.
    (
        "ALTER TABLE containers ADD COLUMN array_id text NOT NULL DEFAULT ''",
        "CREATE INDEX containers_created_uuid ON containers (created_at, uuid)",
        "CREATE INDEX containers_array ON containers (array_id, created_at, uuid) "
        "WHERE array_id <> ''",
    ),
    # Step 3: every dispatch attempt of a container, as JSON in its row.
    ("ALTER TABLE containers ADD COLUMN attempts text NOT NULL DEFAULT '[]'",),
    # Step 4: container labels (free-form key=value at submit, for cost reports).  Rows
    # written before it get none.
    ("ALTER TABLE containers ADD COLUMN labels text NOT NULL DEFAULT '{}'",),
    # Step 5: the spend ledger (herder.queue.sql_ledger), shared by every herder on the queue.
    (
        """CREATE TABLE spend (
            id bigserial PRIMARY KEY,
            at double precision NOT NULL,
            amount double precision NOT NULL,
            instance_id text NOT NULL,
            instance_type text NOT NULL,
            started_at double precision NOT NULL
        )""",
        "CREATE INDEX spend_at ON spend (at)",
        """CREATE TABLE container_costs (
            id bigserial PRIMARY KEY,
            at double precision NOT NULL,
            uuid text NOT NULL,
            name text NOT NULL,
            instance_type text NOT NULL,
            cost double precision NOT NULL,
            exit_code integer NOT NULL,
            labels text NOT NULL DEFAULT '{}'
        )""",
        "CREATE INDEX container_costs_at ON container_costs (at)",
    ),
)

# Built from constants only, never from input.
_SELECT = f"SELECT {COLUMNS} FROM containers"  # noqa: S608
_INSERT = f"INSERT INTO containers ({COLUMNS}) VALUES ({', '.join(['%s'] * COLUMN_COUNT)})"  # noqa: S608
_UPDATE = (
    "UPDATE containers SET state = %s, priority = %s, locked_at = %s, started_at = %s, "
    "finished_at = %s, lock_count = %s, exit_code = %s, runtime_status = %s, instance_id = %s, "
    "instance_type = %s, cost = %s, attempts = %s WHERE uuid = %s"
)
# At opening, only while still unfinished: another herder may have finished one since.
_UNFINISHED = " AND state IN ('Queued', 'Locked', 'Running')"
_UPDATE_UNFINISHED = _UPDATE + _UNFINISHED
_CANCEL_UNREADABLE = (
    "UPDATE containers SET state = %s, finished_at = %s, runtime_status = %s "
    "WHERE uuid = %s AND state IN ('Queued', 'Locked', 'Running')"
)
#: A notification naming every container at once (a large batch): re-read them all.
_EVERYTHING = "*"
#: NOTIFY payloads must stay under 8000 bytes; longer lists of uuids become :data:`_EVERYTHING`.
_MAX_NOTIFY = 7000


def _changed(uuids: Sequence[str]) -> str:
    """The notification payload (after the token) naming ``uuids``."""
    listed = ",".join(uuids)
    return listed if len(listed) <= _MAX_NOTIFY else _EVERYTHING


class _LockBusy(Exception):
    """Another session holds the queue's dispatch lock."""


class _Uncommitted(Exception):
    """A statement failed on a dropped connection before any commit was asked for."""


class PostgresQueue(RuledQueue):
    """The queue in one schema of a PostgreSQL database.

    ``connect`` opens a new autocommit connection (the backend builds it from the DSN and the
    password reference); ``schema`` names the schema the tables live in, so that several
    herder clusters can share one database.
    """

    def __init__(
        self,
        connect: Callable[[], psycopg.Connection[Any]],
        rules: RuleSettings,
        *,
        schema: str,
        reconnect_for: float = 30.0,
        exclusive: bool = True,
    ) -> None:
        """``exclusive``: hold the dispatch lock (refuse to open while another queue holds
        it).  Only a process that never dispatches (a standby serving the API) opens the queue
        without it."""
        super().__init__(rules)
        self._connect_raw = connect
        self._schema = schema
        self._channel = f"herder_queue_{schema}"
        self._token = secrets.token_hex(8)  # tells this queue's own notifications apart
        self._reconnect_for = reconnect_for
        self._exclusive = exclusive
        self._stopping = threading.Event()
        #: Set when a write's outcome is unknown: the listener re-reads everything, so that the
        #: snapshot shows what was stored, whichever way the commit went.
        self._resync = threading.Event()
        self._lost = ""  # set when another dispatcher took the queue over: refuse every write
        self._db: psycopg.Connection[Any] | None = None
        self.listening = threading.Event()  # set once the listener has subscribed (for tests)
        try:
            try:
                self._db = self._connect()
            except _LockBusy:
                raise QueueError(
                    f"queue schema {schema!r} is in use by another herder; two dispatchers on "
                    "one queue would run containers twice: stop the other one first"
                ) from None
            self._migrate(self._db)
            self._open()
        except psycopg.Error as exc:
            self._close_db()
            raise QueueUnavailable(f"queue database: {_reason(exc)}") from exc
        except BaseException:
            self._close_db()
            raise
        self._ledger = SqlLedger(
            self._ledger_write, self._ledger_read, param="%s", retry_on=(QueueUnavailable,)
        )
        self._listener = threading.Thread(
            target=self._listen, name="herder-postgres-listener", daemon=True
        )
        self._listener.start()

    # ---- the spend ledger

    @property
    def ledger(self) -> Ledger:
        """Spend in the schema's ``spend`` and ``container_costs`` tables: the leader books
        it, and a standby that takes over (or ``herder costs`` anywhere) reads the same.

        A write whose connection dropped is kept and written with the next one; one that
        dropped while committing may then be booked twice, which overstates spend (the
        budget's safe side) rather than forgetting it.
        """
        return self._ledger

    def _ledger_write(self, work: Callable[[Execute], Any]) -> Any:
        with self._lock:
            return self._write(lambda db: work(db.execute), None)

    def _ledger_read(self, work: Callable[[Execute], Any]) -> Any:
        with self._lock:
            return self._read(lambda db: work(db.execute))

    # ---- connections

    def _connect(self) -> psycopg.Connection[Any]:
        """A new connection set to the schema and holding the dispatch lock; :class:`_LockBusy`
        when another session holds it."""
        conn = self._connect_raw()
        try:
            schema = sql.Identifier(self._schema)
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
            conn.execute(sql.SQL("SET search_path TO {}").format(schema))
            if self._exclusive:
                held = conn.execute(
                    "SELECT pg_try_advisory_lock(hashtext(%s))", (lock_key(self._schema),)
                ).fetchone()
                if not held or not held[0]:
                    raise _LockBusy()
        except BaseException:
            conn.close()
            raise
        return conn

    def _close_db(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _with_db(self, work: Callable[[psycopg.Connection[Any]], T], *, write: bool) -> T:
        """Run ``work`` on the connection (caller holds ``self._lock``), reconnecting when it is
        broken, for up to ``reconnect_for`` seconds.

        A write is repeated on a new connection only when it failed before its commit was
        asked for (:class:`_Uncommitted`); otherwise its outcome is unknown and the caller gets
        :class:`QueueUnavailable`.
        """
        if self._lost:
            raise QueueUnavailable(f"queue schema {self._schema!r}: {self._lost}")
        deadline = time.monotonic() + self._reconnect_for
        delay = 0.05
        while True:
            try:
                if self._db is None or self._db.closed or self._db.broken:
                    self._close_db()
                    self._db = self._connect()
                    log.info("queue database connection restored")
                return work(self._db)
            except _LockBusy as exc:
                # Our old session may linger on the server for a while; past the deadline,
                # another herder has the queue, and this one must never write again.
                if time.monotonic() >= deadline:
                    self._lost = "another herder took the queue over while the database was away"
                    raise QueueUnavailable(f"queue schema {self._schema!r}: {self._lost}") from exc
                cause: BaseException = exc
            except _Uncommitted as exc:
                cause = exc.__cause__ or exc
            except psycopg.OperationalError as exc:
                if self._db is not None and not self._db.broken and not self._db.closed:
                    raise QueueError(f"queue database: {_reason(exc)}") from exc
                if write and self._db is not None:
                    self._close_db()
                    self._resync.set()
                    raise QueueUnavailable(
                        f"queue database connection lost while committing: {_reason(exc)}"
                    ) from exc
                cause = exc
            except psycopg.Error as exc:
                raise QueueError(f"queue database: {_reason(exc)}") from exc
            self._close_db()
            if time.monotonic() >= deadline or self._stopping.is_set():
                raise QueueUnavailable(f"queue database unavailable: {_reason(cause)}") from cause
            log.warning("queue database unavailable (%s); reconnecting", _reason(cause))
            self._stopping.wait(delay)
            delay = min(delay * 2, 1.0)

    def _write(self, work: Callable[[psycopg.Connection[Any]], T], notify: str | None) -> T:
        """``work`` in one transaction that also notifies the other processes of ``notify``
        (a uuid, or everything; None: nothing they need to know).

        BEGIN and COMMIT are explicit so that a failure before the COMMIT (nothing stored,
        safe to repeat) is told apart from one during it (outcome unknown)."""

        def run(db: psycopg.Connection[Any]) -> T:
            try:
                db.execute("BEGIN")
                result = work(db)
                if notify is not None:
                    payload = f"{self._token} {notify}"
                    db.execute("SELECT pg_notify(%s, %s)", (self._channel, payload))
            except psycopg.OperationalError as exc:
                if db.broken or db.closed:
                    raise _Uncommitted() from exc
                db.execute("ROLLBACK")
                raise
            except BaseException:
                if not db.broken and not db.closed:
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result

        return self._with_db(run, write=True)

    def _read(self, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        return self._with_db(work, write=False)

    def _migrate(self, db: psycopg.Connection[Any]) -> None:
        """Bring the schema up to date, one recorded version at a time; two herders starting
        at once take turns (a transaction-level advisory lock)."""
        with db.transaction():
            db.execute(
                "SELECT pg_advisory_xact_lock(hashtext(%s))", (f"herder-migrate:{self._schema}",)
            )
            upgrade_schema(
                db.execute,
                MIGRATIONS,
                lambda version, known: (
                    f"queue schema {self._schema!r} has schema version "
                    f"{version}, newer than this herder-queue-postgres understands ({known}); "
                    "upgrade it"
                ),
            )

    # ---- the listener

    def _listen(self) -> None:
        """Take in what other processes change, until :meth:`close`; reconnect when the
        connection drops, then re-read everything (notifications sent meanwhile are lost)."""
        delay = 0.05
        while not self._stopping.is_set():
            try:
                with self._connect_raw() as conn:
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
                    # Changes made before this LISTEN (while the queue was being opened, or
                    # while the connection was down) were announced to nobody: re-read.
                    self._resync.set()
                    delay = 0.05
                    self.listening.set()
                    while not self._stopping.is_set():
                        if self._resync.is_set():
                            self._resync.clear()
                            try:
                                self._refresh()
                            except QueueError:
                                self._resync.set()
                                raise
                        for note in conn.notifies(timeout=0.5):
                            self._take_notification(note.payload)
            except (psycopg.Error, QueueError) as exc:
                if self._stopping.is_set():
                    return
                self.listening.clear()
                log.warning("queue notifications interrupted (%s); reconnecting", _reason(exc))
            except Exception:
                log.exception("queue notification listener failed; restarting it")
            self._stopping.wait(delay)
            delay = min(delay * 2, 2.0)

    def _take_notification(self, payload: str) -> None:
        token, _, what = payload.partition(" ")
        if token == self._token or not what:
            return
        try:
            self._refresh(None if what == _EVERYTHING else what.split(","))
        except QueueError as exc:
            log.warning("cannot read a change made by another herder: %s", exc)

    # ---- storage (each called with self._lock held)

    def _store_new(self, containers: Sequence[Container]) -> None:
        rows = [insert_row(c) for c in containers]

        def work(db: psycopg.Connection[Any]) -> None:
            with db.cursor() as cur:
                cur.executemany(_INSERT, rows)

        self._write(work, _changed([c.uuid for c in containers]))

    def _store_change(
        self, uuid: str, change: Callable[[Container], Container]
    ) -> tuple[Container, Container]:
        def work(db: psycopg.Connection[Any]) -> tuple[Container, Container]:
            row = db.execute(f"{_SELECT} WHERE uuid = %s FOR UPDATE", (uuid,)).fetchone()
            if row is None:
                raise ContainerNotFound(uuid)
            old = from_row(row)
            cached = self._cached(uuid)
            if cached == old:
                old = cached  # the snapshot's object: ``new is old`` tells "no change" apart
            new = change(old)
            if new is not old:
                db.execute(_UPDATE, update_row(new))
            return old, new

        return self._write(work, uuid)

    def _store_cancelled(
        self, containers: Sequence[Container], unreadable: Sequence[Unreadable], now: float
    ) -> None:
        def work(db: psycopg.Connection[Any]) -> None:
            with db.cursor() as cur:
                if containers:
                    cur.executemany(_UPDATE_UNFINISHED, [update_row(c) for c in containers])
                if unreadable:
                    cur.executemany(
                        _CANCEL_UNREADABLE,
                        [(CANCELLED.value, now, dumps({"error": why}), u) for u, why in unreadable],
                    )

        self._write(work, _changed([c.uuid for c in containers] + [u for u, _ in unreadable]))

    def _load(self, uuid: str) -> Container | None:
        row = self._read(lambda db: db.execute(f"{_SELECT} WHERE uuid = %s", (uuid,)).fetchone())
        return None if row is None else from_row(row)

    def _load_unfinished(self) -> list[tuple[Container, str | None]]:
        states = [s.value for s in UNFINISHED]
        rows = self._read(
            lambda db: db.execute(f"{_SELECT} WHERE state = ANY(%s)", (states,)).fetchall()
        )
        return [decode(row) for row in rows]

    def _load_page(
        self, states: list[ContainerState] | None, limit: int, after: str
    ) -> list[Container]:
        wanted = None if states is None else [s.value for s in states]
        rows = self._read(
            lambda db: db.execute(
                f"{_SELECT} WHERE uuid > %s AND (%s::text[] IS NULL OR state = ANY(%s::text[])) "
                "ORDER BY uuid LIMIT %s",
                (after, wanted, wanted, limit),
            ).fetchall()
        )
        return [from_row(row) for row in rows]

    def _load_newest(
        self, filter: ListFilter, limit: int, cursor: tuple[float, str] | None
    ) -> list[Container]:
        clauses: list[sql.Composable] = [sql.SQL("TRUE")]
        params: list[Any] = []
        if cursor is not None:
            clauses.append(sql.SQL("(created_at, uuid) < (%s, %s)"))
            params += [cursor[0], cursor[1]]
        if filter.states is not None:
            clauses.append(sql.SQL("state = ANY(%s::text[])"))
            params.append([s.value for s in filter.states])
        if filter.since is not None:
            clauses.append(sql.SQL("created_at >= %s"))
            params.append(filter.since)
        if filter.array_id:
            clauses.append(sql.SQL("array_id = %s AND array_id <> ''"))
            params.append(filter.array_id)
        query = sql.SQL("{} WHERE {} ORDER BY created_at DESC, uuid DESC LIMIT %s").format(
            sql.SQL(_SELECT),
            sql.SQL(" AND ").join(clauses),  # constants only
        )
        params.append(limit)
        rows = self._read(lambda db: db.execute(query, params).fetchall())
        return [from_row(row) for row in rows]

    def _load_counts(self) -> dict[ContainerState, int]:
        rows = self._read(
            lambda db: db.execute(
                "SELECT state, count(*) FROM containers GROUP BY state"
            ).fetchall()
        )
        return {ContainerState(state): int(n) for state, n in rows}

    def _store_log(self, uuid: str, data: bytes) -> None:
        def work(db: psycopg.Connection[Any]) -> None:
            # The container's row is the lock: two writers of one log take turns.
            db.execute("SELECT 1 FROM containers WHERE uuid = %s FOR UPDATE", (uuid,))
            row = db.execute(
                "SELECT coalesce(max(start + length(data)), 0) FROM logs WHERE uuid = %s", (uuid,)
            ).fetchone()
            size = 0 if row is None else int(row[0])
            db.execute(
                "INSERT INTO logs (uuid, start, data) VALUES (%s, %s, %s)", (uuid, size, data)
            )

        # No notification: a log is not a change of the container's record.
        self._write(work, None)

    def _load_log(self, uuid: str, offset: int, end: int | None) -> bytes:
        rows = self._read(
            lambda db: db.execute(
                "SELECT start, data FROM logs WHERE uuid = %s AND start >= ("
                " SELECT coalesce(max(start), 0) FROM logs WHERE uuid = %s AND start <= %s)"
                " AND (%s::bigint IS NULL OR start < %s::bigint) ORDER BY start",
                (uuid, uuid, offset, end, end),
            ).fetchall()
        )
        if not rows:
            return b""
        first = int(rows[0][0])
        data = b"".join(bytes(chunk) for _, chunk in rows)
        return data[offset - first : None if end is None else end - first]

    def _close_storage(self) -> None:
        self._stopping.set()
        self._close_db()

    def close(self) -> None:
        super().close()
        listener = getattr(self, "_listener", None)
        if listener is not None and listener is not threading.current_thread():
            listener.join(timeout=5)


def _reason(exc: BaseException) -> str:
    """One line about a database error, for messages and logs.  psycopg's messages carry no
    password (it is never in the DSN), but they may be long: the first line is enough."""
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def read_ledger(connect: Callable[[], psycopg.Connection[Any]], schema: str) -> Ledger:
    """The spend ledger of ``schema`` on a new connection of its own, read only and holding
    no lock (``herder costs`` on any host); a schema from before the ledger has none.  The
    connection lives as long as the ledger object (a command's run)."""
    from herder.spend import MemoryLedger

    try:
        conn = connect()
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        found = conn.execute("SELECT to_regclass('spend')").fetchone()
    except psycopg.Error as exc:
        raise QueueUnavailable(f"queue database: {_reason(exc)}") from exc
    if not found or found[0] is None:
        conn.close()
        return MemoryLedger()

    def read(work: Callable[[Execute], Any]) -> Any:
        try:
            return work(conn.execute)
        except psycopg.Error as exc:
            raise QueueUnavailable(f"queue database: {_reason(exc)}") from exc

    refusal = f"queue schema {schema!r}: its spend is open read only here"
    return SqlLedger.read_only(read, refusal, param="%s")

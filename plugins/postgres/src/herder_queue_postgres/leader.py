"""The dispatch lock of a standby pair: a PostgreSQL session-level advisory lock.

The lock lives exactly as long as the session holding it: the server releases it when the
connection closes, however the holder ends (SIGKILL included), so the connection's liveness is
the lease.  The same key as the exclusive queue's lock (:mod:`herder_queue_postgres.queue`)
is used, so a standby never takes over from a herder that opened the queue without one.

The holder keeps checking its connection every third of ``lease`` and, with TCP keepalives and
a TCP user timeout of ``lease`` on that connection, learns of a dead network within about one
lease; it then calls ``on_lost`` at once, and the herder stops dispatching.  The server frees
the lock when it notices the session is gone (at once when the holder's process dies; after its
own TCP keepalive settings for a cut network), and the standby, trying every half lease, takes
it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import psycopg

from herder.queue.backend import DispatchLock
from herder.queue.base import QueueError

log = logging.getLogger(__name__)


def lock_key(schema: str) -> str:
    """The advisory lock's name (hashed by the server) for the queue in ``schema``."""
    return f"herder-queue:{schema}"


class PostgresDispatchLock(DispatchLock):
    """``pg_try_advisory_lock`` on a connection of its own, watched by a thread."""

    def __init__(
        self, connect: Callable[[], psycopg.Connection[Any]], *, schema: str, lease: float
    ) -> None:
        self._connect = connect
        self._key = lock_key(schema)
        self._lease = lease
        self._released = threading.Event()
        self._mutex = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self._watchdog: threading.Thread | None = None

    def acquire(self, stop: threading.Event, on_lost: Callable[[str], None]) -> bool:
        conn: psycopg.Connection[Any] | None = None
        while not stop.is_set() and not self._released.is_set():
            try:
                if conn is None or conn.closed or conn.broken:
                    conn = self._connect()
                row = conn.execute(
                    "SELECT pg_try_advisory_lock(hashtext(%s))", (self._key,)
                ).fetchone()
            except (psycopg.Error, QueueError) as exc:
                # QueueError: the password reference cannot be read (reported, retried).
                log.warning("dispatch lock: cannot reach the database (%s)", _first_line(exc))
                if conn is not None:
                    conn.close()
                conn = None
            else:
                if row is not None and row[0]:
                    return self._hold(conn, on_lost)
            stop.wait(self._lease / 2)
        if conn is not None:
            conn.close()
        return False

    def _hold(self, conn: psycopg.Connection[Any], on_lost: Callable[[str], None]) -> bool:
        with self._mutex:
            if self._released.is_set():
                conn.close()
                return False
            self._conn = conn
            self._watchdog = threading.Thread(
                target=self._watch, args=(conn, on_lost), name="herder-dispatch-lock", daemon=True
            )
            self._watchdog.start()
        return True

    def _watch(self, conn: psycopg.Connection[Any], on_lost: Callable[[str], None]) -> None:
        """Check the holding connection until :meth:`release`; the first failure is the loss."""
        while not self._released.wait(self._lease / 3):
            try:
                with self._mutex:
                    if self._released.is_set():
                        return
                    conn.execute("SELECT 1")
            except psycopg.Error as exc:
                if self._released.is_set():
                    return
                conn.close()
                on_lost(f"lost the dispatch lock with its database connection ({_first_line(exc)})")
                return

    def release(self) -> None:
        self._released.set()
        with self._mutex:
            conn, self._conn = self._conn, None
            watchdog = self._watchdog
        if conn is not None:
            conn.close()  # the server releases the lock with the session
        if watchdog is not None and watchdog is not threading.current_thread():
            watchdog.join(timeout=5)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__

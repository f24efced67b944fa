"""How a worker speaks to the runner agent on its instance: resident when it can be (SPEC §11).

Every runner verb (``--list``, ``--detach``, ``--kill``, ``--log``, ``--forget``) used to be a
command of its own: a channel, a shell and an interpreter start-up on the instance for each
probe, start and result.  When herder deploys its own agent, the verbs instead go as messages
to one resident ``<runner> --serve`` per instance, kept open as an
:class:`~herder.plugin.executor.ExecStream`; the agent handles them exactly as the one-shot commands
(same code, same state directory), so either way of calling means the same thing.  The agent
also says, unasked, when a container it started has ended, and ``on_change`` passes that on so
the worker can collect the result at once rather than at its next periodic probe; and it sends
what containers print as they print it (``log`` events), which ``on_log`` passes on.

One reader thread per open stream takes the answers (matched to requests by id) and the
events; requests may be in flight together and are answered in order.

The one-shot command stays the fallback, and nothing depends on the stream being up:

* a runner herder does not deploy (e.g. a preinstalled crunch-run), or an executor without
  streams, always gets one-shot commands, as in Arvados;
* a stream that cannot be opened, or breaks before a request was sent, is closed and the verb
  is run as a one-shot command instead; opening is tried again only after ``reopen_delay``, so
  a broken resident agent costs one failed attempt per delay, not one per verb;
* a request that was sent but not answered (the stream ended, timed out or answered nonsense)
  is never re-run: it fails like a one-shot command that failed, and the stream is closed.  The
  verb may have been carried out, and a ``--detach`` of a container that has meanwhile finished
  would start it again.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
from collections.abc import Callable

from herder.agent import protocol as runner_protocol
from herder.model import is_container_uuid
from herder.plugin.executor import (
    ExecResult,
    ExecStream,
    Executor,
    ExecutorError,
    StreamsUnsupported,
)

log = logging.getLogger(__name__)

#: Seconds between attempts to (re)open the resident agent after a failure.
DEFAULT_REOPEN_DELAY = 10.0


class _Unsent(Exception):
    """The request never reached the agent: it is safe to run it as a command instead."""


class _Pending:
    """One request waiting for its answer."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: ExecResult | None = None
        self.error: ExecutorError | None = None


class _Session:
    """One open stream, its reader thread and the requests waiting on it."""

    def __init__(self, stream: ExecStream) -> None:
        self.stream = stream
        self.lock = threading.Lock()  # guards the fields below and serializes writes
        self.pending: dict[int, _Pending] = {}
        self.next_id = 0
        self.dead: ExecutorError | None = None


class RunnerClient:
    """Runs runner verbs on one instance, through the resident agent when possible.

    ``remote_user`` is a callable because an instance's user can be learnt after the worker is
    made; ``now`` is the engine clock (only used to space reopen attempts); ``on_change`` is
    called (from the reader thread, so it must not block) when the agent reports that a
    container ended, and ``on_log(uuid, offset, data)`` with each piece of a container's log
    (from the reader thread too: it should store the piece and return).
    """

    def __init__(
        self,
        executor: Executor,
        *,
        command: str,
        remote_user: Callable[[], str],
        resident: bool,
        now: Callable[[], float],
        on_change: Callable[[], None] = lambda: None,
        on_log: Callable[[str, int, bytes], None] = lambda uuid, offset, data: None,
        reopen_delay: float = DEFAULT_REOPEN_DELAY,
        name: str = "runner",
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] = log,
    ) -> None:
        self._executor = executor
        self._command = command
        self._remote_user = remote_user
        self._now = now
        self._on_change = on_change
        self._on_log = on_log
        self._reopen_delay = reopen_delay
        self._name = name
        self._log = logger
        self._lock = threading.Lock()  # guards the fields below
        self._opening = threading.Lock()  # one open attempt at a time
        self._resident = resident
        self._session: _Session | None = None
        self._next_open = 0.0
        self._closed = False

    @property
    def resident(self) -> bool:
        """Whether a resident agent is up right now (for tests and the logs)."""
        with self._lock:
            return self._session is not None

    def call(self, argv: list[str], stdin: bytes | None, timeout: float) -> ExecResult:
        """Run one verb; raises :class:`ExecutorError` when it could not be run at all."""
        session = self._usable_session(timeout)
        if session is not None:
            try:
                return self._exchange(session, argv, stdin or b"", timeout)
            except _Unsent as exc:
                self._end(session, ExecutorError(str(exc)))
                self._log.info("resident runner failed (%s); using commands", exc)
        command = runner_protocol.command_line(self._command, self._remote_user(), argv)
        return self._executor.execute(command, stdin, None, timeout)

    def close(self) -> None:
        """Stop the resident agent (it exits at EOF); later calls run one-shot commands."""
        with self._lock:
            self._closed = True
            session = self._session
        if session is not None:
            self._end(session, ExecutorError("runner client closed"))

    # ----------------------------------------------------------------- the stream

    def _usable_session(self, timeout: float) -> _Session | None:
        """The open session, a newly opened one, or None to use a one-shot command."""
        with self._lock:
            if self._session is not None or not self._may_open():
                return self._session
        with self._opening:
            with self._lock:  # another caller may have opened it meanwhile, or failed to
                if self._session is not None or not self._may_open():
                    return self._session
            return self._open(timeout)

    def _may_open(self) -> bool:
        """Whether to try opening a stream now (caller holds ``_lock``)."""
        return self._resident and not self._closed and self._now() >= self._next_open

    def _open(self, timeout: float) -> _Session | None:
        command = runner_protocol.command_line(
            self._command, self._remote_user(), runner_protocol.SERVE_ARGV
        )
        try:
            stream = self._executor.open_stream(command, timeout)
        except StreamsUnsupported:
            with self._lock:
                self._resident = False  # this executor never will
            return None
        except ExecutorError as exc:
            self._log.info("cannot start resident runner: %s; using commands", exc)
            with self._lock:
                self._next_open = self._now() + self._reopen_delay
            return None
        session = _Session(stream)
        with self._lock:
            if self._closed:
                stream.close()
                return None
            self._session = session
        threading.Thread(
            target=self._read, args=(session,), name=f"{self._name}-stream", daemon=True
        ).start()
        self._log.info("resident runner started")
        return session

    def _end(self, session: _Session, error: ExecutorError) -> int:
        """Close a session; whoever still waits on it gets ``error``.  Idempotent.

        Returns how many requests were waiting (0 when the session had already ended).
        """
        with session.lock:
            if session.dead is not None:
                return 0
            session.dead = error
            waiting = list(session.pending.values())
            session.pending.clear()
        session.stream.close()
        for pending in waiting:
            pending.error = error
            pending.done.set()
        with self._lock:
            if self._session is session:
                self._session = None
                self._next_open = self._now() + self._reopen_delay
        return len(waiting)

    def _exchange(
        self, session: _Session, argv: list[str], stdin: bytes, timeout: float
    ) -> ExecResult:
        """Send one request and wait for its answer."""
        pending = _Pending()
        with session.lock:
            if session.dead is not None:
                raise _Unsent(str(session.dead))
            session.next_id += 1
            request_id = session.next_id
            session.pending[request_id] = pending
            request = {"id": request_id, "argv": argv, "stdin": base64.b64encode(stdin).decode()}
            try:
                session.stream.send(json.dumps(request).encode() + b"\n", timeout)
            except ExecutorError as exc:
                session.pending.pop(request_id, None)
                raise _Unsent(str(exc)) from exc
        if not pending.done.wait(timeout):
            error = ExecutorError(f"no answer from the resident runner within {timeout:g}s")
            self._end(session, error)
            self._log.info("resident runner: %s; the verb is not retried", error)
            raise error
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    def _read(self, session: _Session) -> None:
        """The reader thread: answers to their requests, events to ``on_change``."""
        while True:
            try:
                line = session.stream.receive_line(None)
            except ExecutorError as exc:
                # Instances go away with their agents: only news when it cost a request.
                if self._end(session, exc):
                    self._log.info("resident runner: %s", exc)
                else:
                    self._log.debug("resident runner: %s", exc)
                return
            try:
                request_id, result = _parse_line(line)
                piece = _log_piece(line) if request_id is None else None
            except ExecutorError as exc:
                self._log.warning("resident runner: %s", exc)
                self._end(session, exc)
                return
            if piece is not None:
                try:
                    self._on_log(*piece)
                except Exception as exc:  # the queue unreachable, say: collected at the exit
                    self._log.warning("resident runner: cannot store a log piece: %s", exc)
                continue
            if request_id is None:
                try:
                    self._on_change()
                except Exception as exc:  # e.g. the runtime already shut down
                    self._log.warning("resident runner: cannot act on its event: %s", exc)
                continue
            with session.lock:
                pending = session.pending.pop(request_id, None)
            if pending is not None:
                pending.result = result
                pending.done.set()


def _log_piece(line: bytes) -> tuple[str, int, bytes] | None:
    """(uuid, offset, data) of a ``log`` event line, None for any other event.

    The uuid is checked here: it comes from the instance and names a file on the dispatcher's
    side of things only through the queue, but a malformed one is a broken agent.
    """
    doc = json.loads(line)
    if doc.get("event") != "log":
        return None
    try:
        uuid, offset = doc["uuid"], doc["offset"]
        if not isinstance(uuid, str) or not is_container_uuid(uuid):
            raise ValueError(f"log event for a malformed uuid {str(uuid)[:40]!r}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError("log event offset is not a whole number")
        data = base64.b64decode(doc["data"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise ExecutorError(f"malformed log event from the resident runner: {exc}") from exc
    return uuid, offset, data


def _parse_line(line: bytes) -> tuple[int | None, ExecResult | None]:
    """Decode one line: (request id, answer), or (None, None) for an event.

    Anything malformed is an :class:`ExecutorError`, and ends the stream.
    """
    try:
        doc = json.loads(line)
        if not isinstance(doc, dict):
            raise ValueError(f"not an object: {line[:200]!r}")
        if "event" in doc:
            return None, None
        request_id, status = doc["id"], doc["status"]
        if isinstance(request_id, bool) or not isinstance(request_id, int):
            raise ValueError(f"answer without a request id: {line[:200]!r}")
        if isinstance(status, bool) or not isinstance(status, int):
            raise ValueError("status is not an integer")
        stdout = base64.b64decode(doc["stdout"], validate=True)
        stderr = base64.b64decode(doc["stderr"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise ExecutorError(f"malformed answer from the resident runner: {exc}") from exc
    return request_id, ExecResult(exit_status=status, stdout=stdout, stderr=stderr)

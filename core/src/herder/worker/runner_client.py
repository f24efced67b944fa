"""How a worker speaks to the runner agent on its instance: resident when it can be (SPEC §11).

Every runner verb (``--list``, ``--detach``, ``--kill``, ``--log``, ``--forget``) used to be a
command of its own: a channel, a shell and an interpreter start-up on the instance for each
probe, start and result.  When herder deploys its own agent, the verbs instead go as messages
to one resident ``<runner> --serve`` per instance, kept open as an
:class:`~herder.executor.ExecStream`; the agent handles them exactly as the one-shot commands
(same code, same state directory), so either way of calling means the same thing.

The one-shot command stays the fallback, and nothing depends on the stream being up:

* a runner herder does not deploy (e.g. a preinstalled crunch-run), or an executor without
  streams, always gets one-shot commands, as in Arvados;
* a stream that cannot be opened, or breaks before a request was sent, is closed and the verb
  is run as a one-shot command instead; opening is tried again only after ``reopen_delay``, so
  a broken resident agent costs one failed attempt per delay, not one per verb;
* a request that was sent but not answered (the stream ended, timed out or answered nonsense)
  is never re-run: it fails like a one-shot command that failed, and the stream is closed.  The
  verb may have been carried out, and a ``--detach`` of a container that has meanwhile finished
  would start it again;
* the stream carries one request at a time; a verb that finds it busy for longer than
  ``BUSY_WAIT`` (a ``--kill`` may take a second) runs as a one-shot command rather than queue.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
from collections.abc import Callable

from herder import runner_protocol
from herder.executor import ExecResult, ExecStream, Executor, ExecutorError, StreamsUnsupported

log = logging.getLogger(__name__)

#: Seconds between attempts to (re)open the resident agent after a failure.
DEFAULT_REOPEN_DELAY = 10.0

#: Seconds a verb waits for the stream to be free before it runs as a one-shot command.
BUSY_WAIT = 0.2


class _Unsent(Exception):
    """The request never reached the agent: it is safe to run it as a command instead."""


class RunnerClient:
    """Runs runner verbs on one instance, through the resident agent when possible.

    ``remote_user`` is a callable because an instance's user can be learnt after the worker is
    made; ``now`` is the engine clock (only used to space reopen attempts).
    """

    def __init__(
        self,
        executor: Executor,
        *,
        command: str,
        remote_user: Callable[[], str],
        resident: bool,
        now: Callable[[], float],
        reopen_delay: float = DEFAULT_REOPEN_DELAY,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] = log,
    ) -> None:
        self._executor = executor
        self._command = command
        self._remote_user = remote_user
        self._now = now
        self._reopen_delay = reopen_delay
        self._log = logger
        # _lock guards the fields below; _busy is held for a whole exchange on the stream.
        self._lock = threading.Lock()
        self._busy = threading.Lock()
        self._resident = resident
        self._stream: ExecStream | None = None
        self._next_open = 0.0
        self._next_id = 0
        self._closed = False

    @property
    def resident(self) -> bool:
        """Whether a resident agent is up right now (for tests and the logs)."""
        with self._lock:
            return self._stream is not None

    def call(self, argv: list[str], stdin: bytes | None, timeout: float) -> ExecResult:
        """Run one verb; raises :class:`ExecutorError` when it could not be run at all."""
        if self._busy.acquire(timeout=min(BUSY_WAIT, timeout)):
            try:
                stream = self._usable_stream(timeout)
                if stream is not None:
                    try:
                        return self._exchange(stream, argv, stdin or b"", timeout)
                    except _Unsent as exc:
                        self._drop(stream, f"resident runner failed ({exc}); using commands")
            finally:
                self._busy.release()
        command = runner_protocol.command_line(self._command, self._remote_user(), argv)
        return self._executor.execute(command, stdin, None, timeout)

    def close(self) -> None:
        """Stop the resident agent (it exits at EOF); later calls run one-shot commands."""
        with self._lock:
            self._closed = True
            stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()

    # ----------------------------------------------------------------- the stream

    def _usable_stream(self, timeout: float) -> ExecStream | None:
        """The open stream, a newly opened one, or None to use a one-shot command."""
        with self._lock:
            if self._stream is not None:
                return self._stream
            if not self._resident or self._closed or self._now() < self._next_open:
                return None
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
        with self._lock:
            if self._closed:
                stream.close()
                return None
            self._stream = stream
        self._log.info("resident runner started")
        return stream

    def _drop(self, stream: ExecStream, reason: str) -> None:
        self._log.info("%s", reason)
        stream.close()
        with self._lock:
            if self._stream is stream:
                self._stream = None
            self._next_open = self._now() + self._reopen_delay

    def _exchange(
        self, stream: ExecStream, argv: list[str], stdin: bytes, timeout: float
    ) -> ExecResult:
        """Send one request and read its answer (the caller holds ``_busy``)."""
        with self._lock:
            self._next_id += 1
            request_id = self._next_id
        request = {"id": request_id, "argv": argv, "stdin": base64.b64encode(stdin).decode()}
        try:
            stream.send(json.dumps(request).encode() + b"\n", timeout)
        except ExecutorError as exc:
            raise _Unsent(str(exc)) from exc
        try:
            return _parse_response(stream.receive_line(timeout), request_id)
        except ExecutorError as exc:
            self._drop(stream, f"resident runner: {exc}; the verb is not retried")
            raise


def _parse_response(line: bytes, request_id: int) -> ExecResult:
    """Decode one answer; anything malformed is an :class:`ExecutorError` (and ends the stream)."""
    try:
        doc = json.loads(line)
        if not isinstance(doc, dict) or doc.get("id") != request_id:
            raise ValueError(f"answer to another request: {line[:200]!r}")
        status = doc["status"]
        if isinstance(status, bool) or not isinstance(status, int):
            raise ValueError("status is not an integer")
        stdout = base64.b64decode(doc["stdout"], validate=True)
        stderr = base64.b64decode(doc["stderr"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise ExecutorError(f"malformed answer from the resident runner: {exc}") from exc
    return ExecResult(exit_status=status, stdout=stdout, stderr=stderr)

"""The runner agent on an instance: deploying it, and herder's handle on one container (SPEC §4).

:class:`RunnerDeployment` says which runner command workers use and, when herder deploys its
own agent, the bytes and md5 to install (SPEC §3.7, §5.10).

:class:`Runner` is the handle on one container's runner process on one worker.  The worker
creates one when it starts a container, or when a probe finds a container it did not start (a
previous herder process started it).  A runner starts its container once, and kills it with an
escalation that never gives up silently and never uses SIGKILL (which would kill the runner and
orphan the container and its mounts).

Runner flags are guarded by the pool lock, like every worker field; the lock is passed in.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import shlex
import threading
from collections.abc import Callable
from dataclasses import dataclass

from herder.agent import protocol as runner_protocol
from herder.engine.worker.runner_client import RunnerClient
from herder.model import Container, InstanceType
from herder.plugin.executor import ExecutorError
from herder.runtime import Runtime

log = logging.getLogger(__name__)

#: SIGTERM.  The only signal herder sends (SPEC §4.3).
SIGTERM = 15


@dataclass(frozen=True, slots=True)
class RunnerDeployment:
    """The runner command on instances and, when deploying, what to install there.

    ``data == b""`` means herder does not deploy: ``command`` is expected to exist already.
    """

    command: str
    data: bytes = b""
    md5: str = ""

    @classmethod
    def build(cls, data: bytes | None, directory: str, default_command: str) -> RunnerDeployment:
        """Deploy ``data`` as ``<directory>/herder-runner~<md5>``, or use ``default_command``.

        The md5 in the file name lets several herder versions share an instance, and makes
        "the right program is installed" a single ``md5sum`` check.
        """
        if data is None:
            return cls(command=default_command)
        md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
        return cls(command=posixpath.join(directory, f"herder-runner~{md5}"), data=data, md5=md5)

    @property
    def deploying(self) -> bool:
        return bool(self.data)

    def _as_runner_user(self, remote_user: str, script: str) -> str:
        """``script`` run by the user the runner runs as: root through sudo, unless the
        instance's user is root already."""
        if remote_user == "root":
            return f"sh -c {shlex.quote(script)}"
        return f"sudo sh -c {shlex.quote(script)}"

    def _paths(self) -> str:
        return (
            f"dstdir={shlex.quote(posixpath.dirname(self.command))}; "
            f"dstfile={shlex.quote(self.command)}; "
        )

    def md5_check_command(self, remote_user: str) -> str:
        """Print the installed program's md5sum, only if its directory is herder's own.

        The directory must be a real directory (no symlink) owned by the runner's user with
        mode 0700, and the program a regular file: anything else prints nothing, so the
        install step runs and refuses or repairs it.  Without this, a directory another user
        created first (``/tmp`` is everyone's) would hold a program they can replace.
        """
        return self._as_runner_user(
            remote_user,
            self._paths() + '[ -d "$dstdir" ] && [ ! -L "$dstdir" ] && [ ! -L "$dstfile" ] && '
            '[ "$(stat -c %u:%a "$dstdir")" = "$(id -u):700" ] && md5sum "$dstfile"',
        )

    def md5_expected_output(self) -> bytes:
        """``md5sum``'s exact output when the right program is installed (two spaces)."""
        return f"{self.md5}  {self.command}\n".encode()

    def install_command(self, remote_user: str) -> str:
        """The shell snippet that installs the program from stdin (SPEC §3.7).

        The directory is created 0700 (umask 077, parents too); if it exists it must be a
        real directory owned by the runner's user, else the install is refused with a message
        that says why (exit 3) and nothing is written.  The program is written to a new file
        made by ``mktemp`` (never following a symlink) and renamed over the old name, so the
        old program, or a symlink planted in its place, is replaced and never written through.
        """
        return self._as_runner_user(
            remote_user,
            "set -e; umask 077; "
            + self._paths()
            + 'refuse() { echo "herder: refusing runner directory $dstdir: $1" >&2; exit 3; }; '
            '[ -e "$dstdir" ] || [ -L "$dstdir" ] || mkdir -p "$dstdir"; '
            '[ -d "$dstdir" ] && [ ! -L "$dstdir" ] || refuse "not a directory"; '
            'owner=$(stat -c %u "$dstdir"); '
            '[ "$owner" = "$(id -u)" ] || refuse "owned by uid $owner, not by uid $(id -u)"; '
            'chmod 0700 "$dstdir"; '
            'tmp=$(mktemp "$dstdir/.install.XXXXXX"); cat >"$tmp"; chmod 0700 "$tmp"; '
            'mv -f "$tmp" "$dstfile"',
        )


class Runner:
    """Herder's handle on one container's runner process on one worker.

    ``on_unkillable(uuid)`` is called (without the lock) when the kill escalation gives up;
    ``on_killed(uuid, runner)`` (without the lock) when a kill command reports the process gone.
    """

    def __init__(
        self,
        *,
        uuid: str,
        container: Container | None,
        instance_type: InstanceType,
        client: RunnerClient,
        args: list[str],
        runtime_engine: str,
        runtime: Runtime,
        log_limit: int = 0,
        pull_policy: str = "if-not-present",
        lock: threading.Lock,
        timeout_term: float,
        timeout_signal: float,
        timeout_command: float,
        on_unkillable: Callable[[str], None],
        on_killed: Callable[[str, Runner], None],
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] = log,
    ) -> None:
        self.uuid = uuid
        self.container = container
        self._instance_type = instance_type
        self._client = client
        self._args = list(args)
        self._runtime_engine = runtime_engine
        self._log_limit = log_limit
        self._pull_policy = pull_policy
        self._runtime = runtime
        self._lock = lock
        self._timeout_term = timeout_term
        self._timeout_signal = timeout_signal
        self._timeout_command = timeout_command
        self._on_unkillable = on_unkillable
        self._on_killed = on_killed
        self._log = logger
        # All guarded by the pool lock.
        self.stopping = False  # a kill was requested
        self.givenup = False  # the kill escalation ran out of time
        self.closed = False
        self.start_pending = container is not None  # our start command has not returned yet
        self._kill_started = False
        self._deadline = 0.0

    # ------------------------------------------------------------------ start

    def start(self) -> bool:
        """Run ``--detach`` with the container's config on stdin.  Call without the lock.

        Returns whether the command succeeded.  A failure is only logged: the process may still
        have started (a timeout, say), so the worker keeps the runner until a probe shows
        otherwise.
        """
        assert self.container is not None, "a detected runner is never started"
        argv = runner_protocol.detach_argv(self._args, self.uuid)
        stdin = runner_protocol.config_document(
            self.container,
            self._instance_type,
            self._runtime_engine,
            self._log_limit,
            self._pull_policy,
        )
        try:
            result = self._client.call(argv, stdin, self._timeout_command)
        except ExecutorError as exc:
            self._log.warning("container %s: error starting runner: %s", self.uuid, exc)
            return False
        if not result.ok:
            self._log.warning(
                "container %s: runner start exited %d: stdout=%r stderr=%r",
                self.uuid,
                result.exit_status,
                result.stdout[:1000],
                result.stderr[:1000],
            )
            return False
        self._log.info("container %s: runner started", self.uuid)
        return True

    def start_finished(self) -> None:
        """Record that the start command returned (caller holds the lock).

        Begins a kill that was requested while the start was in flight (see :meth:`kill`).
        """
        self.start_pending = False
        if self.stopping and not self.closed and not self._kill_started:
            self._begin_kill()

    # ------------------------------------------------------------------ kill

    def kill(self, reason: str) -> None:
        """Stop the container: SIGTERM now, then every timeout_signal (caller holds the lock).

        Idempotent.  While our own start command is still in flight the escalation waits for
        it to return: a kill sent before ``--detach`` creates its lock would find "nothing to
        kill" and succeed, and the container would then start anyway.  Arvados sends the kill
        regardless and lets the loop run on until the start returns, so a start that outlasts
        TimeoutTERM drains the worker for nothing (SPEC §19 item 14).  The start command has
        a timeout, so the wait is bounded, and the TERM deadline counts from when it returns.
        """
        if self.stopping:
            return
        self.stopping = True
        self._log.info("container %s: killing runner: %s", self.uuid, reason)
        if self.start_pending:
            self._log.info("container %s: kill waits for the start command to return", self.uuid)
            return
        self._begin_kill()

    def _begin_kill(self) -> None:
        self._kill_started = True
        self._deadline = self._runtime.now() + self._timeout_term
        self._runtime.spawn(self._kill_attempt)

    def _kill_attempt(self) -> None:
        """One step of the escalation: give up after the deadline, else send SIGTERM once."""
        with self._lock:
            if self.closed:
                return
            if self._runtime.now() > self._deadline:
                self.givenup = True
            givenup = self.givenup
        if givenup:
            self._log.warning("container %s: runner did not stop after SIGTERM", self.uuid)
            self._on_unkillable(self.uuid)
            return
        attempt_start = self._runtime.now()
        if self._signal(SIGTERM):
            self._on_killed(self.uuid, self)
        with self._lock:
            if self.closed:
                return
        self._runtime.call_at(attempt_start + self._timeout_signal, self._kill_attempt)

    def _signal(self, signal: int) -> bool:
        argv = runner_protocol.kill_argv(signal, self.uuid)
        try:
            result = self._client.call(argv, None, self._timeout_command)
        except ExecutorError as exc:
            self._log.info("container %s: kill attempt unsuccessful: %s", self.uuid, exc)
            return False
        if not result.ok:
            self._log.info(
                "container %s: kill attempt unsuccessful (exit %d): %s",
                self.uuid,
                result.exit_status,
                result.stderr.decode(errors="replace").strip(),
            )
            return False
        return True

    # ------------------------------------------------------------------ close

    def close(self) -> None:
        """Forget the process (caller holds the lock): stops any kill loop.  Idempotent."""
        self.closed = True

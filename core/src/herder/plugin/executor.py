"""Executors run shell commands on an instance (SPEC §6.2).  The default one speaks SSH.

The pool creates one executor per instance through a factory.  An executor keeps whatever
connection it needs, reconnects when it drops, and must not block :meth:`Executor.set_target`
on a running :meth:`Executor.execute`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from herder.plugin.cloud import Instance


class ExecutorError(Exception):
    """The command could not be run at all (no address, connection refused, timeout, auth)."""


class NoAddressError(ExecutorError):
    """The instance has no address yet: it is still booting."""

    def __init__(self, message: str = "instance has no address") -> None:
        super().__init__(message)


class HostKeyError(ExecutorError):
    """The host key or instance secret did not verify: never talk to this host."""


@dataclass(frozen=True, slots=True)
class ExecResult:
    exit_status: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


class StreamsUnsupported(ExecutorError):
    """This executor cannot keep a command open as a stream; use :meth:`Executor.execute`."""


class ExecStream(ABC):
    """A command left running on the instance, spoken to line by line.

    Used for the runner agent's resident mode.  One thread may read while another writes;
    the caller serializes writes, and reads.  Every failure (the command ended, the connection
    dropped, a deadline passed) raises :class:`ExecutorError`; the stream is then unusable and
    must be closed.
    """

    @abstractmethod
    def send(self, data: bytes, timeout: float) -> None:
        """Write ``data`` to the command's stdin."""

    @abstractmethod
    def receive_line(self, timeout: float | None) -> bytes:
        """The next line of the command's stdout, without its newline (``None``: no deadline)."""

    @abstractmethod
    def close(self) -> None:
        """End the stream (the command sees EOF on stdin).  Idempotent."""


class Executor(ABC):
    """Runs commands on one instance."""

    @abstractmethod
    def execute(
        self,
        command: str,
        stdin: bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        """Run ``command`` through the remote shell and wait for it.

        A command that ran and failed returns its exit status; a command that could not be run
        raises :class:`ExecutorError`.
        """

    def open_stream(self, command: str, timeout: float) -> ExecStream:
        """Start ``command`` and keep it running as an :class:`ExecStream`.

        Optional: executors that cannot raise :class:`StreamsUnsupported`, and herder then
        runs every runner verb as its own command.
        """
        raise StreamsUnsupported(f"{type(self).__name__} does not keep commands open")

    @abstractmethod
    def set_target(self, instance: Instance) -> None:
        """Use this (possibly refreshed) instance object from the next connection on."""

    @abstractmethod
    def close(self) -> None:
        """Drop the connection.  A later :meth:`execute` may connect again."""


#: Builds the executor for one instance.
ExecutorFactory = Callable[[Instance], Executor]

"""Boot probes: deciding whether a new instance has finished booting (SPEC §3.6).

A boot probe is a plugin point (``herder_register_boot_probes``).  The pool runs it on every
probe of an ``unknown`` or ``booting`` worker until it succeeds; a failure is normal while an
instance boots and is logged quietly.  The built-in :class:`CommandBootProbe` runs a shell
command such as ``systemctl is-system-running`` and calls the instance booted when it exits 0.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod

from herder.config import Config
from herder.plugin.cloud import Instance
from herder.plugin.executor import Executor, ExecutorError, HostKeyError

log = logging.getLogger(__name__)


class BootProbe(ABC):
    """Decides whether an instance has booted far enough to run containers.

    Called from a background thread, never under the pool lock; it may block (within the
    command timeout).  It must not raise for ordinary failures: return ``(False, detail)``.
    """

    def bind(self, config: Config) -> None:
        """Called once by the pool that uses this probe, to read settings (e.g. timeouts)."""

    @abstractmethod
    def probe(self, executor: Executor, instance: Instance) -> tuple[bool, str]:
        """Return (booted, detail); ``detail`` (stderr or an error) is logged if boot fails."""


class CommandBootProbe(BootProbe):
    """Runs a shell command as the login user (no sudo); exit status 0 means booted."""

    def __init__(self, command: str = "", timeout: float | None = None) -> None:
        self.command = command or "true"
        self.timeout = timeout

    def bind(self, config: Config) -> None:
        if self.timeout is None:
            self.timeout = config.cloud.timeout_command

    def probe(self, executor: Executor, instance: Instance) -> tuple[bool, str]:
        try:
            result = executor.execute(self.command, None, None, self.timeout)
        except HostKeyError as exc:
            # Not a "still booting" failure: the host is not who it claims to be.
            log.warning("instance %s: boot probe %r: %s", instance.id, self.command, exc)
            return False, str(exc)
        except ExecutorError as exc:
            # No address yet, connection refused, timeouts: normal while booting.
            log.debug("instance %s: boot probe %r: %s", instance.id, self.command, exc)
            return False, str(exc)
        stderr = result.stderr.decode(errors="replace")
        if not result.ok:
            log.debug(
                "instance %s: boot probe %r exited %d: %s",
                instance.id,
                self.command,
                result.exit_status,
                stderr.strip(),
            )
            return False, stderr
        log.info("instance %s: boot probe succeeded", instance.id)
        return True, stderr

"""Instance-secret verification (SPEC §6.1).

Most clouds offer no trustworthy way to learn a new VM's SSH host key.  So herder plants a
random secret on every instance it creates (through the init command, which the cloud runs as
root at first boot) and, the first time it connects, reads the secret back over the connection
it is verifying: only the genuine instance knows it.  Drivers that *can* check host keys do so
in :meth:`Instance.verify_host_key`, and the secret is then not needed.
"""

from __future__ import annotations

from collections.abc import Callable

from herder.plugin.cloud import (
    DelegatingInstance,
    HostKey,
    HostKeyMismatch,
    Instance,
    NotImplementedByDriver,
    RemoteRunner,
)

#: Where the init command leaves the instance secret (readable by root only).
SECRET_PATH = "/var/run/herder-instance-secret"  # noqa: S105 (a path, not a secret)


def init_command(secret: str, instance_init_command: str = "") -> str:
    """The first-boot script: plant the secret, then run the operator's own init command.

    The secret is 40 hex digits, so double quotes are enough.  The operator's command always
    follows on its own line, even when empty.
    """
    return f'umask 0177 && echo -n "{secret}" >{SECRET_PATH}\n{instance_init_command}'


class TagVerifier(DelegatingInstance):
    """An instance whose host key is checked by the driver or, failing that, by its secret.

    ``report`` is called with this instance at the start of every verification (before it
    succeeds): the pool records the time to first SSH connection from it.
    """

    def __init__(
        self,
        inner: Instance,
        secret: str,
        report: Callable[[Instance], None] | None = None,
        timeout: float = 60.0,
    ) -> None:
        super().__init__(inner)
        self._secret = secret
        self._report = report
        self._timeout = timeout

    @property
    def secret(self) -> str:
        return self._secret

    def verify_host_key(self, key: HostKey, remote: RemoteRunner) -> None:
        """Accept ``key`` if the driver vouches for it or the instance knows our secret.

        Without a secret (an instance not created by herder, or created without the tag) a
        driver that cannot check keys leaves the instance unverifiable: it is never used and
        is shut down after the boot timeout.
        """
        if self._report is not None:
            self._report(self)
        try:
            self._inner.verify_host_key(key, remote)
            return
        except NotImplementedByDriver:
            if not self._secret:
                raise
        sudo = "" if self._inner.remote_user == "root" else "sudo "
        status, stdout, stderr = remote.run(f"{sudo}cat {SECRET_PATH}", b"", self._timeout)
        if status != 0:
            raise HostKeyMismatch(
                f"cannot read instance secret (exit {status}): "
                f"{stderr.decode(errors='replace').strip()}"
            )
        if stdout != self._secret.encode():
            raise HostKeyMismatch("bad instance secret")

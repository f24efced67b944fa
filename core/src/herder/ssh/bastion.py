"""Reaching instances through a bastion (jump host), with fabric.

fabric is used for what it does well, *connecting*: a :class:`fabric.Connection` to the
bastion, built from ``cloud.ssh`` or from the user's OpenSSH config (``ProxyJump``, including
chains of hops, ``User``, ``Port``, ``IdentityFile``), with its connect timeout.  Everything
after that stays on herder's raw paramiko channels: each instance connection is a paramiko
transport over one ``direct-tcpip`` channel of the bastion connection, so commands, stdin and
the runner's resident stream never go through invoke's runner (which pumps stdin about a byte
per packet), and each instance's host key is still verified by the executor's own rules.

One bastion connection is shared by every instance behind it (as ``ssh -J`` with connection
sharing would): 2,000 instances cost 2,000 channels on one connection, not 2,000 logins on the
bastion.  When the bastion refuses or drops the connection, every instance behind it reports
the bastion's error, and the next attempt to reach it waits 1 s, then 2 s, 4 s... up to
``cloud.ssh.bastion_retry_max``: a fleet probing through a failing bastion must not hammer it.

The bastion's host key must be known beforehand, from ``cloud.ssh.bastion_host_key`` or the
known_hosts file; fabric's default, adding whatever key is presented, is replaced by
paramiko's ``RejectPolicy``.

With ``use_ssh_config``, a ``ProxyCommand`` for the instance's address is run too (without a
shell, tokens expanded by :func:`expand_proxy_command`): each connection then goes through its
own process, whose stdin and stdout carry the instance's SSH connection.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import logging
import os
import re
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import fabric
import paramiko

from herder.config import CloudSSHConfig
from herder.plugin.executor import ExecutorError

log = logging.getLogger("herder.ssh.bastion")

#: The first pause after the bastion failed, in seconds; it doubles with each failure in a row.
FIRST_RETRY_DELAY = 1.0

_ERRORS = (paramiko.SSHException, OSError, EOFError)


class BastionError(ExecutorError):
    """The bastion refused, dropped or could not be trusted; no instance behind it is reachable."""


@dataclass(frozen=True, slots=True)
class Hop:
    """One leg of a connection and the seconds it took to set up (0.0: it was already up)."""

    name: str
    seconds: float


@dataclass(frozen=True, slots=True)
class ConnectReport:
    """How the executor's latest connection was made: through which bastion ("" = directly)."""

    bastion: str
    hops: tuple[Hop, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "bastion": self.bastion,
            "hops": [{"hop": hop.name, "seconds": round(hop.seconds, 3)} for hop in self.hops],
        }

    def describe(self) -> str:
        legs = ", ".join(f"{hop.name} {hop.seconds:.3f}s" for hop in self.hops)
        if self.bastion:
            return f"through bastion {self.bastion} ({legs})"
        return f"direct ({legs})"


def describe_connection(connection: fabric.Connection) -> str:
    return f"{connection.user}@{connection.host}:{connection.port}"


class Bastion:
    """One shared connection to a jump host, opened through fabric and re-opened with back-off.

    ``clock`` is a monotonic clock in seconds (tests may replace it); the back-off is a
    wall-clock pause on a real network, not engine time.
    """

    def __init__(
        self,
        connection: fabric.Connection,
        *,
        keepalive_interval: float,
        retry_max: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.connection = connection
        self.name = describe_connection(connection)
        self._keepalive = round(keepalive_interval)
        self._retry_max = retry_max
        self.clock = clock
        # Serializes dialling: threads that waited take the result (or the back-off error).
        self._lock = threading.Lock()
        self._delay = 0.0
        self._retry_at = 0.0
        self._last_error = ""
        self._was_up = False

    def open_channel(self, host: str, port: int, timeout: float) -> tuple[paramiko.Channel, float]:
        """A ``direct-tcpip`` channel to ``host:port`` and the seconds spent reaching the
        bastion (0.0 when its connection was already up)."""
        transport, seconds = self._transport()
        try:
            channel = transport.open_channel("direct-tcpip", (host, port), ("", 0), timeout=timeout)
        except paramiko.ChannelException as exc:
            # The bastion answered: it cannot reach the instance (yet).  Not the bastion's fault.
            raise ExecutorError(
                f"bastion {self.name} cannot reach {host}:{port}: {exc or type(exc).__name__}"
            ) from exc
        except _ERRORS as exc:
            # No answer at all: the connection died (perhaps before its thread noticed) or the
            # bastion is stuck.  Either way the bastion is the one to reconnect to.
            raise self._failed(f"connection lost ({exc or type(exc).__name__})") from exc
        return channel, seconds

    def close(self) -> None:
        with self._lock:
            self.connection.close()
            self._was_up = False

    def _transport(self) -> tuple[paramiko.Transport, float]:
        with self._lock:
            transport = self.connection.transport
            if transport is not None and transport.is_active():
                return transport, 0.0
            if self._was_up:
                log.warning("connection to bastion %s lost; reconnecting", self.name)
                self._was_up = False
            now = self.clock()
            if now < self._retry_at:
                raise BastionError(
                    f"bastion {self.name} unreachable: {self._last_error}; "
                    f"next attempt in {self._retry_at - now:.0f}s"
                )
            self.connection.close()
            start = self.clock()
            try:
                self.connection.open()
            except paramiko.BadHostKeyException as exc:
                raise self._failed_locked(
                    "presented a host key that does not match the known one (refused)"
                ) from exc
            except paramiko.AuthenticationException as exc:
                raise self._failed_locked(f"refused the login: {exc}") from exc
            except _ERRORS as exc:
                reason = str(exc) or type(exc).__name__
                if "not found in known_hosts" in reason:
                    reason = (
                        "host key unknown (neither cloud.ssh.bastion_host_key nor the "
                        "known_hosts file has it); refused"
                    )
                raise self._failed_locked(reason) from exc
            transport = self.connection.transport
            assert transport is not None
            if isinstance(transport.sock, socket.socket):
                # paramiko leaves Nagle on: ~40 ms per round trip through the tunnel otherwise.
                transport.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._keepalive:
                transport.set_keepalive(self._keepalive)
            self._delay = 0.0
            self._retry_at = 0.0
            self._was_up = True
            log.info("connected to bastion %s", self.name)
            return transport, self.clock() - start

    def _failed(self, reason: str) -> BastionError:
        with self._lock:
            return self._failed_locked(reason)

    def _failed_locked(self, reason: str) -> BastionError:
        """Record a failure and start (or lengthen) the pause before the next attempt."""
        self.connection.close()
        self._was_up = False
        self._delay = min(self._retry_max, max(FIRST_RETRY_DELAY, self._delay * 2))
        self._retry_at = self.clock() + self._delay
        self._last_error = reason
        log.warning("bastion %s: %s; next attempt in %.0fs", self.name, reason, self._delay)
        return BastionError(f"bastion {self.name}: {reason}")


# --------------------------------------------------------------------------- ProxyCommand

#: What a host name or address may contain to be put into a ProxyCommand: names, IPv4 and IPv6.
_SAFE_HOST = re.compile(r"[A-Za-z0-9_.:%-]+")
_TOKEN = re.compile(r"%(.?)")


def expand_proxy_command(raw: str, *, host: str, original: str, port: int, user: str) -> list[str]:
    """The argv of an OpenSSH ``ProxyCommand`` line for one instance, tokens expanded.

    The line comes from the user's OpenSSH config and is run without a shell (as paramiko and
    fabric run it): it is split into words first and the tokens are expanded inside each word,
    so an expanded value can never become a word, an option or shell syntax of its own.  A
    leading ``exec``, common in such lines for a shell's sake, is dropped.  Tokens as in
    OpenSSH: ``%h`` the host to reach (after ``HostName``), ``%n`` the host as herder named it,
    ``%p`` the instance's port (herder's, not the config's), ``%r`` the remote user, ``%%`` a
    percent sign.  Host names come from cloud instance data, so anything but a plain name or
    address is refused before it gets near a command.
    """
    for name in (host, original):
        if not _SAFE_HOST.fullmatch(name) or name.startswith("-"):
            raise ExecutorError(f"refusing to put host {name!r} into a ProxyCommand")
    try:
        words = shlex.split(raw)
    except ValueError as exc:
        raise ExecutorError(f"cannot parse ProxyCommand {raw!r}: {exc}") from exc
    if words and words[0] == "exec":
        words = words[1:]
    if not words:
        raise ExecutorError(f"empty ProxyCommand {raw!r}")
    values = {"%": "%", "h": host, "n": original, "p": str(port), "r": user or getpass.getuser()}

    def token(match: re.Match[str]) -> str:
        value = values.get(match.group(1))
        if value is None:
            raise ExecutorError(f"ProxyCommand {raw!r}: token {match.group(0)!r} not supported")
        return value

    return [_TOKEN.sub(token, os.path.expanduser(word)) for word in words]


class _ProxySocket(socket.socket):
    """Our end of a socket pair whose other end is a ProxyCommand's stdin and stdout.

    A real socket rather than paramiko's ``ProxyCommand`` object: that one never reports the
    command's end of output (its reads spin until their timeout) and never reaps the process.
    Closing this end (paramiko does when the connection ends) ends and reaps the command.
    """

    process: subprocess.Popen[bytes] | None = None

    def __init__(self, *, fileno: int) -> None:
        super().__init__(fileno=fileno)
        # paramiko closes the socket from its transport thread as well as from close(): the
        # second caller waits until the first has reaped the command, so that no caller
        # returns while the process may still run.
        self._reaping = threading.Lock()

    def close(self) -> None:
        super().close()
        with self._reaping:
            process, self.process = self.process, None
            if process is None:
                return
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@dataclass(frozen=True, slots=True)
class ProxyCommandRoute:
    """Reaching one instance through a ProxyCommand of the user's OpenSSH config.

    Each connection runs its own command (as OpenSSH does), so a fleet behind a ProxyCommand
    costs one process per connected instance; ``ProxyJump`` shares one bastion connection.
    """

    argv: tuple[str, ...]
    name: str

    def open_channel(self, host: str, port: int, timeout: float) -> tuple[socket.socket, float]:
        """Start the command; its stdin and stdout are the connection to ``host:port``."""
        start = time.monotonic()
        ours, theirs = socket.socketpair()
        try:
            process = subprocess.Popen(  # noqa: S603 -- the user's own config, no shell
                self.argv,
                stdin=theirs.fileno(),
                stdout=theirs.fileno(),
                close_fds=True,
                start_new_session=True,
            )
        except OSError as exc:
            ours.close()
            raise ExecutorError(f"cannot run ProxyCommand {self.name!r}: {exc}") from exc
        finally:
            theirs.close()
        sock = _ProxySocket(fileno=ours.detach())
        sock.process = process
        return sock, time.monotonic() - start


# --------------------------------------------------------------------------- building


_shared_lock = threading.Lock()
_shared: dict[Hashable, Bastion] = {}


def close_shared_bastions() -> None:
    """Hang up every shared bastion connection (the process is shutting down, or a test ends)."""
    with _shared_lock:
        bastions = list(_shared.values())
        _shared.clear()
        _fabric_configs.clear()
    for bastion in bastions:
        bastion.close()


def _shared_bastion(key: Hashable, build: Callable[[], Bastion]) -> Bastion:
    with _shared_lock:
        bastion = _shared.get(key)
        if bastion is None:
            bastion = _shared[key] = build()
        return bastion


def bastion_for(
    settings: CloudSSHConfig, dispatch_key_file: str, host: str, port: int, user: str = ""
) -> Bastion | ProxyCommandRoute | None:
    """What leads to ``host:port`` under ``settings``: a bastion, the OpenSSH config's
    ProxyCommand, or None to connect directly.  ``user`` is the login on the instance (``%r``).
    """
    if settings.bastion_host:
        key: Hashable = ("explicit", settings.model_dump_json(), dispatch_key_file)
        return _shared_bastion(key, lambda: _explicit_bastion(settings, dispatch_key_file))
    if not settings.use_ssh_config:
        return None
    config = _fabric_config(settings)
    try:
        target = fabric.Connection(host, port=port, config=config)
    except (ValueError, OSError) as exc:
        raise ExecutorError(f"cannot read the OpenSSH config for {host}: {exc}") from exc
    gateway = target.gateway
    if not gateway:
        return None
    if not isinstance(gateway, fabric.Connection):
        # fabric hands over the ProxyCommand with %p already expanded from the config's Port
        # (22 by default), not the instance's port: expand the raw line ourselves.  paramiko
        # has no public way to read it unexpanded; without one, take fabric's.
        unexpanded = getattr(config.base_ssh_config, "_lookup", None)
        raw = str(gateway)
        if unexpanded is not None:
            raw = unexpanded(hostname=host).get("proxycommand") or raw
        argv = expand_proxy_command(raw, host=str(target.host), original=host, port=port, user=user)
        return ProxyCommandRoute(tuple(argv), raw)
    chain = []
    hop: object = gateway
    while isinstance(hop, fabric.Connection):
        chain.append(describe_connection(hop))
        hop = hop.gateway
    key = ("ssh_config", settings.model_dump_json(), tuple(chain))
    return _shared_bastion(key, lambda: _configured_bastion(gateway, settings))


_fabric_configs: dict[str, fabric.Config] = {}


def _fabric_config(settings: CloudSSHConfig) -> fabric.Config:
    """The OpenSSH config as fabric reads it, parsed once per process (not once per dial)."""
    path = os.path.expanduser(settings.ssh_config_file) if settings.ssh_config_file else None
    key = path or ""
    with _shared_lock:
        config = _fabric_configs.get(key)
        if config is None:
            config = _fabric_configs[key] = fabric.Config(runtime_ssh_path=path)
        return config


def _explicit_bastion(settings: CloudSSHConfig, dispatch_key_file: str) -> Bastion:
    key_file = settings.bastion_key_file or dispatch_key_file
    if not key_file:
        raise ExecutorError(
            "no key for the bastion (cloud.ssh.bastion_key_file or containers.dispatch_private_key)"
        )
    connection = fabric.Connection(
        settings.bastion_host,
        port=settings.bastion_port,
        user=settings.bastion_user or None,
        # Only what cloud.ssh says: no OpenSSH config, agent or default keys behind its back.
        config=fabric.Config(ssh_config=paramiko.SSHConfig()),
        connect_timeout=settings.connect_timeout,
        connect_kwargs={
            "key_filename": [os.path.expanduser(key_file)],
            "look_for_keys": False,
            "allow_agent": False,
            "banner_timeout": settings.connect_timeout,
            "auth_timeout": settings.connect_timeout,
        },
    )
    _trust(connection, settings, pinned=settings.bastion_host_key)
    return Bastion(
        connection,
        keepalive_interval=settings.keepalive_interval,
        retry_max=settings.bastion_retry_max,
    )


def _configured_bastion(gateway: fabric.Connection, settings: CloudSSHConfig) -> Bastion:
    hop: object = gateway
    while isinstance(hop, fabric.Connection):
        if hop.connect_timeout is None:
            hop.connect_timeout = settings.connect_timeout
        _trust(hop, settings, pinned=settings.bastion_host_key if hop is gateway else "")
        hop = hop.gateway
    return Bastion(
        gateway,
        keepalive_interval=settings.keepalive_interval,
        retry_max=settings.bastion_retry_max,
    )


def _trust(connection: fabric.Connection, settings: CloudSSHConfig, pinned: str) -> None:
    """Accept only the pinned host key, or those in known_hosts; never add one."""
    client = connection.client
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    if pinned:
        key_type, data = pinned.split()[:2]
        try:
            key = paramiko.PKey.from_type_string(key_type, base64.b64decode(data))
        except (binascii.Error, ValueError, paramiko.SSHException) as exc:
            raise ExecutorError(
                f"cloud.ssh.bastion_host_key: not a usable public key ({exc})"
            ) from exc
        name = connection.host
        if connection.port != 22:
            name = f"[{name}]:{connection.port}"
        client.get_host_keys().add(name, key_type, key)
        return
    path = os.path.expanduser(settings.known_hosts_file)
    if os.path.exists(path):
        try:
            client.load_system_host_keys(path)
        except (OSError, paramiko.SSHException) as exc:
            raise ExecutorError(f"cannot read known_hosts file {path}: {exc}") from exc

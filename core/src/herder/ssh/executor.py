"""The default executor: runs commands on an instance over SSH (SPEC §6.2).

One SSH connection per instance carries every command as its own channel, so concurrent
:meth:`SSHExecutor.execute` calls share it.  The connection is made on first use and again
whenever opening a channel on it fails; making it is serialized, and a caller that waited while
another thread dialled takes that thread's result instead of dialling again.

Host keys: the key a server presents is accepted only once ``instance.verify_host_key`` returned
for it (that check may run commands on the new connection, e.g. to read the instance secret).
The verified key is remembered, so reconnecting to the same key needs no new check; a different
key is checked again, and a connection whose key does not verify is closed at once (Arvados
leaves it open, SPEC §19 item 30) and never used.

Reach: directly, or through a bastion (``cloud.ssh``; :mod:`herder.ssh.bastion`), which fabric
connects to.  Commands themselves run on raw paramiko channels rather than through fabric's
runner: invoke pipes stdin about one byte per SSH packet and polls for the exit status, both far
too slow for herder's traffic.

Timeouts here are wall-clock deadlines on real sockets, not the engine's clock: they bound how
long a thread of the runtime's pool may be held by a remote host, whatever clock the engine runs
on.

Environment variables go out as SSH ``env`` requests.  Servers may refuse them silently
(OpenSSH accepts only the names its ``AcceptEnv`` allows), so commands must not depend on them
unless the server is known to accept them.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Mapping

import paramiko

from herder.config import Config
from herder.plugin.cloud import HostKey, Instance, NotImplementedByDriver, RemoteRunner
from herder.plugin.executor import (
    ExecResult,
    ExecStream,
    Executor,
    ExecutorError,
    HostKeyError,
    NoAddressError,
)
from herder.runtime import Runtime
from herder.ssh import send_eof
from herder.ssh.bastion import ConnectReport, Hop, ProxyCommandRoute, bastion_for

log = logging.getLogger("herder.ssh")

#: Exit status reported when the server closed a command's channel without an exit status (for
#: instance because the command was killed by a signal); OpenSSH's client uses the same.
NO_EXIT_STATUS = 255

_CHUNK = 65536
_CHANNEL_ERRORS = (paramiko.SSHException, OSError, EOFError)


def load_private_key(path: str) -> paramiko.PKey:
    """Read the dispatch private key, with an error that names the file and what is wrong."""
    if not path:
        raise ExecutorError("no SSH private key configured (containers.dispatch_private_key)")
    try:
        return paramiko.PKey.from_path(path)
    except FileNotFoundError as exc:
        raise ExecutorError(f"SSH private key {path}: file not found") from exc
    except PermissionError as exc:
        raise ExecutorError(f"SSH private key {path}: not readable ({exc.strerror})") from exc
    except paramiko.PasswordRequiredException as exc:
        raise ExecutorError(f"SSH private key {path}: encrypted keys are not supported") from exc
    except (paramiko.SSHException, OSError, ValueError, UnicodeDecodeError) as exc:
        raise ExecutorError(f"SSH private key {path}: not a usable private key ({exc})") from exc


def target_host_port(address: str, default_port: int) -> tuple[str, int]:
    """Split ``host``, ``host:port`` or ``[v6]:port``; a missing port means ``default_port``.

    An address that does not split (a bare IPv6 address, say) is all host, as in SPEC §6.2.
    ``""`` (no address yet) raises :class:`NoAddressError`.
    """
    if not address:
        raise NoAddressError()
    host, port = address, ""
    if address.startswith("[") and "]" in address:
        host, _, rest = address[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif address.count(":") == 1:
        host, port = address.split(":")
    if not port:
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ExecutorError(f"invalid port in instance address {address!r}")
    return host, int(port)


# --------------------------------------------------------------------------- one command


class _Watchdog:
    """One thread that closes the channels of commands past their deadline, for all commands.

    A timer thread per command (and a thread draining its stderr) was most of the cost of the
    commands a fleet's adoption runs -- three or four per instance, 2,000 instances after a
    restart (``benchmarks/ssh_scale.py --pool``).  This thread sleeps until the earliest live
    deadline; a cancelled deadline is taken out at once, so it never wakes for nothing.
    Closing the channel wakes every blocking step of the command (the exec reply, a stdin
    write waiting for window space, the wait for output), so one deadline bounds them all.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: list[tuple[float, int, Callable[[], None]]] = []  # a heap
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, timeout: float, expire: Callable[[], None]) -> int:
        """Call ``expire`` in ``timeout`` seconds unless cancelled; returns the token to cancel."""
        token = next(self._tokens)
        entry = (time.monotonic() + timeout, token, expire)
        with self._cond:
            heapq.heappush(self._due, entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ssh-watchdog", daemon=True)
                self._thread.start()
            elif self._due[0] is entry:
                self._cond.notify()
        return token

    def cancel(self, token: int) -> None:
        with self._cond:
            for i, entry in enumerate(self._due):
                if entry[1] == token:
                    self._due[i] = self._due[-1]
                    self._due.pop()
                    heapq.heapify(self._due)
                    return

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                while not self._due or self._due[0][0] > now:
                    self._cond.wait(self._due[0][0] - now if self._due else None)
                    now = time.monotonic()
                _, _, expire = heapq.heappop(self._due)
            # Closing can block (a send into a connection whose peer stopped reading), and
            # must not hold up the other commands' deadlines: a thread per *expired* command,
            # which is rare.
            threading.Thread(
                target=self._expire, args=(expire,), name="ssh-timeout", daemon=True
            ).start()

    @staticmethod
    def _expire(expire: Callable[[], None]) -> None:
        try:
            expire()
        except Exception:
            log.exception("closing a command that timed out failed")

    def _forked(self) -> None:
        """In a forked child the thread is gone (and the parent's commands with it)."""
        self._cond = threading.Condition()
        self._due = []
        self._thread = None


_watchdog = _Watchdog()
os.register_at_fork(after_in_child=_watchdog._forked)


def run_on_channel(
    channel: paramiko.Channel,
    command: str,
    stdin: bytes,
    env: Mapping[str, str] | None,
    timeout: float,
) -> ExecResult:
    """Run ``command`` on a freshly opened session channel and collect its results.

    The shared watchdog closes the channel at the deadline.  The channel is always closed on
    return.  Only a command with stdin gets a thread of its own (to write it while the output
    is read); stdout and stderr are read together on this thread.
    """
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        _close_quietly(channel)

    deadline = time.monotonic() + timeout
    token = _watchdog.watch(timeout, expire)
    writer: threading.Thread | None = None
    try:
        if env:
            channel.update_environment(dict(env))
        channel.exec_command(command)
        if stdin:
            writer = threading.Thread(
                target=_write_stdin, args=(channel, stdin), name="ssh-stdin", daemon=True
            )
            writer.start()
        else:
            send_eof(channel)
        stdout, stderr = _read_outputs(channel, deadline)
        channel.status_event.wait(max(0.0, deadline - time.monotonic()))
        status = channel.recv_exit_status() if channel.status_event.is_set() else -1
    except _CHANNEL_ERRORS as exc:
        if expired.is_set():
            raise ExecutorError(f"command timed out after {timeout:g}s") from exc
        raise ExecutorError(f"cannot run command: {exc or type(exc).__name__}") from exc
    finally:
        _watchdog.cancel(token)
        _close_quietly(channel)
        if writer is not None:
            writer.join()
    if status == -1:
        if expired.is_set() or time.monotonic() >= deadline:
            raise ExecutorError(f"command timed out after {timeout:g}s")
        if not channel.get_transport().is_active():
            raise ExecutorError("connection lost before the command finished")
        status = NO_EXIT_STATUS
    return ExecResult(exit_status=status, stdout=stdout, stderr=stderr)


def _close_quietly(channel: paramiko.Channel) -> None:
    """Close ``channel``; a connection that died meanwhile is no error here (the caller
    reports the command's fate), and must not mask the exception being handled."""
    try:
        channel.close()
    except _CHANNEL_ERRORS as exc:
        log.debug("closing an SSH channel failed: %s", exc)


def _write_stdin(channel: paramiko.Channel, data: bytes) -> None:
    """Send all of ``data`` straight to the channel, then EOF.

    Runs beside the output reader so a command that answers while still reading its input
    cannot deadlock against a full window.  A failure here (the command ended without reading
    everything, or the channel closed) shows up on the reading side.
    """
    try:
        channel.sendall(data)
        send_eof(channel)
    except _CHANNEL_ERRORS:
        pass


def _wait_readable(fd: int, timeout: float) -> None:
    """Wait until ``fd`` is readable or ``timeout`` seconds passed.  ``poll``, not ``select``:
    a dispatcher with 2,000 connections has descriptors past select's limit of 1,024."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    poller.poll(max(0, int(timeout * 1000) + 1))


def _read_outputs(channel: paramiko.Channel, deadline: float) -> tuple[bytes, bytes]:
    """Read stdout and stderr as they come until EOF (or the deadline), neither filling the
    window and stalling the other.

    paramiko's ``fileno()`` is a pipe it makes readable whenever either stream has data or
    the channel reached EOF or closed, so one wait covers both streams without a thread each.
    """
    out: list[bytes] = []
    err: list[bytes] = []
    wake = channel.fileno()
    try:
        while True:
            if channel.recv_ready():
                out.append(channel.recv(_CHUNK))
            elif channel.recv_stderr_ready():
                err.append(channel.recv_stderr(_CHUNK))
            elif channel.eof_received or channel.closed:
                break
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                _wait_readable(wake, left)
    except _CHANNEL_ERRORS:
        pass  # the channel broke; the exit status (or its absence) tells the caller
    return b"".join(out), b"".join(err)


class SSHStream(ExecStream):
    """A command kept running on its own channel of the shared connection.

    One thread may read while others write.  Writes use paramiko's channel timeout, ``POLL``
    at a time, until their own deadline.  Reads do not: they wait on the channel's
    ``fileno()``, a pipe paramiko makes readable when stdout or stderr data arrives or the
    channel reaches EOF or closes, so an idle reader (the resident runner's, idle most of its
    life) sleeps until something happens rather than waking on a timer -- at 2,000 idle
    streams a 5 s timer still cost 400 wake-ups a second, each taking the GIL
    (``benchmarks/ssh_scale.py``).  What the command writes to stderr is drained as it comes
    (so it cannot fill the window) and logged.

    ``IDLE_POLL`` only bounds how long a reader can miss a wake-up: when ``close()`` races
    with a reader about to wait, paramiko closes the pipe under it.
    """

    #: Seconds a blocking write waits before looking at its deadline again.
    POLL = 0.5
    #: Seconds a read without a deadline waits before looking at the channel again anyway.
    IDLE_POLL = 60.0

    def __init__(self, channel: paramiko.Channel, command: str) -> None:
        self._channel = channel
        self._command = command
        self._buffer = b""
        self._wake = channel.fileno()
        channel.settimeout(self.POLL)

    def send(self, data: bytes, timeout: float) -> None:
        if self._channel.closed or self._channel.eof_received:
            # The command has ended: writing could still "succeed" into the void.
            raise ExecutorError(f"stream ended: {self._command!r} exited")
        deadline = time.monotonic() + timeout
        rest = data
        while rest:
            try:
                sent = self._channel.send(rest)
            except TimeoutError:
                sent = 0  # the window is full: the command is not reading yet
            except _CHANNEL_ERRORS as exc:
                raise ExecutorError(f"stream closed: {exc or type(exc).__name__}") from exc
            if sent == 0 and time.monotonic() > deadline:
                raise ExecutorError(f"stream write timed out after {timeout:g}s")
            rest = rest[sent:]

    def receive_line(self, timeout: float | None) -> bytes:
        deadline = None if timeout is None else time.monotonic() + timeout
        channel = self._channel
        while b"\n" not in self._buffer:
            self._drain_stderr()
            if channel.recv_ready() or channel.eof_received or channel.closed:
                try:
                    chunk = channel.recv(_CHUNK)  # does not block: data, or EOF
                except _CHANNEL_ERRORS as exc:
                    raise ExecutorError(f"stream closed: {exc or type(exc).__name__}") from exc
                if not chunk:
                    self._drain_stderr()
                    raise ExecutorError(f"stream ended: {self._command!r} exited")
                self._buffer += chunk
                continue
            if deadline is None:
                period = self.IDLE_POLL
            else:
                period = deadline - time.monotonic()
                if period <= 0:
                    raise ExecutorError(f"no answer on the stream within {timeout:g}s")
            try:
                _wait_readable(self._wake, period)
            except (OSError, ValueError):
                # The pipe was closed under us: the channel is closed, seen above next time.
                if not channel.closed:
                    raise ExecutorError("stream closed") from None
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _drain_stderr(self) -> None:
        try:
            while self._channel.recv_stderr_ready():
                data = self._channel.recv_stderr(_CHUNK)
                if not data:
                    return
                text = data[:2000].decode(errors="replace")
                log.info("stream %r stderr: %s", self._command, text)
        except _CHANNEL_ERRORS:
            return

    def close(self) -> None:
        # Wake a reader waiting on the pipe before paramiko closes it (and the descriptor
        # number can be reused): a closed input buffer makes the pipe readable.
        self._channel.in_buffer.close()
        _close_quietly(self._channel)


class _ClientTransport(paramiko.Transport):
    """A client transport whose thread wakes every 5 s when idle, not ten times a second.

    paramiko's transport thread reads with a 0.1 s socket timeout to look for a close, a
    re-key or a keep-alive that is due; with one transport per instance that is 10 wake-ups a
    second per instance, each taking the GIL -- at 1,000 idle instances most of the
    dispatcher's CPU (``benchmarks/ssh_scale.py``); at 2,000, once a second still was 2,000
    wake-ups a second.  Data still wakes it at once and ``close()`` does not wait for it (the
    thread ends at its next wake-up); keep-alives (30 s by default) go out up to 5 s late.
    """

    _active_check_timeout = 5.0


class _TransportRunner(RemoteRunner):
    """Runs commands on a connection that is still being verified."""

    def __init__(self, transport: paramiko.Transport) -> None:
        self._transport = transport

    def run(
        self, command: str, stdin: bytes = b"", timeout: float = 60.0
    ) -> tuple[int, bytes, bytes]:
        try:
            channel = self._transport.open_session(timeout=timeout)
        except _CHANNEL_ERRORS as exc:
            raise ExecutorError(f"cannot open a session: {exc}") from exc
        result = run_on_channel(channel, command, stdin, None, timeout)
        return result.exit_status, result.stdout, result.stderr


# --------------------------------------------------------------------------- the executor


class SSHExecutor(Executor):
    """Runs commands on one instance over one shared, self-healing SSH connection."""

    def __init__(
        self,
        instance: Instance,
        config: Config,
        runtime: Runtime,
        *,
        connect_timeout: float | None = None,
    ) -> None:
        self._key = load_private_key(config.containers.dispatch_private_key)
        self._key_file = config.containers.dispatch_private_key
        self._ssh = config.cloud.ssh
        self._default_port = config.cloud.ssh_port
        self._default_timeout = config.cloud.timeout_command
        # Seconds for TCP connect, SSH handshake, login and host-key verification, per hop.
        self._connect_timeout = (
            self._ssh.connect_timeout if connect_timeout is None else connect_timeout
        )
        #: How the latest connection was made (through which bastion, how long each hop took).
        self.last_connect: ConnectReport | None = None
        self._runtime = runtime
        # _lock guards the fields below and is never held during network I/O, so set_target()
        # and close() never wait for a command or a dial.
        self._lock = threading.Lock()
        self._target = instance
        self._transport: paramiko.Transport | None = None
        self._dial_error: ExecutorError | None = None
        self._generation = 0  # number of finished connection setups
        self._epoch = 0  # number of close() calls
        self._verified_key: HostKey | None = None
        # _dial_lock serializes connection setup (SPEC §6.2: never dial twice at once).
        self._dial_lock = threading.Lock()

    @property
    def target(self) -> Instance:
        with self._lock:
            return self._target

    def set_target(self, instance: Instance) -> None:
        with self._lock:
            self._target = instance

    def close(self) -> None:
        with self._lock:
            transport, self._transport = self._transport, None
            self._epoch += 1
        if transport is not None:
            transport.close()

    def execute(
        self,
        command: str,
        stdin: bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        limit = self._default_timeout if timeout is None else timeout
        channel = self._open_channel(limit)
        return run_on_channel(channel, command, stdin or b"", env, limit)

    def open_stream(self, command: str, timeout: float) -> SSHStream:
        channel = self._open_channel(timeout)
        try:
            channel.settimeout(timeout)  # for the exec request; the stream sets its own
            channel.exec_command(command)
        except _CHANNEL_ERRORS as exc:
            _close_quietly(channel)
            raise ExecutorError(f"cannot start {command!r}: {exc or type(exc).__name__}") from exc
        return SSHStream(channel, command)

    # ----------------------------------------------------------------- connection

    def _open_channel(self, timeout: float) -> paramiko.Channel:
        """A session channel on the current connection, or on a new one if that fails."""
        with self._lock:
            transport, generation = self._transport, self._generation
        if transport is not None:
            try:
                return transport.open_session(timeout=timeout)
            except _CHANNEL_ERRORS as exc:
                log.debug("SSH connection to %s unusable (%s); reconnecting", self.target, exc)
        transport = self._connect(generation)
        try:
            return transport.open_session(timeout=timeout)
        except _CHANNEL_ERRORS as exc:
            raise ExecutorError(f"cannot open an SSH session to {self.target}: {exc}") from exc

    def _connect(self, seen_generation: int) -> paramiko.Transport:
        """Set up a new connection, unless another thread finished one since we looked.

        The new connection replaces the old one (which is hung up) when it succeeds or when
        there is no old one; when dialling fails the old connection stays, but this caller
        gets the error (SPEC §6.2).
        """
        with self._dial_lock:
            with self._lock:
                if self._generation != seen_generation:
                    if self._transport is not None:
                        return self._transport
                    assert self._dial_error is not None
                    raise self._dial_error
                target, epoch = self._target, self._epoch
            try:
                new = self._dial(target)
            except ExecutorError as exc:
                with self._lock:
                    self._generation += 1
                    if self._transport is None:
                        self._dial_error = exc
                raise
            with self._lock:
                if self._epoch != epoch:
                    old, new_in_use = None, False
                else:
                    old, self._transport, new_in_use = self._transport, new, True
                    self._dial_error = None
                self._generation += 1
        if not new_in_use:
            new.close()
            raise ExecutorError(f"SSH executor for {target} was closed while connecting")
        if old is not None:
            old.close()
        return new

    def _dial(self, target: Instance) -> paramiko.Transport:
        """Connect, authenticate and verify the host key; the transport is closed on failure."""
        host, port = target_host_port(target.address, self._default_port)
        where = f"{target} at {host}:{port}"
        bastion = bastion_for(self._ssh, self._key_file, host, port, target.remote_user)
        hops: list[Hop] = []
        start = time.monotonic()
        sock: socket.socket | paramiko.Channel
        if bastion is None:
            try:
                sock = socket.create_connection((host, port), timeout=self._connect_timeout)
            except OSError as exc:
                raise ExecutorError(f"cannot connect to {where}: {exc}") from exc
            # paramiko leaves Nagle on, which costs ~40 ms per command round trip.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            # The bastion's own errors (BastionError) name it and pass through as they are.
            sock, bastion_seconds = bastion.open_channel(host, port, self._connect_timeout)
            via = "proxy" if isinstance(bastion, ProxyCommandRoute) else "bastion"
            hops.append(Hop(f"{via} {bastion.name}", bastion_seconds))
            where = f"{where} through {via} {bastion.name}"
            start = time.monotonic()
        transport = _ClientTransport(sock)
        transport.banner_timeout = self._connect_timeout
        transport.handshake_timeout = self._connect_timeout
        transport.auth_timeout = self._connect_timeout
        try:
            transport.start_client(timeout=self._connect_timeout)
            transport.auth_publickey(target.remote_user, self._key)
            if not transport.is_authenticated():
                raise ExecutorError(f"SSH login to {where} needs more than the dispatch key")
            self._check_host_key(target, transport)
        except HostKeyError as exc:
            transport.close()
            log.warning("refusing SSH connection to %s: %s", where, exc)
            raise
        except ExecutorError:
            transport.close()
            raise
        except _CHANNEL_ERRORS as exc:
            transport.close()
            raise ExecutorError(f"SSH to {where} failed: {exc or type(exc).__name__}") from exc
        except BaseException:
            transport.close()
            raise
        if self._ssh.keepalive_interval:
            transport.set_keepalive(max(1, round(self._ssh.keepalive_interval)))
        hops.append(Hop(f"instance {host}:{port}", time.monotonic() - start))
        self.last_connect = ConnectReport(bastion.name if bastion else "", tuple(hops))
        log.debug("SSH to %s: %s", target, self.last_connect.describe())
        return transport

    def _check_host_key(self, target: Instance, transport: paramiko.Transport) -> None:
        """Accept the presented host key only once the instance vouched for it.

        A failure to run the check's commands (timeout, connection lost) stays an
        :class:`ExecutorError` -- the key was not judged; any other failure, including a
        driver that cannot check keys on an instance without a secret, is a
        :class:`HostKeyError`.
        """
        server_key = transport.get_remote_server_key()
        presented = HostKey(server_key.get_name(), server_key.asbytes())
        with self._lock:
            known = self._verified_key
        if presented == known:
            return
        if known is not None:
            log.warning("host key of %s changed; verifying the new key again", target)
        try:
            target.verify_host_key(presented, _TransportRunner(transport))
        except NotImplementedByDriver as exc:
            raise HostKeyError(f"cannot verify the host key of {target}: {exc}") from exc
        except ExecutorError:
            raise
        except Exception as exc:
            raise HostKeyError(
                f"host key {presented.key_type} of {target} did not verify: {exc}"
            ) from exc
        with self._lock:
            self._verified_key = presented

"""An in-process SSH server on paramiko, for tests and for the loopback driver.

:class:`LocalSSHServer` listens on a local port, accepts only the authorized public keys (any
user name), and runs each ``exec`` request through a handler: by default
:func:`run_shell`, which runs the command with ``sh -c`` and pumps stdin, stdout and stderr.

paramiko's server side has traps this module works around (each is marked where it is fixed):

* the reply to an ``exec`` request is sent only after ``check_channel_exec_request`` returns, so
  a fast command started from there can send its exit status and close the channel before the
  reply, and the client fails with "Channel closed" -- commands start only after the reply;
* ``Transport.start_server`` without an event blocks the accept loop during the handshake and
  raises when the handshake fails, which would kill the accept loop;
* paramiko holds channels only by weak reference: a channel nobody keeps is collected and closed
  at once -- live channels are kept here until they close;
* Nagle's algorithm costs ~40 ms per command -- TCP_NODELAY is set on accepted sockets.

With ``forward_to`` the server is also a jump host: it opens ``direct-tcpip`` channels (what
``ssh -J`` and fabric's gateway ask for) to where that function routes them, the way a bastion
reaches instances the client cannot.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Mapping
from typing import IO, Any

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from paramiko.common import (
    AUTH_FAILED,
    AUTH_SUCCESSFUL,
    MSG_CHANNEL_CLOSE,
    MSG_CHANNEL_REQUEST,
    OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED,
    OPEN_FAILED_CONNECT_FAILED,
    OPEN_SUCCEEDED,
)

from herder.agent.protocol import login_environment
from herder.ssh import send_exit_status

log = logging.getLogger("herder.ssh.server")

_CHUNK = 65536
_SESSION_JOIN_TIMEOUT = 10.0  # seconds stop() waits for a command that ignores its hang-up


def generate_key() -> tuple[paramiko.PKey, str]:
    """A fresh ed25519 key pair in memory: the private key and its ``ssh-ed25519 AAAA...`` line."""
    key = paramiko.Ed25519Key.from_private_key(io.StringIO(_new_ed25519_openssh()))
    return key, public_line(key)


def generate_key_file(path: str | os.PathLike[str]) -> tuple[paramiko.PKey, str]:
    """Like :func:`generate_key`, also writing the private key to ``path`` (OpenSSH format,
    mode 0600) for code that reads its key from a file, as the executor does."""
    text = _new_ed25519_openssh()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    key = paramiko.Ed25519Key.from_private_key(io.StringIO(text))
    return key, public_line(key)


def _new_ed25519_openssh() -> str:
    private = ed25519.Ed25519PrivateKey.generate()
    return private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()


def public_line(key: paramiko.PKey) -> str:
    """The OpenSSH ``authorized_keys`` form of ``key``'s public half."""
    return f"{key.get_name()} {key.get_base64()}"


def _parse_authorized(lines: list[str]) -> set[tuple[str, bytes]]:
    """``(type, blob)`` of each ``type base64 [comment]`` line; blank and ``#`` lines skipped."""
    keys: set[tuple[str, bytes]] = set()
    for line in lines:
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) < 2:
            raise ValueError(f"invalid authorized key line: {line!r}")
        keys.add((fields[0], base64.b64decode(fields[1])))
    return keys


class ExecRequest:
    """One command a client asked to run, as a handler sees it.

    The handler reads the client's stdin with :meth:`read_stdin` (``b""`` at EOF), writes with
    :meth:`write_stdout` / :meth:`write_stderr`, and returns the exit status.  When the client
    goes away before the handler returns (it closed the channel, or the connection died), the
    callbacks given to :meth:`on_abandon` run, once, so a handler can stop work whose output has
    nowhere to go.
    """

    def __init__(self, channel: paramiko.Channel, command: str, env: Mapping[str, str]) -> None:
        self.command = command
        self.env = dict(env)
        self._channel = channel
        self._lock = threading.Lock()
        self._abandoned = False
        self._finished = False
        self._callbacks: list[Callable[[], None]] = []
        self.helpers: list[threading.Thread] = []

    def start_helper(self, target: Callable[..., object], *args: object) -> threading.Thread:
        """Start a thread for this command that may outlive the handler (e.g. a stdin pump
        still waiting for the client's EOF); the server joins it once the channel is closed."""
        thread = threading.Thread(target=target, args=args, name="ssh-exec-helper", daemon=True)
        self.helpers.append(thread)
        thread.start()
        return thread

    def read_stdin(self, size: int = _CHUNK) -> bytes:
        return self._channel.recv(size)

    def write_stdout(self, data: bytes) -> None:
        self._channel.sendall(data)

    def write_stderr(self, data: bytes) -> None:
        self._channel.sendall_stderr(data)

    @property
    def abandoned(self) -> bool:
        with self._lock:
            return self._abandoned

    def on_abandon(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` when the client goes away early (at once if it already has)."""
        with self._lock:
            if not self._abandoned:
                self._callbacks.append(callback)
                return
        callback()

    def _finish(self) -> None:
        with self._lock:
            self._finished = True
            self._callbacks.clear()

    def _abandon(self) -> None:
        with self._lock:
            if self._abandoned or self._finished:
                return
            self._abandoned = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("abandon callback of %r failed", self.command)


#: Runs one command; returns its exit status.
Handler = Callable[[ExecRequest], int]


def run_shell(request: ExecRequest) -> int:
    """Run ``request.command`` with ``sh -c`` in a new session, wiring the three streams.

    If the client sent environment variables the command gets only those (as the Arvados
    loopback driver does); otherwise it gets a login's (:func:`login_environment`).  A command whose
    client went away gets SIGHUP (its terminal, so to speak, hung up); that ends an abandoned
    ``sleep`` but lets a deliberately detached process (``nohup``, ``setsid``) live on.
    """
    try:
        proc = subprocess.Popen(  # noqa: S603 - running the client's command is the point
            ["sh", "-c", request.command],  # noqa: S607
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=request.env or login_environment(),
            start_new_session=True,
        )
    except OSError as exc:
        request.write_stderr(f"cannot run sh: {exc}\n".encode())
        return 127
    request.on_abandon(lambda: _signal_group(proc, signal.SIGHUP))
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    # The stdin pump is not waited for: a command that never reads stdin must still report
    # its exit as soon as it ends, even to a client that never sends EOF.
    request.start_helper(_pump_stdin, request, proc.stdin)
    errors = request.start_helper(_pump_out, proc.stderr, request.write_stderr)
    _pump_out(proc.stdout, request.write_stdout)
    code = proc.wait()
    errors.join()
    return code if code >= 0 else 128 - code


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


def _pump_stdin(request: ExecRequest, sink: IO[bytes]) -> None:
    """Copy the client's stdin to the command until EOF, then close the command's stdin."""
    try:
        while data := request.read_stdin():
            sink.write(data)
            sink.flush()
    except (OSError, EOFError):
        pass  # the command stopped reading, or the client went away
    finally:
        with contextlib.suppress(OSError):
            sink.close()


def _pump_out(source: IO[bytes], write: Callable[[bytes], None]) -> None:
    """Copy a command's output to the client; keep draining if the client went away."""
    client_gone = False
    fd = source.fileno()
    while data := os.read(fd, _CHUNK):
        if client_gone:
            continue
        try:
            write(data)
        except (OSError, EOFError):
            client_gone = True
    source.close()


# --------------------------------------------------------------------------- paramiko plumbing


def _pump_forward(
    recv: Callable[[int], bytes],
    send: Callable[[bytes], object],
    sock: socket.socket,
    channel: paramiko.Channel,
) -> None:
    """Copy one direction of a forwarded connection; either end closing closes both, so the
    other direction's pump wakes up and ends too."""
    try:
        while data := recv(_CHUNK):
            send(data)
    except (paramiko.SSHException, OSError, EOFError):
        pass
    finally:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        with contextlib.suppress(paramiko.SSHException, OSError, EOFError):
            channel.close()


def _request_then_start(channel: paramiko.Channel, message: paramiko.Message) -> None:
    """Handle a channel request, and start an accepted exec only once its reply is on the wire."""
    paramiko.Channel._handle_request(channel, message)  # type: ignore[attr-defined]
    transport = channel.get_transport()
    if isinstance(transport, _ServerTransport):
        transport.connection.start_pending(channel)


def _close_then_abandon(channel: paramiko.Channel, message: paramiko.Message) -> None:
    """Handle the client's CLOSE, then tell a still-running command its client is gone."""
    paramiko.Channel._handle_close(channel, message)  # type: ignore[attr-defined]
    transport = channel.get_transport()
    if isinstance(transport, _ServerTransport):
        transport.connection.channel_closed(channel)


class _ServerTransport(paramiko.Transport):
    """A server transport with the fixes paramiko needs (see the module docstring)."""

    _channel_handler_table = {
        **paramiko.Transport._channel_handler_table,  # type: ignore[attr-defined]
        MSG_CHANNEL_REQUEST: _request_then_start,
        MSG_CHANNEL_CLOSE: _close_then_abandon,
    }

    def __init__(self, sock: socket.socket, connection: _Connection) -> None:
        super().__init__(sock)
        self.connection = connection

    def _queue_incoming_channel(self, channel: paramiko.Channel) -> None:
        # Instead of paramiko's accept() queue, which must be drained and whose consumer must
        # keep a strong reference: the connection keeps the channel until it closes.
        self.connection.adopt(channel)

    def run(self) -> None:
        try:
            super().run()
        finally:
            self.connection.lost()


class _Connection(paramiko.ServerInterface):
    """One client connection: authentication, its live channels and their commands."""

    def __init__(self, server: LocalSSHServer) -> None:
        self._server = server
        self._lock = threading.Lock()
        self._channels: dict[int, paramiko.Channel] = {}
        self._env: dict[int, dict[str, str]] = {}
        self._pending: dict[int, str] = {}
        self._requests: dict[int, ExecRequest] = {}
        self._forwards: dict[int, socket.socket] = {}  # direct-tcpip channels being opened

    # authentication
    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        if (key.get_name(), key.asbytes()) in self._server.authorized:
            return AUTH_SUCCESSFUL
        return AUTH_FAILED

    # channels
    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            return OPEN_SUCCEEDED
        return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_direct_tcpip_request(
        self, chanid: int, origin: tuple[str, int], destination: tuple[str, int]
    ) -> int:
        """Connect to ``destination`` before answering, so a refused one fails the open (as
        OpenSSH does) instead of opening a channel that closes at once."""
        route = self._server.forward_to
        self._server.forwarded.append(destination)
        where = route(*destination) if route is not None else None
        if where is None:
            return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        host, port = where
        try:
            sock = socket.create_connection((host, port), timeout=10.0)
        except OSError as exc:
            log.info("cannot forward to %s:%s: %s", host, port, exc)
            return OPEN_FAILED_CONNECT_FAILED
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._forwards[chanid] = sock
        return OPEN_SUCCEEDED

    def adopt(self, channel: paramiko.Channel) -> None:
        with self._lock:
            for chanid in [c for c, ch in self._channels.items() if ch.closed]:
                self._forget(chanid)
            self._channels[channel.get_id()] = channel
            sock = self._forwards.pop(channel.get_id(), None)
        if sock is not None:
            self._server.spawn_forward(channel, sock)

    def check_channel_env_request(
        self, channel: paramiko.Channel, name: bytes, value: bytes
    ) -> bool:
        key = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
        val = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        with self._lock:
            self._env.setdefault(channel.get_id(), {})[key] = val
        return True

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        text = command.decode(errors="replace") if isinstance(command, bytes) else str(command)
        with self._lock:
            chanid = channel.get_id()
            if chanid in self._pending or chanid in self._requests:
                return False  # one command per session channel
            self._pending[chanid] = text
        return True

    def start_pending(self, channel: paramiko.Channel) -> None:
        """Start the command accepted on ``channel`` (called after the exec reply was sent)."""
        chanid = channel.get_id()
        with self._lock:
            command = self._pending.pop(chanid, None)
            if command is None:
                return
            request = ExecRequest(channel, self._server.rewrite(command), self._env.get(chanid, {}))
            self._requests[chanid] = request
        self._server.spawn_session(self, channel, request)

    def finished(self, channel: paramiko.Channel) -> None:
        with self._lock:
            self._forget(channel.get_id())

    def channel_closed(self, channel: paramiko.Channel) -> None:
        with self._lock:
            request = self._requests.get(channel.get_id())
        if request is not None:
            request._abandon()

    def lost(self) -> None:
        """The connection ended: every command still running lost its client."""
        with self._lock:
            requests = list(self._requests.values())
        for request in requests:
            request._abandon()
        with self._lock:
            forwards, self._forwards = list(self._forwards.values()), {}
        for sock in forwards:
            sock.close()
        self._server.connection_ended(self)

    def _forget(self, chanid: int) -> None:
        self._channels.pop(chanid, None)
        self._env.pop(chanid, None)
        self._pending.pop(chanid, None)
        self._requests.pop(chanid, None)


class LocalSSHServer:
    """An SSH server on ``bind:port`` (0 = any free port) running commands in this process.

    ``authorized_keys``: OpenSSH public key lines; only these keys may log in (as any user).
    ``handler``: runs one command (default :func:`run_shell`).  ``strip_sudo``: remove a leading
    ``sudo `` from commands, for a server that already runs as the user commands expect.
    ``forward_to``: where a ``direct-tcpip`` channel asking for ``(host, port)`` really goes
    -- the jump host's view of its network -- or None to refuse it (no ``forward_to``: the
    server is no jump host).
    """

    def __init__(
        self,
        host_key: paramiko.PKey,
        authorized_keys: list[str],
        handler: Handler | None = None,
        bind: str = "127.0.0.1",
        port: int = 0,
        *,
        strip_sudo: bool = False,
        forward_to: Callable[[str, int], tuple[str, int] | None] | None = None,
    ) -> None:
        self.host_key = host_key
        self.forward_to = forward_to
        self.authorized = _parse_authorized(authorized_keys)
        self.handler: Handler = handler or run_shell
        self.strip_sudo = strip_sudo
        self._bind = bind
        self._port = port
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._transports: set[_ServerTransport] = set()
        self._sessions: set[threading.Thread] = set()
        self._stopping = False
        self._address = ""
        self.connections_accepted = 0  # TCP connections accepted so far (tests count dials)
        self.forwarded: list[tuple[str, int]] = []  # direct-tcpip destinations asked for

    @property
    def address(self) -> str:
        """``host:port`` once started; ``""`` before."""
        return self._address

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self._bind, self._port))
        listener.listen(64)
        host, port = listener.getsockname()[:2]
        self._listener = listener
        self._address = f"{host}:{port}"
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"ssh-accept-{port}", daemon=True
        )
        self._accept_thread.start()

    def stop(self) -> None:
        """Stop listening, drop every connection, and wait for every thread this server started."""
        with self._lock:
            self._stopping = True
            listener, self._listener = self._listener, None
        if listener is not None:
            # shutdown() wakes a thread blocked in accept(); close() alone does not on Linux.
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join()
        self.drop_connections()
        # Dropping the connections abandoned every running command (run_shell hangs it up).
        with self._lock:
            sessions = list(self._sessions)
        for thread in sessions:
            thread.join(_SESSION_JOIN_TIMEOUT)
            if thread.is_alive():
                log.warning("command thread %s still running after stop()", thread.name)

    def drop_connections(self) -> None:
        """Close every client connection (the server keeps listening): a network failure."""
        with self._lock:
            transports = list(self._transports)
        for transport in transports:
            transport.close()
            if transport is not threading.current_thread():
                transport.join()

    def rewrite(self, command: str) -> str:
        if self.strip_sudo and command.startswith("sudo "):
            return command[len("sudo ") :]
        return command

    # ----------------------------------------------------------------- internals

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return  # stop() shut the listener down
            try:
                self._serve_connection(sock)
            except Exception:
                # A failing handshake must not end the accept loop.
                log.exception("cannot serve SSH connection")
                sock.close()

    def _serve_connection(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection = _Connection(self)
        transport = _ServerTransport(sock, connection)
        transport.set_log_channel("herder.ssh.server.transport")
        transport.add_server_key(self.host_key)
        with self._lock:
            if self._stopping:
                sock.close()
                return
            self._transports.add(transport)
            self.connections_accepted += 1
        # With an event, start_server returns at once and a failed handshake only ends that
        # transport's thread (without one it blocks here and raises).
        transport.start_server(event=threading.Event(), server=connection)

    def connection_ended(self, connection: _Connection) -> None:
        with self._lock:
            self._transports = {t for t in self._transports if t.connection is not connection}

    def spawn_session(
        self, connection: _Connection, channel: paramiko.Channel, request: ExecRequest
    ) -> None:
        thread = threading.Thread(
            target=self._run_session,
            args=(connection, channel, request),
            name=f"ssh-exec-{channel.get_id()}",
            daemon=True,
        )
        with self._lock:
            self._sessions.add(thread)
        thread.start()

    def spawn_forward(self, channel: paramiko.Channel, sock: socket.socket) -> None:
        """Pump bytes both ways between a ``direct-tcpip`` channel and its destination."""

        def pump(recv: Callable[[int], bytes], send: Callable[[bytes], object]) -> None:
            try:
                _pump_forward(recv, send, sock, channel)
            finally:
                with self._lock:
                    self._sessions.discard(threading.current_thread())

        chanid = channel.get_id()
        threads = [
            threading.Thread(
                target=pump, args=(channel.recv, sock.sendall), name=f"ssh-fwd-in-{chanid}"
            ),
            threading.Thread(
                target=pump, args=(sock.recv, channel.sendall), name=f"ssh-fwd-out-{chanid}"
            ),
        ]
        for thread in threads:
            thread.daemon = True
        with self._lock:
            self._sessions.update(threads)
        for thread in threads:
            thread.start()

    def _run_session(
        self, connection: _Connection, channel: paramiko.Channel, request: ExecRequest
    ) -> None:
        try:
            status = self._call_handler(request)
            request._finish()
            send_exit_status(channel, status)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            log.debug("cannot report the exit of %r: %s", request.command, exc)
        finally:
            # Closing also wakes helpers still reading the client's stdin.
            with contextlib.suppress(paramiko.SSHException, OSError, EOFError):
                channel.close()
            for helper in request.helpers:
                helper.join()
            connection.finished(channel)
            with self._lock:
                self._sessions.discard(threading.current_thread())

    def _call_handler(self, request: ExecRequest) -> int:
        try:
            return int(self.handler(request))
        except Exception as exc:
            log.exception("handler failed on %r", request.command)
            with contextlib.suppress(Exception):
                request.write_stderr(f"{exc}\n".encode())
            return 1

    def __enter__(self) -> LocalSSHServer:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

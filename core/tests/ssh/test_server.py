"""The in-process SSH server, exercised with a plain paramiko client over 127.0.0.1."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import paramiko
import pytest

from herder.ssh.server import ExecRequest, LocalSSHServer, generate_key, run_shell


@contextmanager
def serving(**kwargs: object) -> Iterator[tuple[LocalSSHServer, paramiko.PKey]]:
    """A started server with a fresh host key, and a client key it accepts."""
    host_key, _ = generate_key()
    client_key, client_pub = generate_key()
    server = LocalSSHServer(host_key, [client_pub], **kwargs)  # type: ignore[arg-type]
    server.start()
    try:
        yield server, client_key
    finally:
        server.stop()


@contextmanager
def client(server: LocalSSHServer, key: paramiko.PKey) -> Iterator[paramiko.Transport]:
    host, port = server.address.split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    transport = paramiko.Transport(sock)
    try:
        transport.start_client(timeout=10)
        assert transport.get_remote_server_key().asbytes() == server.host_key.asbytes()
        transport.auth_publickey("anyone", key)
        yield transport
    finally:
        transport.close()
        transport.join()


def run(
    transport: paramiko.Transport,
    command: str,
    stdin: bytes = b"",
    env: dict[str, str] | None = None,
) -> tuple[int, bytes, bytes]:
    channel = transport.open_session(timeout=10)
    try:
        if env:
            channel.update_environment(env)
        channel.exec_command(command)
        if stdin:
            channel.sendall(stdin)
        channel.shutdown_write()
        out = b""
        while data := channel.recv(65536):
            out += data
        err = b""
        while data := channel.recv_stderr(65536):
            err += data
        return channel.recv_exit_status(), out, err
    finally:
        channel.close()


def test_runs_commands_with_sh_and_reports_streams_and_status() -> None:
    with serving() as (server, key), client(server, key) as t:
        assert run(t, "echo out; echo err >&2; exit 3") == (3, b"out\n", b"err\n")
        assert run(t, "true") == (0, b"", b"")
        assert run(t, "wc -c", stdin=b"x" * 100_000) == (0, b"100000\n", b"")


def test_killed_command_reports_128_plus_signal() -> None:
    with serving() as (server, key), client(server, key) as t:
        assert run(t, "kill -9 $$")[0] == 137


def test_only_authorized_keys_may_log_in() -> None:
    other, _ = generate_key()
    with (
        serving() as (server, _key),
        pytest.raises(paramiko.AuthenticationException),
        client(server, other),
    ):
        pass


def test_session_env_replaces_the_environment() -> None:
    with serving() as (server, key), client(server, key) as t:
        status, out, _ = run(t, 'echo "$FOO:${HOME-unset}"', env={"FOO": "bar"})
        assert (status, out) == (0, b"bar:unset\n")
        status, out, _ = run(t, 'echo "${HOME:+inherited}"')
        assert out == b"inherited\n"


def test_without_a_session_env_commands_get_a_login_environment_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The dispatcher's secrets (a token from the environment) never reach commands, the runner
    # they start, or its containers.
    monkeypatch.setenv("HERDER_MANAGEMENT_TOKEN", "s3cret-token")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cret-key")
    with serving() as (server, key), client(server, key) as t:
        status, out, _ = run(t, "env")
        assert status == 0
        names = {line.split("=", 1)[0] for line in out.decode().splitlines()}
        assert b"s3cret" not in out
        assert "PATH" in names and "HOME" in names


def test_strip_sudo_removes_a_leading_sudo_only_when_asked() -> None:
    seen: list[str] = []

    def record(request: ExecRequest) -> int:
        seen.append(request.command)
        return 0

    with serving(handler=record, strip_sudo=True) as (server, key), client(server, key) as t:
        run(t, "sudo herder-runner --list")
        run(t, "echo sudo x")
    with serving(handler=record) as (server, key), client(server, key) as t:
        run(t, "sudo true")
    assert seen == ["herder-runner --list", "echo sudo x", "sudo true"]


def test_custom_handler_sees_command_env_and_stdin() -> None:
    def handler(request: ExecRequest) -> int:
        data = b""
        while chunk := request.read_stdin():
            data += chunk
        request.write_stdout(request.command.encode() + b"|" + data)
        request.write_stderr(repr(sorted(request.env.items())).encode())
        return 7

    with serving(handler=handler) as (server, key), client(server, key) as t:
        assert run(t, "cmd", stdin=b"input", env={"A": "1"}) == (
            7,
            b"cmd|input",
            b"[('A', '1')]",
        )


def test_failing_handler_reports_exit_1_and_the_error() -> None:
    def handler(request: ExecRequest) -> int:
        raise RuntimeError("boom")

    with serving(handler=handler) as (server, key), client(server, key) as t:
        assert run(t, "x") == (1, b"", b"boom\n")


def test_many_fast_commands_on_one_connection_from_8_threads() -> None:
    # Without the exec-reply fix a fast command can close its channel before the reply
    # ("Channel closed"); without keeping channels, one is collected while still in use.
    failures: list[BaseException] = []

    def worker(t: paramiko.Transport) -> None:
        try:
            for i in range(25):
                assert run(t, f"echo {i}") == (0, f"{i}\n".encode(), b"")
        except BaseException as exc:
            failures.append(exc)

    with serving() as (server, key), client(server, key) as t:
        threads = [threading.Thread(target=worker, args=(t,)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
        assert server.connections_accepted == 1


def test_instant_handler_never_beats_the_exec_reply() -> None:
    # A handler that answers at once would often send its exit status and close the channel
    # before paramiko's reply to the exec request; the client then fails ("Channel closed").
    def instant(request: ExecRequest) -> int:
        request.write_stdout(request.command.encode())
        return 0

    with serving(handler=instant) as (server, key), client(server, key) as t:
        for i in range(300):
            assert run(t, str(i)) == (0, str(i).encode(), b"")


def test_failed_handshake_does_not_stop_the_accept_loop() -> None:
    with serving() as (server, key):
        host, port = server.address.split(":")
        with socket.create_connection((host, int(port))) as raw:
            raw.sendall(b"this is not ssh\r\n")
            raw.recv(1024)  # server banner
        with socket.create_connection((host, int(port))):
            pass  # connect and hang up at once
        with client(server, key) as t:
            assert run(t, "echo ok") == (0, b"ok\n", b"")


def test_accepted_sockets_have_nodelay() -> None:
    with serving() as (server, key), client(server, key) as t:
        run(t, "true")
        transports = list(server._transports)
        assert transports
        for transport in transports:
            assert transport.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_abandoned_command_is_hung_up() -> None:
    started = threading.Event()
    results: list[int] = []

    def handler(request: ExecRequest) -> int:
        started.set()
        code = run_shell(request)
        results.append(code)
        return code

    with serving(handler=handler) as (server, key), client(server, key) as t:
        channel = t.open_session(timeout=10)
        channel.exec_command("exec sleep 60")
        assert started.wait(10)
        channel.close()
        # stop() joins the command's thread: it returns only once sleep got SIGHUP.
        server.stop()
    assert results == [128 + 1]


def test_dropped_connection_hangs_up_running_commands() -> None:
    started = threading.Event()
    results: list[int] = []

    def handler(request: ExecRequest) -> int:
        started.set()
        code = run_shell(request)
        results.append(code)
        return code

    with serving(handler=handler) as (server, key), client(server, key) as t:
        channel = t.open_session(timeout=10)
        channel.exec_command("exec sleep 60")
        assert started.wait(10)
        t.close()
        server.stop()
    assert results == [129]


def test_stop_leaves_no_threads_behind() -> None:
    before = set(threading.enumerate())
    with serving() as (server, key):
        with client(server, key) as t:
            run(t, "echo hi")
        with client(server, key) as t:
            run(t, "cat", stdin=b"abc")
    leftover = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert leftover == []


def test_address_is_empty_until_started() -> None:
    host_key, _ = generate_key()
    server = LocalSSHServer(host_key, [])
    assert server.address == ""
    server.start()
    try:
        assert server.address.startswith("127.0.0.1:")
        assert int(server.address.split(":")[1]) > 0
    finally:
        server.stop()


def test_invalid_authorized_key_line_is_an_error() -> None:
    host_key, _ = generate_key()
    with pytest.raises(ValueError, match="invalid authorized key"):
        LocalSSHServer(host_key, ["ssh-ed25519"])

"""The SSH executor against the in-process SSH server over 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import paramiko
import pytest

from herder.config import Config
from herder.plugin.cloud import HostKey, HostKeyMismatch, Instance, RemoteRunner
from herder.plugin.executor import ExecutorError, HostKeyError, NoAddressError
from herder.runtime import VirtualRuntime
from herder.ssh import send_eof
from herder.ssh.executor import SSHExecutor, SSHStream, target_host_port
from herder.ssh.server import (
    ExecRequest,
    Handler,
    LocalSSHServer,
    generate_key,
    generate_key_file,
    run_shell,
)

Verifier = Callable[[HostKey, RemoteRunner], None]


def accept_any(key: HostKey, remote: RemoteRunner) -> None:
    return None


class FakeInstance(Instance):
    """An instance reachable at ``address`` whose host-key check is ``verifier``."""

    def __init__(self, address: str, verifier: Verifier | None = accept_any) -> None:
        self._address = address
        self._verifier = verifier
        self.verified: list[HostKey] = []

    @property
    def id(self) -> str:
        return "i-1"

    @property
    def provider_type(self) -> str:
        return "t"

    @property
    def address(self) -> str:
        return self._address

    @property
    def remote_user(self) -> str:
        return "herder"

    @property
    def tags(self) -> dict[str, str]:
        return {}

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def destroy(self) -> None:
        pass

    def verify_host_key(self, key: HostKey, remote: RemoteRunner) -> None:
        self.verified.append(key)
        if self._verifier is None:
            super().verify_host_key(key, remote)
            return
        self._verifier(key, remote)


def only(expected: paramiko.PKey) -> Verifier:
    def verify(key: HostKey, remote: RemoteRunner) -> None:
        if key.blob != expected.asbytes():
            raise HostKeyMismatch("host key mismatch")

    return verify


class Recorder:
    """A handler that records commands and runs them with sh."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.commands: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, request: ExecRequest) -> int:
        with self._lock:
            self.commands.append(request.command)
        if request.command == "whoareyou":
            request.write_stdout(self.name.encode())
            return 0
        return run_shell(request)


@pytest.fixture
def client_key(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "id_ed25519"
    _, public = generate_key_file(path)
    return path, public


@contextmanager
def ssh_server(
    authorized: list[str], handler: Handler | None = None, host_key: paramiko.PKey | None = None
) -> Iterator[LocalSSHServer]:
    server = LocalSSHServer(host_key or generate_key()[0], authorized, handler)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def make_config(key_path: Path | str, **cloud: object) -> Config:
    return Config.model_validate(
        {"containers": {"dispatch_private_key": str(key_path)}, "cloud": cloud}
    )


@contextmanager
def executor_for(
    instance: Instance, key_path: Path | str, **cloud: object
) -> Iterator[SSHExecutor]:
    executor = SSHExecutor(instance, make_config(key_path, **cloud), VirtualRuntime())
    try:
        yield executor
    finally:
        executor.close()


@pytest.fixture
def env(client_key: tuple[Path, str]) -> Iterator[tuple[LocalSSHServer, SSHExecutor, Recorder]]:
    """A server, an executor connected to it (lazily), and the server's command log."""
    path, public = client_key
    recorder = Recorder()
    with (
        ssh_server([public], recorder) as server,
        executor_for(FakeInstance(server.address), path) as executor,
    ):
        yield server, executor, recorder


# --------------------------------------------------------------------------- running commands


def test_exit_status_and_separate_streams(
    env: tuple[LocalSSHServer, SSHExecutor, Recorder],
) -> None:
    _, executor, _ = env
    result = executor.execute("echo out; echo err >&2; exit 3")
    assert (result.exit_status, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
    assert not result.ok
    assert executor.execute("true").ok


def test_one_megabyte_of_stdin_arrives_intact_and_fast(
    env: tuple[LocalSSHServer, SSHExecutor, Recorder],
) -> None:
    _, executor, _ = env
    data = os.urandom(1 << 20)
    started = time.monotonic()
    result = executor.execute("sha256sum", stdin=data, timeout=20)
    assert result.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    echoed = executor.execute("cat", stdin=data, timeout=20)
    assert echoed.stdout == data
    # invoke's per-byte stdin pump would need hours for this; direct writes take milliseconds.
    assert time.monotonic() - started < 10


def test_env_vars_are_sent(env: tuple[LocalSSHServer, SSHExecutor, Recorder]) -> None:
    _, executor, _ = env
    assert executor.execute('echo "$A $B"', env={"A": "1", "B": "two"}).stdout == b"1 two\n"


def test_concurrent_commands_share_one_connection(
    env: tuple[LocalSSHServer, SSHExecutor, Recorder],
) -> None:
    server, executor, _ = env
    failures: list[BaseException] = []
    go = threading.Barrier(8)

    def worker(n: int) -> None:
        try:
            go.wait()  # all threads find no connection at once: only one may dial
            for i in range(10):
                result = executor.execute(f"echo {n}-{i}")
                assert result.stdout == f"{n}-{i}\n".encode()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert server.connections_accepted == 1


def test_reconnects_after_the_server_drops_the_connection(
    env: tuple[LocalSSHServer, SSHExecutor, Recorder],
) -> None:
    server, executor, _ = env
    assert executor.execute("echo a").stdout == b"a\n"
    server.drop_connections()
    assert executor.execute("echo b").stdout == b"b\n"
    assert server.connections_accepted == 2


def test_timeout_on_a_hanging_command(env: tuple[LocalSSHServer, SSHExecutor, Recorder]) -> None:
    _, executor, _ = env
    executor.execute("true")  # connect first: the timeout bounds the command
    started = time.monotonic()
    with pytest.raises(ExecutorError, match=r"timed out after 0\.5s"):
        executor.execute("sleep 5", timeout=0.5)
    assert time.monotonic() - started < 2.0
    assert executor.execute("echo still usable").ok


def test_default_timeout_comes_from_config(client_key: tuple[Path, str]) -> None:
    path, public = client_key
    with (
        ssh_server([public]) as server,
        executor_for(FakeInstance(server.address), path, timeout_command="0.3s") as executor,
        pytest.raises(ExecutorError, match=r"timed out after 0\.3s"),
    ):
        executor.execute("sleep 5")


def test_close_then_execute_reconnects(env: tuple[LocalSSHServer, SSHExecutor, Recorder]) -> None:
    server, executor, _ = env
    executor.execute("true")
    executor.close()
    executor.close()  # twice is fine
    assert executor.execute("echo again").stdout == b"again\n"
    assert server.connections_accepted == 2


def test_set_target_does_not_wait_for_running_commands(client_key: tuple[Path, str]) -> None:
    path, public = client_key
    entered, release = threading.Event(), threading.Event()

    def blocking(request: ExecRequest) -> int:
        entered.set()
        release.wait(10)
        return 0

    with (
        ssh_server([public], blocking) as server,
        executor_for(FakeInstance(server.address), path) as executor,
    ):
        runner = threading.Thread(target=executor.execute, args=("block",))
        runner.start()
        assert entered.wait(10)
        replacement = FakeInstance(server.address)
        executor.set_target(replacement)  # must return while the command is still running
        assert executor.target is replacement
        release.set()
        runner.join()


# --------------------------------------------------------------------------- connection failures


def test_wrong_client_key_is_refused(client_key: tuple[Path, str]) -> None:
    path, _ = client_key
    _, other_public = generate_key()
    with (
        ssh_server([other_public]) as server,
        executor_for(FakeInstance(server.address), path) as executor,
    ):
        with pytest.raises(ExecutorError, match="failed") as info:
            executor.execute("true")
        assert not isinstance(info.value, HostKeyError)


def test_no_address_raises_no_address_error(client_key: tuple[Path, str]) -> None:
    path, public = client_key
    with executor_for(FakeInstance(""), path) as executor:
        with pytest.raises(NoAddressError):
            executor.execute("true")
        with ssh_server([public]) as server:
            executor.set_target(FakeInstance(server.address))
            assert executor.execute("echo up").stdout == b"up\n"


def test_connection_refused_is_an_executor_error(client_key: tuple[Path, str]) -> None:
    path, public = client_key
    with ssh_server([public]) as server:
        address = server.address
    with (
        executor_for(FakeInstance(address), path) as executor,
        pytest.raises(ExecutorError, match="cannot connect"),
    ):
        executor.execute("true")


def test_port_defaults_to_cloud_ssh_port(client_key: tuple[Path, str]) -> None:
    path, public = client_key
    with ssh_server([public]) as server:
        host, port = server.address.split(":")
        with executor_for(FakeInstance(host), path, ssh_port=int(port)) as executor:
            assert executor.execute("echo p").stdout == b"p\n"


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("10.0.0.1", ("10.0.0.1", 2222)),
        ("10.0.0.1:22", ("10.0.0.1", 22)),
        ("host.example:", ("host.example", 2222)),
        ("[fd00::1]:2200", ("fd00::1", 2200)),
        ("[fd00::1]", ("fd00::1", 2222)),
        ("fd00::1", ("fd00::1", 2222)),
    ],
)
def test_target_host_port(address: str, expected: tuple[str, int]) -> None:
    assert target_host_port(address, 2222) == expected


def test_target_host_port_errors() -> None:
    with pytest.raises(NoAddressError):
        target_host_port("", 22)
    with pytest.raises(ExecutorError, match="invalid port"):
        target_host_port("host:ssh", 22)


# --------------------------------------------------------------------------- private key


def test_missing_private_key_is_a_clear_error_at_construction(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ExecutorError, match=f"{missing}: file not found"):
        SSHExecutor(FakeInstance("127.0.0.1"), make_config(missing), VirtualRuntime())


def test_unconfigured_private_key_is_a_clear_error() -> None:
    with pytest.raises(ExecutorError, match="dispatch_private_key"):
        SSHExecutor(FakeInstance("127.0.0.1"), make_config(""), VirtualRuntime())


def test_unreadable_private_key_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ExecutorError, match=f"{tmp_path}: "):
        SSHExecutor(FakeInstance("127.0.0.1"), make_config(tmp_path), VirtualRuntime())
    if os.geteuid() != 0:  # root reads files whatever their mode
        path = tmp_path / "key"
        generate_key_file(path)
        path.chmod(0)
        with pytest.raises(ExecutorError, match=f"{path}: not readable"):
            SSHExecutor(FakeInstance("127.0.0.1"), make_config(path), VirtualRuntime())


def test_a_file_that_is_not_a_key_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text("hello\n")
    with pytest.raises(ExecutorError, match=f"{path}: not a usable private key"):
        SSHExecutor(FakeInstance("127.0.0.1"), make_config(path), VirtualRuntime())


# --------------------------------------------------------------------------- host keys


def test_verified_host_key_is_checked_once(client_key: tuple[Path, str]) -> None:
    path, public = client_key
    host_key, _ = generate_key()
    recorder = Recorder()
    with ssh_server([public], recorder, host_key) as server:
        instance = FakeInstance(server.address, only(host_key))
        with executor_for(instance, path) as executor:
            executor.execute("true")
            executor.execute("true")
            server.drop_connections()
            executor.execute("true")  # same key on reconnect: no new check
        assert instance.verified == [HostKey("ssh-ed25519", host_key.asbytes())]
        assert server.connections_accepted == 2


def test_verifier_can_run_commands_on_the_new_connection(client_key: tuple[Path, str]) -> None:
    path, public = client_key
    outputs: list[tuple[int, bytes, bytes]] = []

    def read_secret(key: HostKey, remote: RemoteRunner) -> None:
        outputs.append(remote.run("cat", stdin=b"s3cret", timeout=5))

    with (
        ssh_server([public]) as server,
        executor_for(FakeInstance(server.address, read_secret), path) as executor,
    ):
        assert executor.execute("echo hi").stdout == b"hi\n"
    assert outputs == [(0, b"s3cret", b"")]


def test_host_key_mismatch_refuses_the_connection(client_key: tuple[Path, str]) -> None:
    path, public = client_key
    recorder = Recorder()
    runners: list[RemoteRunner] = []

    def refuse(key: HostKey, remote: RemoteRunner) -> None:
        runners.append(remote)
        raise HostKeyMismatch("not the instance's key")

    with (
        ssh_server([public], recorder) as server,
        executor_for(FakeInstance(server.address, refuse), path) as executor,
    ):
        with pytest.raises(HostKeyError, match="not the instance's key"):
            executor.execute("touch /tmp/should-not-run")
        assert recorder.commands == []
        # The refused connection is closed, not leaked (unlike SPEC §19 item 30).
        assert runners and not runners[0]._transport.is_active()  # type: ignore[attr-defined]
        with pytest.raises(HostKeyError):
            executor.execute("true")  # still refused: never remembered as verified
    assert recorder.commands == []


def test_driver_without_host_key_support_is_an_error(client_key: tuple[Path, str]) -> None:
    path, public = client_key
    recorder = Recorder()
    with (
        ssh_server([public], recorder) as server,
        executor_for(FakeInstance(server.address, verifier=None), path) as executor,
        pytest.raises(HostKeyError, match="cannot verify the host key"),
    ):
        executor.execute("true")
    assert recorder.commands == []


def test_changed_host_key_on_reconnect_is_verified_again_and_refused(
    client_key: tuple[Path, str],
) -> None:
    path, public = client_key
    key_a, _ = generate_key()
    key_b, _ = generate_key()
    server_a_log, server_b_log = Recorder("a"), Recorder("b")
    with (
        ssh_server([public], server_a_log, key_a) as server_a,
        ssh_server([public], server_b_log, key_b) as server_b,
    ):
        instance = FakeInstance(server_a.address, only(key_a))
        with executor_for(instance, path) as executor:
            assert executor.execute("whoareyou").stdout == b"a"
            # The same VM, now answering (say, after a re-image) with another host key.
            moved = FakeInstance(server_b.address, only(key_a))
            executor.set_target(moved)
            assert executor.execute("whoareyou").stdout == b"a"  # next connection only
            server_a.drop_connections()
            with pytest.raises(HostKeyError, match="did not verify"):
                executor.execute("whoareyou")
        assert moved.verified == [HostKey("ssh-ed25519", key_b.asbytes())]
    assert server_b_log.commands == []


def test_changed_host_key_that_verifies_is_accepted(client_key: tuple[Path, str]) -> None:
    path, public = client_key
    key_a, _ = generate_key()
    key_b, _ = generate_key()
    with (
        ssh_server([public], Recorder("a"), key_a) as server_a,
        ssh_server([public], Recorder("b"), key_b) as server_b,
    ):
        instance = FakeInstance(server_a.address)
        moved = FakeInstance(server_b.address)
        with executor_for(instance, path) as executor:
            assert executor.execute("whoareyou").stdout == b"a"
            executor.set_target(moved)
            server_a.drop_connections()
            assert executor.execute("whoareyou").stdout == b"b"
        assert instance.verified == [HostKey("ssh-ed25519", key_a.asbytes())]
        assert moved.verified == [HostKey("ssh-ed25519", key_b.asbytes())]


def test_failed_redial_keeps_the_old_connection(
    env: tuple[LocalSSHServer, SSHExecutor, Recorder],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, executor, _ = env
    executor.execute("true")
    old = executor._transport
    assert old is not None
    with ssh_server([]) as gone:
        dead_address = gone.address
    executor.set_target(FakeInstance(dead_address))
    with monkeypatch.context() as patch:
        patch.setattr(old, "open_session", _refuse_session)
        with pytest.raises(ExecutorError, match="cannot connect"):
            executor.execute("true")
    assert executor._transport is old and old.is_active()
    assert executor.execute("echo old").stdout == b"old\n"
    assert server.connections_accepted == 1


def _refuse_session(timeout: float | None = None) -> paramiko.Channel:
    raise paramiko.SSHException("administratively prohibited")


def test_failing_to_run_the_check_is_not_a_key_verdict(client_key: tuple[Path, str]) -> None:
    path, public = client_key

    def slow_check(key: HostKey, remote: RemoteRunner) -> None:
        remote.run("sleep 5", timeout=0.2)

    with (
        ssh_server([public]) as server,
        executor_for(FakeInstance(server.address, slow_check), path) as executor,
    ):
        with pytest.raises(ExecutorError, match="timed out") as info:
            executor.execute("true")
        assert not isinstance(info.value, HostKeyError)


def test_refused_host_key_is_logged(
    client_key: tuple[Path, str], caplog: pytest.LogCaptureFixture
) -> None:
    path, public = client_key
    wrong, _ = generate_key()
    with (
        ssh_server([public]) as server,
        executor_for(FakeInstance(server.address, only(wrong)), path) as executor,
        pytest.raises(HostKeyError),
    ):
        executor.execute("true")
    assert any(
        r.levelname == "WARNING" and "refusing SSH connection" in r.getMessage()
        for r in caplog.records
    )


def test_no_eof_is_sent_on_a_closed_channel(
    env: tuple[LocalSSHServer, SSHExecutor, Recorder],
) -> None:
    # An EOF sent after our CLOSE makes OpenSSH drop the whole connection.
    _, executor, _ = env
    executor.execute("true")
    transport = executor._transport
    assert transport is not None
    channel = transport.open_session(timeout=5)
    channel.exec_command("true")
    channel.recv_exit_status()
    channel.close()
    assert send_eof(channel) is False
    open_channel = transport.open_session(timeout=5)
    open_channel.exec_command("cat")
    assert send_eof(open_channel) is True
    assert send_eof(open_channel) is False  # only once
    assert open_channel.recv_exit_status() == 0
    open_channel.close()


# --------------------------------------------------------------------------- streams


def test_a_stream_exchanges_lines_with_a_running_command(
    env: tuple[LocalSSHServer, SSHExecutor, Recorder],
) -> None:
    server, executor, _ = env
    stream = executor.open_stream('while read -r line; do echo "got $line"; done', 10)
    try:
        for word in ("one", "two", "three"):
            stream.send(word.encode() + b"\n", 10)
            assert stream.receive_line(10) == b"got " + word.encode()
        stream.send(b"a\nb\n", 10)  # two lines in one write, read back one at a time
        assert (stream.receive_line(10), stream.receive_line(10)) == (b"got a", b"got b")
        # Commands still run beside the stream, on the same connection.
        assert executor.execute("echo beside").stdout == b"beside\n"
        assert server.connections_accepted == 1
    finally:
        stream.close()


def test_a_stream_whose_command_ends_raises(
    env: tuple[LocalSSHServer, SSHExecutor, Recorder],
) -> None:
    _, executor, _ = env
    stream = executor.open_stream("read -r line; echo partial-no-newline >&2; exit 0", 10)
    stream.send(b"x\n", 10)
    with pytest.raises(ExecutorError, match="stream ended"):
        stream.receive_line(10)
    stream.close()
    stream.close()  # idempotent


def test_an_idle_reader_sees_lots_of_stderr_without_waiting_for_stdout(
    env: tuple[LocalSSHServer, SSHExecutor, Recorder],
) -> None:
    """More stderr than the channel's window, then a line: the reader, waiting for that line
    without a deadline, must drain stderr as it comes or the command stalls for good."""
    _, executor, _ = env
    command = "read -r go; head -c 4000000 /dev/zero | tr '\\0' x >&2; echo done"
    stream = executor.open_stream(command, 10)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(stream.receive_line(None)))
    reader.start()
    try:
        stream.send(b"go\n", 10)
        reader.join(30)
        assert got == [b"done"]
    finally:
        stream.close()
        reader.join(30)


def test_closing_a_stream_ends_its_idle_reader(
    env: tuple[LocalSSHServer, SSHExecutor, Recorder],
) -> None:
    """A reader without a deadline, waiting or about to wait, ends when the stream is closed,
    not IDLE_POLL later (longer than this test may take)."""
    _, executor, _ = env
    stream = executor.open_stream("cat", 10)
    assert SSHStream.IDLE_POLL >= 30
    stream.send(b"first\n", 10)
    assert stream.receive_line(10) == b"first"
    errors: list[ExecutorError] = []

    def read() -> None:
        try:
            stream.receive_line(None)
        except ExecutorError as exc:
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    stream.close()
    reader.join(20)
    assert not reader.is_alive()
    assert len(errors) == 1


def test_a_silent_stream_times_out(env: tuple[LocalSSHServer, SSHExecutor, Recorder]) -> None:
    _, executor, _ = env
    stream = executor.open_stream("sleep 5", 10)
    started = time.monotonic()
    with pytest.raises(ExecutorError, match="no answer"):
        stream.receive_line(0.3)
    assert time.monotonic() - started < 2.0
    stream.close()


def test_a_dropped_connection_ends_the_stream(
    env: tuple[LocalSSHServer, SSHExecutor, Recorder],
) -> None:
    server, executor, _ = env
    stream = executor.open_stream("cat", 10)
    stream.send(b"hello\n", 10)
    assert stream.receive_line(10) == b"hello"
    server.drop_connections()
    with pytest.raises(ExecutorError):
        stream.send(b"again\n", 10)
        stream.receive_line(10)
    stream.close()


def test_writing_to_a_stream_whose_command_ended_fails_at_once(
    env: tuple[LocalSSHServer, SSHExecutor, Recorder],
) -> None:
    _, executor, _ = env
    stream = executor.open_stream("exit 0", 10)
    with pytest.raises(ExecutorError, match="stream ended"):
        stream.receive_line(10)
    with pytest.raises(ExecutorError, match="stream ended"):
        stream.send(b"anyone there?\n", 10)
    stream.close()


def test_the_shared_watchdog_fires_due_deadlines_and_forgets_cancelled_ones() -> None:
    from herder.ssh.executor import _Watchdog

    watchdog = _Watchdog()
    fired: list[str] = []
    done = threading.Event()
    later = watchdog.watch(3600.0, lambda: fired.append("later"))
    cancelled = watchdog.watch(3600.0, lambda: fired.append("cancelled"))
    watchdog.cancel(cancelled)
    assert [entry[1] for entry in watchdog._due] == [later]
    # An earlier deadline added after a later one wakes the sleeping thread.
    watchdog.watch(0.0, lambda: (fired.append("due"), done.set()))
    assert done.wait(30)
    assert fired == ["due"]
    watchdog.cancel(later)
    assert watchdog._due == []

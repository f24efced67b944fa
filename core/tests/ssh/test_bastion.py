"""The SSH executor reaching instances through a bastion (jump host), all on 127.0.0.0/8.

The instance's address is ``127.0.0.3:<port where nothing listens>``: only the bastion knows
that it leads to the real instance server, so a command that succeeds went through it.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from herder.config import config_from_data
from herder.plugin.executor import ExecutorError, HostKeyError
from herder.ssh.bastion import (
    Bastion,
    BastionError,
    bastion_for,
    close_shared_bastions,
    expand_proxy_command,
)
from herder.ssh.executor import SSHExecutor
from herder.ssh.server import LocalSSHServer, generate_key, generate_key_file

from .test_executor import (
    FakeInstance,
    Verifier,
    accept_any,
    executor_for,
    make_config,
    only,
    ssh_server,
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Network:
    """Instance servers, a bastion that routes private addresses to them, and the keys."""

    def __init__(self, tmp_path: Path) -> None:
        self.key_path = tmp_path / "id_ed25519"
        _, self.public = generate_key_file(self.key_path)
        self.bastion_key, self.bastion_key_line = generate_key()
        self.routes: dict[tuple[str, int], tuple[str, int]] = {}
        self.bastion_port = free_port()
        self.bastion: LocalSSHServer | None = None

    def route(self, host: str, port: int) -> tuple[str, int] | None:
        return self.routes.get((host, port))

    def start_bastion(self) -> LocalSSHServer:
        server = LocalSSHServer(
            self.bastion_key, [self.public], port=self.bastion_port, forward_to=self.route
        )
        server.start()
        self.bastion = server
        return server

    def stop_bastion(self) -> None:
        if self.bastion is not None:
            self.bastion.stop()
            self.bastion = None

    def hide(self, server: LocalSSHServer) -> str:
        """A private address for ``server`` that only the bastion can reach."""
        host, port = server.address.rsplit(":", 1)
        private = ("127.0.0.3", free_port())
        self.routes[private] = (host, int(port))
        return f"{private[0]}:{private[1]}"

    def settings(self, **ssh: object) -> dict[str, object]:
        base: dict[str, object] = {
            "bastion_host": "127.0.0.1",
            "bastion_port": self.bastion_port,
            "bastion_host_key": self.bastion_key_line,
            "connect_timeout": 10,
        }
        base.update(ssh)
        return {"ssh": base}


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Network]:
    network = Network(tmp_path)
    network.start_bastion()
    try:
        yield network
    finally:
        close_shared_bastions()
        network.stop_bastion()


@contextmanager
def through(net: Network, instance: FakeInstance, **ssh: object) -> Iterator[SSHExecutor]:
    with executor_for(instance, net.key_path, **net.settings(**ssh)) as executor:
        yield executor


@contextmanager
def behind(
    net: Network, verifier: Verifier | None = accept_any, **ssh: object
) -> Iterator[tuple[FakeInstance, SSHExecutor]]:
    """An instance server reachable only through the bastion, and an executor for it."""
    with ssh_server([net.public]) as server:
        instance = FakeInstance(net.hide(server), verifier)
        with through(net, instance, **ssh) as executor:
            yield instance, executor


def test_commands_and_stdin_go_through_the_bastion(net: Network) -> None:
    with behind(net) as (_, executor):
        assert executor.execute("echo hi").stdout == b"hi\n"
        data = os.urandom(1 << 20)
        result = executor.execute("sha256sum", stdin=data, timeout=20)
        assert result.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
        report = executor.last_connect
        assert report is not None
        assert report.bastion.endswith(f"@127.0.0.1:{net.bastion_port}")
        assert [hop.name.split()[0] for hop in report.hops] == ["bastion", "instance"]
        assert "through bastion" in report.describe()


def test_resident_stream_goes_through_the_bastion(net: Network) -> None:
    with behind(net) as (_, executor):
        stream = executor.open_stream("while read l; do echo got $l; done", 10)
        try:
            stream.send(b"one\n", 5)
            assert stream.receive_line(5) == b"got one"
        finally:
            stream.close()


def test_instances_share_one_bastion_connection(net: Network) -> None:
    with behind(net) as (_, a), behind(net) as (_, b):
        assert a.execute("true").ok and b.execute("true").ok
    assert net.bastion is not None
    assert net.bastion.connections_accepted == 1


def test_wrong_instance_host_key_behind_a_good_bastion_is_refused(net: Network) -> None:
    expected, _ = generate_key()
    with behind(net, only(expected)) as (instance, executor):
        with pytest.raises(HostKeyError):
            executor.execute("touch should-not-run")
        assert instance.verified  # the check ran, on herder's own rules


def test_bastion_with_an_unknown_host_key_is_refused(net: Network, tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    ssh = {"bastion_host_key": "", "known_hosts_file": str(known_hosts)}
    with (
        behind(net, **ssh) as (instance, executor),
        pytest.raises(BastionError, match="host key unknown"),
    ):
        executor.execute("true")
    assert instance.verified == []


def test_bastion_with_a_different_host_key_is_refused(net: Network) -> None:
    _, other_line = generate_key()
    with (
        behind(net, bastion_host_key=other_line) as (_, executor),
        pytest.raises(BastionError, match="does not match"),
    ):
        executor.execute("true")


def test_bastion_refusing_the_login_is_a_clear_error(net: Network, tmp_path: Path) -> None:
    other_key = tmp_path / "other_key"
    generate_key_file(other_key)
    with (
        behind(net, bastion_key_file=str(other_key)) as (instance, executor),
        pytest.raises(BastionError, match=r"bastion .*@127\.0\.0\.1:\d+: refused the login"),
    ):
        executor.execute("true")
    assert instance.verified == []


def test_bastion_host_key_from_known_hosts(net: Network, tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{net.bastion_port} {net.bastion_key_line}\n")
    ssh = {"bastion_host_key": "", "known_hosts_file": str(known_hosts)}
    with behind(net, **ssh) as (_, executor):
        assert executor.execute("echo ok").stdout == b"ok\n"


def test_unreachable_instance_is_the_instances_error_not_the_bastions(net: Network) -> None:
    net.routes[("127.0.0.3", 1)] = ("127.0.0.1", free_port())  # nothing listens there
    with (
        through(net, FakeInstance("127.0.0.3:1")) as executor,
        pytest.raises(ExecutorError, match=r"cannot reach 127\.0\.0\.3:1") as caught,
    ):
        executor.execute("true")
    assert not isinstance(caught.value, BastionError)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def shared_bastion(net: Network) -> Bastion:
    config = make_config(net.key_path, **net.settings())
    bastion = bastion_for(config.cloud.ssh, str(net.key_path), "127.0.0.3", 1)
    assert bastion is not None
    return bastion


def test_bastion_that_goes_away_backs_off_and_comes_back(net: Network) -> None:
    with behind(net) as (_, executor):
        clock = FakeClock()
        shared_bastion(net).clock = clock
        assert executor.execute("true").ok

        net.stop_bastion()
        with pytest.raises(BastionError, match=f"127.0.0.1:{net.bastion_port}"):
            executor.execute("true")
        # Within the back-off nobody dials the bastion, however many probes come.
        with pytest.raises(BastionError, match="next attempt in 1s"):
            executor.execute("true")
        clock.now += 1.5
        with pytest.raises(BastionError):
            executor.execute("true")  # still down: the pause doubles
        with pytest.raises(BastionError, match="next attempt in 2s"):
            executor.execute("true")

        bastion = net.start_bastion()
        with pytest.raises(BastionError, match="next attempt"):
            executor.execute("true")
        assert bastion.connections_accepted == 0
        clock.now += 2.5
        deadline = time.monotonic() + 20
        while True:
            try:
                assert executor.execute("echo back").stdout == b"back\n"
                break
            except ExecutorError:
                if time.monotonic() > deadline:
                    raise
        assert bastion.connections_accepted == 1


def test_bastion_dropping_its_connections_is_survived(net: Network) -> None:
    with behind(net) as (_, executor):
        clock = FakeClock()
        shared_bastion(net).clock = clock
        assert executor.execute("true").ok
        assert net.bastion is not None
        net.bastion.drop_connections()
        deadline = time.monotonic() + 20
        # An attempt right after the drop may find the dead connection and start a
        # back-off; past it (the fake clock jumps), the bastion is reached again.
        while True:
            try:
                assert executor.execute("echo again").stdout == b"again\n"
                break
            except ExecutorError:
                if time.monotonic() > deadline:
                    raise
                clock.now += 120.0
        assert net.bastion.connections_accepted == 2


def test_proxyjump_from_an_openssh_config(
    net: Network, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{net.bastion_port} {net.bastion_key_line}\n")
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text(
        "Host 127.0.0.3\n"
        f"    ProxyJump jumper@127.0.0.1:{net.bastion_port}\n"
        "Host 127.0.0.1\n"
        f"    IdentityFile {net.key_path}\n"
        "    IdentitiesOnly yes\n"
    )
    with ssh_server([net.public]) as instance_server:
        instance = FakeInstance(net.hide(instance_server))
        ssh = {
            "use_ssh_config": True,
            "ssh_config_file": str(ssh_config),
            "known_hosts_file": str(known_hosts),
            "connect_timeout": 10,
        }
        with executor_for(instance, net.key_path, ssh=ssh) as executor:
            assert executor.execute("echo jumped").stdout == b"jumped\n"
            assert executor.last_connect is not None
            assert executor.last_connect.bastion == f"jumper@127.0.0.1:{net.bastion_port}"


def test_openssh_config_without_proxyjump_connects_directly(net: Network, tmp_path: Path) -> None:
    path, public = net.key_path, net.public
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text("Host elsewhere\n    ProxyJump nobody@127.0.0.1:1\n")
    ssh = {"use_ssh_config": True, "ssh_config_file": str(ssh_config)}
    with (
        ssh_server([public]) as server,
        executor_for(FakeInstance(server.address), path, ssh=ssh) as executor,
    ):
        assert executor.execute("true").ok
        assert executor.last_connect is not None
        assert executor.last_connect.bastion == ""


# A netcat in Python: records the words it was given, then joins its stdin and stdout to
# 127.0.0.1 at the given port (the "private" host in the first word only goes in the record).
NETCAT = """
import os, socket, sys, threading
host, port, record = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with open(record, "a") as f:
    f.write(" ".join(sys.argv[1:3]) + "\\n")
sock = socket.create_connection(("127.0.0.1", port))
def up():
    while data := os.read(0, 65536):
        sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
threading.Thread(target=up, daemon=True).start()
while data := sock.recv(65536):
    os.write(1, data)
"""


def proxy_config(tmp_path: Path, proxy_line: str) -> tuple[dict[str, object], Path]:
    """``use_ssh_config`` settings whose config reaches 127.0.0.3 through ``proxy_line``,
    where ``{netcat}`` and ``{record}`` name the script above and the file it writes."""
    netcat, record = tmp_path / "netcat.py", tmp_path / "proxied"
    netcat.write_text(NETCAT)
    ssh_config = tmp_path / "ssh_config"
    line = proxy_line.format(netcat=f"{sys.executable} {netcat}", record=record)
    ssh_config.write_text(f"Host 127.0.0.3\n    ProxyCommand {line}\n")
    ssh = {"use_ssh_config": True, "ssh_config_file": str(ssh_config), "connect_timeout": 10}
    return ssh, record


def test_proxycommand_from_an_openssh_config(tmp_path: Path) -> None:
    key_path = tmp_path / "id_ed25519"
    _, public = generate_key_file(key_path)
    ssh, record = proxy_config(tmp_path, "exec {netcat} %h %p {record}")
    with ssh_server([public]) as server:
        port = int(server.address.rsplit(":", 1)[1])
        # Only the proxy can reach it: the server listens on 127.0.0.1, not 127.0.0.3.
        instance = FakeInstance(f"127.0.0.3:{port}", only(server.host_key))
        with executor_for(instance, key_path, ssh=ssh) as executor:
            assert executor.execute("echo proxied").stdout == b"proxied\n"
            data = os.urandom(1 << 18)
            result = executor.execute("sha256sum", stdin=data, timeout=20)
            assert result.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
            report = executor.last_connect
            assert report is not None
            assert report.bastion.startswith("exec ")
            assert [hop.name.split()[0] for hop in report.hops] == ["proxy", "instance"]
        # %h and %p were the instance's host and port (not the config's default port 22).
        assert record.read_text() == f"127.0.0.3 {port}\n"


def test_proxycommand_connection_closes_with_its_process(tmp_path: Path) -> None:
    key_path = tmp_path / "id_ed25519"
    _, public = generate_key_file(key_path)
    ssh, _ = proxy_config(tmp_path, "{netcat} %h %p {record}")
    with ssh_server([public]) as server:
        port = int(server.address.rsplit(":", 1)[1])
        with executor_for(FakeInstance(f"127.0.0.3:{port}"), key_path, ssh=ssh) as executor:
            assert executor.execute("true").ok
            transport = executor._transport
            assert transport is not None
            sock = transport.sock
            assert isinstance(sock, socket.socket)
            process = getattr(sock, "process", None)
            assert process is not None and process.poll() is None
        # executor.close() hung up: the proxy process was ended and reaped, not left behind.
        assert process.returncode is not None


def test_proxycommand_refuses_hosts_that_are_not_plain_names(tmp_path: Path) -> None:
    key_path = tmp_path / "id_ed25519"
    generate_key_file(key_path)
    ssh, record = proxy_config(tmp_path, "{netcat} %h %p {record}")
    config = tmp_path / "ssh_config"
    config.write_text("Host *\n" + config.read_text().split("\n", 1)[1])
    for address in ("127.0.0.3;touch {0}:22", "$(touch {0}):22", "-oProxyCommand=x:22"):
        evil = address.format(tmp_path / "pwned")
        with (
            executor_for(FakeInstance(evil), key_path, ssh=ssh) as executor,
            pytest.raises(ExecutorError, match="refusing to put host"),
        ):
            executor.execute("true")
    assert not record.exists() and not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("ssh -W %h:%p jump", ["ssh", "-W", "10.0.0.5:2222", "jump"]),
        ("exec nc %h %p", ["nc", "10.0.0.5", "2222"]),
        ("connect '%h port %p' 100%%", ["connect", "10.0.0.5 port 2222", "100%"]),
        ("proxy --user=%r --as %n", ["proxy", "--user=crunch", "--as", "inst-5"]),
    ],
)
def test_proxycommand_tokens_expand_inside_words(line: str, words: list[str]) -> None:
    got = expand_proxy_command(line, host="10.0.0.5", original="inst-5", port=2222, user="crunch")
    assert got == words


def test_proxycommand_unknown_token_is_an_error() -> None:
    with pytest.raises(ExecutorError, match="%C"):
        expand_proxy_command("proxy %C", host="h", original="h", port=22, user="u")


@pytest.mark.parametrize(
    ("ssh", "key"),
    [
        ({"bastion_host": "jump", "use_ssh_config": True}, "cloud.ssh.use_ssh_config"),
        ({"bastion_host_key": "AAAA"}, "cloud.ssh.bastion_host_key"),
        ({"bastion_host": "me@jump"}, "cloud.ssh.bastion_host"),
        ({"bastion_hots": "jump"}, "cloud.ssh.bastion_hots"),
        ({"connect_timeout": "0s"}, "cloud.ssh.connect_timeout"),
    ],
)
def test_config_errors_name_the_key(ssh: dict[str, object], key: str) -> None:
    config, problems = config_from_data({"cloud": {"ssh": ssh}})
    assert config is None
    assert any(key in problem.format() for problem in problems), problems


def test_the_core_readme_bastion_examples_are_valid_config() -> None:
    readme = Path(__file__).resolve().parents[2] / "README.md"
    blocks = re.findall(r"```yaml\n(.*?)```", readme.read_text(), re.S)
    assert len(blocks) == 2
    for block in blocks:
        config, problems = config_from_data(yaml.safe_load(block))
        assert config is not None, problems


def test_a_second_close_of_a_proxy_socket_waits_for_the_command_to_be_reaped(
    tmp_path: Path,
) -> None:
    """paramiko closes the socket from its transport thread and from ``close()``: whichever
    comes second must not return while the first is still ending the command."""
    import threading

    from herder.ssh.bastion import ProxyCommandRoute

    told = tmp_path / "terminated"
    # A command that, told to end, says so and then takes its time.
    script = (
        "import signal, sys, time\n"
        "def bye(*_):\n"
        f"    open({str(told)!r}, 'w').close()\n"
        "    time.sleep(0.5)\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "sys.stdout.buffer.write(b'r')\n"
        "sys.stdout.buffer.flush()\n"
        "sys.stdin.buffer.read()\n"
        "while True:\n"
        "    signal.pause()\n"
    )
    sock, _ = ProxyCommandRoute((sys.executable, "-c", script), "slow").open_channel(
        "127.0.0.1", 22, 10
    )
    process = sock.process
    assert process is not None
    assert sock.recv(1) == b"r"  # its handler is in place
    first = threading.Thread(target=sock.close)
    first.start()
    for _ in range(1000):  # until the command has received its SIGTERM
        if told.exists():
            break
        first.join(0.01)
    assert told.exists()
    sock.close()  # the second close, while the first waits for the command
    assert process.returncode is not None
    first.join(10)

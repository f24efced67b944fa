"""The loopback driver, driven as herder drives it: real SSH through herder's SSH executor.

Every instance set a test builds is stopped (and every executor closed) by the fixtures, so no
SSH server outlives its test.  Containers run with ``runtime: process`` under the real runner
agent, and each test that starts one waits for it to finish.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from herder_driver_loopback.driver import (
    HOST_KEY_FILE,
    INIT_COMMAND_FILE,
    RECORD_FILE,
    LoopbackDriver,
    LoopbackInstance,
    LoopbackInstanceSet,
    LoopbackParameters,
    default_state_dir,
    local_instance_type,
)
from pydantic import ValidationError

from herder.agent import protocol as runner_protocol
from herder.cloud import (
    CloudError,
    DriverContext,
    HostKey,
    HostKeyMismatch,
    Instance,
    QuotaError,
    RemoteRunner,
)
from herder.config import Config
from herder.engine.worker.runner import RunnerDeployment
from herder.executor import ExecResult, ExecutorError, HostKeyError
from herder.model import (
    Container,
    ContainerSpec,
    ContainerState,
    InstanceType,
)
from herder.plugins import Plugins
from herder.runtime import VirtualRuntime
from herder.ssh.executor import SSHExecutor
from herder.ssh.server import generate_key, generate_key_file

RUNNER_AGENT = Path(__file__).parents[3] / "core" / "src" / "herder" / "agent" / "herder_runner.py"
SET_ID = "zzzzz-zzzzz-000000000000000"
OWNED = {"HerderInstanceSetID": SET_ID}
SMALL = InstanceType(name="small", provider_type="lb.small", vcpus=1, ram=1 << 30)
UUID = "zzzzz-dz642-000000000000001"


# --------------------------------------------------------------------------- fixtures


class Harness:
    """Builds instance sets and executors, and stops / closes them all at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.state_dir = tmp_path / "state"
        self.key_path = tmp_path / "id_ed25519"
        _, self.public_key = generate_key_file(self.key_path)
        self.sets: list[LoopbackInstanceSet] = []
        self.executors: list[SSHExecutor] = []
        self.gates: list[Path] = []

    def gate(self) -> Path:
        """A file a test container waits for; opened at the end of the test whatever happens."""
        path = self.tmp / f"gate{len(self.gates)}"
        self.gates.append(path)
        return path

    def instance_set(self, **params: Any) -> LoopbackInstanceSet:
        raw = {"state_dir": str(self.state_dir), **params}
        driver = LoopbackDriver()
        validated = driver.validate_parameters(raw)
        instance_set = driver.instance_set(validated, DriverContext(instance_set_id=SET_ID))
        self.sets.append(instance_set)
        return instance_set

    def create(
        self,
        instance_set: LoopbackInstanceSet,
        tags: Mapping[str, str] | None = None,
        init_command: str = "",
    ) -> LoopbackInstance:
        return instance_set.create(
            SMALL, "img", {**OWNED, **(tags or {})}, init_command, self.public_key
        )

    def executor(self, instance: Instance) -> SSHExecutor:
        config = Config.model_validate(
            {
                "containers": {"dispatch_private_key": str(self.key_path)},
                "cloud": {"timeout_command": 20},
            }
        )
        executor = SSHExecutor(instance, config, VirtualRuntime(), connect_timeout=10)
        self.executors.append(executor)
        return executor

    def run(self, instance: Instance, command: str, stdin: bytes = b"", **kw: Any) -> str:
        """Run ``command`` on ``instance``; it must succeed; return its stdout."""
        result = self.executor(instance).execute(command, stdin, **kw)
        assert result.exit_status == 0, (command, result)
        return result.stdout.decode()

    def close(self) -> None:
        for executor in self.executors:
            executor.close()
        for instance_set in self.sets:
            instance_set.stop()
        for gate in self.gates:
            gate.touch()
        kill_leftover_containers(self.state_dir)


def kill_leftover_containers(state_dir: Path) -> None:
    """Kill what a failed test left running, found through the runners' lock records."""
    for lock in state_dir.glob("instances/*/runner/*.lock"):
        try:
            record = json.loads(lock.read_text() or "{}")
        except (OSError, ValueError):
            continue
        for key, kill in (("pgid", os.killpg), ("pid", os.kill)):
            pid = record.get(key)
            if isinstance(pid, int) and pid > 1:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    kill(pid, signal.SIGKILL)


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path)
    try:
        yield h
    finally:
        h.close()


class Redirected(Instance):
    """``genuine``'s identity and host-key check, but reached at another address."""

    def __init__(self, genuine: LoopbackInstance, address: str) -> None:
        self._genuine = genuine
        self._address = address

    @property
    def id(self) -> str:
        return self._genuine.id

    @property
    def provider_type(self) -> str:
        return self._genuine.provider_type

    @property
    def address(self) -> str:
        return self._address

    @property
    def remote_user(self) -> str:
        return self._genuine.remote_user

    @property
    def tags(self) -> dict[str, str]:
        return self._genuine.tags

    def set_tags(self, tags: Mapping[str, str]) -> None:
        raise AssertionError("not used")

    def destroy(self) -> None:
        raise AssertionError("not used")

    def verify_host_key(self, key: HostKey, remote: RemoteRunner) -> None:
        self._genuine.verify_host_key(key, remote)


def ids(instances: list[Instance]) -> list[str]:
    return sorted(i.id for i in instances)


def wait_for(condition: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


# --------------------------------------------------------------------------- registration


def test_plugin_registers_the_loopback_driver() -> None:
    plugins = Plugins.load()
    assert plugins.driver_class("loopback") is LoopbackDriver
    assert {"host_key_verification", "quota_errors"} <= LoopbackDriver.capabilities


# --------------------------------------------------------------------------- parameters


def test_parameters_have_defaults_for_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", "/srv/data")
    params = LoopbackParameters.model_validate({})
    assert params.max_instances == 4
    assert params.state_dir == "/srv/data/herder/loopback"
    assert params.bind == "127.0.0.1"
    assert params.remote_user == getpass.getuser()


def test_default_state_dir_without_xdg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("HOME", "/home/someone")
    assert default_state_dir() == "/home/someone/.local/share/herder/loopback"


def test_unknown_parameter_is_an_error_naming_the_key() -> None:
    with pytest.raises(ValidationError) as info:
        LoopbackDriver.validate_parameters({"max_instance": 3})
    assert "max_instance" in str(info.value)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"max_instances": 0}, "max_instances"),
        ({"bind": "localhost"}, "bind"),
        ({"bind": "::1"}, "bind"),
        ({"state_dir": " "}, "state_dir"),
        ({"remote_user": "two words"}, "remote_user"),
    ],
)
def test_invalid_parameter_values_name_the_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ValidationError) as info:
        LoopbackDriver.validate_parameters(raw)
    assert info.value.errors()[0]["loc"] == (key,)


def test_state_dir_is_made_absolute(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    params = LoopbackParameters.model_validate({"state_dir": "lb"})
    assert params.state_dir == str(tmp_path / "lb")


# --------------------------------------------------------------------------- instances


def test_create_lists_the_instance_and_runs_commands_as_the_current_user(
    harness: Harness,
) -> None:
    instance_set = harness.instance_set()
    inst = harness.create(instance_set, {"InstanceType": "small"})

    assert inst.provider_type == "lb.small"
    assert inst.remote_user == getpass.getuser()
    assert inst.address.startswith("127.0.0.1:")
    assert inst.tags == {**OWNED, "InstanceType": "small"}
    listed = instance_set.instances(OWNED)
    assert ids(listed) == [inst.id]
    assert listed[0].address == inst.address

    # The executor verifies the host key through the instance before running anything.
    out = harness.run(listed[0], "echo hi; id -un")
    assert out == f"hi\n{getpass.getuser()}\n"


def test_a_leading_sudo_is_removed(harness: Harness) -> None:
    """Commands already run as the only user there is (who may not have sudo)."""
    inst = harness.create(harness.instance_set())
    # Real sudo would reset the environment and lose HERDER_RUNNER_DIR.
    out = harness.run(inst, "sudo sh -c 'echo $HERDER_RUNNER_DIR'")
    assert out == f"{inst.runner_dir}\n"


def test_exit_status_and_stdin_pass_through(harness: Harness) -> None:
    inst = harness.create(harness.instance_set())
    result = harness.executor(inst).execute("cat; exit 3", b"payload")
    assert (result.exit_status, result.stdout) == (3, b"payload")


def test_verify_host_key_accepts_only_the_instances_own_key(harness: Harness) -> None:
    instance_set = harness.instance_set()
    a, b = harness.create(instance_set), harness.create(instance_set)
    key_a = generate_key_file_public(a)
    key_b = generate_key_file_public(b)
    a.verify_host_key(key_a, _NoRemote())
    with pytest.raises(HostKeyMismatch, match="host key mismatch"):
        a.verify_host_key(key_b, _NoRemote())


def test_a_server_with_another_instances_key_is_refused(harness: Harness) -> None:
    instance_set = harness.instance_set()
    a, b = harness.create(instance_set), harness.create(instance_set)
    impostor = Redirected(a, b.address)  # a's identity, b's server (and b's host key)
    with pytest.raises(HostKeyError, match="did not verify"):
        harness.executor(impostor).execute("echo hi")
    assert harness.run(a, "echo hi") == "hi\n"


def test_a_swapped_host_key_file_is_refused_after_a_restart(harness: Harness) -> None:
    """The host key is pinned in the record at creation, not re-read from the key file."""
    first = harness.instance_set()
    inst = harness.create(first)
    first.stop()
    generate_key_file(inst.directory / HOST_KEY_FILE)  # someone replaces the key

    (adopted,) = harness.instance_set().instances(OWNED)
    with pytest.raises(HostKeyError, match="host key mismatch"):
        harness.executor(adopted).execute("echo hi")


def test_only_the_given_public_key_may_log_in(harness: Harness) -> None:
    instance_set = harness.instance_set()
    _, other_public = generate_key()
    inst = instance_set.create(SMALL, "img", OWNED, "", other_public)
    with pytest.raises(ExecutorError):
        harness.executor(inst).execute("echo hi")


def test_create_without_a_public_key_is_refused(harness: Harness) -> None:
    instance_set = harness.instance_set()
    with pytest.raises(CloudError, match="deploy_public_key"):
        instance_set.create(SMALL, "img", OWNED, "", None)
    assert instance_set.instances({}) == []


def test_create_beyond_max_instances_is_a_quota_error(harness: Harness) -> None:
    instance_set = harness.instance_set(max_instances=2)
    first = harness.create(instance_set)
    harness.create(instance_set)
    with pytest.raises(QuotaError, match="max_instances: 2"):
        harness.create(instance_set)
    assert len(instance_set.instances({})) == 2

    first.destroy()
    harness.create(instance_set)  # room again
    assert len(instance_set.instances({})) == 2


def test_instances_have_separate_runner_directories(harness: Harness) -> None:
    instance_set = harness.instance_set()
    a, b = harness.create(instance_set), harness.create(instance_set)
    dir_a = harness.run(a, "echo $HERDER_RUNNER_DIR $HERDER_RUNNER_LOG_DIR").split()
    dir_b = harness.run(b, "echo $HERDER_RUNNER_DIR $HERDER_RUNNER_LOG_DIR").split()
    assert dir_a == [str(a.runner_dir)] * 2
    assert dir_b == [str(b.runner_dir)] * 2
    assert dir_a != dir_b
    assert a.runner_dir.is_dir() and b.runner_dir.is_dir()


def test_runner_directory_is_set_even_when_the_client_sends_an_environment(
    harness: Harness,
) -> None:
    inst = harness.create(harness.instance_set())
    out = harness.run(inst, "echo $FOO $HERDER_RUNNER_DIR", env={"FOO": "bar"})
    assert out == f"bar {inst.runner_dir}\n"


def test_instances_filters_by_tags(harness: Harness) -> None:
    instance_set = harness.instance_set()
    small = harness.create(instance_set, {"InstanceType": "small"})
    big = harness.create(instance_set, {"InstanceType": "big"})
    assert ids(instance_set.instances({})) == sorted([small.id, big.id])
    assert ids(instance_set.instances(OWNED)) == sorted([small.id, big.id])
    assert ids(instance_set.instances({"InstanceType": "big"})) == [big.id]
    assert ids(instance_set.instances({**OWNED, "InstanceType": "small"})) == [small.id]
    assert instance_set.instances({"HerderInstanceSetID": "someone-else"}) == []


def test_set_tags_replaces_the_tags(harness: Harness) -> None:
    instance_set = harness.instance_set()
    inst = harness.create(instance_set, {"IdleBehavior": "run", "Old": "x"})
    inst.set_tags({**OWNED, "IdleBehavior": "hold"})
    (listed,) = instance_set.instances({})
    assert listed.tags == {**OWNED, "IdleBehavior": "hold"}
    assert inst.tags == {**OWNED, "IdleBehavior": "run", "Old": "x"}  # a snapshot
    assert instance_set.instances({"Old": "x"}) == []


def test_destroy_stops_the_server_and_removes_the_directory_and_is_idempotent(
    harness: Harness,
) -> None:
    instance_set = harness.instance_set()
    inst = harness.create(instance_set)
    keep = harness.create(instance_set)
    assert harness.run(inst, "echo hi") == "hi\n"

    inst.destroy()
    assert ids(instance_set.instances({})) == [keep.id]
    assert not inst.directory.exists()
    host, port = inst.address.split(":")
    with pytest.raises(OSError), socket.create_connection((host, int(port)), timeout=2):
        pass
    inst.destroy()  # harmless
    instance_set.destroy(inst.id)
    assert harness.run(keep, "echo still here") == "still here\n"


def test_init_command_is_recorded_but_not_run(harness: Harness, tmp_path: Path) -> None:
    marker = tmp_path / "init-ran"
    init = f"umask 0177 && echo -n secret > {marker}"
    inst = harness.create(harness.instance_set(), init_command=init)
    recorded = inst.directory / INIT_COMMAND_FILE
    assert recorded.read_text() == init
    assert stat.S_IMODE(recorded.stat().st_mode) == 0o600
    assert not marker.exists()


def test_files_of_an_instance_are_private(harness: Harness) -> None:
    inst = harness.create(harness.instance_set())
    for path in (inst.directory, inst.directory / HOST_KEY_FILE, inst.directory / RECORD_FILE):
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


def test_stopped_instance_set_refuses_calls(harness: Harness) -> None:
    instance_set = harness.instance_set()
    instance_set.stop()
    with pytest.raises(CloudError, match="stopped"):
        instance_set.instances({})
    with pytest.raises(CloudError, match="stopped"):
        harness.create(instance_set)
    instance_set.stop()  # twice is fine


# --------------------------------------------------------------------------- restarts


def test_a_restarted_instance_set_adopts_instances_and_their_servers_answer(
    harness: Harness,
) -> None:
    first = harness.instance_set()
    inst = harness.create(first, {"IdleBehavior": "run"})
    inst.set_tags({**OWNED, "IdleBehavior": "drain"})
    assert harness.run(inst, "echo before") == "before\n"
    first.stop()
    with pytest.raises(ExecutorError):
        harness.executor(inst).execute("echo hi")

    second = harness.instance_set()
    (adopted,) = second.instances(OWNED)
    assert adopted.id == inst.id
    assert adopted.provider_type == "lb.small"
    assert adopted.tags == {**OWNED, "IdleBehavior": "drain"}  # set_tags was persisted
    assert adopted.address == inst.address  # the port was free
    assert harness.run(adopted, "echo after") == "after\n"


def test_a_restarted_instance_gets_a_new_port_when_its_old_one_is_taken(
    harness: Harness,
) -> None:
    first = harness.instance_set()
    inst = harness.create(first)
    first.stop()
    host, port = inst.address.split(":")
    with socket.socket() as squatter:
        squatter.bind((host, int(port)))
        squatter.listen(1)
        (adopted,) = harness.instance_set().instances({})
        assert adopted.address != inst.address
        assert harness.run(adopted, "echo hi") == "hi\n"
    record = json.loads((inst.directory / RECORD_FILE).read_text())
    assert f"{host}:{record['port']}" == adopted.address


def test_only_one_instance_set_may_use_a_state_directory(harness: Harness) -> None:
    first = harness.instance_set()
    with pytest.raises(CloudError, match="in use"):
        harness.instance_set()
    first.stop()
    harness.instance_set()  # released by stop()


def test_an_unfinished_create_is_cleaned_up_at_start(harness: Harness) -> None:
    leftover = harness.state_dir / "instances" / "lb-000000000000"
    leftover.mkdir(parents=True)
    (leftover / HOST_KEY_FILE).write_text("half a key")
    instance_set = harness.instance_set()
    assert instance_set.instances({}) == []
    assert not leftover.exists()


def test_an_unreadable_record_is_skipped_not_deleted(harness: Harness) -> None:
    broken = harness.state_dir / "instances" / "lb-000000000001"
    broken.mkdir(parents=True)
    (broken / RECORD_FILE).write_text("{not json")
    instance_set = harness.instance_set()
    assert instance_set.instances({}) == []
    assert broken.exists()


# --------------------------------------------------------------------------- local type


def test_local_instance_type_is_sized_from_this_machine(tmp_path: Path) -> None:
    local = local_instance_type(scratch_dir=tmp_path / "not" / "yet")
    assert (local.name, local.provider_type, local.price) == ("local", "local", 0.0)
    assert 1 <= local.vcpus <= (os.cpu_count() or 1)
    meminfo = Path("/proc/meminfo").read_text().split("\n")
    total_kb = int(next(line for line in meminfo if line.startswith("MemTotal:")).split()[1])
    assert local.ram == total_kb * 1024
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    assert abs(local.scratch - free) < 1 << 30
    assert local_instance_type("here").provider_type == "here"


# --------------------------------------------------------------------------- end to end


def deploy_runner(harness: Harness, inst: Instance) -> RunnerDeployment:
    """Install the runner agent as herder's worker does: md5-named file, bytes on stdin."""
    deployment = RunnerDeployment.build(
        RUNNER_AGENT.read_bytes(), str(harness.tmp / "deploy"), "herder-runner"
    )
    harness.run(inst, deployment.install_command(inst.remote_user), deployment.data)
    check = harness.executor(inst).execute(deployment.md5_check_command(inst.remote_user))
    assert check.stdout == deployment.md5_expected_output()
    return deployment


def container(uuid: str, *command: str) -> Container:
    spec = ContainerSpec(command=tuple(command), runtime="process")
    return Container(uuid=uuid, state=ContainerState.LOCKED, priority=1, spec=spec, created_at=0.0)


def start(harness: Harness, inst: Instance, runner: str, ctr: Container) -> None:
    cmd = runner_protocol.detach_command(runner, inst.remote_user, [], ctr.uuid)
    harness.run(inst, cmd, runner_protocol.config_document(ctr, SMALL))


def listing(harness: Harness, inst: Instance, runner: str) -> runner_protocol.ListResult:
    out = harness.run(inst, runner_protocol.list_command(runner, inst.remote_user))
    return runner_protocol.parse_list_output(out, "zzzzz")


def test_a_container_runs_end_to_end_under_the_runner_agent(
    harness: Harness,
) -> None:
    # A non-root login name makes herder prefix every runner command with sudo.
    instance_set = harness.instance_set(remote_user="herder")
    inst, other = harness.create(instance_set), harness.create(instance_set)
    deployment = deploy_runner(harness, inst)
    gate = harness.gate()
    ctr = container(UUID, "sh", "-c", f"until [ -e {gate} ]; do sleep 0.01; done; exit 7")

    start(harness, inst, deployment.command, ctr)
    assert listing(harness, inst, deployment.command).running == [UUID]
    # The same runner program on another instance sees nothing of it.
    assert listing(harness, other, deployment.command).running == []

    gate.touch()
    done = wait_for(lambda: listing(harness, inst, deployment.command).exited)
    assert done == {UUID: 7}


def test_a_container_keeps_running_across_a_dispatcher_restart(
    harness: Harness,
) -> None:
    first = harness.instance_set()
    inst = harness.create(first)
    deployment = deploy_runner(harness, inst)
    gate = harness.gate()
    ctr = container(UUID, "sh", "-c", f"until [ -e {gate} ]; do sleep 0.01; done; exit 0")
    start(harness, inst, deployment.command, ctr)
    first.stop()

    (adopted,) = harness.instance_set().instances(OWNED)
    assert listing(harness, adopted, deployment.command).running == [UUID]
    gate.touch()
    done = wait_for(lambda: listing(harness, adopted, deployment.command).exited)
    assert done == {UUID: 0}


# --------------------------------------------------------------------------- SSH outages


def refused(address: str) -> bool:
    host, port = address.split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return False
    except OSError:
        return True


def test_stop_ssh_takes_the_server_down_and_start_ssh_brings_it_back(
    harness: Harness,
) -> None:
    instance_set = harness.instance_set()
    inst = harness.create(instance_set)
    other = harness.create(instance_set)
    assert harness.run(inst, "echo before") == "before\n"

    assert instance_set.stop_ssh(inst.id) is True
    assert refused(inst.address)
    (listed,) = [i for i in instance_set.instances({}) if i.id == inst.id]
    assert listed.address == inst.address  # still listed, at the same address, as a VM is
    with pytest.raises(ExecutorError):
        harness.executor(inst).execute("echo during")
    assert harness.run(other, "echo unaffected") == "unaffected\n"
    assert instance_set.stop_ssh(inst.id) is False  # already down

    assert inst.start_ssh() is True
    assert inst.start_ssh() is False  # already up
    (back,) = [i for i in instance_set.instances({}) if i.id == inst.id]
    assert back.address == inst.address  # the old port was free
    assert harness.run(back, "echo after") == "after\n"
    assert inst.stop_ssh() is True


def test_stop_and_start_ssh_of_an_unknown_instance_do_nothing(harness: Harness) -> None:
    instance_set = harness.instance_set()
    assert instance_set.stop_ssh("lb-000000000000") is False
    assert instance_set.start_ssh("lb-000000000000") is False


def test_stop_ssh_cuts_commands_in_flight_but_detached_containers_live_on(
    harness: Harness,
) -> None:
    instance_set = harness.instance_set()
    inst = harness.create(instance_set)
    deployment = deploy_runner(harness, inst)
    gate = harness.gate()
    ctr = container(UUID, "sh", "-c", f"until [ -e {gate} ]; do sleep 0.01; done; exit 5")
    start(harness, inst, deployment.command, ctr)

    executor = harness.executor(inst)
    outcome: list[ExecResult | ExecutorError] = []
    slow = f"sleep 30 # {gate}"

    def in_flight() -> None:
        try:
            outcome.append(executor.execute(slow))
        except ExecutorError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=in_flight)
    thread.start()
    assert wait_for(lambda: any(slow in cmdline for cmdline in _cmdlines()))
    began = time.monotonic()
    assert instance_set.stop_ssh(inst.id)
    thread.join(20)
    assert not thread.is_alive() and time.monotonic() - began < 15
    assert not any(slow in cmdline for cmdline in _cmdlines())  # hung up, not left running
    (result,) = outcome
    if isinstance(result, ExecResult):
        assert result.exit_status != 0

    assert instance_set.start_ssh(inst.id)
    assert listing(harness, inst, deployment.command).running == [UUID]
    gate.touch()
    done = wait_for(lambda: listing(harness, inst, deployment.command).exited)
    assert done == {UUID: 5}


def _cmdlines() -> list[str]:
    """The command lines of this host's processes (arguments joined by spaces)."""
    lines = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            lines.append(path.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
    return lines


def test_start_ssh_moves_to_a_new_port_when_the_old_one_is_taken(harness: Harness) -> None:
    instance_set = harness.instance_set()
    inst = harness.create(instance_set)
    instance_set.stop_ssh(inst.id)
    host, port = inst.address.split(":")
    with socket.socket() as squatter:
        squatter.bind((host, int(port)))
        squatter.listen(1)
        assert instance_set.start_ssh(inst.id)
    (moved,) = instance_set.instances({})
    assert moved.address != inst.address
    assert harness.run(moved, "echo moved") == "moved\n"
    record = json.loads((inst.directory / RECORD_FILE).read_text())
    assert f"{host}:{record['port']}" == moved.address  # a restart finds it there


def test_an_instance_whose_ssh_is_down_can_be_destroyed_and_adopted(harness: Harness) -> None:
    first = harness.instance_set()
    gone, kept = harness.create(first), harness.create(first)
    first.stop_ssh(gone.id)
    first.stop_ssh(kept.id)
    gone.destroy()
    assert not gone.directory.exists()
    first.stop()
    (adopted,) = harness.instance_set().instances({})
    assert adopted.id == kept.id
    assert harness.run(adopted, "echo up") == "up\n"  # a new instance set starts every server


# --------------------------------------------------------------------------- helpers


class _NoRemote(RemoteRunner):
    def run(
        self, command: str, stdin: bytes = b"", timeout: float = 60.0
    ) -> tuple[int, bytes, bytes]:
        raise AssertionError("the loopback driver checks keys without running commands")


def generate_key_file_public(inst: LoopbackInstance) -> HostKey:
    """The host key ``inst``'s server presents, read from its key file."""
    import paramiko

    key = paramiko.Ed25519Key.from_private_key_file(str(inst.directory / HOST_KEY_FILE))
    return HostKey(key.get_name(), key.asbytes())

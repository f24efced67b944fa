"""The local dispatcher: capacity, exits, logs, cancellation and restarts.

Most tests replace the runner agent with a fake that reports what a test says, on a virtual
clock; ``test_real_runner_*`` runs containers as real processes under herder's runner agent.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from herder_dispatcher_local.backend import AgentCallError, LocalBackend

from herder.agent.protocol import ListResult
from herder.config import Config
from herder.engine.sizing import ConfigSizer
from herder.model import Container, ContainerSpec, ContainerState, InstanceType, RuntimeConstraints
from herder.queue.rules import RuleSettings
from herder.queue.sqlite import SqliteQueue
from herder.runtime import VirtualRuntime
from herder.testing.dispatcher_checks import check_config_names_bad_dispatcher_parameters

Q, L, R = ContainerState.QUEUED, ContainerState.LOCKED, ContainerState.RUNNING
DONE, CANCELLED = ContainerState.COMPLETE, ContainerState.CANCELLED
GiB = 1 << 30


class FakeRunner:
    """Stands in for the runner agent: containers run until a test says they exited."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.running: set[str] = set()
        self.exited: dict[str, int] = {}
        self.logs: dict[str, bytes] = {}
        self.failed: dict[str, tuple[str, str]] = {}
        self.detached: list[str] = []
        self.killed: list[str] = []
        self.forgotten: list[str] = []

    def detach(self, container: Container, instance_type: InstanceType) -> bool:
        if container.uuid in self.running:
            return False
        self.detached.append(container.uuid)
        self.running.add(container.uuid)
        return True

    def list(self, cluster_id: str) -> ListResult:
        return ListResult(
            running=sorted(self.running), exited=dict(self.exited), failed=dict(self.failed)
        )

    def kill(self, uuid: str, signum: int = 15) -> None:
        self.killed.append(uuid)
        if uuid in self.running:
            self.running.discard(uuid)
            self.exited[uuid] = 143

    def log(self, uuid: str) -> bytes:
        return self.logs.get(uuid, b"")

    def forget(self, uuid: str) -> None:
        self.forgotten.append(uuid)
        self.exited.pop(uuid, None)
        self.failed.pop(uuid, None)

    def exit(self, uuid: str, code: int, log: bytes = b"") -> None:
        self.running.discard(uuid)
        self.exited[uuid] = code
        self.logs[uuid] = log


@pytest.fixture
def rt() -> VirtualRuntime:
    return VirtualRuntime()


def make_backend(tmp_path: Path, rt: VirtualRuntime, **params: object) -> LocalBackend:
    config = Config.model_validate({"queue": {"path": str(tmp_path / "q.db")}})
    params.setdefault("state_dir", str(tmp_path / "runner"))
    return LocalBackend(config, params, runtime=rt)


def make_queue(backend: LocalBackend, rt: VirtualRuntime) -> SqliteQueue:
    return SqliteQueue(":memory:", RuleSettings(rt, ConfigSizer(backend.instance_types())))


def submit(q: SqliteQueue, vcpus: int = 1, ram: int = GiB, cmd: tuple[str, ...] = ("true",)) -> str:
    spec = ContainerSpec(command=cmd, runtime_constraints=RuntimeConstraints(vcpus=vcpus, ram=ram))
    return q.submit(spec).uuid


def get(q: SqliteQueue, uuid: str) -> Container:
    ctr = q.get(uuid)
    assert ctr is not None
    return ctr


@pytest.fixture
def setup(tmp_path: Path, rt: VirtualRuntime):
    backend = make_backend(tmp_path, rt, vcpus=2, ram="4GiB", probe_interval="1s")
    fake = FakeRunner(tmp_path / "runner")
    backend.runner = fake  # type: ignore[assignment]
    q = make_queue(backend, rt)
    yield backend, fake, q
    backend.stop()
    q.close()


def test_host_is_described_by_the_configured_limits(tmp_path: Path, rt: VirtualRuntime) -> None:
    it = make_backend(tmp_path, rt, vcpus=3, ram="2GiB").instance_types()["local"]
    assert (it.vcpus, it.ram) == (3, 2 * GiB)
    assert it.scratch > 0
    host = make_backend(tmp_path, rt).instance_types()["local"]
    assert host.vcpus >= 1 and host.ram > 0


def test_too_big_for_the_host_is_cancelled_at_submission(setup) -> None:
    _backend, _fake, q = setup
    assert get(q, submit(q, vcpus=3)).state is CANCELLED


def test_bad_parameters_are_refused(tmp_path: Path, rt: VirtualRuntime) -> None:
    with pytest.raises(ValueError, match="vcpu"):
        make_backend(tmp_path, rt, vcpus=-1)
    with pytest.raises(ValueError, match="nonsense"):
        make_backend(tmp_path, rt, nonsense=1)


def test_runs_only_what_fits_and_collects_exit_codes_and_logs(setup, rt) -> None:
    backend, fake, q = setup
    a, b, c = submit(q), submit(q), submit(q)
    backend.start(q)
    rt.run_until_idle()
    running = [u for u in (a, b, c) if get(q, u).state is R]
    waiting = [u for u in (a, b, c) if get(q, u).state is Q]
    assert len(running) == 2 and len(waiting) == 1  # two VCPUs
    assert sorted(fake.detached) == sorted(running)
    fake.exit(running[0], 3, b"hello\n")
    rt.advance(1.0)  # the next probe
    done = get(q, running[0])
    assert done.state is DONE and done.exit_code == 3
    assert q.read_log(running[0]) == b"hello\n"
    assert running[0] in fake.forgotten
    assert get(q, waiting[0]).state is R  # the freed VCPU is used at once


def test_memory_limits_what_runs(setup, rt) -> None:
    backend, _fake, q = setup
    big, other = submit(q, ram=3 * GiB), submit(q, ram=2 * GiB)
    backend.start(q)
    rt.run_until_idle()
    assert [get(q, u).state for u in (big, other)].count(R) == 1


def test_cancel_kills_the_container(setup, rt) -> None:
    backend, fake, q = setup
    uuid = submit(q)
    backend.start(q)
    rt.run_until_idle()
    q.cancel(uuid, "no longer needed")
    rt.run_until_idle()
    assert fake.killed == [uuid]
    rt.advance(1.0)
    assert get(q, uuid).state is CANCELLED
    assert uuid in fake.forgotten


def test_priority_zero_cancels_a_running_container(setup, rt) -> None:
    backend, fake, q = setup
    uuid = submit(q)
    backend.start(q)
    rt.run_until_idle()
    q.set_priority(uuid, 0)
    rt.run_until_idle()
    assert get(q, uuid).state is CANCELLED
    assert fake.killed == [uuid]


def test_container_lost_by_the_runner_is_retried(setup, rt) -> None:
    backend, fake, q = setup
    uuid = submit(q)
    backend.start(q)
    rt.run_until_idle()
    fake.running.discard(uuid)  # gone without an exit record (SIGKILL, reboot)
    rt.advance(1.0)
    assert get(q, uuid).state is Q  # given back
    rt.advance(10.0)  # the retry period
    assert get(q, uuid).state is R
    assert fake.detached.count(uuid) == 2  # started again


def test_restart_takes_up_running_containers_without_starting_them_again(setup, rt) -> None:
    backend, fake, q = setup
    running, locked = submit(q), submit(q)
    for uuid in (running, locked):
        q.lock(uuid)
        fake.running.add(uuid)  # both were started before the restart
    q.set_running(running)
    backend.start(q)
    rt.run_until_idle()
    assert fake.detached == []
    assert get(q, locked).state is R
    fake.exit(running, 0)
    rt.advance(1.0)
    assert get(q, running).state is DONE


def test_failed_start_gives_the_container_back(setup, rt) -> None:
    backend, fake, q = setup

    def refuse(container: Container, instance_type: InstanceType) -> bool:
        raise AgentCallError("cannot create state directory")

    fake.detach = refuse  # type: ignore[method-assign]
    uuid = submit(q)
    backend.start(q)
    rt.run_until_idle()
    assert get(q, uuid).state is Q
    assert b"cannot create state directory" in q.read_log(uuid)
    rt.advance(9.0)
    assert get(q, uuid).lock_count == 1  # min_retry_period (10s by default) not over yet
    rt.advance(1.0)
    assert get(q, uuid).lock_count == 2


# ---------------------------------------------------------------- the real runner agent


def run_until(rt: VirtualRuntime, done, seconds: float = 30.0) -> None:
    """Advance the virtual clock probe by probe until ``done()``, within a wall-clock bound.

    Each step runs the runner agent as a subprocess, which is what paces the loop.
    """
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, "timed out"
        rt.advance(0.2)


def test_real_runner_runs_processes_to_completion(tmp_path: Path, rt: VirtualRuntime) -> None:
    backend = make_backend(tmp_path, rt, vcpus=2, ram="4GiB", probe_interval="0.2s")
    q = make_queue(backend, rt)
    ok = submit(q, cmd=("sh", "-c", "echo hello from $0; exit 0", "local"))
    bad = submit(q, cmd=("sh", "-c", "echo oops >&2; exit 7"))
    try:
        backend.start(q)
        run_until(rt, lambda: get(q, ok).state.final and get(q, bad).state.final)
        assert (get(q, ok).state, get(q, ok).exit_code) == (DONE, 0)
        assert (get(q, bad).state, get(q, bad).exit_code) == (DONE, 7)
        assert b"hello from local" in q.read_log(ok)
        assert b"oops" in q.read_log(bad)
    finally:
        backend.stop()
        q.close()


def test_real_runner_cancel_kills_the_process(tmp_path: Path, rt: VirtualRuntime) -> None:
    backend = make_backend(tmp_path, rt, vcpus=1, ram="1GiB", probe_interval="0.2s")
    q = make_queue(backend, rt)
    uuid = submit(q, ram=GiB // 2, cmd=("sleep", "600"))
    try:
        backend.start(q)
        run_until(rt, lambda: get(q, uuid).state is R)
        q.cancel(uuid, "stop")
        rt.run_until_idle()
        run_until(rt, lambda: not backend.runner.list("zzzzz").running)
        assert get(q, uuid).state is CANCELLED
    finally:
        backend.stop()
        q.close()


def test_config_check_names_bad_dispatcher_parameters(tmp_path: Path) -> None:
    """``herder config check`` as an operator runs it (real plugin discovery): the plugin's
    parameters model reports each bad key under ``dispatcher_parameters``."""
    check_config_names_bad_dispatcher_parameters("local", tmp_path)


def test_serve_refuses_bad_dispatcher_parameters_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``herder serve`` checks the file as ``config check`` does, before starting anything."""
    from herder.app import cli

    monkeypatch.delenv("HERDER_CONFIG", raising=False)
    path = tmp_path / "herder.yaml"
    path.write_text("dispatcher: local\ndispatcher_parameters: {ram: lots}\n")
    status = cli.main(
        [
            "--config",
            str(path),
            "serve",
            "--data-dir",
            str(tmp_path / "data"),
            "--listen",
            "127.0.0.1:0",
        ]
    )
    err = capsys.readouterr().err
    assert status == 1
    assert "dispatcher_parameters.ram" in err and "Traceback" not in err
    assert not (tmp_path / "data" / "herder.db").exists()


def test_a_container_that_could_not_start_is_not_an_exit_code(setup, rt) -> None:
    backend, fake, q = setup
    image, engine = submit(q), submit(q)
    backend.start(q)
    rt.run_until_idle()
    for uuid in (image, engine):
        fake.running.discard(uuid)
    fake.failed[image] = ("container", "pull access denied for nosuch")
    fake.failed[engine] = ("instance", "docker: Cannot connect to the Docker daemon")
    rt.advance(1.0)
    got = get(q, image)
    assert got.state is ContainerState.CANCELLED and got.exit_code is None
    assert got.status("error") == (
        "the container could not be started: pull access denied for nosuch"
    )
    again = get(q, engine)
    assert again.exit_code is None and again.lock_count == 1
    assert again.attempt_history[0].outcome == "retried"
    assert "Cannot connect to the Docker daemon" in again.attempt_history[0].reason
    assert {image, engine} <= set(fake.forgotten)

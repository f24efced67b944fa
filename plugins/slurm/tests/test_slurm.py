"""The slurm dispatcher: job scripts, state mapping, exits, cancellation, restarts.

The first tests replace the Slurm tools with a fake on a virtual clock; ``test_real_slurm_*``
run containers through a real one-node Slurm started by the ``slurm_cluster`` fixture.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from herder_dispatcher_slurm.backend import SlurmBackend, SlurmJob, job_script

from herder.config import Config
from herder.engine.sizing import ConfigSizer
from herder.model import Container, ContainerSpec, ContainerState, RuntimeConstraints
from herder.queue.rules import RuleSettings
from herder.queue.sqlite import SqliteQueue
from herder.runtime import VirtualRuntime
from herder.testing.dispatcher_checks import check_config_names_bad_dispatcher_parameters

Q, L, R = ContainerState.QUEUED, ContainerState.LOCKED, ContainerState.RUNNING
DONE, CANCELLED = ContainerState.COMPLETE, ContainerState.CANCELLED
GiB = 1 << 30


class FakeSlurm:
    """Jobs stay PENDING until a test starts or ends them."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.queue: dict[str, SlurmJob] = {}
        self.submitted: list[tuple[str, list[str]]] = []
        self.cancelled: list[str] = []
        self.next_id = 100
        self.remembered: dict[str, int] = {}

    def submit(self, name: str, script: Path, args: list[str]) -> str:
        self.next_id += 1
        self.submitted.append((name, args))
        self.queue[name] = SlurmJob(str(self.next_id), "PENDING")
        return str(self.next_id)

    def jobs(self) -> dict[str, SlurmJob]:
        return dict(self.queue)

    def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)
        self.queue = {n: j for n, j in self.queue.items() if j.job_id != job_id}

    def exit_code(self, job_id: str) -> int | None:
        return self.remembered.get(job_id)

    def largest_node(self) -> tuple[int, int]:
        return 4, 8 * GiB

    def start(self, name: str) -> None:
        self.queue[name] = SlurmJob(self.queue[name].job_id, "RUNNING")

    def end(self, name: str, code: int | None, log: bytes = b"") -> None:
        self.queue.pop(name)
        if code is not None:
            (self.work_dir / f"{name}.exit").write_text(f"{code}\n")
        (self.work_dir / f"{name}.log").write_bytes(log)


@pytest.fixture
def rt() -> VirtualRuntime:
    return VirtualRuntime()


def make_backend(tmp_path: Path, rt: VirtualRuntime, **params: object) -> SlurmBackend:
    config = Config.model_validate({"queue": {"path": str(tmp_path / "q.db")}})
    params.setdefault("work_dir", str(tmp_path / "work"))
    return SlurmBackend(config, params, runtime=rt)


def submit(q: SqliteQueue, vcpus: int = 1, ram: int = GiB, cmd: tuple[str, ...] = ("true",)) -> str:
    spec = ContainerSpec(command=cmd, runtime_constraints=RuntimeConstraints(vcpus=vcpus, ram=ram))
    return q.submit(spec).uuid


def get(q: SqliteQueue, uuid: str) -> Container:
    ctr = q.get(uuid)
    assert ctr is not None
    return ctr


@pytest.fixture
def setup(tmp_path: Path, rt: VirtualRuntime):
    backend = make_backend(tmp_path, rt, probe_interval="1s", partition="main")
    fake = FakeSlurm(tmp_path / "work")
    backend.slurm = fake  # type: ignore[assignment]
    q = SqliteQueue(":memory:", RuleSettings(rt, ConfigSizer(backend.instance_types())))
    yield backend, fake, q
    backend.stop()
    q.close()


def test_job_script_runs_the_command_and_records_its_exit_code(tmp_path: Path) -> None:
    ctr = Container(
        uuid="zzzzz-dz642-aaaaaaaaaaaaaaa",
        state=L,
        priority=1,
        created_at=0.0,
        spec=ContainerSpec(
            command=("sh", "-c", "echo $GREETING; exit 4"), environment=(("GREETING", "it's me"),)
        ),
    )
    script = tmp_path / "job.sh"
    script.write_text(job_script(ctr, tmp_path))
    out = subprocess.run(["sh", str(script)], capture_output=True, text=True)
    assert out.returncode == 4 and out.stdout == "it's me\n"
    assert (tmp_path / f"{ctr.uuid}.exit").read_text() == "4\n"


def test_sizes_containers_against_the_largest_node(setup) -> None:
    _backend, _fake, q = setup
    assert get(q, submit(q, vcpus=5)).state is CANCELLED
    assert get(q, submit(q, vcpus=4)).state is Q


def test_submits_with_resources_and_maps_slurm_states(setup, rt) -> None:
    backend, fake, q = setup
    uuid = submit(q, vcpus=2, ram=GiB + 1)
    backend.start(q)
    rt.run_until_idle()
    name, args = fake.submitted[0]
    assert name == uuid
    assert "--cpus-per-task=2" in args and "--mem=1025M" in args and "--partition=main" in args
    assert get(q, uuid).state is L  # PENDING in Slurm
    fake.start(uuid)
    rt.advance(1.0)
    assert get(q, uuid).state is R
    fake.end(uuid, 3, b"job output\n")
    rt.advance(1.0)
    ctr = get(q, uuid)
    assert (ctr.state, ctr.exit_code) == (DONE, 3)
    assert q.read_log(uuid) == b"job output\n"
    assert not list((backend.work_dir).glob(f"{uuid}.*"))  # cleaned up


def test_exit_code_from_scontrol_when_the_script_recorded_none(setup, rt) -> None:
    backend, fake, q = setup
    uuid = submit(q)
    backend.start(q)
    rt.run_until_idle()
    job_id = fake.queue[uuid].job_id
    fake.remembered[job_id] = 137
    fake.end(uuid, None)
    rt.advance(1.0)
    assert get(q, uuid).exit_code == 137


def test_job_gone_without_exit_code_goes_back_to_the_queue(setup, rt) -> None:
    backend, fake, q = setup
    uuid = submit(q)
    backend.start(q)
    rt.run_until_idle()
    fake.start(uuid)
    rt.advance(1.0)
    fake.end(uuid, None)
    rt.advance(1.0)
    assert get(q, uuid).state is Q


def test_cancelling_a_container_cancels_its_job(setup, rt) -> None:
    backend, fake, q = setup
    uuid = submit(q)
    backend.start(q)
    rt.run_until_idle()
    job_id = fake.queue[uuid].job_id
    q.cancel(uuid, "stop")
    rt.run_until_idle()
    assert fake.cancelled == [job_id]
    rt.advance(1.0)
    assert get(q, uuid).state is CANCELLED


def test_restart_follows_existing_jobs_without_submitting_again(setup, rt) -> None:
    backend, fake, q = setup
    uuid = submit(q)
    q.lock(uuid)
    fake.submit(uuid, Path("x"), [])
    fake.submitted.clear()
    backend.start(q)
    rt.run_until_idle()
    assert fake.submitted == []
    fake.end(uuid, 0)
    rt.advance(1.0)
    assert get(q, uuid).state is DONE


def test_max_jobs_limits_submissions(tmp_path: Path, rt: VirtualRuntime) -> None:
    backend = make_backend(tmp_path, rt, max_jobs=1)
    fake = FakeSlurm(tmp_path / "work")
    backend.slurm = fake  # type: ignore[assignment]
    q = SqliteQueue(":memory:", RuleSettings(rt, ConfigSizer(backend.instance_types())))
    submit(q)
    submit(q)
    backend.start(q)
    rt.run_until_idle()
    assert len(fake.submitted) == 1
    backend.stop()


# ---------------------------------------------------------------- a real Slurm


def run_until(rt: VirtualRuntime, done, seconds: float = 60.0) -> None:
    """Advance the virtual clock probe by probe until ``done()``; squeue paces the loop."""
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, "timed out"
        rt.advance(0.5)
        time.sleep(0.05)


def test_real_slurm_runs_containers_to_completion(slurm_cluster, tmp_path, rt) -> None:
    backend = make_backend(tmp_path, rt, probe_interval="0.5s")
    q = SqliteQueue(":memory:", RuleSettings(rt, ConfigSizer(backend.instance_types())))
    ok = submit(q, ram=100 << 20, cmd=("sh", "-c", "echo hello from slurm"))
    bad = submit(q, ram=100 << 20, cmd=("sh", "-c", "exit 5"))
    try:
        backend.start(q)
        run_until(rt, lambda: get(q, ok).state.final and get(q, bad).state.final)
        assert (get(q, ok).state, get(q, ok).exit_code) == (DONE, 0)
        assert (get(q, bad).state, get(q, bad).exit_code) == (DONE, 5)
        assert b"hello from slurm" in q.read_log(ok)
    finally:
        backend.stop()
        q.close()


def test_real_slurm_cancel_cancels_the_job(slurm_cluster, tmp_path, rt) -> None:
    backend = make_backend(tmp_path, rt, probe_interval="0.5s")
    q = SqliteQueue(":memory:", RuleSettings(rt, ConfigSizer(backend.instance_types())))
    uuid = submit(q, ram=100 << 20, cmd=("sleep", "600"))
    try:
        backend.start(q)
        run_until(rt, lambda: get(q, uuid).state is R)
        q.cancel(uuid, "stop")
        rt.run_until_idle()
        run_until(rt, lambda: uuid not in backend.slurm.jobs())
        assert get(q, uuid).state is CANCELLED
    finally:
        backend.stop()
        q.close()


def test_config_check_names_bad_dispatcher_parameters(tmp_path: Path) -> None:
    """``herder config check`` as an operator runs it (real plugin discovery): the plugin's
    parameters model reports each bad key under ``dispatcher_parameters``."""
    check_config_names_bad_dispatcher_parameters("slurm", tmp_path)

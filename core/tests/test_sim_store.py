"""The sim driver's ``state_file``: a simulated cloud that outlives the process holding it.

A "restart" here is a second :class:`SimDriver` opening the same file while the first is simply
dropped, as a dispatcher killed with SIGKILL would leave it: nothing is flushed or closed.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from herder.agent.protocol import (
    config_document,
    detach_command,
    forget_command,
    kill_command,
    list_command,
)
from herder.engine.worker.runner import RunnerDeployment
from herder.model import Container, ContainerSpec, ContainerState, InstanceType
from herder.plugin.cloud import DriverContext, RateLimitError
from herder.plugin.executor import ExecResult
from herder.runtime import VirtualRuntime
from herder.testing.sim import SimDriver, SimInstanceSet, SimParameters
from herder.testing.sim_cloud import SimCloud
from herder.testing.sim_store import ProcessRecord, SimStore, read_processes

T0 = 1_700_000_000.0
RUNNER = "/tmp/herder-runner/herder-runner"
SMALL = InstanceType("small", "a.small", vcpus=2, ram=4 << 30, price=0.36)
TAGS = {"HerderInstanceSetID": "x"}


def uuid(i: int) -> str:
    return f"zzzzz-dz642-{i:015d}"


class Node:
    """One process's view of the simulated cloud: a driver on its own clock, opened from a file."""

    def __init__(self, state_file: Path, now: float = T0, **params: Any) -> None:
        params = {"boot_delay": 10.0, "check_host_keys": False, **params}
        self.runtime = VirtualRuntime(start=now)
        self.driver = SimDriver()
        self.params = SimParameters.model_validate({**params, "state_file": str(state_file)})
        self.set = self.driver.instance_set(
            self.params, DriverContext(instance_set_id="x", runtime=self.runtime)
        )
        assert isinstance(self.set, SimInstanceSet)

    @property
    def cloud(self) -> SimCloud:
        return self.set.cloud

    def create(self) -> str:
        return self.set.create(SMALL, "img", TAGS, 'echo -n "s" >/var/run/secret', None).id

    def run(self, instance_id: str, command: str, stdin: bytes = b"") -> ExecResult:
        (inst,) = [i for i in self.set.instances({}) if i.id == instance_id]
        return self.set.executor(inst).execute(command, stdin=stdin)

    def start(self, instance_id: str, i: int, seconds: float) -> ExecResult:
        spec = ContainerSpec(command=("sleep", str(seconds)))
        ctr = Container(uuid(i), ContainerState.LOCKED, 1, spec, created_at=T0)
        return self.run(
            instance_id,
            detach_command(RUNNER, "root", [], ctr.uuid),
            stdin=config_document(ctr, SMALL),
        )

    def listing(self, instance_id: str) -> str:
        result = self.run(instance_id, list_command(RUNNER, "root"))
        assert result.ok, result
        return result.stdout.decode()

    def advance(self, seconds: float) -> None:
        self.set._next_list_at = float("-inf")  # no rate limit between a test's own calls
        self.runtime.advance(seconds)


def test_a_new_file_starts_an_empty_cloud_and_remembers_its_seed(tmp_path: Path) -> None:
    state = tmp_path / "sim.db"
    node = Node(state, seed=42)
    assert node.set.instances({}) == []
    again = Node(state, seed=7)  # the file's cloud wins over the parameters of the day
    assert again.cloud.seed == 42


def test_everything_is_on_disk_when_the_call_returns(tmp_path: Path) -> None:
    state = tmp_path / "sim.db"
    a = Node(state)
    vm1, vm2 = a.create(), a.create()
    (inst,) = [i for i in a.set.instances({}) if i.id == vm2]
    inst.set_tags({**TAGS, "HerderIdleBehavior": "hold"})
    a.advance(10)
    install = RunnerDeployment(command=RUNNER, data=b"runner", md5="0").install_command("root")
    assert a.run(vm1, install, stdin=b"runner").ok
    assert a.start(vm1, 1, 60).ok
    # "killed" here: a is never closed or saved explicitly.
    b = Node(state, now=a.runtime.now())
    listed = {i.id: i for i in b.set.instances({})}
    assert sorted(listed) == [vm1, vm2]
    assert listed[vm2].tags["HerderIdleBehavior"] == "hold"
    assert listed[vm1].address == a.cloud.vm(vm1).address  # type: ignore[union-attr]
    assert b.run(vm1, f"md5sum {RUNNER}").ok
    assert b.listing(vm1) == f"{uuid(1)}\n"
    assert b.cloud.stats.to_json()["container_starts"] == 1
    assert b.cloud.stats.created == 2
    assert b.cloud.vm(vm1).host_key == a.cloud.vm(vm1).host_key  # type: ignore[union-attr]


def test_what_happened_while_nobody_held_the_cloud_has_happened(tmp_path: Path) -> None:
    state = tmp_path / "sim.db"
    a = Node(state, boot_delay=30.0)
    booted = a.create()
    a.advance(30)
    booting = a.create()
    assert a.start(booted, 1, 20).ok
    assert a.start(booted, 2, 500).ok
    assert not a.run(booting, "true").ok  # still booting
    b = Node(state, now=a.runtime.now() + 60, boot_delay=30.0)
    assert b.run(booting, "true").ok  # booted meanwhile
    assert b.listing(booted) == f"{uuid(1)} exited 0\n{uuid(2)}\n"
    stats = b.cloud.stats
    assert stats.container_completions == 1 and stats.exit_codes[0] == 1
    # Counted once: the bookkeeping done now is saved, and not done again by the next process.
    c = Node(state, now=b.runtime.now() + 1)
    assert c.cloud.stats.container_completions == 1


def test_an_instance_that_vanished_meanwhile_is_gone_and_counted(tmp_path: Path) -> None:
    state = tmp_path / "sim.db"
    a = Node(state, disappear_rate=1.0, disappear_after=50.0)
    vm = a.create()
    a.advance(10)
    assert a.start(vm, 1, 500).ok
    b = Node(state, now=a.runtime.now() + 100)
    assert b.set.instances({}) == []
    stats = b.cloud.stats
    assert stats.disappeared == 1 and stats.faults["disappear"] == 1
    assert stats.container_crashes == 1
    (proc,) = read_processes(state)
    assert (proc.instance_id, proc.ended_at, proc.exit_code, proc.cause) == (
        vm,
        T0 + 50,
        None,
        "instance_gone",
    )


def test_ids_and_pids_are_never_reused_after_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "sim.db"
    a = Node(state)
    first = a.create()
    a.advance(10)
    assert a.start(first, 1, 1).ok
    a.set.destroy(a.cloud.vm(first))  # type: ignore[arg-type]
    b = Node(state, now=a.runtime.now() + 5)
    second = b.create()
    assert second != first
    b.advance(10)
    assert b.start(second, 2, 1).ok
    pids = [p.pid for p in read_processes(state)]
    assert len(pids) == len(set(pids)) == 2


def test_a_second_copy_started_after_a_restart_is_a_double_run(tmp_path: Path) -> None:
    state = tmp_path / "sim.db"
    a = Node(state)
    vm_a, vm_b = a.create(), a.create()
    a.advance(10)
    assert a.start(vm_a, 1, 100).ok
    b = Node(state, now=a.runtime.now() + 10)
    assert b.start(vm_b, 1, 100).ok
    assert b.cloud.stats.double_runs == 1
    assert b.cloud.stats.double_run_details[0].other_instance_ids == (vm_a,)
    # ... and the same start after the first copy ended is not.
    c = Node(state, now=b.runtime.now() + 200)
    assert c.start(vm_a, 1, 10).ok
    assert c.cloud.stats.double_runs == 1


def test_a_fault_raised_from_a_call_is_saved_too(tmp_path: Path) -> None:
    state = tmp_path / "sim.db"
    a = Node(state, min_time_between_create_calls=10.0)
    a.create()
    with pytest.raises(RateLimitError):
        a.create()
    b = Node(state)
    assert b.cloud.stats.faults["rate_limit"] == 1
    assert b.cloud.stats.call_count("create", "rate_limit") == 1


def test_the_history_keeps_forgotten_and_destroyed_processes(tmp_path: Path) -> None:
    state = tmp_path / "sim.db"
    a = Node(state, kill_delay=0.0)
    vm1, vm2 = a.create(), a.create()
    a.advance(10)
    assert a.start(vm1, 1, 5).ok
    assert a.start(vm2, 2, 100).ok
    a.advance(5)
    assert a.run(vm1, forget_command(RUNNER, "root", uuid(1))).ok
    assert a.run(vm2, kill_command(RUNNER, "root", 15, uuid(2))).ok
    a.set.destroy(a.cloud.vm(vm2))  # type: ignore[arg-type]
    b = Node(state, now=a.runtime.now())
    assert b.listing(vm1) == ""
    assert read_processes(state) == [
        ProcessRecord(1000, uuid(1), vm1, T0 + 10, T0 + 15, 0, "exit"),
        ProcessRecord(1001, uuid(2), vm2, T0 + 10, T0 + 15, 143, "killed"),
    ]
    assert b.cloud.stats.container_kills == 1


def test_a_call_that_changes_nothing_writes_nothing(tmp_path: Path) -> None:
    state = tmp_path / "sim.db"
    a = Node(state)
    a.create()
    before = _data_version(state)
    (inst,) = a.set.instances({})  # counts a list call: written
    after_list = _data_version(state)
    assert after_list != before
    for _ in range(3):
        assert inst.address  # reads the cloud under its lock, changes nothing
    assert _data_version(state) == after_list


def _data_version(path: Path) -> tuple[object, ...]:
    """Row counts and meta values: enough to see whether anything was written."""
    db = sqlite3.connect(path)
    try:
        return tuple(r[0] for r in db.execute("SELECT value FROM meta ORDER BY key")) + tuple(
            db.execute("SELECT count(*) FROM processes").fetchone()
        )
    finally:
        db.close()


def test_a_file_of_another_format_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "sim.db"
    SimStore(state).close()
    db = sqlite3.connect(state)
    db.execute("UPDATE meta SET value = '999' WHERE key = 'format'")
    db.commit()
    db.close()
    with pytest.raises(ValueError, match="format 999"):
        SimStore(state)


def test_without_a_state_file_nothing_is_written(tmp_path: Path) -> None:
    driver = SimDriver()
    iset = driver.instance_set(
        SimParameters(boot_delay=0.0), DriverContext(instance_set_id="x", runtime=None)
    )
    assert isinstance(iset, SimInstanceSet)
    iset.create(SMALL, "img", TAGS, "", None)
    assert type(iset.cloud.lock).__name__ == "RLock"
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- shared while live


def test_two_live_processes_share_one_cloud(tmp_path: Path) -> None:
    """A leader and its standby on one state file see one cloud, as they would a real one: what
    one creates, starts, tags or destroys, the other lists, finds running and sees changed,
    without either being restarted."""
    state = tmp_path / "sim.db"
    a, b = Node(state), Node(state)
    vm = a.create()
    assert [i.id for i in b.set.instances({})] == [vm]
    a.advance(10)
    b.advance(10)
    install = RunnerDeployment(command=RUNNER, data=b"runner", md5="0").install_command("root")
    assert a.run(vm, install, stdin=b"runner").ok
    assert a.start(vm, 1, 60).ok
    assert b.listing(vm) == f"{uuid(1)}\n"  # b's executor reads what a's started
    (inst,) = b.set.instances({})
    inst.set_tags({**TAGS, "HerderIdleBehavior": "drain"})
    a.advance(1)
    (seen,) = a.set.instances({})
    assert seen.tags["HerderIdleBehavior"] == "drain"
    assert b.cloud.stats.to_json()["container_starts"] == 1
    inst.destroy()
    a.advance(1)
    b.advance(1)
    assert a.set.instances({}) == [] and b.set.instances({}) == []


def test_a_container_started_by_both_is_a_double_run(tmp_path: Path) -> None:
    """The check a failover test relies on: one container alive on two instances at once,
    started by two processes, is counted once in the shared statistics."""
    state = tmp_path / "sim.db"
    a, b = Node(state), Node(state)
    vm1, vm2 = a.create(), b.create()
    a.advance(10)
    b.advance(10)
    install = RunnerDeployment(command=RUNNER, data=b"runner", md5="0").install_command("root")
    assert a.run(vm1, install, stdin=b"runner").ok and b.run(vm2, install, stdin=b"runner").ok
    assert a.start(vm1, 7, 60).ok
    assert b.start(vm2, 7, 60).ok
    with a.cloud.lock:  # the statistics as the file has them now, b's start included
        (double,) = a.cloud.stats.double_run_details
    assert (double.uuid, double.instance_id) == (uuid(7), vm2)
    starts = [(p.uuid, p.instance_id) for p in read_processes(state)]
    assert starts == [(uuid(7), vm1), (uuid(7), vm2)]


def test_the_file_is_held_for_the_whole_of_a_call(tmp_path: Path) -> None:
    """While one process holds the cloud, another cannot write the file: its saves wait."""
    state = tmp_path / "sim.db"
    a = Node(state)
    a.create()
    other = sqlite3.connect(state, timeout=0.05)
    with a.cloud.lock, pytest.raises(sqlite3.OperationalError, match="locked"):
        other.execute("BEGIN IMMEDIATE")
    other.execute("BEGIN IMMEDIATE")
    other.execute("ROLLBACK")
    other.close()


def test_processes_wanting_the_file_take_turns(tmp_path: Path) -> None:
    """A holder that wants the file again while another waits gets it after the waiter: a
    dispatcher calling the cloud back to back cannot starve a standby that is starting.

    Each :class:`FileTurns` here has descriptors of its own, as a process has (flocks of
    different open files exclude each other even in one process)."""
    import fcntl
    import threading
    import time

    from herder.testing.sim_store import FileTurns

    path = str(tmp_path / "sim.db")
    busy, starting = FileTurns(path), FileTurns(path)
    order: list[str] = []

    def waiting_for_turn() -> bool:
        """Whether someone keeps the turn while waiting for the file (a probe of our own)."""
        with open(path + ".turn", "rb") as probe:
            try:
                fcntl.flock(probe.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(probe.fileno(), fcntl.LOCK_UN)
            return False

    def take(turns: FileTurns, name: str) -> None:
        turns.acquire()
        order.append(name)
        turns.release()

    busy.acquire()
    waiter = threading.Thread(target=take, args=(starting, "starting"))
    waiter.start()
    deadline = time.monotonic() + 30
    while not waiting_for_turn():  # the starting one holds the turn, blocked on the file
        assert time.monotonic() < deadline
    busy.release()
    again = threading.Thread(target=take, args=(busy, "busy again"))
    again.start()
    waiter.join(30)
    again.join(30)
    assert order == ["starting", "busy again"]
    busy.close()
    starting.close()

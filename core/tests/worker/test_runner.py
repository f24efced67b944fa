"""Starting and killing containers through runners (SPEC §3.8, §4)."""

from __future__ import annotations

from worker_fakes import Harness, container, uuid

from herder.agent import protocol as runner_protocol
from herder.model import IdleBehavior

C1 = uuid(1)
C2 = uuid(2)


def booted() -> tuple[Harness, str]:
    h = Harness(timeout_signal=5, timeout_term=120)
    return h, h.create_booted()


def kill_times(h: Harness, iid: str) -> list[float]:
    host = h.cloud.vms[iid].host
    return [t for (c, _), t in zip(host.commands, host.times, strict=True) if " --kill " in c]


def test_start_container_runs_detach_with_config_on_stdin() -> None:
    h, iid = booted()
    h.runtime.advance(30)
    ctr = container(1, created_at=h.runtime.now() - 12)
    assert h.pool.start_container(iid, ctr)
    assert h.state(iid) == "running"  # at once, before the command returns
    assert h.pool.running() == {C1: 0.0}
    h.idle()
    host = h.cloud.vms[iid].host
    cmd, stdin = host.commands[-1]
    runner = h.pool._runner.command
    assert cmd == runner_protocol.detach_command(runner, "admin", ["--foo", "--extra='args'"], C1)
    assert cmd.startswith(f"sudo {runner} --detach --stdin-config --foo ")
    assert stdin == runner_protocol.config_document(ctr, h.types["small"], "process", 64 << 20)
    w = h.worker(iid)
    assert list(w.running) == [C1] and w.starting == {}
    assert w.last_uuid == C1
    assert h.reporter.started == [(C1, iid, "small")]
    assert h.metric("herder_containers_time_from_queue_to_crunch_run_seconds_sum") == 12


def test_start_refused_unless_idle_or_running_and_run() -> None:
    h, iid = booted()
    assert not h.pool.start_container("nope", container(1))
    h.pool.set_idle_behavior(iid, IdleBehavior.HOLD)
    assert not h.pool.start_container(iid, container(1))
    h.pool.set_idle_behavior(iid, IdleBehavior.RUN)
    assert h.pool.start_container(iid, container(1))
    h.idle()
    assert h.pool.start_container(iid, container(1))  # already there: not started twice
    h.idle()
    assert h.cloud.vms[iid].host.verbs().count("--detach") == 1

    h2 = Harness()
    assert h2.pool.create(h2.types["small"]) is not None
    h2.idle()
    iid2 = max(h2.pool._workers)
    assert h2.state(iid2) == "booting"
    assert not h2.pool.start_container(iid2, container(2))


def test_failed_start_is_ended_by_next_probe() -> None:
    h, iid = booted()
    h.cloud.vms[iid].host.detach_fails = True
    h.pool.start_container(iid, container(1))
    h.idle()
    assert list(h.worker(iid).running) == [C1]  # outcome unknown: assume it may run
    assert h.reporter.started == []
    h.probe(iid)
    assert h.state(iid) == "idle"
    assert h.pool.running() == {C1: h.runtime.now()}


def test_probe_moves_starting_runner_to_running_once() -> None:
    h, iid = booted()
    host = h.cloud.vms[iid].host
    host.containers[C1] = "running"  # the probe sees it before the start command returns
    h.pool.start_container(iid, container(1))
    w = h.worker(iid)
    runner = w.starting[C1]
    w.probe_and_update()
    assert w.running[C1] is runner and w.starting == {}
    h.idle()  # the start task finds the runner already moved and leaves it alone
    assert w.running[C1] is runner


def test_kill_sends_term_and_closes_runner() -> None:
    h, iid = booted()
    h.pool.start_container(iid, container(1))
    h.idle()
    n = h.notifications
    assert h.pool.kill_container(C1, "cancelled")
    assert h.pool.kill_container(C1, "again")  # idempotent: no second loop
    h.idle()
    host = h.cloud.vms[iid].host
    assert host.commands[-1][0] == f"sudo {h.pool._runner.command} --kill 15 {C1}"
    assert host.verbs().count("--kill") == 1
    assert h.state(iid) == "idle"
    assert h.pool.running() == {C1: h.runtime.now()}
    assert h.notifications > n
    h.pool.forget_container(C1)
    assert h.pool.running() == {}
    assert not h.pool.kill_container(C1, "gone")


def test_kill_escalation_repeats_term_then_drains() -> None:
    h, iid = booted()
    h.pool.start_container(iid, container(1))
    h.idle()
    h.cloud.vms[iid].host.kill_works = False
    t0 = h.runtime.now()
    h.pool.kill_container(C1, "cancelled")
    h.runtime.advance(120)
    times = kill_times(h, iid)
    assert times == [t0 + 5 * i for i in range(25)]  # TERM every 5 s, the last at the deadline
    assert h.worker(iid).idle_behavior == IdleBehavior.RUN
    assert all(" --kill 15 " in c for c, _ in h.cloud.vms[iid].host.commands if "--kill" in c)
    h.runtime.advance(5)
    assert len(kill_times(h, iid)) == 25  # gave up, no SIGKILL
    w = h.worker(iid)
    assert w.running[C1].givenup
    assert w.idle_behavior == IdleBehavior.DRAIN
    # Draining, and every runner has given up: nothing left to wait for.
    assert h.state(iid) == "shutdown"
    h.runtime.advance(60)
    assert len(kill_times(h, iid)) == 25


def test_unkillable_on_held_worker_does_not_drain() -> None:
    h, iid = booted()
    h.pool.start_container(iid, container(1))
    h.idle()
    h.pool.set_idle_behavior(iid, IdleBehavior.HOLD)
    h.cloud.vms[iid].host.kill_works = False
    h.pool.kill_container(C1, "cancelled")
    h.runtime.advance(200)
    w = h.worker(iid)
    assert w.running[C1].givenup
    assert w.idle_behavior == IdleBehavior.HOLD
    assert h.state(iid) == "running"


def test_kill_succeeding_later_stops_escalation() -> None:
    h, iid = booted()
    h.pool.start_container(iid, container(1))
    h.idle()
    host = h.cloud.vms[iid].host
    host.kill_works = False
    h.pool.kill_container(C1, "cancelled")
    h.runtime.advance(10)
    host.kill_works = True
    h.runtime.advance(5)
    assert len(kill_times(h, iid)) == 4
    h.runtime.advance(200)
    assert len(kill_times(h, iid)) == 4
    assert h.state(iid) == "idle"
    assert h.worker(iid).idle_behavior == IdleBehavior.RUN


def test_kill_while_starting_waits_for_start_to_return() -> None:
    """SPEC §19 item 14: a kill before --detach returns is sent after it, not before."""
    h, iid = booted()
    h.pool.start_container(iid, container(1))
    assert h.pool.kill_container(C1, "cancelled")  # found in `starting`
    h.idle()
    host = h.cloud.vms[iid].host
    verbs = host.verbs()
    assert verbs.index("--detach") < verbs.index("--kill")
    assert C1 not in host.containers
    assert h.state(iid) == "idle"
    assert h.pool.running() == {C1: h.runtime.now()}


def test_detected_runner_can_be_killed() -> None:
    h, iid = booted()
    h.cloud.vms[iid].host.containers[C2] = "running"
    h.probe(iid)
    assert h.state(iid) == "running"
    assert h.pool.kill_container(C2, "orphan")
    h.idle()
    assert h.state(iid) == "idle"


def test_close_abandons_runners_without_exit_records() -> None:
    h, iid = booted()
    h.pool.start_container(iid, container(1))
    h.idle()
    h.cloud.vms[iid].destroyed = True  # vanished from the cloud
    h.sync()
    assert h.state(iid) == "gone"
    assert h.pool.running() == {}
    assert h.executors[iid].closed == 1


def test_kill_requested_during_a_slow_start_is_deferred_and_its_deadline_starts_after() -> None:
    """A start command that outlasts timeout_term must not make the kill give up at once."""
    h, iid = booted()
    w = h.worker(iid)
    host = h.cloud.vms[iid].host
    host.kill_works = False
    with h.pool._lock:
        runner = w.new_runner(C1, container(1))
        w.starting[C1] = runner
        runner.kill("cancelled")
    h.runtime.advance(300)  # the start command is still running, far past timeout_term
    assert "--kill" not in host.verbs()
    assert runner.start()
    with h.pool._lock:
        del w.starting[C1]
        w.running[C1] = runner
        runner.start_finished()
    t1 = h.runtime.now()
    h.runtime.advance(1)
    assert kill_times(h, iid) == [t1]  # TERM right after the start returned, not given up
    assert not runner.givenup
    host.kill_works = True
    h.runtime.advance(5)
    assert w.running == {} and C1 not in host.containers
    assert w.idle_behavior == IdleBehavior.RUN

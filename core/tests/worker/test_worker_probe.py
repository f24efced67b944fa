"""The worker state machine: probe outcomes, runner deployment, --list parsing (SPEC §3)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex

import pytest
from worker_fakes import RUNNER, Harness, uuid

from herder.agent import protocol as runner_protocol
from herder.engine.worker.runner import RunnerDeployment
from herder.engine.worker.worker import ADOPTED_LOG_NOTE
from herder.model import IdleBehavior, WorkerState
from herder.plugin.executor import ExecutorError, NoAddressError

TB = 600.0  # timeout_booting
TP = 300.0  # timeout_probe
C1 = uuid(1)
C2 = uuid(2)  # started by this herder process (C1 is found running, i.e. adopted)


def setup_worker(
    state: str,
    *,
    age: float,
    boot_ok: bool = True,
    run_ok: bool = True,
    containers: tuple[str, ...] = (),
    runners: tuple[str, ...] = (),
    behavior: str = "run",
) -> tuple[Harness, str]:
    h = Harness(timeout_booting=TB, timeout_probe=TP)
    vm = h.cloud.add_vm(h.tags(behavior=behavior))
    h.sync()
    w = h.worker(vm.id)
    now = h.runtime.now()
    with h.pool._lock:
        w.state = WorkerState(state)
        w.appeared = w.probed = now - age
        for u in runners:
            w.running[u] = w.new_runner(u, None)
    vm.host.boot_ok = boot_ok
    vm.host.list_fails = not run_ok
    for u in containers:
        vm.host.containers[u] = "running"
    return h, vm.id


# state, boot ok, run ok, age, containers listed, runners known, idle behaviour
#   -> expected state, whether the run probe ran
PROBE_TABLE = [
    ("unknown", False, True, 10, (), (), "run", "unknown", True),
    ("unknown", False, True, TB, (), (), "run", "shutdown", True),
    ("unknown", False, False, TB, (), (), "run", "shutdown", True),
    ("unknown", False, True, TB + 100, (C1,), (), "run", "unknown", True),
    ("unknown", False, False, TB + 100, (), (), "hold", "unknown", True),
    ("unknown", True, True, 10, (), (), "run", "idle", True),
    ("unknown", True, True, 10, (C1,), (), "run", "running", True),
    ("unknown", True, False, 10, (), (), "run", "unknown", True),
    ("booting", False, True, 10, (), (), "run", "booting", False),
    ("booting", False, True, TB, (), (), "run", "shutdown", False),
    ("booting", False, True, TB, (), (), "hold", "booting", False),
    ("booting", True, False, 10, (), (), "run", "booting", True),
    ("booting", True, False, TB, (), (), "run", "shutdown", True),
    ("booting", True, True, 10, (), (), "run", "idle", True),
    ("booting", True, True, 10, (C1,), (), "run", "running", True),
    ("idle", False, True, 10, (), (), "run", "idle", True),
    ("idle", True, False, TP - 1, (), (), "run", "idle", True),
    ("idle", True, False, TP, (), (), "run", "shutdown", True),
    ("idle", True, False, TP, (), (), "hold", "idle", True),
    ("idle", True, True, 10, (C1,), (), "run", "running", True),
    ("running", True, False, TP - 1, (), (C1,), "run", "running", True),
    ("running", True, False, TP, (), (C1,), "run", "shutdown", True),
    ("running", True, True, 10, (), (C1,), "run", "idle", True),
    ("running", True, True, 10, (C1,), (C1,), "run", "running", True),
]


@pytest.mark.parametrize(
    "state,boot_ok,run_ok,age,containers,runners,behavior,expect,listed", PROBE_TABLE
)
def test_probe_table(
    state: str,
    boot_ok: bool,
    run_ok: bool,
    age: float,
    containers: tuple[str, ...],
    runners: tuple[str, ...],
    behavior: str,
    expect: str,
    listed: bool,
) -> None:
    h, iid = setup_worker(
        state,
        age=age,
        boot_ok=boot_ok,
        run_ok=run_ok,
        containers=containers,
        runners=runners,
        behavior=behavior,
    )
    vm = h.cloud.vms[iid]
    h.probe(iid)
    assert h.state(iid) == expect
    assert ("--list" in vm.host.verbs()) == listed
    assert (vm.destroy_calls > 0) == (expect == "shutdown")
    if expect != "shutdown" and run_ok and (listed or runners):
        assert sorted(h.worker(iid).running) == sorted(containers)


def test_boot_outcomes_reported_once() -> None:
    h, iid = setup_worker("booting", age=10)
    h.probe(iid)
    assert h.metric("herder_boot_outcomes_total", outcome="success") == 1
    h.pool.kill_instance(iid, "test")  # would report "aborted", but the first report wins
    assert h.metric("herder_boot_outcomes_total", outcome="aborted") == 0
    assert h.worker(iid).boot_outcome.value == "success"

    h, iid = setup_worker("booting", age=TB, boot_ok=False)
    h.probe(iid)
    assert h.metric("herder_boot_outcomes_total", outcome="failure") == 1


def test_unknown_worker_copies_runner_even_when_boot_probe_fails() -> None:
    h, iid = setup_worker("unknown", age=10, boot_ok=False, containers=(C1,))
    h.probe(iid)
    verbs = h.cloud.vms[iid].host.verbs()
    assert verbs[:4] == ["boot", "md5sum", "install", "--list"]
    assert h.state(iid) == "unknown"
    assert list(h.worker(iid).running) == [C1]
    assert h.reporter.started == [(C1, iid, "small")]


def test_booting_worker_not_copied_when_boot_probe_fails() -> None:
    h, iid = setup_worker("booting", age=10, boot_ok=False)
    h.probe(iid)
    assert h.cloud.vms[iid].host.verbs() == ["boot"]


def test_unknown_worker_with_containers_survives_boot_timeout() -> None:
    """SPEC §19 item 11: probe rounds must not shut down an unknown worker with containers."""
    h, iid = setup_worker("unknown", age=10, boot_ok=False, containers=(C1,))
    h.probe(iid)
    h.runtime.advance(TB + 60)
    h.pool.probe_round()
    h.idle()
    assert h.state(iid) == "unknown"
    assert h.cloud.vms[iid].destroy_calls == 0
    # Once the container is gone, the boot timeout applies.
    del h.cloud.vms[iid].host.containers[C1]
    h.probe(iid)
    h.pool.probe_round()
    h.idle()
    assert h.state(iid) == "shutdown"


def test_failure_measured_from_last_successful_probe_start() -> None:
    h, iid = setup_worker("idle", age=0)
    vm = h.cloud.vms[iid]
    h.runtime.advance(100)
    h.probe(iid)  # success at t=100
    vm.host.list_fails = True
    h.runtime.advance(TP - 1)
    h.probe(iid)
    assert h.state(iid) == "idle"
    h.runtime.advance(1)
    h.probe(iid)
    assert h.state(iid) == "shutdown"


def test_probe_result_discarded_if_worker_changed_during_probe() -> None:
    h, iid = setup_worker("idle", age=10, containers=(C1,))
    w = h.worker(iid)

    def touch(kind: str) -> None:
        if kind == "--list":
            with h.pool._lock:
                w.touch()

    h.cloud.vms[iid].host.hook = touch
    h.probe(iid)
    assert h.state(iid) == "idle"
    assert w.running == {}
    h.cloud.vms[iid].host.hook = None
    h.probe(iid)
    assert h.state(iid) == "running"


def test_concurrent_probe_is_skipped() -> None:
    h, iid = setup_worker("idle", age=10)
    w = h.worker(iid)
    seen: list[str] = []

    def nested(kind: str) -> None:
        if kind == "--list" and not seen:
            seen.append(kind)
            w.probe_and_update()  # a second probe while the first runs: returns at once

    h.cloud.vms[iid].host.hook = nested
    h.probe(iid)
    assert h.cloud.vms[iid].host.verbs().count("--list") == 1


def test_no_address_boot_probe_keeps_booting() -> None:
    h, iid = setup_worker("booting", age=10)
    h.cloud.vms[iid].address = ""
    h.probe(iid)
    assert h.state(iid) == "booting"


def test_boot_probe_executor_error_is_a_failed_boot() -> None:
    h, iid = setup_worker("booting", age=10)
    h.cloud.vms[iid].host.boot_error = ExecutorError("connection refused")
    h.probe(iid)
    assert h.state(iid) == "booting"
    h.cloud.vms[iid].host.boot_error = NoAddressError()
    h.probe(iid)
    assert h.state(iid) == "booting"


def test_every_command_has_the_configured_timeout() -> None:
    h, iid = setup_worker("booting", age=10, containers=(C1,))
    h.probe(iid)
    h.pool.kill_container(C1, "test")
    h.idle()
    timeouts = h.executors[iid].timeouts
    assert timeouts and set(timeouts) == {h.config.cloud.timeout_command}


# --------------------------------------------------------------------------- deployment


def runner_path() -> str:
    return f"/var/lib/herder/runner/herder-runner~{hashlib.md5(RUNNER).hexdigest()}"


def test_runner_already_installed_is_not_copied() -> None:
    h, iid = setup_worker("booting", age=10)
    host = h.cloud.vms[iid].host
    host.installed[runner_path()] = RUNNER
    h.probe(iid)
    assert host.verbs() == ["boot", "md5sum", "--list"]
    check = shlex.split(host.commands[1][0])
    assert check[:3] == ["sudo", "sh", "-c"]
    assert check[3].endswith('md5sum "$dstfile"')
    assert f"dstfile={shlex.quote(runner_path())};" in check[3]
    assert host.commands[2][0] == f"sudo {runner_path()} --list"
    assert h.state(iid) == "idle"


def test_runner_installed_from_stdin_with_sudo_wrapping() -> None:
    h, iid = setup_worker("booting", age=10)
    host = h.cloud.vms[iid].host
    host.installed[runner_path()] = b"old version"
    h.probe(iid)
    assert host.verbs() == ["boot", "md5sum", "install", "--list"]
    cmd, stdin = host.commands[2]
    path = runner_path()
    argv = shlex.split(cmd)
    assert argv[:3] == ["sudo", "sh", "-c"]
    assert argv[3].startswith(
        f"set -e; umask 077; dstdir=/var/lib/herder/runner; dstfile={shlex.quote(path)}; "
    )
    assert argv[3].endswith('cat >"$tmp"; chmod 0700 "$tmp"; mv -f "$tmp" "$dstfile"')
    assert stdin == RUNNER
    assert host.installed[path] == RUNNER


def test_runner_install_as_root_has_no_sudo() -> None:
    h, iid = setup_worker("booting", age=10)
    h.cloud.vms[iid].remote_user = "root"
    h.probe(iid)
    host = h.cloud.vms[iid].host
    assert host.commands[2][0].startswith(
        "sh -c 'set -e; umask 077; dstdir=/var/lib/herder/runner;"
    )
    assert host.commands[3][0] == f"{runner_path()} --list"


def test_install_snippet_quote_escaping() -> None:
    dep = RunnerDeployment.build(b"x", "/opt/o'dir", "unused")
    cmd = dep.install_command("admin")
    assert shlex.split(cmd)[:3] == ["sudo", "sh", "-c"]
    assert "dstdir='/opt/o'\"'\"'dir';" in shlex.split(cmd)[3]
    assert dep.md5_expected_output() == f"{hashlib.md5(b'x').hexdigest()}  {dep.command}\n".encode()
    assert RunnerDeployment.build(None, "/opt", "herder-runner").command == "herder-runner"


def test_install_failure_means_not_booted() -> None:
    h, iid = setup_worker("booting", age=10)
    h.cloud.vms[iid].host.hook = lambda kind: (
        (_ for _ in ()).throw(ExecutorError("disk full")) if kind == "install" else None
    )
    h.probe(iid)
    assert h.state(iid) == "booting"
    assert "--list" not in h.cloud.vms[iid].host.verbs()


def test_deploy_disabled_uses_configured_runner_command() -> None:
    h = Harness(runner_data=None)
    vm = h.cloud.add_vm(h.tags())
    h.sync()
    h.probe(vm.id)
    assert vm.host.verbs() == ["boot", "--list"]
    assert vm.host.commands[1][0] == "sudo herder-runner --list"


# --------------------------------------------------------------------------- --list parsing


def test_other_clusters_and_malformed_lines_are_ignored() -> None:
    h, iid = setup_worker("idle", age=10)
    host = h.cloud.vms[iid].host
    host.extra_list_lines = [uuid(9, cluster="yyyyy"), f"{uuid(8)} something else", "zzzzz-bad"]
    h.probe(iid)
    assert h.state(iid) == "idle"
    assert h.worker(iid).running == {}


def test_price_history_sent_on_stdin() -> None:
    from herder.plugin.cloud import InstancePrice

    h, iid = setup_worker("idle", age=10)
    vm = h.cloud.vms[iid]
    vm.prices = [InstancePrice(1000.0, 0.5)]
    h.probe(iid)
    cmd, stdin = vm.host.commands[-1]
    assert cmd.endswith("--list --stdin-prices")
    assert json.loads(stdin or b"") == [{"StartTime": 1000.0, "Price": 0.5}]


def test_broken_drains_and_shuts_down_idle_worker() -> None:
    h, iid = setup_worker("idle", age=10)
    h.cloud.vms[iid].host.broken = True
    h.probe(iid)
    assert h.worker(iid).idle_behavior == IdleBehavior.DRAIN
    assert h.state(iid) == "shutdown"
    assert h.cloud.vms[iid].tags["HerderIdleBehavior"] == "drain"


def test_broken_running_worker_drains_without_shutdown() -> None:
    h, iid = setup_worker("idle", age=10, containers=(C1,))
    h.probe(iid)
    h.cloud.vms[iid].host.broken = True
    h.probe(iid)
    assert h.worker(iid).idle_behavior == IdleBehavior.DRAIN
    assert h.state(iid) == "running"


@pytest.mark.parametrize("behavior", ["hold", "drain"])
def test_broken_ignored_unless_idle_behavior_run(behavior: str) -> None:
    h, iid = setup_worker("running", age=10, containers=(C1,), runners=(C1,), behavior=behavior)
    h.cloud.vms[iid].host.broken = True
    h.probe(iid)
    assert h.worker(iid).idle_behavior == IdleBehavior(behavior)


def test_stale_lock_becomes_broken_after_timeout() -> None:
    h, iid = setup_worker("idle", age=10)
    host = h.cloud.vms[iid].host
    host.containers[C1] = "stale"
    h.probe(iid)
    assert h.worker(iid).idle_behavior == IdleBehavior.RUN
    assert h.worker(iid).running == {}  # a stale lock is not a running container
    h.runtime.advance(5)  # not more than timeout_stale_run_lock (5s)
    h.probe(iid)
    assert h.worker(iid).idle_behavior == IdleBehavior.RUN
    h.runtime.advance(1)
    h.probe(iid)
    assert h.worker(iid).idle_behavior == IdleBehavior.DRAIN
    assert h.state(iid) == "shutdown"


def test_stale_lock_timer_resets_when_lock_goes_away() -> None:
    h, iid = setup_worker("idle", age=10)
    host = h.cloud.vms[iid].host
    host.containers[C1] = "stale"
    h.probe(iid)
    del host.containers[C1]
    h.runtime.advance(10)
    h.probe(iid)
    host.containers[C1] = "stale"
    h.probe(iid)
    h.runtime.advance(3)
    h.probe(iid)
    assert h.worker(iid).idle_behavior == IdleBehavior.RUN


def test_exited_container_is_collected_then_forgotten() -> None:
    h, iid = setup_worker("idle", age=10, containers=(C1,))
    h.probe(iid)
    host = h.cloud.vms[iid].host
    host.containers[C1] = ("exited", 3)
    host.logs[C1] = b"hello\n"
    h.runtime.advance(10)
    h.probe(iid)
    assert h.reporter.exited == [(C1, 3, b"")]
    # Stored before the exit is recorded; C1 was running before this herder process started.
    assert h.reporter.logs == {C1: ADOPTED_LOG_NOTE + b"hello\n"}
    verbs = host.verbs()
    assert verbs[-3:] == ["--list", "--log", "--forget"]
    assert host.commands[-2][0] == runner_protocol.log_command(runner_path(), "admin", C1)
    assert C1 not in host.containers
    assert h.state(iid) == "idle"
    assert h.pool.running() == {C1: h.runtime.now()}  # exited placeholder for the scheduler


def test_exit_collection_repeats_until_forgotten() -> None:
    h, iid = setup_worker("idle", age=10)
    host = h.cloud.vms[iid].host
    host.containers[C1] = ("exited", 0)
    host.log_fails = True
    host.forget_fails = True
    h.probe(iid)
    h.probe(iid)
    assert h.reporter.exited == [(C1, 0, b""), (C1, 0, b"")]
    host.forget_fails = False
    h.probe(iid)
    h.probe(iid)
    assert len(h.reporter.exited) == 3
    assert h.worker(iid).running == {}


def test_an_exit_the_queue_cannot_record_stays_on_the_instance_until_it_can() -> None:
    h, iid = setup_worker("idle", age=10, containers=(C1,))
    h.probe(iid)
    host = h.cloud.vms[iid].host
    host.containers[C1] = ("exited", 3)
    recorded = h.reporter.container_exited
    attempts: list[str] = []

    def disk_full(uuid: str, exit_code: int, log: bytes) -> None:
        attempts.append(uuid)
        raise OSError(28, "No space left on device")

    h.reporter.container_exited = disk_full  # type: ignore[method-assign]
    h.runtime.advance(10)
    h.probe(iid)
    assert attempts == [C1]
    assert "--forget" not in host.verbs()  # the result is still on the instance
    assert host.containers[C1] == ("exited", 3)
    assert h.state(iid) == "idle"  # the probe itself went on
    h.reporter.container_exited = recorded  # type: ignore[method-assign]
    h.runtime.advance(10)
    h.probe(iid)
    assert h.reporter.exited == [(C1, 3, b"")]
    assert host.verbs()[-1] == "--forget" and C1 not in host.containers


# --------------------------------------------------------------------------- runner events


def test_a_runner_event_probes_the_worker_at_once() -> None:
    """The resident runner's "a container ended" triggers a probe without waiting a round."""
    h, vm_id = setup_worker("running", age=10, containers=(C1,), runners=(C1,))
    vm = h.cloud.vms[vm_id]
    vm.host.containers[C1] = ("exited", 0)
    before = vm.host.verbs().count("--list")
    h.worker(vm_id).runner_changed()
    h.runtime.run_until_idle()
    assert vm.host.verbs().count("--list") == before + 1
    assert vm.host.verbs()[-2:] == ["--log", "--forget"]  # the result was collected


def test_a_runner_event_during_a_probe_makes_it_probe_once_more(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The probe's --list may have run just before the exit: it runs once more when it ends."""
    h, vm_id = setup_worker("running", age=10, containers=(C1,), runners=(C1,))
    vm, w = h.cloud.vms[vm_id], h.worker(vm_id)
    lists = []

    def event_during_first_list(kind: str) -> None:
        if kind != "--list":
            return
        lists.append(kind)
        if len(lists) == 1:
            # The event's probe attempt runs at once, on "another thread", while this probe
            # holds the worker: it cannot start, and must not be lost.
            with monkeypatch.context() as m:
                m.setattr(h.runtime, "spawn", lambda fn: fn())
                w.runner_changed()
        elif len(lists) == 2:
            vm.host.containers[C1] = ("exited", 0)  # the exit the first listing missed

    vm.host.hook = event_during_first_list
    w.probe_and_update()
    h.runtime.run_until_idle()
    assert len(lists) == 2
    assert vm.host.verbs()[-2:] == ["--log", "--forget"]


def test_probe_error_shows_in_the_instance_view_until_a_probe_succeeds() -> None:
    h, iid = setup_worker("idle", age=10)
    vm = h.cloud.vms[iid]

    def view() -> str:
        return next(v.probe_error for v in h.pool.instances() if v.instance == iid)

    vm.host.list_fails = True
    h.probe(iid)
    assert "exit status 1" in view()
    vm.host.list_fails = False
    h.probe(iid)
    assert view() == ""


def test_boot_probe_error_shows_in_the_instance_view() -> None:
    h, iid = setup_worker("booting", age=10)
    vm = h.cloud.vms[iid]
    vm.host.boot_error = ExecutorError("bastion herder@jump:22: connection lost")
    h.probe(iid)
    assert "bastion herder@jump:22" in next(
        v.probe_error for v in h.pool.instances() if v.instance == iid
    )


def test_live_log_pieces_are_stored_once_whichever_comes_first() -> None:
    h, iid = setup_worker("idle", age=10)
    h.probe(iid)
    worker = h.worker(iid)
    worker.relay_log(C2, 0, b"stdout a\n")
    worker.relay_log(C2, 0, b"stdout a\n")  # a new serve process sends from the start
    worker.relay_log(C2, 9, b"stdout b\n")
    worker.relay_log(C2, 30, b"stdout gap\n")  # beyond what is stored: left to the exit
    assert h.reporter.logs == {C2: b"stdout a\nstdout b\n"}
    host = h.cloud.vms[iid].host
    host.containers[C2] = ("exited", 0)
    host.logs[C2] = b"stdout a\nstdout b\nstderr c\n"
    h.runtime.advance(10)
    h.probe(iid)
    assert h.reporter.logs == {C2: b"stdout a\nstdout b\nstderr c\n"}
    assert h.reporter.exited == [(C2, 0, b"")]


def test_an_adopted_containers_log_is_stored_again_after_a_note() -> None:
    h, iid = setup_worker("idle", age=10, containers=(C1,))
    h.probe(iid)  # found running: a previous herder process started it
    h.worker(iid).relay_log(C1, 0, b"stdout a\n")
    h.worker(iid).relay_log(C1, 9, b"stdout b\n")
    assert h.reporter.logs == {C1: ADOPTED_LOG_NOTE + b"stdout a\nstdout b\n"}


def test_herder_cuts_a_log_the_runner_did_not_cut_at_the_limit() -> None:
    h, iid = setup_worker("idle", age=10, containers=(C1,))
    h.probe(iid)
    worker = h.worker(iid)
    limit = 100
    worker.env.settings = dataclasses.replace(worker.env.settings, log_limit=limit)
    worker.relay_log(C2, 0, b"x" * (limit + 2000))
    worker.relay_log(C2, limit + 2000, b"more\n")
    stored = h.reporter.logs[C2]
    assert stored.startswith(b"x" * (limit + 1024))
    assert stored.endswith(
        f"runner log truncated by herder at {limit + 1024} bytes (containers.log_limit); "
        "later output is discarded\n".encode()
    )
    assert b"more" not in stored


def test_an_instance_that_cannot_start_containers_is_drained_and_no_exit_code_recorded() -> None:
    h, iid = setup_worker("idle", age=10, containers=(C1,))
    h.probe(iid)
    host = h.cloud.vms[iid].host
    host.containers[C1] = ("failed", "instance", "docker: Cannot connect to the Docker daemon")
    h.runtime.advance(10)
    h.probe(iid)
    assert h.reporter.exited == []
    assert h.reporter.failed == [(C1, True, "docker: Cannot connect to the Docker daemon", iid)]
    assert h.worker(iid).idle_behavior == IdleBehavior.DRAIN
    assert host.verbs()[-1] == "--forget" and C1 not in host.containers


def test_a_container_that_cannot_start_leaves_the_instance_in_service() -> None:
    h, iid = setup_worker("idle", age=10, containers=(C1,))
    h.probe(iid)
    host = h.cloud.vms[iid].host
    host.containers[C1] = ("failed", "container", "pull access denied for nosuch")
    h.runtime.advance(10)
    h.probe(iid)
    assert h.reporter.failed == [(C1, False, "pull access denied for nosuch", iid)]
    assert h.worker(iid).idle_behavior == IdleBehavior.RUN
    assert h.state(iid) == "idle"


def test_an_image_pull_is_reported_once() -> None:
    h, iid = setup_worker("idle", age=10, containers=(C1,))
    host = h.cloud.vms[iid].host
    host.extra_list_lines.append(f"{C1} pulled 2.500")
    h.probe(iid)
    h.runtime.advance(10)
    h.probe(iid)
    assert h.reporter.pulled == [(C1, 2.5)]


def test_an_instance_shut_down_while_it_answers_gives_its_logs_first() -> None:
    h, iid = setup_worker("idle", age=10, containers=(C1,))
    h.probe(iid)
    host = h.cloud.vms[iid].host
    host.logs[C1] = b"stdout last words\n"
    h.pool.kill_instance(iid, "test")
    h.runtime.run_until_idle()
    assert h.reporter.logs == {C1: ADOPTED_LOG_NOTE + b"stdout last words\n"}
    verbs = host.verbs()
    assert verbs[-1] == "--log"
    assert h.cloud.vms[iid].destroy_calls == 1  # then destroyed


def test_an_instance_that_stopped_answering_is_shut_down_without_waiting_for_logs() -> None:
    h, iid = setup_worker("idle", age=10, containers=(C1,))
    h.probe(iid)
    host = h.cloud.vms[iid].host
    host.logs[C1] = b"stdout unreachable\n"
    h.worker(iid).probe_error = "connection refused"
    h.pool.kill_instance(iid, "test")
    h.runtime.run_until_idle()
    assert "--log" not in host.verbs()
    assert h.cloud.vms[iid].destroy_calls == 1

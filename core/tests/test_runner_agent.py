"""The runner agent, driven as herder drives it: a separate program, real processes, a temp dir.

Every container here runs with ``runtime: process`` (or a fake engine on PATH), so the tests need
no container engine.  Each test finishes its containers, and the fixture kills anything left.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from herder.agent.protocol import ListResult, parse_list_output

RUNNER = Path(__file__).parents[1] / "src" / "herder" / "agent" / "herder_runner.py"
#: lets the suite be run against another interpreter, e.g. the oldest python3 instances ship.
PYTHON = os.environ.get("HERDER_TEST_RUNNER_PYTHON", sys.executable)
UUID = "zzzzz-dz642-000000000000001"
UUID2 = "zzzzz-dz642-000000000000002"


def process_gone(pid: int) -> bool:
    """Gone or a zombie (this machine's init may not reap orphans)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] in (b"Z", b"X")
    except FileNotFoundError:
        return True


def gated(before: str, after: str) -> list[str]:
    """A container command that pauses between two scripts until the file $GATE exists.

    Tests open the gate once they have looked at the running container, so a slow machine
    cannot let the container finish early.
    """
    return ["sh", "-c", f'{before}; until [ -e "$GATE" ]; do sleep 0.01; done; {after}']


def wait_for(condition: Callable[[], Any], timeout: float = 3.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.01)


def unmarked(log: bytes) -> bytes:
    """A marked log's lines without their markers; every line must carry one."""
    out = b""
    for line in log.splitlines(keepends=True):
        marker, _, text = line.partition(b" ")
        assert marker in (b"stdout", b"stderr", b"runner"), line
        out += text
    return out


class Runner:
    """Runs the agent against one state directory."""

    def __init__(self, state_dir: Path, env: dict[str, str] | None = None) -> None:
        self.dir = state_dir
        self.env = env

    def run(
        self, *args: str, stdin: bytes = b"", env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [PYTHON, str(RUNNER), "--state-dir", str(self.dir), *args],
            input=stdin,
            capture_output=True,
            timeout=20,
            env=env if env is not None else self.env,
        )

    def start(self, uuid: str = UUID, *extra: str, **doc: Any) -> dict[str, Any]:
        config = {"uuid": uuid, "runtime": "process", "environment": {}, **doc}
        res = self.run(
            "--detach", "--stdin-config", *extra, uuid, stdin=json.dumps(config).encode()
        )
        assert res.returncode == 0, res.stderr
        started: dict[str, Any] = json.loads(res.stdout)
        return started

    def list(self, *args: str, stdin: bytes = b"") -> ListResult:
        res = self.run("--list", *args, stdin=stdin)
        assert res.returncode == 0, res.stderr
        return parse_list_output(res.stdout.decode(), "zzzzz")

    def list_text(self) -> str:
        return self.run("--list").stdout.decode()

    def wait_failed(self, uuid: str = UUID) -> tuple[str, str]:
        failed: dict[str, tuple[str, str]] = wait_for(lambda: self.list().failed)
        assert uuid in failed, f"{uuid} did not fail: {self.list_text()!r}"
        return failed[uuid]

    def wait_exited(self, uuid: str = UUID) -> int:
        codes: dict[str, int] = wait_for(lambda: self.list().exited)
        assert uuid in codes, f"{uuid} did not finish: {self.list_text()!r}"
        return codes[uuid]

    def raw_log(self, uuid: str = UUID) -> bytes:
        """The log as stored: every line marked with its stream."""
        res = self.run("--log", uuid)
        assert res.returncode == 0, res.stderr
        return res.stdout

    def log(self, uuid: str = UUID) -> bytes:
        """The log's text, stream markers taken off (checked to be there)."""
        return unmarked(self.raw_log(uuid))

    def lock_record(self, uuid: str = UUID) -> dict[str, Any]:
        record: dict[str, Any] = json.loads((self.dir / f"{uuid}.lock").read_text())
        return record


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[Runner]:
    r = Runner(tmp_path / "state")
    yield r
    leftovers = []
    for lock in r.dir.glob("*.lock"):
        try:
            record = json.loads(lock.read_text() or "{}")
        except ValueError:
            continue
        for key, kill in (("pgid", os.killpg), ("pid", os.kill)):
            pid = record.get(key)
            if isinstance(pid, int) and not process_gone(pid):
                leftovers.append(pid)
                kill(pid, signal.SIGKILL)
    assert not leftovers, f"processes left behind: {leftovers}"


def test_container_runs_exits_and_is_forgotten(runner: Runner, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    started = runner.start(
        command=gated("echo hi", "echo bye >&2; exit 3"), environment={"GATE": str(gate)}
    )
    assert started["uuid"] == UUID
    assert runner.lock_record()["pid"] == started["pid"]

    listed = runner.list()
    assert listed.running == [UUID]
    assert (listed.stale, listed.exited, listed.broken) == ([], {}, False)

    gate.touch()
    assert runner.wait_exited() == 3
    assert runner.list_text() == f"{UUID} exited 3\n"
    assert runner.list().running == []
    assert runner.log() == b"hi\nbye\n"

    assert runner.run("--forget", UUID).returncode == 0
    assert runner.list_text() == ""
    assert sorted(p.name for p in runner.dir.iterdir()) == [".dir.lock"]
    res = runner.run("--log", UUID)
    assert res.returncode == 1
    assert b"no such container" in res.stderr


def test_detach_returns_before_the_container_finishes(runner: Runner) -> None:
    begun = time.monotonic()
    runner.start(command=["sleep", "3"])
    assert time.monotonic() - begun < 2.5
    assert runner.list().running == [UUID]
    assert runner.run("--kill", "15", UUID).returncode == 0


def test_second_start_of_a_running_container_is_refused(runner: Runner) -> None:
    runner.start(command=["sh", "-c", "echo started; sleep 5"])
    config = {"uuid": UUID, "command": ["sh", "-c", "echo started"], "runtime": "process"}
    res = runner.run("--detach", "--stdin-config", UUID, stdin=json.dumps(config).encode())
    assert res.returncode == 1
    assert b"already running" in res.stderr
    assert runner.run("--kill", "TERM", UUID).returncode == 0
    assert runner.wait_exited() == 128 + signal.SIGTERM
    assert runner.log().count(b"started\n") == 1


def test_finished_container_can_run_again_and_its_old_record_is_replaced(
    runner: Runner, tmp_path: Path
) -> None:
    runner.start(command=["sh", "-c", "echo first; exit 4"])
    assert runner.wait_exited() == 4
    gate = tmp_path / "gate"
    runner.start(command=gated("true", "echo second"), environment={"GATE": str(gate)})
    assert runner.list().exited == {}  # the old result is gone while the new run goes
    gate.touch()
    assert runner.wait_exited() == 0
    assert runner.log() == b"second\n"


def test_forget_refuses_a_running_container(runner: Runner) -> None:
    runner.start(command=["sleep", "5"])
    res = runner.run("--forget", UUID)
    assert res.returncode == 1
    assert b"still running" in res.stderr
    assert runner.list().running == [UUID]
    assert runner.run("--kill", "15", UUID).returncode == 0


def test_kill_term_reaches_the_container_and_its_exit_code_is_recorded(runner: Runner) -> None:
    script = 'trap "echo got TERM; exit 7" TERM; echo ready; while :; do sleep 0.05; done'
    started = runner.start(command=["sh", "-c", script])
    wait_for(lambda: runner.log() == b"ready\n")
    container = runner.lock_record()["pgid"]

    res = runner.run("--kill", "15", UUID)
    assert res.returncode == 0, res.stderr
    assert process_gone(started["pid"]) and process_gone(container)
    assert runner.wait_exited() == 7
    assert b"got TERM\n" in runner.log()
    assert b"received signal 15" in runner.log()


def test_kill_of_an_unknown_or_finished_container_succeeds(runner: Runner) -> None:
    assert runner.run("--kill", "15", UUID).returncode == 0
    runner.start(command=["true"])
    runner.wait_exited()
    assert runner.run("--kill", "15", UUID).returncode == 0


def test_kill_reports_a_container_that_ignores_the_signal(runner: Runner) -> None:
    runner.start(command=["sh", "-c", 'trap "" TERM; echo ready; sleep 5'])
    wait_for(lambda: runner.log() == b"ready\n")
    env = {**os.environ, "HERDER_RUNNER_KILL_WAIT": "0.2"}
    res = runner.run("--kill", "15", UUID, env=env)
    assert res.returncode == 1
    assert b"still alive" in res.stderr
    assert runner.list().running == [UUID]
    # SIGKILL cannot be passed on by the supervisor, so it also goes to the container directly.
    container = runner.lock_record()["pgid"]
    assert runner.run("--kill", "9", UUID).returncode == 0
    assert wait_for(lambda: process_gone(container))


def test_max_run_time_stops_the_container_with_exit_code_124(runner: Runner) -> None:
    runner.start(command=["sleep", "5"], max_run_time=0.2)
    assert runner.wait_exited() == 124
    assert b"max run time of 0.2 seconds exceeded" in runner.log()


def test_max_run_time_escalates_to_sigkill_after_the_grace_period(runner: Runner) -> None:
    runner.start(
        UUID,
        "--kill-grace=0.2",
        command=["sh", "-c", 'trap "" TERM; sleep 5'],
        max_run_time=0.1,
    )
    container = wait_for(lambda: runner.lock_record().get("pgid"))
    assert runner.wait_exited() == 124
    assert b"sending SIGKILL" in runner.log()
    assert process_gone(container)


def test_lock_held_after_the_supervisor_died_is_stale_then_cleaned_up(runner: Runner) -> None:
    started = runner.start(command=["sleep", "5"])
    lock_path = runner.dir / f"{UUID}.lock"
    with open(lock_path) as held:
        # The supervisor dies without recording a result, and something else keeps the lock,
        # as arv-mount does to crunch-run.
        assert runner.run("--kill", "KILL", UUID).returncode == 0
        assert wait_for(lambda: process_gone(started["pid"]))
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        listed = runner.list()
        assert (listed.running, listed.stale) == ([], [UUID])
        assert runner.list_text() == f"{UUID} stale\n"
    # Stale and unlocked without an exit record: the lock file is removed, nothing is listed.
    assert runner.list_text() == ""
    assert not lock_path.exists()


def test_broken_marker_is_reported_before_any_container(runner: Runner) -> None:
    runner.dir.mkdir()
    (runner.dir / "broken").write_text("engine unreachable\n")
    runner.start(command=["true"])
    runner.wait_exited()
    res = runner.run("--list")
    assert res.stdout.decode().splitlines() == ["broken", f"{UUID} exited 0"]
    assert runner.list().broken


def test_a_full_disk_is_reported_as_broken(runner: Runner) -> None:
    env = {**os.environ, "HERDER_RUNNER_MIN_FREE": str(1 << 62)}
    res = runner.run("--list", env=env)
    assert res.returncode == 0
    assert parse_list_output(res.stdout.decode(), "zzzzz").broken
    assert not runner.list().broken


@pytest.mark.parametrize(
    "args",
    [
        ["--detach", "--stdin-config", "zzzzz-dz642-BAD000000000001"],
        ["--kill", "15", "../../etc/passwd"],
        ["--log", "zzzzz-dz642-00000000000000"],
        ["--forget", "zzzzz-dz642-000000000000001\n"],
    ],
)
def test_malformed_uuids_are_rejected(runner: Runner, args: list[str]) -> None:
    config = {"uuid": args[-1], "command": ["true"], "runtime": "process"}
    res = runner.run(*args, stdin=json.dumps(config).encode())
    assert res.returncode == 2
    assert b"malformed container uuid" in res.stderr
    assert not runner.dir.exists()


def test_config_for_another_container_is_refused(runner: Runner) -> None:
    config = {"uuid": UUID2, "command": ["true"], "runtime": "process"}
    res = runner.run("--detach", "--stdin-config", UUID, stdin=json.dumps(config).encode())
    assert res.returncode == 1
    assert b"not zzzzz-dz642-000000000000001" in res.stderr
    assert runner.list_text() == ""


def test_environment_and_cwd_come_from_the_config_only(runner: Runner, tmp_path: Path) -> None:
    runner.env = {**os.environ, "DISPATCHER_SECRET": "do-not-leak"}
    secret = "s3cret-token-value"
    started = runner.start(
        command=gated('echo "$GREETING|$TOKEN|$DISPATCHER_SECRET"; pwd', "true"),
        environment={"GREETING": "hello world", "TOKEN": secret, "GATE": "gate"},
        cwd=str(tmp_path),
    )
    container = runner.lock_record()["pgid"]
    for pid in (started["pid"], container):
        assert secret.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    (tmp_path / "gate").touch()
    assert runner.wait_exited() == 0
    assert runner.log() == f"hello world|{secret}|\n{tmp_path}\n".encode()


def test_state_directory_from_the_environment(tmp_path: Path) -> None:
    state = tmp_path / "from-env"
    env = {**os.environ, "HERDER_RUNNER_DIR": str(state)}
    config = {"uuid": UUID, "command": ["true"], "runtime": "process"}
    res = subprocess.run(
        [PYTHON, str(RUNNER), "--detach", "--stdin-config", UUID],
        input=json.dumps(config).encode(),
        capture_output=True,
        env=env,
        timeout=20,
    )
    assert res.returncode == 0, res.stderr
    assert wait_for(lambda: (state / f"{UUID}.exit").exists())
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


def test_missing_command_is_recorded_as_127(runner: Runner) -> None:
    runner.start(command=["/nonexistent/program"])
    assert runner.wait_exited() == 127
    assert b"cannot start container" in runner.log()


def test_stdin_prices_are_stored(runner: Runner) -> None:
    prices = [{"StartTime": "2024-01-01T00:00:00Z", "Price": 0.25}]
    runner.list("--stdin-prices", stdin=json.dumps(prices).encode())
    assert json.loads((runner.dir / "prices.json").read_text()) == prices

    res = runner.run("--list", "--stdin-prices", stdin=b"not json")
    assert res.returncode == 0
    assert b"malformed price list" in res.stderr
    assert json.loads((runner.dir / "prices.json").read_text()) == prices


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--list", UUID],
        ["--list", "--detach", "--stdin-config", UUID],
        ["--detach", UUID],
        ["--detach", "--stdin-config"],
        ["--kill", UUID],
        ["--kill", "NOSUCHSIGNAL", UUID],
        ["--log", UUID, UUID2],
        ["--stdin-prices", "--log", UUID],
        ["--list", "--frobnicate"],
        ["--detach", "--stdin-config", "--runtime-engine=lxc", UUID],
    ],
)
def test_usage_errors_exit_2(runner: Runner, args: list[str]) -> None:
    res = runner.run(*args)
    assert res.returncode == 2
    assert b"usage: herder-runner" in res.stderr
    assert not runner.dir.exists()


def write_fake_engine(bin_dir: Path, calls: Path, run_output: str, run_code: int) -> None:
    """A ``docker`` that records each call's argv and FOO from its environment."""
    bin_dir.mkdir()
    engine = bin_dir / "docker"
    engine.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$FOO" "$@" "--" >> {calls}\n'
        '[ "$1" = run ] || exit 0\n'
        f"echo '{run_output}' >&2\n"
        f"exit {run_code}\n"
    )
    engine.chmod(0o755)


def engine_calls(calls: Path) -> list[list[str]]:
    result: list[list[str]] = [[]]
    for line in calls.read_text().splitlines():
        if line == "--":
            result.append([])
        else:
            result[-1].append(line)
    return result[:-1]


def test_engine_run_command_and_unreachable_daemon_marks_broken(
    runner: Runner, tmp_path: Path
) -> None:
    calls = tmp_path / "calls"
    message = "docker: Cannot connect to the Docker daemon at unix:///var/run/docker.sock."
    write_fake_engine(tmp_path / "bin", calls, message, 125)
    runner.env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"}
    runner.start(
        command=["echo", "hi"],
        runtime="docker",
        image="debian:12",
        environment={"FOO": "secret-value"},
        cwd="/work",
        vcpus=2,
        ram=1 << 30,
    )
    # Not an exit code: the instance could not start it.
    assert runner.wait_failed() == ("instance", message)
    assert runner.list().exited == {}
    name = f"herder-{UUID}"
    run = ["run", "--rm", "--name", name, "--cpus", "2", "--memory", str(1 << 30)]
    assert engine_calls(calls) == [
        ["", "rm", "--force", name],  # housekeeping sees none of the container's environment
        ["", "image", "inspect", "debian:12"],  # present: no pull (if-not-present)
        ["secret-value", *run, "-e", "FOO", "-w", "/work", "debian:12", "echo", "hi"],
    ]
    assert runner.list().broken
    assert "Cannot connect" in (runner.dir / "broken").read_text()


def test_an_ordinary_engine_failure_does_not_mark_broken(runner: Runner, tmp_path: Path) -> None:
    write_fake_engine(tmp_path / "bin", tmp_path / "calls", "container said no", 3)
    runner.env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"}
    runner.start(command=["false"], runtime="auto", image="debian:12")
    assert runner.wait_exited() == 3
    assert not runner.list().broken
    assert runner.log() == b"container said no\n"


def test_auto_without_an_engine_runs_a_plain_process(runner: Runner) -> None:
    runner.env = {**os.environ, "PATH": "/usr/bin:/bin"}
    runner.start(command=["sh", "-c", "echo plain"], runtime="auto", image="debian:12")
    assert runner.wait_exited() == 0
    assert runner.log() == b"plain\n"


def test_logs_can_live_outside_the_state_directory(runner: Runner, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    runner.env = {**os.environ, "HERDER_RUNNER_LOG_DIR": str(logs)}
    runner.start(command=["echo", "elsewhere"])
    assert runner.wait_exited() == 0
    assert (logs / f"{UUID}.log").read_bytes() == b"stdout elsewhere\n"
    assert not (runner.dir / f"{UUID}.log").exists()
    assert runner.log() == b"elsewhere\n"
    assert runner.run("--forget", UUID).returncode == 0
    assert list(logs.iterdir()) == []


# --------------------------------------------------------------------------- start-up and --serve


def test_the_file_runs_as_a_command_through_its_shell_header(tmp_path: Path) -> None:
    """Deployed, the agent is run by path: the shell header starts python3 -I -S on it."""
    deployed = tmp_path / "herder-runner~0123"
    deployed.write_bytes(RUNNER.read_bytes())
    deployed.chmod(0o755)
    path = f"{Path(PYTHON).parent}:{os.environ.get('PATH', '')}"
    env = {"PATH": path, "HERDER_RUNNER_DIR": str(tmp_path / "state")}
    res = subprocess.run([str(deployed), "--list"], capture_output=True, timeout=20, env=env)
    assert (res.returncode, res.stdout, res.stderr) == (0, b"", b"")
    probe = "import sys; print(sys.flags.no_site, sys.flags.ignore_environment, sys.flags.isolated)"
    # The header's flags are what python3 gets: no site, no PYTHON* variables, isolated.
    header = RUNNER.read_text().splitlines()[2]
    assert header == 'exec python3 -I -S "$0" "$@"'
    flags = subprocess.run(
        ["sh", "-c", header.replace('"$0" "$@"', f"-c '{probe}'")],
        capture_output=True,
        timeout=20,
        env=env,
    )
    assert flags.stdout.split() == [b"1", b"1", b"1"]


def test_modules_planted_beside_the_deployed_file_are_never_imported(tmp_path: Path) -> None:
    """Whoever can write next to the runner must not get code run by it: its own directory is
    not on the import path (python3 -I), so a planted ``json.py`` or ``fcntl.py`` stays unread."""
    deployed = tmp_path / "herder-runner~0123"
    deployed.write_bytes(RUNNER.read_bytes())
    deployed.chmod(0o755)
    marker = tmp_path / "planted-code-ran"
    for module in ("json", "fcntl", "select", "signal", "errno"):
        (tmp_path / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    path = f"{Path(PYTHON).parent}:{os.environ.get('PATH', '')}"
    env = {"PATH": path, "HERDER_RUNNER_DIR": str(tmp_path / "state")}
    res = subprocess.run([str(deployed), "--list"], capture_output=True, timeout=20, env=env)
    assert res.returncode == 0, res.stderr
    start = subprocess.run(
        [str(deployed), "--detach", "--stdin-config", UUID],
        capture_output=True,
        timeout=20,
        env=env,
        input=json.dumps(
            {"uuid": UUID, "runtime": "process", "environment": {}, "command": ["true"]}
        ).encode(),
    )
    assert start.returncode == 0, start.stderr
    wait_for(
        lambda: (
            b"exited"
            in subprocess.run(
                [str(deployed), "--list"], capture_output=True, timeout=20, env=env
            ).stdout
        )
    )
    assert not marker.exists()


class Serve:
    """One ``--serve`` process: requests and answers, and the events it sends unasked."""

    def __init__(self, state_dir: Path) -> None:
        self.proc = subprocess.Popen(
            [PYTHON, str(RUNNER), "--state-dir", str(state_dir), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.next_id = 0
        self.answers: queue.Queue[dict[str, Any]] = queue.Queue()
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.logs: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            doc = json.loads(line)
            if doc.get("event") == "log":
                self.logs.put(doc)
            else:
                (self.events if "event" in doc else self.answers).put(doc)

    def send_line(self, line: bytes) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + b"\n")
        self.proc.stdin.flush()
        return self.answers.get(timeout=20)

    def call(self, *argv: str, stdin: bytes = b"") -> tuple[int, bytes, bytes]:
        self.next_id += 1
        request = {
            "id": self.next_id,
            "argv": list(argv),
            "stdin": base64.b64encode(stdin).decode(),
        }
        answer = self.send_line(json.dumps(request).encode())
        assert answer["id"] == self.next_id
        return (
            answer["status"],
            base64.b64decode(answer["stdout"]),
            base64.b64decode(answer["stderr"]),
        )

    def finish(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.proc.wait(timeout=20)


@pytest.fixture
def serve(runner: Runner) -> Iterator[Serve]:
    s = Serve(runner.dir)
    yield s
    if s.proc.poll() is None:
        s.proc.kill()
        s.proc.wait()


def test_serve_carries_out_verbs_as_the_one_shot_commands_do(
    runner: Runner, serve: Serve, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    config = {
        "uuid": UUID,
        "runtime": "process",
        "command": gated("echo hi", "exit 3"),
        "environment": {"GATE": str(gate)},
    }
    status, out, _ = serve.call(
        "--detach", "--stdin-config", UUID, stdin=json.dumps(config).encode()
    )
    assert status == 0 and json.loads(out)["uuid"] == UUID
    # The supervisor is a fork of the serve process, whose command line does not name the
    # container: it is recognised by its recorded start time, so it is running, not stale.
    assert serve.call("--list")[:2] == (0, f"{UUID}\n".encode())
    assert runner.list().running == [UUID]
    assert runner.lock_record()["start"] > 0
    assert serve.events.empty()
    gate.touch()
    # The serve process says, unasked, that a container it started has ended.
    assert serve.events.get(timeout=20) == {"event": "exited"}
    assert serve.call("--list")[1] == f"{UUID} exited 3\n".encode()
    assert serve.call("--log", UUID)[:2] == (0, b"stdout hi\n")
    assert serve.call("--forget", UUID)[0] == 0
    assert serve.call("--list")[:2] == (0, b"")
    assert serve.finish() == 0


def test_serve_kills_and_reaps_its_supervisors(runner: Runner, serve: Serve) -> None:
    config = {"uuid": UUID, "runtime": "process", "command": ["sleep", "30"]}
    status, out, _ = serve.call(
        "--detach", "--stdin-config", UUID, stdin=json.dumps(config).encode()
    )
    pid = json.loads(out)["pid"]
    assert status == 0
    assert serve.call("--kill", "TERM", UUID)[0] == 0
    assert serve.call("--list")[1] == f"{UUID} exited 143\n".encode()
    # The supervisor was the serve process's child: the next request reaped it.
    assert wait_for(lambda: not os.path.exists(f"/proc/{pid}"))
    assert serve.finish() == 0


def test_serve_answers_bad_requests_and_keeps_going(serve: Serve) -> None:
    for line in (
        b"not json",
        b"[1, 2]",
        b'{"id": 7, "argv": "--list"}',
        b'{"id": 8, "argv": ["--list"], "stdin": "***"}',
    ):
        answer = serve.send_line(line)
        assert answer["status"] == 2, line
        assert b"bad request" in base64.b64decode(answer["stderr"])
    assert serve.call("--serve")[0] == 2
    status, _, err = serve.call("--bogus")
    assert status == 2 and b"unknown option" in err
    assert serve.call("--kill", "TERM", "../../etc/passwd")[0] == 2
    assert serve.call("--list")[0] == 0
    assert serve.finish() == 0


def test_a_reused_pid_with_another_start_time_is_not_the_supervisor(runner: Runner) -> None:
    """A lock record naming a live process that started at another time: stale, never signalled."""
    runner.dir.mkdir()
    stranger = subprocess.Popen(["sleep", "30"])
    try:
        lock = runner.dir / f"{UUID}.lock"
        lock.write_text(json.dumps({"uuid": UUID, "pid": stranger.pid, "start": 1}))
        with open(lock) as held:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            assert runner.list().stale == [UUID]
            res = runner.run("--kill", "TERM", UUID)
            assert res.returncode == 0 and b"process is gone" in res.stderr
        assert stranger.poll() is None  # never signalled
    finally:
        stranger.kill()
        stranger.wait()


def _detach_with_a_full_disk(
    runner: Runner, tmp_path: Path, patch: str
) -> subprocess.CompletedProcess[bytes]:
    """``--detach`` a ``true`` container through the agent with ``patch`` applied to it (code
    that makes some writes fail as on a full disk); the forked supervisor keeps the patch."""
    wrapper = tmp_path / "patched_runner.py"
    wrapper.write_text(
        "import errno, importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('herder_runner', {str(RUNNER)!r})\n"
        "agent = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(agent)\n" + patch + "sys.exit(agent.main(sys.argv[1:]))\n"
    )
    config = {"uuid": UUID, "runtime": "process", "environment": {}, "command": ["true"]}
    return subprocess.run(
        [PYTHON, str(wrapper), "--state-dir", str(runner.dir), "--detach", "--stdin-config", UUID],
        input=json.dumps(config).encode(),
        capture_output=True,
        timeout=20,
    )


def test_an_exit_that_cannot_be_written_is_still_delivered(runner: Runner, tmp_path: Path) -> None:
    """The disk fills up while the container runs: its exit code still reaches --list (from
    the record reserved at start), so the dispatcher never runs it a second time."""
    res = _detach_with_a_full_disk(
        runner,
        tmp_path,
        "real = agent.write_atomically\n"
        "def full(path, data):\n"
        "    if path.endswith('.exit') or path.endswith('broken'):\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "    return real(path, data)\n"
        "agent.write_atomically = full\n",
    )
    assert res.returncode == 0, res.stderr
    assert runner.wait_exited() == 0
    # The reservation was filled in place; the lock is free and nothing else is left over.
    assert (runner.dir / f"{UUID}.exit").read_text().strip() == "0"
    assert not list(runner.dir.glob("*.tmp-*"))
    # With the disk really full, --list also reports the instance broken, so it is drained.
    env = {**os.environ, "HERDER_RUNNER_MIN_FREE": str(1 << 62)}
    listed = parse_list_output(runner.run("--list", env=env).stdout.decode(), "zzzzz")
    assert listed.broken and listed.exited == {UUID: 0}


def test_a_start_without_room_for_its_result_is_refused(runner: Runner, tmp_path: Path) -> None:
    res = _detach_with_a_full_disk(
        runner,
        tmp_path,
        "def full(self, uuid):\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "agent.State.reserve_exit = full\n",
    )
    assert res.returncode != 0
    assert b"cannot reserve its exit record" in res.stderr
    assert UUID not in runner.list_text()


@pytest.mark.parametrize(
    ("engine", "stack", "expected"),
    [
        ("docker", "cuda", ["--gpus", "2"]),
        ("podman", "cuda", ["--device", "nvidia.com/gpu=all"]),
        (
            "docker",
            "rocm",
            ["--device", "/dev/kfd", "--device", "/dev/dri", "--group-add", "video"],
        ),
    ],
)
def test_gpus_reach_the_engine(
    runner: Runner, tmp_path: Path, engine: str, stack: str, expected: list[str]
) -> None:
    calls = tmp_path / "calls"
    write_fake_engine(tmp_path / "bin", calls, "", 0)
    if engine != "docker":
        (tmp_path / "bin" / "docker").rename(tmp_path / "bin" / engine)
    runner.env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"}
    runner.start(
        command=["nvidia-smi"],
        runtime=engine,
        image="cuda:12",
        gpus={"stack": stack, "device_count": 2},
    )
    assert runner.wait_exited() == 0
    run = engine_calls(calls)[-1]
    assert run[run.index("run") :][:4] == ["run", "--rm", "--name", f"herder-{UUID}"]
    start = run.index(expected[0])
    assert run[start : start + len(expected)] == expected
    assert run[-2:] == ["cuda:12", "nvidia-smi"]


def test_a_malformed_gpu_request_is_refused(runner: Runner) -> None:
    config = {
        "uuid": UUID,
        "runtime": "process",
        "environment": {},
        "command": ["true"],
        "gpus": {"stack": "quantum", "device_count": 1},
    }
    res = runner.run("--detach", "--stdin-config", UUID, stdin=json.dumps(config).encode())
    assert res.returncode != 0 and b"not cuda or rocm" in res.stderr


def test_log_keeps_stdout_and_stderr_apart_in_order(runner: Runner) -> None:
    runner.start(command=["sh", "-c", "echo one; echo two >&2; echo three"])
    assert runner.wait_exited() == 0
    lines = runner.raw_log().splitlines()
    # Each stream keeps its order; how the two interleave depends on when each was read.
    assert [line for line in lines if line.startswith(b"stdout ")] == [
        b"stdout one",
        b"stdout three",
    ]
    assert [line for line in lines if line.startswith(b"stderr ")] == [b"stderr two"]
    assert len(lines) == 3


def test_log_writes_a_partial_line_at_the_end(runner: Runner) -> None:
    runner.start(command=["sh", "-c", "printf 'no newline'"])
    assert runner.wait_exited() == 0
    assert runner.raw_log() == b"stdout no newline\n"


def test_log_stops_at_the_limit_with_a_marker(runner: Runner) -> None:
    runner.start(
        command=[
            "sh",
            "-c",
            "i=0; while [ $i -lt 200 ]; do echo line $i; i=$((i+1)); done; echo done >&2",
        ],
        log_limit=300,
    )
    assert runner.wait_exited() == 0
    log = runner.raw_log()
    assert log.startswith(b"stdout line 0\nstdout line 1\n")
    assert b"stderr done" not in log
    assert log.endswith(
        b"runner log truncated: the output exceeded the log limit of 300 bytes "
        b"(containers.log_limit); later output is discarded\n"
    )
    assert len(log) < 300 + 200


def test_serve_sends_log_lines_while_the_container_runs(
    runner: Runner, serve: Serve, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    config = {
        "uuid": UUID,
        "runtime": "process",
        "environment": {"GATE": str(gate)},
        "command": gated("echo before", "echo after >&2"),
    }
    assert serve.call("--detach", "--stdin-config", UUID, stdin=json.dumps(config).encode())[0] == 0
    first = serve.logs.get(timeout=20)
    assert (first["uuid"], first["offset"]) == (UUID, 0)
    assert base64.b64decode(first["data"]) == b"stdout before\n"
    assert runner.list().running == [UUID]  # seen while the container still runs
    gate.touch()
    second = serve.logs.get(timeout=20)
    assert second["offset"] == len(b"stdout before\n")
    assert base64.b64decode(second["data"]) == b"stderr after\n"
    assert serve.finish() == 0


def test_a_missing_image_fails_the_container_not_the_instance(
    runner: Runner, tmp_path: Path
) -> None:
    message = (
        "docker: Error response from daemon: pull access denied for nosuch, repository "
        "does not exist or may require docker login."
    )
    write_fake_engine(tmp_path / "bin", tmp_path / "calls", message, 125)
    runner.env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"}
    runner.start(command=["true"], runtime="docker", image="nosuch:1")
    assert runner.wait_failed() == ("container", message)
    assert not runner.list().broken
    assert b"could not be started (container failure)" in runner.log()


def test_a_program_exiting_125_in_an_engine_is_an_exit_code(runner: Runner, tmp_path: Path) -> None:
    write_fake_engine(tmp_path / "bin", tmp_path / "calls", "my program failed", 125)
    runner.env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"}
    runner.start(command=["prog"], runtime="docker", image="debian:12")
    assert runner.wait_exited() == 125
    assert runner.list().failed == {} and not runner.list().broken


def test_a_missing_engine_fails_the_instance(runner: Runner) -> None:
    runner.env = {**os.environ, "PATH": "/nonexistent"}
    runner.start(command=["true"], runtime="podman", image="debian:12")
    assert runner.wait_failed() == ("instance", "the container engine podman is not installed")
    assert runner.list().broken


def write_pulling_engine(bin_dir: Path, calls: Path, have: str, pull_fails: str = "") -> None:
    """A ``docker`` whose images are the lines of the file ``have``; ``pull`` adds one, or
    fails with ``pull_fails`` (exit 1) when that is set."""
    bin_dir.mkdir()
    engine = bin_dir / "docker"
    pull = f"echo {pull_fails!r} >&2; exit 1" if pull_fails else f"echo $2 >> {have}"
    engine.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$@" "--" >> {calls}\n'
        'case "$1" in\n'
        f'  image) grep -qx "$3" {have} || {{ echo "Error: No such image: $3" >&2; exit 1; }} ;;\n'
        f"  pull) {pull} ;;\n"
        "  run) echo ran ;;\n"
        "esac\n"
    )
    engine.chmod(0o755)


@pytest.mark.parametrize(
    ("policy", "have", "pulls"),
    [("if-not-present", "", True), ("if-not-present", "img:1", False), ("always", "img:1", True)],
)
def test_the_pull_policy_decides_when_the_image_is_pulled(
    runner: Runner, tmp_path: Path, policy: str, have: str, pulls: bool
) -> None:
    images, calls = tmp_path / "images", tmp_path / "calls"
    images.write_text(have + "\n" if have else "")
    write_pulling_engine(tmp_path / "bin", calls, str(images))
    runner.env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"}
    runner.start(command=["x"], runtime="docker", image="img:1", pull_policy=policy)
    assert runner.wait_exited() == 0
    verbs = [call[0] for call in engine_calls(calls)]
    assert ("pull" in verbs) is pulls
    log = runner.log()
    assert b"stdout ran\n" in runner.raw_log()
    listed = runner.run("--list").stdout.decode()
    if pulls:
        assert b"pulled image img:1 in " in log
        assert f"{UUID} pulled " in listed
    else:
        assert "pulled" not in listed
    runner.run("--forget", UUID)
    assert not (runner.dir / f"{UUID}.pull").exists()


def test_pull_policy_never_fails_the_container_when_the_image_is_missing(
    runner: Runner, tmp_path: Path
) -> None:
    images, calls = tmp_path / "images", tmp_path / "calls"
    images.write_text("")
    write_pulling_engine(tmp_path / "bin", calls, str(images))
    runner.env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"}
    runner.start(command=["x"], runtime="docker", image="img:1", pull_policy="never")
    assert runner.wait_failed() == (
        "container",
        "image img:1 is not on the instance and the pull policy is never",
    )
    assert "pull" not in [call[0] for call in engine_calls(calls)]
    assert not runner.list().broken


def test_a_failed_pull_fails_the_container_with_the_engines_message(
    runner: Runner, tmp_path: Path
) -> None:
    images, calls = tmp_path / "images", tmp_path / "calls"
    images.write_text("")
    denied = "Error response from daemon: pull access denied for img"
    write_pulling_engine(tmp_path / "bin", calls, str(images), pull_fails=denied)
    runner.env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"}
    runner.start(command=["x"], runtime="docker", image="img:1")
    assert runner.wait_failed() == ("container", f"image pull failed: {denied}")
    assert b"pulling image img:1 failed after" in runner.log()

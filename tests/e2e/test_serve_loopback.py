"""`herder serve` on the loopback driver, end to end: real SSH, the real runner, real processes.

Each test runs `herder serve` as a separate process with its own data directory and drives it
through the CLI, as a person would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

HERDER = [sys.executable, "-m", "herder.app.cli"]

FAST_CONFIG = """
cluster_id: e2e01
cloud:
  driver: loopback
  driver_parameters:
    max_instances: {max_instances}
    state_dir: {state_dir}
  deploy_runner_directory: {state_dir}/runner-bin
  probe_interval: 0.3s
  sync_interval: 1s
  timeout_idle: 2s
  timeout_booting: 30s
  timeout_signal: 1s
  timeout_term: 10s
containers:
  log_limit: 8KiB
queue:
  path: {db}
api:
  listen: 127.0.0.1:0
  management_token: e2e-secret-token-{marker}
instance_types:
  local:
    vcpus: 2
    ram: 2GiB
    included_scratch: 1GiB
    price: 0.1
"""


class Server:
    """A running `herder serve` and the CLI pointed at it."""

    def __init__(self, data_dir: Path, config: Path | None, log: Path) -> None:
        self.data_dir = data_dir
        self.config = config
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {**os.environ, "HERDER_DATA_DIR": str(data_dir)}

    def start(self) -> None:
        client_file = self.data_dir / "client.json"
        client_file.unlink(missing_ok=True)
        args = [*HERDER, "--log-format", "json", "serve", "--listen", "127.0.0.1:0"]
        if self.config is not None:
            args += ["--config", str(self.config)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args, env=self.env, stdout=log, stderr=log, start_new_session=True
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()
            if client_file.exists():
                info = json.loads(client_file.read_text())
                self.env["HERDER_SERVER"] = info["url"]
                self.env["HERDER_MANAGEMENT_TOKEN"] = info["token"]
                with urllib.request.urlopen(info["url"] + "/api/v1/health", timeout=5) as r:
                    assert r.status == 200
                return
            time.sleep(0.05)
        raise AssertionError("herder serve did not start:\n" + self.log_path.read_text())

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*HERDER, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

    def log_lines(self) -> list[dict[str, object]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


def _cleanup_runner_processes(marker: str) -> None:
    """Kill anything a failed test left running (container commands carry ``marker``)."""
    subprocess.run(["pkill", "-f", marker], check=False)


@pytest.fixture
def fast_server(tmp_path: Path) -> Iterator[Server]:
    marker = f"m{os.getpid()}x{time.monotonic_ns()}"
    config = tmp_path / "herder.yaml"
    config.write_text(
        FAST_CONFIG.format(
            max_instances=4,
            state_dir=tmp_path / "loopback",
            db=tmp_path / "herder.db",
            marker=marker,
        )
    )
    server = Server(tmp_path / "data", config, tmp_path / "serve.log")
    server.marker = marker  # type: ignore[attr-defined]
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.stop(signal.SIGKILL)
        _cleanup_runner_processes(marker)


def test_embedded_default_runs_a_container(tmp_path: Path) -> None:
    """The README's first command: no config at all, then submit --wait."""
    server = Server(tmp_path / "data", None, tmp_path / "serve.log")
    server.start()
    try:
        result = server.cli("submit", "--wait", "--", "sh", "-c", "echo hello; exit 3")
        assert result.returncode == 3, result
        assert "hello" in result.stdout + result.stderr
        items = json.loads(server.cli("containers", "--json").stdout)
        assert items[0]["state"] == "Complete" and items[0]["exit_code"] == 3
        for name in ("cluster_id", "management_token", "ssh/id_ed25519", "client.json"):
            path = tmp_path / "data" / name
            assert path.exists(), name
            assert path.stat().st_mode & 0o077 == 0, name  # secrets readable by the user only
        assert server.stop() == 0
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.stop(signal.SIGKILL)


def test_minimal_config_file_works_like_the_embedded_default(tmp_path: Path) -> None:
    """`examples/minimal.yaml`: token, key, cluster id and every file under --data-dir."""
    example = Path(__file__).resolve().parents[2] / "examples" / "minimal.yaml"
    work = tmp_path / "cwd"
    work.mkdir()
    data = tmp_path / "data"
    server = Server(data, example, tmp_path / "serve.log")
    server.env.pop("HERDER_MANAGEMENT_TOKEN", None)
    server.env["HOME"] = str(tmp_path / "home")  # nothing may land in the user's own dirs
    server.env.pop("XDG_DATA_HOME", None)
    original = os.getcwd()
    os.chdir(work)  # the server inherits this working directory
    try:
        server.start()
        result = server.cli("submit", "--wait", "--", "sh", "-c", "echo hello; exit 3")
        assert result.returncode == 3, result
        assert "hello" in result.stdout + result.stderr
        for name in (
            "cluster_id",
            "management_token",
            "ssh/id_ed25519",
            "herder.db",
            "loopback",
            "client.json",
        ):
            assert (data / name).exists(), name
        assert list(work.iterdir()) == []  # nothing in the working directory
        assert not (tmp_path / "home").exists()
        # `config show` prints what serve runs.
        env = {k: v for k, v in server.env.items() if k != "HERDER_MANAGEMENT_TOKEN"}
        shown = subprocess.run(
            [
                *HERDER,
                "--config",
                str(example),
                "config",
                "show",
                "--json",
                "--data-dir",
                str(data),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert shown.returncode == 0, shown
        effective = json.loads(shown.stdout)
        assert effective["cluster_id"] == (data / "cluster_id").read_text().strip()
        assert effective["queue"]["path"] == str(data / "herder.db")
        assert effective["api"]["management_token"] == "<redacted>"
        assert list(effective["instance_types"]) == ["local"]
        # A second serve on the same data directory is refused with one clear line.
        second = server.cli(
            "--config",
            str(example),
            "serve",
            "--data-dir",
            str(data),
            "--listen",
            "127.0.0.1:0",
            timeout=60,
        )
        assert second.returncode == 1
        assert "another herder serve (pid" in second.stderr
        assert "Traceback" not in second.stderr
        assert server.stop() == 0
    finally:
        os.chdir(original)
        if server.proc is not None and server.proc.poll() is None:
            server.stop(signal.SIGKILL)


def test_bad_driver_parameter_under_serve_is_one_clear_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(
        "cloud:\n  driver: loopback\n  driver_parameters:\n    max_instances: -3\n"
        "    bogus_key: 1\n"
    )
    result = subprocess.run(
        [*HERDER, "--config", str(config), "serve", "--data-dir", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HERDER_DATA_DIR": str(tmp_path / "d")},
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "cloud.driver_parameters.max_instances" in result.stderr
    assert "cloud.driver_parameters.bogus_key" in result.stderr


def _submit(server: Server, *command: str, name: str = "", extra: tuple[str, ...] = ()) -> str:
    args = ["submit", "--vcpus", "1", "--ram", "256MiB", *extra]
    if name:
        args += ["--name", name]
    result = server.cli(*args, "--", *command)
    assert result.returncode == 0, result
    return result.stdout.strip()


def _wait_final(server: Server, uuids: list[str], timeout: float = 120) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while True:
        states = {}
        for uuid in uuids:
            out = server.cli("container", uuid, "--json")
            assert out.returncode == 0, out
            states[uuid] = json.loads(out.stdout)
        if all(s["state"] in ("Complete", "Cancelled") for s in states.values()):
            return states
        assert time.monotonic() < deadline, {u: s["state"] for u, s in states.items()}
        time.sleep(0.5)


def test_fifty_containers_on_four_instances(fast_server: Server, tmp_path: Path) -> None:
    marker = fast_server.marker  # type: ignore[attr-defined]
    out = tmp_path / "out"
    out.mkdir()
    uuids = [
        _submit(fast_server, "sh", "-c", f"echo {i} > {out}/{i}; sleep 0.2 # {marker}")
        for i in range(50)
    ]
    states = _wait_final(fast_server, uuids, timeout=240)
    assert {s["state"] for s in states.values()} == {"Complete"}
    assert {s["exit_code"] for s in states.values()} == {0}
    assert sorted(int(p.name) for p in out.iterdir()) == list(range(50))
    # Idle instances are shut down after the idle timeout.
    deadline = time.monotonic() + 60
    while json.loads(fast_server.cli("instances", "--json").stdout):
        assert time.monotonic() < deadline, "idle instances were not shut down"
        time.sleep(0.5)
    messages = [str(line.get("message", "")) for line in fast_server.log_lines()]
    created = [m for m in messages if "created at 127.0.0.1" in m]
    installs = [m for m in messages if "installing runner program" in m]
    assert 1 <= len(created) <= 50
    # Instances on one host share the content-addressed runner path: the first install serves
    # the others, whose md5 check then finds it in place.
    assert 1 <= len(installs) <= len(created)
    assert any("boot probe succeeded" in m for m in messages)
    assert any("shutdown worker (state idle" in m for m in messages)
    # The runner verbs went to one resident agent per instance, never falling back to commands,
    # and the agents ended with their instances.
    assert 1 <= sum("resident runner started" in m for m in messages) <= len(created)
    assert not [m for m in messages if "using commands" in m or "resident runner:" in m]
    serving = subprocess.run(
        ["pgrep", "-f", f"{tmp_path}/loopback/runner-bin/herder-runner.* --serve"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert serving.stdout == "", "resident runners outlived their instances"


def test_restart_after_kill_9_adopts_running_containers(
    fast_server: Server, tmp_path: Path
) -> None:
    marker = fast_server.marker  # type: ignore[attr-defined]
    starts = tmp_path / "starts"
    starts.mkdir()
    gate = tmp_path / "gate"
    uuids = [
        _submit(
            fast_server,
            "sh",
            "-c",
            f"echo x >> {starts}/{i}; while [ ! -e {gate} ]; do sleep 0.1; done # {marker}",
        )
        for i in range(3)
    ]
    deadline = time.monotonic() + 60
    while len(list(starts.iterdir())) < 3:
        assert time.monotonic() < deadline, fast_server.log_path.read_text()[-3000:]
        time.sleep(0.2)
    fast_server.stop(signal.SIGKILL)
    fast_server.start()
    gate.touch()  # let the containers finish while the new dispatcher watches them
    states = _wait_final(fast_server, uuids, timeout=120)
    assert {s["state"] for s in states.values()} == {"Complete"}, states
    assert {s["exit_code"] for s in states.values()} == {0}
    for i in range(3):
        assert (starts / str(i)).read_text() == "x\n"  # each ran exactly once
    assert fast_server.stop() == 0


def test_shell_metacharacters_and_secrets(fast_server: Server, tmp_path: Path) -> None:
    marker = fast_server.marker  # type: ignore[attr-defined]
    pwned = tmp_path / "pwned"
    evil_name = f"x'; touch {pwned}; echo '$(touch {pwned})`touch {pwned}`"
    uuid = _submit(fast_server, "sh", "-c", f"echo 'only this' # {marker}", name=evil_name)
    states = _wait_final(fast_server, [uuid])
    assert states[uuid]["state"] == "Complete" and states[uuid]["exit_code"] == 0
    assert not pwned.exists()
    assert "only this" in fast_server.cli("logs", uuid).stdout
    # A malformed uuid never reaches a shell: the API refuses it.
    bad = fast_server.cli("container", f"e2e01-dz642-aaaaaaaaaaaaaaa; touch {pwned}")
    assert bad.returncode != 0 and not pwned.exists()
    # The management token appears in no process's argv and not in the log.
    token = fast_server.env["HERDER_MANAGEMENT_TOKEN"]
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            assert token.encode() not in cmdline.read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    assert token not in fast_server.log_path.read_text()


def test_arrays_and_dependencies_run_in_order(fast_server: Server, tmp_path: Path) -> None:
    """An array waits for a first container; a last one waits for the whole array; a
    container after a failing one is cancelled with the reason; `submit --wait` on the array
    waits for every member."""
    marker = fast_server.marker  # type: ignore[attr-defined]
    out = tmp_path / "out"
    out.mkdir()
    first = _submit(fast_server, "sh", "-c", f"sleep 0.5; echo a > {out}/first # {marker}")
    array = fast_server.cli(
        "submit",
        "--vcpus",
        "1",
        "--ram",
        "256MiB",
        "--count",
        "3",
        "--after",
        first,
        "--",
        "sh",
        "-c",
        f'test -f {out}/first && echo "$HERDER_ARRAY_ID" > {out}/m$HERDER_ARRAY_INDEX # {marker}',
    )
    assert array.returncode == 0, array
    members = array.stdout.split()
    array_id = array.stderr.split("array ", 1)[1].split(":", 1)[0]
    waited = fast_server.cli(
        "submit",
        "--vcpus",
        "1",
        "--ram",
        "256MiB",
        "--wait",
        *[arg for m in members for arg in ("--after", m)],
        "--",
        "sh",
        "-c",
        f"ls {out} > {out}/last # {marker}",
    )
    assert waited.returncode == 0, waited
    assert (out / "last").read_text().split() == ["first", "last", "m0", "m1", "m2"]
    assert {(out / f"m{i}").read_text().strip() for i in range(3)} == {array_id}
    listed = json.loads(fast_server.cli("containers", "--json", "--array", array_id).stdout)
    assert sorted(c["uuid"] for c in listed) == sorted(members)
    failing = _submit(fast_server, "sh", "-c", f"exit 5 # {marker}")
    doomed = fast_server.cli("submit", "--after", failing, "--wait", "--", "true")
    assert doomed.returncode == 1
    assert f"dependency {failing} failed with exit code 5" in doomed.stderr


def _log(server: Server, uuid: str) -> str:
    result = server.cli("logs", uuid)
    assert result.returncode == 0, result
    return result.stdout


def _wait_log(server: Server, uuid: str, text: str, timeout: float = 60) -> str:
    """The log once it holds ``text`` (fails after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        log = _log(server, uuid)
        if text in log:
            return log
        assert time.monotonic() < deadline, (log, server.log_path.read_text()[-3000:])
        time.sleep(0.2)


def test_live_log_lines_arrive_while_the_container_runs(
    fast_server: Server, tmp_path: Path
) -> None:
    marker = fast_server.marker  # type: ignore[attr-defined]
    gate = tmp_path / "gate"
    uuid = _submit(
        fast_server,
        "sh",
        "-c",
        f"echo first; echo warn >&2; while [ ! -e {gate} ]; do sleep 0.1; done; "
        f"echo last >&2 # {marker}",
    )
    follow = subprocess.Popen(
        [*HERDER, "logs", "--follow", uuid],
        env=fast_server.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert follow.stdout is not None
        seen = ""
        while "stdout first" not in seen:
            line = follow.stdout.readline()
            assert line, "logs --follow ended early"
            seen += line
        # Shown while the container is still running: it waits for the gate.
        assert json.loads(fast_server.cli("container", uuid, "--json").stdout)["state"] == (
            "Running"
        )
        log = _wait_log(fast_server, uuid, "stderr warn")
        assert "stdout first" in log and "last" not in log
        gate.touch()
        rest, _ = follow.communicate(timeout=60)
    finally:
        if follow.poll() is None:
            follow.kill()
    assert "stderr last" in seen + rest
    states = _wait_final(fast_server, [uuid])
    assert states[uuid]["exit_code"] == 0
    log = _log(fast_server, uuid)
    # Every line once, each stream marked.
    assert [line for line in log.splitlines() if not line.startswith("runner ")] == [
        "stdout first",
        "stderr warn",
        "stderr last",
    ] or sorted(log.splitlines()) == ["stderr last", "stderr warn", "stdout first"]


def test_cancelled_and_timed_out_containers_keep_their_output(fast_server: Server) -> None:
    marker = fast_server.marker  # type: ignore[attr-defined]
    cancelled = _submit(
        fast_server,
        "sh",
        "-c",
        f"trap 'echo got TERM; exit 1' TERM; echo alive; while true; do sleep 0.1; done # {marker}",
    )
    timed_out = _submit(
        fast_server,
        "sh",
        "-c",
        f"echo begin; sleep 30 # {marker}",
        extra=("--max-run-time", "2s"),
    )
    _wait_log(fast_server, cancelled, "stdout alive")
    assert fast_server.cli("cancel", cancelled).returncode == 0
    # The lines written after the cancellation, while the container stopped, are kept too.
    log = _wait_log(fast_server, cancelled, "stdout got TERM")
    assert log.index("stdout alive") < log.index("stdout got TERM")
    # herder cancels a container past its max run time (the runner would stop it too).
    states = _wait_final(fast_server, [timed_out])
    assert states[timed_out]["state"] == "Cancelled", json.dumps(states[timed_out])
    assert "max run time" in states[timed_out]["runtime_status"]["error"]
    # Whichever stopped it first (herder's cancel or the runner's own limit), the runner's
    # note about it is the log's last line, after the container's own output.
    log = _wait_log(fast_server, timed_out, "\nrunner ")
    assert log.startswith("stdout begin\n")
    assert "received signal 15" in log or "max run time of 2 seconds exceeded" in log


def test_a_log_past_the_limit_ends_with_a_truncated_line(fast_server: Server) -> None:
    marker = fast_server.marker  # type: ignore[attr-defined]
    uuid = _submit(
        fast_server,
        "sh",
        "-c",
        f"i=0; while [ $i -lt 2000 ]; do echo line $i; i=$((i+1)); done # {marker}",
    )
    states = _wait_final(fast_server, [uuid])
    assert states[uuid]["exit_code"] == 0
    log = _wait_log(fast_server, uuid, "log truncated")
    assert log.startswith("stdout line 0\n")
    assert "line 1999" not in log
    assert log.rstrip("\n").endswith("later output is discarded")
    assert len(log.encode()) < 8192 + 1024


FAKE_DOCKER = """#!/bin/sh
# A docker CLI for the loopback instances: "nodaemon" images find no daemon, "nosuch" images do
# not exist, any other image runs the command as a plain process.
[ "$1" = run ] || exit 0
shift
while [ $# -gt 0 ]; do
  case "$1" in
    --rm) shift ;;
    --name|--cpus|--memory|-e|-w|--gpus|--device|--group-add) shift 2 ;;
    *) break ;;
  esac
done
image=$1
shift
case "$image" in
  nodaemon*)
    echo "docker: Cannot connect to the Docker daemon at unix:///var/run/docker.sock." >&2
    exit 125 ;;
  nosuch*)
    echo "Unable to find image '$image' locally" >&2
    echo "docker: Error response from daemon: pull access denied for nosuch." >&2
    exit 125 ;;
esac
exec "$@"
"""


def test_infrastructure_failures_are_not_exit_codes(tmp_path: Path) -> None:
    marker = f"m{os.getpid()}x{time.monotonic_ns()}"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(FAKE_DOCKER)
    (bin_dir / "docker").chmod(0o755)
    config = tmp_path / "herder.yaml"
    config.write_text(
        FAST_CONFIG.format(
            max_instances=4,
            state_dir=tmp_path / "loopback",
            db=tmp_path / "herder.db",
            marker=marker,
        ).replace("  log_limit: 8KiB\n", "  log_limit: 8KiB\n  max_dispatch_attempts: 2\n")
    )
    server = Server(tmp_path / "data", config, tmp_path / "serve.log")
    server.env["PATH"] = f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    server.start()
    try:
        program = _submit(
            server,
            "sh",
            "-c",
            f"echo mine; exit 125 # {marker}",
            extra=("--image", "alpine:3", "--pull", "always"),
        )
        image = _submit(server, "true", extra=("--image", "nosuch:1"))
        states = _wait_final(server, [program, image])
        # A real program exiting 125 is its exit code.
        assert states[program]["state"] == "Complete", states[program]
        assert states[program]["exit_code"] == 125
        # It was pulled first (policy always), and the record says how long that took.
        assert states[program]["runtime_status"]["image_pull"].startswith("pulled in ")
        assert "pulled image alpine:3 in" in _log(server, program)
        # No such image: cancelled with the runtime's message, the instance stays in service.
        assert states[image]["state"] == "Cancelled" and states[image]["exit_code"] is None
        assert "pull access denied for nosuch" in states[image]["runtime_status"]["error"]
        instances = json.loads(server.cli("instances", "--json").stdout)
        assert instances and all(i["idle_behavior"] == "run" for i in instances), instances
        # No daemon: the instance is at fault; retried elsewhere until the attempts run out.
        daemon = _submit(server, "true", extra=("--image", "nodaemon:1"))
        states = _wait_final(server, [daemon])
        c = states[daemon]
        assert c["state"] == "Cancelled" and c["exit_code"] is None, c
        assert c["attempts"] == 2
        assert "Cannot connect to the Docker daemon" in c["runtime_status"]["error"]
        # Each attempt is in the record: where it ran, and why it ended.
        history = c["attempt_history"]
        assert [a["outcome"] for a in history] == ["retried", "retried"], history
        assert len({a["instance_id"] for a in history}) == 2  # retried elsewhere
        assert all(
            "could not start the container: docker: Cannot connect" in a["reason"] for a in history
        )
        shown = server.cli("container", daemon).stdout
        assert "It ran 2 times" in shown
        drained = [
            line
            for line in server.log_lines()
            if "cannot start containers" in str(line.get("message", ""))
        ]
        assert len(drained) == 2, drained
        assert server.stop() == 0
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.stop(signal.SIGKILL)
        _cleanup_runner_processes(marker)

"""The CLI over the management API, against a live APIServer on the sim driver, and the client's
address and token resolution."""

from __future__ import annotations

import io
import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from herder.app import cli
from herder.app.api import APIServer
from herder.app.client import (
    Client,
    ClientError,
    Endpoint,
    default_data_dir,
    listen_url,
    read_client_file,
    resolve_endpoint,
    write_client_file,
)
from herder.app.commands import Context, containers
from herder.app.commands.containers import colour_column, exit_status
from herder.config import Config, load_config
from herder.engine.cloud_engine import CloudEngine
from herder.runtime import VirtualRuntime
from herder.testing.sim import SimDriver

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TOKEN = "cli-test-token"
UUID_RE = re.compile(r"^sim01-dz642-[a-z0-9]{15}$")


def _config(token: str = TOKEN) -> Config:
    config = load_config(EXAMPLES / "sim.yaml")
    return config.model_copy(
        update={
            "queue": config.queue.model_copy(update={"path": ":memory:"}),
            "api": config.api.model_copy(
                update={
                    "listen": "127.0.0.1:0",
                    "management_token": token,
                    "management_token_env": "",
                }
            ),
        }
    )


class Live:
    """A dispatcher on a virtual clock behind a real API server."""

    def __init__(self, config: Config) -> None:
        self.runtime = VirtualRuntime()
        self.dispatcher = CloudEngine(config, runtime=self.runtime, driver=SimDriver())
        self.dispatcher.start()
        self.runtime.run_until_idle()
        self.server = APIServer(self.dispatcher, config)
        self.server.start()
        self.url = self.server.url

    def stop(self) -> None:
        self.server.stop()
        self.dispatcher.stop()
        self.runtime.shutdown()


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No config file, no saved client file, no server or token in the environment."""
    for name in ("HERDER_CONFIG", "HERDER_SERVER", "HERDER_MANAGEMENT_TOKEN", "XDG_DATA_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HERDER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def live(monkeypatch: pytest.MonkeyPatch) -> Iterator[Live]:
    server = Live(_config())
    # Waiting commands move the virtual clock instead of sleeping: the CLI runs on this
    # thread, between requests, so the single-threaded runtime is never entered twice.
    monkeypatch.setattr(containers, "sleep", server.runtime.advance)
    yield server
    server.stop()


def run(capsys: pytest.CaptureFixture[str], live: Live | None, *argv: str) -> tuple[int, str, str]:
    args = list(argv)
    if live is not None:  # right after the command name: `submit` takes the rest as COMMAND
        args[1:1] = ["--server", live.url, "--token", TOKEN]
    status = cli.main(args)
    out, err = capsys.readouterr()
    return status, out, err


def submit(capsys, live, *argv: str) -> str:
    status, out, err = run(capsys, live, "submit", *argv)
    assert status == 0, err
    uuid = out.strip()
    assert UUID_RE.match(uuid), out
    return uuid


# --------------------------------------------------------------------------- start-up

#: What a client command must not import: the server's and the configuration's machinery, the
#: plugins, and what the light client replaces (``http.client`` brings ``email`` and ``ssl``).
HEAVY = (
    "pydantic", "herder.config", "herder.model", "prometheus_client", "pluggy", "fastapi",
    "uvicorn", "paramiko", "yaml", "importlib.metadata", "herder.plugin.registry",
    "http.client", "email", "ssl", "logging", "dataclasses", "herder.app.commands.serve",
)  # fmt: skip


def test_client_commands_start_without_the_heavy_modules(live: Live) -> None:
    """`herder submit` in a shell loop must be quick: each client command, run to the end
    against a server, imports none of :data:`HEAVY`.  (The wall time itself is measured in
    benchmarks/cli_startup.py.)"""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from herder.app import cli\n"
        "status = cli.main(sys.argv[1:])\n"
        f"heavy = {HEAVY!r}\n"
        "print(status, ','.join(m for m in heavy if m in sys.modules))\n"
    )

    def imports(name: str, *argv: str) -> tuple[str, str]:
        cmd = [sys.executable, "-c", probe, name, "--server", live.url, "--token", TOKEN, *argv]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)
        lines = done.stdout.strip().splitlines()
        status, _, found = lines[-1].partition(" ")
        assert status == "0", done.stderr
        return lines[0], found

    uuid, found = imports("submit", "--", "sim", "1", "0")
    assert UUID_RE.match(uuid) and found == ""
    for argv in (["containers"], ["logs", uuid], ["cancel", uuid], ["instances"]):
        assert imports(*argv)[1] == "", argv


# --------------------------------------------------------------------------- submit


def test_submit_prints_the_uuid_and_sends_every_option(capsys, live):
    uuid = submit(
        capsys,
        live,
        "--image",
        "alpine",
        "--vcpus",
        "2",
        "--ram",
        "1GiB",
        "--scratch",
        "2G",
        "--priority",
        "9",
        "--env",
        "A=1",
        "--env",
        "B=x=y",
        "--name",
        "job",
        "--runtime",
        "process",
        "--max-run-time",
        "1h",
        "--gpus",
        "0",
        "--",
        "sh",
        "-c",
        "echo hi",
    )
    ctr = live.dispatcher.queue.get(uuid)
    assert ctr is not None
    assert ctr.spec.command == ("sh", "-c", "echo hi")
    assert ctr.spec.image == "alpine" and ctr.spec.name == "job" and ctr.priority == 9
    assert dict(ctr.spec.environment) == {"A": "1", "B": "x=y"}
    rc = ctr.runtime_constraints
    assert (rc.vcpus, rc.ram, rc.scratch) == (2, 1024**3, 2 * 1000**3)
    assert ctr.scheduling_parameters.max_run_time == 3600.0
    assert ctr.spec.runtime == "process"


def test_submission_body_of_the_flags():
    from herder.app.commands.containers import build_submission

    args = cli.build_parser().parse_args(
        ["submit", "--preemptible", "--gpus", "2", "--ram", "1000", "echo", "--image", "x"]
    )
    body = build_submission(args)
    assert body["scheduling_parameters"]["preemptible"] is True
    assert body["runtime_constraints"] == {"vcpus": 1, "ram": 1000, "scratch": 0, "gpus": 2}
    assert body["command"] == ["echo", "--image", "x"]  # options after the command are its own


def test_submit_without_a_command_is_a_usage_error(capsys, live):
    status, _, err = run(capsys, live, "submit", "--image", "x")
    assert status == 2 and "no command" in err


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--env", "NOEQUALS"], "KEY=VALUE"),
        (["--ram", "lots"], "--ram"),
        (["--max-run-time", "soon"], "--max-run-time"),
    ],
)
def test_submit_option_errors_name_the_option(capsys, live, option, message):
    status, _, err = run(capsys, live, "submit", *option, "--", "true")
    assert status == 2 and message in err


def test_submit_refused_by_the_server_names_the_field(capsys, live):
    status, _, err = run(capsys, live, "submit", "--cwd", "relative", "--", "true")
    assert status == 1
    assert "cwd must be an absolute path (cwd)" in err


def test_unsatisfiable_submission_exits_1_with_the_reason(capsys, live):
    status, out, err = run(capsys, live, "submit", "--vcpus", "999", "--", "true")
    assert status == 1
    assert UUID_RE.match(out.strip())
    assert "cancelled" in err


def test_submit_wait_follows_to_the_exit_code(capsys, live):
    status, out, err = run(capsys, live, "submit", "--wait", "--", "sim", "20", "3")
    lines = out.splitlines()
    assert UUID_RE.match(lines[0])
    assert "exited with code 3" in out  # the log, on stdout
    assert status == 3
    assert "Waiting for a small instance to boot" in err
    assert "Running on" in err
    assert "Complete: exit code 3" in err


def test_submit_wait_exits_1_when_cancelled(capsys, live, monkeypatch):
    cancelled: list[str] = []

    def advance_then_cancel(seconds: float) -> None:
        live.runtime.advance(seconds)
        if not cancelled:
            [ctr] = live.dispatcher.queue.list()
            live.dispatcher.queue.cancel(ctr.uuid, "operator said no")
            cancelled.append(ctr.uuid)

    monkeypatch.setattr(containers, "sleep", advance_then_cancel)
    status, _, err = run(capsys, live, "submit", "--wait", "--", "sim", "600", "0")
    assert status == 1
    assert "Cancelled: operator said no" in err


def test_submit_from_yaml_submits_all_with_the_options_as_defaults(capsys, live, tmp_path):
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(
        "- command: [sim, '5', '0']\n  name: first\n  env: {A: '1'}\n"
        "- command: sim 5 0\n  vcpus: 2\n  ram: 1GiB\n"
    )
    status, out, err = run(capsys, live, "submit", "--priority", "7", "--from", str(jobs))
    assert status == 0, err
    uuids = out.split()
    assert len(uuids) == 2 and all(UUID_RE.match(u) for u in uuids)
    first, second = (live.dispatcher.queue.get(u) for u in uuids)
    assert first is not None and second is not None
    assert first.spec.name == "first" and first.spec.environment == (("A", "1"),)
    assert second.spec.command == ("sim", "5", "0")
    assert second.spec.runtime_constraints.vcpus == 2
    assert first.priority == second.priority == 7


def test_submit_from_json_lines_waits_for_all(capsys, live, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"command": ["sim", "5", "0"]}\n\n{"command": ["sim", "5", "3"]}\n')
    status, out, err = run(capsys, live, "submit", "--wait", "--from", str(jobs))
    assert status == 1, err  # the second one exits 3
    assert len(out.split()) == 2
    assert "2 of 2 ended, 1 failed or cancelled" in err
    assert "exit code 3" in err


def test_submit_from_a_large_batch_waits_through_the_listing(capsys, live, tmp_path, monkeypatch):
    jobs = tmp_path / "jobs.jsonl"
    lines = (json.dumps({"command": ["sim", "5", str(i % 2)]}) + "\n" for i in range(30))
    jobs.write_text("".join(lines))
    asked: list[str] = []
    real = Client.container
    monkeypatch.setattr(
        Client, "container", lambda self, uuid: asked.append(uuid) or real(self, uuid)
    )
    status, out, err = run(capsys, live, "submit", "--wait", "--from", str(jobs))
    assert status == 1 and len(out.split()) == 30
    assert "30 of 30 ended, 15 failed or cancelled" in err
    assert asked == []  # followed through the listing, not container by container


def test_submit_from_items_wait_for_each_other_by_name(capsys, live, tmp_path):
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(
        "- {name: merge, command: 'sim 5 0', after: [left, right]}\n"
        "- {name: left, command: 'sim 5 0'}\n"
        "- {name: right, command: 'sim 5 0', after: left}\n"
    )
    status, out, err = run(capsys, live, "submit", "--wait", "--from", str(jobs))
    assert status == 0, err
    merge, left, right = out.split()
    queue = live.dispatcher.queue
    assert queue.get(merge).spec.after == (left, right)
    assert queue.get(right).spec.after == (left,)
    assert queue.get(left).finished_at <= queue.get(right).started_at
    # An unknown name and a cycle name the item in the file, and nothing is submitted.
    stored = len(queue.list())
    jobs.write_text("- {name: a, command: 'true'}\n- {command: 'true', after: [b]}\n")
    status, _, err = run(capsys, live, "submit", "--from", str(jobs))
    assert status == 1 and len(err.splitlines()) == 1
    assert "jobs.yaml item 2: after: 'b' is not a container uuid" in err
    jobs.write_text(
        '{"name": "a", "command": ["true"], "after": ["b"]}\n'
        '{"name": "b", "command": ["true"], "after": "a"}\n'
    )
    status, _, err = run(capsys, live, "submit", "--from", str(jobs))
    assert status == 1 and f"{jobs}:1: after: a cycle: 'a' -> 'b' -> 'a'" in err
    assert len(queue.list()) == stored


def test_submit_from_a_bad_item_submits_nothing_and_names_it(capsys, live, tmp_path):
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text("- command: ['true']\n- command: ['true']\n  colour: blue\n")
    status, out, err = run(capsys, live, "submit", "--from", str(jobs))
    assert status == 2 and out == ""
    assert "jobs.yaml item 2: unknown field 'colour'" in err
    jobs.write_text('{"command": ["true"]}\n{"command": ["true"], "cwd": "relative"}\n')
    status, out, err = run(capsys, live, "submit", "--from", str(jobs))
    assert status == 1 and out == ""
    assert f"{jobs}:2: " in err and "cwd" in err and len(err.splitlines()) == 1
    assert live.dispatcher.queue.list() == []
    status, _, err = run(capsys, live, "submit", "--from", str(tmp_path / "none.yaml"))
    assert status == 2 and "No such file" in err
    status, _, err = run(capsys, live, "submit", "--from", str(jobs), "--", "true")
    assert status == 2 and "not both" in err


def test_submit_count_makes_an_array_to_list_and_cancel(capsys, live):
    status, out, err = run(capsys, live, "submit", "--count", "3", "--priority", "0", "--", "true")
    assert status == 0, err
    uuids = out.split()
    array_id = re.search(r"array (\S+): 3 containers", err)
    assert array_id is not None and len(uuids) == 3
    array = array_id.group(1)
    submit(capsys, live, "--priority", "0", "--", "true")  # not a member
    status, out, _ = run(capsys, live, "containers", "--json", "--array", array)
    assert status == 0 and sorted(c["uuid"] for c in json.loads(out)) == sorted(uuids)
    live.dispatcher.queue.cancel(uuids[0], "done with it")
    status, _, err = run(capsys, live, "cancel", "--array", array)
    assert status == 0, err
    assert sorted(line.split(":")[0] for line in err.splitlines()) == sorted(uuids[1:])
    states = {c.uuid: c.state.value for c in live.dispatcher.queue.list()}
    assert [states[u] for u in uuids] == ["Cancelled"] * 3
    assert list(states.values()).count("Queued") == 1
    status, _, err = run(capsys, live, "cancel", "--array", array)
    assert status == 0 and "no unfinished containers" in err
    for argv in (
        ("cancel",),
        ("cancel", "--array", "nope"),
        ("containers", "--array", "x"),
        ("submit", "--count", "0", "--", "true"),
    ):
        status, _, err = run(capsys, live, *argv)
        assert status == 2 and len(err.splitlines()) == 1, argv


def test_an_array_that_fits_nothing_is_one_line_of_error(capsys, live):
    status, out, err = run(capsys, live, "submit", "--count", "50", "--vcpus", "512", "--", "true")
    assert status == 1 and len(out.split()) == 50
    [line] = [x for x in err.splitlines() if "cancelled" in x]
    assert line.startswith("herder: 50 containers: cancelled: cannot run container")
    assert "512" in line


def test_submit_count_wait_waits_for_every_member(capsys, live):
    status, out, err = run(capsys, live, "submit", "--count", "3", "--wait", "--", "sim", "5", "0")
    assert status == 0, err
    assert len(out.split()) == 3
    assert "3 of 3 ended, 0 failed or cancelled" in err


def test_submit_after_waits_for_the_dependency(capsys, live, tmp_path):
    first = submit(capsys, live, "--", "sim", "20", "0")
    status, out, err = run(
        capsys, live, "submit", "--after", first, "--wait", "--", "sim", "5", "0"
    )
    assert status == 0, err
    assert f"until {first} complete with exit code 0" in err
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(f"- command: sim 5 0\n  after: {first}\n")
    status, out, err = run(capsys, live, "submit", "--from", str(jobs))
    assert status == 0, err
    ctr = live.dispatcher.queue.get(out.strip())
    assert ctr is not None and ctr.spec.after == (first,)
    status, out, _ = run(capsys, live, "container", ctr.uuid)
    assert re.search(rf"^after:\s+{first}$", out, re.M)
    status, _, err = run(capsys, live, "submit", "--after", "nope", "--", "true")
    assert status == 2 and "--after 'nope': not a container uuid" in err


def test_vcpus_zero_is_a_shared_vcpu_and_negative_is_refused(capsys, live):
    uuid = submit(capsys, live, "--vcpus", "0", "--", "true")
    ctr = live.dispatcher.queue.get(uuid)
    assert ctr is not None and ctr.runtime_constraints.vcpus == 0
    assert ctr.state.value == "Queued"
    for option, value in (("--vcpus", "-1"), ("--gpus", "-2"), ("--ram", "-1G")):
        status, out, err = run(capsys, live, "submit", f"{option}={value}", "--", "true")
        assert status == 2 and out == "", (option, err)
        assert len(err.splitlines()) == 1 and option.split("-")[-1] in err
    assert len(live.dispatcher.queue.list()) == 1


def test_exit_status_mapping():
    assert exit_status({"state": "Complete", "exit_code": 0}) == 0
    assert exit_status({"state": "Complete", "exit_code": 42}) == 42
    assert exit_status({"state": "Complete", "exit_code": 256}) == 1  # never wraps to 0
    assert exit_status({"state": "Complete", "exit_code": -9}) == 1
    assert exit_status({"state": "Cancelled", "exit_code": None}) == 1


# --------------------------------------------------------------------------- listing


def test_containers_table_and_json(capsys, live):
    done = submit(capsys, live, "--name", "first", "--", "sim", "5", "0")
    live.runtime.advance(60)
    held = submit(capsys, live, "--priority", "0", "--", "true")
    status, out, _ = run(capsys, live, "containers")
    assert status == 0
    header, *rows = out.splitlines()
    assert header.split()[:4] == ["UUID", "STATE", "EXIT", "PRIORITY"]
    assert "\x1b[" not in out  # not a terminal: no colour
    by_uuid = {row.split()[0]: row for row in rows}
    assert "Complete" in by_uuid[done] and "first" in by_uuid[done]
    assert "priority is 0" in by_uuid[held]
    # Columns line up: every row's STATE starts under the header's.
    col = header.index("STATE")
    assert all(row[col:].split()[0] in ("Complete", "Queued") for row in rows)

    status, out, _ = run(capsys, live, "containers", "--json", "--state", "Complete")
    assert status == 0
    items = json.loads(out)
    assert [c["uuid"] for c in items] == [done]
    assert items[0]["exit_code"] == 0


def test_containers_follows_pages_up_to_the_limit(capsys, live):
    made = []
    for _ in range(5):
        made.insert(0, submit(capsys, live, "--priority", "0", "--", "true"))
        live.runtime.advance(1)
    _, out, err = run(capsys, live, "containers", "--json", "--limit", "3")
    assert [c["uuid"] for c in json.loads(out)] == made[:3]
    assert "--limit" in err
    _, out, err = run(capsys, live, "containers", "--json", "--limit", "5")
    assert len(json.loads(out)) == 5 and err == ""  # exactly all: no hint
    client = Client(live.url, TOKEN)
    assert [c["uuid"] for c in client.iter_containers(page_size=2)] == made


def test_containers_queue_lists_what_runs_next_first(capsys, live):
    blocker = submit(capsys, live, "--priority", "0", "--", "true")
    made = {}
    for priority in ("1", "5", "3"):
        made[priority] = submit(capsys, live, "--priority", priority, "--after", blocker, "--", "x")
        live.runtime.advance(1)
    _, out, err = run(capsys, live, "containers", "--queue", "--json", "--limit", "2")
    assert [c["uuid"] for c in json.loads(out)] == [made["5"], made["3"]]
    assert "showing the first 2 in line" in err
    status, _, err = run(capsys, live, "containers", "--queue", "--state", "Running")
    assert status == 1 and "state Queued or Locked" in err and err.count("\n") == 1


def test_containers_lists_the_latest_submission_first_and_filters_by_time(capsys, live):
    for _ in range(3):
        submit(capsys, live, "--priority", "0", "--", "true")
    live.runtime.advance(3600)
    latest = submit(capsys, live, "--priority", "0", "--", "true")
    _, out, _ = run(capsys, live, "containers", "--limit", "1")
    assert out.splitlines()[1].split()[0] == latest
    created = live.dispatcher.queue.get(latest)
    assert created is not None
    since = containers.since_time("10m", now=created.created_at)
    status, out, _ = run(capsys, live, "containers", "--json", "--since", since)
    assert status == 0 and [c["uuid"] for c in json.loads(out)] == [latest]
    status, _, err = run(capsys, live, "containers", "--since", "last tuesday")
    assert status == 2 and "--since 'last tuesday'" in err and err.count("\n") == 1


def test_since_time_takes_a_duration_or_a_time():
    assert containers.since_time("1h", now=7200.0) == "1970-01-01T01:00:00Z"
    assert containers.since_time("2026-12-06T10:00:00Z") == "2026-12-06T10:00:00Z"
    assert containers.since_time("2026-12-06T11:00:00+01:00") == "2026-12-06T10:00:00Z"


def test_container_detail(capsys, live):
    uuid = submit(capsys, live, "--ram", "512MiB", "--", "sim", "5", "7")
    live.runtime.advance(60)
    status, out, _ = run(capsys, live, "container", uuid)
    assert status == 0
    assert re.search(r"^state:\s+Complete$", out, re.M)
    assert re.search(r"^exit code:\s+7$", out, re.M)
    assert "512MiB RAM" in out
    status, out, _ = run(capsys, live, "container", uuid, "--json")
    assert json.loads(out)["exit_code"] == 7
    status, _, err = run(capsys, live, "container", "sim01-dz642-000000000000000")
    assert status == 1 and "not found" in err
    status, _, err = run(capsys, live, "container", "junk")
    assert status == 2


def test_logs_and_follow(capsys, live):
    uuid = submit(capsys, live, "--", "sim", "10", "0")
    status, out, _ = run(capsys, live, "logs", uuid)
    assert status == 0 and out == ""
    status, out, err = run(capsys, live, "logs", "--follow", uuid)
    assert status == 0
    assert "exited with code 0" in out
    assert "Complete" in err
    status, again, _ = run(capsys, live, "logs", uuid)
    assert again == out


def test_cancel_several(capsys, live, monkeypatch):
    a = submit(capsys, live, "--priority", "0", "--", "true")
    b = submit(capsys, live, "--priority", "0", "--", "true")
    requests: list[str] = []
    real = Client._json
    monkeypatch.setattr(
        Client,
        "_json",
        lambda self, method, path, **kw: requests.append(path) or real(self, method, path, **kw),
    )
    status, out, err = run(capsys, live, "cancel", a, b, "--reason", "tidy")
    assert status == 0 and out == ""
    assert requests == ["/api/v1/containers/cancel"]  # one request for both
    assert f"{a}: Cancelled" in err and f"{b}: Cancelled" in err
    assert live.dispatcher.queue.get(a).status("error") == "cancelled via API: tidy"
    status, _, err = run(capsys, live, "cancel", a, "sim01-dz642-000000000000000")
    assert status == 1
    assert f"{a}: Cancelled already" in err
    assert "sim01-dz642-000000000000000: not found" in err
    # A malformed uuid is a usage error, as for every command, and nothing is cancelled.
    c = submit(capsys, live, "--priority", "0", "--", "true")
    status, _, err = run(capsys, live, "cancel", c, "junk")
    assert status == 2 and "'junk' is not a container uuid" in err
    assert live.dispatcher.queue.get(c).state.value == "Queued"
    status, _, err = run(capsys, live, "container", "junk")
    assert status == 2 and "'junk' is not a container uuid" in err


# --------------------------------------------------------------------------- instances


def _instance_ids(live: Live) -> list[str]:
    return [v.instance for v in live.dispatcher.pool.instances() if v.instance]


def test_instances_table_and_json(capsys, live):
    uuid = submit(capsys, live, "--", "sim", "600", "0")
    live.runtime.advance(20)
    [instance_id] = _instance_ids(live)
    status, out, _ = run(capsys, live, "instances")
    assert status == 0
    header, row = out.splitlines()
    assert header.split()[:4] == ["INSTANCE", "ADDRESS", "STATE", "IDLE-BEHAVIOR"]
    assert row.startswith(instance_id) and "running" in row and uuid in row
    assert "0.050000" in row
    status, out, _ = run(capsys, live, "instances", "--json")
    [item] = json.loads(out)
    assert item["instance"] == instance_id and item["running_container_uuids"] == [uuid]


def test_hold_drain_resume_kill_report_each_id(capsys, live):
    submit(capsys, live, "--", "sim", "600", "0")
    live.runtime.advance(20)
    [instance_id] = _instance_ids(live)

    status, out, err = run(capsys, live, "hold", instance_id)
    assert (status, out) == (0, "")
    assert err.strip() == f"{instance_id}: held"
    assert live.dispatcher.pool.instances()[0].idle_behavior == "hold"

    status, out, err = run(capsys, live, "drain", instance_id, "no-such-id")
    assert status == 1 and out == ""
    lines = err.strip().splitlines()
    assert lines[0] == f"{instance_id}: draining"
    assert lines[1] == "no-such-id: no such instance: no-such-id"

    status, _, err = run(capsys, live, "resume", instance_id)
    assert status == 0 and err.strip() == f"{instance_id}: in use"
    assert live.dispatcher.pool.instances()[0].idle_behavior == "run"
    run(capsys, live, "hold", instance_id)
    assert run(capsys, live, "run", instance_id)[0] == 0  # the old name still works
    assert live.dispatcher.pool.instances()[0].idle_behavior == "run"
    status, _, err = run(capsys, live, "kill", instance_id, "--reason", "testing")
    assert status == 0 and err.strip() == f"{instance_id}: shutting down"
    assert live.dispatcher.pool.instances()[0].worker_state == "shutdown"
    # Every route that cannot find an instance says it the same way.
    for action in ("hold", "kill"):
        status, _, err = run(capsys, live, action, "no-such-id")
        assert status == 1 and err.strip() == "no-such-id: no such instance: no-such-id"


def test_priority_changes_and_checks_its_arguments(capsys, live):
    uuid = submit(capsys, live, "--priority", "0", "--", "true")
    status, out, err = run(capsys, live, "priority", uuid, "7")
    assert (status, out) == (0, "") and err.strip() == f"{uuid}: priority 7 (Queued)"
    assert live.dispatcher.queue.get(uuid).priority == 7
    assert run(capsys, live, "priority", uuid, "-1")[0] == 2
    assert run(capsys, live, "priority", "junk", "1")[0] == 2
    status, _, err = run(capsys, live, "priority", "sim01-dz642-000000000000000", "1")
    assert status == 1 and "not found" in err


def test_ctrl_c_while_waiting_says_the_container_keeps_running(capsys, live, monkeypatch):
    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(containers, "follow", interrupted)
    status, out, err = run(capsys, live, "submit", "--wait", "--", "sim", "600", "0")
    uuid = out.strip()
    assert status == 130
    assert f"{uuid}: no longer waiting; the container keeps running" in err
    assert f"herder cancel {uuid}" in err
    assert live.dispatcher.queue.get(uuid).state.value != "Cancelled"


def test_a_closed_pipe_ends_quietly(capsys, live, monkeypatch):
    def closed(*_args, **_kwargs):
        raise BrokenPipeError

    monkeypatch.setattr(containers, "render_table", closed)
    status, _, err = run(capsys, live, "containers")
    assert status == 141 and err == ""


def test_instance_types_cheapest_first(capsys):
    status, out, _ = run(
        capsys, None, "--config", str(EXAMPLES / "aws.yaml"), "instance-types", "--offline"
    )
    assert status == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "NAME",
        "PROVIDER-TYPE",
        "VCPUS",
        "RAM",
        "SCRATCH",
        "GPUS",
        "PRICE",
        "SPOT",
        "PREEMPTIBLE",
    ]
    prices = [float(line.split()[6]) for line in lines[1:]]
    assert all(line.split()[7] == "-" for line in lines[1:])  # no server: no spot prices
    assert prices == sorted(prices) and len(prices) >= 2
    status, out, _ = run(
        capsys,
        None,
        "--config",
        str(EXAMPLES / "aws.yaml"),
        "instance-types",
        "--json",
        "--offline",
    )
    assert status == 0 and {"name", "price", "vcpus", "spot_price"} <= set(json.loads(out)[0])


def test_instance_types_come_from_the_server_when_one_answers(capsys, live, monkeypatch):
    monkeypatch.setattr(live.dispatcher.pool, "spot_prices", lambda: {"medium": 0.0421})
    status, out, err = run(capsys, live, "instance-types")
    assert status == 0 and err == ""
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert list(rows) == ["small", "medium", "large", "xlarge"]
    assert rows["medium"][7] == "0.042100"
    status, out, _ = run(capsys, live, "instance-types", "--json")
    assert [t["spot_price"] for t in json.loads(out)] == [None, 0.0421, None, None]


def test_instance_types_fall_back_to_the_configuration(capsys):
    status, out, err = run(
        capsys,
        None,
        "--config",
        str(EXAMPLES / "aws.yaml"),
        "instance-types",
        "--server",
        f"http://127.0.0.1:{_closed_port()}",
    )
    assert status == 0
    assert "no server answered" in err and "configuration's types" in err
    assert len(out.splitlines()) >= 3


def test_help_documents_the_exit_status(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "exit status, for every command" in out and "141" in out


def test_action_without_ids_is_a_usage_error(capsys, live):
    assert run(capsys, live, "drain")[0] == 2


# --------------------------------------------------------------------------- failures


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_server_not_running(capsys):
    url = f"http://127.0.0.1:{_closed_port()}"
    for argv in (
        ["containers"],
        ["instances"],
        ["hold", "a", "b"],
        ["submit", "--", "true"],
        ["logs", "sim01-dz642-000000000000000"],
    ):
        status, _, err = run(capsys, None, argv[0], "--server", url, *argv[1:])
        assert status == 1, argv
        assert f"cannot reach herder at {url}: connection refused" in err
        assert "herder serve" in err
        assert err.count("\n") == 1, err  # one message, even for several ids


def test_wrong_and_missing_token(capsys, live):
    status = cli.main(["containers", "--server", live.url, "--token", "wrong"])
    err = capsys.readouterr().err
    assert status == 1 and "refused the management token" in err
    status = cli.main(["instances", "--server", live.url])
    err = capsys.readouterr().err
    assert status == 1 and "wants a management token" in err


def test_server_without_a_token_says_so(capsys):
    server = Live(_config(token=""))
    try:
        status = cli.main(["containers", "--server", server.url, "--token", "x"])
        err = capsys.readouterr().err
        assert status == 1 and "not configured" in err
    finally:
        server.stop()


def test_something_else_on_the_port(capsys, live):
    client = Client(live.url + "/metrics", TOKEN)
    with pytest.raises(ClientError, match=r"not a JSON object|no such route"):
        client.instances()


# --------------------------------------------------------------------------- resolution


def test_default_data_dir():
    assert default_data_dir({"HERDER_DATA_DIR": "/d"}) == Path("/d")
    assert default_data_dir({"XDG_DATA_HOME": "/x", "HOME": "/h"}) == Path("/x/herder")
    assert default_data_dir({"HOME": "/h"}) == Path("/h/.local/share/herder")


def test_listen_url():
    assert listen_url("127.0.0.1:9190") == "http://127.0.0.1:9190"
    assert listen_url("0.0.0.0:80") == "http://127.0.0.1:80"
    assert listen_url(":9190") == "http://127.0.0.1:9190"
    assert listen_url("[::]:9190") == "http://[::1]:9190"
    assert listen_url("[::1]:9190") == "http://[::1]:9190"
    assert listen_url("http://h:1/") == "http://h:1"


def test_client_file_round_trip(tmp_path):
    path = write_client_file(tmp_path / "d", "http://127.0.0.1:1234", "secret")
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_client_file(tmp_path / "d") == Endpoint("http://127.0.0.1:1234", "secret")
    (tmp_path / "d" / "client.json").write_text("not json")
    assert read_client_file(tmp_path / "d") is None


def test_resolution_order(tmp_path):
    data = tmp_path / "data"
    write_client_file(data, "http://saved:1", "saved-token")
    config = Config.model_validate(
        {"api": {"listen": "10.0.0.1:7000", "management_token": "config-token"}}
    )
    env: dict[str, Any] = {"HERDER_DATA_DIR": str(data)}
    # Nothing given, no config file: what `herder serve` recorded.
    assert resolve_endpoint(environ=env) == Endpoint("http://saved:1", "saved-token")
    # A config file wins over the recorded file.
    assert resolve_endpoint(config=config, environ=env) == Endpoint(
        "http://10.0.0.1:7000", "config-token"
    )
    # The environment wins over the config.
    env.update(HERDER_SERVER="http://env:2", HERDER_MANAGEMENT_TOKEN="env-token")
    assert resolve_endpoint(config=config, environ=env) == Endpoint("http://env:2", "env-token")
    # Flags win over everything.
    assert resolve_endpoint(
        server="flag:3", token="flag-token", config=config, environ=env
    ) == Endpoint("http://flag:3", "flag-token")
    # Nothing anywhere: the default listen address, no token.
    assert resolve_endpoint(environ={"HERDER_DATA_DIR": str(tmp_path / "empty")}) == Endpoint(
        "http://127.0.0.1:9190", ""
    )


def test_cli_finds_the_server_through_the_config_file(capsys, live, tmp_path):
    host, port = live.server.address
    conf = tmp_path / "herder.yaml"
    conf.write_text(
        f"cluster_id: sim01\napi:\n  listen: {host}:{port}\n  management_token: {TOKEN}\n"
    )
    assert cli.main(["containers", "--json", "--config", str(conf)]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_cli_finds_a_default_server_through_client_json(capsys, live, monkeypatch):
    write_client_file(default_data_dir(), live.url, TOKEN)
    assert cli.main(["instances", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_cli_uses_the_environment(capsys, live, monkeypatch):
    monkeypatch.setenv("HERDER_SERVER", live.url)
    monkeypatch.setenv("HERDER_MANAGEMENT_TOKEN", TOKEN)
    assert cli.main(["instances", "--json"]) == 0


# --------------------------------------------------------------------------- rendering


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_state_column_is_coloured_only_on_a_terminal(monkeypatch):
    from herder.app.commands import render_table
    from herder.app.commands.containers import STATE_COLOURS, use_colour

    rows = [["u1", "Running", "Running"], ["u2", "Odd", ""]]
    table = render_table(["uuid", "state", "name"], rows)
    coloured = colour_column(table, "state", STATE_COLOURS, True)
    lines = coloured.splitlines()
    assert lines[1].count("\x1b[34m") == 1  # the state cell, not the name cell
    assert re.sub(r"\x1b\[[0-9;]*m", "", coloured) == table
    assert lines[2] == table.splitlines()[2]
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert use_colour(Context(None, stdout=_TTY())) is True
    assert use_colour(Context(None, stdout=io.StringIO())) is False
    monkeypatch.setenv("NO_COLOR", "1")
    assert use_colour(Context(None, stdout=_TTY())) is False


def test_token_prints_the_token_the_cli_uses(capsys, monkeypatch, tmp_path):
    assert cli.main(["token"]) == 1
    assert "no management token found" in capsys.readouterr().err
    write_client_file(tmp_path / "data", "http://127.0.0.1:9", "from-serve")
    assert cli.main(["token"]) == 0
    assert capsys.readouterr().out == "from-serve\n"
    monkeypatch.setenv("HERDER_MANAGEMENT_TOKEN", "from-env")
    assert cli.main(["token"]) == 0
    assert capsys.readouterr().out == "from-env\n"


def test_instances_table_is_followed_by_probe_errors() -> None:
    from herder.app.commands.instances import probe_error_lines

    items = [
        {"instance": "i-1", "address": "10.0.0.1", "probe_error": ""},
        {"instance": "i-2", "address": "10.0.0.2", "probe_error": "bastion u@jump:22: refused"},
        {"instance": "", "address": "", "probe_error": "instance has no address"},
    ]
    assert probe_error_lines(items) == [
        "i-2: latest probe failed: bastion u@jump:22: refused",
        "(creating): latest probe failed: instance has no address",
    ]


def test_container_detail_says_it_ran_twice_and_why(capsys, live):
    from herder.model import ContainerSpec

    q = live.dispatcher.queue
    c = q.submit(ContainerSpec(command=("sim", "5", "0"), priority=0))
    q.set_priority(c.uuid, 1)
    q.lock(c.uuid)
    q.set_running(c.uuid, "i-first", "small")
    q.retry(c.uuid, "instance i-first disappeared")
    q.lock(c.uuid)
    q.set_running(c.uuid, "i-second", "small")
    q.finish(c.uuid, 0)
    status, out, _ = run(capsys, live, "container", c.uuid)
    assert status == 0
    assert re.search(
        r"^1\s+i-first\s+small\s+\S+\s+\S+\s+retried: instance i-first "
        r"disappeared\s",
        out,
        re.M,
    ), out
    assert re.search(r"^2\s+i-second\s+small\s+\S+\s+\S+\s+exit code 0\s", out, re.M), out
    assert "It ran 2 times:\n  attempt 1 on i-first: retried: instance i-first disappeared" in out
    status, out, _ = run(capsys, live, "container", c.uuid, "--json")
    history = json.loads(out)["attempt_history"]
    assert [(a["number"], a["outcome"], a["exit_code"]) for a in history] == [
        (1, "retried", None),
        (2, "complete", 0),
    ]
    assert history[0]["reason"] == "instance i-first disappeared"


def test_submit_pull_policy_reaches_the_record(capsys, live):
    uuid = submit(capsys, live, "--image", "alpine:3", "--pull", "always", "--", "sim", "5", "0")
    status, out, _ = run(capsys, live, "container", uuid, "--json")
    assert json.loads(out)["pull_policy"] == "always"
    status, out, _ = run(capsys, live, "container", uuid)
    assert re.search(r"^pull policy:\s+always$", out, re.M)
    status, _, err = run(capsys, live, "submit", "--pull", "sometimes", "--", "true")
    assert status == 2 and "--pull" in err


def test_logs_stream_keeps_one_streams_lines_without_markers(capsys, live):
    from herder.app.commands.containers import StreamFilter

    uuid = submit(capsys, live, "--priority", "0", "--", "true")
    live.dispatcher.queue.append_log(uuid, b"stdout one\nstderr two\nrunner note\nstdout thr")
    live.dispatcher.queue.append_log(uuid, b"ee\n")
    status, out, _ = run(capsys, live, "logs", uuid, "--stream", "stdout")
    assert status == 0 and out == "one\nthree\n"
    status, out, _ = run(capsys, live, "logs", uuid, "--stream", "stderr")
    assert out == "two\n"
    status, out, _ = run(capsys, live, "logs", uuid)
    assert out == "stdout one\nstderr two\nrunner note\nstdout three\n"
    # Chunks cut inside a line are joined before filtering.
    f = StreamFilter("stderr")
    assert f.feed("stdout a\nstd") + f.feed("err b\nstderr c") + f.end() == "b\nc\n"


# --------------------------------------------------------------------------- spend


def test_quotas_of_a_driver_that_cannot_read_them(capsys, live):
    status, out, _ = run(capsys, live, "quotas")
    assert status == 0
    assert "quotas are not read" in out
    status, out, _ = run(capsys, live, "quotas", "--json")
    assert json.loads(out) == {"enabled": False, "items": []}


def test_quotas_table_shows_limit_usage_and_herders_share(capsys, monkeypatch):
    config = _config()
    params = {**config.cloud.driver_parameters, "quota_vcpus": {"s": 4}}
    config = config.model_copy(
        update={
            "cloud": config.cloud.model_copy(
                update={"driver_parameters": params, "quota_refresh_interval": 10.0}
            )
        }
    )
    server = Live(config)
    try:
        monkeypatch.setattr(containers, "sleep", server.runtime.advance)
        submit(capsys, server, "--vcpus", "2", "--ram", "1GiB", "--", "sim", "600", "0")
        server.runtime.advance(30)
        status, out, _ = run(capsys, server, "quotas")
        assert status == 0
        header, row = out.splitlines()[:2]
        assert header.split()[:9] == [
            "QUOTA",
            "GROUP",
            "UNIT",
            "LIMIT",
            "USAGE",
            "HERDER",
            "PENDING",
            "WANTED",
            "HEADROOM",
        ]
        assert row.split()[:9] == ["sim-s-vcpus", "s", "vcpus", "4", "2", "2", "0", "0", "2"]
    finally:
        server.stop()


def test_costs_asks_the_server_when_one_answers(capsys, live):
    submit(capsys, live, "--", "sim", "30", "0")
    live.runtime.advance(400)
    status, out, _ = run(capsys, live, "costs", "--json", "--period", "hour", "--last", "3")
    assert status == 0
    doc = json.loads(out)
    assert len(doc["by_period"]) == 3 and doc["since"].endswith("Z")
    assert doc["total"] > 0 and doc["containers"]["finished"] == 1
    status, out, _ = run(capsys, live, "costs")
    assert status == 0
    assert out.startswith("spend by day (UTC), from the server")
    assert "finished containers: 1" in out


def test_costs_fall_back_to_the_queues_ledger_when_no_server_answers(capsys, tmp_path):
    from herder.queue.sqlite import SqliteQueue
    from herder.runtime import VirtualRuntime
    from herder.spend import SpendEntry
    from herder.testing.queue_conformance import QueueSettings

    url = f"http://127.0.0.1:{_closed_port()}"
    status, _, err = run(capsys, None, "costs", "--server", url)
    assert status == 1
    assert "no spend recorded yet:" in err and "herder.db" in err
    path = Path(err.split("no spend recorded yet: ")[1].split(" does not exist")[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = QueueSettings(runtime=VirtualRuntime())
    queue = SqliteQueue(str(path), settings.rules)
    now = time.time()
    queue.ledger.record(SpendEntry(now - 60, 0.25, "i-1", "small", now - 120))
    queue.close()
    status, out, _ = run(capsys, None, "costs", "--server", url, "--json")
    assert status == 0
    doc = json.loads(out)
    assert doc["total"] == 0.25 and doc["by_instance_type"] == {"small": 0.25}


def test_submit_labels_from_repeated_flags(capsys, live):
    from herder.app.commands.containers import build_submission

    args = cli.build_parser().parse_args(
        ["submit", "--label", "project=genomics", "--label", "run=7", "--", "true"]
    )
    assert build_submission(args)["labels"] == {"project": "genomics", "run": "7"}
    uuid = submit(capsys, live, "--label", "project=genomics", "--", "sim", "5", "0")
    assert live.dispatcher.queue.get(uuid).spec.labels == (("project", "genomics"),)
    status, _, err = run(capsys, live, "submit", "--label", "novalue", "--", "true")
    assert status == 2 and "--label 'novalue': expected KEY=VALUE" in err


def test_budget_shows_the_periods_spend_against_the_limits(capsys, live):
    status, out, _ = run(capsys, live, "budget")
    assert status == 0
    assert out.startswith(
        "spend this day: 0.00 (soft limit none, hard limit none; "
        "on hard limit: finish): under the limits"
    )
    status, out, _ = run(capsys, live, "budget", "--json")
    doc = json.loads(out)
    assert doc["period"] == "day" and doc["soft_reached"] is False and doc["message"] == ""

"""RunnerClient: runner verbs over a resident ``--serve`` agent, with one-shot commands as the
fallback, and never a verb re-run after it may have been carried out."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Mapping

import pytest

from herder.cloud import Instance
from herder.executor import (
    ExecResult,
    ExecStream,
    Executor,
    ExecutorError,
    StreamsUnsupported,
)
from herder.worker.runner_client import RunnerClient

UUID = "zzzzz-dz642-000000000000001"


class FakeStream(ExecStream):
    """Answers like the agent would, or fails as told."""

    def __init__(self, fail_send: bool = False, fail_receive: str = "") -> None:
        self.requests: list[dict[str, object]] = []
        self.fail_send = fail_send
        self.fail_receive = fail_receive  # "", "eof", "garbage", "other-id"
        self.closed = False
        self.hold: threading.Event | None = None

    def send(self, data: bytes, timeout: float) -> None:
        if self.fail_send:
            raise ExecutorError("stream closed: broken pipe")
        self.requests.append(json.loads(data))

    def receive_line(self, timeout: float) -> bytes:
        if self.hold is not None:
            self.hold.wait(5)
        request = self.requests[-1]
        if self.fail_receive == "eof":
            raise ExecutorError("stream ended")
        if self.fail_receive == "garbage":
            return b"{not json"
        rid = request["id"] if self.fail_receive != "other-id" else -1
        out = base64.b64encode(f"resident {request['argv']}".encode()).decode()
        return json.dumps({"id": rid, "status": 0, "stdout": out, "stderr": ""}).encode()

    def close(self) -> None:
        self.closed = True


class FakeExecutor(Executor):
    def __init__(self, streams: list[FakeStream] | None = None, open_error: bool = False,
                 unsupported: bool = False) -> None:
        self.streams = list(streams or [])
        self.opened: list[str] = []
        self.commands: list[tuple[str, bytes | None]] = []
        self.open_error = open_error
        self.unsupported = unsupported

    def execute(self, command: str, stdin: bytes | None = None,
                env: Mapping[str, str] | None = None, timeout: float | None = None) -> ExecResult:
        self.commands.append((command, stdin))
        return ExecResult(0, b"one-shot", b"")

    def open_stream(self, command: str, timeout: float) -> ExecStream:
        if self.unsupported:
            raise StreamsUnsupported("no streams here")
        self.opened.append(command)
        if self.open_error:
            raise ExecutorError("connection refused")
        return self.streams.pop(0)

    def set_target(self, instance: Instance) -> None:
        pass

    def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def client(ex: Executor, clock: Clock | None = None, resident: bool = True,
           user: str = "root") -> RunnerClient:
    return RunnerClient(ex, command="/opt/herder-runner~abc", remote_user=lambda: user,
                        resident=resident, now=clock or Clock(), reopen_delay=30.0)


def test_verbs_go_to_one_resident_agent_with_their_stdin() -> None:
    stream = FakeStream()
    ex = FakeExecutor([stream])
    c = client(ex, user="admin")
    r1 = c.call(["--list", "--stdin-prices"], b"[]", 10)
    r2 = c.call(["--log", UUID], None, 10)
    assert ex.opened == ["sudo /opt/herder-runner~abc --serve"]
    assert ex.commands == []
    assert (r1.stdout, r2.stdout) == (b"resident ['--list', '--stdin-prices']",
                                      b"resident ['--log', '" + UUID.encode() + b"']")
    assert [base64.b64decode(str(r["stdin"])) for r in stream.requests] == [b"[]", b""]
    assert c.resident


def test_without_deployment_every_verb_is_a_command() -> None:
    """A preinstalled runner (crunch-run) knows no --serve: one-shot commands, as Arvados."""
    ex = FakeExecutor([FakeStream()])
    c = client(ex, resident=False)
    assert c.call(["--kill", "15", UUID], None, 10).stdout == b"one-shot"
    assert ex.opened == []
    assert ex.commands == [(f"/opt/herder-runner~abc --kill 15 {UUID}", None)]


def test_an_executor_without_streams_is_never_asked_again() -> None:
    ex = FakeExecutor(unsupported=True)
    c = client(ex)
    c.call(["--list"], None, 10)
    ex.unsupported = False
    c.call(["--list"], None, 10)
    assert ex.opened == []
    assert len(ex.commands) == 2


def test_a_stream_that_cannot_open_is_retried_only_after_the_delay() -> None:
    clock = Clock()
    ex = FakeExecutor(open_error=True)
    c = client(ex, clock)
    assert c.call(["--list"], None, 10).stdout == b"one-shot"
    clock.t += 29
    c.call(["--list"], None, 10)
    assert len(ex.opened) == 1 and len(ex.commands) == 2
    clock.t += 2
    ex.open_error = False
    ex.streams = [FakeStream()]
    assert c.call(["--list"], None, 10).stdout == b"resident ['--list']"
    assert len(ex.opened) == 2


def test_a_request_that_could_not_be_sent_runs_as_a_command() -> None:
    broken = FakeStream(fail_send=True)
    ex = FakeExecutor([broken])
    c = client(ex)
    config = b'{"uuid": "..."}'
    result = c.call(["--detach", "--stdin-config", UUID], config, 10)
    assert result.stdout == b"one-shot"
    assert ex.commands == [(f"/opt/herder-runner~abc --detach --stdin-config {UUID}", config)]
    assert broken.closed and not c.resident


@pytest.mark.parametrize("failure", ["eof", "garbage", "other-id"])
def test_a_sent_request_without_a_good_answer_fails_and_is_not_rerun(failure: str) -> None:
    """The agent may have started the container: re-running --detach could start it twice."""
    stream = FakeStream(fail_receive=failure)
    ex = FakeExecutor([stream])
    c = client(ex)
    with pytest.raises(ExecutorError):
        c.call(["--detach", "--stdin-config", UUID], b"{}", 10)
    assert ex.commands == []
    assert stream.closed and not c.resident


def test_a_busy_stream_sends_the_next_verb_as_a_command() -> None:
    stream = FakeStream()
    stream.hold = threading.Event()
    ex = FakeExecutor([stream])
    c = client(ex)
    results: list[ExecResult] = []
    slow = threading.Thread(target=lambda: results.append(c.call(["--kill", "15", UUID], None, 10)))
    slow.start()
    while not stream.requests:
        threading.Event().wait(0.001)
    assert c.call(["--list"], None, 10).stdout == b"one-shot"
    stream.hold.set()
    slow.join()
    assert results[0].stdout.startswith(b"resident")


def test_close_stops_the_agent_and_later_verbs_use_commands() -> None:
    stream = FakeStream()
    ex = FakeExecutor([stream, FakeStream()])
    c = client(ex)
    c.call(["--list"], None, 10)
    c.close()
    assert stream.closed
    assert c.call(["--list"], None, 10).stdout == b"one-shot"
    assert len(ex.opened) == 1

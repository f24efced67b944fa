"""RunnerClient: runner verbs over a resident ``--serve`` agent, with one-shot commands as the
fallback, and never a verb re-run after it may have been carried out."""

from __future__ import annotations

import base64
import json
import queue
import threading
from collections.abc import Mapping

import pytest

from herder.engine.worker.runner_client import RunnerClient
from herder.plugin.cloud import Instance
from herder.plugin.executor import (
    ExecResult,
    ExecStream,
    Executor,
    ExecutorError,
    StreamsUnsupported,
)

UUID = "zzzzz-dz642-000000000000001"


class FakeStream(ExecStream):
    """Answers like the agent would, or fails as told; lines go through a queue, so the
    client's reader thread can wait on it as on a real channel."""

    EOF = b"<eof>"

    def __init__(self, fail_send: bool = False, fail_receive: str = "") -> None:
        self.requests: list[dict[str, object]] = []
        self.fail_send = fail_send
        self.fail_receive = fail_receive  # "", "eof", "garbage", "silent"
        self.closed = False
        self.lines: queue.Queue[bytes] = queue.Queue()
        self.hold: threading.Event | None = None
        self.closed_event = threading.Event()

    def send(self, data: bytes, timeout: float) -> None:
        if self.fail_send or self.closed:
            raise ExecutorError("stream closed: broken pipe")
        request = json.loads(data)
        self.requests.append(request)
        if self.fail_receive == "eof":
            self.lines.put(self.EOF)
        elif self.fail_receive == "garbage":
            self.lines.put(b"{not json")
        elif self.fail_receive != "silent":
            threading.Thread(target=self._answer, args=(request,), daemon=True).start()

    def _answer(self, request: dict[str, object]) -> None:
        if self.hold is not None and request["argv"] == ["--kill", "15", UUID]:
            self.hold.wait(5)
        out = base64.b64encode(f"resident {request['argv']}".encode()).decode()
        self.lines.put(
            json.dumps({"id": request["id"], "status": 0, "stdout": out, "stderr": ""}).encode()
        )

    def event(self) -> None:
        self.lines.put(b'{"event": "exited"}')

    def receive_line(self, timeout: float | None) -> bytes:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise ExecutorError("no answer on the stream") from None
        if line == self.EOF:
            self.lines.put(line)
            raise ExecutorError("stream ended")
        return line

    def close(self) -> None:
        self.closed = True
        self.closed_event.set()
        self.lines.put(self.EOF)


class FakeExecutor(Executor):
    def __init__(
        self,
        streams: list[FakeStream] | None = None,
        open_error: bool = False,
        unsupported: bool = False,
    ) -> None:
        self.streams = list(streams or [])
        self.opened: list[str] = []
        self.commands: list[tuple[str, bytes | None]] = []
        self.open_error = open_error
        self.unsupported = unsupported

    def execute(
        self,
        command: str,
        stdin: bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
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


def client(
    ex: Executor, clock: Clock | None = None, resident: bool = True, user: str = "root"
) -> RunnerClient:
    return RunnerClient(
        ex,
        command="/opt/herder-runner~abc",
        remote_user=lambda: user,
        resident=resident,
        now=clock or Clock(),
        reopen_delay=30.0,
    )


def test_verbs_go_to_one_resident_agent_with_their_stdin() -> None:
    stream = FakeStream()
    ex = FakeExecutor([stream])
    c = client(ex, user="admin")
    r1 = c.call(["--list", "--stdin-prices"], b"[]", 10)
    r2 = c.call(["--log", UUID], None, 10)
    assert ex.opened == ["sudo /opt/herder-runner~abc --serve"]
    assert ex.commands == []
    assert (r1.stdout, r2.stdout) == (
        b"resident ['--list', '--stdin-prices']",
        b"resident ['--log', '" + UUID.encode() + b"']",
    )
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


@pytest.mark.parametrize("failure", ["eof", "garbage"])
def test_a_sent_request_without_a_good_answer_fails_and_is_not_rerun(failure: str) -> None:
    """The agent may have started the container: re-running --detach could start it twice."""
    stream = FakeStream(fail_receive=failure)
    ex = FakeExecutor([stream])
    c = client(ex)
    with pytest.raises(ExecutorError):
        c.call(["--detach", "--stdin-config", UUID], b"{}", 10)
    assert ex.commands == []
    assert stream.closed and not c.resident


def test_an_unanswered_request_times_out_and_ends_the_stream() -> None:
    stream = FakeStream(fail_receive="silent")
    ex = FakeExecutor([stream])
    c = client(ex)
    with pytest.raises(ExecutorError, match="no answer"):
        c.call(["--list"], None, 0.05)
    assert ex.commands == []
    assert stream.closed and not c.resident


def test_requests_in_flight_together_get_their_own_answers() -> None:
    """A slow --kill does not hold up a --list sent after it: answers are matched by id."""
    stream = FakeStream()
    stream.hold = threading.Event()
    ex = FakeExecutor([stream])
    c = client(ex)
    results: list[ExecResult] = []
    slow = threading.Thread(target=lambda: results.append(c.call(["--kill", "15", UUID], None, 10)))
    slow.start()
    assert c.call(["--list"], None, 10).stdout == b"resident ['--list']"
    stream.hold.set()
    slow.join()
    assert results[0].stdout == b"resident ['--kill', '15', '" + UUID.encode() + b"']"
    assert ex.commands == []


def test_events_from_the_agent_reach_on_change() -> None:
    stream = FakeStream()
    ex = FakeExecutor([stream])
    changed = threading.Semaphore(0)
    c = RunnerClient(
        ex,
        command="/opt/r",
        remote_user=lambda: "root",
        resident=True,
        now=Clock(),
        on_change=changed.release,
    )
    c.call(["--list"], None, 10)  # opens the stream
    stream.event()
    stream.event()
    assert changed.acquire(timeout=5) and changed.acquire(timeout=5)
    assert c.call(["--list"], None, 10).stdout == b"resident ['--list']"  # still usable


def test_close_stops_the_agent_and_later_verbs_use_commands() -> None:
    stream = FakeStream()
    ex = FakeExecutor([stream, FakeStream()])
    c = client(ex)
    c.call(["--list"], None, 10)
    c.close()
    assert stream.closed
    assert c.call(["--list"], None, 10).stdout == b"one-shot"
    assert len(ex.opened) == 1


def test_log_events_reach_on_log_and_do_not_count_as_a_change() -> None:
    stream = FakeStream()
    ex = FakeExecutor([stream])
    pieces: queue.Queue[tuple[str, int, bytes]] = queue.Queue()
    changed = threading.Semaphore(0)
    c = RunnerClient(
        ex,
        command="/opt/r",
        remote_user=lambda: "root",
        resident=True,
        now=Clock(),
        on_change=changed.release,
        on_log=lambda uuid, offset, data: pieces.put((uuid, offset, data)),
    )
    c.call(["--list"], None, 10)  # opens the stream
    data = base64.b64encode(b"stdout hi\n").decode()
    stream.lines.put(json.dumps({"event": "log", "uuid": UUID, "offset": 7, "data": data}).encode())
    assert pieces.get(timeout=5) == (UUID, 7, b"stdout hi\n")
    stream.event()  # handled after the log event, in order
    assert changed.acquire(timeout=5)
    assert not changed.acquire(blocking=False)  # the log event was no change
    assert c.call(["--list"], None, 10).stdout == b"resident ['--list']"


def test_a_log_event_for_a_malformed_uuid_ends_the_stream() -> None:
    stream = FakeStream()
    ex = FakeExecutor([stream])
    c = client(ex)
    c.call(["--list"], None, 10)
    stream.lines.put(
        json.dumps({"event": "log", "uuid": "../../etc/passwd", "offset": 0, "data": ""}).encode()
    )
    assert stream.closed_event.wait(5)  # a broken agent: the stream is ended

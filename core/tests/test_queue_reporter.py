"""What the dispatcher records in the queue when a runner reports a container's fate."""

from __future__ import annotations

from herder.engine.cloud_engine import QueueReporter
from herder.engine.sizing import ConfigSizer
from herder.model import ContainerState
from herder.queue.memory import MemoryQueue
from herder.queue.rules import RuleSettings
from herder.runtime import VirtualRuntime
from herder.testing.queue_conformance import conformance_types, spec


def _setup(max_attempts: int = 3) -> tuple[MemoryQueue, QueueReporter, VirtualRuntime]:
    runtime = VirtualRuntime()
    types = conformance_types()
    queue = MemoryQueue(
        RuleSettings(runtime, ConfigSizer(types), max_dispatch_attempts=max_attempts)
    )
    return queue, QueueReporter(queue, types, runtime), runtime


def _running(queue: MemoryQueue) -> str:
    c = queue.submit(spec())
    queue.lock(c.uuid)
    queue.set_running(c.uuid, "i-1", "small")
    return c.uuid


def test_an_instance_failure_retries_the_container_with_the_reason() -> None:
    queue, reporter, _ = _setup()
    uuid = _running(queue)
    reporter.container_failed(uuid, True, "docker: Cannot connect to the Docker daemon", "i-1")
    c = queue.get(uuid)
    assert c is not None and c.state is ContainerState.QUEUED and c.exit_code is None
    assert dict(c.runtime_status)["warning"] == (
        "instance i-1 could not start the container: docker: Cannot connect to the Docker daemon"
    )


def test_instance_failures_count_against_max_dispatch_attempts() -> None:
    queue, reporter, _ = _setup(max_attempts=2)
    uuid = _running(queue)
    reporter.container_failed(uuid, True, "daemon down", "i-1")
    queue.lock(uuid)
    queue.set_running(uuid, "i-2", "small")
    reporter.container_failed(uuid, True, "daemon down", "i-2")
    c = queue.get(uuid)
    assert c is not None and c.state is ContainerState.CANCELLED and c.exit_code is None
    assert "daemon down" in dict(c.runtime_status)["error"]


def test_a_container_failure_cancels_with_the_runtimes_message() -> None:
    queue, reporter, _ = _setup()
    uuid = _running(queue)
    reporter.container_failed(uuid, False, "pull access denied for nosuch", "i-1")
    c = queue.get(uuid)
    assert c is not None and c.state is ContainerState.CANCELLED and c.exit_code is None
    assert dict(c.runtime_status)["error"] == (
        "the container could not be started: pull access denied for nosuch"
    )


def test_log_pieces_are_kept_after_a_cancel() -> None:
    queue, reporter, _ = _setup()
    uuid = _running(queue)
    reporter.container_log(uuid, b"stdout a\n")
    queue.cancel(uuid, "stop")
    reporter.container_log(uuid, b"stdout b\n")
    assert queue.read_log(uuid) == b"stdout a\nstdout b\n"


def test_an_image_pull_is_shown_in_the_record_while_it_runs() -> None:
    queue, reporter, _ = _setup()
    uuid = _running(queue)
    reporter.container_pulled(uuid, 3.25)
    c = queue.get(uuid)
    assert c is not None and c.status("image_pull") == "pulled in 3.2s"
    queue.finish(uuid, 0)
    reporter.container_pulled(uuid, 9.0)  # too late: ignored, the record is final
    c = queue.get(uuid)
    assert c is not None and c.status("image_pull") == "pulled in 3.2s"

"""An instance that stops answering while its container may have finished (sim driver,
virtual clock): herder keeps trying to collect the result while the cloud lists the instance,
and retries the container only once the instance is gone or past the probe timeout, saying
which it was."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from herder.config import load_config
from herder.engine.cloud_engine import CloudEngine
from herder.model import Container, ContainerSpec, ContainerState
from herder.runtime import VirtualRuntime
from herder.testing.sim import SimDriver
from herder.testing.sim_cloud import SimVM

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PROBE_TIMEOUT = 60.0  # examples/sim.yaml: cloud.timeout_probe


class Engine:
    def __init__(self) -> None:
        config = load_config(EXAMPLES / "sim.yaml")
        config = config.model_copy(
            update={"queue": config.queue.model_copy(update={"path": ":memory:"})}
        )
        self.runtime = VirtualRuntime()
        self.driver = SimDriver()
        self.dispatcher = CloudEngine(config, runtime=self.runtime, driver=self.driver)
        self.dispatcher.start()
        self.runtime.run_until_idle()

    def submit(self, seconds: int) -> str:
        spec = ContainerSpec(command=("sim", str(seconds), "0"))
        return self.dispatcher.queue.submit(spec).uuid

    def get(self, uuid: str) -> Container:
        c = self.dispatcher.queue.get(uuid)
        assert c is not None
        return c

    def run_until_running(self, uuid: str) -> SimVM:
        for _ in range(120):
            self.runtime.advance(1)
            c = self.get(uuid)
            if c.state is ContainerState.RUNNING:
                assert self.driver.cloud is not None
                vm = self.driver.cloud.vm(c.instance_id)
                assert vm is not None
                return vm
        raise AssertionError(f"never ran: {self.get(uuid)}")

    def stop(self) -> None:
        self.dispatcher.stop()
        self.runtime.shutdown()


@pytest.fixture
def engine() -> Iterator[Engine]:
    e = Engine()
    yield e
    e.stop()


def test_a_result_finished_while_unreachable_is_collected_when_it_answers(
    engine: Engine,
) -> None:
    uuid = engine.submit(20)
    vm = engine.run_until_running(uuid)
    now = engine.runtime.now()
    # Silent from now for most of the probe timeout; the container ends meanwhile.
    vm.silent = (now, now + PROBE_TIMEOUT - 10)
    engine.runtime.advance(PROBE_TIMEOUT - 15)
    assert engine.get(uuid).state is ContainerState.RUNNING  # not retried while listed
    engine.runtime.advance(30)
    c = engine.get(uuid)
    assert c.state is ContainerState.COMPLETE and c.exit_code == 0
    assert [a.outcome for a in c.attempt_history] == ["complete"]  # ran once


def test_past_the_probe_timeout_the_container_is_retried_and_says_why(engine: Engine) -> None:
    uuid = engine.submit(20)
    vm = engine.run_until_running(uuid)
    now = engine.runtime.now()
    vm.silent = (now, now + 10 * PROBE_TIMEOUT)
    engine.runtime.advance(PROBE_TIMEOUT - 5)
    assert engine.get(uuid).state is ContainerState.RUNNING
    for _ in range(60):
        engine.runtime.advance(1)
        if engine.get(uuid).attempt_history[0].outcome != "running":
            break
    first = engine.get(uuid).attempt_history[0]
    assert first.outcome == "retried", first
    assert f"instance {vm.id} did not answer for" in first.reason
    assert "past cloud.timeout_probe" in first.reason


def test_an_instance_gone_from_the_cloud_is_retried_at_once_and_says_so(
    engine: Engine,
) -> None:
    uuid = engine.submit(200)
    vm = engine.run_until_running(uuid)
    assert engine.driver.cloud is not None
    with engine.driver.cloud.lock:
        vm.gone_at = vm.vanish_at = engine.runtime.now()
    for _ in range(30):
        engine.runtime.advance(1)
        if engine.get(uuid).attempt_history[0].outcome != "running":
            break
    first = engine.get(uuid).attempt_history[0]
    assert first.outcome == "retried", first
    assert first.reason.startswith(f"instance {vm.id} is gone from the cloud")

"""herder's engine with the azure driver against the fake ARM API.

The fake's VMs cannot be logged in to, so the executor always fails to connect: the engine
must create and tag VMs for a queued container, list them, re-tag them when an operator holds
them, and destroy them (with their NICs and disks) when they do not boot within
``timeout_booting``.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from herder.config import Config
from herder.engine.cloud_engine import CloudEngine
from herder.executor import ExecResult, Executor, ExecutorError
from herder.model import ContainerSpec, IdleBehavior, RuntimeConstraints
from herder.runtime import VirtualRuntime

from .conftest import base_params
from .fakearm import FakeARM

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "azure.yaml"


class Unreachable(Executor):
    def execute(
        self,
        command: str,
        stdin: bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        raise ExecutorError("connection refused")

    def set_target(self, instance: Any) -> None:
        pass

    def close(self) -> None:
        pass


def config(fake: FakeARM, secret_file: Path) -> Config:
    data = yaml.safe_load(EXAMPLE.read_text())
    data["containers"]["dispatch_private_key"] = ""
    data["cloud"]["driver_parameters"] = base_params(fake, secret_file)
    data["cloud"].update(
        image_id="Debian:debian-12:12-gen2:latest",
        timeout_booting="30s",
        probe_interval="1s",
        poll_interval="1s",
        sync_interval="5s",
        timeout_shutdown="5s",
        deploy_public_key=False,
        deploy_runner=False,
        max_cloud_ops_per_second=0,
    )
    data["queue"] = {"path": ":memory:"}
    return Config.model_validate(data)


def test_engine_creates_tags_lists_and_destroys_instances(fake: FakeARM, secret_file: Path) -> None:
    runtime = VirtualRuntime(strict=False)
    dispatcher = CloudEngine(
        config(fake, secret_file),
        runtime=runtime,
        registry=CollectorRegistry(),
        executor_factory=lambda instance: Unreachable(),
    )
    try:
        dispatcher.start()
        dispatcher.queue.submit(
            ContainerSpec(
                command=("true",), runtime_constraints=RuntimeConstraints(vcpus=1, ram=1 << 30)
            )
        )
        runtime.advance(5)
        vms = fake.of_kind("vm")
        assert vms, "no VM was created for the queued container"
        name, vm = next(iter(vms.items()))
        assert vm["tags"]["HerderInstanceSetID"] == dispatcher.instance_set_id
        assert vm["tags"]["HerderInstanceType"] == "Standard_D2s_v5"
        assert vm["tags"]["Project"] == "herder"
        assert "created-at" in vm["tags"]
        assert vm["properties"]["provisioningState"] == "Succeeded"
        assert vm["properties"]["storageProfile"]["dataDisks"][0]["diskSizeGB"] == 50
        assert fake.calls("GET", r"/virtualMachines$"), "the engine never listed"
        # an operator holds the instance, then lets it run: herder re-tags it each time
        for behavior in (IdleBehavior.HOLD, IdleBehavior.RUN):
            dispatcher.pool.set_idle_behavior(vm["id"], behavior)
            runtime.advance(1)
            assert fake.vm(name)["tags"]["HerderIdleBehavior"] == behavior.value
        assert "created-at" in fake.vm(name)["tags"]
        assert len(fake.calls("PATCH", "/virtualMachines/")) >= 2
        runtime.advance(60)
        assert name not in fake.of_kind("vm")
        assert not [n for n in fake.of_kind("nic") if n.startswith(name)]
        assert not [n for n in fake.of_kind("disk") if n.startswith(name)]
    finally:
        dispatcher.stop()
        runtime.shutdown()
    assert not [t for t in threading.enumerate() if t.name.startswith("herder-azure")]

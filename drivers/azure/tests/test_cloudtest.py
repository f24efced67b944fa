"""`herder cloudtest` with the azure driver against the fake ARM API.

The fake's VMs cannot be logged in to, so the SSH step fails on purpose: what this proves is
that cloudtest creates, lists and tags the VM through the real driver, reports the failing
step, and still destroys what it created (VM, NIC and disks).
"""

from __future__ import annotations

from pathlib import Path

from herder.tools.cloudtest import CloudTest

from .fakearm import FakeARM
from .test_dispatcher import Unreachable, config


def test_cloudtest_against_the_fake_cleans_up(fake: FakeARM, secret_file: Path) -> None:
    clock = [0.0]

    def sleep(seconds: float) -> None:  # time passes only when cloudtest waits
        clock[0] += seconds

    report = CloudTest(
        config(fake, secret_file),
        executor_factory=lambda instance: Unreachable(),
        timeout=5,
        interval=1,
        sleep=sleep,
        clock=lambda: clock[0],
    ).run()
    steps = {step.name: step for step in report.steps}
    assert not report.ok
    assert report.instance_id
    for name in ("create", "listed", "tags"):
        assert steps[name].ok, (name, steps[name].detail)
    failed = [step for step in report.steps if step.ok is False]
    assert failed and "ssh" in failed[0].name, [s.to_json() for s in report.steps]
    assert steps["destroy"].ok and steps["gone"].ok
    assert fake.of_kind("vm") == {} and fake.of_kind("nic") == {} and fake.of_kind("disk") == {}
    assert fake.calls("PUT", "/virtualMachines/")

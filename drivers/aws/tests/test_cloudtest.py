"""`herder cloudtest` with the aws driver against the EC2 emulator.

The emulator's instances cannot be logged in to, so the SSH step fails on purpose: what this
proves is that cloudtest creates, lists and tags the instance through the real driver, reports
the failing step, and still destroys what it created.
"""

from __future__ import annotations

from typing import Any

from herder.tools.cloudtest import CloudTest

from .test_dispatcher import Unreachable, config


def test_cloudtest_against_the_emulator_cleans_up(ec2: Any) -> None:
    clock = [0.0]

    def sleep(seconds: float) -> None:  # time passes only when cloudtest waits
        clock[0] += seconds

    report = CloudTest(
        config(),
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
    reply = ec2.describe_instances(InstanceIds=[report.instance_id])
    assert reply["Reservations"][0]["Instances"][0]["State"]["Name"] == "terminated"

"""The conformance suite as pytest tests.

A driver package runs it from one of its test modules::

    import pytest
    from herder.testing.conformance import *  # noqa: F403  (collects TestDriverConformance)

    @pytest.fixture
    def conformance_target(tmp_path):
        return ConformanceTarget(driver=MyDriver(), instance_types=[...], params={...})

or subclasses :class:`DriverConformance` (a ``Test*`` subclass is collected) when it wants to
add its own tests next to the suite's.  Each test gets a fresh :class:`ConformanceHarness`,
which removes every instance it created afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from herder.testing.conformance.checks import CHECKS, Skipped
from herder.testing.conformance.target import ConformanceHarness, ConformanceTarget


@pytest.fixture
def conformance_harness(conformance_target: ConformanceTarget) -> Iterator[ConformanceHarness]:
    """A harness for the driver package's ``conformance_target``, cleaned up after the test."""
    harness = ConformanceHarness(conformance_target)
    try:
        yield harness
    finally:
        harness.close()


def _run(name: str, harness: ConformanceHarness) -> None:
    """Run one check; a check that does not apply is a skip with its reason."""
    try:
        CHECKS[name](harness)
    except Skipped as exc:
        pytest.skip(str(exc))


class DriverConformance:
    """Every check of the suite, one test each.  Needs a ``conformance_target`` fixture.

    Not collected itself (its name does not start with ``Test``); subclass it as
    ``TestMyDriverConformance``, or import :class:`TestDriverConformance`.  The class carries
    its own ``conformance_harness`` fixture, so a subclass needs no other import.
    """

    @pytest.fixture
    def conformance_harness(
        self, conformance_target: ConformanceTarget
    ) -> Iterator[ConformanceHarness]:
        """A harness for ``conformance_target``, cleaned up after the test."""
        harness = ConformanceHarness(conformance_target)
        try:
            yield harness
        finally:
            harness.close()

    def test_create_returns_instance(self, conformance_harness: ConformanceHarness) -> None:
        _run("create_returns_instance", conformance_harness)

    def test_created_instance_is_listed(self, conformance_harness: ConformanceHarness) -> None:
        _run("created_instance_is_listed", conformance_harness)

    def test_listing_keeps_matching_instances(
        self, conformance_harness: ConformanceHarness
    ) -> None:
        _run("listing_keeps_matching_instances", conformance_harness)

    def test_ids_are_stable(self, conformance_harness: ConformanceHarness) -> None:
        _run("ids_are_stable", conformance_harness)

    def test_ids_never_reused(self, conformance_harness: ConformanceHarness) -> None:
        _run("ids_never_reused", conformance_harness)

    def test_tags_seen_by_another_instance_set(
        self, conformance_harness: ConformanceHarness
    ) -> None:
        _run("tags_seen_by_another_instance_set", conformance_harness)

    def test_set_tags_replaces_tags(self, conformance_harness: ConformanceHarness) -> None:
        _run("set_tags_replaces_tags", conformance_harness)

    def test_destroy_removes_instance(self, conformance_harness: ConformanceHarness) -> None:
        _run("destroy_removes_instance", conformance_harness)

    def test_destroy_twice_is_harmless(self, conformance_harness: ConformanceHarness) -> None:
        _run("destroy_twice_is_harmless", conformance_harness)

    def test_instance_sets_are_isolated(self, conformance_harness: ConformanceHarness) -> None:
        _run("instance_sets_are_isolated", conformance_harness)

    def test_quota_groups_split(self, conformance_harness: ConformanceHarness) -> None:
        _run("quota_groups_split", conformance_harness)

    def test_thread_safety(self, conformance_harness: ConformanceHarness) -> None:
        _run("thread_safety", conformance_harness)

    def test_quota_error(self, conformance_harness: ConformanceHarness) -> None:
        _run("quota_error", conformance_harness)

    def test_capacity_error(self, conformance_harness: ConformanceHarness) -> None:
        _run("capacity_error", conformance_harness)

    def test_rate_limit_error(self, conformance_harness: ConformanceHarness) -> None:
        _run("rate_limit_error", conformance_harness)

    def test_address_format(self, conformance_harness: ConformanceHarness) -> None:
        _run("address_format", conformance_harness)

    def test_booted_instance_runs_commands(self, conformance_harness: ConformanceHarness) -> None:
        _run("booted_instance_runs_commands", conformance_harness)

    def test_init_command_and_public_key(self, conformance_harness: ConformanceHarness) -> None:
        _run("init_command_and_public_key", conformance_harness)

    def test_host_key_verification(self, conformance_harness: ConformanceHarness) -> None:
        _run("host_key_verification", conformance_harness)

    def test_price_history(self, conformance_harness: ConformanceHarness) -> None:
        _run("price_history", conformance_harness)

    def test_quotas(self, conformance_harness: ConformanceHarness) -> None:
        _run("quotas", conformance_harness)

    def test_spot(self, conformance_harness: ConformanceHarness) -> None:
        _run("spot", conformance_harness)

    def test_gpu(self, conformance_harness: ConformanceHarness) -> None:
        _run("gpu", conformance_harness)

    def test_idempotent_create(self, conformance_harness: ConformanceHarness) -> None:
        _run("idempotent_create", conformance_harness)

    def test_default_types_within_capabilities(
        self, conformance_harness: ConformanceHarness
    ) -> None:
        _run("default_types_within_capabilities", conformance_harness)


class TestDriverConformance(DriverConformance):
    """The suite, collected as is by ``from herder.testing.conformance import *``."""

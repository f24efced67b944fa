"""herder's driver conformance suite: what every cloud driver must do, as pytest tests.

Install ``herder[testing]`` and, in a test module of the driver package::

    import pytest
    from herder.testing.conformance import *  # noqa: F403

    @pytest.fixture
    def conformance_target():
        return ConformanceTarget(driver=MyDriver(), instance_types=[...], params={...})

Each test checks one rule herder relies on (:mod:`~herder.testing.conformance.rules`) and, when
it fails, says which rule was broken.  Tests of capabilities the driver does not declare
(``Driver.capabilities``) are skipped.  The checks are also plain functions
(:data:`~herder.testing.conformance.checks.CHECKS`) for use without pytest.
"""

from herder.testing.conformance.checks import CHECKS, Skipped, run_check
from herder.testing.conformance.rules import ALL_RULES, ConformanceError
from herder.testing.conformance.suite import (
    DriverConformance,
    TestDriverConformance,
    conformance_harness,
)
from herder.testing.conformance.target import (
    BootRecord,
    ConformanceHarness,
    ConformanceTarget,
    new_instance_set_id,
)

__all__ = [
    "ALL_RULES",
    "CHECKS",
    "BootRecord",
    "ConformanceError",
    "ConformanceHarness",
    "ConformanceTarget",
    "DriverConformance",
    "Skipped",
    "TestDriverConformance",
    "conformance_harness",
    "new_instance_set_id",
    "run_check",
]

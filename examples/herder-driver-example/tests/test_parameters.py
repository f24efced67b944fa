"""The driver's own tests: its parameters are validated as herder validates configs."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from herder_driver_example.driver import ExampleDriver, ExampleParameters


def test_defaults() -> None:
    params = ExampleDriver.validate_parameters(None)
    assert isinstance(params, ExampleParameters)
    assert params.max_instances == 8


def test_unknown_keys_are_errors() -> None:
    with pytest.raises(ValidationError, match="max_instance"):
        ExampleDriver.validate_parameters({"max_instance": 3})

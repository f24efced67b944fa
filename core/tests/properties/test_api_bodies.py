"""Property tests for API request bodies: any JSON is accepted or refused by validation."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from herder.app.api.schema import (
    CancelRequest,
    InstanceActionRequest,
    PriorityRequest,
    SubmitRequest,
    field_errors,
)

json_values = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
SUBMIT_KEYS = [
    "command",
    "image",
    "environment",
    "cwd",
    "runtime",
    "runtime_constraints",
    "scheduling_parameters",
    "priority",
    "name",
    "vcpus",
    "ram",
    "gpus",
    "gpu",
    "max_run_time",
    "preemptible",
    "reason",
    "idle_behavior",
]
bodies = st.dictionaries(st.sampled_from(SUBMIT_KEYS), json_values, max_size=6)
nearly_valid = st.fixed_dictionaries(
    {"command": st.lists(st.text(max_size=10), max_size=3)},
    optional={
        "environment": st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
        "cwd": st.text(max_size=10),
        "priority": st.one_of(st.integers(), st.text(max_size=3)),
        "runtime_constraints": st.fixed_dictionaries(
            {},
            optional={
                "vcpus": json_values,
                "ram": st.one_of(st.integers(), st.text(max_size=8)),
                "gpus": json_values,
                "gpu": json_values,
            },
        ),
        "scheduling_parameters": st.fixed_dictionaries(
            {},
            optional={
                "max_run_time": st.one_of(st.integers(), st.text(max_size=6)),
                "preemptible": json_values,
            },
        ),
    },
)
MODELS: list[type[BaseModel]] = [
    SubmitRequest,
    CancelRequest,
    PriorityRequest,
    InstanceActionRequest,
]


def check(model: type[BaseModel], body: Any) -> None:
    try:
        model.model_validate(body)
    except ValidationError as exc:
        for err in field_errors(exc.errors()):  # the API's error rendering must not fail either
            assert err.error
    try:
        model.model_validate_json(__import__("json").dumps(body))
    except ValidationError as exc:
        field_errors(exc.errors())


@settings(max_examples=300, deadline=None)
@given(st.one_of(bodies, json_values))
def test_arbitrary_bodies_raise_only_validation_errors(body: Any) -> None:
    for model in MODELS:
        check(model, body)


@settings(max_examples=300, deadline=None)
@given(nearly_valid)
def test_nearly_valid_submissions_raise_only_validation_errors(body: dict[str, Any]) -> None:
    check(SubmitRequest, body)

"""Property tests for configuration input: arbitrary YAML-ish data, durations and sizes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from herder.config import Config, ConfigProblem, check_config, config_from_data
from herder.units import format_duration, format_size, parse_duration, parse_size

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(["10s", "1m30s", "-1s", "4GiB", "1.5 Gi", "loopback", "sim", "run", "", "0"]),
)
KEYS = [
    "cluster_id",
    "cloud",
    "containers",
    "queue",
    "api",
    "instance_types",
    "driver",
    "timeout_idle",
    "probe_interval",
    "max_instances",
    "vcpus",
    "ram",
    "price",
    "gpu",
    "driver_parameters",
    "preemptible",
    "listen",
    "path",
    "unknown_key",
]
yamlish = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), children, max_size=5
        ),
    ),
    max_leaves=25,
)


@settings(max_examples=200, deadline=None)
@given(st.one_of(yamlish, st.dictionaries(st.sampled_from(KEYS), yamlish, max_size=6)))
def test_config_from_data_only_reports_problems(data: Any) -> None:
    config, problems = config_from_data(data)
    assert (config is None) == bool(problems)
    assert all(isinstance(p, ConfigProblem) and p.message for p in problems)
    if config is not None:
        assert isinstance(config, Config)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.text(
        st.characters(blacklist_categories=("Cc", "Cs"), whitelist_characters="\n\t"), max_size=300
    )
)
def test_check_config_on_arbitrary_text_reports_problems(tmp_path: Path, text: str) -> None:
    path = tmp_path / "herder.yaml"
    path.write_text(text, encoding="utf-8")
    for problem in check_config(path, None):
        assert isinstance(problem, ConfigProblem) and problem.message


def test_check_config_reports_control_characters(tmp_path: Path) -> None:
    path = tmp_path / "herder.yaml"
    path.write_text("cluster_id: \x1f\n", encoding="utf-8")
    assert check_config(path, None)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(max_size=30),
        st.integers(),
        st.floats(allow_infinity=False),
        st.booleans(),
        st.none(),
    )
)
def test_unit_parsers_raise_only_value_error(value: object) -> None:
    for parse in (parse_duration, parse_size):
        try:
            result = parse(value)
        except ValueError:
            continue
        assert result >= 0


@pytest.mark.parametrize("value", [float("inf"), "9" * 400])
def test_infinite_sizes_are_value_errors(value: object) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.integers(0, 3_599), st.integers(60, 86_399).map(lambda s: s - s % 60)))
def test_whole_second_durations_round_trip(seconds: int) -> None:
    """Exact below an hour; from an hour on the short form drops the seconds (``1h1m``)."""
    assert parse_duration(format_duration(seconds)) == seconds


@settings(max_examples=100, deadline=None)
@given(st.integers(3_600, 86_399))
def test_long_durations_format_to_the_minute(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds - seconds % 60


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 999))
def test_millisecond_durations_round_trip(ms: int) -> None:
    assert math.isclose(parse_duration(format_duration(ms / 1000)), ms / 1000)


def test_day_durations_round_trip() -> None:
    assert parse_duration(format_duration(86_400)) == 86_400


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 2**50),
    st.sampled_from(["", "Ki", "Mi", "Gi", "Ti"]),
    st.sampled_from(["", "B"]),
    st.sampled_from(["", " "]),
)
def test_size_strings_parse_exactly(n: int, prefix: str, b: str, space: str) -> None:
    factor = {"": 1, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4}[prefix]
    if n * factor < 2**53:  # exact in the float the parser goes through
        assert parse_size(f"{n}{space}{prefix}{b}") == n * factor


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**45), st.sampled_from([1, 1024, 1024**2, 1024**3, 1024**4]))
def test_formatted_sizes_round_trip(n: int, unit: int) -> None:
    """Exact multiples of a binary unit round-trip exactly; other sizes within the rounding of
    one decimal place (format_size is for people, not for storage)."""
    size = n * unit
    back = parse_size(format_size(size))
    if size < 1024 or format_size(size)[:-3].isdigit():
        assert back == size
    else:
        assert abs(back - size) <= 0.05 * size + 1

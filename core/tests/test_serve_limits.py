"""``herder serve`` raises the open-file limit a large fleet needs (three per instance)."""

from __future__ import annotations

import resource
from collections.abc import Iterator

import pytest

from herder.app.commands.serve import raise_open_file_limit


@pytest.fixture
def nofile() -> Iterator[tuple[int, int]]:
    """The limits before the test, restored after it."""
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        yield limits
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)


def test_the_soft_limit_is_raised_to_the_hard_one(nofile: tuple[int, int]) -> None:
    _, hard = nofile
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"hard limit {hard} leaves nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    before, after = raise_open_file_limit()
    assert before == 256
    assert after == (1 << 20 if hard == resource.RLIM_INFINITY else hard)
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (after, hard)


def test_a_soft_limit_already_at_the_hard_one_is_left_alone(nofile: tuple[int, int]) -> None:
    _, hard = nofile
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no finite hard limit to sit at")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    assert raise_open_file_limit() == (hard, hard)

import pytest

from herder.units import format_duration, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10s", 10), ("1m30s", 90), ("2h", 7200), ("0", 0), ("1.5s", 1.5), ("250ms", 0.25), (5, 5)],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["10", "ten seconds", "1x", "", "-1s", "1m 30s", True])
def test_parse_duration_rejects(bad):
    if bad == "10":  # a bare number is seconds
        assert parse_duration(bad) == 10
        return
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [
        ("4GiB", 4 * 1024**3),
        ("500MB", 500_000_000),
        ("1.5 Gi", int(1.5 * 1024**3)),
        (1024, 1024),
        ("12", 12),
        ("2K", 2000),
    ],
)
def test_parse_size(text, nbytes):
    assert parse_size(text) == nbytes


@pytest.mark.parametrize("bad", ["4 gigs", "GiB", "-1", "1.2.3G"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(bad)


def test_format_duration():
    assert format_duration(192) == "3m12s"
    assert format_duration(3600 * 2 + 300) == "2h5m"
    assert format_duration(0) == "0s"

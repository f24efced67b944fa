"""Durations (``10s``, ``1m30s``, ``2h``) and byte sizes (``4GiB``, ``500MB``) as people write them.

Durations follow the Go syntax Arvados configs use, so an operator can carry values over: a
sequence of ``<number><unit>`` with units ``ns us µs ms s m h`` (and ``d`` for days, which
herder also writes); a bare ``0`` is allowed and a bare
number is taken as seconds.  Sizes accept integers, or a number with a decimal (``K M G T P E``,
powers of 1000) or binary (``Ki Mi Gi Ti Pi Ei``, powers of 1024) prefix, an optional ``B`` and an
optional space between number and unit.
"""

from __future__ import annotations

import math
import re

_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h|d)")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGTPE]i?)?B?\s*$")
_SIZE_PREFIX = {
    "K": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "P": 1000**5,
    "E": 1000**6,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
    "Pi": 1024**5,
    "Ei": 1024**6,
}


def parse_duration(value: object) -> float:
    """Return seconds for a duration written as a number or a Go-style string.

    Raises ValueError with a message that shows the accepted forms.
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}: expected e.g. 10s, 1m30s, 2h")
    if isinstance(value, int | float):
        if math.isnan(value) or value < 0:
            raise ValueError(f"invalid duration {value!r}: must not be negative")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"invalid duration {value!r}: expected e.g. 10s, 1m30s, 2h")
    text = value.strip()
    if text in ("0", ""):
        if text == "":
            raise ValueError("invalid duration '': expected e.g. 10s, 1m30s, 2h")
        return 0.0
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if seconds < 0 or math.isnan(seconds):
            raise ValueError(f"invalid duration {value!r}: must not be negative")
        return seconds
    pos = 0
    total = 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or pos == 0:
        raise ValueError(
            f"invalid duration {value!r}: expected a number with a unit "
            "(ns, us, ms, s, m, h), e.g. 10s, 1m30s, 2h"
        )
    return total


def format_duration(seconds: float) -> str:
    """Short human form: ``3m12s``, ``2h5m``, ``450ms``, ``0s``."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds < 1 and seconds != 0:
        return f"{seconds * 1000:.0f}ms"
    total = int(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours >= 24:
        days, hours = divmod(hours, 24)
        return f"{days}d{hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m{secs}s" if secs else f"{minutes}m"
    return f"{secs}s"


def parse_size(value: object) -> int:
    """Return a byte count for an integer or a string such as ``4GiB``, ``500MB``, ``1.5 Gi``."""
    if isinstance(value, bool):
        raise ValueError(f"invalid size {value!r}: expected e.g. 4GiB, 500MB, 1024")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"invalid size {value!r}: must not be negative")
        return value
    if isinstance(value, float):
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"invalid size {value!r}: must be a finite, non-negative number")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"invalid size {value!r}: expected e.g. 4GiB, 500MB, 1024")
    match = _SIZE_RE.match(value)
    if not match:
        raise ValueError(
            f"invalid size {value!r}: expected a number with an optional unit "
            "(K, M, G, T for powers of 1000; Ki, Mi, Gi, Ti for powers of 1024), e.g. 4GiB, 500MB"
        )
    number = float(match.group(1)) * (_SIZE_PREFIX[match.group(2)] if match.group(2) else 1)
    if not math.isfinite(number):
        raise ValueError(f"invalid size {value!r}: too large")
    return int(number)


def format_size(nbytes: int) -> str:
    """Short human form using binary units: ``4GiB``, ``512MiB``, ``1.5GiB``."""
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if nbytes >= factor:
            value = nbytes / factor
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return f"{nbytes}B"

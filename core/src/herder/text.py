"""Text from others, made safe to show: shared by the log's text form and the CLI's tables.

Its own module, light on imports, so that ``herder containers`` can escape a table's cells
without importing :mod:`logging` (through :mod:`herder.app.logsetup`).
"""

from __future__ import annotations

import re

#: C0 and C1 control characters and DEL, which a terminal or a line-based reader would act on.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def escape_controls(text: str) -> str:
    """``text`` with control characters written as escapes (``\\n``, ``\\x1b``): a reason or a
    name someone else chose can neither start a forged log line nor drive the terminal."""
    return _CONTROL.sub(lambda m: m.group(0).encode("unicode_escape").decode("ascii"), text)

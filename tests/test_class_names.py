"""No two classes in the shipped packages (core, drivers, plugins) share a name.

Core's own test checks core; this one checks across the distributions, because a traceback or a
log line naming ``DriverMetrics`` or ``Runner`` should say which one without a path.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_two_shipped_classes_share_a_name() -> None:
    where: dict[str, list[str]] = defaultdict(list)
    sources = [ROOT / "core" / "src", *ROOT.glob("drivers/*/src"), *ROOT.glob("plugins/*/src")]
    for source in sources:
        for path in sorted(source.rglob("*.py")):
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.ClassDef):
                    where[node.name].append(str(path.relative_to(ROOT)))
    assert len(sources) > 5
    assert {name: paths for name, paths in where.items() if len(paths) > 1} == {}

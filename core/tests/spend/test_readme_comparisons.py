"""The ``herder simulate --compare`` runs README.md shows are real, and keep their meaning.

Each documented command is run as the command runs it (same loader, simulation and table), on
the virtual clock.  Every figure README.md prints must be the one the command prints now, and
each spend control's effect must keep its direction, so that neither the README nor the
feature drifts silently.  When the engine changes a figure, paste the table the failure shows.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from herder.config import load_config
from herder.tools.simulate import (
    compare_summaries,
    format_comparison,
    load_workload,
    run_simulation,
)

ROOT = Path(__file__).resolve().parents[3]
README = ROOT / "README.md"
COMMAND = re.compile(
    r"^    \$ uv run herder simulate --compare (\S+)\s+(?:\\\n\s+)?(\S+)\s+(?:\\\n\s+)?"
    r"--workload (\S+)\n((?:    .*\n)+)",
    re.MULTILINE,
)
LABEL_WIDTH = 22  # format_comparison's first column


@dataclass(frozen=True)
class Documented:
    a: str
    b: str
    workload: str
    table: str


def documented() -> list[Documented]:
    found = [Documented(*m.groups()) for m in COMMAND.finditer(README.read_text())]
    assert found, "README.md shows no `herder simulate --compare` run"
    return found


@functools.cache
def summary(config: str, workload: str) -> dict[str, Any]:
    """One run, shared by the comparisons that have the same side; quiet, as the command is."""
    engine_log = logging.getLogger("herder")
    saved = engine_log.level
    engine_log.setLevel(logging.CRITICAL)
    try:
        result = run_simulation(load_config(ROOT / config), load_workload(str(ROOT / workload)))
    finally:
        engine_log.setLevel(saved)
    return result.summary


def rows(table: str) -> dict[str, list[str]]:
    """Figure label → the cells after it, from a table as format_comparison prints it."""
    out = {}
    for line in table.splitlines()[1:]:
        line = line.removeprefix("    ")
        out[line[:LABEL_WIDTH].strip()] = line[LABEL_WIDTH:].split()
    return out


def comparison(doc: Documented) -> dict[str, dict[str, float]]:
    summaries = {Path(doc.a).name: summary(doc.a, doc.workload)}
    summaries[Path(doc.b).name] = summary(doc.b, doc.workload)
    printed = format_comparison(compare_summaries(summaries))
    assert rows(doc.table) == {k: v for k, v in rows(printed).items() if k in rows(doc.table)}, (
        f"README.md's table for {doc.b} is not what the command prints now:\n{printed}"
    )
    names = list(summaries)
    return {
        row["figure"]: {"a": row["values"][names[0]], "b": row["values"][names[1]]}
        for row in compare_summaries(summaries)["rows"]
    }


def lower(figures: dict[str, dict[str, float]], figure: str) -> bool:
    return figures[figure]["b"] < figures[figure]["a"]


#: B's configuration → what README.md says its comparison shows.
EFFECTS = {
    # Billing-aware idle shutdown: paid hours are used, fewer instances are created.
    "examples/sim-hourly.yaml": lambda f: lower(f, "cost") and lower(f, "instances created"),
    # Consolidation: the trickle is steered to the instance that lives longest.
    "examples/sim-consolidation.yaml": lambda f: (
        lower(f, "instance-hours")
        and lower(f, "cost")
        and f["makespan (s)"]["b"] <= f["makespan (s)"]["a"]
    ),
    # Maximum lifetime: a replacement instance, a little more cost, never less.
    "examples/sim-lifetime.yaml": lambda f: (
        f["instances created"]["b"] > f["instances created"]["a"]
        and f["cost"]["b"] >= f["cost"]["a"]
    ),
    # Budget: containers wait for the next hour instead of the spend going on.
    "examples/sim-budget.yaml": lambda f: (
        f["queue wait mean (s)"]["b"] > 10 * f["queue wait mean (s)"]["a"]
        and f["cost"]["b"] <= f["cost"]["a"]
    ),
}


def test_every_documented_comparison_has_a_checked_effect() -> None:
    assert sorted(d.b for d in documented()) == sorted(EFFECTS)


@pytest.mark.parametrize("doc", documented(), ids=lambda d: Path(d.b).stem)
def test_a_documented_comparison_prints_what_readme_shows_and_keeps_its_effect(
    doc: Documented,
) -> None:
    figures = comparison(doc)
    assert figures["containers not final"] == {"a": 0, "b": 0}
    assert EFFECTS[doc.b](figures), figures
